"""The unit of cost: one operation on one resource, as a small record of FLOPs and bytes (LLM-Viewer style).

The planner sums these per resource for its steady-state prediction; the simulator schedules the same records
with their dependencies. Time comes from ``specplan.planner.cost.op_time_s`` only.
``specplan.planner.program`` builds programs of ops and says how they are wired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from specplan.contracts.timeline import Resource

OpKind = Literal["matmul", "attention", "elementwise", "transfer"]
Phase = Literal["prefill", "decode", "draft", "verify"]

COMPUTE_RESOURCES: tuple[Resource, ...] = ("device_compute", "host_compute")
TRANSFER_RESOURCES: tuple[Resource, ...] = ("h2d", "d2h", "disk_read", "disk_write")


@dataclass(frozen=True)
class Op:
    """One operation. ``bytes`` is memory traffic for compute ops and the transfer size for links."""

    name: str
    resource: Resource
    kind: OpKind
    flops: float = 0.0
    bytes: float = 0.0
    #: activation bytes of its matmuls (``contracts.rows``): the elementwise work around them (norms, rope, the
    #: activation function, gathers, residuals), priced at the unit's ``elementwise_Bps`` after the matmul
    act_bytes: float = 0.0
    layer: int | None = None
    batch: int | None = None
    #: matmul shape (m rows, k, n) for the achieved-rate lookup; None for other kinds.
    shape: tuple[float, int, int] | None = None
    dtype: str | None = None
    #: its weights stay in the CPU kernel's blocked layout (resident, ``engine/model/blocked.py``): rated on the
    #: profile's blocked curves
    blocked: bool = False
    #: indices (in the same program, all smaller than this op's) of ops that must finish before this one starts.
    deps: tuple[int, ...] = ()
    #: a disk read that is part of a larger read the engine issues (a layer's streamed tensors read as one unit,
    #: ``engine/io/prefetch.make_unit``): the size of that read, whose rate the bytes move at; None: each of the
    #: ``calls`` is one read of ``bytes / calls``
    read_bytes: float | None = None
    #: kernel launches / reads this record stands for (each pays the per-op overhead; a transfer of ``bytes`` is
    #: ``calls`` reads of ``bytes / calls``). May be fractional for an expected count.
    calls: float = 1
    #: probability that the op happens in its pass (a routed expert is touched); expected cost = prob * time.
    prob: float = 1.0
    #: tensor group: embed, attention, kv_cache, norms_router, mlp, experts, shared_experts, lm_head, draft, activations.
    group: str | None = None
    phase: Phase | None = None
    #: staging buffer ``(pool, index)`` a weight fetch fills (pool "device" or "host"), None for other ops.
    slot: tuple[Literal["device", "host"], int] | None = None
    #: fixed costs charged on top of the roofline: ``((field of profile.overheads, count), ...)``.
    overheads: tuple[tuple[str, float], ...] = ()
    #: True for a transfer whose start waits on a compute op of the same pass (it cannot be fetched ahead).
    on_demand: bool = False
    expert: int | None = None

    @property
    def is_compute(self) -> bool:
        return self.resource in COMPUTE_RESOURCES

    @property
    def is_transfer(self) -> bool:
        return self.resource in TRANSFER_RESOURCES
