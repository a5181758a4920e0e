"""The demo's steps (``specplan demo``): the main job end to end on the bundled demo model, with no download.

    1 build     the demo MoE (SmolLM2-135M-Instruct upcycled into a Mixtral-architecture MoE) and its draft
                (SmolLM2 itself), cached
    2 profile   this machine (`specplan profile --quick`, in a child process), unless a current one exists
    3 calibrate the draft's acceptance: a short speculative run on held-out prompts, in its own fresh process,
                writes calibration.json
    4 search    the best plan under a resident budget that leaves most experts on disk, with the measured
                acceptance, and the best plan without a draft (the baseline)
    5 simulate  the best plan
    6 run       both plans on the other prompts, each in its own fresh process, interleaved, ``reps`` times
                (``validation.trials``); predicted vs simulated vs measured, medians and spreads, and the speedup
                of speculative decoding from the medians (comparison.json)

Each step calls the functions its subcommand calls and prints what it prints; the files land in one folder.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from specplan.contracts.plan import Sampling
from specplan.contracts.plan import Plan
from specplan.errors import SpecplanError
from specplan.jsonio import load, write_atomic, write_json
from specplan.planner.search import DRAFT_LENS
from specplan.validation.runs import FIXED_LENGTH_WORKLOAD, encode_prompts, find_finished, read_prompts
from specplan.validation.show import show_run, show_written
from specplan.validation.trials import Contender, contended, median_trial, ratio, run_fresh, run_trials, summarise

#: the bundled prompts are split: the first CALIBRATION_PROMPTS measure the acceptance, the rest are the workload
CALIBRATION_PROMPTS = 12
#: the calibration run proposes the longest draft the search tries, so its curves P(n >= i) (about the same at
#: every draft length for the positions they share) cover every draft length the search weighs, unextrapolated
CALIBRATION_DRAFT_LEN = max(DRAFT_LENS)


def run_demo(vram: float, profile_arg: str | None, num_prompts: int, gen_len: int, out_dir: str | Path,
             say: Callable[[str], None] = print, fresh: bool = False, sampling: Sampling = Sampling(),
             reps: int = 3) -> None:
    """The six steps, ``vram`` in GiB; ``say`` prints the step headings (rich markup). A demo run again into the
    same folder (after a ``kill -9``, say) keeps the runs that finished there with the same plan, prompts and
    length and runs only the others; ``fresh`` runs everything again."""
    from specplan.catalog import contended_profiles, current_profiles, measured_profiles
    from specplan.engine.build.models import build_demo

    out = Path(out_dir)
    say("[bold]1/6 demo models[/bold]")
    models = build_demo(log=say)
    say(f"target {models.target}, draft {models.draft}" + (f" (built in {models.seconds:.0f} s)" if models.built
                                                           else " (cached)"))

    say("[bold]2/6 hardware profile[/bold]")
    current = current_profiles() if profile_arg is None else []
    if profile_arg is None and not current:
        say("no current profile of this machine (measured on this CPU, with this engine code, in the last week): "
            "measuring one (specplan profile --quick)")
        if subprocess.run([sys.executable, "-m", "specplan", "profile", "--quick"]).returncode != 0:
            if not contended_profiles():
                raise SpecplanError("the demo needs this machine's profile and `specplan profile --quick` did not "
                                    "store one (its message is above); rerun on an idle machine, or pass --profile")
            say(f"[bold yellow]the machine was busy: this demo plans on the refused, contended measurement "
                f"{contended_profiles()[0]} (not stored as this machine's profile); its predictions are off by "
                f"what the other processes took, and every run's drift report says so[/bold yellow]")
        current = current_profiles()
    prof = profile_arg or str((current or contended_profiles() or measured_profiles())[0])
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
                output=out / "calibration" / "plan.json", draft_len=CALIBRATION_DRAFT_LEN)
    calibrate_step(out / "calibration" / "plan.json", files["calibration"], out / "calibration", not fresh, say)
    calibration = out / "calibration" / "calibration.json"

    say("[bold]4/6 search[/bold]: with the measured acceptance, and the best plan without a draft")
    search_step(**common, drafts=("none", str(models.draft)), calibration=str(calibration), num_prompts=num_prompts,
                output=out / "plan.json")
    search_step(**common, drafts=("none",), num_prompts=num_prompts, top=1, output=out / "baseline" / "plan.json")

    say("[bold]5/6 simulate[/bold] the best plan")
    simulate_step(out / "plan.json", out / "simulated")

    say(f"[bold]6/6 run[/bold] the best plan and the baseline on the workload prompts ({FIXED_LENGTH_WORKLOAD}), "
        f"each in its own fresh process, interleaved, {reps} times")
    contenders = [Contender("best", out / "plan.json", out / "measured"),
                  Contender("baseline", out / "baseline" / "plan.json", out / "baseline" / "measured")]
    trials = run_trials(contenders, files["workload"], num_prompts, reps, resume=not fresh, say=say)
    summary = summarise(trials)
    for c in contenders:
        t = median_trial(trials, c.name)
        say(f"[bold]{c.name}[/bold]: its median trial ({t.folder}), as `specplan run` prints it")
        show_run(load(Plan, c.plan_file), t.report)
    lines, speedups = comparison_lines(summary, trials)
    for line in lines:
        say(line)
    show_written([write_json(out / "comparison.json", {**summary_body(summary, speedups, reps),
                                                       "workload": FIXED_LENGTH_WORKLOAD})])


def summary_body(summary: dict, speedups: dict, reps: int) -> dict:
    return {"method": f"each plan in its own fresh process (`specplan run --fixed-length`), interleaved, {reps} "
                      f"repetitions; medians and min..max", "contenders": summary, "speedup_best_over_baseline": speedups}


def longest_prompt(model_dir: Path, texts: list[str]) -> int:
    """The longest prompt in tokens of the demo tokenizer, as the runs encode it (``encode_prompts``: in the chat
    template): the KV cache must hold it, so the plans assume it."""
    from specplan.engine.model.checkpoint import open_checkpoint

    return max(len(p) for p in encode_prompts(open_checkpoint(model_dir).tokenizer(), texts))


def search_step(model: str, vram: float, profile_arg: str, prompt_len: int, gen_len: int, drafts: tuple[str, ...],
                num_prompts: int, output: Path, top: int = 5, calibration: str | None = None,
                sampling: Sampling = Sampling(), draft_len: int | None = None) -> None:
    """What ``specplan search`` does and prints for these options, writing the best plan to ``output`` (with
    ``draft_len``: the best of that draft length, where the search found one); the plan records the equivalent
    ``specplan search`` command line."""
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
                   top if draft_len is None else 40, shlex.join(["specplan", "search", *flags]), sampling)
    result = search(ask)
    if draft_len is not None:
        longest = [p for p in result.plans if p.policy.draft_len == draft_len]
        result = replace(result, plans=longest[:1] or result.plans[:top])
    print("\n".join(search_lines(ask, result, time.perf_counter() - t0)))
    show_written([write_json(output, result.plans[0])])


def simulate_step(plan_file: Path, folder: Path) -> None:
    """What ``specplan simulate PLAN -o timeline.json --trace trace.json --png gantt.png`` does and prints."""
    from specplan.contracts.plan import Plan
    from specplan.simulator import simulate
    from specplan.simulator.show import show_simulation, write_simulation

    t0 = time.perf_counter()
    sim = simulate(load(Plan, plan_file))
    elapsed = time.perf_counter() - t0
    written = write_simulation(sim, str(folder / "timeline.json"), str(folder / "trace.json"),
                               str(folder / "gantt.png"))
    show_simulation(sim, elapsed)
    show_written(written)


def calibrate_step(plan_file: Path, prompts_file: Path, folder: Path, resume: bool = False,
             say: Callable[[str], None] = print) -> dict:
    """The calibration run: ``specplan run PLAN --prompts FILE --fixed-length -o FOLDER`` (the fixed-length workload the prediction
    assumes: EOS ignored) in its own fresh process, as the trials run (the demo's process has built models and holds
    their memory: a run inside it would report that process's peak RSS and its warm state), then its tables;
    ``resume``: a run that finished in ``folder`` with the same plan, prompts and length is shown, not run again.
    Its result.json body."""
    report = find_finished(plan_file, prompts_file, None, None, folder) if resume else None
    if report is not None:
        say(f"[bold]kept[/bold] the finished run in {folder} (same plan, prompts and length, run_id "
            f"{report['run_id']}); `specplan demo --fresh` measures it again")
    else:
        report, others = run_fresh(plan_file, prompts_file, None, folder)
        if contended(others):
            say(f"[bold yellow]other processes took {others:.0%} of the CPUs during this run[/bold yellow]")
    show_run(load(Plan, plan_file), report)
    show_written([folder / "result.json", folder / "calibration.json"])
    return report


def comparison_lines(summary: dict, trials: list) -> tuple[list[str], dict]:
    """The two plans' medians and spreads, and the best plan over the baseline from the medians (decode-only and
    end-to-end), measured and predicted; and those speedups as numbers."""
    lines, speedups = [], {}
    for name, s in summary.items():
        g = s["policy"]["draft_len"]
        lines.append(f"{name} ({f'draft length {g}' if g else 'no draft'}, {s['trials']} trials"
                     + (f", {s['contended_trials']} contended" if s["contended_trials"] else "") + "): " + "; ".join(
            f"{what} median {s[k]['measured']['median']:.2f} tok/s ({s[k]['measured']['min']:.2f}..."
            f"{s[k]['measured']['max']:.2f}), predicted {s[k]['predicted']:.2f} ({s[k]['signed_error']:+.1%})"
            for k, what in (("decode_tok_s", "decode-only"), ("e2e_tok_s", "end-to-end"))))
    for key, what in (("decode_tok_s", "decode-only"), ("e2e_tok_s", "end-to-end")):
        r = speedups[key] = ratio(summary, trials, "best", "baseline", key)
        lines.append(f"best plan over the best plan without a draft, {what}: measured {r['measured']:.2f}x (ratio of "
                     f"the medians; {r['measured_min']:.2f}x..{r['measured_max']:.2f}x paired by repetition), "
                     f"predicted {r['predicted']:.2f}x")
    return lines, speedups
