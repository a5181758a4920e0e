"""The memory budget: what a run will hold on each tier, checked against the plan's capacities before anything is
allocated, and what it held (reported after the run).

Per tier: resident weights at the compute dtype (from the checkpoint's shapes), the KV caches of one wave (every
interleaved batch, ``decode_batch`` rows of ``capacity`` positions, per layer on its tier), the draft model's
weights and KV caches (on their plan tiers) or a substitute draft's copies (on the device), the staging buffers
(prefetch ring + routed-expert pool, on the device), and activations (one pass's working memory). KV and activation
bytes come from ``specplan.contracts.memory``, the same functions the planner calls.
"""

from __future__ import annotations

from specplan.contracts.memory import activation_bytes as pass_activation_bytes
from specplan.contracts.memory import kv_bytes
from specplan.contracts.plan import Plan
from specplan.engine.io.store import StoreLayout
from specplan.errors import InfeasibleError
from specplan.fmt import human_bytes

TIERS = ("device", "host")


def kv_bytes_by_tier(plan: Plan, capacity: int, dtype_name: str) -> dict[str, int]:
    """KV caches of one wave: ``num_batches`` caches of ``decode_batch`` rows, each layer on its plan tier."""
    pol = plan.policy
    per_layer = kv_bytes(plan.model.spec, dtype_name, pol.num_batches * pol.decode_batch, capacity, layers=1)
    out = {t: 0 for t in TIERS}
    for lp in plan.placement.layers:
        out["device" if lp.kv_cache == "device" else "host"] += per_layer
    return out


def activation_bytes(plan: Plan, dtype_name: str, prompt_len: int, capacity: int) -> int:
    """Working memory of the larger of a prefill pass (logits of each prompt's last token) and a one-token decode
    pass over ``capacity`` positions."""
    spec, pol = plan.model.spec, plan.policy
    seqs = min(pol.prefill_batch, pol.decode_batch)
    prefill = pass_activation_bytes(spec, dtype_name, seqs, prompt_len, 0, seqs)
    decode = pass_activation_bytes(spec, dtype_name, pol.decode_batch, 1, capacity, pol.decode_batch)
    return int(max(prefill, decode))


def draft_kv_bytes(plan: Plan, capacity: int, dtype_name: str) -> int:
    """The draft's KV caches of one wave (every interleaved batch), all layers."""
    pol = plan.policy
    return kv_bytes(plan.draft.spec, dtype_name, pol.num_batches * pol.decode_batch, capacity)


def required_bytes(plan: Plan, layout: StoreLayout, capacity: int, prompt_len: int, dtype_name: str,
                   draft_weight_bytes: int = 0, substitute_bytes: int = 0) -> dict[str, dict[str, int]]:
    """tier -> item -> bytes the run will allocate (``capacity``: KV positions per sequence, draft_len included;
    ``dtype_name``: the compute dtype, e.g. "float32"; ``substitute_bytes``: a substitute draft's copies, on the
    device, ``execute.substitute.substitute_bytes``; it shares the target's KV cache)."""
    weights = layout.weight_bytes()
    kv = kv_bytes_by_tier(plan, capacity, dtype_name)
    need = {t: {"weights": weights[t], "kv_cache": kv[t]} for t in TIERS}
    if plan.policy.speculative and plan.draft.kind == "model":
        pl = plan.placement
        need[pl.draft_weights]["draft_weights"] = draft_weight_bytes
        need[pl.draft_kv]["draft_kv"] = draft_kv_bytes(plan, capacity, dtype_name)
    if plan.policy.speculative and plan.draft.kind == "substitute":
        need["device"]["substitute"] = substitute_bytes
    need["device"]["staging"] = layout.staging_bytes()
    need["device"]["activations"] = activation_bytes(plan, dtype_name, prompt_len, capacity)
    return need


def check_budget(plan: Plan, need: dict[str, dict[str, int]], available_bytes: int | None = None) -> None:
    """``InfeasibleError`` (one line) if a tier's need exceeds the plan's capacity, or all of it this machine's RAM."""
    caps = {t: plan.capacities.capacity_bytes(t, plan.profile) for t in TIERS}
    for tier in TIERS:
        total = sum(need[tier].values())
        cap = caps[tier]
        if cap is not None and total > cap:
            parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in need[tier].items() if v)
            raise InfeasibleError(
                f"the plan needs {human_bytes(total)} on the {tier} tier ({parts}) but its capacity is "
                f"{human_bytes(cap)} ({human_bytes(total - cap)} too much); re-plan with more {tier} memory, a smaller "
                f"batch, or more weights on disk")
    total = sum(sum(items.values()) for items in need.values())
    if available_bytes is not None and total > available_bytes:
        raise InfeasibleError(f"the plan needs {human_bytes(total)} of memory but this machine has "
                              f"{human_bytes(available_bytes)} available; re-plan with a smaller --vram/--ram")


def available_memory_bytes() -> int | None:
    """MemAvailable of this machine (Linux), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
