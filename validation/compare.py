"""Predicted vs measured: the numbers ``specplan run`` prints and writes to ``result.json``.

The engine measures (``engine.execute.results``); here the planner predicts the workload that really ran and the
two are compared. The signed error is ``(predicted - measured) / measured``.
"""

from __future__ import annotations

from typing import Any

from specplan.contracts.plan import Headroom, Plan, Prediction, Workload
from specplan.engine.execute.results import decode_routing, measured, measured_workload
from specplan.planner.expect import expected_distinct_experts, expected_tokens_per_seq, survival
from specplan.planner.predict import predict

#: the predicted numbers that a measured run has too
COMPARED = ("decode_tok_s", "e2e_tok_s", "ttft_s", "prefill_s", "decode_s", "total_s")
#: the numbers the cost model's error compares (the prediction at the measured acceptance and routing)
AT_ACCEPTANCE = ("decode_tok_s", "e2e_tok_s")
#: how result.json and the printed report mark a synthetic-acceptance run
SYNTHETIC_NOTE = ("benchmark mode, NOT lossless: each proposal accepted with probability {a:g} by a seeded generator "
                  "(--synthetic-acceptance), not by the target; the output is not the target's")


def prediction_for(plan: Plan, out, measured: dict[str, Any] | None = None) -> tuple[Prediction, str]:
    """The planner's numbers for the workload that ran: the plan's own when it matches, else recomputed;
    with ``measured`` (an ``acceptance_report``), recomputed at the acceptance the run measured (its per-token
    ``a``, its curve ``P(n >= i)`` and each sequence's own curve) instead of the plan's."""
    wl = measured_workload(out)
    if plan.prediction is not None and wl == plan.workload and measured is None:
        return plan.prediction, "plan"
    update: dict[str, Any] = {"workload": wl, "prediction": None}
    if measured is not None:
        update["policy"] = plan.policy.model_copy(update={
            "acceptance": measured["measured"], "acceptance_curve": measured["measured_curve"],
            "acceptance_sequence_curves": measured.get("measured_sequence_curves")})
    return predict(plan.model_copy(update=update)), "planner (for the measured workload)"


def simulated_for(plan: Plan, out, seed: int = 0):
    """The simulator's ``Simulation`` of the plan on the workload that ran (seeded draws)."""
    return simulated_at(plan, measured_workload(out), seed)


def simulated_at(plan: Plan, workload: Workload, seed: int = 0):
    """The simulator's ``Simulation`` of the plan on ``workload`` (seeded draws)."""
    from specplan.simulator import simulate

    return simulate(plan.model_copy(update={"workload": workload, "prediction": None}), seed=seed)


def acceptance_report(plan: Plan, out) -> dict[str, Any] | None:
    """Speculative runs: the assumed and the measured acceptance (per-token ``a`` and the per-position curve
    ``P(n >= i)``), and tokens per sequence and verification, expected (the planner's) and measured."""
    if not plan.policy.speculative:
        return None
    acc, pol = out.stats.acceptance, plan.policy
    g = pol.draft_len
    report = {"assumed": pol.acceptance, "measured": acc.per_token, "draft_len": g,
              "assumed_model": ("measured curves per sequence" if pol.acceptance_sequence_curves else
                                "measured curve" if pol.acceptance_curve else "one-parameter a^i"),
              "assumed_curve": survival(pol.acceptance, g, pol.acceptance_curve), "measured_curve": acc.survival,
              "assumed_sequence_curves": pol.acceptance_sequence_curves,
              "measured_sequence_curves": acc.sequence_survival or None,
              "proposed_tokens": acc.proposed, "accepted_tokens": acc.accepted, "sequence_rounds": acc.rounds,
              "tokens_per_seq_round_measured": acc.tokens_per_round,
              "tokens_per_seq_round_expected": expected_tokens_per_seq(pol.acceptance, g, pol.acceptance_curve),
              "tokens_per_seq_round_expected_at_measured": (expected_tokens_per_seq(acc.per_token, g)
                                                            if acc.per_token is not None else None),
              "accepted_histogram": {str(n): c for n, c in sorted(acc.histogram.items())}}
    synthetic = out.timeline.meta.get("synthetic_acceptance")
    if synthetic is not None:
        report["synthetic_acceptance"] = synthetic
    return report


def routing_report(plan: Plan, out) -> dict[str, Any] | None:
    """MoE targets: distinct experts per target layer pass in decode, measured (``decode_routing``) and expected
    under uniform routing for the same routed rows (``expected_distinct_experts``)."""
    r = decode_routing(plan, out.timeline)
    if r is None:
        return None
    spec = plan.model.spec
    expected = sum(expected_distinct_experts(spec.num_experts, spec.experts_per_token, n)
                   for n in r["routed_rows"]) / r["layer_passes"]
    measured_ = r["distinct_experts_per_layer_pass"]
    return {"layer_passes": r["layer_passes"], "routed_rows_mean": sum(r["routed_rows"]) / r["layer_passes"],
            "distinct_experts_per_layer_pass_measured": measured_,
            "distinct_experts_per_layer_pass_expected": expected, "signed_error": signed_error(expected, measured_)}


def errors(plan: Plan, out, pred: Prediction, meas: dict[str, Any], acc: dict[str, Any] | None,
           routing: dict[str, Any] | None) -> dict[str, Any]:
    """The two errors apart. The cost model's: the prediction recomputed at the measured acceptance (the run's own
    curve ``P(n >= i)``, so its expected tokens per round are the measured ones) against the measured throughput,
    with the routing's error next to it (the prediction assumes uniform routing). The acceptance model's: the
    planner's expected tokens per sequence and round against the measured. ``pred``: the prediction for the
    workload that ran (``prediction_for``), the cost model's own without a draft."""
    if acc is None:  # no draft: nothing to substitute, the prediction's error is the cost model's
        at_note, acceptance = "no draft", None
    elif acc["measured"] is None:
        return {"cost_model": None, "acceptance_model": None, "routing": routing}
    else:
        pred, _ = prediction_for(plan, out, acc)
        at_note = (f"the measured acceptance curves P(n >= i), i = 1..{acc['draft_len']}, of each sequence "
                   f"({acc['tokens_per_seq_round_measured']:.3f} tokens per sequence and round)")
        acceptance = {"model": acc["assumed_model"],
                      "tokens_per_seq_round_expected": acc["tokens_per_seq_round_expected"],
                      "tokens_per_seq_round_measured": acc["tokens_per_seq_round_measured"],
                      "signed_error": signed_error(acc["tokens_per_seq_round_expected"],
                                                   acc["tokens_per_seq_round_measured"])}
    cost = {"predicted_at": at_note, **{f"predicted_{k}": getattr(pred, k) for k in AT_ACCEPTANCE},
            **{f"measured_{k}": meas[k] for k in AT_ACCEPTANCE},
            "signed_error": {k: signed_error(getattr(pred, k), meas[k]) for k in AT_ACCEPTANCE},
            "routing": "uniform routing assumed; the measured is reported apart (errors.routing)" if routing else None}
    return {"cost_model": cost, "acceptance_model": acceptance, "routing": routing}


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
    result["errors"] = errors(plan, out, pred, meas, acc, routing_report(plan, out))
    synthetic = m.get("synthetic_acceptance")
    if synthetic is not None:
        result["benchmark_mode"] = {"synthetic_acceptance": synthetic, "lossless": False,
                                    "note": SYNTHETIC_NOTE.format(a=synthetic)}
    return result
