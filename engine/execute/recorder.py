"""The measured timeline: a thread-safe recorder of what ran where and when.

Compute ops arrive through the forward's tracer (``Recorder.span``), disk reads and copies from the prefetch and
expert-reader threads (``Recorder.record``). Times are ``time.perf_counter()`` seconds since ``start()``. The batch
of a compute span is the one the executor set with ``in_batch`` (per thread). ``timeline()`` returns a
``specplan.contracts.Timeline`` with ``source="measured"``, the same schema the simulator writes.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from specplan.contracts.timeline import Event, Timeline


class _Span:
    """One compute op: records its start on enter and the event on exit (a small class: this is on the hot path)."""

    __slots__ = ("rec", "resource", "name", "layer", "flops", "nbytes", "t0")

    def __init__(self, rec: "Recorder", resource: str, name: str, layer: int | None, flops: float, nbytes: float):
        self.rec, self.resource, self.name, self.layer = rec, resource, name, layer
        self.flops, self.nbytes = flops, nbytes
        self.t0 = 0.0

    def __enter__(self) -> "_Span":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.rec._add(self.resource, self.name, self.t0, time.perf_counter(), self.rec.batch, self.layer,
                      self.nbytes, self.flops)


class Recorder:
    """Collects events from any thread; also the ``Tracer`` the forward calls (``span``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[tuple] = []
        self._local = threading.local()
        self._t0: float | None = None
        self.marks: list[dict[str, Any]] = []

    # ---- time ----------------------------------------------------------------------------------------------------

    def start(self) -> float:
        """Set time zero (idempotent) and return it."""
        if self._t0 is None:
            self._t0 = time.perf_counter()
        return self._t0

    def now(self) -> float:
        """Seconds since ``start()``."""
        return time.perf_counter() - self.start()

    # ---- batch of the calling thread ------------------------------------------------------------------------------

    @property
    def batch(self) -> int | None:
        return getattr(self._local, "batch", None)

    @contextmanager
    def in_batch(self, batch: int | None) -> Iterator[None]:
        prev = self.batch
        self._local.batch = batch
        try:
            yield
        finally:
            self._local.batch = prev

    # ---- events --------------------------------------------------------------------------------------------------

    def span(self, name: str, resource: str, layer: int | None = None, flops: float = 0.0, bytes: float = 0.0) -> _Span:
        """The Tracer interface: ``with rec.span(...)``: one event from enter to exit."""
        return _Span(self, resource, name, layer, flops, bytes)

    def record(self, resource: str, name: str, start: float, end: float, *, batch: int | None = None,
               layer: int | None = None, nbytes: float = 0, flops: float = 0.0) -> None:
        """An event measured elsewhere; ``start``/``end`` are ``time.perf_counter()`` values."""
        self._add(resource, name, start, end, batch, layer, nbytes, flops)

    def _add(self, resource, name, t0, t1, batch, layer, nbytes, flops) -> None:
        base = self.start()
        row = (resource, name, t0 - base, t1 - base, batch, layer, int(nbytes), float(flops))
        with self._lock:
            self._rows.append(row)

    @contextmanager
    def phase(self, name: str, batch: int | None = None, **info: Any) -> Iterator[dict[str, Any]]:
        """Mark a phase (prefill pass, decode of a wave ...): stored in ``timeline().meta["phases"]``."""
        mark: dict[str, Any] = {"phase": name, "batch": batch, "start_s": self.now(), **info}
        try:
            yield mark
        finally:
            mark["end_s"] = self.now()
            with self._lock:
                self.marks.append(mark)

    # ---- output --------------------------------------------------------------------------------------------------

    def events(self) -> list[Event]:
        with self._lock:
            rows = sorted(self._rows, key=lambda r: (r[2], r[3]))
        return [Event(resource=r, name=n, start_s=s, end_s=max(e, s), batch=b, layer=l, bytes=nb, flops=f)
                for r, n, s, e, b, l, nb, f in rows]

    def timeline(self, meta: dict[str, Any] | None = None) -> Timeline:
        with self._lock:
            phases = sorted(self.marks, key=lambda m: m["start_s"])
        return Timeline(source="measured", meta={**(meta or {}), "phases": phases}, events=self.events())
