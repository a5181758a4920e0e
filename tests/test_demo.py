"""``specplan demo`` on tiny models (the demo build replaced by a tiny MoE upcycled from a tiny Llama, its draft):
every step runs, prints what its subcommand prints, and writes its files into the one folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from runtime_fixtures import cpu_profile

from specplan.cli import main
from specplan.engine.build import models
from specplan.contracts.plan import Plan
from specplan.jsonio import load, write_json


@pytest.mark.slow
def test_demo_runs_every_step_into_one_folder(tiny_model, tmp_path, monkeypatch):
    draft = tiny_model("llama")
    target = models.upcycle_to_mixtral(draft, tmp_path / "moe", num_experts=4, top_k=2, noise=0.3, seed=3)
    monkeypatch.setattr(models, "build_demo", lambda log=None: models.DemoModels(target=target, draft=draft))
    profile = write_json(tmp_path / "cpu.json", cpu_profile())
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", "--vram", "0.01", "--profile", str(profile), "--num-prompts", "3",
                                  "--gen-len", "4", "--reps", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    for step in ("1/6 demo models", "2/6 hardware profile", "3/6 calibrate", "4/6 search", "5/6 simulate", "6/6 run"):
        assert step in r.output
    for text in ("searched", "simulated vs predicted", "(pred - meas) / meas", "over the best plan without a draft"):
        assert text in r.output, text
    from specplan.contracts.calibration import Calibration
    from specplan.contracts.plan import Plan

    assert load(Calibration, out / "calibration" / "calibration.json").acceptance[0].target == load(
        Plan, out / "plan.json").model.name
    assert "ran " in (out / "calibration" / "run.log").read_text()  # the calibration ran in its own process too
    baseline = load(Plan, out / "baseline" / "plan.json")
    assert not baseline.policy.speculative
    assert baseline.command.startswith(f"specplan search --model {target} --vram 0.01")
    assert "--draft none" in baseline.command
    for f in ("simulated/timeline.json", "simulated/trace.json", "simulated/gantt.png", "workload_prompts.txt"):
        assert (out / f).is_file(), f
    for folder in ("measured", "baseline/measured"):  # each plan twice, each time in its own process
        for rep in (1, 2):
            result = json.loads((out / folder / f"rep{rep}" / "result.json").read_text())
            assert result["workload"]["num_prompts"] == 3 and result["workload"]["gen_len"] == 4
            assert "ran " in (out / folder / f"rep{rep}" / "run.log").read_text()
    order = [line.split(" trial ")[0] for line in r.output.splitlines() if " trial " in line and "(fresh process)" in line]
    assert order == ["best", "baseline", "baseline", "best"]  # interleaved, the order rotated each repetition
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["contenders"]["best"]["trials"] == 2
    assert set(comparison["speedup_best_over_baseline"]) == {"decode_tok_s", "e2e_tok_s"}


@pytest.mark.slow
def test_demo_goes_on_after_kill_9_keeping_every_finished_run(tiny_model, tmp_path, monkeypatch):
    """A demo killed with SIGKILL once its best plan's run has finished keeps that run (and the calibration run):
    the same command again shows them as they were and runs only what had not finished; --fresh runs all."""
    draft = tiny_model("llama")
    target = models.upcycle_to_mixtral(draft, tmp_path / "moe", num_experts=4, top_k=2, noise=0.3, seed=3)
    profile = write_json(tmp_path / "cpu.json", cpu_profile())
    out = tmp_path / "demo"
    args = ["demo", "--vram", "0.01", "--profile", str(profile), "--num-prompts", "3", "--gen-len", "4", "--reps", "2",
            "-o", str(out)]
    script = ("import sys; from specplan.engine.build import models; "
              f"models.build_demo = lambda log=None: models.DemoModels(target={str(target)!r}, draft={str(draft)!r}); "
              "from specplan.cli import main; main(sys.argv[1:])")
    best = out / "measured" / "rep1" / "result.json"
    child = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        deadline = time.monotonic() + 240
        while not best.is_file() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert best.is_file(), "the demo ended or timed out before its best plan's run finished"
    print(f"killed; the baseline's first trial had finished: "
          f"{(out / 'baseline' / 'measured' / 'rep1' / 'result.json').is_file()}")
    kept = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in (best, out / "calibration" / "result.json",
                                                                 out / "measured" / "rep1" / "outputs.jsonl")}
    monkeypatch.setattr(models, "build_demo", lambda log=None: models.DemoModels(target=target, draft=draft))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert f"kept best trial 1/2 ({out / 'measured' / 'rep1'})" in r.output.replace("\n", " ")
    assert f"kept the finished run in {out / 'calibration'}" in r.output.replace("\n", " ")
    assert all((f.read_bytes(), f.stat().st_mtime_ns) == v for f, v in kept.items())
    assert (out / "baseline" / "measured" / "rep2" / "result.json").is_file()
    assert "over the best plan without a draft" in r.output
    r = CliRunner().invoke(main, [*args, "--fresh"])
    assert r.exit_code == 0 and "kept the finished run" not in r.output and "kept best trial" not in r.output
    assert best.stat().st_mtime_ns != kept[best][1]


def test_on_a_busy_machine_the_demo_plans_on_the_refused_profile_and_says_so(tiny_model, tmp_path, monkeypatch):
    """No measured profile and `specplan profile --quick` refuses (contended): the demo goes on with the refused
    measurement kept apart, says so in bold, and stores nothing as the machine's profile; with nothing kept either,
    it stops with one line."""
    from specplan.catalog import contended_profiles_dir, measured_profiles
    from specplan.validation import demo

    draft = tiny_model("llama")
    target = models.upcycle_to_mixtral(draft, tmp_path / "moe", num_experts=4, top_k=2, noise=0.3, seed=3)
    monkeypatch.setattr(models, "build_demo", lambda log=None: models.DemoModels(target=target, draft=draft))
    real_run = subprocess.run

    def profile_refused(cmd, *a, **k):  # `specplan profile --quick` refuses; the runs' own processes run
        return subprocess.CompletedProcess(cmd, 2) if "profile" in cmd else real_run(cmd, *a, **k)

    monkeypatch.setattr(demo.subprocess, "run", profile_refused)
    args = ["demo", "--vram", "0.01", "--num-prompts", "2", "--gen-len", "3", "--reps", "1", "-o", str(tmp_path / "d")]
    r = CliRunner().invoke(main, args)
    last = r.output.strip().splitlines()[-1]
    assert r.exit_code == 2 and last.startswith("Error:") and "did not store one" in last and "Traceback" not in r.output
    kept = write_json(contended_profiles_dir() / "vm-busy.json", cpu_profile())
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert f"plans on the refused, contended measurement {kept}" in " ".join(r.output.split())
    assert not measured_profiles()
    assert load(Plan, tmp_path / "d" / "plan.json").profile.name == cpu_profile().name
