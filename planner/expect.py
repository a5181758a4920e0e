"""Expected values the cost model needs: MoE routing and speculative acceptance.

- MoE, uniform routing: each of N routed tokens picks k of E experts, so one expert is untouched with probability
  ``(1 - k/E)^N``; the expected number of distinct experts touched is ``E * (1 - (1 - k/E)^N)``.
- Speculative decoding with per-token acceptance ``a`` and draft length ``g``: the target verifies g drafts and
  commits the accepted prefix plus one token of its own, ``(1 - a^(g+1)) / (1 - a)`` tokens in expectation
  (``g + 1`` at ``a = 1``).
"""

from __future__ import annotations

import math
from functools import lru_cache


def expert_touch_prob(num_experts: int, top_k: int, routed_tokens: float) -> float:
    """Probability that one given expert is picked by at least one of ``routed_tokens`` tokens."""
    if num_experts <= 0 or routed_tokens <= 0:
        return 0.0
    return 1.0 - (1.0 - top_k / num_experts) ** routed_tokens


def expected_distinct_experts(num_experts: int, top_k: int, routed_tokens: float) -> float:
    """``E * (1 - (1 - k/E)^N)``: expected number of distinct experts N routed tokens touch."""
    return num_experts * expert_touch_prob(num_experts, top_k, routed_tokens)


def rows_per_touched_expert(num_experts: int, top_k: int, routed_tokens: float) -> float:
    """Expected tokens an expert computes given that it is touched: all ``N * k`` assignments over the touched."""
    touched = expected_distinct_experts(num_experts, top_k, routed_tokens)
    return routed_tokens * top_k / touched if touched else 0.0


def expected_tokens_per_seq(acceptance: float | None, draft_len: int) -> float:
    """Expected tokens one sequence commits per verification: ``(1 - a^(g+1)) / (1 - a)``; 1 without drafts."""
    if draft_len <= 0:
        return 1.0
    if acceptance is None:
        raise ValueError("a speculative round needs an acceptance")
    a = float(acceptance)
    if a >= 1.0:
        return float(draft_len + 1)
    return (1.0 - a ** (draft_len + 1)) / (1.0 - a)


def accepted_drafts_pmf(acceptance: float, draft_len: int) -> list[float]:
    """P(j drafts accepted) for j = 0..g: ``a^j (1 - a)`` for j < g and ``a^g`` for j = g."""
    a = float(acceptance)
    return [a**j * (1.0 - a) for j in range(draft_len)] + [a**draft_len]


def expected_rounds(acceptance: float | None, draft_len: int, tokens: int, sequences: int) -> float:
    """Expected rounds until every one of ``sequences`` sequences has committed ``tokens`` tokens: a batch keeps
    verifying until its slowest sequence is done, so this is E[max of the sequences' round counts], each round
    committing j + 1 tokens with ``accepted_drafts_pmf``. Exactly ``tokens`` without speculation."""
    if tokens <= 0:
        return 0.0
    if draft_len <= 0 or acceptance is None or acceptance >= 1.0 or sequences <= 0:
        per = expected_tokens_per_seq(acceptance, draft_len) if draft_len > 0 else 1.0
        return math.ceil(tokens / per) if draft_len > 0 else float(tokens)
    return _expected_max_rounds(round(float(acceptance), 12), draft_len, tokens, sequences)


@lru_cache(maxsize=4096)
def _expected_max_rounds(a: float, g: int, tokens: int, sequences: int) -> float:
    import numpy as np

    step = np.zeros(g + 2)
    step[1:] = accepted_drafts_pmf(a, g)  # P(a round commits j + 1 tokens)
    # dist[t] = P(t tokens committed so far), with everything at or past `tokens` lumped into dist[tokens]
    dist = np.zeros(tokens + 1)
    dist[0] = 1.0
    total, r = 0.0, 0
    while True:
        done = dist[tokens]  # P(a sequence is finished after r rounds)
        total += 1.0 - done**sequences  # E[max] = sum over r of P(max > r)
        if 1.0 - done**sequences < 1e-12 or r > 4 * tokens:
            return total
        nxt = np.convolve(dist[:tokens], step)
        dist = np.concatenate([nxt[:tokens], [nxt[tokens:].sum() + dist[tokens]]])
        r += 1
