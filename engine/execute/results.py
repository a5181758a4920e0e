"""What a run measured: the workload that ran, tokens, throughput, times and busy time from its own timeline.

Measured throughput counts only committed tokens (never past each sequence's limit). Decode-only: tokens of the
decode passes over the time of the decode passes (each sequence's first token comes from its prefill). End-to-end:
every generated token over the executor's wall time (prefill, decode and bookkeeping). Busy time per resource is
the union of the timeline's events on it, by physical resource (``contracts.timeline.physical_resource``: without a
GPU, host compute is the device). Comparing these numbers with a prediction is ``specplan.validation``'s job.
"""

from __future__ import annotations

from typing import Any

from specplan.contracts.plan import Plan, Sampling, Workload
from specplan.contracts.timeline import Timeline, merged_busy_s, physical_resource


def measured_workload(out) -> Workload:
    """The workload the run really had: mean real prompt length, tokens per sequence, prompts."""
    return workload_of(out.timeline.meta)


def workload_of(meta: dict, sampling: Sampling = Sampling()) -> Workload:
    """The workload a run's timeline meta (or its result.json's ``workload``) records, decoded as ``sampling``."""
    return Workload(prompt_len=max(1, round(meta["prompt_len_mean"])), gen_len=meta["gen_len"],
                    num_prompts=meta["num_prompts"], sampling=sampling)


def busy_by_physical_resource(plan: Plan, timeline: Timeline, start_s: float | None = None,
                              end_s: float | None = None) -> dict[str, float]:
    lo = -float("inf") if start_s is None else start_s
    hi = float("inf") if end_s is None else end_s
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in timeline.events:
        s, t = max(e.start_s, lo), min(e.end_s, hi)
        if t > s:
            spans.setdefault(physical_resource(e.resource, not plan.profile.has_host_tier), []).append((s, t))
    return {r: merged_busy_s(iv) for r, iv in sorted(spans.items())}


def decode_windows(timeline: Timeline) -> list[tuple[float, float]]:
    return [(m["start_s"], m["end_s"]) for m in timeline.meta.get("phases", []) if m["phase"] == "decode"]


def decode_busy_fraction(plan: Plan, timeline: Timeline) -> dict[str, float]:
    """Busy fraction of each physical resource over the decode phases."""
    total: dict[str, float] = {}
    width = 0.0
    for lo, hi in decode_windows(timeline):
        width += hi - lo
        for r, b in busy_by_physical_resource(plan, timeline, lo, hi).items():
            total[r] = total.get(r, 0.0) + b
    return {r: b / width for r, b in total.items()} if width > 0 else {}


def measured(plan: Plan, out) -> dict[str, Any]:
    """Throughput, times, busy time per physical resource and token counts of one run (``RunOutput``)."""
    st, seqs = out.stats, out.seqs
    tokens = sum(len(s.generated) for s in seqs)
    return {
        "decode_tok_s": st.decode_tokens / st.decode_s if st.decode_s > 0 else 0.0,
        "e2e_tok_s": tokens / out.wall_s if out.wall_s > 0 else 0.0,
        "ttft_s": st.ttft_s or 0.0,
        "prefill_s": st.prefill_s,
        "decode_s": st.decode_s,
        "total_s": out.wall_s,
        "busy_s": busy_by_physical_resource(plan, out.timeline),
        "decode_busy_fraction": decode_busy_fraction(plan, out.timeline),
        "generated_tokens": tokens,
        "decode_tokens": st.decode_tokens,
        "prefill_passes": st.prefill_passes,
        "decode_passes": st.decode_passes,
    }


#: the resources a forward's compute spans run on (reads and copies carry the names of what they move)
COMPUTE = ("device_compute", "host_compute")


def decode_routing(plan: Plan, timeline: Timeline) -> dict[str, Any] | None:
    """MoE targets: the routing the decode passes measured, from the timeline's spans: per target MoE layer pass
    (a ``L<i>.router`` compute span inside a decode phase, draft spans aside) its routed rows (the router's FLOPs over
    its parameters) and the distinct experts it ran (the ``L<i>.E<e>`` compute spans: one per distinct expert and
    pass; the reads of the same name are not counted).
    None for a dense target or a run without decode passes."""
    spec = plan.model.spec
    if not spec.is_moe:
        return None
    windows = decode_windows(timeline)
    rows, touched = [], 0
    for e in timeline.events:
        if (e.layer is None or e.resource not in COMPUTE or e.name.startswith("draft.")
                or not any(lo <= e.start_s < hi for lo, hi in windows)):
            continue
        if e.name == f"L{e.layer}.router":
            rows.append(round(e.flops / (2 * spec.tensors.matmul_params("norms_router", e.layer))))
        elif e.name.startswith(f"L{e.layer}.E"):
            touched += 1
    if not rows:
        return None
    return {"layer_passes": len(rows), "routed_rows": rows, "distinct_experts": touched,
            "distinct_experts_per_layer_pass": touched / len(rows)}
