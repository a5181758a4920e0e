"""Per-unit cost vectors of the placement LP: the linear pieces of ``program.steady_state`` for the ops one unit
(or the placement-independent rest) costs in some passes, summed into one vector with named fields.

A vector is a numpy array so that the LP stacks one per option into a matrix; ``LAYOUT`` names its fields.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from specplan.contracts.timeline import RESOURCES
from specplan.planner.cost import physical_resource
from specplan.planner.kinds import POOLS, UnitKind, UnitTier
from specplan.planner.ops import Op
from specplan.planner.program import is_serial, op_times
from specplan.planner.units import Costing, Knobs, Pass, draft_model_ops, fixed_layer_ops, unit_ops

#: the physical resources, in the order of the per-resource fields.
RES = RESOURCES


class LAYOUT:
    """Where each field of a cost vector sits (a named index map)."""

    busy = slice(0, 6)  # seconds each resource (``RES``) is busy, all ops
    compute = 6  # serial compute seconds (the batch's chain)
    draft = 7  # drafting compute seconds
    serial = slice(8, 14)  # transfer seconds the chain waits for, per resource
    prefetchable = slice(14, 20)  # transfer seconds that can run ahead, per resource
    fetched = slice(20, 22)  # bytes fetched into staging, per pool (``POOLS``)
    size = 22


def acc_of(ops: list[Op], c: Costing, depth: int) -> np.ndarray:
    """The cost vector of some ops of one batch."""
    v = np.zeros(LAYOUT.size)
    busy, serial, pre, fetched = (v[LAYOUT.busy], v[LAYOUT.serial], v[LAYOUT.prefetchable], v[LAYOUT.fetched])
    prof = c.profile
    for op, t in zip(ops, op_times(ops, prof)):
        r = RES.index(physical_resource(op.resource, prof))
        busy[r] += t
        if op.is_compute:
            if is_serial(op, depth):
                v[LAYOUT.compute] += t
            if op.phase == "draft":
                v[LAYOUT.draft] += t
        else:
            (serial if is_serial(op, depth) else pre)[r] += t
        if op.slot is not None:
            fetched[POOLS.index(op.slot[0])] += op.bytes  # type: ignore[arg-type]
    return v


def unit_op_list(c: Costing, k: Knobs, p: Pass, unit: UnitKind | None, tier: UnitTier | None) -> list[Op]:
    """The ops of one unit at a tier in pass ``p``; ``unit=None``: what every pass pays whatever the placement."""
    if unit is None:
        return fixed_layer_ops(c, p, len(c.spec.moe_layers))
    if unit == "draft":
        return draft_model_ops(c, p, tier) if p.phase in ("draft", "prefill") else []  # type: ignore[arg-type]
    if p.phase == "draft" and not p.substitute:
        return []  # a draft model's steps do not touch the target
    return unit_ops(c, k, p, unit, tier)  # type: ignore[arg-type]


class AccCache:
    """Per-unit cost vectors, shared by every candidate of a search (keyed by what changes them)."""

    def __init__(self) -> None:
        self.accs: dict[tuple, np.ndarray] = {}
        self.knobs: dict[tuple, Knobs] = {}

    def get(self, c: Costing, k: Knobs, passes: tuple[Pass, ...], unit: UnitKind | None, tier: UnitTier | None,
            tag: tuple) -> np.ndarray:
        """Sum over ``passes`` of one unit's cost vector; ``tag`` identifies the passes (cheap to hash)."""
        own = unit == "draft" or bool(c.substitute_bits and tag[0] == "round")  # depends on the draft too
        key = (id(c) if own else c.weight_dtype, k.attention_on, k.experts_on, k.expert_fetch, k.prefetch_depth,
               tag, unit, tier)
        acc = self.accs.get(key)
        if acc is None:
            acc = np.zeros(LAYOUT.size)
            for p in passes:
                acc += acc_of(unit_op_list(c, k, p, unit, tier), c, k.prefetch_depth)
            self.accs[key] = acc
        return acc

    def knob(self, base: Knobs, fields: tuple[str, ...], mode: tuple[str, ...]) -> Knobs:
        """``base`` with the Knobs ``fields`` of a family set to ``mode``."""
        key = (base, fields, mode)
        k = self.knobs.get(key)
        if k is None:
            k = self.knobs[key] = replace(base, **dict(zip(fields, mode))) if fields else base
        return k
