"""Predicted vs measured: the numbers ``specplan run`` prints and writes to ``result.json``.

The engine measures (``engine.execute.results``); here the planner predicts the workload that really ran and the
two are compared. The signed error is ``(predicted - measured) / measured``.
"""

from __future__ import annotations

from typing import Any

from specplan.contracts.plan import Headroom, Plan, Prediction
from specplan.engine.execute.results import measured, measured_workload
from specplan.planner.expect import expected_tokens_per_seq
from specplan.planner.predict import predict

#: the predicted numbers that a measured run has too
COMPARED = ("decode_tok_s", "e2e_tok_s", "ttft_s", "prefill_s", "decode_s", "total_s")
#: the numbers compared again at the measured draft acceptance
AT_ACCEPTANCE = ("decode_tok_s", "e2e_tok_s")


def prediction_for(plan: Plan, out, acceptance: float | None = None) -> tuple[Prediction, str]:
    """The planner's numbers for the workload that ran: the plan's own when it matches, else recomputed;
    with ``acceptance``, recomputed at that draft acceptance (e.g. the measured one) instead of the plan's."""
    wl = measured_workload(out)
    if plan.prediction is not None and wl == plan.workload and acceptance is None:
        return plan.prediction, "plan"
    update: dict[str, Any] = {"workload": wl, "prediction": None}
    if acceptance is not None:
        update["policy"] = plan.policy.model_copy(update={"acceptance": acceptance})
    return predict(plan.model_copy(update=update)), "planner (for the measured workload)"


def simulated_for(plan: Plan, out, seed: int = 0):
    """The simulator's ``Simulation`` of the plan on the workload that ran (seeded draws)."""
    from specplan.simulator import simulate

    return simulate(plan.model_copy(update={"workload": measured_workload(out), "prediction": None}), seed=seed)


def acceptance_report(plan: Plan, out) -> dict[str, Any] | None:
    """Speculative runs: the assumed and the measured per-token acceptance, and tokens per verification."""
    if not plan.policy.speculative:
        return None
    acc, g = out.stats.acceptance, plan.policy.draft_len
    return {"assumed": plan.policy.acceptance, "measured": acc.per_token, "draft_len": g,
            "proposed_tokens": acc.proposed, "accepted_tokens": acc.accepted, "sequence_rounds": acc.rounds,
            "tokens_per_seq_round_measured": acc.tokens_per_round,
            "tokens_per_seq_round_expected": expected_tokens_per_seq(plan.policy.acceptance, g),
            "tokens_per_seq_round_expected_at_measured": (expected_tokens_per_seq(acc.per_token, g)
                                                          if acc.per_token is not None else None),
            "accepted_histogram": {str(n): c for n, c in sorted(acc.histogram.items())}}


def signed_error(pred: float | None, meas: float | None) -> float | None:
    """``(pred - meas) / meas``; None when either is missing or the measurement is zero."""
    if pred is None or not meas:
        return None
    return (pred - meas) / meas


def resident_check(plan: Plan, need: dict[str, dict[str, int]], peak_rss_bytes: int) -> dict[str, Any]:
    """The process's peak resident set against the plan's bytes in RAM (the host tier's need, and the device's too
    on a machine without a GPU) plus the headroom's process part: what the plan promises the run stays within."""
    head = plan.capacities.headroom or Headroom.of(plan.profile)
    ram = sum(need.get("host", {}).values()) + (0 if plan.profile.has_host_tier else sum(need.get("device", {}).values()))
    limit = ram + head.process_bytes
    return {"peak_rss_bytes": peak_rss_bytes, "plan_ram_bytes": ram, "headroom_process_bytes": head.process_bytes,
            "headroom_source": head.source, "limit_bytes": limit, "within_limit": peak_rss_bytes <= limit}


def comparison(plan: Plan, out) -> dict[str, Any]:
    """The result.json body: workload, predicted, measured, signed errors, memory."""
    pred, source = prediction_for(plan, out)
    meas = measured(plan, out)
    m = out.timeline.meta
    err: dict[str, Any] = {k: signed_error(getattr(pred, k), meas[k]) for k in COMPARED}
    err["busy_s"] = {r: signed_error(pred.busy_s.get(r), meas["busy_s"].get(r))
                     for r in sorted(set(pred.busy_s) | set(meas["busy_s"]))}
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
        "predicted": {**{k: getattr(pred, k) for k in COMPARED}, "busy_s": dict(pred.busy_s),
                      "bottleneck": pred.bottleneck, "peak_bytes": dict(pred.peak_bytes)},
        "signed_error": err,
        "need_bytes": out.need_bytes,
        "peak_bytes": {t: sum(items.values()) for t, items in out.peak_bytes.items()},
        "peak_bytes_by_item": out.peak_bytes,
        "capacity_bytes": {"device": plan.capacities.device_bytes, "host": plan.capacities.host_bytes},
        "max_rss_bytes": out.max_rss_bytes,
        "resident": resident_check(plan, out.need_bytes, out.max_rss_bytes),
        "wait_s": out.wait_s,
        "wall_s": out.wall_s,
    }
    acc = acceptance_report(plan, out)
    if acc is not None:
        result["acceptance"] = acc
        if acc["measured"] is not None:
            at, _ = prediction_for(plan, out, acc["measured"])
            result["predicted_at_measured_acceptance"] = {k: getattr(at, k) for k in AT_ACCEPTANCE}
            result["signed_error_at_measured_acceptance"] = {
                k: signed_error(getattr(at, k), meas[k]) for k in AT_ACCEPTANCE}
    return result
