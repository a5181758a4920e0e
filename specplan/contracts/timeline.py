"""Timeline: what ran where and when. The simulator and the engine both write it, in the same schema."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, model_validator

from specplan.contracts.strict import Strict

SCHEMA_VERSION = 1

#: the resources of the machine model; every event names one.
Resource = Literal["device_compute", "host_compute", "h2d", "d2h", "disk_read", "disk_write"]
RESOURCES: tuple[Resource, ...] = get_args(Resource)


class Event(Strict):
    resource: str
    name: str
    start_s: float
    end_s: float
    batch: int | None = None
    layer: int | None = None
    bytes: int = Field(0, ge=0)
    flops: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Event":
        if self.end_s < self.start_s:
            raise ValueError(f"event '{self.name}' ends ({self.end_s}) before it starts ({self.start_s})")
        return self

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def physical_resource(resource: str, shared_memory: bool) -> str:
    """The resource that really does the work: with shared memory (no GPU), host compute is the device (one CPU)."""
    if shared_memory and resource == "host_compute":
        return "device_compute"
    return resource


def merged_busy_s(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of intervals (overlapping work on one resource counts once)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


class Timeline(Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    source: Literal["simulated", "measured"]
    #: free-form numbers and labels about the run (plan name, tokens generated, ...); units in key names.
    meta: dict[str, Any] = {}
    events: list[Event] = []

    @property
    def span_s(self) -> float:
        if not self.events:
            return 0.0
        return max(e.end_s for e in self.events) - min(e.start_s for e in self.events)

    def resources(self) -> list[str]:
        seen = {e.resource for e in self.events}
        known = [r for r in RESOURCES if r in seen]
        return known + sorted(seen - set(known))

    def busy_s(self, resource: str, start_s: float | None = None, end_s: float | None = None) -> float:
        """Busy time of one resource, optionally within a window."""
        lo = -float("inf") if start_s is None else start_s
        hi = float("inf") if end_s is None else end_s
        iv = [(max(e.start_s, lo), min(e.end_s, hi)) for e in self.events if e.resource == resource]
        return merged_busy_s([(s, e) for s, e in iv if e > s])

    def utilisation(self, start_s: float | None = None, end_s: float | None = None) -> dict[str, float]:
        """Busy fraction of each resource over the window (default: the whole span)."""
        if not self.events:
            return {}
        lo = min(e.start_s for e in self.events) if start_s is None else start_s
        hi = max(e.end_s for e in self.events) if end_s is None else end_s
        width = hi - lo
        if width <= 0:
            return {r: 0.0 for r in self.resources()}
        return {r: self.busy_s(r, lo, hi) / width for r in self.resources()}

    def to_chrome_trace(self) -> dict[str, Any]:
        """Chrome / Perfetto trace-event JSON: one thread per resource, times in microseconds."""
        tids = {r: i + 1 for i, r in enumerate(self.resources())}
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": f"specplan ({self.source})"}}
        ]
        for r, tid in tids.items():
            events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": r}})
        for e in self.events:
            args: dict[str, Any] = {"bytes": e.bytes, "flops": e.flops}
            if e.batch is not None:
                args["batch"] = e.batch
            if e.layer is not None:
                args["layer"] = e.layer
            events.append(
                {
                    "name": e.name,
                    "cat": e.resource,
                    "ph": "X",
                    "pid": 1,
                    "tid": tids[e.resource],
                    "ts": e.start_s * 1e6,
                    "dur": (e.end_s - e.start_s) * 1e6,
                    "args": args,
                }
            )
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"source": self.source, **self.meta}}
