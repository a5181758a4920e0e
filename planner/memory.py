"""Bytes a plan holds on each tier: weights, KV caches, the draft, the substitute copy, staging buffers and
activations, for the prefill phase and the decode phase (the peak is the larger).

The LP (``lp.py``) uses the same per-unit functions, so a plan the search accepts is one this check accepts.
"""

from __future__ import annotations

from specplan.contracts.memory import activation_bytes as pass_activation_bytes
from specplan.contracts.memory import kv_capacity, last_decode_context
from specplan.contracts.plan import TIERS, Plan
from specplan.planner.kinds import POOLS, draft_tiers
from specplan.planner.units import Costing, Pass, unit_ops

PHASES = ("prefill", "decode")


def unit_weight_bytes(c: Costing, unit: str) -> float:
    """Bytes one unit of weights occupies on its tier (the draft: all of the draft model)."""
    if unit == "draft":
        return c.draft_bytes
    if unit == "lm_head" and c.spec.tie_word_embeddings:
        return 0.0  # the head is the embedding
    return c.sizes.get(unit, 0.0) if unit != "kv" else 0.0


def unit_bytes(c: Costing, unit: str, tier: str, seqs: int, capacity: int) -> dict[str, float]:
    """Resident bytes per tier of one unit at ``tier`` (a ``kinds.DraftTier`` for the draft), without the
    substitute copy (``substitute_bytes``)."""
    if unit == "draft":
        w_tier, kv_tier = draft_tiers(tier)
        out = {w_tier: c.draft_bytes}
        out[kv_tier] = out.get(kv_tier, 0.0) + c.draft_kv_bytes(seqs, capacity)
        return out
    if unit == "kv":
        return {tier: c.kv_layer_bytes(seqs, capacity)}  # allocated up front
    return {tier: unit_weight_bytes(c, unit)}


def substitute_bytes(c: Costing, unit: str, tier: str) -> float:
    """Device bytes of the copy a substitute draft keeps of a weight unit the target fetches (``Costing.quantised``;
    the embedding at full size; a tied head gets its own copy: the draft computes logits on the device)."""
    if not c.substitute_bits or not c.substituted(tier) or unit in ("kv", "draft"):
        return 0.0
    return c.sizes["embed"] if unit == "embed" else c.quantised(unit)


def activation_bytes(c: Costing, p: Pass) -> float:
    """Working memory of pass ``p`` (``specplan.contracts.memory.activation_bytes``); the draft model's only in
    decode."""
    draft = c.draft_spec if p.phase != "prefill" else None
    return pass_activation_bytes(c.spec, c.weight_dtype, p.seqs, p.tokens, p.context, p.logit_rows, draft)


def staging_bytes(plan: Plan, p: Pass) -> dict[str, float]:
    """Staging buffers per pool for pass ``p``: ``depth + 1`` slots, each as large as the biggest set of tensors
    fetched for one layer (or for the head) — sized for every routed expert being touched."""
    from specplan.planner.program import costing_of, knobs_of

    c, k = costing_of(plan), knobs_of(plan)
    memo: dict[tuple[str, str], dict[str, float]] = {}

    def fetched(unit: str, tier: str | None) -> dict[str, float]:
        if tier is None:
            return {}
        if (unit, tier) not in memo:
            out: dict[str, float] = {}
            for op in unit_ops(c, k, p, unit, tier):
                if op.slot is not None:
                    out[op.slot[0]] = out.get(op.slot[0], 0.0) + op.bytes
            memo[(unit, tier)] = out
        return memo[(unit, tier)]

    positions = []
    for lp in plan.placement.layers:
        units = [("attention", lp.attention), ("kv", lp.kv_cache), ("mlp", lp.mlp), ("shared", lp.shared_experts)]
        units += [("expert", t) for t in lp.experts]
        positions.append([fetched(u, t) for u, t in units])
    positions.append([fetched("lm_head", plan.placement.lm_head)])
    out: dict[str, float] = {}
    for pos in positions:
        for pool in POOLS:
            out[pool] = max(out.get(pool, 0.0), sum(f.get(pool, 0.0) for f in pos))
    return {pool: (k.prefetch_depth + 1) * v for pool, v in out.items() if v}


def phase_passes(plan: Plan) -> dict[str, Pass]:
    """The pass whose working set each phase's peak is: a full prefill pass, a verification at the last context."""
    pol, wl = plan.policy, plan.workload
    return {"prefill": Pass("prefill", pol.prefill_batch, wl.prompt_len, 0),
            "decode": Pass("verify", pol.decode_batch, pol.draft_len + 1,
                           last_decode_context(wl.prompt_len, wl.gen_len))}


def tier_bytes(plan: Plan) -> dict[str, dict[str, dict[str, int]]]:
    """phase -> tier -> item -> bytes."""
    from specplan.planner.program import costing_of, unit_counts_of

    c = costing_of(plan)
    pol, wl, pl = plan.policy, plan.workload, plan.placement
    seqs = pol.num_batches * pol.decode_batch
    capacity = kv_capacity(wl.prompt_len, wl.gen_len, pol.draft_len)
    resident: dict[str, dict[str, float]] = {t: {} for t in TIERS}

    def add(item: str, by_tier: dict[str, float]) -> None:
        for tier, nbytes in by_tier.items():
            resident[tier][item] = resident[tier].get(item, 0.0) + nbytes

    def add_unit(item: str, unit: str, tier: str) -> None:
        add(item, unit_bytes(c, unit, tier, seqs, capacity))
        add("substitute", {"device": substitute_bytes(c, unit, tier)})

    spec = plan.model.spec
    add_unit("embed", "embed", pl.embed)
    add_unit("lm_head", "lm_head", pl.lm_head)
    def add_norms(tier: str, nbytes: float) -> None:
        add("norms_router", {tier: nbytes})
        if c.substitute_bits and c.substituted(tier):  # the substitute keeps a full-size copy of streamed norms
            add("substitute", {"device": nbytes})

    add_norms(pl.final_norm, c.sizes["final_norm"])
    for i, lp in enumerate(pl.layers):
        add_norms(lp.norms_router, c.sizes["router_norms" if spec.is_moe_layer(i) else "norms"])
    items = {"attention": "attention", "kv": "kv_cache", "mlp": "mlp", "shared": "shared_experts", "expert": "experts"}
    for (unit, tier), n in unit_counts_of(plan).items():
        add(items[unit], {t: n * b for t, b in unit_bytes(c, unit, tier, seqs, capacity).items()})
        add("substitute", {"device": n * substitute_bytes(c, unit, tier)})
    if plan.draft.kind == "model":
        w_tier, kv_tier = pl.draft_weights, pl.draft_kv
        add("draft_weights", {w_tier: c.draft_bytes})
        add("draft_kv", {kv_tier: c.draft_kv_bytes(seqs, capacity)})
    out: dict[str, dict[str, dict[str, int]]] = {}
    passes = phase_passes(plan)
    for phase in PHASES:
        tiers = {t: {item: int(round(v)) for item, v in items.items() if v} for t, items in resident.items()}
        for pool, nbytes in staging_bytes(plan, passes[phase]).items():
            tiers[pool]["staging"] = int(round(nbytes))
        act = activation_bytes(c, passes[phase]) * (pol.num_batches if phase == "decode" else 1)
        tiers["device"]["activations"] = int(round(act))
        out[phase] = tiers
    return out


def peak_bytes(plan: Plan) -> dict[str, int]:
    """tier -> the larger of the two phases' totals."""
    phases = tier_bytes(plan)
    return {t: max(sum(phases[ph][t].values()) for ph in PHASES) for t in TIERS}


def capacity_of(plan: Plan, tier: str) -> int | None:
    """A tier's budget (``Capacities.capacity_bytes``)."""
    return plan.capacities.capacity_bytes(tier, plan.profile)


def overflow(plan: Plan) -> dict[str, tuple[str, int, int]]:
    """tier -> (phase, bytes needed, capacity) for every tier whose peak exceeds its capacity."""
    phases = tier_bytes(plan)
    out = {}
    for t in TIERS:
        cap = capacity_of(plan, t)
        if cap is None:
            continue
        phase = max(PHASES, key=lambda ph: sum(phases[ph][t].values()))
        need = sum(phases[phase][t].values())
        if need > cap:
            out[t] = (phase, need, cap)
    return out
