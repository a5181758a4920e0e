"""Why the chosen plan wins: what binds its round, and what more memory or a faster resource would buy.

The what-ifs re-run the whole search on a changed ask (one more GiB of device memory; the binding resource twice
as fast), so they report the best plan under the change, not the same plan re-timed.
"""

from __future__ import annotations

from dataclasses import replace

from specplan.contracts.hardware import ComputeUnit, Curve, HardwareProfile, Link, Point, Stat
from specplan.contracts.plan import Plan
from specplan.errors import InfeasibleError
from specplan.fmt import GiB

#: the profile links behind each transfer resource
LINKS_OF = {"h2d": ("h2d_pinned", "h2d_pageable"), "d2h": ("d2h_pinned", "d2h_pageable"),
            "disk_read": ("disk_read_direct", "disk_read_buffered"), "disk_write": ("disk_write",)}


def _scaled_curve(curve: Curve, factor: float) -> Curve:
    pts = [Point(x=p.x, y=Stat(min=p.y.min * factor, median=p.y.median * factor, max=p.y.max * factor))
           for p in curve.points]
    return curve.model_copy(update={"points": pts})


def _faster_unit(unit: ComputeUnit, factor: float) -> ComputeUnit:
    bw = unit.memory_bandwidth_Bps
    return unit.model_copy(update={
        "matmul": [m.model_copy(update={"flops": _scaled_curve(m.flops, factor)}) for m in unit.matmul],
        "memory_bandwidth_Bps": Stat(min=bw.min * factor, median=bw.median * factor, max=bw.max * factor),
        "decode_attention_Bps": _scaled_curve(unit.decode_attention_Bps, factor) if unit.decode_attention_Bps else None,
    })


def faster(profile: HardwareProfile, resource: str, factor: float = 2.0) -> HardwareProfile:
    """The profile with one resource ``factor`` times faster (a link's bandwidth, or a compute unit's rates)."""
    if resource == "device_compute":
        return profile.model_copy(update={"device": _faster_unit(profile.device, factor)})
    if resource == "host_compute":
        return profile.model_copy(update={"host": _faster_unit(profile.host, factor)})
    links = dict(profile.links)
    for name in LINKS_OF.get(resource, ()):
        if name in links:
            link: Link = links[name]
            sustained = link.sustained_Bps
            if sustained is not None:
                sustained = Stat(min=sustained.min * factor, median=sustained.median * factor,
                                 max=sustained.max * factor)
            links[name] = link.model_copy(update={"bandwidth_Bps": _scaled_curve(link.bandwidth_Bps, factor),
                                                  "sustained_Bps": sustained})
    return profile.model_copy(update={"links": links})


def _best(ask) -> Plan | None:
    from specplan.planner.search import search

    try:
        return search(replace(ask, top=1)).plans[0]
    except InfeasibleError:
        return None


def _gain(base: Plan, other: Plan | None) -> str:
    if other is None or other.prediction is None:
        return "no plan fits"
    b, o = base.prediction.e2e_tok_s, other.prediction.e2e_tok_s  # type: ignore[union-attr]
    return f"{o:.2f} tok/s end-to-end ({(o - b) / b * 100:+.1f}%)"


def binding_resource(plan: Plan) -> str:
    """The physical resource with the most busy time in a round (the bound may be a chain of several)."""
    busy = plan.prediction.round_busy_s  # type: ignore[union-attr]
    return max(sorted(busy), key=lambda r: busy[r])


def explain(ask, plan: Plan) -> list[str]:
    pred = plan.prediction
    assert pred is not None
    lines = []
    r = pred.round_s
    busy = ", ".join(f"{k} {v / r * 100:.0f}%" for k, v in sorted(pred.round_busy_s.items(), key=lambda kv: -kv[1])
                     if v / r >= 0.005)
    lines.append(f"a decode round takes {r:.3f} s and commits {pred.tokens_per_round:.1f} tokens "
                 f"({pred.tokens_per_seq_round:.2f} per sequence); what binds it: {pred.bottleneck}")
    lines.append(f"busy share of the round per resource: {busy}")
    if pred.round_chain_s and pred.round_chain_s >= 0.9 * r:
        lines.append(f"one batch's serial chain (compute that cannot overlap + on-demand transfers) is "
                     f"{pred.round_chain_s:.3f} s of it: more interleaved batches or prefetchable fetches help")
    lines.append(f"prefill: {pred.prefill_s:.1f} s of {pred.total_s:.1f} s in total "
                 f"({pred.prefill_s / pred.total_s * 100:.0f}%), {pred.prefill_pass_s:.3f} s per pass of "
                 f"{plan.policy.prefill_batch} prompts")
    drafts = [d for d in ask.drafts if d.spec.kind != "none"]
    if not plan.policy.speculative and drafts:
        lines.append(f"with speculation ({', '.join(d.label for d in drafts)}) the best plan makes "
                     f"{_gain(plan, _best(replace(ask, drafts=tuple(drafts))))}")
    if plan.policy.speculative:
        others = [d for d in ask.drafts if d.label != plan.draft.label]
        plain = [d for d in others if d.spec.kind == "none"]
        if plain:
            lines.append(f"without speculation the best plan makes {_gain(plan, _best(replace(ask, drafts=tuple(plain))))}")
        rest = [d for d in others if d.spec.kind != "none"]
        if rest:
            lines.append(f"with another draft ({', '.join(d.label for d in rest)}): "
                         f"{_gain(plan, _best(replace(ask, drafts=tuple(rest))))}")
    more = _best(replace(ask, capacities=ask.capacities.model_copy(
        update={"device_bytes": ask.capacities.device_bytes + GiB})))
    lines.append(f"one more GiB of device memory: {_gain(plan, more)}")
    if ask.profile.has_host_tier:
        host = ask.capacities.capacity_bytes("host", ask.profile)
        more_host = _best(replace(ask, capacities=ask.capacities.model_copy(update={"host_bytes": host + 8 * GiB})))
        lines.append(f"8 more GiB of host memory: {_gain(plan, more_host)}")
    res = binding_resource(plan)
    quicker = _best(replace(ask, profile=faster(ask.profile, res)))
    lines.append(f"{res} twice as fast: {_gain(plan, quicker)}")
    if ask.profile.has_host_tier and res != "h2d" and "h2d" in pred.round_busy_s:
        lines.append(f"a host->device link twice as fast: {_gain(plan, _best(replace(ask, profile=faster(ask.profile, 'h2d'))))}")
    return lines
