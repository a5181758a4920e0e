"""``specplan simulate``: the timeline a plan predicts, op by op, on the plan's own hardware profile."""

from __future__ import annotations

import json
import time

import click

from specplan.contracts.plan import MAX_PROMPTS, MAX_TOKENS


@click.command("simulate")
@click.argument("plan_file", metavar="PLAN.json", type=click.Path(dir_okay=False))
@click.option("--tokens", type=click.IntRange(min=1, max=MAX_TOKENS), default=None,
              help="Tokens generated per prompt [default: the plan's workload.gen_len].")
@click.option("--prompts", type=click.IntRange(min=1, max=MAX_PROMPTS), default=None,
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
    from specplan.simulator.show import show_simulation, write_simulation

    for flag, path in (("-o", output), ("--trace", trace), ("--png", png)):
        if path and Path(path).is_dir():
            raise SpecplanError(f"{flag} {path}: is a folder; pass a file name")
    plan = load(Plan, plan_file)
    t0 = time.perf_counter()
    if expected and click.get_current_context().get_parameter_source("seed").name != "DEFAULT":
        raise SpecplanError("--expected draws nothing: drop --seed")
    sim = simulate(plan, tokens=tokens, prompts=prompts, seed=seed, expected=expected, kv_step=kv_step)
    elapsed = time.perf_counter() - t0
    written = write_simulation(sim, output, trace, png)
    if as_json:
        click.echo(json.dumps({**sim.meta(), "bubbles": sim.summary.as_dict()["bubbles"],
                               "simulation_wall_s": elapsed, "written": written}, indent=1))
        return
    show_simulation(sim, elapsed)
    for path in written:
        click.echo(f"wrote {path}")
