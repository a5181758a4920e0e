"""How much slower the CPU computes while the disk streams: the engine's compute overlaps its O_DIRECT reads.

On this 2-core VM a routed expert's gated FFN (bf16, 576 x 1536, 16 to 176 rows) took 1.6-1.9x as long while
another thread streamed the offload file with O_DIRECT as with the disk idle, although the reads themselves cost
~7% of a core: the DMA and the hypervisor's I/O work take memory bandwidth and CPU time from the guest. A profile
measured with the disk idle then overstates every disk-bound plan's compute rate.

Method: an expert FFN loop (weight copies rotated past the last-level cache) timed alone and while a thread reads
the profiler's disk test file back to back, the two interleaved ``reps`` times; the slowdown is the median of the
paired ratios (at least 1). GPUs compute apart from the host's disk: the figure is measured for CPU devices only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from itertools import cycle
from pathlib import Path

from specplan.contracts.hardware import Stat
from specplan.engine.io import directio
from specplan.engine.measure.timing import calls_per_sample, seconds_per_call

#: the probe's expert (the demo target's expert shape), rows per call, and copies it rotates over
HIDDEN, INTERMEDIATE, ROWS, COPIES = 576, 1536, 64, 24
#: the size of each read of the stream
READ_BYTES = 12 << 20


def expert_probe(dtype: str) -> Callable[[], object]:
    """One call of the engine's gated expert FFN (``forward.gated_ffn``) on ``ROWS`` rows, each call on the next of
    ``COPIES`` weight copies."""
    import torch
    import torch.nn.functional as F

    from specplan.engine.model.forward import gated_ffn

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, generator=g).to(dt)

    copies = cycle([{"gate": w(INTERMEDIATE, HIDDEN), "up": w(INTERMEDIATE, HIDDEN), "down": w(HIDDEN, INTERMEDIATE)}
                    for _ in range(COPIES)])
    x = w(ROWS, HIDDEN)
    return lambda: gated_ffn(x, next(copies), F.silu)


def streaming_slowdown(path: Path, compute: Callable[[], object], reps: int, min_sample_s: float) -> Stat:
    """Paired ratios (compute time while ``path`` streams with O_DIRECT / with the disk idle)."""
    stop = threading.Event()
    streaming = threading.Event()

    def reader() -> None:
        buf = directio.aligned_buffer(READ_BYTES + directio.ALIGN)
        try:
            with directio.open_direct(path) as f:
                end, off = directio.align_down(f.size) - READ_BYTES, 0
                while not stop.is_set():
                    streaming.wait()
                    if stop.is_set():
                        break
                    off = off + READ_BYTES if off + READ_BYTES <= end else 0
                    f.read_into(buf, off, READ_BYTES)
        finally:
            buf.close()

    t = threading.Thread(target=reader, name="specplan-probe-stream", daemon=True)
    t.start()
    ratios = []
    try:
        calls = calls_per_sample(compute, max(min_sample_s, 0.05))  # warms up: kernels built, copies touched
        for _ in range(max(reps, 3)):
            idle = seconds_per_call(compute, calls)
            streaming.set()
            time.sleep(0.01)  # the first read is under way
            busy = seconds_per_call(compute, calls)
            streaming.clear()
            time.sleep(0.02)  # the last read has ended
            ratios.append(max(busy / idle, 1.0))
    finally:
        stop.set()
        streaming.set()
        t.join()
    return Stat.from_samples(ratios)
