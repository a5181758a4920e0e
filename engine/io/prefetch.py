"""Staging buffers and the threads that fill them from the offload file.

- ``FetchUnit``: what one fetch brings in — aligned reads of the offload file (and, on a GPU, host-tier tensors to
  copy) — and where each tensor lands in the staging buffer.
- ``Prefetcher``: one thread reads the units of a pass schedule, in order and cyclically (pass after pass), into
  ``depth + 1`` staging buffers: compute holds one, the thread runs up to ``depth`` units ahead and blocks when no
  buffer is free. Compute takes units in the same order (``acquire``) and gives the buffer back (``release``).
- ``ExpertReader``: on-demand reads of routed experts (known only after the router) on a second thread, into a pool
  of expert buffers, so the read of the next expert overlaps the compute of the previous one. When the thread was
  idle, ``submit`` waits (at most ``START_WAIT_S``) until it has begun the read: on a CPU whose
  cores all compute, a woken reader otherwise waits 1-3 ms for a core, the disk idle meanwhile (the demo's no-draft
  plan on this 2-core machine: half its layers' first reads started that late, 0.45 s of a 4.3 s decode; waiting
  for the start, under 1%, and the plan decoded 11% faster).

Every read is recorded as a ``disk_read`` event (payload bytes: the tensors' bytes, not the alignment padding);
on a GPU every staging copy as an ``h2d`` event. CPU (shared memory): staging buffers are page-aligned anonymous
mmaps that O_DIRECT reads land in and the forward uses in place. CUDA: reads land in a pinned host buffer and one
copy on a side stream moves the unit to a device buffer; compute waits on the copy's event.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from specplan.engine.io.directio import ALIGN, DirectFile, align_down, align_up, aligned_buffer
from specplan.engine.io.offload import Entry

#: reads of neighbouring tensors are merged when the gap between them is at most this (read through the gap).
MAX_GAP_BYTES = 64 * 1024


@dataclass(frozen=True)
class Read:
    """One aligned read of the offload file into the staging buffer at ``pos``."""

    offset: int
    nbytes: int
    pos: int
    payload: int  # tensor bytes inside the read (what the event records)


@dataclass(frozen=True)
class Slot:
    """Where one tensor lands in the staging buffer."""

    pos: int
    nbytes: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FetchUnit:
    key: str  # "embed", "L3", "head", "L3.E5"
    name: str  # event name
    layer: int | None
    reads: tuple[Read, ...]
    tensors: dict[str, Slot]  # canonical name -> slot (disk tensors)
    copies: tuple[tuple[str, Slot], ...] = ()  # GPU only: host-tier tensors copied into the staging buffer
    nbytes: int = 0  # staging bytes the unit needs

    @property
    def payload(self) -> int:
        return sum(r.payload for r in self.reads)


def make_unit(key: str, name: str, layer: int | None, disk: dict[str, Entry], file_bytes: int,
              host: dict[str, tuple[int, ...]] | None = None, item_bytes: int = 4) -> FetchUnit:
    """Plan the reads of the ``disk`` tensors (merged where they are close in the file) and the placement of the
    host tensors (GPU) in one staging buffer."""
    order = sorted(disk, key=lambda n: disk[n].offset)
    runs: list[list[str]] = []
    for n in order:
        if runs and disk[n].offset - _end(disk, runs[-1]) <= MAX_GAP_BYTES:
            runs[-1].append(n)
        else:
            runs.append([n])
    reads, slots, pos = [], {}, 0
    for run in runs:
        start = align_down(disk[run[0]].offset)
        stop = min(align_up(_end(disk, run)), align_up(file_bytes))
        reads.append(Read(start, stop - start, pos, sum(disk[n].nbytes for n in run)))
        for n in run:
            slots[n] = Slot(pos + disk[n].offset - start, disk[n].nbytes, disk[n].shape)
        pos += align_up(stop - start)
    copies = []
    for n, shape in sorted((host or {}).items()):
        nbytes = int(torch.Size(shape).numel()) * item_bytes
        copies.append((n, Slot(pos, nbytes, shape)))
        pos += align_up(nbytes)
    return FetchUnit(key, name, layer, tuple(reads), slots, tuple(copies), pos)


def _end(disk: dict[str, Entry], run: list[str]) -> int:
    return max(disk[n].offset + disk[n].nbytes for n in run)


# ---- staging buffers ---------------------------------------------------------------------------------------------


@dataclass
class Staging:
    """One staging buffer: ``host`` receives the reads (page-aligned), ``data`` is what compute uses (the same
    memory on a CPU; a device buffer on CUDA)."""

    nbytes: int
    host_map: object  # the mmap the O_DIRECT reads land in
    host: torch.Tensor  # uint8 view of host_map
    data: torch.Tensor  # uint8, on the compute device
    stream: object = None  # CUDA copy stream
    event: object = None  # CUDA event: the unit's copy has landed
    views: dict[str, torch.Tensor] = field(default_factory=dict)

    def close(self) -> None:
        self.views.clear()
        self.host = self.data = torch.empty(0, dtype=torch.uint8)
        try:
            self.host_map.close()  # type: ignore[attr-defined]
        except BufferError:
            pass  # a tensor still views it; the memory goes when the tensor does


def allocate_staging(nbytes: int, device: torch.device) -> Staging:
    """A page-aligned buffer for O_DIRECT reads (pinned for the copy engine on CUDA) and its compute-side twin."""
    nbytes = max(ALIGN, align_up(nbytes))
    mm = aligned_buffer(nbytes)
    host = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes)
    if device.type != "cuda":
        return Staging(nbytes, mm, host, host)
    torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0)  # pin the mmap in place
    return Staging(nbytes, mm, host, torch.empty(nbytes, dtype=torch.uint8, device=device),
                   torch.cuda.Stream(device), torch.cuda.Event())


def fill(buf: Staging, unit: FetchUnit, file: DirectFile | None, dtype: torch.dtype, host_tensors, recorder,
         batch: int | None = None) -> dict[str, torch.Tensor]:
    """Read ``unit`` into ``buf`` (recording each read) and return its tensors, viewed in the buffer."""
    for r in unit.reads:
        assert file is not None
        t0 = time.perf_counter()
        file.read_into(memoryview(buf.host_map)[r.pos: r.pos + r.nbytes], r.offset, r.nbytes)  # type: ignore[arg-type]
        recorder.record("disk_read", unit.name, t0, time.perf_counter(), batch=batch, layer=unit.layer,
                        nbytes=r.payload)
    if buf.stream is not None:
        _copy_to_device(buf, unit, host_tensors, recorder, batch)
    views = {n: _view(buf.data, s, dtype) for n, s in (*unit.tensors.items(), *unit.copies)}
    buf.views = views
    return views


def _view(data: torch.Tensor, s: Slot, dtype: torch.dtype) -> torch.Tensor:
    return data[s.pos: s.pos + s.nbytes].view(dtype).view(s.shape)


def _copy_to_device(buf: Staging, unit: FetchUnit, host_tensors, recorder, batch) -> None:
    """CUDA: one copy of the read bytes and the host-tier tensors on the side stream; the event marks the end."""
    t0 = time.perf_counter()
    with torch.cuda.stream(buf.stream):
        end = max((r.pos + r.nbytes for r in unit.reads), default=0)
        if end:
            buf.data[:end].copy_(buf.host[:end], non_blocking=True)
        for n, s in unit.copies:
            buf.data[s.pos: s.pos + s.nbytes].copy_(host_tensors[n].reshape(-1).view(torch.uint8), non_blocking=True)
        buf.event.record(buf.stream)  # type: ignore[union-attr]
    buf.event.synchronize()  # type: ignore[union-attr]  # this thread waits; compute waits on the event too
    recorder.record("h2d", unit.name, t0, time.perf_counter(), batch=batch, layer=unit.layer, nbytes=unit.nbytes)


def wait_ready(buf: Staging) -> None:
    """Make the compute stream wait for the unit's copy (no-op on a CPU)."""
    if buf.event is not None:
        torch.cuda.current_stream().wait_event(buf.event)  # type: ignore[arg-type]


# ---- the prefetch thread -----------------------------------------------------------------------------------------


class PrefetchError(RuntimeError):
    pass


class Prefetcher:
    """Reads ``schedule`` cyclically into a ring of staging buffers, ``len(buffers) - 1`` units ahead of compute."""

    def __init__(self, schedule: list[FetchUnit], buffers: list[Staging], file: DirectFile | None,
                 dtype: torch.dtype, host_tensors, recorder):
        self.schedule, self.buffers, self.file = schedule, buffers, file
        self.dtype, self.host_tensors, self.recorder = dtype, host_tensors, recorder
        self._free: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.wait_s = 0.0  # time compute spent blocked on a unit that had not arrived

    def start(self) -> None:
        for i in range(len(self.buffers)):
            self._free.put(i)
        self._thread = threading.Thread(target=self._run, name="specplan-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        k = 0
        while True:
            slot = self._free.get()
            if slot is None:
                return
            unit = self.schedule[k % len(self.schedule)]
            k += 1
            try:
                views = fill(self.buffers[slot], unit, self.file, self.dtype, self.host_tensors, self.recorder)
            except BaseException as e:  # handed to the compute thread, which raises it
                self._ready.put((None, e))
                return
            self._ready.put((unit, (slot, views)))

    def acquire(self, key: str) -> tuple[int, dict[str, torch.Tensor]]:
        """Block until unit ``key`` (the next one of the schedule) is in its buffer: (buffer index, tensors)."""
        t0 = time.perf_counter()
        unit, got = self._ready.get()
        self.wait_s += time.perf_counter() - t0
        if unit is None:
            raise PrefetchError(f"prefetch thread failed: {got}") from got
        if unit.key != key:
            raise PrefetchError(f"the forward asked for {key} but the prefetch schedule holds {unit.key} next")
        wait_ready(self.buffers[got[0]])
        return got

    def release(self, slot: int) -> None:
        self.buffers[slot].views.clear()
        self._free.put(slot)

    def close(self) -> None:
        if self._thread is not None:
            self._free.put(None)
            self._thread.join()
            self._thread = None


#: the longest ``ExpertReader.submit`` waits for an idle reader to begin the read it was given.
START_WAIT_S = 0.005


class ExpertReader:
    """On-demand reads of routed experts on their own thread, into a pool of expert buffers."""

    def __init__(self, buffers: list[Staging], file: DirectFile | None, dtype: torch.dtype, host_tensors, recorder):
        self.buffers, self.file, self.dtype = buffers, file, dtype
        self.host_tensors, self.recorder = host_tensors, recorder
        self._free: list[int] = []
        self._pool: ThreadPoolExecutor | None = None
        self._queued = 0  # reads submitted and not yet finished
        self._lock = threading.Lock()
        self.wait_s = 0.0

    def start(self) -> None:
        self._free = list(range(len(self.buffers)))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specplan-experts")

    def submit(self, unit: FetchUnit, batch: int | None) -> tuple[int, Future]:
        """Start reading ``unit``; returns (buffer index, future of its tensors). When the thread had nothing to do,
        returns once it has begun (at most ``START_WAIT_S``): blocking frees this core for it."""
        if not self._free or self._pool is None:
            raise PrefetchError("no free expert buffer: experts of the previous layer were not released")
        slot = self._free.pop()
        with self._lock:
            idle = self._queued == 0
            self._queued += 1
        started = threading.Event() if idle else None
        fut = self._pool.submit(self._read, started, self.buffers[slot], unit, batch)
        if started is not None:
            started.wait(START_WAIT_S)
        return slot, fut

    def _read(self, started: threading.Event | None, buf: Staging, unit: FetchUnit, batch: int | None):
        if started is not None:
            started.set()
        try:
            return fill(buf, unit, self.file, self.dtype, self.host_tensors, self.recorder, batch)
        finally:
            with self._lock:
                self._queued -= 1

    def wait(self, slot: int, fut: Future) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        views = fut.result()
        self.wait_s += time.perf_counter() - t0
        wait_ready(self.buffers[slot])
        return views

    def release(self, slot: int, fut: Future) -> None:
        fut.result()  # never hand a buffer back while a read is still landing in it
        self.buffers[slot].views.clear()
        self._free.append(slot)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
