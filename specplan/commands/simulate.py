"""``specplan simulate``: the timeline a plan predicts, op by op, on the plan's own hardware profile."""

from __future__ import annotations

import json
import time

import click


@click.command("simulate")
@click.argument("plan_file", metavar="PLAN.json", type=click.Path(dir_okay=False))
@click.option("--tokens", type=click.IntRange(min=1), default=None,
              help="Tokens generated per prompt [default: the plan's workload.gen_len].")
@click.option("--prompts", type=click.IntRange(min=1), default=None,
              help="Number of prompts [default: the plan's workload.num_prompts].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the draws: accepted drafts per sequence and round, routed experts per pass.")
@click.option("--expected", is_flag=True,
              help="No draws: every sequence commits the expected tokens per round (so a batch ends after gen_len / "
                   "E[tokens] rounds, not when its slowest sequence does) and every expert op runs for its expected "
                   "time: the steady state of the planner's round model.")
@click.option("--kv-step", type=click.IntRange(min=1), default=None,
              help="KV-length step at which passes are re-costed as the cache grows [default: gen_len / 16; 1 is "
                   "exact].")
@click.option("-o", "--output", metavar="FILE", default=None, help="Write the Timeline (JSON contract) here.")
@click.option("--trace", metavar="FILE", default=None, help="Write a Chrome / Perfetto trace (ui.perfetto.dev).")
@click.option("--png", metavar="FILE", default=None, help="Draw a Gantt chart: one row per resource, colour per batch.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (numbers, units in key names).")
def command(plan_file: str, tokens: int | None, prompts: int | None, seed: int, expected: bool,
            kv_step: int | None, output: str | None, trace: str | None, png: str | None, as_json: bool) -> None:
    """Simulate PLAN.json event by event: prefill, then decode (or draft + verify) rounds per interleaved batch, on
    the plan's hardware profile, with every op costed by the planner's cost model.

    Prints decode-only and end-to-end throughput, time to first token, per-resource utilisation and the idle gaps
    ("bubbles") of the bottleneck resource, next to the plan's prediction.
    """
    from pathlib import Path

    from specplan.contracts.plan import Plan
    from specplan.errors import SpecplanError
    from specplan.jsonio import load
    from specplan.simulator import simulate

    for flag, path in (("-o", output), ("--trace", trace), ("--png", png)):
        if path and Path(path).is_dir():
            raise SpecplanError(f"{flag} {path}: is a folder; pass a file name")
    plan = load(Plan, plan_file)
    t0 = time.perf_counter()
    if expected and click.get_current_context().get_parameter_source("seed").name != "DEFAULT":
        raise SpecplanError("--expected draws nothing: drop --seed")
    sim = simulate(plan, tokens=tokens, prompts=prompts, seed=seed, expected=expected, kv_step=kv_step)
    elapsed = time.perf_counter() - t0
    written = _write(sim, output, trace, png)
    if as_json:
        click.echo(json.dumps({**sim.meta(), "bubbles": sim.summary.as_dict()["bubbles"],
                               "simulation_wall_s": elapsed, "written": written}, indent=1))
        return
    _print(sim, elapsed)
    for path in written:
        click.echo(f"wrote {path}")


def _write(sim, output: str | None, trace: str | None, png: str | None) -> list[str]:
    if not (output or trace or png):
        return []
    from specplan.trace import write_chrome_trace, write_gantt_png, write_timeline

    timeline = sim.timeline()
    written = []
    if output:
        written.append(str(write_timeline(timeline, output)))
    if trace:
        written.append(str(write_chrome_trace(timeline, trace)))
    if png:
        p = sim.plan
        title = (f"simulated {p.model.name} on {p.profile.name}: {p.workload.num_prompts} prompts x "
                 f"{p.workload.gen_len} tokens, {p.policy.num_batches} x {p.policy.decode_batch}")
        written.append(str(write_gantt_png(timeline, png, title=title, max_events=len(timeline.events))))
    return written


def _signed(pred: float | None, sim: float | None) -> str:
    """(predicted - simulated) / simulated: the simulator is the reference."""
    if pred is None or not sim:
        return ""
    return f"{(pred - sim) / sim:+.1%}"


def _print(sim, elapsed: float) -> None:
    from rich.table import Table

    from specplan.fmt import console, human_seconds

    p, s, pred = sim.plan, sim.summary, sim.prediction
    wl, pol = p.workload, p.policy
    out = console()
    draft = "no draft" if not pol.speculative else f"draft {p.draft.label} x {pol.draft_len}, acceptance {pol.acceptance}"
    out.print(f"[bold]simulated {p.model.name} on {p.profile.name}[/bold]: {wl.num_prompts} prompts x {wl.gen_len} "
              f"tokens (prompt {wl.prompt_len}), {pol.num_batches} x {pol.decode_batch} sequences, {draft}")
    mode = ("accepted drafts and routed experts at their expected values"
            if sim.script.seed is None else
            f"accepted drafts and routed experts drawn with seed {sim.script.seed} (--expected: their expected values)")
    out.print(f"{mode}; {sim.num_ops:,} ops in {sim.script.templates} programs, simulated in {elapsed:.2f} s")

    t = Table(title="simulated vs predicted" + ("" if sim.prediction_source == "plan"
                                                else " (prediction recomputed by the planner for this workload)"))
    for col in ("", "simulated", "predicted", "(pred - sim) / sim"):
        t.add_column(col, justify="left" if not col else "right")

    def row(label, sv, pv, fmt):
        t.add_row(label, fmt(sv) if sv is not None else "-", fmt(pv) if pv is not None else "-", _signed(pv, sv))

    def rate(x):
        return f"{x:.2f} tok/s"

    row("decode-only throughput", s.decode_tok_s, pred and pred.decode_tok_s, rate)
    row("end-to-end throughput", s.e2e_tok_s, pred and pred.e2e_tok_s, rate)
    # the prediction's round is a full wave's: compare steady figures only when the first wave is full
    full = pred is not None and pred.round_s > 0 and wl.num_prompts >= pol.num_batches * pol.decode_batch
    row("steady decode throughput", s.steady_decode_tok_s, pred.tokens_per_round / pred.round_s if full else None,
        rate)
    row("time to first token", s.ttft_s, pred and pred.ttft_s, human_seconds)
    row("prefill", s.prefill_s, pred and pred.prefill_s, human_seconds)
    row("decode", s.decode_s, pred and pred.decode_s, human_seconds)
    row("total", s.total_s, pred and pred.total_s, human_seconds)
    row("round (batch 0, steady)", s.steady_round_s, pred.round_s if full else None, human_seconds)
    t.add_row("bottleneck", s.bottleneck, pred.bottleneck if pred else "-", "")
    out.print(t)

    u = Table(title="resources")
    for col in ("resource", "busy", "of the run", "of decode", "predicted busy"):
        u.add_column(col, justify="left" if col == "resource" else "right")
    for r in s.busy_s:
        pb = pred.busy_s.get(r) if pred else None
        u.add_row(r, human_seconds(s.busy_s[r]), f"{s.utilisation[r]:.1%}", f"{s.decode_utilisation.get(r, 0):.1%}",
                  human_seconds(pb) if pb is not None else "-")
    out.print(u)

    if s.decode_s > 0:
        out.print(f"[bold]bubbles of {s.bottleneck}[/bold] during decode: {s.bubble_count:,} idle gaps, "
                  f"{human_seconds(s.bubble_s)} ({s.bubble_s / s.decode_s:.1%} of decode)")
        causes = list(s.bubble_causes.items())[:4]
        if causes:
            out.print("  idle while the next op waited for: "
                      + ", ".join(f"{k} {human_seconds(v)}" for k, v in causes))
        for b in s.bubbles:
            line = f"  {human_seconds(b.duration_s)} at {b.start_s:.4f} s"
            if b.before:
                line += f", after {b.before}"
            if b.after:
                line += f", before {b.after}, which waited for {b.waiting_for}"
            out.print(line)
