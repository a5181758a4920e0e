"""Predicted vs measured: the numbers ``specplan run`` prints and writes to ``result.json``.

Measured throughput counts only committed tokens (never past each sequence's limit). Decode-only: tokens of the
decode passes over the time of the decode passes (each sequence's first token comes from its prefill, as in the
planner). End-to-end: every generated token over the executor's wall time (prefill, decode and bookkeeping).
Busy time per resource is the union of the timeline's events on it, by physical resource
(``planner.cost.physical_resource``: without a GPU, host compute is the device), as the planner counts it.
The signed error is ``(predicted - measured) / measured``.
"""

from __future__ import annotations

from typing import Any

from specplan.contracts.plan import Plan, Prediction, Workload


def measured_workload(plan: Plan, out) -> Workload:
    """The workload the run really had: mean real prompt length, tokens per sequence, prompts."""
    m = out.timeline.meta
    return Workload(prompt_len=max(1, round(m["prompt_len_mean"])), gen_len=m["gen_len"], num_prompts=m["num_prompts"])


def prediction_for(plan: Plan, out, acceptance: float | None = None) -> tuple[Prediction | None, str]:
    """The planner's numbers for the workload that ran: the plan's own when it matches, else recomputed;
    with ``acceptance``, recomputed at that draft acceptance (e.g. the measured one) instead of the plan's."""
    wl = measured_workload(plan, out)
    if plan.prediction is not None and wl == plan.workload and acceptance is None:
        return plan.prediction, "plan"
    try:
        from specplan.planner.predict import predict
    except ImportError:  # pragma: no cover - the planner ships with the package
        return plan.prediction, "plan (workload differs)"
    update = {"workload": wl, "prediction": None}
    if acceptance is not None:
        update["policy"] = plan.policy.model_copy(update={"acceptance": acceptance})
    return predict(plan.model_copy(update=update)), "planner (for the measured workload)"


def acceptance_report(plan: Plan, out) -> dict[str, Any] | None:
    """Speculative runs: the assumed and the measured per-token acceptance, and tokens per verification."""
    if not plan.policy.speculative:
        return None
    from specplan.planner.expect import expected_tokens_per_seq

    acc, g = out.stats.acceptance, plan.policy.draft_len
    return {"assumed": plan.policy.acceptance, "measured": acc.per_token, "draft_len": g,
            "proposed_tokens": acc.proposed, "accepted_tokens": acc.accepted, "sequence_rounds": acc.rounds,
            "tokens_per_seq_round_measured": acc.tokens_per_round,
            "tokens_per_seq_round_expected": expected_tokens_per_seq(plan.policy.acceptance, g),
            "tokens_per_seq_round_expected_at_measured": (expected_tokens_per_seq(acc.per_token, g)
                                                          if acc.per_token is not None else None),
            "accepted_histogram": {str(n): c for n, c in sorted(acc.histogram.items())}}


def busy_by_physical_resource(plan: Plan, timeline, start_s: float | None = None, end_s: float | None = None
                              ) -> dict[str, float]:
    from specplan.contracts.timeline import merged_busy_s
    from specplan.planner.cost import physical_resource

    lo = -float("inf") if start_s is None else start_s
    hi = float("inf") if end_s is None else end_s
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in timeline.events:
        s, t = max(e.start_s, lo), min(e.end_s, hi)
        if t > s:
            spans.setdefault(physical_resource(e.resource, plan.profile), []).append((s, t))
    return {r: merged_busy_s(iv) for r, iv in sorted(spans.items())}


def decode_windows(timeline) -> list[tuple[float, float]]:
    return [(m["start_s"], m["end_s"]) for m in timeline.meta.get("phases", []) if m["phase"] == "decode"]


def decode_busy_fraction(plan: Plan, timeline) -> dict[str, float]:
    """Busy fraction of each physical resource over the decode phases."""
    total: dict[str, float] = {}
    width = 0.0
    for lo, hi in decode_windows(timeline):
        width += hi - lo
        for r, b in busy_by_physical_resource(plan, timeline, lo, hi).items():
            total[r] = total.get(r, 0.0) + b
    return {r: b / width for r, b in total.items()} if width > 0 else {}


def measured(plan: Plan, out) -> dict[str, Any]:
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


def signed_error(pred: float | None, meas: float | None) -> float | None:
    if pred is None or not meas:
        return None
    return (pred - meas) / meas


def comparison(plan: Plan, out) -> dict[str, Any]:
    """The result.json body: workload, predicted, measured, signed errors, memory."""
    pred, source = prediction_for(plan, out)
    meas = measured(plan, out)
    m = out.timeline.meta
    result: dict[str, Any] = {
        "model": plan.model.name,
        "profile": plan.profile.name,
        "workload": {"num_prompts": m["num_prompts"], "gen_len": m["gen_len"],
                     "prompt_len_mean": m["prompt_len_mean"], "prompt_len_min": m["prompt_len_min"],
                     "prompt_len_max": m["prompt_len_max"], "planned_prompt_len": plan.workload.prompt_len,
                     "planned_gen_len": plan.workload.gen_len, "planned_num_prompts": plan.workload.num_prompts},
        "policy": plan.policy.model_dump(mode="json"),
        "compute_dtype": out.dtype,
        "o_direct": out.direct_io,
        "measured": meas,
        "prediction_source": source,
        "predicted": None,
        "signed_error": {},
        "need_bytes": out.need_bytes,
        "peak_bytes": {t: sum(items.values()) for t, items in out.peak_bytes.items()},
        "peak_bytes_by_item": out.peak_bytes,
        "capacity_bytes": {"device": plan.capacities.device_bytes, "host": plan.capacities.host_bytes},
        "max_rss_bytes": out.max_rss_bytes,
        "wait_s": out.wait_s,
        "wall_s": out.wall_s,
    }
    if pred is not None:
        keys = ("decode_tok_s", "e2e_tok_s", "ttft_s", "prefill_s", "decode_s", "total_s")
        result["predicted"] = {**{k: getattr(pred, k) for k in keys}, "busy_s": dict(pred.busy_s),
                               "bottleneck": pred.bottleneck, "peak_bytes": dict(pred.peak_bytes)}
        err = {k: signed_error(getattr(pred, k), meas[k]) for k in keys}
        err["busy_s"] = {r: signed_error(pred.busy_s.get(r), meas["busy_s"].get(r))
                         for r in sorted(set(pred.busy_s) | set(meas["busy_s"]))}
        result["signed_error"] = err
    acc = acceptance_report(plan, out)
    if acc is not None:
        result["acceptance"] = acc
        if acc["measured"] is not None:
            at, _ = prediction_for(plan, out, acc["measured"])
            result["predicted_at_measured_acceptance"] = {k: getattr(at, k) for k in ("decode_tok_s", "e2e_tok_s")}
            result["signed_error_at_measured_acceptance"] = {
                k: signed_error(getattr(at, k), meas[k]) for k in ("decode_tok_s", "e2e_tok_s")}
    return result
