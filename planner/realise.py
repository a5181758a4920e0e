"""From whole-unit counts to a plan: spread units evenly over layers, build the ``Plan``, predict it."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from specplan.contracts.model import ModelSpec
from specplan.contracts.plan import DraftSpec, LayerPlacement, ModelRef, Placement, Plan, Policy
from specplan.planner.ask import Ask, Candidate
from specplan.planner.expect import tail_ratio
from specplan.planner.kinds import draft_tiers
from specplan.planner.lp import FAMILIES, LPResult, PlacementLP
from specplan.planner.rounding import integerise
from specplan.planner.units import Knobs


def interleave(counts: list[tuple[str, int]], n: int) -> list[str]:
    """``n`` tiers with the given counts, spread evenly (so no layer gets more than its share of fetches)."""
    assigned = {t: 0 for t, _ in counts}
    out = []
    for j in range(n):
        t = max(counts, key=lambda tc: (tc[1] * (j + 1) / n - assigned[tc[0]], -counts.index(tc)))[0]
        assigned[t] += 1
        out.append(t)
    return out


def _tier_counts(counts: dict[tuple[str, str], float], unit: str) -> list[tuple[str, int]]:
    order = {"device": 0, "host": 1, "disk": 2}
    items = [(t, int(round(v))) for (u, t), v in counts.items() if u == unit and int(round(v)) > 0]
    return sorted(items, key=lambda tv: order[draft_tiers(tv[0])[0] if unit == "draft" else tv[0]])


def spread(spec: ModelSpec, counts: dict[tuple[str, str], float]) -> Placement:
    """Turn per-kind counts into a per-layer placement: whole tensors, whole experts, spread evenly."""
    L, moe = spec.num_layers, list(spec.moe_layers)
    dense = list(spec.dense_layers)
    attention = interleave(_tier_counts(counts, "attention"), L)
    kv = interleave(_tier_counts(counts, "kv"), L)
    mlp = dict(zip(dense, interleave(_tier_counts(counts, "mlp"), len(dense)))) if dense else {}
    shared = dict(zip(moe, interleave(_tier_counts(counts, "shared"), len(moe)))) if spec.shared_expert_intermediate_size else {}
    experts: dict[int, list[str]] = {i: [] for i in moe}
    if moe:
        flat = [t for t, n in _tier_counts(counts, "expert") for _ in range(n)]
        for e in range(spec.num_experts):  # deal the sorted list out column by column: every layer gets its share
            for j, i in enumerate(moe):
                experts[i].append(flat[e * len(moe) + j])
    layers = [LayerPlacement(attention=attention[i], norms_router="device", kv_cache=kv[i],  # type: ignore[arg-type]
                             mlp=mlp.get(i), experts=experts.get(i, []), shared_experts=shared.get(i))  # type: ignore[arg-type]
              for i in range(L)]
    embed = _tier_counts(counts, "embed")[0][0]
    head = _tier_counts(counts, "lm_head")[0][0]
    draft_weights, draft_kv = draft_tiers((_tier_counts(counts, "draft") or [("device/device", 1)])[0][0])
    return Placement(embed=embed, lm_head=head, final_norm="device", layers=layers,  # type: ignore[arg-type]
                     draft_weights=draft_weights, draft_kv=draft_kv)


def knobs_of(base: Knobs, modes: dict[str, tuple[str, ...]]) -> Knobs:
    """The policy of a pure placement (families it does not use keep the defaults)."""
    fields = {}
    for fam, names in FAMILIES.items():
        if len(modes.get(fam, ())) == 1:
            fields.update(zip(names, modes[fam][0]))
    return replace(base, **fields)


def make_plan(ask: Ask, cand: Candidate, k: Knobs, placement: Placement, search_info: dict,
              predicted: bool = True) -> Plan:
    from specplan.planner.predict import predict

    w, kv = ask.weight_dtype, ask.kv_dtype
    s = cand.shape
    policy = Policy(prefill_batch=s.prefill_batch, decode_batch=s.decode_batch, num_batches=s.num_batches,
                    draft_len=s.draft_len, attention_on=k.attention_on, experts_on=k.experts_on,  # type: ignore[arg-type]
                    expert_fetch=k.expert_fetch, prefetch_depth=k.prefetch_depth,  # type: ignore[arg-type]
                    **cand.draft.policy_curves(s.draft_len), weight_dtype=w, kv_dtype=kv)
    plan = Plan(created_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), command=ask.command,
                model=ModelRef(name=ask.model_name, path=ask.model_path, spec=ask.spec),
                draft=cand.draft.spec if s.draft_len else DraftSpec(),
                profile=ask.profile, capacities=ask.capacities, workload=ask.workload, policy=policy,
                placement=placement, search=search_info)
    if not predicted:
        return plan
    pred = predict(plan)
    notes = []
    if s.draft_len:
        notes.append(f"acceptance {cand.draft.acceptance:g} for {cand.draft.label}: {cand.draft.source}")
        curve = cand.draft.curve
        if curve and s.draft_len > len(curve):
            notes.append(f"draft length {s.draft_len} is past the measured curve (i <= {len(curve)}): P(n >= i) for "
                         f"i > {len(curve)} extended by the geometric model fitted to its tail (ratio "
                         f"{tail_ratio(curve):.3f} per position)")
        if cand.draft.sequence_curves:
            notes.append(f"a batch runs until its slowest sequence is done: each of its sequences is drawn as one of "
                         f"the {len(cand.draft.sequence_curves)} calibration sequences, with that sequence's own "
                         f"curve (tokens per round {min(1 + sum(c) for c in cand.draft.sequence_curves):.2f}.."
                         f"{max(1 + sum(c) for c in cand.draft.sequence_curves):.2f} at i <= {len(curve or ())})")
    notes.append(f"weights in {w}, KV cache in {kv}; decode round costed at a KV length of {pred.decode_context_len}")
    return plan.model_copy(update={"prediction": pred.model_copy(update={"assumptions": notes})})


def realise(ask: Ask, cand: Candidate, lp: PlacementLP, sol: LPResult) -> Plan | None:
    """Spread the whole-unit counts over layers and predict the plan; should the exact per-layer memory overflow
    (it does not when ``lp`` charged the rounded-up staging share), tighten the budget and solve again."""
    from specplan.planner.memory import overflow

    k = knobs_of(lp.base, lp.modes)
    caps = dict(lp.caps)
    for _ in range(8):
        relaxed = lp.relax()
        info = {"lp_objective_s": sol.objective_s, "lp_round_s": sol.round_s, "lp_prefill_pass_s": sol.prefill_s,
                "placement_counts": {f"{u}@{t}": round(v) for (u, t), v in sorted(sol.counts.items()) if round(v)}}
        if relaxed is not None:
            info["relaxed_objective_s"] = relaxed.objective_s
            info["relaxed_counts"] = {f"{u}@{t}": v for (u, t), v in sorted(relaxed.counts.items()) if v > 1e-9}
        placement = spread(ask.spec, sol.counts)
        plan = make_plan(ask, cand, k, placement, info, predicted=False)
        over = overflow(plan)
        if not over:
            return make_plan(ask, cand, k, placement, info)
        for tier, (_, need, cap) in over.items():  # the rounding's extra staging did not fit: ask for less
            caps[tier] = (caps[tier] or cap) - (need - cap) - 2**24
        lp = PlacementLP(lp.c, lp.base, lp.shape, caps, lp.modes, lp.cache)
        relaxed = lp.relax()
        sol = integerise(lp, relaxed) if relaxed is not None else None  # type: ignore[assignment]
        if sol is None:
            return None
    return None


def same_plan(a: Plan, b: Plan) -> bool:
    """Plans that differ only in a policy choice that changes nothing (e.g. where attention runs when the
    binding resource is elsewhere and the round time comes out the same)."""
    pa, pb = a.prediction, b.prediction
    return (a.placement == b.placement and a.draft == b.draft and pa is not None and pb is not None
            and abs(pa.total_s - pb.total_s) <= 1e-9 * pa.total_s
            and a.policy.model_copy(update={"attention_on": "device", "experts_on": "device", "expert_fetch": "routed"})
            == b.policy.model_copy(update={"attention_on": "device", "experts_on": "device", "expert_fetch": "routed"}))
