"""Calibration from runs: a profile refitted on a validate grid's training runs (the drift figures each run
measured, pooled), fidelity reported on the held-out plans only, and what the fit was made on kept in the profile."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from runtime_fixtures import cpu_profile

from specplan.cli import main
from specplan.contracts.hardware import HardwareProfile
from specplan.contracts.plan import Plan
from specplan.engine.build.models import upcycle_to_mixtral
from specplan.jsonio import load, write_json
from specplan.validation.calibrate import fitted_profile, pooled, predicted, run_figures, split
from specplan.validation.drift import Figure


@pytest.fixture(scope="module")
def grid(tiny_model, tmp_path_factory):
    """A validated grid of 4 plans on a tiny MoE, one trial each, then `specplan calibrate` on it."""
    dense = tiny_model("llama")
    tmp = tmp_path_factory.mktemp("cal")
    moe = upcycle_to_mixtral(dense, tmp / "moe", num_experts=4, top_k=2, noise=0.3, seed=3)
    profile = write_json(tmp / "cpu.json", cpu_profile())
    out = tmp / "val"
    r = CliRunner().invoke(main, ["validate", "--model", str(moe), "--vram", "0.01", "--vram", "0.02", "--profile",
                                  str(profile), "--draft", "none", "--draft", str(dense), "--acceptance", "0.6",
                                  "--num-prompts", "3", "--gen-len", "8", "--plans", "4", "--reps", "1",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    c = CliRunner().invoke(main, ["calibrate", str(out)])
    assert c.exit_code == 0, c.output
    return out, c.output


def test_the_split_alternates_and_holds_the_first_plan_out():
    assert split(5) == ([1, 3], [0, 2, 4]) and split(1) == ([], [0])


def test_the_fit_is_stored_with_what_it_was_fitted_on(grid):
    out, printed = grid
    prof = load(HardwareProfile, out / "profile-calibrated.json")
    fit = prof.provenance.calibration
    trials = pd.read_csv(out / "trials.csv")
    assert fit is not None and fit.base_profile == "cpu-test" and prof.name == "cpu-test-calibrated"
    assert sorted(fit.fitted_on) == sorted(trials[trials.plan.isin(["plan1", "plan3"])].folder)
    assert fit.speed or fit.overhead_s  # the tiny models' ops are fixed-cost: their overheads are what is fitted
    assert all(v > 0 for v in (*fit.speed.values(), *fit.overhead_s.values()))
    rows = pd.read_csv(out / "fit.csv")
    assert rows.split.tolist() == ["held-out", "train", "held-out", "train"]
    s = json.loads((out / "fit.json").read_text())
    held = rows[rows.split == "held-out"]
    err = held.signed_error_calibrated_e2e_tok_s
    assert s["held_out"]["plans"] == 2 and s["held_out"]["calibrated_e2e_tok_s"]["worst"] == pytest.approx(
        err[err.abs().idxmax()])
    assert "held-out (2 plans)" in printed and "fitted on plans 1, 3" in printed


def test_a_fit_on_one_run_predicts_that_run_as_its_drift_report_does(grid):
    """Fitted on a single run, the calibrated profile is that run's profile at its observed rates: its prediction
    of the run equals the run's own drift report's prediction at observed rates (the same substitution)."""
    out, _ = grid
    folder = Path(pd.read_csv(out / "trials.csv").folder[1])
    report = json.loads((folder / "result.json").read_text())
    plan = load(Plan, out / "plan1.json")
    prof = fitted_profile(plan.profile, [run_figures(plan, folder, report)], [str(folder)])
    got = predicted(plan, prof, report)
    want = report["drift"]["predicted_at_observed_rates"]
    assert got["e2e_tok_s"] == pytest.approx(want["e2e_tok_s"], rel=1e-9)
    assert got["decode_tok_s"] == pytest.approx(want["decode_tok_s"], rel=1e-9)


def test_pooling_sums_each_figure_over_the_runs(grid):
    out, _ = grid
    reports = [json.loads((Path(f) / "result.json").read_text()) for f in pd.read_csv(out / "trials.csv").folder]
    both = {(f.resource, f.figure): f for f in pooled([[Figure.from_row(row) for row in r["drift"]["figures"]]
                                                       for r in reports[:2]])}
    for r in reports[:2]:
        for row in r["drift"]["figures"]:
            assert (row["resource"], row["figure"]) in both
    for key, f in both.items():
        parts = [row for r in reports[:2] for row in r["drift"]["figures"] if (row["resource"], row["figure"]) == key]
        assert f.observed_s == pytest.approx(sum(p["observed_s"] for p in parts))
        assert f.profile_s == pytest.approx(sum(p["profile_s"] for p in parts))


def test_calibrate_needs_a_validate_folder(tmp_path):
    r = CliRunner().invoke(main, ["calibrate", str(tmp_path)])
    assert r.exit_code == 2 and "no trials.csv" in r.output and "validate" in r.output
