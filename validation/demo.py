"""The demo's steps (``specplan demo``): the main job end to end on the bundled demo model, with no download.

    1 build     the demo MoE (SmolLM2-135M-Instruct upcycled into a Mixtral-architecture MoE) and its draft
                (SmolLM2 itself), cached
    2 profile   this machine (`specplan profile --quick`, in a child process), unless a measured profile exists
    3 calibrate the draft's acceptance: a short speculative run on held-out prompts writes calibration.json
    4 search    the best plan under a resident budget that leaves most experts on disk, with the measured
                acceptance, and the best plan without a draft (the baseline)
    5 simulate  the best plan
    6 run       both plans on the other prompts; predicted vs simulated vs measured, and the speedup of
                speculative decoding measured in this one run

Each step calls the functions its subcommand calls and prints what it prints; the files land in one folder.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from specplan.contracts.plan import Sampling
from specplan.errors import SpecplanError
from specplan.validation.runs import FIXED_LENGTH_WORKLOAD, RunReport, encode_prompts, read_prompts, run_plan_file
from specplan.validation.show import show_run, show_written

#: the bundled prompts are split: the first CALIBRATION_PROMPTS measure the acceptance, the rest are the workload
CALIBRATION_PROMPTS = 4


def run_demo(vram: float, profile_arg: str | None, num_prompts: int, gen_len: int, out_dir: str | Path,
             say: Callable[[str], None] = print, fresh: bool = False, sampling: Sampling = Sampling()) -> None:
    """The six steps, ``vram`` in GiB; ``say`` prints the step headings (rich markup). A demo run again into the
    same folder (after a ``kill -9``, say) keeps the runs that finished there with the same plan, prompts and
    length and runs only the others; ``fresh`` runs everything again."""
    from specplan.catalog import measured_profiles
    from specplan.engine.build.models import build_demo
    from specplan.jsonio import write_atomic

    out = Path(out_dir)
    say("[bold]1/6 demo models[/bold]")
    models = build_demo(log=say)
    say(f"target {models.target}, draft {models.draft}" + (f" (built in {models.seconds:.0f} s)" if models.built
                                                           else " (cached)"))

    say("[bold]2/6 hardware profile[/bold]")
    if profile_arg is None and not measured_profiles():
        say("no measured profile of this machine yet: measuring one (specplan profile --quick)")
        if subprocess.run([sys.executable, "-m", "specplan", "profile", "--quick"]).returncode != 0:
            raise SpecplanError("the demo needs this machine's profile and `specplan profile --quick` did not store "
                                "one (its message is above); rerun on an idle machine, or pass --profile")
    prof = profile_arg or str(measured_profiles()[0])
    say(f"profile {prof}")

    texts = read_prompts(None)
    held_out, workload = texts[:CALIBRATION_PROMPTS], texts[CALIBRATION_PROMPTS:]
    prompt_len = longest_prompt(models.target, texts)
    files = {name: write_atomic(out / f"{name}_prompts.txt", "\n".join(lines) + "\n")
             for name, lines in (("calibration", held_out), ("workload", workload))}
    common = dict(model=str(models.target), vram=vram, profile_arg=prof, prompt_len=prompt_len, gen_len=gen_len,
                  sampling=sampling)

    say(f"[bold]3/6 calibrate[/bold]: the draft's acceptance on {len(held_out)} held-out prompts "
        f"({FIXED_LENGTH_WORKLOAD})")
    search_step(**common, drafts=(str(models.draft),), num_prompts=len(held_out), top=1,
                output=out / "calibration" / "plan.json")
    run_step(out / "calibration" / "plan.json", files["calibration"], None, out / "calibration", not fresh, say)
    calibration = out / "calibration" / "calibration.json"

    say("[bold]4/6 search[/bold]: with the measured acceptance, and the best plan without a draft")
    search_step(**common, drafts=("none", str(models.draft)), calibration=str(calibration), num_prompts=num_prompts,
                output=out / "plan.json")
    search_step(**common, drafts=("none",), num_prompts=num_prompts, top=1, output=out / "baseline" / "plan.json")

    say("[bold]5/6 simulate[/bold] the best plan")
    simulate_step(out / "plan.json", out / "simulated")

    say(f"[bold]6/6 run[/bold] the best plan, then the baseline, on the workload prompts ({FIXED_LENGTH_WORKLOAD})")
    runs = {name: run_step(plan_file, files["workload"], num_prompts, folder, not fresh, say).report
            for name, plan_file, folder in (("best", out / "plan.json", out / "measured"),
                                            ("baseline", out / "baseline" / "plan.json",
                                             out / "baseline" / "measured"))}
    for line in speedup_lines(runs):
        say(line)


def longest_prompt(model_dir: Path, texts: list[str]) -> int:
    """The longest prompt in tokens of the demo tokenizer, as the runs encode it (``encode_prompts``: in the chat
    template): the KV cache must hold it, so the plans assume it."""
    from specplan.engine.model.checkpoint import open_checkpoint

    return max(len(p) for p in encode_prompts(open_checkpoint(model_dir).tokenizer(), texts))


def search_step(model: str, vram: float, profile_arg: str, prompt_len: int, gen_len: int, drafts: tuple[str, ...],
                num_prompts: int, output: Path, top: int = 5, calibration: str | None = None,
                sampling: Sampling = Sampling()) -> None:
    """What ``specplan search`` does and prints for these options, writing the best plan to ``output``; the plan
    records the equivalent ``specplan search`` command line."""
    from specplan.jsonio import write_json
    from specplan.planner.asking import make_ask
    from specplan.planner.report import search_lines
    from specplan.planner.search import search

    t0 = time.perf_counter()
    flags = ["--model", model, "--vram", f"{vram:g}", "--profile", profile_arg,
             *(x for d in drafts for x in ("--draft", d)), *(("--calibration", calibration) if calibration else ()),
             "--prompt-len", str(prompt_len),
             "--gen-len", str(gen_len), "--num-prompts", str(num_prompts), "--output", str(output), "--top", str(top),
             *(() if sampling.greedy else ("--temperature", f"{sampling.temperature:g}", "--top-p",
                                           f"{sampling.top_p:g}", "--top-k", str(sampling.top_k), "--seed",
                                           str(sampling.seed)))]
    ask = make_ask(model, vram, None, None, profile_arg, drafts, None, calibration, prompt_len, gen_len, num_prompts,
                   top, shlex.join(["specplan", "search", *flags]), sampling)
    result = search(ask)
    print("\n".join(search_lines(ask, result, time.perf_counter() - t0)))
    show_written([write_json(output, result.plans[0])])


def simulate_step(plan_file: Path, folder: Path) -> None:
    """What ``specplan simulate PLAN -o timeline.json --trace trace.json --png gantt.png`` does and prints."""
    from specplan.contracts.plan import Plan
    from specplan.jsonio import load
    from specplan.simulator import simulate
    from specplan.simulator.show import show_simulation, write_simulation

    t0 = time.perf_counter()
    sim = simulate(load(Plan, plan_file))
    elapsed = time.perf_counter() - t0
    written = write_simulation(sim, str(folder / "timeline.json"), str(folder / "trace.json"),
                               str(folder / "gantt.png"))
    show_simulation(sim, elapsed)
    show_written(written)


def run_step(plan_file: Path, prompts_file: Path, num_prompts: int | None, folder: Path, resume: bool = False,
             say: Callable[[str], None] = print) -> RunReport:
    """What ``specplan run PLAN --prompts FILE [--num-prompts N] --fixed-length -o FOLDER`` does and prints (the
    fixed-length workload the prediction assumes: EOS ignored); ``resume``: a run that finished in ``folder`` with
    the same plan, prompts and length is shown, not run again."""
    run = run_plan_file(plan_file, prompts_file=prompts_file, num_prompts=num_prompts, stop_at_eos=False,
                        out_dir=folder, resume=resume)
    if run.reused:
        say(f"[bold]kept[/bold] the finished run in {folder} (same plan, prompts and length, run_id "
            f"{run.report['run_id']}); `specplan demo --fresh` measures it again")
    show_run(run.plan, run.report)
    show_written(run.written)
    return run


def speedup_lines(runs: dict[str, dict]) -> list[str]:
    """The best plan over the baseline (result.json bodies), measured and predicted, decode-only and end-to-end."""
    best, base = runs["best"], runs["baseline"]
    draft = best["policy"]["draft_len"]
    label = f"draft length {draft}" if draft else "no draft"
    lines = []
    for key, what in (("decode_tok_s", "decode-only"), ("e2e_tok_s", "end-to-end")):
        m = best["measured"][key] / base["measured"][key]
        p = best["predicted"][key] / base["predicted"][key]
        lines.append(f"best plan ({label}) over the best plan without a draft, {what}: measured {m:.2f}x "
                     f"({best['measured'][key]:.2f} vs {base['measured'][key]:.2f} tok/s), predicted {p:.2f}x")
    return lines
