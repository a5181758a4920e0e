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


def sampling_options(from_plan: bool = False):
    """``--temperature``, ``--top-p``, ``--top-k`` and ``--seed`` (unset: greedy, or the plan's workload)."""

    def default(value: str) -> str:
        return "the plan's workload" if from_plan else value

    def wrap(f):
        for opt in reversed((
            click.option("--temperature", type=click.FloatRange(0, 100), default=None,
                         help=f"Sampling temperature; 0 decodes greedily [default: {default('0')}]."),
            click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
                         help=f"Sample within the smallest set of most likely tokens whose probability reaches P "
                              f"[default: {default('1, all')}]."),
            click.option("--top-k", type=click.IntRange(0, 1 << 24), default=None,
                         help=f"Sample among the K most likely tokens, 0 for all [default: {default('0')}]."),
            click.option("--seed", type=click.IntRange(0, (1 << 63) - 1), default=None,
                         help=f"Seed of every sequence's draws: a sequence's tokens repeat with it [default: "
                              f"{default('0')}]."),
        )):
            f = opt(f)
        return f

    return wrap


def sampling_of(base, temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None):
    """``base`` (a ``Sampling``) with the options given; a NaN is refused in one line."""
    given = {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed))
             if v is not None}
    for k, v in given.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise click.BadParameter(f"{v!r} is not a number", param_hint=f"--{k.replace('_', '-')}")
    return base.model_copy(update=given) if given else base
