"""Shared helpers for the planner tests: a CPU-only (shared-memory) profile like this machine's, tiny models,
and plans built by hand."""

from __future__ import annotations

from specplan.contracts import (
    Capacities, ComputeUnit, Curve, HardwareProfile, LayerPlacement, Link, MatmulCurve, ModelSpec, Overheads,
    Placement, Plan, Point, Policy, Provenance, Stat, Workload,
)
from specplan.contracts.hardware import DiskInfo
from specplan.contracts.plan import DraftSpec, ModelRef
from specplan.planner.dtypes import candidate_dtypes

from specplan.fmt import GiB  # noqa: F401 (the tests import it from here)


def curve(x_name: str, y_name: str, pts: list[tuple[float, float]]) -> Curve:
    return Curve(x_name=x_name, y_name=y_name, points=[Point(x=x, y=Stat.of(y)) for x, y in pts])


def cpu_profile(disk_Bps: float = 2.7e9, name: str = "test-cpu", lowbit: bool = True) -> HardwareProfile:
    """Numbers of the order of this machine (2 cores, fp32 ~140 GFLOP/s, O_DIRECT ~2.7 GB/s); not measured.
    ``lowbit``: the substitute's int8 / int4 kernels profiled (at float32's rates), so substitutes can be timed."""
    fp32 = curve("rows", "flops", [(1, 6e9), (8, 40e9), (64, 120e9), (512, 140e9)])
    unit = ComputeUnit(
        kind="cpu", name="test cpu", memory_bytes=24 * GiB, memory_bandwidth_Bps=Stat.of(12e9), threads=2,
        matmul=[MatmulCurve(dtype=d, k=4096, n=4096, flops=fp32)
                for d in ("float32", *(("int8", "int4") if lowbit else ()))],
        decode_attention_Bps=curve("kv_bytes", "bandwidth_Bps", [(1e4, 2e9), (1e7, 8e9)]),
    )
    disk = Link(bandwidth_Bps=curve("size_bytes", "bandwidth_Bps", [(65536, 0.6e9), (2**24, disk_Bps)]),
                latency_s=1e-4)
    return HardwareProfile(
        name=name, provenance=Provenance(kind="measured", created_utc="2026-01-01T00:00:00Z", notes="test fixture"),
        device=unit, host=unit, shared_memory=True,
        links={"disk_read_direct": disk, "disk_write": disk},
        overheads=Overheads(per_op_s=5e-6, per_layer_s=5e-5, per_step_s=2e-4, thread_handoff_s=2e-5),
        disk=DiskInfo(o_direct=True),
    )


def tiny_moe(layers: int = 2, experts: int = 4, top_k: int = 2, hidden: int = 256, vocab: int = 1000,
             name: str = "tiny-moe") -> ModelSpec:
    return ModelSpec(name=name, family="mixtral", num_layers=layers, hidden_size=hidden, num_heads=4,
                     num_kv_heads=2, head_dim=hidden // 4, vocab_size=vocab, intermediate_size=4 * hidden,
                     num_experts=experts, experts_per_token=top_k, moe_intermediate_size=4 * hidden,
                     moe_layers=tuple(range(layers)), dtype="bfloat16")


def tiny_dense(layers: int = 4, hidden: int = 256, vocab: int = 1000, name: str = "tiny-dense") -> ModelSpec:
    return ModelSpec(name=name, family="llama", num_layers=layers, hidden_size=hidden, num_heads=4, num_kv_heads=2,
                     head_dim=hidden // 4, vocab_size=vocab, intermediate_size=4 * hidden, dtype="bfloat16")


def hand_plan(spec: ModelSpec, profile: HardwareProfile, *, experts: list[str] | None = None, attention: str = "device",
              kv: str = "device", mlp: str = "device", embed: str = "device", lm_head: str = "device",
              draft: DraftSpec | None = None, draft_len: int = 0, acceptance: float | None = None,
              decode_batch: int = 4, num_batches: int = 1, prefill_batch: int = 4, expert_fetch: str = "routed",
              attention_on: str = "device", experts_on: str = "device", device_gib: float = 64,
              workload: Workload | None = None, prefetch_depth: int = 1) -> Plan:
    dtype = candidate_dtypes(profile, spec)[0]
    layers = [LayerPlacement(attention=attention, norms_router="device", kv_cache=kv,
                             mlp=None if spec.is_moe_layer(i) else mlp,
                             experts=(experts or ["device"] * spec.num_experts) if spec.is_moe_layer(i) else [],
                             shared_experts="device" if spec.is_moe_layer(i) and spec.shared_expert_intermediate_size
                             else None)
              for i in range(spec.num_layers)]
    return Plan(
        created_utc="2026-01-01T00:00:00Z", model=ModelRef(name=spec.name, spec=spec),
        draft=draft or DraftSpec(), profile=profile,
        capacities=Capacities(device_bytes=int(device_gib * GiB)),
        workload=workload or Workload(prompt_len=64, gen_len=16, num_prompts=8),
        policy=Policy(prefill_batch=prefill_batch, decode_batch=decode_batch, num_batches=num_batches,
                      draft_len=draft_len, acceptance=acceptance, expert_fetch=expert_fetch,
                      attention_on=attention_on, experts_on=experts_on, weight_dtype=dtype, kv_dtype=dtype,
                      prefetch_depth=prefetch_depth),
        placement=Placement(embed=embed, lm_head=lm_head, final_norm="device", layers=layers),
    )
