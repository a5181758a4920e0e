"""``specplan search``: the fastest plan to run a model on this machine (or a profiled one), and why."""

from __future__ import annotations

import shlex
import time

import click

from specplan.commands._params import GIB, sampling_of, sampling_options
from specplan.contracts.plan import MAX_PROMPTS, MAX_TOKENS, Sampling
from specplan.machine import here
from specplan.planner.dtypes import ENGINE_DTYPES

DEFAULT_PROMPT_LEN, DEFAULT_GEN_LEN, DEFAULT_NUM_PROMPTS = 512, 128, 256


@click.command("search")
@click.option("--model", required=True, help="Catalog name (see `specplan models`), config.json, HF model folder or GGUF file (planned at its "
                   "quantised size; `run` needs the HF folder).")
@click.option("--vram", type=GIB, required=True,
              help="Device memory budget in GiB (2^30 bytes). Without a GPU: the RAM budget for resident weights, "
                   "KV cache and buffers; the rest streams from disk.")
@click.option("--ram", type=GIB, default=None,
              help="Host memory budget in GiB [default: the profile's host memory]. Without a GPU there is no separate "
                   "host tier: --vram is the budget.")
@click.option("--disk", type=GIB, default=None,
              help="Disk budget for offloaded weights in GiB [default: unlimited].")
@click.option("--profile", "profile_arg", default=None,
              help="Hardware profile: bundled name or file [default: this machine's newest current profile (this "
                   "CPU, this engine code, under a week old), else its newest measured one].")
@click.option("--draft", "drafts", multiple=True,
              help="Draft to consider (repeatable): none, substitute:int8, substitute:int4 (optionally :g<group "
                   "size> and :hqq, e.g. substitute:int4:g128:hqq), or a catalog name / model folder sharing the "
                   "target's vocabulary [default: none, both substitutes, and catalog drafts that match].")
@click.option("--acceptance", type=click.FloatRange(0, 1), default=None,
              help="Per-token acceptance of the draft(s), measured elsewhere [default: --calibration, else a "
                   "documented prior, printed as an assumption].")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="JSON file of measured acceptance per draft (specplan.contracts.calibration).")
@click.option("--prompt-len", type=click.IntRange(min=1, max=MAX_TOKENS), default=DEFAULT_PROMPT_LEN, show_default=True,
              help="Tokens per prompt.")
@click.option("--gen-len", type=click.IntRange(min=1, max=MAX_TOKENS), default=DEFAULT_GEN_LEN, show_default=True,
              help="New tokens per prompt.")
@click.option("--num-prompts", type=click.IntRange(min=1, max=MAX_PROMPTS), default=DEFAULT_NUM_PROMPTS, show_default=True,
              help="Prompts in the workload.")
@sampling_options()
@click.option("--dtype", type=click.Choice(ENGINE_DTYPES), default=None,
              help="Weight and compute dtype [default: every dtype the profile has matmul figures for and no other "
                   "dominates (fewer bytes, faster matmuls), the fastest plan wins; a GGUF file: as stored].")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the best plan here.")
@click.option("--top", type=click.IntRange(min=1, max=50), default=5, show_default=True, help="Plans to list.")
@click.option("--explain", is_flag=True, help="Say why the best plan wins and what more memory or a faster "
                                                "resource would buy (re-runs the search a few times).")
def command(model, vram, ram, disk, profile_arg, drafts, acceptance, calibration, prompt_len, gen_len, num_prompts,
            temperature, top_p, top_k, seed, dtype, output, top, explain) -> None:
    """Search batch sizes, speculative drafts and tensor placement for the highest end-to-end throughput.

    Every combination of the discrete knobs gets an LP that places tensor groups over device / host / disk
    under the memory budgets; the best plans are rounded to whole tensors and predicted from the same per-op
    costs the simulator uses. Prints the best plans (end-to-end throughput includes prefill; decode-only does
    not) and writes the best with -o.
    """
    from specplan.jsonio import write_json
    from specplan.planner.asking import make_ask
    from specplan.planner.report import search_lines
    from specplan.planner.search import search

    t0 = time.perf_counter()
    ask = make_ask(model, vram, ram, disk, profile_arg, drafts, acceptance, calibration, prompt_len, gen_len,
                   num_prompts, top, _command_line(), sampling_of(Sampling(), temperature, top_p, top_k, seed), dtype)
    result = search(ask)
    click.echo("\n".join(search_lines(ask, result, time.perf_counter() - t0)))
    for line in ask.profile.provenance.warnings(here=here()):
        click.echo(f"warning: {line}")
    best = result.plans[0]
    if explain:
        from specplan.planner.explain import explain as why

        click.echo("\nWhy this plan:")
        for line in why(ask, best):
            click.echo(f"  - {line}")
    if output:
        write_json(output, best)
        click.echo(f"wrote {output}")


def _command_line() -> str:
    """The invocation, rebuilt from the parsed options (so that it is right however the command was called)."""
    ctx = click.get_current_context()
    parts = ["specplan", "search"]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if value in (None, False, ()) or value == p.default:
            continue
        flag = max(p.opts, key=len)
        if p.is_flag:
            parts.append(flag)
        else:
            for v in value if isinstance(value, tuple) else (value,):
                parts += [flag, shlex.quote(f"{v:g}" if isinstance(v, float) else str(v))]
    return " ".join(parts)
