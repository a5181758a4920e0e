"""Click parameter types shared by the subcommands."""

from __future__ import annotations

import math

import click


class Gibibytes(click.FloatRange):
    """A memory size in GiB: a finite number above zero (``nan`` and ``inf`` pass a plain FloatRange)."""

    name = "gib"

    def __init__(self) -> None:
        super().__init__(min=0, min_open=True)

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v * 2**30):
            self.fail(f"{value!r} is not a finite number of GiB", param, ctx)
        if v * 2**30 < 1:
            self.fail(f"{value!r} GiB is less than one byte", param, ctx)
        return v


GIB = Gibibytes()
