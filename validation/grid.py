"""Is the planner right on this machine? Run a grid of plans and compare (``specplan validate``).

The grid is the search's own candidates: the best plan of each family (draft or none, number of interleaved
batches, expert fetch mode, where attention and experts run), best-predicted first, up to ``max_plans``; the first
is the planner's choice. Each plan runs on the engine with the same prompts, and the simulator simulates it for the
workload that ran. One row per plan goes to ``validate.csv`` (written again after every run, atomically: an
interrupted sweep, even by ``kill -9``, keeps every row it finished). Run again with the same arguments and
folder, a sweep resumes: rows whose ``plan_id`` (``plan_id``: a hash of the plan) matches a plan of the grid are
kept as they are, the other plans run. The summary: the signed error ``(predicted - measured) / measured``
of decode-only throughput, median and worst, for the analytic prediction and the simulation; the rank correlation
(Spearman) of predicted and measured throughput over the grid; and the regret of the planner's choice,
best measured / measured of the chosen plan (1.0: it chose the fastest).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from specplan.errors import SpecplanError
from specplan.jsonio import write_atomic, write_json
from specplan.validation.compare import SYNTHETIC_NOTE, comparison, simulated_for
from specplan.validation.runs import plan_id


@dataclass(frozen=True)
class GridReport:
    rows: list[dict]
    summary: dict
    written: list[Path]


def family(plan) -> tuple:
    p = plan.policy
    return (plan.draft.label, p.num_batches, p.expert_fetch, p.attention_on, p.experts_on)


def grid(plans: list, limit: int) -> list:
    """The best plan of each family, in the search's order (best predicted first), at most ``limit``."""
    seen, out = set(), []
    for plan in plans:
        if family(plan) not in seen:
            seen.add(family(plan))
            out.append(plan)
    return out[:limit]


def run_grid(model: str, vram: float, profile_arg: str | None, drafts: tuple[str, ...], acceptance: float | None,
             calibration: str | None, prompts_file: str | None, num_prompts: int, gen_len: int, max_plans: int,
             out_dir: str | Path, say: Callable[[str], None] = print,
             synthetic_acceptance: float | None = None) -> GridReport:
    """Search the model (``vram`` in GiB), run the grid's plans on its weights, write plan<i>.json, validate.csv and
    summary.json to ``out_dir``. ``synthetic_acceptance`` A (a benchmark mode, not lossless): the plans assume A and
    their speculative runs accept each proposal with probability A, so the grid measures the cost model alone."""
    from tqdm import tqdm

    from specplan.catalog import model_config_path
    from specplan.gguf import refuse_gguf_weights
    from specplan.engine.execute.runtime import run_plan
    from specplan.engine.model.checkpoint import open_checkpoint
    from specplan.planner.asking import make_ask
    from specplan.planner.search import search
    from specplan.validation.runs import (FIXED_LENGTH, FIXED_LENGTH_WORKLOAD, encode_prompts, prompt_format,
                                          read_prompts)

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
    ckpt = open_checkpoint(folder)
    tok = ckpt.tokenizer()
    texts = read_prompts(prompts_file)
    prompts = encode_prompts(tok, [texts[i % len(texts)] for i in range(num_prompts)])
    # the plans assume the longest prompt: the KV caches must hold it
    ask = make_ask(str(folder), vram, None, None, profile_arg, tuple(drafts) or ("none",), acceptance, calibration,
                   max(len(p) for p in prompts), gen_len, num_prompts, 50)
    plans = grid(search(ask).plans, max_plans)
    if len(plans) < 2:
        raise SpecplanError("the search found fewer than two plan families to compare; allow a draft (--draft) or "
                            "another budget (--vram)")
    out, rows = Path(out_dir), []
    say(f"validating {len(plans)} plans of {ask.spec.name} on {ask.profile.name}: {num_prompts} prompts "
        f"({prompt_format(tok)}) x {gen_len} tokens, {FIXED_LENGTH_WORKLOAD}"
        + (f"; {SYNTHETIC_NOTE.format(a=synthetic_acceptance)}" if synthetic_acceptance is not None else ""))
    done = finished_rows(out / "validate.csv", say)
    done = {pid: r for pid, r in done.items()  # a speculative row counts only at the same synthetic acceptance
            if r.get("draft_len") in (0, None) or r.get("synthetic_acceptance") == synthetic_acceptance}
    resumed = [plan_id(p) for p in plans if plan_id(p) in done]
    if resumed:
        say(f"resuming: {len(resumed)} of {len(plans)} plans already ran (rows of {out / 'validate.csv'} matched "
            f"by plan_id); running the other {len(plans) - len(resumed)}")
    for i, plan in enumerate(tqdm(plans, desc="plans", unit="plan", disable=None)):
        pid = plan_id(plan)
        if pid in done:
            rows.append({**done[pid], "plan": i, "chosen": i == 0})
            continue
        write_json(out / f"plan{i}.json", plan)
        result = run_plan(plan, ckpt, prompts, gen_len,
                          synthetic_acceptance=synthetic_acceptance if plan.policy.speculative else None)
        rows.append(row(i, plan, result))
        # after each plan, atomically: a kill leaves the previous file or this one, never half a row
        write_atomic(out / "validate.csv", table(rows + pending(done, rows)).to_csv(index=False))
    write_atomic(out / "validate.csv", table(rows).to_csv(index=False))
    summary = {**summarise(rows), "stop": FIXED_LENGTH, "prompt_format": prompt_format(tok)}
    if synthetic_acceptance is not None:
        summary["benchmark_mode"] = {"synthetic_acceptance": synthetic_acceptance, "lossless": False,
                                     "note": SYNTHETIC_NOTE.format(a=synthetic_acceptance)}
    return GridReport(rows, summary, [out / "validate.csv", write_json(out / "summary.json", summary)])


def finished_rows(csv: Path, say: Callable[[str], None]) -> dict[str, dict]:
    """plan_id -> row of a previous sweep's validate.csv in the same folder (none if there is none)."""
    if not csv.is_file():
        return {}
    import pandas as pd

    try:
        frame = pd.read_csv(csv)
    except (OSError, ValueError) as e:
        raise SpecplanError(f"{csv}: cannot read the previous sweep's rows ({e}); remove it or pass another "
                            f"-o folder") from None
    if "plan_id" not in frame.columns:
        say(f"{csv} has no plan_id column (written before resuming existed): running every plan again")
        return {}
    rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
            for r in frame.to_dict("records")]
    return {r["plan_id"]: r for r in rows}


def pending(done: dict[str, dict], rows: list[dict]) -> list[dict]:
    """Finished rows of the previous sweep not yet placed in this one's order (kept until they are)."""
    placed = {r["plan_id"] for r in rows}
    return [r for pid, r in done.items() if pid not in placed]


def row(i: int, plan, result) -> dict:
    """One plan's predicted, simulated and measured numbers (units in the key names)."""
    report = comparison(plan, result)
    m, p = report["measured"], report["predicted"]
    sim = simulated_for(plan, result)
    acc = report.get("acceptance") or {}
    cost, accm = report["errors"]["cost_model"], report["errors"]["acceptance_model"]
    pol = plan.policy
    return {"plan": i, "plan_id": plan_id(plan), "chosen": i == 0, "draft": plan.draft.label, "draft_len": pol.draft_len,
            "num_batches": pol.num_batches, "decode_batch": pol.decode_batch, "prefill_batch": pol.prefill_batch,
            "expert_fetch": pol.expert_fetch, "attention_on": pol.attention_on, "experts_on": pol.experts_on,
            "prefetch_depth": pol.prefetch_depth, "acceptance_assumed": pol.acceptance,
            "acceptance_measured": acc.get("measured"),
            "measured_decode_tok_s": m["decode_tok_s"], "predicted_decode_tok_s": p["decode_tok_s"],
            "simulated_decode_tok_s": sim.summary.decode_tok_s,
            "measured_e2e_tok_s": m["e2e_tok_s"], "predicted_e2e_tok_s": p["e2e_tok_s"],
            "simulated_e2e_tok_s": sim.summary.e2e_tok_s,
            "signed_error_predicted": report["signed_error"]["decode_tok_s"],
            "signed_error_simulated": (sim.summary.decode_tok_s - m["decode_tok_s"]) / m["decode_tok_s"],
            "signed_error_predicted_e2e": report["signed_error"]["e2e_tok_s"],
            "measured_disk_busy_s": m["busy_s"].get("disk_read", 0.0),
            "predicted_disk_busy_s": p["busy_s"].get("disk_read", 0.0),
            "measured_compute_busy_s": m["busy_s"].get("device_compute", 0.0),
            "predicted_compute_busy_s": p["busy_s"].get("device_compute", 0.0),
            "signed_error_cost_model": cost["signed_error"]["decode_tok_s"] if cost else None,
            "signed_error_cost_model_e2e": cost["signed_error"]["e2e_tok_s"] if cost else None,
            "signed_error_acceptance_model": accm["signed_error"] if accm else None,
            "synthetic_acceptance": acc.get("synthetic_acceptance")}


def table(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows)


def summarise(rows: list[dict]) -> dict:
    """Median and worst signed error, Spearman rank correlation, regret of the chosen (first) plan."""
    from scipy.stats import spearmanr

    def errors(key: str) -> dict:
        e = [r[key] for r in rows]
        worst = max(e, key=abs)
        return {"median_abs": statistics.median(abs(x) for x in e), "median": statistics.median(e), "worst": worst}

    meas = [r["measured_decode_tok_s"] for r in rows]
    rho = spearmanr([r["predicted_decode_tok_s"] for r in rows], meas).statistic if len(rows) > 2 else None
    chosen = next(r for r in rows if r["chosen"])
    best = max(rows, key=lambda r: r["measured_decode_tok_s"])
    return {"plans": len(rows), "decode_error_predicted": errors("signed_error_predicted"),
            "decode_error_simulated": errors("signed_error_simulated"),
            "spearman_predicted_vs_measured": None if rho is None or rho != rho else float(rho),
            "regret": best["measured_decode_tok_s"] / chosen["measured_decode_tok_s"],
            "best_measured_plan": best["plan"]}
