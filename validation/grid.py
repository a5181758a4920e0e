"""Is the planner right on this machine? Run a grid of plans and compare (``specplan validate``).

The grid spans the plan space, not only the winners: the search runs at each resident budget asked for (``--vram``,
one per resident fraction), and ``spanning_grid`` picks from all its plans the planner's choice at each budget,
then greedily the plan that covers most values not yet covered of decode batch, draft length, interleaved batches,
budget, attention and expert location and expert fetch mode (ties: the better predicted), up to ``max_plans``.
Every plan runs as ``specplan run --fixed-length`` in its own fresh process, the plans interleaved, ``reps`` times
(``validation.trials``); each trial keeps its folder (``plan<i>/rep<r>``), so a sweep killed (even by ``kill -9``)
and run again with the same arguments keeps every trial that finished and runs the rest. ``validate.csv`` (one row
per plan: medians and spreads of the trials so far, the prediction, the simulation) and ``trials.csv`` (one row per
trial) are written again, atomically, after every trial. The summary: the signed error ``(predicted - measured) /
measured`` of decode-only and end-to-end throughput (median, median |error|, worst) for the analytic prediction and
the simulation; the rank correlation (Spearman) of predicted and measured; and the regret of the planner's choice at
each budget, best measured there / measured of the chosen plan (1.0: it chose the fastest).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from specplan.contracts.plan import Plan
from specplan.errors import SpecplanError
from specplan.jsonio import write_atomic, write_json
from specplan.validation.calibrate import ran_workload
from specplan.validation.compare import SYNTHETIC_NOTE, simulated_at
from specplan.validation.runs import FIXED_LENGTH, FIXED_LENGTH_WORKLOAD, plan_id
from specplan.validation.trials import Contender, Trial, run_trials, spread

#: the axes a spanning grid covers, each a function of (budget in GiB, plan)
AXES: dict[str, Callable[[float, Plan], object]] = {
    "decode_batch": lambda v, p: p.policy.decode_batch,
    "draft_len": lambda v, p: p.policy.draft_len,
    "num_batches": lambda v, p: p.policy.num_batches,
    "vram_gib": lambda v, p: v,
    "attention_on": lambda v, p: p.policy.attention_on,
    "experts_on": lambda v, p: p.policy.experts_on,
    "expert_fetch": lambda v, p: p.policy.expert_fetch,
}


@dataclass(frozen=True)
class GridPlan:
    vram_gib: float  # the budget it was searched at
    plan: Plan
    chosen: bool  # the planner's choice at that budget


@dataclass(frozen=True)
class GridReport:
    rows: list[dict]
    summary: dict
    written: list[Path]


def spanning_grid(searched: dict[float, list[Plan]], limit: int) -> list[GridPlan]:
    """The planner's choice at each budget (best predicted first), then, greedily, the plan covering most
    (axis, value) pairs not yet covered (ties: the better predicted, then the search's order), at most ``limit``."""
    pool = [GridPlan(v, p, i == 0) for v, plans in searched.items() for i, p in enumerate(plans)]
    picked = sorted((g for g in pool if g.chosen), key=lambda g: -g.plan.prediction.e2e_tok_s)[:limit]
    seen = {plan_id(g.plan) for g in picked}
    covered = {(axis, f(g.vram_gib, g.plan)) for g in picked for axis, f in AXES.items()}
    while len(picked) < limit:
        rest = [g for g in pool if plan_id(g.plan) not in seen]
        if not rest:
            break

        def gain(g: GridPlan) -> tuple[int, float]:
            new = {(axis, f(g.vram_gib, g.plan)) for axis, f in AXES.items()} - covered
            return len(new), g.plan.prediction.e2e_tok_s

        best = max(rest, key=gain)  # max keeps the first of equals: the search's order
        picked.append(best)
        seen.add(plan_id(best.plan))
        covered |= {(axis, f(best.vram_gib, best.plan)) for axis, f in AXES.items()}
    return picked


def run_grid(model: str, vrams: tuple[float, ...], profile_arg: str | None, drafts: tuple[str, ...],
             acceptance: float | None, calibration: str | None, prompts_file: str | None, num_prompts: int,
             gen_len: int, max_plans: int, out_dir: str | Path, reps: int = 3,
             say: Callable[[str], None] = print, synthetic_acceptance: float | None = None) -> GridReport:
    """Search the model at each budget of ``vrams`` (GiB), run the grid's plans on its weights (``reps`` trials
    each, fresh processes, interleaved) and write plan<i>.json, validate.csv, trials.csv and summary.json.
    ``synthetic_acceptance`` A (a benchmark mode, not lossless): the plans assume A and their speculative runs
    accept each proposal with probability A, so the grid measures the cost model alone."""
    from specplan.catalog import model_config_path
    from specplan.engine.model.checkpoint import open_checkpoint
    from specplan.gguf import refuse_gguf_weights
    from specplan.planner.asking import make_ask
    from specplan.planner.search import search
    from specplan.validation.runs import encode_prompts, prompt_format, read_prompts

    if synthetic_acceptance is not None:
        if not 0.0 < synthetic_acceptance <= 1.0:
            raise SpecplanError(f"--synthetic-acceptance must lie in (0, 1], got {synthetic_acceptance:g}")
        if acceptance is not None or calibration is not None:
            raise SpecplanError("--synthetic-acceptance fixes the acceptance the plans assume and the runs draw; "
                                "drop --acceptance and --calibration")
        acceptance = synthetic_acceptance
    refuse_gguf_weights(model_config_path(model), "--model")
    folder = model_config_path(model).parent
    if not any(folder.glob("*.safetensors")):
        raise SpecplanError(f"{model}: no weights there; validate runs plans, so it needs an HF model folder")
    tok = open_checkpoint(folder).tokenizer()
    texts = read_prompts(prompts_file)
    prompt_len = max(len(p) for p in encode_prompts(tok, [texts[i % len(texts)] for i in range(num_prompts)]))
    searched = {}
    for vram in dict.fromkeys(vrams):  # the plans assume the longest prompt: the KV caches must hold it
        ask = make_ask(str(folder), vram, None, None, profile_arg, tuple(drafts) or ("none",), acceptance,
                       calibration, prompt_len, gen_len, num_prompts, 200)
        searched[vram] = search(ask).plans
    chosen = spanning_grid(searched, max_plans)
    if len(chosen) < 2:
        raise SpecplanError("the search found fewer than two plans to compare; allow a draft (--draft) or another "
                            "budget (--vram)")
    out = Path(out_dir)
    prompts = write_atomic(out / "prompts.txt", "\n".join(texts) + "\n")
    contenders = [Contender(f"plan{i}", write_json(out / f"plan{i}.json", g.plan), out / f"plan{i}",
                            synthetic_acceptance if g.plan.policy.speculative else None)
                  for i, g in enumerate(chosen)]
    say(f"validating {len(chosen)} plans of {ask.spec.name} on {ask.profile.name} at "
        f"{', '.join(f'{v:g}' for v in searched)} GiB: {num_prompts} prompts ({prompt_format(tok)}) x {gen_len} "
        f"tokens, {FIXED_LENGTH_WORKLOAD}; each plan {reps} times, each time in its own fresh process, interleaved"
        + (f"; {SYNTHETIC_NOTE.format(a=synthetic_acceptance)}" if synthetic_acceptance is not None else ""))

    def written(trials: list[Trial]) -> None:  # after every trial, atomically: a kill loses no finished trial
        write_atomic(out / "trials.csv", table([trial_row(t) for t in trials]).to_csv(index=False))
        write_atomic(out / "validate.csv", table(rows_of(chosen, trials)).to_csv(index=False))

    trials = run_trials(contenders, prompts, num_prompts, reps, gen_len, say=say, on_trial=written)
    rows = rows_of(chosen, trials)
    summary = {**summarise(rows), "reps": reps, "stop": FIXED_LENGTH, "prompt_format": prompt_format(tok),
               "method": f"each plan in its own fresh process (`specplan run --fixed-length`), interleaved, {reps} "
                         f"repetitions; medians"}
    if synthetic_acceptance is not None:
        summary["benchmark_mode"] = {"synthetic_acceptance": synthetic_acceptance, "lossless": False,
                                     "note": SYNTHETIC_NOTE.format(a=synthetic_acceptance)}
    return GridReport(rows, summary, [out / "validate.csv", out / "trials.csv",
                                      write_json(out / "summary.json", summary)])


def trial_row(t: Trial) -> dict:
    m, p = t.report["measured"], t.report["predicted"]
    return {"plan": t.contender, "rep": t.rep, "folder": str(t.folder), "measured_decode_tok_s": m["decode_tok_s"],
            "measured_e2e_tok_s": m["e2e_tok_s"], "predicted_decode_tok_s": p["decode_tok_s"],
            "predicted_e2e_tok_s": p["e2e_tok_s"], "others_cpu_fraction": t.others_cpu_fraction,
            "contended": t.contended, "kept_from_before": t.reused}


def rows_of(chosen: list[GridPlan], trials: list[Trial]) -> list[dict]:
    """One row per plan with at least one trial, in grid order."""
    out = []
    for i, g in enumerate(chosen):
        mine = [t for t in trials if t.contender == f"plan{i}"]
        if mine:
            out.append(row(i, g, mine))
    return out


def row(i: int, g: GridPlan, trials: list[Trial]) -> dict:
    """One plan's predicted, simulated and measured numbers (medians over its trials; units in the key names)."""
    plan, first = g.plan, trials[0].report
    sim = simulated_at(plan, ran_workload(plan, first))
    pol = plan.policy
    resident = sum(first["need_bytes"].get(t, {}).get("weights", 0) for t in ("device", "host"))
    r = {"plan": i, "plan_id": plan_id(plan), "vram_gib": g.vram_gib, "chosen": g.chosen, "draft": plan.draft.label,
         "draft_len": pol.draft_len, "num_batches": pol.num_batches, "decode_batch": pol.decode_batch,
         "prefill_batch": pol.prefill_batch, "expert_fetch": pol.expert_fetch, "attention_on": pol.attention_on,
         "experts_on": pol.experts_on, "prefetch_depth": pol.prefetch_depth, "weight_dtype": pol.weight_dtype,
         "resident_fraction": resident / plan.model.spec.weight_bytes(pol.weight_dtype),
         "acceptance_assumed": pol.acceptance, "trials": len(trials), "contended_trials": sum(t.contended for t in trials),
         "acceptance_measured": median_of([(t.report.get("acceptance") or {}).get("measured") for t in trials])}
    for key, sim_value in (("decode_tok_s", sim.summary.decode_tok_s), ("e2e_tok_s", sim.summary.e2e_tok_s)):
        what = key.removesuffix("_tok_s")
        meas = spread([t.report["measured"][key] for t in trials])
        pred = statistics.median(t.report["predicted"][key] for t in trials)
        r |= {f"measured_{key}": meas["median"], f"measured_{what}_min_tok_s": meas["min"],
              f"measured_{what}_max_tok_s": meas["max"], f"predicted_{key}": pred, f"simulated_{key}": sim_value,
              f"signed_error_predicted_{what}": (pred - meas["median"]) / meas["median"],
              f"signed_error_simulated_{what}": (sim_value - meas["median"]) / meas["median"]}
    costs = [(t.report.get("errors") or {}).get("cost_model") for t in trials]
    r["signed_error_cost_model_e2e"] = median_of([c["signed_error"]["e2e_tok_s"] if c else None for c in costs])
    r["signed_error_cost_model_decode"] = median_of([c["signed_error"]["decode_tok_s"] if c else None for c in costs])
    accs = [(t.report.get("errors") or {}).get("acceptance_model") for t in trials]
    r["signed_error_acceptance_model"] = median_of([a["signed_error"] if a else None for a in accs])
    r["synthetic_acceptance"] = (first.get("acceptance") or {}).get("synthetic_acceptance")
    for res in ("disk_read", "device_compute"):
        r[f"measured_{res}_busy_s"] = statistics.median(t.report["measured"]["busy_s"].get(res, 0.0) for t in trials)
        r[f"predicted_{res}_busy_s"] = first["predicted"]["busy_s"].get(res, 0.0)
    return r


def median_of(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def table(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows)


def summarise(rows: list[dict]) -> dict:
    """Signed errors (median, median |error|, worst) of decode-only and end-to-end throughput for the prediction and
    the simulation; Spearman rank correlation of predicted and measured; the regret of the choice at each budget."""
    from scipy.stats import spearmanr

    def errors(key: str) -> dict:
        e = [r[key] for r in rows]
        return {"median_abs": statistics.median(abs(x) for x in e), "median": statistics.median(e),
                "worst": max(e, key=abs)}

    def rho(what: str) -> float | None:
        if len(rows) < 3:
            return None
        value = spearmanr([r[f"predicted_{what}_tok_s"] for r in rows],
                          [r[f"measured_{what}_tok_s"] for r in rows]).statistic
        return None if value != value else float(value)

    regret = {}
    for r in rows:
        if r["chosen"]:
            here = [x for x in rows if x["vram_gib"] == r["vram_gib"]]
            best = max(here, key=lambda x: x["measured_e2e_tok_s"])
            regret[f"{r['vram_gib']:g}"] = {"regret": best["measured_e2e_tok_s"] / r["measured_e2e_tok_s"],
                                            "chosen_plan": r["plan"], "best_measured_plan": best["plan"],
                                            "plans_at_budget": len(here)}
    return {"plans": len(rows),
            **{f"{what}_error_{by}": errors(f"signed_error_{by}_{what}") for what in ("decode", "e2e")
               for by in ("predicted", "simulated")},
            "spearman_predicted_vs_measured_decode": rho("decode"), "spearman_predicted_vs_measured_e2e": rho("e2e"),
            "regret_e2e_by_budget": regret,
            "regret_e2e_worst": max((v["regret"] for v in regret.values()), default=None)}
