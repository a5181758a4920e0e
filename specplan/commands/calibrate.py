"""``specplan calibrate``: refit the profile's figures on the runs of a validate grid and report fidelity on the
plans held out of the fit (``specplan.validation.calibrate``)."""

from __future__ import annotations

import click


@click.command("calibrate")
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False))
@click.option("-o", "--output", metavar="FILE", default=None,
              help="Where the calibrated profile goes [default: DIR/profile-calibrated.json]; plan with it by "
                   "passing --profile FILE.")
def command(folder: str, output: str | None) -> None:
    """Fit the cost model's figures (disk and memory links, matmul rates per shape class, decode attention,
    per-layer and per-pass overheads) on the odd-numbered plans of the `specplan validate` grid in DIR, measured
    over their own timelines, and report the prediction's error on the even-numbered plans, which the fit never
    saw, at the profile as measured and at the calibrated one."""
    from specplan.validation.calibrate import fit_grid
    from specplan.validation.show import show_fit, show_written

    r = fit_grid(folder, output)
    show_fit(r.rows, r.summary)
    show_written(r.written)
