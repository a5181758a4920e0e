"""Is the planner right on this machine? Run a grid of plans and compare (``specplan validate``).

The grid is the search's own candidates: the best plan of each family (draft or none, number of interleaved
batches, expert fetch mode, where attention and experts run), best-predicted first, up to ``max_plans``; the first
is the planner's choice. Each plan runs on the engine with the same prompts, and the simulator simulates it for the
workload that ran. One row per plan goes to ``validate.csv`` (written again after every run, atomically: an
interrupted sweep keeps every row it finished). The summary: the signed error ``(predicted - measured) / measured``
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
from specplan.validation.compare import comparison, simulated_for


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
             out_dir: str | Path, say: Callable[[str], None] = print) -> GridReport:
    """Search the model (``vram`` in GiB), run the grid's plans on its weights, write plan<i>.json, validate.csv and
    summary.json to ``out_dir``."""
    from tqdm import tqdm

    from specplan.catalog import model_config_path
    from specplan.engine.execute.runtime import run_plan
    from specplan.engine.model.checkpoint import open_checkpoint
    from specplan.planner.asking import make_ask
    from specplan.planner.search import search
    from specplan.validation.runs import read_prompts

    folder = model_config_path(model).parent
    if not any(folder.glob("*.safetensors")):
        raise SpecplanError(f"{model}: no weights there; validate runs plans, so it needs an HF model folder")
    ckpt = open_checkpoint(folder)
    tok = ckpt.tokenizer()
    texts = read_prompts(prompts_file)
    prompts = [tok(texts[i % len(texts)])["input_ids"] for i in range(num_prompts)]
    # the plans assume the longest prompt: the KV caches must hold it
    ask = make_ask(str(folder), vram, None, None, profile_arg, tuple(drafts) or ("none",), acceptance, calibration,
                   max(len(p) for p in prompts), gen_len, num_prompts, 50)
    plans = grid(search(ask).plans, max_plans)
    if len(plans) < 2:
        raise SpecplanError("the search found fewer than two plan families to compare; allow a draft (--draft) or "
                            "another budget (--vram)")
    out, rows = Path(out_dir), []
    say(f"validating {len(plans)} plans of {ask.spec.name} on {ask.profile.name}: {num_prompts} prompts x "
        f"{gen_len} tokens")
    for i, plan in enumerate(tqdm(plans, desc="plans", unit="plan", disable=None)):
        write_json(out / f"plan{i}.json", plan)
        result = run_plan(plan, ckpt, prompts, gen_len)
        rows.append(row(i, plan, result))
        write_atomic(out / "validate.csv", table(rows).to_csv(index=False))
    summary = summarise(rows)
    return GridReport(rows, summary, [out / "validate.csv", write_json(out / "summary.json", summary)])


def row(i: int, plan, result) -> dict:
    """One plan's predicted, simulated and measured numbers (units in the key names)."""
    report = comparison(plan, result)
    m, p = report["measured"], report["predicted"]
    sim = simulated_for(plan, result)
    acc = report.get("acceptance") or {}
    pol = plan.policy
    return {"plan": i, "chosen": i == 0, "draft": plan.draft.label, "draft_len": pol.draft_len,
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
            "predicted_compute_busy_s": p["busy_s"].get("device_compute", 0.0)}


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
