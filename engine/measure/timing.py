"""Timing primitives of the profiler: repeated samples of a call, turned into ``Stat`` of seconds or of rates.

Every measurement of ``specplan profile`` goes through ``sample_seconds``: a warm-up call (which also sizes the
sample), then ``reps`` samples, each timing enough back-to-back calls to last ``min_sample_s`` (short calls are
averaged over many, so the timer's resolution and one-off hiccups do not dominate). On a CUDA device the calls are
timed with CUDA events; on the CPU with ``time.perf_counter``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from specplan.contracts.hardware import Stat


def _cuda_seconds(fn: Callable[[], object], calls: int) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def _cpu_seconds(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def seconds_per_call(fn: Callable[[], object], calls: int = 1, cuda: bool = False) -> float:
    """Mean seconds of one call over ``calls`` back-to-back calls."""
    return _cuda_seconds(fn, calls) if cuda else _cpu_seconds(fn, calls)


def calls_per_sample(
    fn: Callable[[], object], min_sample_s: float, cuda: bool = False, max_calls: int = 100_000
) -> int:
    """Warm ``fn`` up and return how many back-to-back calls last about ``min_sample_s``."""
    first = seconds_per_call(fn, 1, cuda)
    calls = max(1, min(max_calls, math.ceil(min_sample_s / max(first, 1e-9))))
    if calls > 1:  # a second, better sized estimate: the first call pays for allocation and cold caches
        calls = max(1, min(max_calls, math.ceil(min_sample_s / max(seconds_per_call(fn, calls, cuda), 1e-9))))
    return calls


def interleaved_seconds(
    fns: list[Callable[[], object]], labels: list[str], reps: int, min_sample_s: float, cuda: bool = False,
    ticker: "Ticker | None" = None,
) -> list[Stat]:
    """Seconds per call of each of ``fns`` over ``reps`` rounds; each round samples every function once.

    Interleaving spreads a burst of load from other processes over one sample of many points instead of every
    sample of a few, so the medians stay clean. ``ticker`` ticks ``(reps + 1) * len(fns)`` times (warm-up included).
    """
    calls = []
    for fn, label in zip(fns, labels):
        calls.append(calls_per_sample(fn, min_sample_s, cuda))
        if ticker is not None:
            ticker.tick(f"{label} (warm-up)")
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(reps):
        for i, (fn, label) in enumerate(zip(fns, labels)):
            samples[i].append(seconds_per_call(fn, calls[i], cuda))
            if ticker is not None:
                ticker.tick(f"{label} ({r + 1}/{reps})")
    return [Stat.from_samples(s) for s in samples]


def sample_seconds(fn: Callable[[], object], reps: int, min_sample_s: float, cuda: bool = False) -> Stat:
    """Seconds per call of ``fn`` as min / median / max over ``reps`` samples (after a warm-up)."""
    calls = calls_per_sample(fn, min_sample_s, cuda)
    return Stat.from_samples([seconds_per_call(fn, calls, cuda) for _ in range(reps)])


def rate(work: float, seconds: Stat) -> Stat:
    """``work`` per second (FLOP/s, B/s): the slowest sample gives the minimum rate."""
    return Stat(min=work / seconds.max, median=work / seconds.median, max=work / seconds.min)


def net_of(seconds: Stat, fixed_s: float, floor: float = 0.25) -> Stat:
    """Seconds minus a fixed latency, never below ``floor`` of the measured time (noise on tiny transfers)."""
    return Stat(
        min=max(seconds.min - fixed_s, floor * seconds.min),
        median=max(seconds.median - fixed_s, floor * seconds.median),
        max=max(seconds.max - fixed_s, floor * seconds.max),
    )


@dataclass
class Ticker:
    """Progress of a profile run: ``total`` planned steps; ``tick(label)`` after each. ``on_tick`` drives a bar."""

    total: int
    on_tick: Callable[[str, int, int], None] | None = None
    done: int = 0
    labels: list[str] = field(default_factory=list)

    def tick(self, label: str) -> None:
        self.done += 1
        self.labels.append(label)
        if self.on_tick is not None:
            self.on_tick(label, self.done, self.total)


class CpuUsage:
    """How much CPU other processes took while we measured (Linux /proc/stat; None elsewhere).

    The profile is only as clean as the machine was idle: the fraction goes into the provenance notes.
    """

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = sum(fields[:8]) - fields[3] - fields[4]  # everything but idle and iowait (steal included)
        own = sum(os.times()[:4])  # this process and the children it waited for
        return busy / tick, own, time.monotonic()

    def others_fraction(self) -> float | None:
        """Share of all CPUs' time used by other processes (and the hypervisor's steal) since construction; this
        process's own time and its finished children's are not counted as others'."""
        end = self._read()
        if self.start is None or end is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self.start, end))
        if wall <= 0:
            return None
        return min(1.0, max(0.0, (busy - own) / (wall * (os.cpu_count() or 1))))
