"""Drift: the rates a run achieved, from its own timeline, against its profile (``validation/drift.py``).

Synthetic timelines whose every event takes the time the profile gives it, times a known slowdown of one resource:
the slowed resource (and only it) is flagged, and the prediction recomputed at the observed rates is the prediction
of the slowed machine. One real run on a tiny model checks that ``specplan run`` writes and prints the report.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from planner_fixtures import cpu_profile, hand_plan, tiny_dense
from runtime_fixtures import make_plan

from specplan.cli import main
from specplan.contracts.hardware import HardwareProfile
from specplan.contracts.plan import Placement, Plan
from specplan.contracts.timeline import Event, Timeline
from specplan.planner.cost import compute_dtype
from specplan.planner.predict import predict
from specplan.validation.compare import AT_ACCEPTANCE, signed_error
from specplan.validation.drift import DRIFT_THRESHOLD, drift_report, drifted, matmul_shapes, observed_figures
from specplan.validation.show import drift_lines
from specplan.jsonio import write_json

F32 = 4


def disk_plan(profile: HardwareProfile | None = None) -> Plan:
    """A tiny dense model whose MLPs stream from disk every pass."""
    return hand_plan(tiny_dense(layers=4), profile or cpu_profile(), mlp="disk")


def slowed(profile: HardwareProfile, disk: float = 1.0, compute: float = 1.0, h2d: float = 1.0) -> HardwareProfile:
    """The machine ``disk`` / ``compute`` / ``h2d`` times slower than ``profile`` on those resources."""
    links = {n: link.scaled(1 / disk) if n.startswith("disk_read") else link.scaled(1 / h2d) if n.startswith("h2d")
             else link for n, link in profile.links.items()}
    unit = profile.device.model_copy(update={"matmul": [c.model_copy(update={"flops": c.flops.scaled(1 / compute)})
                                                        for c in profile.device.matmul]})
    return profile.model_copy(update={"links": links, "device": unit, "host": unit})


def timeline(plan: Plan, disk: float = 1.0, compute: float = 1.0, layer_gap_s: float = 0.0,
             passes: int = 6) -> Timeline:
    """Decode passes of ``plan``'s model, one after another: per layer an optional gap (Python, nothing else
    running), the attention projections, the MLP's fetch (a disk read, or on a GPU machine a host->device copy;
    compute waits), the MLP; each op takes the time the profile gives it, the fetch ``disk`` times and matmuls
    ``compute`` times longer."""
    prof, spec = plan.profile, plan.model.spec
    dtype = compute_dtype(prof.device, plan.policy.weight_dtype)
    rows = plan.policy.decode_batch
    events: list[Event] = []
    t = 0.0

    def span(name: str, resource: str, seconds: float, layer=None, nbytes=0, flops=0.0) -> None:
        nonlocal t
        events.append(Event(resource=resource, name=name, start_s=t, end_s=t + seconds, batch=0, layer=layer,
                            bytes=nbytes, flops=flops))
        t += seconds

    ops = matmul_shapes(plan).ops

    def matmul(name: str, layer, params: int) -> None:
        flops = 2 * rows * params
        rate = prof.device.matmul_flops(dtype, rows, params, 1)
        rest = ops[name].rest_s_per_flop(prof.device, prof.overheads.per_op_s) * flops  # dispatch, elementwise
        span(name, "device_compute", compute * flops / rate + rest, layer, params * F32, flops)

    for _ in range(passes):
        span("embed", "device_compute", 2e-5, nbytes=rows * spec.hidden_size * F32)
        for i in range(spec.num_layers):
            t += layer_gap_s
            matmul(f"L{i}.attn_proj", i, spec.tensors.matmul_params("attention", i))
            mlp = spec.tensors.matmul_params("mlp", i)
            if prof.has_host_tier:
                span(f"L{i}.mlp", "h2d", disk * prof.h2d_time_s(mlp * F32), i, mlp * F32)
            else:
                span(f"L{i}.mlp", "disk_read", disk * prof.disk_read_time_s(mlp * F32), i, mlp * F32)
            matmul(f"L{i}.mlp", i, mlp)
        matmul("lm_head", None, spec.tensors.head.params)
    wl = plan.workload
    meta = {"prompt_len_mean": wl.prompt_len, "gen_len": wl.gen_len, "num_prompts": wl.num_prompts,
            "phases": [{"phase": "decode", "batch": None, "start_s": 0.0, "end_s": t}]}
    return Timeline(source="measured", meta=meta, events=events)


def report_of(plan: Plan, tl: Timeline, truth: Plan) -> dict:
    """``drift_report`` of a run of ``plan`` whose measured throughput is the prediction of ``truth``."""
    pred, meas = predict(plan), predict(truth)
    measured = {k: getattr(meas, k) for k in AT_ACCEPTANCE}
    report = {"measured": measured, "predicted": {k: getattr(pred, k) for k in AT_ACCEPTANCE},
              "signed_error": {k: signed_error(getattr(pred, k), measured[k]) for k in AT_ACCEPTANCE}}
    return drift_report(plan, SimpleNamespace(timeline=tl, dtype="float32"), report)


def test_a_run_slowed_on_the_disk_is_disk_drift_and_the_recomputed_prediction_is_the_slow_machines():
    plan = disk_plan()
    truth = plan.model_copy(update={"profile": slowed(plan.profile, disk=2.0)})
    d = report_of(plan, timeline(plan, disk=2.0), truth)
    assert d["drifted"] == ["disk_read_direct"]
    (disk,) = [r for r in d["figures"] if r["resource"] == "disk_read"]
    assert disk["ratio"] == pytest.approx(0.5) and disk["observed_Bps"] == pytest.approx(disk["profile_Bps"] / 2)
    matmuls = [r for r in d["figures"] if r["figure"].startswith("matmul")]
    assert matmuls and all(r["ratio"] == pytest.approx(1.0) and not r["drifted"] for r in matmuls)
    at_profile, at_observed = d["signed_error_at_profile"], d["signed_error_at_observed_rates"]
    assert at_profile["decode_tok_s"] > 0.2  # the profile over-predicts the slowed run
    assert abs(at_observed["decode_tok_s"]) < 1e-9 and abs(at_observed["e2e_tok_s"]) < 1e-9
    json.dumps(d)  # result.json stores it as it is
    assert any("days old" in w for w in d["profile_warnings"])  # the fixture's profile was measured 2026-01-01
    lines = drift_lines(d)
    assert any(line.startswith("drift: disk read disk_read_direct") and "0.50x" in line for line in lines)
    assert sum(line.startswith("drift:") for line in lines) == 1


def test_a_cpu_hog_is_compute_drift_not_disk():
    plan = disk_plan()
    hog = 10.0  # enough for the matmuls to outlast the disk reads they overlap
    truth = plan.model_copy(update={"profile": slowed(plan.profile, compute=hog)})
    d = report_of(plan, timeline(plan, compute=hog), truth)
    assert d["drifted"] and all(f.startswith("matmul float32") for f in d["drifted"])
    flagged = [r for r in d["figures"] if r["drifted"]]
    assert all(r["resource"] == "device_compute" and r["ratio"] == pytest.approx(1 / hog) for r in flagged)
    assert not next(r for r in d["figures"] if r["resource"] == "disk_read")["drifted"]
    assert d["signed_error_at_profile"]["decode_tok_s"] > 0.5
    assert abs(d["signed_error_at_observed_rates"]["decode_tok_s"]) < 1e-9


def test_at_the_profiles_rates_nothing_drifts_and_the_prediction_stands():
    plan = disk_plan()
    d = report_of(plan, timeline(plan), plan)
    assert d["drifted"] == [] and d["figures"]
    assert d["predicted_at_observed_rates"]["decode_tok_s"] == pytest.approx(d["predicted_at_profile"]["decode_tok_s"])
    assert any(line.startswith("no drift:") for line in drift_lines(d))


def test_per_layer_overhead_is_the_gaps_inside_passes_without_transfers():
    plan = disk_plan()
    gap = 3e-4  # per layer; the waits on the MLPs' disk reads are not overhead
    figs = {f.figure: f for f in observed_figures(plan, timeline(plan, layer_gap_s=gap), "float32")}
    layer = figs["per_layer_s"]
    assert layer.observed() == pytest.approx(gap) and layer.profiled() == plan.profile.overheads.per_layer_s
    assert layer.row()["drifted"]  # 3e-4 s against the profile's 5e-5 s
    assert "per_step_s" not in figs  # passes back to back: no gap between them to measure


def test_a_gap_inside_the_targets_pass_is_per_layer_not_the_drafts_per_step():
    """Two speculative rounds: draft passes after each of the target's first two passes. The draft stream's gap
    from one round to the next spans the target's pass, whose per-layer gaps count once, as per-layer, never as the
    draft's per-pass overhead."""
    plan = disk_plan()
    target = timeline(plan, layer_gap_s=3e-4, passes=3)
    cuts = [i for i, e in enumerate(target.events) if e.name == "embed"] + [len(target.events)]
    step_gap, room = 1e-4, 1e-2  # the draft's own gap between its passes; the time left for its 3 passes of 3 ms
    events, t = [], 0.0
    for k in range(3):
        events += [e.model_copy(update={"start_s": e.start_s + k * room, "end_s": e.end_s + k * room})
                   for e in target.events[cuts[k]:cuts[k + 1]]]
        if k == 2:
            break
        t = events[-1].end_s
        for d in range(3):
            t += step_gap if d else 0.0
            for name in ("embed", "L0.mlp", "lm_head"):
                events.append(Event(resource="device_compute", name=f"draft.{name}", start_s=t, end_s=t + 1e-3,
                                    batch=0, layer=0 if name == "L0.mlp" else None))
                t += 1e-3
    meta = dict(target.meta, phases=[{"phase": "decode", "batch": None, "start_s": 0.0,
                                      "end_s": max(e.end_s for e in events)}])
    figs = {f.figure: f for f in observed_figures(plan, Timeline(source="measured", meta=meta, events=events),
                                                  "float32")}
    assert figs["per_layer_s"].observed_s == pytest.approx(3 * plan.model.spec.num_layers * 3e-4)
    # per round: the draft's two gaps and the one before the target's next pass; nothing from inside a pass
    assert figs["per_step_s"].observed_s == pytest.approx(2 * (2 * step_gap + (room - 9e-3 - 2 * step_gap)))


def test_threshold_is_symmetric():
    up, down = 1 + DRIFT_THRESHOLD, 1 / (1 + DRIFT_THRESHOLD)
    assert not drifted(up * 0.999) and not drifted(down * 1.001)
    assert drifted(up * 1.01) and drifted(down * 0.99) and not drifted(1.0)
    assert math.isclose(cpu_profile().links["disk_read_direct"].scaled(2).time_s(1 << 20),
                        cpu_profile().links["disk_read_direct"].time_s(1 << 20) / 2)


def test_specplan_run_writes_and_prints_the_drift_report(tiny_model, tmp_path):
    from specplan.engine.model.checkpoint import open_checkpoint

    folder = tiny_model("mixtral")
    spec = open_checkpoint(folder).spec
    plan = make_plan(spec, Placement.uniform(spec, "disk"), path=str(folder), prompt_len=16, gen_len=4, num_prompts=2,
                     decode_batch=2, prefill_batch=2, expert_fetch="routed")
    out = tmp_path / "res"
    r = CliRunner().invoke(main, ["run", str(write_json(tmp_path / "plan.json", plan)), "--fixed-length", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "predicted decode-only throughput at the observed rates" in r.output
    d = json.loads((out / "result.json").read_text())["drift"]
    assert d["threshold"] == DRIFT_THRESHOLD and d["predicted_at_observed_rates"]["decode_tok_s"] > 0
    assert "disk_read" in {row["resource"] for row in d["figures"]}  # the tiny model's matmuls are fixed cost
    assert sorted(d["drifted"]) == sorted(row["figure"] for row in d["figures"] if row["drifted"])
    assert sum(line.startswith("drift:") for line in r.output.splitlines()) == len(d["drifted"])


def test_an_op_is_rated_on_the_curve_the_cost_model_times_it_on():
    """The MLP's weights (3 x 256 x 1024) are nearest in size to a 1024 x 1024 curve, but the cost model times the
    MLP on its (256, 1024) shape: the event counts there."""
    base = cpu_profile()
    small = base.device.matmul[0].model_copy(update={"k": 256, "n": 1024})
    big = base.device.matmul[0].model_copy(update={"k": 1024, "n": 1024})
    unit = base.device.model_copy(update={"matmul": [small, big]})
    plan = disk_plan(base.model_copy(update={"device": unit, "host": unit}))
    names = {f.figure for f in observed_figures(plan, timeline(plan), "float32") if f.resource == "device_compute"}
    assert names == {"matmul float32 256x1024"}


def test_a_run_without_a_decode_phase_measures_nothing_and_says_so():
    plan = disk_plan()
    tl = timeline(plan)
    tl = tl.model_copy(update={"meta": {**tl.meta, "phases": []}})
    d = report_of(plan, tl, plan)
    assert d["figures"] == [] and d["drifted"] == []
    assert any(line.startswith("drift: not measured") for line in drift_lines(d))


def test_on_a_gpu_machine_a_slow_copy_is_h2d_drift_and_compute_spans_give_no_rate():
    from specplan.catalog import load_profile

    gpu = load_profile("rtx4090-pcie4")
    plan = hand_plan(tiny_dense(layers=4), gpu, mlp="host")
    truth = plan.model_copy(update={"profile": slowed(gpu, h2d=3.0)})
    d = report_of(plan, timeline(plan, disk=3.0), truth)
    assert d["drifted"] == [gpu.h2d_link_name()]
    assert {r["resource"] for r in d["figures"]} == {"h2d"}  # CUDA spans time launches: no compute figure
    assert d["signed_error_at_profile"]["decode_tok_s"] > 0.2
    assert abs(d["signed_error_at_observed_rates"]["decode_tok_s"]) < 1e-9
    assert d["profile_warnings"] == []  # a published profile is neither stale nor contended


def test_an_overhead_rows_totals_and_per_count_seconds_are_apart():
    """Seconds per count (``observed_s_each``) next to the totals (``observed_s``), which a row used to overwrite."""
    from specplan.validation.drift import Figure

    row = Figure("overheads", "per_step_s", "s", work=100, observed_s=0.6, profile_s=0.002, events=100).row()
    assert row["observed_s"] == 0.6 and row["observed_s_each"] == pytest.approx(0.006)
    assert row["profile_s"] == 0.002 and row["profile_s_each"] == pytest.approx(2e-5)
    assert Figure.from_row(row).observed() == pytest.approx(0.006)


def test_a_layers_fixed_cost_follows_the_models_width():
    """``Overheads.layer_s``: the cost model charges a layer per_layer_s plus its width times the slope, drift
    compares the gaps with that, and the profile at the observed rates replaces both by the observed figure."""
    from specplan.validation.drift import at_observed

    base = disk_plan()
    oh = base.profile.overheads.model_copy(update={"per_layer_per_width_s": 1e-6})
    plan = base.model_copy(update={"profile": base.profile.model_copy(update={"overheads": oh})})
    width = plan.model.spec.hidden_size
    assert oh.layer_s(width) == pytest.approx(oh.per_layer_s + width * 1e-6)
    assert predict(plan).prefill_s > predict(base).prefill_s  # the width term is charged (decode: disk-bound)
    figs = {f.figure: f for f in observed_figures(plan, timeline(plan, layer_gap_s=3e-4), "float32")}
    assert figs["per_layer_s"].profiled() == pytest.approx(oh.layer_s(width))
    seen = at_observed(plan.profile, list(figs.values())).overheads
    assert seen.per_layer_per_width_s == 0 and seen.layer_s(width) == pytest.approx(3e-4)
