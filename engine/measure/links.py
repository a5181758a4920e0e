"""Data paths of a machine: disk reads (O_DIRECT and buffered) and writes, and on a GPU host<->device copies.

Disk: a file of random bytes (real data, not sparse) is written in the offload folder the engine will use, synced and
dropped from the page cache, then read with ``engine.directio`` — the primitive the weight store reads offloaded
tensors with — at each transfer size, at offsets that walk through the file (a region is read again only after the
whole file has been), so neither the page cache, readahead nor a drive's cache serves a repeat. Buffered reads drop
the file's cached pages before each read; writes are ``pwrite`` + ``fsync`` at fresh offsets of a second file, as
``directio.write_aligned`` writes offload files.

Every link is a ``Link``: ``latency_s`` is the median time of the smallest transfer (one 4 KiB block) and the
bandwidth curve is ``size / (time(size) - latency)``, so ``Link.time_s(size)`` reproduces the measured median time at
each measured size.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from specplan.contracts.hardware import Curve, DiskInfo, Link, Point, Stat
from specplan.engine.io import directio
from specplan.engine.measure.timing import Ticker, net_of, rate, sample_seconds
from specplan.errors import SpecplanError
from specplan.fmt import human_bytes

#: size of the smallest transfer, whose time is the link's latency.
LATENCY_BYTES = directio.ALIGN
LATENCY_SAMPLES = 20
#: small transfers are repeated until this many bytes (at most ``MAX_SAMPLES`` samples) to tame their noise.
SMALL_BYTES = 32 << 20
MAX_SAMPLES = 64
CHUNK = 64 << 20
TEST_FILE = "specplan-profile-read.bin"
WRITE_FILE = "specplan-profile-write.bin"


def samples_for(size: int, reps: int) -> int:
    return max(reps, min(MAX_SAMPLES, math.ceil(SMALL_BYTES / size)))


def make_link(seconds: dict[int, Stat], latency: Stat) -> Link:
    """A link whose ``time_s`` reproduces the measured median time at each size (see the module doc)."""
    pts = [Point(x=s, y=rate(s, net_of(t, latency.median))) for s, t in sorted(seconds.items())]
    return Link(
        bandwidth_Bps=Curve(x_name="transfer_bytes", y_name="bandwidth_Bps", points=pts),
        latency_s=latency.median,
        latency_samples_s=latency,
    )


def disk_steps(sizes: tuple[int, ...], reps: int, stream_s: float = 0.0) -> int:
    """Progress steps of ``measure_disk``: the test file, every transfer of the three links, the stream."""
    return 1 + 3 * len(schedule(sizes, reps)) + (stream_s > 0)


def disk_bytes_needed(sizes: tuple[int, ...], reps: int, file_bytes: int) -> int:
    """Disk space the measurement uses at its peak: the read file plus the write file."""
    return file_bytes + sum(directio.align_up(s) for s in schedule(sizes, reps))


class _Cursor:
    """Hands out aligned offsets that walk through the file, wrapping at its end, so reads never repeat soon."""

    def __init__(self, file_bytes: int):
        self.file_bytes = file_bytes
        self.pos = 0

    def next(self, size: int) -> int:
        if self.pos + size > self.file_bytes:
            self.pos = 0
        off = self.pos
        self.pos += directio.align_up(size)
        return off


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def write_random_file(path: Path, nbytes: int) -> None:
    """``nbytes`` of fresh random data (torch's generator: ~0.7 GB/s here, os.urandom is 5x slower), synced and
    dropped from the page cache."""
    import torch

    chunk = torch.empty(CHUNK // 8, dtype=torch.int64)
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, CHUNK)
            chunk.random_()
            f.write(memoryview(chunk.numpy()).cast("B")[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    directio.drop_file_cache(path)


def _prefault(buf) -> None:
    """Touch every page of a fresh buffer, as the engine's reused staging buffers are: the first read into an
    untouched mmap pays a page fault per 4 KiB and would measure the kernel, not the disk."""
    import numpy as np

    np.frombuffer(buf, dtype=np.uint8)[:] = 0


def schedule(sizes: tuple[int, ...], reps: int) -> list[int]:
    """The order of the transfers of one link: round-robin over the sizes (the 4 KiB latency probe first in each
    round), each size until it has its ``samples_for`` samples, so a burst of other I/O hits one sample of many sizes
    rather than every sample of one."""
    want = {LATENCY_BYTES: LATENCY_SAMPLES, **{s: samples_for(s, reps) for s in sizes}}
    return [s for r in range(max(want.values())) for s, n in want.items() if r < n]


def _run_schedule(order: list[int], one, ticker: Ticker, what: str) -> Link:
    """Time ``one(size)`` for each size of ``order``; the link from the samples (latency from the 4 KiB ones)."""
    samples: dict[int, list[float]] = {}
    for size in order:
        samples.setdefault(size, []).append(one(size))
        ticker.tick(f"disk: {what} {_size(size)}")
    stats = {s: Stat.from_samples(v) for s, v in samples.items()}
    return make_link({s: t for s, t in stats.items() if s != LATENCY_BYTES}, stats[LATENCY_BYTES])


def _read_link(f: directio.DirectFile, buf, cursor: _Cursor, order: list[int], drop: str | None, ticker: Ticker,
               what: str) -> Link:
    def one(size: int) -> float:
        off = cursor.next(size)
        if drop is not None:
            directio.drop_file_cache(drop)
        return _timed(lambda: f.read_into(buf, off, size))

    return _run_schedule(order, one, ticker, what)


def measure_file_read(path: Path, sizes: tuple[int, ...], reps: int) -> Link | None:
    """The O_DIRECT read link measured on an existing file (e.g. the engine's offload file: the real data, where it
    really lies), sizes round-robin as in ``measure_disk``; None where O_DIRECT is not supported there."""
    size = os.path.getsize(path)
    sizes = tuple(s for s in sizes if directio.align_up(s) <= size)
    if not sizes:
        raise ValueError(f"{path}: {size} bytes is smaller than every transfer size asked for")
    buf = directio.aligned_buffer(max(sizes) + directio.ALIGN)
    try:
        _prefault(buf)
        with directio.open_direct(path) as f:
            if not f.direct:
                return None
            return _read_link(f, buf, _Cursor(directio.align_down(size)), schedule(sizes, reps), None, Ticker(0),
                              "O_DIRECT read")
    finally:
        buf.close()


def measure_file_stream(path: Path, size: int, seconds: float) -> Stat | None:
    """``sustained_read`` on an existing file (e.g. the engine's offload file); None where O_DIRECT does not work."""
    size = min(size, directio.align_down(os.path.getsize(path)))
    buf = directio.aligned_buffer(size + directio.ALIGN)
    try:
        _prefault(buf)
        with directio.open_direct(path) as f:
            if not f.direct:
                return None
            return sustained_read(f, buf, _Cursor(directio.align_down(f.size)), size, seconds)
    finally:
        buf.close()


def _write_link(path: Path, buf, order: list[int], ticker: Ticker) -> Link:
    """``pwrite`` + ``fsync`` of each size at a fresh offset of a new file (``buf`` holds random file data)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    cursor = _Cursor(1 << 62)  # never wraps: a fresh region of the file for every write
    try:
        with memoryview(buf) as src:
            def write(off: int, size: int) -> None:
                done = 0
                while done < size:
                    done += os.pwrite(fd, src[done:size], off + done)
                os.fsync(fd)

            def one(size: int) -> float:
                off = cursor.next(size)
                return _timed(lambda: write(off, size))

            return _run_schedule(order, one, ticker, "write + fsync")
    finally:
        os.close(fd)


def filesystem_of(path: Path) -> str | None:
    """The filesystem type of the mount holding ``path`` (longest mount point prefix in /proc/mounts)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, fstype = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) > len(best):
            best, fstype = mnt, parts[2]
    return fstype


def prepare_offload_dir(path: Path, need_bytes: int) -> Path:
    """Create the folder if needed and check it is writable and has room; ``SpecplanError`` if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpecplanError(
            f"--offload-dir {path}: cannot create the folder ({e.strerror}); pass a writable folder"
        ) from None
    if not os.access(path, os.W_OK):
        raise SpecplanError(f"--offload-dir {path}: folder is not writable; pass a writable folder")
    free = shutil.disk_usage(path).free
    if free < need_bytes + (256 << 20):
        raise SpecplanError(
            f"--offload-dir {path}: {human_bytes(free)} free, the disk test needs {human_bytes(need_bytes)} "
            f"(plus {human_bytes(256 << 20)} spare); free some space or pass another folder"
        )
    return path


def sustained_read(f: directio.DirectFile, buf, cursor: _Cursor, size: int, seconds: float) -> Stat:
    """Bandwidth of back-to-back reads of ``size`` for ``seconds``, over the reads after the first third of the
    time (the engine streams weights for as long as a run lasts; a VM's disk may slow a stream down after a burst)."""
    t_start = time.perf_counter()
    samples: list[tuple[float, float]] = []
    while time.perf_counter() - t_start < seconds or len(samples) < 3:
        off = cursor.next(size)
        t0 = time.perf_counter()
        f.read_into(buf, off, size)
        t1 = time.perf_counter()
        samples.append((t1 - t_start, size / (t1 - t0)))
    steady = [bw for t, bw in samples if t >= seconds / 3] or [bw for _, bw in samples]
    return Stat.from_samples(steady)


def measure_disk(
    folder: Path, sizes: tuple[int, ...], reps: int, file_bytes: int, ticker: Ticker, stream_s: float = 0.0,
    while_streamable: Callable[[Path], None] | None = None,
) -> tuple[dict[str, Link], DiskInfo]:
    """Links ``disk_read_direct`` (when O_DIRECT works there; with ``stream_s``, its sustained bandwidth: a stream
    of the largest transfers for that long), ``disk_read_buffered`` and ``disk_write``. ``while_streamable(path)``
    is called while the test file exists, when O_DIRECT works (``interference`` streams it)."""
    read_path, write_path = folder / TEST_FILE, folder / WRITE_FILE
    file_bytes = max(file_bytes, directio.align_up(max(sizes)))
    buf = directio.aligned_buffer(max(sizes))
    links: dict[str, Link] = {}
    order = schedule(sizes, reps)
    try:
        write_random_file(read_path, file_bytes)
        ticker.tick(f"disk: wrote a {file_bytes / 2**20:.0f} MiB test file")
        _prefault(buf)
        cursor = _Cursor(file_bytes)
        with directio.open_direct(read_path) as f:
            o_direct = f.direct
            if o_direct:
                links["disk_read_direct"] = _read_link(f, buf, cursor, order, None, ticker, "O_DIRECT read")
                if stream_s > 0:
                    sustained = sustained_read(f, buf, cursor, max(sizes), stream_s)
                    links["disk_read_direct"] = links["disk_read_direct"].model_copy(
                        update={"sustained_Bps": sustained})
                    ticker.tick(f"disk: O_DIRECT stream of {_size(max(sizes))} reads")
        if not o_direct:
            for _ in range(len(order) + (stream_s > 0)):
                ticker.tick("disk: O_DIRECT not supported here")
        with directio.open_buffered(read_path) as f:
            links["disk_read_buffered"] = _read_link(f, buf, cursor, order, str(read_path), ticker, "buffered read")
        if o_direct and while_streamable is not None:
            while_streamable(read_path)
        # the buffer now holds random file data: the source of the writes
        links["disk_write"] = _write_link(write_path, buf, order, ticker)
    finally:
        buf.close()
        for p in (read_path, write_path):
            if p.exists():
                p.unlink()
    usage = shutil.disk_usage(folder)
    info = DiskInfo(path=str(folder), filesystem=filesystem_of(folder), o_direct=o_direct, capacity_bytes=usage.total)
    return links, info


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


# ---- host <-> device copies (CUDA only) -------------------------------------------------------------------------

COPY_LINKS = ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable")


def copy_steps(sizes: tuple[int, ...]) -> int:
    return len(COPY_LINKS) * len(sizes)


def measure_copies(sizes: tuple[int, ...], reps: int, min_sample_s: float, ticker: Ticker) -> dict[str, Link]:
    """Host->device and device->host ``copy_`` from pinned and pageable host memory, timed with CUDA events."""
    import torch

    top = max(sizes)
    dev = torch.empty(top, dtype=torch.uint8, device="cuda")
    links = {}
    for name in COPY_LINKS:
        host = torch.empty(top, dtype=torch.uint8, pin_memory=name.endswith("pinned")).fill_(1)
        dst, src = (dev, host) if name.startswith("h2d") else (host, dev)

        def copy(n: int) -> Callable[[], object]:
            return lambda: dst[:n].copy_(src[:n], non_blocking=True)

        latency = sample_seconds(copy(LATENCY_BYTES), LATENCY_SAMPLES, min_sample_s, cuda=True)
        seconds = {}
        for s in sizes:
            seconds[s] = sample_seconds(copy(s), reps, min_sample_s, cuda=True)
            ticker.tick(f"{name} {_size(s)}")
        links[name] = make_link(seconds, latency)
        del host
    return links
