"""What the benchmarks on the demo model share: the demo models (built once), this machine's measured profile, and
the bundled prompts split as the demo splits them (the first ``CALIBRATION_PROMPTS`` held out to measure a draft's
acceptance, the rest the workload), written as prompt files, with the longest prompt as the runs encode it."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoBench:
    target: Path
    draft: Path
    profile: str  # the profile's path (or bundled name)
    held_out: Path  # prompt files
    workload: Path
    prompt_len: int  # the longest prompt in tokens, in the chat template: the plans' KV caches must hold it
    held_out_count: int


def demo_arguments(description: str, out: str, csv: str) -> argparse.ArgumentParser:
    """The options every demo benchmark takes: profile, resident budget, workload, repetitions, where rows go."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--profile", default=None, help="profile [default: this machine's newest measured one]")
    ap.add_argument("--vram", type=float, default=1.0, help="resident budget in GiB (the target: ~1.2 GiB in bf16)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--csv", default=csv, help="where the rows go")
    ap.add_argument("--out", default=out, help="folder for the plans and the runs")
    return ap


def demo_bench(out: Path, profile: str | None, **build) -> DemoBench:
    """The demo models (``build``: ``build_demo``'s parameters, e.g. ``noise``), ``profile`` (default: this
    machine's newest measured one; exits if there is none) and the prompt files in ``out``."""
    from specplan.catalog import measured_profiles
    from specplan.engine.build.models import build_demo
    from specplan.jsonio import write_atomic
    from specplan.validation.demo import CALIBRATION_PROMPTS, longest_prompt
    from specplan.validation.runs import read_prompts

    demo = build_demo(log=print, **build)
    profile = profile or (str(measured_profiles()[0]) if measured_profiles() else None)
    if profile is None:
        sys.exit("no measured profile of this machine: run `specplan profile --quick` first")
    texts = read_prompts(None)
    held_out, workload = texts[:CALIBRATION_PROMPTS], texts[CALIBRATION_PROMPTS:]
    files = [write_atomic(out / f"{name}.txt", "\n".join(t) + "\n") for name, t in (("held_out", held_out),
                                                                                    ("workload", workload))]
    return DemoBench(demo.target, demo.draft, profile, *files, longest_prompt(demo.target, texts), len(held_out))


def run_or_exit(run, args) -> None:
    """``run(args)``, a ``SpecplanError`` printed as its one line with its exit code (2), never a traceback."""
    from specplan.errors import SpecplanError

    try:
        run(args)
    except SpecplanError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
