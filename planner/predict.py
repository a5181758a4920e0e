"""The prediction of a whole workload from a plan's programs: prefill passes, then decode rounds, per wave.

    waves          = ceil(num_prompts / (num_batches * decode_batch))   (the last one may be partial)
    prefill passes = per wave, ceil(wave sequences / prefill_batch)
    rounds / wave  = E[rounds until the wave's slowest sequence has gen_len - 1 more tokens] (prefill yields the
                     first token; a batch keeps verifying until all its sequences are done; gen_len - 1 without
                     speculation)
    round time     = steady_state(decode_round(plan, mean decode context)).round_s
                     (computed on the folded program: identical units as one record each, the same sums)

Decode-only throughput counts the tokens of the decode rounds; end-to-end counts all gen_len tokens of every
prompt over prefill + decode. Neither counts tokens past gen_len (a round's surplus is not counted: the expected
number of rounds is what reaches gen_len).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from specplan.contracts.memory import mean_decode_context as mean_context
from specplan.contracts.plan import Plan, Prediction
from specplan.planner.expect import expected_rounds, expected_tokens_per_seq
from specplan.planner.memory import peak_bytes
from specplan.planner.program import Estimate, decode_round, prefill_pass, steady_state


@dataclass(frozen=True)
class Breakdown:
    prediction: Prediction
    round: Estimate
    prefill: Estimate


def wave_sizes(plan: Plan) -> list[int]:
    """Sequences of each wave: full waves of num_batches * decode_batch, then the rest."""
    return plan.workload.wave_sizes(plan.policy.num_batches * plan.policy.decode_batch)


def mean_decode_context(plan: Plan) -> int:
    """The KV length averaged over the decode rounds (attention cost is linear in it)."""
    return mean_context(plan.workload.prompt_len, plan.workload.gen_len)


def breakdown(plan: Plan) -> Breakdown:
    pol, wl, prof = plan.policy, plan.workload, plan.profile
    per_seq = expected_tokens_per_seq(pol.acceptance, pol.draft_len, pol.acceptance_curve)
    context = mean_decode_context(plan)
    full = steady_state(decode_round(plan, context, folded=True), prof)
    first_prefill = steady_state(prefill_pass(plan, folded=True), prof)
    target_prefill = steady_state(prefill_pass(plan, folded=True, with_draft=False), prof)

    estimates: dict[tuple[str, int], Estimate] = {}

    def est(kind: str, seqs: int) -> Estimate:
        if (kind, seqs) not in estimates:
            if kind == "round":
                per_batch = math.ceil(seqs / pol.num_batches)
                estimates[(kind, seqs)] = full if per_batch == pol.decode_batch else steady_state(
                    decode_round(plan, context, per_batch, folded=True), prof)
            else:
                estimates[(kind, seqs)] = first_prefill if seqs == pol.prefill_batch else steady_state(
                    prefill_pass(plan, seqs, folded=True), prof)
        return estimates[(kind, seqs)]

    prefill_s = decode_s = 0.0
    busy: dict[str, float] = {}

    def charge(e: Estimate, times: float) -> None:
        for r, t in e.busy_s.items():
            busy[r] = busy.get(r, 0.0) + t * times

    for seqs in wave_sizes(plan):
        for start in range(0, seqs, pol.prefill_batch):
            e = est("prefill", min(pol.prefill_batch, seqs - start))
            prefill_s += e.round_s
            charge(e, 1)
        e = est("round", seqs)
        rounds = expected_rounds(pol.acceptance, pol.draft_len, wl.gen_len - 1, seqs, pol.acceptance_curve,
                                 pol.acceptance_sequence_curves)
        decode_s += rounds * e.round_s
        charge(e, rounds)
    total_s = prefill_s + decode_s
    tokens = wl.num_prompts * wl.gen_len
    decode_tokens = wl.num_prompts * (wl.gen_len - 1)
    pred = Prediction(
        decode_tok_s=decode_tokens / decode_s if decode_s > 0 else 0.0,
        e2e_tok_s=tokens / total_s if total_s > 0 else 0.0,
        prefill_s=prefill_s,
        decode_s=decode_s,
        total_s=total_s,
        ttft_s=target_prefill.round_s,
        round_s=full.round_s,
        tokens_per_round=pol.num_batches * pol.decode_batch * per_seq,
        busy_s=busy,
        bottleneck=full.bottleneck,
        peak_bytes=peak_bytes(plan),
        acceptance=pol.acceptance,
        round_busy_s=dict(full.busy_s),
        round_chain_s=max(full.chain_s.values(), default=0.0),
        round_stream_s=max(full.stream_s.values(), default=0.0),
        prefill_pass_s=first_prefill.round_s,
        decode_context_len=context,
        tokens_per_seq_round=per_seq,
    )
    return Breakdown(pred, full, first_prefill)


def predict(plan: Plan) -> Prediction:
    return breakdown(plan).prediction
