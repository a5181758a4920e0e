"""``specplan validate``: is the planner right on this machine? Run a grid of plans and compare
(``specplan.validation.grid``).
"""

from __future__ import annotations

import click

from specplan.contracts.plan import MAX_PROMPTS, MAX_TOKENS

from specplan.commands._params import GIB

MAX_PLANS = 40
MAX_REPS = 20


@click.command("validate")
@click.option("--model", required=True, metavar="DIR", help="HF model folder with the weights to validate on.")
@click.option("--vram", "vrams", type=GIB, required=True, multiple=True,
              help="Device (without a GPU: resident-weight) budget in GiB; repeat it to span resident fractions "
                   "(the search runs at each, the grid takes plans from all).")
@click.option("--profile", "profile_arg", default=None, metavar="NAME|FILE",
              help="Hardware profile [default: this machine's newest current profile (this CPU, this engine "
                   "code, under a week old), else its newest measured one].")
@click.option("--draft", "drafts", multiple=True, metavar="D",
              help="Draft to include (repeatable): none or a draft model folder [default: none only].")
@click.option("--acceptance", type=click.FloatRange(0, 1), default=None,
              help="Per-token acceptance the plans assume [default: --calibration, else the prior].")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="Measured acceptance (a calibration.json of specplan run), measured on other prompts.")
@click.option("--prompts", "prompts_file", metavar="FILE", default=None,
              help="Prompts, one per line or JSONL [default: the bundled English prompts].")
@click.option("--num-prompts", type=click.IntRange(min=1, max=MAX_PROMPTS), default=16, show_default=True, help="Prompts per run (the largest decode batch the grid can hold).")
@click.option("--gen-len", type=click.IntRange(min=2, max=MAX_TOKENS), default=16, show_default=True, help="New tokens per prompt.")
@click.option("--plans", "max_plans", type=click.IntRange(min=2, max=MAX_PLANS), default=12, show_default=True,
              help="Plans in the grid: the planner's choice at each budget, then the plans that span the plan space.")
@click.option("--reps", type=click.IntRange(min=1, max=MAX_REPS), default=3, show_default=True,
              help="Trials of each plan, each in its own fresh process, the plans interleaved; rows are medians.")
@click.option("--synthetic-acceptance", "synthetic", metavar="A", type=float, default=None,
              help="Benchmark mode, NOT lossless: the plans assume per-token acceptance A and their speculative runs "
                   "accept each proposal with probability A from a seeded generator, so the grid measures the cost "
                   "model alone (0 < A <= 1; not with --acceptance or --calibration).")
@click.option("--fit", is_flag=True,
              help="Then refit the profile's figures on the odd-numbered plans' runs and report the error on the "
                   "even-numbered ones (what `specplan calibrate DIR` does).")
@click.option("-o", "--output", "out_dir", metavar="DIR", default="results/validate", show_default=True,
              help="Folder for validate.csv and each plan's files.")
def command(model: str, vrams: tuple[float, ...], profile_arg: str | None, drafts: tuple[str, ...],
            acceptance: float | None, calibration: str | None, prompts_file: str | None, num_prompts: int,
            gen_len: int, max_plans: int, reps: int, synthetic: float | None, fit: bool, out_dir: str) -> None:
    """Run a grid of the search's plans on this machine and report how right the planner is: signed errors of the
    prediction and the simulation, rank correlation, and the regret of the planner's choice."""
    from specplan.validation.grid import run_grid
    from specplan.validation.calibrate import fit_grid
    from specplan.validation.show import show_fit, show_grid, show_written

    r = run_grid(model, vrams, profile_arg, drafts, acceptance, calibration, prompts_file, num_prompts, gen_len,
                 max_plans, out_dir, reps, say=click.echo, synthetic_acceptance=synthetic)
    show_grid(r.rows, r.summary)
    show_written(r.written)
    if fit:
        f = fit_grid(out_dir)
        show_fit(f.rows, f.summary)
        show_written(f.written)
