"""``specplan validate`` on tiny models: one row per plan of the grid (every run really made), the summary's
statistics recomputed from the rows, and bad input answered with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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
    r = CliRunner().invoke(main, ["validate", "--model", str(moe), "--vram", "0.01", "--profile", str(profile),
                                  "--draft", "none", "--draft", str(dense), "--acceptance", "0.6",
                                  "--num-prompts", "3", "--gen-len", "5", "--plans", "4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    rows = pd.read_csv(out / "validate.csv")
    assert 2 <= len(rows) <= 4 and rows.chosen.tolist() == [True] + [False] * (len(rows) - 1)
    assert {"none", dense.name} <= set(rows.draft)  # a grid of families, with and without the draft
    assert (rows.measured_decode_tok_s > 0).all() and (rows.predicted_decode_tok_s > 0).all()
    err = (rows.predicted_decode_tok_s - rows.measured_decode_tok_s) / rows.measured_decode_tok_s
    assert err.tolist() == pytest.approx(rows.signed_error_predicted.tolist())
    s = json.loads((out / "summary.json").read_text())
    assert s["plans"] == len(rows)
    assert s["regret"] == pytest.approx(rows.measured_decode_tok_s.max() / rows.measured_decode_tok_s[0])
    assert s["decode_error_predicted"]["worst"] == pytest.approx(err[err.abs().idxmax()])
    if len(rows) > 2 and s["spearman_predicted_vs_measured"] is not None:
        rho = spearmanr(rows.predicted_decode_tok_s, rows.measured_decode_tok_s).statistic
        assert s["spearman_predicted_vs_measured"] == pytest.approx(rho)
    for i in range(len(rows)):
        assert (out / f"plan{i}.json").is_file()
    assert "regret of the planner's choice" in r.output and "rank correlation" in r.output


def test_validate_needs_weights(tmp_path):
    r = CliRunner().invoke(main, ["validate", "--model", "mixtral-8x7b", "--vram", "24", "--profile", "t4"])
    assert r.exit_code == 2 and r.output.startswith("Error:") and "needs an HF model folder" in r.output, r.output


def test_validate_resumes_after_kill_9_with_every_finished_row_intact(folders, tmp_path):
    """A sweep killed with SIGKILL after its first row keeps that row; the same command again skips the finished
    plans (matched by plan_id, not by position) and appends the rest: every plan once, the first row untouched."""
    moe, dense = folders
    profile = write_json(tmp_path / "cpu.json", cpu_profile())
    out = tmp_path / "val"
    args = ["validate", "--model", str(moe), "--vram", "0.01", "--profile", str(profile), "--draft", "none",
            "--draft", str(dense), "--acceptance", "0.6", "--num-prompts", "3", "--gen-len", "12", "--plans", "4",
            "-o", str(out)]
    csv = out / "validate.csv"
    child = subprocess.Popen([sys.executable, "-m", "specplan", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        deadline = time.monotonic() + 240
        while not csv.is_file() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert csv.is_file(), "the sweep ended or timed out before its first row"
    first = pd.read_csv(csv)
    assert len(first) >= 1 and first.plan_id.is_unique
    print(f"killed after {len(first)} row(s)")
    assert not (out / "summary.json").exists() or len(first) == 4  # killed before the end (unless it was that fast)

    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rows = pd.read_csv(csv)
    assert rows.plan_id.is_unique and rows.plan.tolist() == list(range(len(rows))) and 2 <= len(rows) <= 4
    assert set(first.plan_id) <= set(rows.plan_id)
    if len(first) < len(rows):
        assert "resuming:" in r.output and f"{len(first)} of {len(rows)} plans already ran" in r.output
    kept = rows.set_index("plan_id").loc[first.plan_id]  # the finished rows, as the killed sweep wrote them
    pd.testing.assert_frame_equal(kept.reset_index()[first.columns], first, check_dtype=False)
    assert json.loads((out / "summary.json").read_text())["plans"] == len(rows)


def test_validate_with_a_synthetic_acceptance_measures_the_cost_model_and_says_so(folders, tmp_path):
    moe, dense = folders
    profile = write_json(tmp_path / "cpu.json", cpu_profile())
    out = tmp_path / "val"
    args = ["validate", "--model", str(moe), "--vram", "0.01", "--profile", str(profile), "--draft", "none",
            "--draft", str(dense), "--num-prompts", "3", "--gen-len", "5", "--plans", "3", "-o", str(out)]
    r = CliRunner().invoke(main, [*args, "--synthetic-acceptance", "0.75"])
    assert r.exit_code == 0, r.output
    assert "NOT lossless" in r.output
    rows = pd.read_csv(out / "validate.csv")
    spec = rows[rows.draft_len > 0]
    assert len(spec) and (spec.synthetic_acceptance == 0.75).all() and (spec.acceptance_assumed == 0.75).all()
    assert rows[rows.draft_len == 0].synthetic_acceptance.isna().all()
    assert rows.signed_error_cost_model.notna().all() and spec.signed_error_acceptance_model.notna().all()
    s = json.loads((out / "summary.json").read_text())
    assert s["benchmark_mode"]["lossless"] is False and s["benchmark_mode"]["synthetic_acceptance"] == 0.75
    assert not list(out.rglob("calibration.json"))
    bad = CliRunner().invoke(main, [*args, "--synthetic-acceptance", "0.75", "--acceptance", "0.5"])
    assert bad.exit_code == 2 and "drop --acceptance" in bad.output and len(bad.output.strip().splitlines()) == 1
