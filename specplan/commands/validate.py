"""``specplan validate``: is the planner right on this machine? Run a grid of plans and compare.

The grid is the search's own candidates: the best plan of each family (draft or none, number of interleaved
batches, expert fetch mode, where attention and experts run), best-predicted first, up to ``--plans``; the first is
the planner's choice. Each plan runs on the engine with the same prompts, and the simulator simulates it for the
workload that ran. One row per plan goes to ``validate.csv`` (written again after every run, atomically: an
interrupted sweep keeps every row it finished). The summary: the signed error ``(predicted - measured) / measured``
of decode-only throughput, median and worst, for the analytic prediction and the simulation; the rank correlation
(Spearman) of predicted and measured throughput over the grid; and the regret of the planner's choice,
best measured / measured of the chosen plan (1.0: it chose the fastest).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import click

from specplan.commands._params import GIB


@click.command("validate")
@click.option("--model", required=True, metavar="DIR", help="HF model folder with the weights to validate on.")
@click.option("--vram", type=GIB, required=True, help="Device (without a GPU: resident-weight) budget in GiB.")
@click.option("--profile", "profile_arg", default=None, metavar="NAME|FILE",
              help="Hardware profile [default: this machine's newest measured profile].")
@click.option("--draft", "drafts", multiple=True, metavar="D",
              help="Draft to include (repeatable): none or a draft model folder [default: none only].")
@click.option("--acceptance", type=click.FloatRange(0, 1), default=None,
              help="Per-token acceptance the plans assume [default: --calibration, else the prior].")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="Measured acceptance (a calibration.json of specplan run), measured on other prompts.")
@click.option("--prompts", "prompts_file", metavar="FILE", default=None,
              help="Prompts, one per line or JSONL [default: the bundled English prompts].")
@click.option("--num-prompts", type=click.IntRange(min=1), default=8, show_default=True, help="Prompts per run.")
@click.option("--gen-len", type=click.IntRange(min=2), default=16, show_default=True, help="New tokens per prompt.")
@click.option("--plans", "max_plans", type=click.IntRange(min=2, max=20), default=6, show_default=True,
              help="Plans in the grid.")
@click.option("-o", "--output", "out_dir", metavar="DIR", default="results/validate", show_default=True,
              help="Folder for validate.csv and each plan's files.")
def command(model: str, vram: float, profile_arg: str | None, drafts: tuple[str, ...], acceptance: float | None,
            calibration: str | None, prompts_file: str | None, num_prompts: int, gen_len: int, max_plans: int,
            out_dir: str) -> None:
    """Run a grid of the search's plans on this machine and report how right the planner is: signed errors of the
    prediction and the simulation, rank correlation, and the regret of the planner's choice."""
    from tqdm import tqdm

    from specplan.catalog import model_config_path
    from specplan.commands.run import read_prompts
    from specplan.commands.search import make_ask
    from specplan.engine.model.checkpoint import open_checkpoint
    from specplan.engine.execute.runtime import run_plan
    from specplan.errors import SpecplanError
    from specplan.jsonio import write_atomic, write_json
    from specplan.planner.search import search

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
    click.echo(f"validating {len(plans)} plans of {ask.spec.name} on {ask.profile.name}: {num_prompts} prompts x "
               f"{gen_len} tokens")
    for i, plan in enumerate(tqdm(plans, desc="plans", unit="plan", disable=None)):
        write_json(out / f"plan{i}.json", plan)
        result = run_plan(plan, ckpt, prompts, gen_len)
        rows.append(row(i, plan, result))
        write_atomic(out / "validate.csv", table(rows).to_csv(index=False))
    summary = summarise(rows)
    write_json(out / "summary.json", summary)
    show(rows, summary)
    click.echo(f"wrote {out / 'validate.csv'} and {out / 'summary.json'}")


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


def row(i: int, plan, result) -> dict:
    """One plan's predicted, simulated and measured numbers (units in the key names)."""
    from specplan.engine.execute.results import comparison, measured_workload
    from specplan.simulator import simulate

    report = comparison(plan, result)
    m, p = report["measured"], report["predicted"]
    sim = simulate(plan.model_copy(update={"workload": measured_workload(plan, result), "prediction": None}), seed=0)
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


def show(rows: list[dict], s: dict) -> None:
    from rich.table import Table

    from specplan.fmt import console

    t = Table(title="decode-only throughput: predicted, simulated, measured (tok/s)")
    for col in ("plan", "draft", "batches", "fetch", "predicted", "simulated", "measured", "pred err", "sim err"):
        t.add_column(col, justify="left" if col in ("draft", "fetch") else "right")
    for r in rows:
        t.add_row(f"{r['plan']}{' (chosen)' if r['chosen'] else ''}",
                  f"{r['draft']}" + (f" g={r['draft_len']}" if r["draft_len"] else ""),
                  f"{r['num_batches']}x{r['decode_batch']}", r["expert_fetch"], f"{r['predicted_decode_tok_s']:.2f}",
                  f"{r['simulated_decode_tok_s']:.2f}", f"{r['measured_decode_tok_s']:.2f}",
                  f"{r['signed_error_predicted']:+.1%}", f"{r['signed_error_simulated']:+.1%}")
    con = console()
    con.print(t)
    p, m = s["decode_error_predicted"], s["decode_error_simulated"]
    rho = s["spearman_predicted_vs_measured"]
    con.print(f"signed error of the prediction: median {p['median']:+.1%} (median |error| {p['median_abs']:.1%}), "
              f"worst {p['worst']:+.1%}; of the simulation: median {m['median']:+.1%}, worst {m['worst']:+.1%}")
    con.print(f"rank correlation of predicted and measured (Spearman): "
              f"{'-' if rho is None else f'{rho:.2f}'}; regret of the planner's choice (best measured / chosen "
              f"measured): {s['regret']:.2f} (the fastest measured: plan {s['best_measured_plan']})")
