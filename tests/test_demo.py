"""``specplan demo`` on tiny models (the demo build replaced by a tiny MoE upcycled from a tiny Llama, its draft):
every step runs, prints what its subcommand prints, and writes its files into the one folder."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from runtime_fixtures import cpu_profile

from specplan.cli import main
from specplan.engine.build import models
from specplan.jsonio import load, write_json


@pytest.mark.slow
def test_demo_runs_every_step_into_one_folder(tiny_model, tmp_path, monkeypatch):
    draft = tiny_model("llama")
    target = models.upcycle_to_mixtral(draft, tmp_path / "moe", num_experts=4, top_k=2, noise=0.3, seed=3)
    monkeypatch.setattr(models, "build_demo", lambda log=None: models.DemoModels(target=target, draft=draft))
    profile = write_json(tmp_path / "cpu.json", cpu_profile())
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", "--vram", "0.01", "--profile", str(profile), "--num-prompts", "3",
                                  "--gen-len", "4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    for step in ("1/6 demo models", "2/6 hardware profile", "3/6 calibrate", "4/6 search", "5/6 simulate", "6/6 run"):
        assert step in r.output
    for text in ("searched", "simulated vs predicted", "(pred - meas) / meas", "over the best plan without a draft"):
        assert text in r.output, text
    from specplan.contracts.calibration import Calibration
    from specplan.contracts.plan import Plan

    assert load(Calibration, out / "calibration" / "calibration.json").acceptance[0].target == load(
        Plan, out / "plan.json").model.name
    baseline = load(Plan, out / "baseline" / "plan.json")
    assert not baseline.policy.speculative
    assert baseline.command.startswith(f"specplan search --model {target} --vram 0.01")
    assert "--draft none" in baseline.command
    for f in ("simulated/timeline.json", "simulated/trace.json", "simulated/gantt.png", "workload_prompts.txt"):
        assert (out / f).is_file(), f
    for folder in ("measured", "baseline/measured"):
        result = json.loads((out / folder / "result.json").read_text())
        assert result["workload"]["num_prompts"] == 3 and result["workload"]["gen_len"] == 4
        assert f"wrote {out / folder / 'result.json'}" in r.output
