"""``specplan validate`` on tiny models: one row per plan of the grid (every run really made), the summary's
statistics recomputed from the rows, and bad input answered with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from runtime_fixtures import cpu_profile
from scipy.stats import spearmanr

from specplan.cli import main
from specplan.engine.build.models import upcycle_to_mixtral
from specplan.jsonio import write_json


@pytest.fixture(scope="module")
def folders(tiny_model, tmp_path_factory):
    dense = tiny_model("llama")
    moe = upcycle_to_mixtral(dense, tmp_path_factory.mktemp("vmoe") / "moe", num_experts=4, top_k=2, noise=0.3, seed=3)
    return moe, dense


def test_validate_runs_the_grid_and_summarises(folders, tmp_path):
    moe, dense = folders
    profile = write_json(tmp_path / "cpu.json", cpu_profile())
    out = tmp_path / "val"
    r = CliRunner().invoke(main, ["validate", "--model", str(moe), "--vram", "0.01", "--vram", "0.02", "--profile",
                                  str(profile), "--draft", "none", "--draft", str(dense), "--acceptance", "0.6",
                                  "--num-prompts", "3", "--gen-len", "5", "--plans", "4", "--reps", "2",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    rows = pd.read_csv(out / "validate.csv")
    assert len(rows) == 4 and rows.chosen.tolist()[:2] == [True, True] and not rows.chosen[2:].any()
    assert set(rows.vram_gib) == {0.01, 0.02} and rows.plan_id.is_unique
    assert (rows.trials == 2).all() and (rows.resident_fraction.between(0, 1)).all()
    trials = pd.read_csv(out / "trials.csv")  # every plan twice, interleaved, each in its own process
    rotated = [f"plan{i}" for i in (0, 1, 2, 3, 1, 2, 3, 0)]  # the order rotated in the second repetition
    assert trials.plan.tolist() == rotated and trials.rep.tolist() == [1] * 4 + [2] * 4
    for t in trials.itertuples():
        assert (Path(t.folder) / "result.json").is_file() and "ran " in (Path(t.folder) / "run.log").read_text()
    med = trials.groupby("plan", sort=False).measured_e2e_tok_s.median().tolist()
    assert rows.measured_e2e_tok_s.tolist() == pytest.approx(med)
    assert (rows.measured_e2e_min_tok_s <= rows.measured_e2e_tok_s).all()
    err = (rows.predicted_e2e_tok_s - rows.measured_e2e_tok_s) / rows.measured_e2e_tok_s
    assert err.tolist() == pytest.approx(rows.signed_error_predicted_e2e.tolist())
    s = json.loads((out / "summary.json").read_text())
    assert s["plans"] == len(rows) and s["reps"] == 2
    assert s["e2e_error_predicted"]["worst"] == pytest.approx(err[err.abs().idxmax()])
    for budget, g in s["regret_e2e_by_budget"].items():
        here = rows[rows.vram_gib == float(budget)]
        chosen = here[here.chosen].measured_e2e_tok_s.iloc[0]
        assert g["regret"] == pytest.approx(here.measured_e2e_tok_s.max() / chosen)
    if s["spearman_predicted_vs_measured_e2e"] is not None:
        rho = spearmanr(rows.predicted_e2e_tok_s, rows.measured_e2e_tok_s).statistic
        assert s["spearman_predicted_vs_measured_e2e"] == pytest.approx(rho)
    for i in range(len(rows)):
        assert (out / f"plan{i}.json").is_file()
    assert "regret of the planner's choice" in r.output and "rank correlation" in r.output


def test_validate_needs_weights(tmp_path):
    r = CliRunner().invoke(main, ["validate", "--model", "mixtral-8x7b", "--vram", "24", "--profile", "t4"])
    assert r.exit_code == 2 and r.output.startswith("Error:") and "needs an HF model folder" in r.output, r.output


def test_validate_resumes_after_kill_9_with_every_finished_trial_intact(folders, tmp_path):
    """A sweep killed with SIGKILL after its first trial keeps it; the same command again keeps every finished
    trial untouched (its folder's files, matched by the run's identity) and runs the rest: each plan twice."""
    moe, dense = folders
    profile = write_json(tmp_path / "cpu.json", cpu_profile())
    out = tmp_path / "val"
    args = ["validate", "--model", str(moe), "--vram", "0.01", "--profile", str(profile), "--draft", "none",
            "--draft", str(dense), "--acceptance", "0.6", "--num-prompts", "3", "--gen-len", "12", "--plans", "3",
            "--reps", "2", "-o", str(out)]
    csv = out / "trials.csv"
    child = subprocess.Popen([sys.executable, "-m", "specplan", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        deadline = time.monotonic() + 240
        while not csv.is_file() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert csv.is_file(), "the sweep ended or timed out before its first trial"
    first = pd.read_csv(csv)
    assert len(first) >= 1
    print(f"killed after {len(first)} trial(s)")
    assert not (out / "summary.json").exists() or len(first) == 6  # killed before the end (unless it was that fast)
    kept = {f: (f.read_bytes(), f.stat().st_mtime_ns) for t in first.itertuples()
            for f in (Path(t.folder) / "result.json", Path(t.folder) / "outputs.jsonl")}

    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    trials = pd.read_csv(csv)
    assert len(trials) == 6 and trials.kept_from_before.sum() == len(first)
    assert all((f.read_bytes(), f.stat().st_mtime_ns) == v for f, v in kept.items())
    for t in first.itertuples():
        assert f"kept {t.plan} trial {t.rep}/2" in r.output
    rows = pd.read_csv(out / "validate.csv")
    assert len(rows) == 3 and (rows.trials == 2).all()
    assert json.loads((out / "summary.json").read_text())["plans"] == 3


def test_validate_with_a_synthetic_acceptance_measures_the_cost_model_and_says_so(folders, tmp_path):
    moe, dense = folders
    profile = write_json(tmp_path / "cpu.json", cpu_profile())
    out = tmp_path / "val"
    args = ["validate", "--model", str(moe), "--vram", "0.01", "--profile", str(profile), "--draft", "none",
            "--draft", str(dense), "--num-prompts", "3", "--gen-len", "5", "--plans", "3", "--reps", "1", "-o", str(out)]
    r = CliRunner().invoke(main, [*args, "--synthetic-acceptance", "0.75"])
    assert r.exit_code == 0, r.output
    assert "NOT lossless" in r.output
    rows = pd.read_csv(out / "validate.csv")
    spec = rows[rows.draft_len > 0]
    assert len(spec) and (spec.synthetic_acceptance == 0.75).all() and (spec.acceptance_assumed == 0.75).all()
    assert rows[rows.draft_len == 0].synthetic_acceptance.isna().all()
    assert rows.signed_error_cost_model_e2e.notna().all() and spec.signed_error_acceptance_model.notna().all()
    s = json.loads((out / "summary.json").read_text())
    assert s["benchmark_mode"]["lossless"] is False and s["benchmark_mode"]["synthetic_acceptance"] == 0.75
    assert not list(out.rglob("calibration.json"))
    bad = CliRunner().invoke(main, [*args, "--synthetic-acceptance", "0.75", "--acceptance", "0.5"])
    assert bad.exit_code == 2 and "drop --acceptance" in bad.output and len(bad.output.strip().splitlines()) == 1
