"""What ``specplan simulate`` prints and writes: simulated vs predicted, busy time, bubbles; timeline files."""

from __future__ import annotations


def write_simulation(sim, output: str | None, trace: str | None, png: str | None) -> list[str]:
    """The simulated Timeline (JSON), a Chrome / Perfetto trace and a Gantt chart, where asked; their paths."""
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


def show_simulation(sim, elapsed_s: float) -> None:
    """The simulated-vs-predicted table, the resources' busy time and the bottleneck's bubbles."""
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
    out.print(f"{mode}; {sim.num_ops:,} ops in {sim.script.templates} programs, simulated in {elapsed_s:.2f} s")

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
