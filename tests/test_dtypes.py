"""Weight dtypes from the profile: the candidates (measured rates and bytes, dominance), the search's choice between
them, ``--dtype``, and a run whose dtype differs from the plan's (the prediction and the budget follow it)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from planner_fixtures import cpu_profile, tiny_moe

from specplan.catalog import load_model_spec, load_profile
from specplan.cli import main
from specplan.contracts.hardware import Curve, MatmulCurve, Point, Stat
from specplan.contracts.plan import Plan
from specplan.jsonio import write_json
from specplan.contracts.plan import Workload
from specplan.planner.ask import Ask
from specplan.planner.asking import capacities
from specplan.planner.drafts import choices
from specplan.planner.dtypes import candidate_dtypes
from specplan.planner.search import search


def with_bf16(profile, points):
    """``profile`` with bf16 matmul figures ``[(rows, FLOP/s)]`` added to its device."""
    curve = MatmulCurve(dtype="bfloat16", k=1024, n=1024,
                        flops=Curve(x_name="rows", y_name="flops", points=[Point(x=x, y=Stat.of(y)) for x, y in points]))
    dev = profile.device.model_copy(update={"matmul": [*profile.device.matmul, curve]})
    return profile.model_copy(update={"device": dev, "host": dev})


AMX = [(1, 4e9), (64, 600e9), (512, 1.9e12)]  # as measured here: slower than fp32 for one row, 5x from 64 rows
FAST = [(1, 6e9), (64, 200e9), (512, 300e9)]  # faster than fp32 everywhere


def test_candidates_come_from_the_measured_rates_and_bytes():
    spec = tiny_moe()  # a bfloat16 checkpoint
    fp32_only = cpu_profile()
    assert candidate_dtypes(fp32_only, spec) == ("float32",)
    # bf16 is slower for one row, faster for many: neither dominates, both are searched (the checkpoint's first)
    assert candidate_dtypes(with_bf16(fp32_only, AMX), spec) == ("bfloat16", "float32")
    # bf16 faster at every shape with half the bytes: float32 is dominated
    assert candidate_dtypes(with_bf16(fp32_only, FAST), spec) == ("bfloat16",)
    # a GPU: bf16 and fp16 tie (the checkpoint's wins), fp32 is dominated
    assert candidate_dtypes(load_profile("rtx4090-pcie4"), spec) == ("bfloat16",)
    assert candidate_dtypes(load_profile("t4"), spec) == ("float16",)  # no bf16 figures there
    assert candidate_dtypes(fp32_only, spec, "bfloat16") == ("bfloat16",)  # --dtype


def test_the_search_takes_the_faster_dtype_and_sizes_the_plan_at_it():
    """A disk-bound MoE on a CPU with AMX: bf16 streams half the bytes and wins; forced to fp32 the same search is
    slower, and its plan holds twice the bytes per tensor."""
    spec = tiny_moe(layers=8)
    prof = with_bf16(cpu_profile(disk_Bps=1.5e9), AMX)

    def best(dtype):
        return search(Ask(spec=spec, model_name=spec.name, profile=prof, capacities=capacities(prof, 0.03, None, None),
                          workload=Workload(prompt_len=64, gen_len=16, num_prompts=8),
                          drafts=tuple(choices(["none"], spec, spec.name, None, None)), top=3,
                          dtypes=candidate_dtypes(prof, spec, dtype)))

    auto, fp32, bf16 = best(None), best("float32"), best("bfloat16")
    assert auto.plans[0].policy.weight_dtype == "bfloat16" == auto.plans[0].policy.kv_dtype
    assert fp32.plans[0].policy.weight_dtype == "float32"
    assert auto.plans[0].prediction.total_s == pytest.approx(bf16.plans[0].prediction.total_s)
    assert bf16.plans[0].prediction.total_s < fp32.plans[0].prediction.total_s
    assert any("weights in float32" in n for n in auto.notes) and any("weights in bfloat16" in n for n in auto.notes)
    w16 = bf16.plans[0].placement.group_bytes(spec, "bfloat16")
    w32 = bf16.plans[0].placement.group_bytes(spec, "float32")
    assert sum(map(sum, (t.values() for t in w32.values()))) == 2 * sum(map(sum, (t.values() for t in w16.values())))


def test_search_dtype_flag_and_a_run_at_another_dtype(tmp_path, tiny_model):
    from runtime_fixtures import cpu_profile as run_profile

    folder = tiny_model("mixtral")
    prof = write_json(tmp_path / "cpu.json", with_bf16(run_profile(), AMX))
    plan = tmp_path / "plan.json"
    r = CliRunner().invoke(main, ["search", "--model", str(folder), "--vram", "0.01", "--profile", str(prof),
                                  "--draft", "none", "--dtype", "float32", "--prompt-len", "8", "--gen-len", "4",
                                  "--num-prompts", "2", "-o", str(plan)])
    assert r.exit_code == 0, r.output
    assert "--dtype float32" in json.loads(plan.read_text())["command"]
    assert json.loads(plan.read_text())["policy"]["weight_dtype"] == "float32"
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", str(plan), "--dtype", "bfloat16", "--fixed-length", "--raw", "-o", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "result.json").read_text())
    p32 = Plan.model_validate_json(plan.read_text())
    assert result["compute_dtype"] == "bfloat16"
    # the prediction was recomputed for bf16: fewer bytes stream, so it is not the fp32 plan's
    assert result["predicted"]["e2e_tok_s"] != pytest.approx(p32.prediction.e2e_tok_s, rel=1e-6)
    r = CliRunner().invoke(main, ["search", "--model", str(folder), "--vram", "0.01", "--dtype", "int8"])
    assert r.exit_code == 2
    assert load_model_spec(str(folder)).dtype == "float32"
