"""The unit of cost: one operation on one resource, as a small record of FLOPs and bytes (LLM-Viewer style).

The planner sums these per resource for its steady-state prediction; the simulator schedules the same records
with their dependencies. Time comes from ``specplan.planner.cost.op_time_s`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OpKind = Literal["matmul", "attention", "elementwise", "transfer"]


@dataclass(frozen=True)
class Op:
    """One operation. ``bytes`` is memory traffic for compute ops and the transfer size for links."""

    name: str
    resource: str  # one of specplan.contracts.RESOURCES
    kind: OpKind
    flops: float = 0.0
    bytes: float = 0.0
    layer: int | None = None
    batch: int | None = None
    #: matmul shape (m rows, k, n) for the achieved-rate lookup; None for other kinds.
    shape: tuple[int, int, int] | None = None
    dtype: str | None = None
    #: indices (in the same program) of ops that must finish before this one starts.
    deps: tuple[int, ...] = ()
    #: number of kernel launches / framework calls this record stands for (each pays the per-op overhead).
    calls: int = 1
