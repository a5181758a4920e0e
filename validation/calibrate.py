"""Calibration from runs (``specplan calibrate``, ``specplan validate --fit``): refit a profile's figures on measured
timelines and report fidelity only on plans the fit never saw.

Every run already measures the figures the cost model uses over its own decode phases (``validation.drift``: disk
bytes/s while streaming, matmul FLOP/s per shape class, decode attention bytes/s, per-layer and per-pass overheads,
each as the profile's time for the run's work against the time it took). The fit pools them over the training
runs: per figure, the profile's seconds over the observed seconds summed over every training run (rates), or the
observed seconds over the count (overheads), and puts them in a copy of the profile (``drift.at_observed``: the
same substitution a single run's drift report makes), which records what it was fitted on
(``Provenance.calibration``). Figures no training run measured stay as profiled.

The split of a validate grid: its plans alternate, the even-numbered held out (the planner's choices at each budget
come first, so they are among them), the odd-numbered for training. Fidelity is reported on the held-out plans
only: the prediction at the calibrated profile against their measured medians, next to the prediction at the
profile as measured, each at the plans' assumed acceptance and at the measured one (the cost model's error alone).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from specplan.contracts.hardware import CalibrationFit, HardwareProfile
from specplan.contracts.plan import Plan, Workload
from specplan.contracts.timeline import Timeline
from specplan.engine.execute.results import workload_of
from specplan.errors import SpecplanError
from specplan.jsonio import load, write_atomic, write_json
from specplan.planner.predict import predict
from specplan.validation.drift import Figure, at_observed, observed_figures
from specplan.validation.trials import FIGURES


@dataclass(frozen=True)
class FitReport:
    profile: HardwareProfile
    rows: list[dict]  # one per plan: its split, measured medians, predictions at both profiles
    summary: dict
    written: list[Path]


def run_figures(plan: Plan, folder: str | Path, report: dict) -> list[Figure]:
    """A run's drift figures, recomputed from its timeline by this version's cost model (a run written by another
    version fits the same); from its result.json's drift section where the timeline is missing."""
    path = Path(folder) / "timeline.json"
    if path.is_file():
        return observed_figures(plan, load(Timeline, path), report["compute_dtype"])
    return [Figure.from_row(row) for row in (report.get("drift") or {}).get("figures", [])]


def pooled(runs: list[list[Figure]]) -> list[Figure]:
    """The figures of every run, summed per (resource, figure) over the runs."""
    out: dict[tuple[str, str], Figure] = {}
    for figures in runs:
        for f in figures:
            have = out.setdefault((f.resource, f.figure), Figure(f.resource, f.figure, f.unit))
            have.work += f.work
            have.observed_s += f.observed_s
            have.profile_s += f.profile_s
            have.fixed_s += f.fixed_s
            have.events += f.events
    return list(out.values())


def fitted_profile(profile: HardwareProfile, runs: list[list[Figure]], folders: list[str]) -> HardwareProfile:
    """``profile`` with its figures refitted on the runs' figures (``run_figures`` of the runs in ``folders``)."""
    figures = pooled(runs)
    if not figures:
        raise SpecplanError("the training runs measured no figure (no decode phase with timed work): run longer "
                            "plans, or more of them")
    fit = CalibrationFit(fitted_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), base_profile=profile.name,
                         fitted_on=folders,
                         speed={f.figure: f.speed for f in figures if f.unit != "s"},
                         overhead_s={f.figure: f.observed() for f in figures if f.unit == "s"})
    fitted = at_observed(profile, figures)
    return fitted.model_copy(update={"name": f"{profile.name}-calibrated",
                                     "provenance": profile.provenance.model_copy(update={"calibration": fit})})


def split(plans: int) -> tuple[list[int], list[int]]:
    """(training, held-out) plan indices of a grid of ``plans``: odd for training, even held out."""
    return [i for i in range(plans) if i % 2 == 1], [i for i in range(plans) if i % 2 == 0]


def ran_workload(plan: Plan, report: dict) -> Workload:
    """The workload a run (its result.json body) had, at the plan's sampling."""
    return workload_of(report["workload"], plan.workload.sampling)


def predicted(plan: Plan, profile: HardwareProfile, report: dict, acceptance: float | None = None) -> dict:
    """The planner's throughputs for ``plan`` on ``profile``, for the workload the run had, at ``acceptance``
    (None: the plan's own)."""
    update: dict = {"profile": profile, "workload": ran_workload(plan, report), "prediction": None}
    if acceptance is not None:
        update["policy"] = plan.policy.model_copy(update={"acceptance": acceptance})
    p = predict(plan.model_copy(update=update))
    return {k: getattr(p, k) for k in FIGURES}


def grid_trials(folder: Path) -> dict[int, list[tuple[str, dict]]]:
    """plan index -> its finished trials (folder, result.json body), from a validate folder's trials.csv."""
    import pandas as pd

    csv = folder / "trials.csv"
    if not csv.is_file():
        raise SpecplanError(f"{folder}: no trials.csv; calibrate fits on a `specplan validate` folder (run validate "
                            f"with -o {folder} first)")
    out: dict[int, list[tuple[str, dict]]] = {}
    for t in pd.read_csv(csv).itertuples():
        result = Path(t.folder) / "result.json"
        if result.is_file():
            out.setdefault(int(str(t.plan).removeprefix("plan")), []).append(
                (str(t.folder), json.loads(result.read_text())))
    return out


def fit_grid(folder: str | Path, output: str | Path | None = None) -> FitReport:
    """Fit on the training plans of the validate grid in ``folder``, report fidelity on its held-out plans, write
    the calibrated profile (``output``, default ``folder/profile-calibrated.json``), fit.csv and fit.json."""
    folder = Path(folder)
    trials = grid_trials(folder)
    train, held = split(max(trials, default=-1) + 1)
    train, held = [i for i in train if i in trials], [i for i in held if i in trials]
    if not train or not held:
        raise SpecplanError(f"{folder}: a fit needs at least two finished plans (one to fit on, one held out); "
                            f"validate more plans (--plans)")
    plans = {i: load(Plan, folder / f"plan{i}.json") for i in trials}
    base = plans[train[0]].profile
    training = [(f, r) for i in train for f, r in trials[i]]
    figures = [run_figures(plans[i], f, r) for i in train for f, r in trials[i]]
    profile = fitted_profile(base, figures, [f for f, _ in training])
    rows = []
    for i in sorted(trials):
        plan, reports = plans[i], [r for _, r in trials[i]]
        accs = [a for r in reports if (a := (r.get("acceptance") or {}).get("measured")) is not None]
        acc = statistics.median(accs) if accs else None
        row = {"plan": i, "split": "train" if i in train else "held-out", "trials": len(reports),
               "draft_len": plan.policy.draft_len, "acceptance_measured": acc}
        for key in FIGURES:
            meas = statistics.median(r["measured"][key] for r in reports)
            row[f"measured_{key}"] = meas
            for label, prof in (("profile", base), ("calibrated", profile)):
                for at, a in (("", None), ("_at_measured_acceptance", acc)):
                    if at and a is None:
                        continue
                    p = statistics.median(predicted(plan, prof, r, a)[key] for r in reports)
                    row[f"predicted_{label}{at}_{key}"] = p
                    row[f"signed_error_{label}{at}_{key}"] = (p - meas) / meas
        rows.append(row)
    summary = {"fitted_on_plans": train, "held_out_plans": held, "training_runs": len(training),
               "calibration": profile.provenance.calibration.model_dump(mode="json"),
               "held_out": held_out_summary([r for r in rows if r["split"] == "held-out"])}
    out = Path(output) if output else folder / "profile-calibrated.json"
    import pandas as pd

    written = [write_json(out, profile), write_atomic(folder / "fit.csv", pd.DataFrame(rows).to_csv(index=False)),
               write_json(folder / "fit.json", summary)]
    return FitReport(profile, rows, summary, written)


def held_out_summary(rows: list[dict]) -> dict:
    """Median |error|, worst error and Spearman of the held-out plans, per figure and prediction."""
    from scipy.stats import spearmanr

    out: dict = {"plans": len(rows)}
    for key in FIGURES:
        for label in ("profile", "calibrated", "profile_at_measured_acceptance", "calibrated_at_measured_acceptance"):
            col = f"signed_error_{label}_{key}"
            errs = [r[col] for r in rows if col in r]
            if not errs:
                continue
            rho = None
            if len(errs) > 2:
                have = [r for r in rows if col in r]
                value = spearmanr([r[f"predicted_{label}_{key}"] for r in have],
                                  [r[f"measured_{key}"] for r in have]).statistic
                rho = None if value != value else float(value)
            out[f"{label}_{key}"] = {"median_abs": statistics.median(abs(e) for e in errs),
                                     "worst": max(errs, key=abs), "spearman": rho, "plans": len(errs)}
    return out
