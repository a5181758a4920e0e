"""The simulator's event core on hand-made op programs: event order and tie-breaks, dependencies, staging slots,
skipped ops, a hand-computed two-layer example to the microsecond, and the conservation checks reused on real
plans in test_simulator_plans.py."""

from collections import defaultdict

import pytest

from specplan.contracts.hardware import (ComputeUnit, Curve, DiskInfo, HardwareProfile, Link, MatmulCurve, Overheads, Point,
                                         Provenance, Stat)
from specplan.contracts.timeline import RESOURCES
from specplan.planner.ops import Op
from specplan.simulator.core import Schedule, SimulationError, drawn_stage, expected_stage, make_template, run
from specplan.simulator.events import DISPATCH, FINISH, EventQueue

US = 1e-6


def flat_profile(disk_Bps: float = 1e9, flops: float = 1e12) -> HardwareProfile:
    """Round-number rates, no latency, no overheads: op times are bytes / disk_Bps and flops / flops."""
    unit = ComputeUnit(kind="cpu", name="flat", memory_bytes=1 << 34, memory_bandwidth_Bps=Stat.of(1e15),
                       matmul=[MatmulCurve(dtype="float32", k=1, n=1, flops=Curve.constant("rows", "flops", flops))])
    link = Link(bandwidth_Bps=Curve.constant("transfer_bytes", "bandwidth_Bps", disk_Bps), latency_s=0.0)
    return HardwareProfile(
        name="flat", provenance=Provenance(kind="published", created_utc="2026-01-01T00:00:00Z", source="test figures"),
        device=unit, host=unit, shared_memory=True, links={"disk_read_direct": link},
        overheads=Overheads(per_op_s=0, per_layer_s=0, per_step_s=0, thread_handoff_s=0), disk=DiskInfo(o_direct=True))


def cpu_profile() -> HardwareProfile:
    """A machine like this one in round figures: no GPU (shared memory), fp32 matmul 5-140 GFLOP/s over rows,
    30 GB/s memory, decode attention 1-8 GB/s, O_DIRECT disk reads at 2.7 GB/s after 80 us, small overheads."""

    def curve(x_name, y_name, pts):
        return Curve(x_name=x_name, y_name=y_name, points=[Point(x=x, y=Stat.of(y)) for x, y in pts])

    matmul = [MatmulCurve(dtype="float32", k=k, n=n, flops=curve("rows", "flops", [(1, 5e9), (8, 40e9), (64, 120e9), (512, 140e9)]))
              for k, n in ((1024, 1024), (4096, 14336))]
    unit = ComputeUnit(kind="cpu", name="cpu", memory_bytes=24 << 30, memory_bandwidth_Bps=Stat.of(30e9), matmul=matmul,
                       decode_attention_Bps=curve("kv_bytes", "bandwidth_Bps", [(1 << 16, 1.3e9), (1 << 24, 8e9)]),
                       threads=2)
    disk = Link(bandwidth_Bps=curve("transfer_bytes", "bandwidth_Bps", [(1 << 16, 1.0e9), (1 << 22, 2.5e9), (1 << 26, 2.7e9)]),
                latency_s=8e-5)
    return HardwareProfile(
        name="cpu-test", provenance=Provenance(kind="published", created_utc="2026-01-01T00:00:00Z",
                                               source="test figures, rounded from a 2-core VM"),
        device=unit, host=unit, shared_memory=True, links={"disk_read_direct": disk},
        overheads=Overheads(per_op_s=1.2e-6, per_layer_s=2e-4, per_step_s=3e-5, thread_handoff_s=3e-5),
        disk=DiskInfo(o_direct=True))


def read(name: str, ms: float, slot=None, deps=(), layer=None, **kw) -> Op:
    """A disk read of ``ms`` milliseconds on flat_profile()."""
    return Op(name, "disk_read", "transfer", bytes=ms * 1e6, slot=slot, deps=tuple(deps), layer=layer, **kw)


def compute(name: str, ms: float, deps=(), layer=None, resource="device_compute", **kw) -> Op:
    """A matmul of ``ms`` milliseconds on flat_profile()."""
    return Op(name, resource, "matmul", flops=ms * 1e9, shape=(1, 1, 1), dtype="float32", deps=tuple(deps),
              layer=layer, **kw)


def two_layer_pass(depth: int) -> list[Op]:
    """Both layers streamed from disk into ``depth + 1`` staging slots, then a resident lm_head."""
    s = lambda layer: ("device", layer % (depth + 1))  # noqa: E731
    return [
        read("L0.read", 3, slot=s(0), layer=0),
        compute("L0.compute", 2, deps=(0,), layer=0),
        read("L1.read", 3, slot=s(1), layer=1),
        compute("L1.compute", 2, deps=(1, 2), layer=1),
        compute("lm_head", 1, deps=(3,), group="lm_head"),
    ]


def rounds(ops: list[Op], n: int, profile=None):
    t = make_template(ops, profile or flat_profile())
    stages = []
    for r in range(n):
        stages.append(expected_stage(t, ((r - 1, t.tail),) if r else (), kind="decode", round=r))
    return run(stages)


def times(s: Schedule) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every op, by stage then program order."""
    out = []
    for si, st in enumerate(s.stages):
        for i, op in enumerate(st.template.ops):
            g = s.base[si] + i
            out.append((f"r{si}.{op.name}", round(s.start_s[g] / US, 3), round(s.end_s[g] / US, 3)))
    return out


# ---- the event queue ---------------------------------------------------------------------------------------------


def test_event_queue_orders_by_time_then_priority_then_sequence():
    q = EventQueue()
    q.push(2.0, FINISH, "late")
    q.push(1.0, DISPATCH, "dispatch pushed first")
    q.push(1.0, FINISH, "finish a")
    q.push(1.0, DISPATCH, "dispatch pushed second")
    q.push(1.0, FINISH, "finish b")
    got = []
    while (e := q.pop()) is not None:
        got.append(e[3])
    assert got == ["finish a", "finish b", "dispatch pushed first", "dispatch pushed second", "late"]
    assert q.pop() is None and not q


def test_finishes_at_a_time_come_before_dispatches_so_issue_order_breaks_ties():
    """At t=3 the disk frees (A ends) and C becomes ready (B ends on the device). D was ready since t=0 but was
    issued after C: the disk takes C first, although A's finish event was handled before B's."""
    ops = [
        read("A", 3),
        compute("B", 3),
        read("C", 1, deps=(1,)),
        read("D", 1),
    ]
    s = run([expected_stage(make_template(ops, flat_profile()))])
    assert times(s) == [("r0.A", 0, 3000), ("r0.B", 0, 3000), ("r0.C", 3000, 4000), ("r0.D", 4000, 5000)]


def test_a_resource_freed_at_t_starts_the_next_op_at_t_without_a_gap():
    ops = [read("A", 2), read("B", 2), compute("C", 1, deps=(0,)), read("E", 1, deps=(2,))]
    s = run([expected_stage(make_template(ops, flat_profile()))])
    assert times(s) == [("r0.A", 0, 2000), ("r0.B", 2000, 4000), ("r0.C", 2000, 3000), ("r0.E", 4000, 5000)]


# ---- a hand-computed two-layer example ----------------------------------------------------------------------------


def test_two_layer_example_with_two_staging_slots_to_the_microsecond():
    """depth 1: slots d0 (layer 0) and d1 (layer 1). Reads 3 ms, layer computes 2 ms, lm_head 1 ms, two rounds.
    Round 1: L0.read 0-3, L1.read 3-6 (disk busy until 3), L0 3-5, L1 waits for its read: 6-8, lm_head 8-9.
    Round 2: L0.read takes slot d0 (freed when round 1's L0 ended at 5) as soon as the disk is free: 6-9;
    L1.read needs slot d1, freed when round 1's L1 ended at 8, and the disk at 9: 9-12. L0 follows round 1's
    lm_head (9) and its read (9): 9-11; L1 waits for its read: 12-14; lm_head 14-15."""
    s = rounds(two_layer_pass(depth=1), 2)
    assert times(s) == [
        ("r0.L0.read", 0, 3000), ("r0.L0.compute", 3000, 5000), ("r0.L1.read", 3000, 6000),
        ("r0.L1.compute", 6000, 8000), ("r0.lm_head", 8000, 9000),
        ("r1.L0.read", 6000, 9000), ("r1.L0.compute", 9000, 11000), ("r1.L1.read", 9000, 12000),
        ("r1.L1.compute", 12000, 14000), ("r1.lm_head", 14000, 15000),
    ]
    check_conservation(s)


def test_two_layer_example_with_one_staging_slot_serialises_fetch_and_compute():
    """depth 0: one slot. Each read waits until the compute of the previous layer frees the buffer:
    L0.read 0-3, L0 3-5, L1.read 5-8, L1 8-10, lm_head 10-11; round 2: L0.read 10-13 (slot freed at 10), L0 13-15,
    L1.read 15-18, L1 18-20, lm_head 20-21."""
    s = rounds(two_layer_pass(depth=0), 2)
    assert times(s) == [
        ("r0.L0.read", 0, 3000), ("r0.L0.compute", 3000, 5000), ("r0.L1.read", 5000, 8000),
        ("r0.L1.compute", 8000, 10000), ("r0.lm_head", 10000, 11000),
        ("r1.L0.read", 10000, 13000), ("r1.L0.compute", 13000, 15000), ("r1.L1.read", 15000, 18000),
        ("r1.L1.compute", 18000, 20000), ("r1.lm_head", 20000, 21000),
    ]
    check_conservation(s)


def test_fetches_of_one_owner_share_a_slot_and_a_later_owner_waits_in_issue_order():
    """Layer 0's attention and (on-demand) expert reads share slot d0; layer 1's read (same slot at depth 0) may
    not jump ahead while layer 0's expert read waits for the router, although the disk is idle."""
    d0 = ("device", 0)
    ops = [
        read("L0.attn.read", 1, slot=d0, layer=0),
        compute("L0.router", 2, deps=(0,), layer=0),
        read("L0.E0.read", 1, slot=d0, deps=(1,), layer=0, on_demand=True),
        compute("L0.E0", 1, deps=(1, 2), layer=0),
        read("L1.attn.read", 1, slot=d0, layer=1),
        compute("L1.router", 1, deps=(3, 4), layer=1),
    ]
    s = run([expected_stage(make_template(ops, flat_profile()))])
    assert times(s) == [
        ("r0.L0.attn.read", 0, 1000), ("r0.L0.router", 1000, 3000), ("r0.L0.E0.read", 3000, 4000),
        ("r0.L0.E0", 4000, 5000), ("r0.L1.attn.read", 5000, 6000), ("r0.L1.router", 6000, 7000),
    ]


def test_an_op_that_does_not_happen_takes_no_time_and_releases_its_dependents():
    ops = [
        compute("router", 1),
        read("E0.read", 5, deps=(0,), expert=0, prob=0.5, layer=0, slot=("device", 0)),
        compute("E0", 5, deps=(0, 1), expert=0, prob=0.5, layer=0),
        compute("combine", 1, deps=(0, 2)),
    ]
    t = make_template(ops, flat_profile())
    assert t.num_draws == 1 and t.draw == (-1, 0, 0, -1)  # fetch and compute of one expert share one draw
    skipped = run([drawn_stage(t, [0.9])])  # 0.9 >= 0.5: untouched
    assert [(n, a, b) for n, a, b in times(skipped)] == [
        ("r0.router", 0, 1000), ("r0.E0.read", 1000, 1000), ("r0.E0", 1000, 1000), ("r0.combine", 1000, 2000)]
    assert skipped.resource[1] == skipped.resource[2] == -1
    touched = run([drawn_stage(t, [0.1])])
    assert times(touched)[-1] == ("r0.combine", 11000, 12000)
    expected = run([expected_stage(t)])  # every op for prob x its time
    assert times(expected)[-1] == ("r0.combine", 6000, 7000)


def test_on_a_shared_memory_profile_host_compute_is_the_device_queue():
    ops = [compute("a", 2), compute("b", 2, resource="host_compute")]
    s = run([expected_stage(make_template(ops, flat_profile()))])
    assert times(s) == [("r0.a", 0, 2000), ("r0.b", 2000, 4000)]
    s = run([expected_stage(make_template(ops, _gpu_profile()))])
    assert times(s) == [("r0.a", 0, 2000), ("r0.b", 0, 2000)]


def _gpu_profile() -> HardwareProfile:
    """flat_profile() with a separate GPU: host compute is its own queue."""
    p = flat_profile()
    d = p.model_dump()
    d.update(shared_memory=False, device={**d["device"], "kind": "cuda"})
    d["links"]["h2d_pinned"] = d["links"]["disk_read_direct"]
    return HardwareProfile.model_validate(d)


def test_cycles_are_reported_not_hung():
    with pytest.raises(SimulationError, match="must come earlier"):
        make_template([compute("a", 1, deps=(1,)), compute("b", 1)], flat_profile())
    t = make_template([compute("a", 1)], flat_profile())
    with pytest.raises(SimulationError, match="only ops of earlier stages"):
        run([expected_stage(t, ((0, 0),))])


# ---- conservation checks (also used on real plans) ---------------------------------------------------------------


def check_conservation(s: Schedule) -> None:
    """No resource serves two ops at once; every op starts after everything it waits for; at any time one owner
    holds each staging slot (from the start of its fetch to the end of the fetch's last direct dependent)."""
    eps = 1e-9
    by_resource = defaultdict(list)
    for g, r in enumerate(s.resource):
        assert s.end_s[g] >= s.start_s[g]
        if r >= 0:
            by_resource[r].append((s.start_s[g], s.end_s[g]))
    for r, iv in by_resource.items():
        iv.sort()
        for (a0, b0), (a1, b1) in zip(iv, iv[1:]):
            assert a1 >= b0 - eps, f"{RESOURCES[r]} busy twice at {a1}"
    for g in range(len(s.start_s)):
        for d in s.deps_of(g):
            assert s.start_s[g] >= s.end_s[d] - eps
    holds = defaultdict(list)
    for si, st in enumerate(s.stages):
        t = st.template
        for i, op in enumerate(t.ops):
            g = s.base[si] + i
            if op.slot is None or s.resource[g] < 0:
                continue
            until = max([s.end_s[g]] + [s.end_s[s.base[si] + d] for d in t.dependents[i]])
            holds[op.slot].append((s.start_s[g], until, (si, op.layer)))
    for slot, iv in holds.items():
        owners = defaultdict(lambda: [float("inf"), -float("inf")])
        for a, b, who in iv:
            owners[who][0] = min(owners[who][0], a)
            owners[who][1] = max(owners[who][1], b)
        spans = sorted(owners.values())
        for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
            assert a1 >= b0 - eps, f"slot {slot} held by two owners at {a1}"
