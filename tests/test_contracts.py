"""Contracts: validation with one-line errors, interpolation, placement bookkeeping, timelines, atomic writes."""

import json
import math

import pytest

from specplan.catalog import bundled_profiles, load_model_spec, load_profile, profile_path
from specplan.contracts import (
    Capacities, Curve, DraftSpec, Event, HardwareProfile, Link, ModelRef, Placement, Plan, Point, Policy, Stat,
    Timeline, Workload,
)
from specplan.errors import ContractError, SpecplanError
from specplan.jsonio import load, read_json, write_json


def test_stat_order_and_samples():
    s = Stat.from_samples([3.0, 1.0, 2.0, 10.0])
    assert (s.min, s.median, s.max) == (1.0, 2.5, 10.0)
    with pytest.raises(ValueError):
        Stat(min=2, median=1, max=3)


def test_curve_interpolates_in_log_x_and_clamps():
    c = Curve(x_name="size_bytes", y_name="bandwidth_Bps",
              points=[Point(x=1e3, y=Stat.of(1.0)), Point(x=1e5, y=Stat.of(3.0))])
    assert c.at(1e4) == pytest.approx(2.0)  # halfway in log x
    assert c.at(10) == 1.0 and c.at(1e9) == 3.0  # no extrapolation
    assert c.at(math.sqrt(1e3 * 1e4)) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        Curve(x_name="x", y_name="y", points=[Point(x=2, y=Stat.of(1)), Point(x=1, y=Stat.of(1))])


def test_link_time():
    link = Link(bandwidth_Bps=Curve.constant("size_bytes", "bandwidth_Bps", 1e9), latency_s=1e-5)
    assert link.time_s(0) == 0
    assert link.time_s(1e9) == pytest.approx(1 + 1e-5)


@pytest.mark.parametrize("name", list(bundled_profiles()))
def test_bundled_profiles_load_and_are_published(name):
    p = load_profile(name)
    assert p.provenance.kind == "published" and p.provenance.source
    assert not p.shared_memory and p.device.kind == "cuda"
    assert p.h2d_time_s(1e9) > 0 and p.disk_read_time_s(1e9) > p.h2d_time_s(1e9)
    assert p.device.matmul_flops("float16", 1) > 1e12
    assert p.device.memory_bandwidth_Bps.median >= 300e9 and p.host.memory_bandwidth_Bps.median >= 50e9


def test_published_4090_figures():
    p = load_profile("rtx4090-pcie4")
    assert p.device.memory_bytes == 24 * 2**30
    assert p.device.memory_bandwidth_Bps.median == pytest.approx(1008e9)
    assert p.device.peak_matmul_flops("bfloat16") == pytest.approx(165.2e12)
    assert load_profile("rtx4090-pcie3").h2d_time_s(1e9) > p.h2d_time_s(1e9)


def test_host_tier_dtypes_and_host_budget_are_decided_by_the_contracts():
    from planner_fixtures import cpu_profile

    gpu, cpu = load_profile("rtx4090-pcie4"), cpu_profile()
    assert gpu.has_host_tier and not cpu.has_host_tier
    unset, set_ = Capacities(device_bytes=2**30), Capacities(device_bytes=2**30, host_bytes=5 * 2**30, disk_bytes=7)
    assert unset.capacity_bytes("host", gpu) == gpu.host.memory_bytes and set_.capacity_bytes("host", gpu) == 5 * 2**30
    assert unset.capacity_bytes("disk", gpu) is None and set_.capacity_bytes("disk", gpu) == 7
    assert unset.capacity_bytes("device", cpu) == 2**30


def test_printed_sizes_are_binary_with_their_unit():
    from specplan.fmt import GiB, human_bytes

    assert GiB == 2**30 and human_bytes(3 * 2**29) == "1.50 GiB" and human_bytes(4096) == "4.00 KiB"
    assert human_bytes(512) == "512 B" and human_bytes(2**40) == "1.00 TiB"


def test_shared_memory_profile_has_free_h2d():
    d = read_json(profile_path("rtx4090-pcie4"))
    d["shared_memory"] = True
    with pytest.raises(Exception, match="shared_memory is only for a device of kind 'cpu'"):
        HardwareProfile.model_validate(d)
    d["device"]["kind"] = "cpu"
    p = HardwareProfile.model_validate(d)
    assert p.h2d_time_s(1e9) == 0 and p.d2h_time_s(1e9) == 0


def test_malformed_profile_is_one_line_naming_file_and_field(tmp_path):
    d = read_json(profile_path("t4"))
    d["device"]["memory_bandwidth_Bps"]["median"] = "fast"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(ContractError) as e:
        load(HardwareProfile, bad)
    msg = str(e.value)
    assert str(bad) in msg and "device.memory_bandwidth_Bps.median" in msg and "\n" not in msg
    d = read_json(profile_path("t4"))
    del d["links"]["h2d_pinned"], d["links"]["h2d_pageable"]
    bad.write_text(json.dumps(d))
    with pytest.raises(ContractError, match="needs an h2d_pinned or h2d_pageable link"):
        load(HardwareProfile, bad)
    with pytest.raises(SpecplanError, match="unknown profile"):
        load_profile("no-such-gpu")


def test_missing_measured_profile_says_how_to_make_one():
    with pytest.raises(SpecplanError, match="specplan profile --quick"):
        load_profile(None)


def _plan(**over):
    spec = load_model_spec("mixtral-8x7b")
    fields = dict(
        created_utc="2026-11-22T00:00:00Z",
        model=ModelRef(name="mixtral-8x7b", spec=spec),
        profile=load_profile("rtx4090-pcie4"),
        capacities=Capacities(device_bytes=24 * 2**30),
        workload=Workload(prompt_len=512, gen_len=32, num_prompts=64),
        policy=Policy(prefill_batch=8, decode_batch=32),
        placement=Placement.uniform(spec, "disk"),
    )
    fields.update(over)
    return Plan(**fields)


def test_plan_roundtrip_and_group_bytes(tmp_path):
    plan = _plan()
    path = write_json(tmp_path / "plan.json", plan)
    again = load(Plan, path)
    assert again == plan
    gb = plan.placement.group_bytes(plan.model.spec, "bfloat16")
    total = sum(sum(row.values()) for row in gb.values())
    assert total == pytest.approx(plan.model.spec.weight_bytes("bfloat16"), abs=100)
    assert gb["experts"]["disk"] == plan.model.spec.group_bytes("bfloat16")["experts"]
    assert gb["experts"]["device"] == 0


def test_plan_rejects_inconsistent_placement_and_policy():
    spec = load_model_spec("mixtral-8x7b")
    dense = Placement.uniform(load_model_spec("mistral-7b"))
    with pytest.raises(ValueError, match="is MoE"):
        _plan(placement=dense)
    short = Placement.uniform(spec).model_copy(update={"layers": Placement.uniform(spec).layers[:3]})
    with pytest.raises(ValueError, match="placement has 3 layers"):
        _plan(placement=short)
    with pytest.raises(ValueError, match="need an acceptance"):
        Policy(prefill_batch=1, decode_batch=1, draft_len=4)
    with pytest.raises(ValueError, match="draft is 'none'"):
        _plan(policy=Policy(prefill_batch=1, decode_batch=1, draft_len=4, acceptance=0.8))
    p = _plan(policy=Policy(prefill_batch=1, decode_batch=1, draft_len=4, acceptance=0.8),
              draft=DraftSpec(kind="substitute", bits=4))
    assert p.draft.label == "substitute:int4"
    with pytest.raises(ValueError, match="needs bits"):
        DraftSpec(kind="substitute")


def test_malformed_plan_file(tmp_path):
    d = json.loads(_plan().model_dump_json())
    d["policy"]["decode_batch"] = 0
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ContractError) as e:
        load(Plan, p)
    assert "policy.decode_batch" in str(e.value) and "\n" not in str(e.value)


def test_timeline_busy_time_merges_overlaps_and_exports_chrome_trace():
    t = Timeline(source="simulated", events=[
        Event(resource="disk_read", name="a", start_s=0.0, end_s=1.0, bytes=10),
        Event(resource="disk_read", name="b", start_s=0.5, end_s=1.5, bytes=10),
        Event(resource="device_compute", name="c", start_s=1.5, end_s=2.0, flops=5.0, batch=1, layer=3),
    ])
    assert t.busy_s("disk_read") == pytest.approx(1.5)
    assert t.busy_s("disk_read", 1.0, 2.0) == pytest.approx(0.5)
    assert t.utilisation()["device_compute"] == pytest.approx(0.25)
    assert t.resources() == ["device_compute", "disk_read"]
    tr = t.to_chrome_trace()
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == 3 and xs[2]["ts"] == 1.5e6 and xs[2]["dur"] == pytest.approx(0.5e6)
    assert xs[2]["args"]["layer"] == 3
    with pytest.raises(ValueError, match="ends"):
        Event(resource="h2d", name="x", start_s=2, end_s=1)


def test_trace_files(tmp_path):
    from specplan.trace import write_chrome_trace, write_gantt_png, write_timeline

    t = Timeline(source="measured", events=[Event(resource="h2d", name="x", start_s=0, end_s=1, batch=0)])
    write_timeline(t, tmp_path / "t.json")
    assert load(Timeline, tmp_path / "t.json") == t
    write_chrome_trace(t, tmp_path / "trace.json")
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    write_gantt_png(t, tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_write_is_atomic(tmp_path, monkeypatch):
    import os

    target = tmp_path / "out.json"
    write_json(target, {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind


def test_decode_attention_time_follows_the_elements_of_the_dtype_it_was_measured_in():
    """A CPU curve measured with a bfloat16 cache times a float32 cache of the same bytes as half the elements;
    a curve without a recorded dtype (GPUs, published figures) is bytes per second whatever the dtype."""
    from planner_fixtures import cpu_profile

    unit = cpu_profile().device
    assert unit.decode_attention_dtype is None
    per_bytes = unit.attention_time_s(4e6, 2, "bfloat16")
    assert per_bytes == pytest.approx(4e6 / unit.decode_attention_Bps.at(2e6))
    assert unit.attention_time_s(4e6, 2, "float32") == per_bytes
    cpu = unit.model_copy(update={"decode_attention_dtype": "bfloat16"})
    assert cpu.attention_time_s(4e6, 2, "bfloat16") == per_bytes
    assert cpu.attention_time_s(8e6, 2, "float32") == pytest.approx(per_bytes)  # same elements, same time
    assert unit.model_copy(update={"decode_attention_Bps": None}).attention_time_s(4e6, 2, "float32") is None
