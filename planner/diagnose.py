"""Why an ask cannot fit: the smallest configuration the search could try, and what it still needs per tier."""

from __future__ import annotations

from datetime import datetime, timezone

from specplan.contracts.plan import DraftSpec, LayerPlacement, ModelRef, Placement, Plan, Policy, Workload
from specplan.fmt import human_bytes
from specplan.planner.memory import PHASES, capacity_of, tier_bytes

LABELS = {"staging": "staging buffers for {slots} layer fetch(es)", "activations": "activations",
          "draft_weights": "the draft's weights", "draft_kv": "the draft's KV cache", "kv_cache": "the KV cache",
          "substitute": "the substitute's quantised copy", "norms_router": "norms and routers"}


def smallest_plan(ask, draft) -> Plan:
    """Batch 1, everything on the lowest tier the profile has (disk for weights, host RAM for KV on a GPU)."""
    spec, shared = ask.spec, not ask.profile.has_host_tier
    low_kv = "device" if shared else "host"
    layers = [LayerPlacement(attention="disk", norms_router="device", kv_cache=low_kv,
                             mlp=None if spec.is_moe_layer(i) else "disk",
                             experts=["disk"] * spec.num_experts if spec.is_moe_layer(i) else [],
                             shared_experts="disk" if spec.is_moe_layer(i) and spec.shared_expert_intermediate_size else None)
              for i in range(spec.num_layers)]
    embed = "device" if shared else "host"
    head = embed if spec.tie_word_embeddings else "disk"
    d = draft.spec
    low_draft = "device" if shared else "host"
    placement = Placement(embed=embed, lm_head=head, final_norm="device", layers=layers,
                          draft_weights=low_draft, draft_kv=low_draft)
    w, kv = ask.weight_dtype, ask.kv_dtype
    g = 1 if d.kind != "none" else 0
    policy = Policy(prefill_batch=1, decode_batch=1, num_batches=1, draft_len=g, prefetch_depth=ask.prefetch_depth,
                    **draft.policy_curves(g), weight_dtype=w, kv_dtype=kv,
                    expert_fetch="routed", attention_on="device" if shared else "host",
                    experts_on="device" if shared or not spec.is_moe else "host")
    return Plan(created_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                model=ModelRef(name=ask.model_name, spec=spec), draft=d if g else DraftSpec(), profile=ask.profile,
                capacities=ask.capacities, workload=Workload(prompt_len=ask.workload.prompt_len,
                                                             gen_len=ask.workload.gen_len, num_prompts=1),
                policy=policy, placement=placement)


def shortfall(plan: Plan, slots: int) -> list[str]:
    """One phrase per tier that overflows: its biggest items, the need, the capacity, the gap."""
    phases = tier_bytes(plan)
    out = []
    for tier in ("device", "host", "disk"):
        cap = capacity_of(plan, tier)
        if cap is None:
            continue
        phase = max(PHASES, key=lambda ph: sum(phases[ph][tier].values()))
        items = phases[phase][tier]
        need = sum(items.values())
        if need <= cap:
            continue
        parts = sorted(items.items(), key=lambda kv: -kv[1])[:4]
        what = " + ".join(f"{LABELS.get(k, k).format(slots=slots)} {human_bytes(v)}" for k, v in parts)
        name = {"device": "the device budget (--vram)", "host": "host memory (--ram)", "disk": "the disk (--disk)"}[tier]
        out.append(f"{what} need {human_bytes(need)} during {phase}, more than {name} of {human_bytes(cap)}, "
                   f"short by {human_bytes(need - cap)}")
    return out


def why_infeasible(ask) -> str:
    """The message of the InfeasibleError: what does not fit, and by how much."""
    slots = ask.prefetch_depth + 1
    reasons = []
    for draft in sorted(ask.drafts, key=lambda d: d.spec.kind != "none"):
        problems = shortfall(smallest_plan(ask, draft), slots)
        if problems:
            reasons.append(f"with draft {draft.label}: " + "; ".join(problems))
        if draft.spec.kind == "none":
            break
    if not reasons:
        reasons.append("no combination fits the capacities after rounding to whole tensors; try more --vram")
    return (f"{ask.model_name} does not fit even at batch 1 with every weight on the lowest tier: "
            + " | ".join(reasons))
