"""Drift: the rates a run achieved, derived from its own measured timeline, against the profile it was planned on.

A run's spans carry their bytes and FLOPs, so each figure of the profile the cost model used can be measured again
over the very events of the run, as the time the profile gives for the events' work against the time they took.
Only the decode phases count (the steady state the prediction's rounds are; prefill, with the run's first calls,
is left out):

- ``disk_read`` (and ``h2d`` on a GPU machine): bytes over the union of the link's busy time while streaming,
  against ``Link.time_s`` of each read on the link the cost model times reads on;
- ``device_compute`` / ``host_compute``: matmul FLOP/s per shape class (the profile's matmul curve the cost model
  times the op on: ``ComputeUnit.matmul_curve`` of the planner's op of the same name), against the curve's rate at
  the op's rows; decode attention KV bytes
  per second against ``decode_attention_Bps``. Ops that the profile times at under ``MIN_OP_OVERHEADS`` per-op
  overheads are left out (their time is fixed cost, not rate). On a GPU the engine does not synchronise per op,
  so a span times the kernels' launch, not the kernels: the GPU's compute figures are not derived;
- ``overheads``: per layer, the compute thread's gaps inside a forward pass (between its spans, no transfer
  running: a wait on a transfer is not overhead) over the layers the pass ran; per pass, the gaps between passes
  inside the decode phases (no compute and no transfer running) over the passes.

A figure drifted when it is off the profile's by more than ``DRIFT_THRESHOLD`` either way. The prediction is then
recomputed at the observed rates: the profile with every observed figure substituted (links scaled, matmul curves
and decode attention scaled, overheads replaced) goes through the same ``compare.prediction_for`` the run's own
prediction came from, so a user sees whether the cost model or the machine was off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from specplan.contracts.hardware import ComputeUnit, HardwareProfile, MatmulCurve
from specplan.contracts.model import dtype_bytes
from specplan.contracts.plan import Plan
from specplan.contracts.timeline import Event, Timeline, merged_busy_s
from specplan.engine.execute.results import decode_windows
from specplan.machine import here
from specplan.planner.cost import compute_dtype, compute_unit, elementwise_rate, physical_resource
from specplan.planner.predict import mean_decode_context
from specplan.planner.program import decode_round, op_times, streaming_factor
from specplan.validation.compare import AT_ACCEPTANCE, prediction_for, signed_error

#: a figure drifted when the run's differs from the profile's by more than this fraction, either way
#: (observed / profile above 1 + DRIFT_THRESHOLD or below 1 / (1 + DRIFT_THRESHOLD)).
DRIFT_THRESHOLD = 0.15
#: compute ops the profile times at under this many per-op overheads are fixed-cost dominated: left out of rates.
MIN_OP_OVERHEADS = 10
TRANSFERS = ("disk_read", "h2d")


@dataclass
class Figure:
    """One figure of the profile measured again over a run's events: the time the profile gives for their work
    (``profile_s``) against the time they took (``observed_s``)."""

    resource: str  # the timeline resource, or "overheads"
    figure: str  # the profile's figure: a link name, ``curve_figure``, "decode_attention_Bps", "per_layer_s"
    unit: str  # "Bps", "flop_per_s" (rates: work per second) or "s" (overheads: seconds per count)
    work: float = 0.0  # bytes, FLOPs, or the count of layers / passes
    observed_s: float = 0.0
    profile_s: float = 0.0
    events: int = 0
    #: of the events' time, what the cost model gives to other figures (a matmul span's elementwise work, per-op
    #: dispatch, the disk stream's slowdown): the figure itself is rated on the rest
    fixed_s: float = 0.0

    @property
    def own_s(self) -> float:
        """The observed seconds this figure's work took (``observed_s - fixed_s``, at least a tenth of it)."""
        return max(self.observed_s - self.fixed_s, 0.1 * self.observed_s)

    @property
    def speed(self) -> float:
        """How many times faster the run did this work than the profile says (the factor the profile is scaled by)."""
        return self.profile_s / self.own_s

    def observed(self) -> float:
        return self.work / self.own_s if self.unit != "s" else self.observed_s / self.work

    def profiled(self) -> float:
        return self.work / self.profile_s if self.unit != "s" else self.profile_s / self.work

    def row(self) -> dict[str, Any]:
        ratio = self.observed() / self.profiled()
        each = "s_each" if self.unit == "s" else self.unit  # seconds per count, apart from the totals observed_s ...
        return {"resource": self.resource, "figure": self.figure, f"observed_{each}": self.observed(),
                f"profile_{each}": self.profiled(), "ratio": ratio, "events": self.events, "unit": self.unit,
                "work": self.work, "observed_s": self.observed_s, "profile_s": self.profile_s,
                "fixed_s": self.fixed_s, "drifted": drifted(ratio)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Figure":
        """The figure a ``row`` (of a result.json's drift report) was written from."""
        return cls(row["resource"], row["figure"], row["unit"], row["work"], row["observed_s"], row["profile_s"],
                   row["events"], row.get("fixed_s", 0.0))


def drifted(ratio: float, threshold: float = DRIFT_THRESHOLD) -> bool:
    """Whether observed / profile is off by more than ``threshold`` either way."""
    return abs(math.log(ratio)) > math.log1p(threshold)


# ---- observed figures --------------------------------------------------------------------------------------------


def transfer_figures(profile: HardwareProfile, timeline: Timeline) -> list[Figure]:
    """Disk reads (and host->device copies): bytes over the link's busy time against ``Link.time_s`` per read."""
    out = []
    windows = decode_windows(timeline)
    for resource in TRANSFERS:
        events = [e for e in timeline.events if e.resource == resource and e.bytes > 0 and _inside(e, windows)]
        if not events or (resource == "h2d" and not profile.has_host_tier):
            continue
        if resource == "disk_read":
            link = profile.disk_read_link_name(direct=profile.disk.o_direct)
            profile_s = sum(profile.disk_read_time_s(e.bytes, direct=profile.disk.o_direct) for e in events)
        else:
            link = profile.h2d_link_name()
            profile_s = sum(profile.h2d_time_s(e.bytes) for e in events)
        busy = merged_busy_s([(e.start_s, e.end_s) for e in events])
        if busy > 0 and profile_s > 0:
            out.append(Figure(resource, link, "Bps", sum(e.bytes for e in events), busy, profile_s, len(events)))
    return out


def compute_figures(plan: Plan, timeline: Timeline, dtype: str) -> list[Figure]:
    """Matmul FLOP/s per shape class and decode attention bytes per second, per compute unit."""
    prof = plan.profile
    item = dtype_bytes(dtype)
    windows = decode_windows(timeline)
    shapes = matmul_shapes(plan)
    figs: dict[tuple[str, str], Figure] = {}

    def add(resource: str, figure: str, unit: str, work: float, e: Event, profile_s: float,
            fixed_s: float = 0.0) -> None:
        if profile_s < MIN_OP_OVERHEADS * prof.overheads.per_op_s or e.duration_s <= 0:
            return
        f = figs.setdefault((resource, figure), Figure(resource, figure, unit))
        f.work += work
        f.observed_s += e.duration_s
        f.profile_s += profile_s
        f.fixed_s += fixed_s
        f.events += 1

    for e in timeline.events:
        if e.resource not in ("device_compute", "host_compute") or not _inside(e, windows):
            continue
        resource = physical_resource(e.resource, prof)
        unit = compute_unit(resource, prof)
        if unit.kind == "cuda":  # a span times the kernels' launch, not the kernels: no rate in it
            continue
        draft = e.name.startswith("draft.")
        slow = 1.0 if draft else shapes.streaming  # the disk stream's slowdown of the target's compute
        if e.name.endswith("attention"):
            if e.bytes and unit.decode_attention_Bps is not None:
                t = unit.attention_time_s(e.bytes, 1, dtype)
                add(resource, "decode_attention_Bps", "Bps", e.bytes, e, t, (slow - 1) * t)
        elif e.flops > 0 and e.bytes > 0:
            params = e.bytes / item  # the weights the op multiplies by (its bytes are theirs): rows = flops / 2 / params
            op = shapes.ops.get(_op_key(e.name, draft))
            k, n, op_dtype, blocked = ((op.k, op.n, op.dtype, op.blocked) if op
                                       else (max(1, round(params)), 1, plan.policy.weight_dtype, False))
            curve = unit.matmul_curve(compute_dtype(unit, op_dtype), k, n, blocked)
            t = e.flops / curve.flops.at(max(1.0, e.flops / (2 * params)))
            rest = op.rest_s_per_flop(unit, prof.overheads.per_op_s) * e.flops if op else 0.0
            add(resource, curve_figure(curve), "flop_per_s", e.flops, e, t,
                rest + (slow - 1) * (t + rest))
    return list(figs.values())


@dataclass(frozen=True)
class MatmulOp:
    """What the cost model gives one matmul of a decode round besides its FLOPs: its weight shape and dtype (the
    curve it is rated on), and per FLOP its activation bytes and kernel calls (timed at other figures)."""

    k: int
    n: int
    dtype: str | None
    blocked: bool
    act_bytes_per_flop: float
    calls_per_flop: float

    def rest_s_per_flop(self, unit: ComputeUnit, per_op_s: float) -> float:
        ew = elementwise_rate(unit, self.dtype)
        return (self.act_bytes_per_flop / ew if ew is not None else 0.0) + self.calls_per_flop * per_op_s


@dataclass(frozen=True)
class RoundShapes:
    ops: dict[str, MatmulOp]  # by the op's name (``L3.E5``; ``draft``: the draft's folded matmuls)
    streaming: float  # the round's ``program.streaming_factor``


def matmul_shapes(plan: Plan) -> RoundShapes:
    """The matmuls of a decode round by the op's name (``L3.attn_proj``, ``L3.E5``, ``lm_head``: the engine names
    its spans alike; ``draft``: the draft's folded matmuls), so an event is rated on the curve the cost model times
    its op on, net of what the cost model gives to other figures."""
    ops = decode_round(plan, mean_decode_context(plan)).ops
    out: dict[str, MatmulOp] = {}
    for op in ops:
        if op.kind == "matmul" and op.shape is not None and op.flops > 0:
            out[_op_key(op.name, op.group == "draft")] = MatmulOp(
                op.shape[1], op.shape[2], op.dtype, op.blocked, op.act_bytes / op.flops, op.calls / op.flops)
    return RoundShapes(out, streaming_factor(ops, op_times(ops, plan.profile), plan.profile))


def _op_key(name: str, draft: bool) -> str:
    """The key of a matmul in ``RoundShapes.ops``: the op's name; the draft's (spans ``draft.L3.mlp``, ops
    ``draft2.matmuls``) fold into ``draft``, but for its head, ``draft.lm_head``."""
    if not draft:
        return name
    return "draft.lm_head" if name.endswith(".lm_head") else "draft"


def _inside(e: Event, windows: list[tuple[float, float]]) -> bool:
    return any(lo <= e.start_s and e.end_s <= hi for lo, hi in windows)


def _without(intervals: list[tuple[float, float]], covers: list[tuple[float, float]]) -> float:
    """Length of the union of ``intervals`` outside the union of ``covers``."""
    return merged_busy_s(intervals + covers) - merged_busy_s(covers)


def passes(timeline: Timeline) -> dict[tuple[bool, int | None], list[list[Event]]]:
    """The forward passes on the compute units, per stream (draft or target, batch): the spans from an ``embed``
    to the next ``lm_head``, in order."""
    streams: dict[tuple[bool, int | None], list[list[Event]]] = {}
    current: dict[tuple[bool, int | None], list[Event]] = {}
    for e in timeline.events:
        if e.resource not in ("device_compute", "host_compute"):
            continue
        key = (e.name.startswith("draft."), e.batch)
        name = e.name.removeprefix("draft.")
        if name == "embed":
            current[key] = [e]
        elif key in current:
            current[key].append(e)
            if name == "lm_head":
                streams.setdefault(key, []).append(current.pop(key))
    return streams


def overhead_figures(plan: Plan, timeline: Timeline) -> list[Figure]:
    """Over the passes inside the decode phases: per layer, the gaps inside the passes (no transfer running) over
    their layers; per pass, the gaps between a stream's passes (no compute, no transfer and no other stream's pass
    running: a gap inside another stream's pass is that pass's per-layer gap, counted once) over the passes."""
    oh = plan.profile.overheads
    transfers = [(e.start_s, e.end_s) for e in timeline.events if e.resource in TRANSFERS]
    compute = [(e.start_s, e.end_s) for e in timeline.events if e.resource in ("device_compute", "host_compute")]
    windows = decode_windows(timeline)
    layer = Figure("overheads", "per_layer_s", "s")
    step = Figure("overheads", "per_step_s", "s")
    between: list[tuple[float, float]] = []
    inside: list[tuple[float, float]] = []
    draft = plan.draft.spec if plan.draft.kind == "model" else None
    for (drafting, _), stream in passes(timeline).items():
        width = (draft if drafting and draft is not None else plan.model.spec).hidden_size
        stream = [p for p in stream if _inside(p[0], windows) and _inside(p[-1], windows)]
        extents = [(p[0].start_s, max(e.end_s for e in p)) for p in stream]
        spans = [(e.start_s, e.end_s) for p in stream for e in p]
        inside += extents
        layer.observed_s += _without(extents, spans + transfers)
        for p in stream:
            layers = len({e.layer for e in p if e.layer is not None})
            layer.work += layers
            layer.profile_s += layers * oh.layer_s(width)
            layer.events += 1
        between += [(a_end, b_start) for (_, a_end), (b_start, _) in zip(extents, extents[1:])
                    if any(lo <= a_end and b_start <= hi for lo, hi in windows)]
        step.work += len(stream)
        step.profile_s += len(stream) * oh.per_step_s
        step.events += len(stream)
    step.observed_s = _without(between, compute + transfers + inside)
    return [f for f in (layer, step) if f.work > 0 and f.observed_s > 0 and f.profile_s > 0]


# ---- the profile at the observed rates ---------------------------------------------------------------------------


def at_observed(profile: HardwareProfile, figures: list[Figure]) -> HardwareProfile:
    """The profile with every observed figure substituted: links and compute rates scaled by the run's speed over
    them, overheads replaced by the observed seconds."""
    links = dict(profile.links)
    units = {"device_compute": profile.device, "host_compute": profile.host}
    overheads: dict[str, float] = {}
    for f in figures:
        if f.resource in TRANSFERS:
            links[f.figure] = links[f.figure].scaled(f.speed)
        elif f.resource == "overheads":
            overheads[f.figure] = f.observed()
            if f.figure == "per_layer_s":  # observed at the run's widths: the width term is in it
                overheads["per_layer_per_width_s"] = 0.0
        else:
            units[f.resource] = _scaled_unit(units[f.resource], f.figure, f.speed)
    device = units["device_compute"]
    host = device if not profile.has_host_tier else units["host_compute"]  # one CPU: the same unit
    return profile.model_copy(update={"links": links, "device": device, "host": host,
                                      "overheads": profile.overheads.model_copy(update=overheads)})


def curve_figure(c: MatmulCurve) -> str:
    """The figure name of a matmul curve: ``matmul <dtype> <k>x<n>`` (`` blocked``: the blocked kernel's)."""
    return f"matmul {c.dtype} {c.k}x{c.n}{' blocked' if c.blocked else ''}"


def _scaled_unit(unit: ComputeUnit, figure: str, speed: float) -> ComputeUnit:
    if figure == "decode_attention_Bps":
        assert unit.decode_attention_Bps is not None
        return unit.model_copy(update={"decode_attention_Bps": unit.decode_attention_Bps.scaled(speed)})
    matmul = [c.model_copy(update={"flops": c.flops.scaled(speed)}) if figure == curve_figure(c) else c
              for c in unit.matmul]
    return unit.model_copy(update={"matmul": matmul})


# ---- the report --------------------------------------------------------------------------------------------------


def observed_figures(plan: Plan, timeline: Timeline, dtype: str) -> list[Figure]:
    return (transfer_figures(plan.profile, timeline) + compute_figures(plan, timeline, dtype)
            + overhead_figures(plan, timeline))


def drift_report(plan: Plan, out, report: dict[str, Any]) -> dict[str, Any]:
    """``result.json["drift"]``: the observed figures against the profile's, those that drifted, and the prediction
    at the observed rates next to the one at the profile (``report`` is the run's ``compare.comparison``)."""
    figures = observed_figures(plan, out.timeline, out.dtype)
    rows = [f.row() for f in figures]
    observed_plan = plan.model_copy(update={"profile": at_observed(plan.profile, figures), "prediction": None})
    meas = report["measured"]
    at, _ = prediction_for(observed_plan, out)
    result: dict[str, Any] = {
        "threshold": DRIFT_THRESHOLD,
        "figures": rows,
        "drifted": [r["figure"] for r in rows if r["drifted"]],
        "profile_warnings": plan.profile.provenance.warnings(here=here()),
        "predicted_at_profile": {k: report["predicted"][k] for k in AT_ACCEPTANCE},
        "predicted_at_observed_rates": {k: getattr(at, k) for k in AT_ACCEPTANCE},
        "signed_error_at_profile": {k: report["signed_error"][k] for k in AT_ACCEPTANCE},
        "signed_error_at_observed_rates": {k: signed_error(getattr(at, k), meas[k]) for k in AT_ACCEPTANCE},
    }
    acc = report.get("acceptance")
    if acc is not None and acc["measured"] is not None:
        both, _ = prediction_for(observed_plan, out, acc)
        result["predicted_at_observed_rates_and_measured_acceptance"] = {k: getattr(both, k) for k in AT_ACCEPTANCE}
        result["signed_error_at_observed_rates_and_measured_acceptance"] = {
            k: signed_error(getattr(both, k), meas[k]) for k in AT_ACCEPTANCE}
    return result
