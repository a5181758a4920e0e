"""Helpers of the engine-runtime tests (test_store.py, test_run.py): a CPU profile in round figures, plans over tiny
models, and placements (uniform, mixed)."""

from __future__ import annotations

from specplan.contracts.hardware import (ComputeUnit, Curve, DiskInfo, HardwareProfile, Link, MatmulCurve, Overheads,
                                         Point, Provenance, Stat)
from specplan.contracts.plan import Capacities, LayerPlacement, ModelRef, Placement, Plan, Policy, Workload


def cpu_profile() -> HardwareProfile:
    """No GPU (shared memory), fp32 matmul 5-140 GFLOP/s, 30 GB/s memory, O_DIRECT reads at 2.7 GB/s."""

    def curve(x_name, y_name, pts):
        return Curve(x_name=x_name, y_name=y_name, points=[Point(x=x, y=Stat.of(y)) for x, y in pts])

    unit = ComputeUnit(kind="cpu", name="cpu", memory_bytes=24 << 30, memory_bandwidth_Bps=Stat.of(30e9),
                       matmul=[MatmulCurve(dtype="float32", k=1024, n=1024,
                                           flops=curve("rows", "flops", [(1, 5e9), (64, 120e9), (512, 140e9)]))],
                       threads=2)
    disk = Link(bandwidth_Bps=curve("transfer_bytes", "bandwidth_Bps", [(1 << 16, 1.0e9), (1 << 26, 2.7e9)]),
                latency_s=8e-5)
    return HardwareProfile(
        name="cpu-test", provenance=Provenance(kind="published", created_utc="2026-01-01T00:00:00Z",
                                               source="round test figures"),
        device=unit, host=unit, shared_memory=True, links={"disk_read_direct": disk},
        overheads=Overheads(per_op_s=1e-6, per_layer_s=1e-4, per_step_s=3e-5, thread_handoff_s=3e-5),
        disk=DiskInfo(o_direct=True))


def make_plan(spec, placement: Placement, path: str | None = None, device_bytes: int = 1 << 30,
              host_bytes: int | None = None, prompt_len: int = 8, gen_len: int = 6, num_prompts: int = 3,
              **policy) -> Plan:
    pol = {"prefill_batch": 2, "decode_batch": 3, "weight_dtype": "float32", "kv_dtype": "float32", **policy}
    return Plan(created_utc="2026-01-01T00:00:00Z", model=ModelRef(name=spec.name, path=path, spec=spec),
                profile=cpu_profile(), capacities=Capacities(device_bytes=device_bytes, host_bytes=host_bytes),
                workload=Workload(prompt_len=prompt_len, gen_len=gen_len, num_prompts=num_prompts),
                policy=Policy(**pol), placement=placement)


def mixed_placement(spec) -> Placement:
    """Every tier used: layer by layer a different mix; experts alternate device / disk / host."""
    tiers = ("device", "disk", "host")
    layers = []
    for i in range(spec.num_layers):
        moe = spec.is_moe_layer(i)
        t = tiers[i % 3]
        layers.append(LayerPlacement(
            attention=t, norms_router=tiers[(i + 1) % 3], kv_cache="host" if i % 2 else "device",
            mlp=None if moe else tiers[(i + 2) % 3],
            experts=[tiers[(e + i) % 3] for e in range(spec.num_experts)] if moe else [],
            shared_experts=tiers[(i + 1) % 3] if moe and spec.shared_expert_intermediate_size else None))
    return Placement(embed="device", lm_head="disk", final_norm="disk", layers=layers)
