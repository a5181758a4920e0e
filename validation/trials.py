"""Honest comparisons: each contender (a plan file) runs as ``specplan run --fixed-length`` in its own fresh process,
the contenders interleaved, their order rotated each repetition (A B, B A, A B: ``rotated``), ``reps`` times, same
prompts; each trial's folder keeps its result files.

A plan run after other work in the same process measured slower than run alone (the demo's no-draft plan 14.1-15.7
tok/s inside the demo, 19.1-19.5 alone), so comparisons run each trial in a process of its own. A trial during which other processes took more than
``VOID_OTHERS`` of the CPUs is void: it is run again (up to ``attempts`` times) and, if still contended, kept and
marked ``contended``. Trials that finished in their folder with the same plan, prompts and length (``run_id``) are
kept (an interrupted comparison goes on where it stopped; ``resume=False`` runs them all).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from specplan.engine.measure.timing import CpuUsage
from specplan.errors import SpecplanError
from specplan.jsonio import write_json
from specplan.validation.runs import find_finished

#: share of the CPUs other processes may take during a trial before it is void
VOID_OTHERS = 0.15
#: what the comparison adds to a trial's folder: how contended the machine was while it ran
TRIAL_FILE = "trial.json"
#: the throughputs summarised per contender
FIGURES = ("decode_tok_s", "e2e_tok_s")


@dataclass(frozen=True)
class Contender:
    name: str
    plan_file: Path
    folder: Path  # the trials go to folder/rep1, folder/rep2, ...
    #: a benchmark mode, not lossless: ``specplan run --synthetic-acceptance A`` (speculative plans only)
    synthetic_acceptance: float | None = None


@dataclass(frozen=True)
class Trial:
    contender: str
    rep: int  # 1-based
    folder: Path
    report: dict  # its result.json
    others_cpu_fraction: float | None  # share of the CPUs other processes took meanwhile (None: kept from before)
    reused: bool = False

    @property
    def contended(self) -> bool:
        return contended(self.others_cpu_fraction)


def contended(others_cpu_fraction: float | None) -> bool:
    """Whether other processes took enough of the CPUs during a run to void its figures (None: not recorded)."""
    return others_cpu_fraction is not None and others_cpu_fraction > VOID_OTHERS


def rep_folder(folder: Path, rep: int) -> Path:
    """Where repetition ``rep`` (1-based) of a contender's trials goes."""
    return folder / f"rep{rep}"


def run_fresh(plan_file: Path, prompts_file: Path, num_prompts: int | None, folder: Path,
              gen_len: int | None = None, synthetic_acceptance: float | None = None) -> tuple[dict, float | None]:
    """``specplan run PLAN --fixed-length`` in a fresh Python process, its printout to ``folder/run.log``;
    (its result.json, the share of the CPUs other processes took while it ran)."""
    cmd = [sys.executable, "-m", "specplan", "run", str(plan_file), "--fixed-length", "--prompts", str(prompts_file),
           "-o", str(folder), *(("--num-prompts", str(num_prompts)) if num_prompts else ()),
           *(("--max-new-tokens", str(gen_len)) if gen_len else ()),
           *(("--synthetic-acceptance", repr(synthetic_acceptance)) if synthetic_acceptance is not None else ())]
    folder.mkdir(parents=True, exist_ok=True)
    usage = CpuUsage()
    with open(folder / "run.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    others = usage.others_fraction()
    if done.returncode != 0:
        tail = (folder / "run.log").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise SpecplanError(f"{plan_file}: `specplan run` failed in its own process (exit {done.returncode}): "
                            f"{tail[0]}; the whole printout is in {folder / 'run.log'}")
    return json.loads((folder / "result.json").read_text()), others


def rotated(items: list, rep: int) -> list:
    """The order of repetition ``rep`` (from 1): ``items`` rotated by ``rep - 1``, so that over the repetitions each
    contender runs after a different one (a run after another process's exit measured up to 10% slower here: its
    writeback, its freed memory) and first in a different repetition."""
    k = (rep - 1) % len(items) if items else 0
    return items[k:] + items[:k]


def run_trials(contenders: list[Contender], prompts_file: Path, num_prompts: int | None, reps: int = 3,
               gen_len: int | None = None, resume: bool = True, attempts: int = 3,
               say: Callable[[str], None] = print,
               on_trial: Callable[[list[Trial]], None] | None = None) -> list[Trial]:
    """Every contender ``reps`` times, interleaved, each trial in a fresh process (see the module's docstring);
    ``on_trial`` gets the trials so far after each one (to write them)."""
    trials = []
    for rep in range(1, reps + 1):
        for c in rotated(contenders, rep):
            folder = rep_folder(c.folder, rep)
            kept = (find_finished(c.plan_file, prompts_file, num_prompts, gen_len, folder, c.synthetic_acceptance)
                    if resume else None)
            if kept is not None:
                trials.append(Trial(c.name, rep, folder, kept, kept_others(folder), reused=True))
                say(f"kept {c.name} trial {rep}/{reps} ({folder}): {trial_line(kept)}")
                if on_trial is not None:
                    on_trial(trials)
                continue
            for attempt in range(1, attempts + 1):
                report, others = run_fresh(c.plan_file, prompts_file, num_prompts, folder, gen_len,
                                           c.synthetic_acceptance)
                trial = Trial(c.name, rep, folder, report, others)
                if not trial.contended:
                    break
                say(f"  void: other processes took {others:.0%} of the CPUs during {c.name} trial {rep}"
                    + ("; again" if attempt < attempts else f"; kept after {attempts} tries, marked contended"))
            trials.append(trial)
            write_json(folder / TRIAL_FILE, {"others_cpu_fraction": others, "contended": trial.contended,
                                             "attempts": attempt})
            say(f"{c.name} trial {rep}/{reps} (fresh process): {trial_line(report)}"
                + (f"; others took {others:.0%} of the CPUs" if others is not None else ""))
            if on_trial is not None:
                on_trial(trials)
    return trials


def kept_others(folder: Path) -> float | None:
    """The share of the CPUs others took during a trial that finished before (None if it was not recorded)."""
    try:
        value = json.loads((folder / TRIAL_FILE).read_text()).get("others_cpu_fraction")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, (int, float)) else None


def trial_line(report: dict) -> str:
    m, p = report["measured"], report["predicted"]
    return (f"decode-only {m['decode_tok_s']:.2f} tok/s (predicted {p['decode_tok_s']:.2f}), end-to-end "
            f"{m['e2e_tok_s']:.2f} (predicted {p['e2e_tok_s']:.2f})")


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(trials: list[Trial]) -> dict[str, dict]:
    """Per contender: measured median and spread (min, max) of each figure, the prediction, and the signed error
    of the prediction against the median; the trials' folders and how many were contended."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(t.contender for t in trials):
        mine = [t for t in trials if t.contender == name]
        first = mine[0].report
        entry: dict = {"trials": len(mine), "contended_trials": sum(t.contended for t in mine),
                       "folders": [str(t.folder) for t in mine], "policy": first["policy"]}
        for key in FIGURES:
            meas = spread([t.report["measured"][key] for t in mine])
            pred = statistics.median(t.report["predicted"][key] for t in mine)
            entry[key] = {"measured": meas, "predicted": pred, "signed_error": (pred - meas["median"]) / meas["median"]}
        out[name] = entry
    return out


def ratio(summary: dict[str, dict], trials: list[Trial], a: str, b: str, key: str) -> dict[str, float]:
    """``a`` over ``b`` on a figure: the ratio of the measured medians, its spread over the trials paired by
    repetition, and the ratio of the predictions."""
    by = {(t.contender, t.rep): t.report["measured"][key] for t in trials}
    paired = [by[(a, r)] / by[(b, r)] for (n, r) in by if n == a and (b, r) in by]
    return {"measured": summary[a][key]["measured"]["median"] / summary[b][key]["measured"]["median"],
            "measured_min": min(paired), "measured_max": max(paired),
            "predicted": summary[a][key]["predicted"] / summary[b][key]["predicted"]}


def median_trial(trials: list[Trial], name: str, key: str = "decode_tok_s") -> Trial:
    """The contender's trial with the median figure (the lower middle one for an even count)."""
    mine = sorted((t for t in trials if t.contender == name), key=lambda t: t.report["measured"][key])
    return mine[(len(mine) - 1) // 2]
