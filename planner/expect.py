"""Expected values the cost model needs: MoE routing and speculative acceptance.

- MoE, uniform routing: each of N routed tokens picks k of E experts, so one expert is untouched with probability
  ``(1 - k/E)^N``; the expected number of distinct experts touched is ``E * (1 - (1 - k/E)^N)``.
- Speculative decoding, draft length ``g``: the target verifies g drafts and commits the accepted prefix ``n`` plus
  one token of its own, ``E[n + 1] = 1 + sum_i P(n >= i)`` tokens in expectation. ``P(n >= i)`` is either the
  one-parameter model ``a^i`` (per-token acceptance ``a``: ``(1 - a^(g+1)) / (1 - a)`` tokens, ``g + 1`` at
  ``a = 1``) or a measured curve (``curve[i - 1] = P(n >= i)`` for i = 1..G, a calibration's ``acceptance_curve``);
  past G the curve goes on geometrically at its tail's ratio (``tail_ratio``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def tail_ratio(curve: Sequence[float]) -> float:
    """The geometric model fitted to a measured curve's tail: the mean per-position ratio ``P(n >= i) / P(n >= i-1)``
    over its second half, ``(P(n >= G) / P(n >= h))^(1 / (G - h))`` with ``h = G // 2`` (``P(n >= 0) = 1``)."""
    g = len(curve)
    h = g // 2
    top = curve[h - 1] if h else 1.0
    return (curve[-1] / top) ** (1.0 / (g - h)) if top > 0 and curve[-1] > 0 else 0.0


def survival(acceptance: float | None, draft_len: int, curve: Sequence[float] | None = None) -> list[float]:
    """``P(n >= i)`` for i = 1..g: the measured ``curve`` where it reaches, extended past it by ``tail_ratio``;
    without one, ``a^i``."""
    if draft_len <= 0:
        return []
    if curve:
        out = list(curve[:draft_len])
        r = tail_ratio(curve)
        while len(out) < draft_len:
            out.append(out[-1] * r)
        return out
    if acceptance is None:
        raise ValueError("a speculative round needs an acceptance")
    a = float(acceptance)
    return [a**i for i in range(1, draft_len + 1)]


def expected_tokens_per_seq(acceptance: float | None, draft_len: int, curve: Sequence[float] | None = None) -> float:
    """Expected tokens one sequence commits per verification, ``1 + sum_i P(n >= i)`` (``survival``): with the
    one-parameter model ``(1 - a^(g+1)) / (1 - a)``; 1 without drafts."""
    if draft_len <= 0:
        return 1.0
    if curve:
        return 1.0 + sum(survival(acceptance, draft_len, curve))
    if acceptance is None:
        raise ValueError("a speculative round needs an acceptance")
    a = float(acceptance)
    if a >= 1.0:
        return float(draft_len + 1)
    return (1.0 - a ** (draft_len + 1)) / (1.0 - a)


def accepted_drafts_pmf(acceptance: float | None, draft_len: int, curve: Sequence[float] | None = None) -> list[float]:
    """P(j drafts accepted) for j = 0..g: ``P(n >= j) - P(n >= j + 1)``, the last ``P(n >= g)``; with the
    one-parameter model ``a^j (1 - a)`` for j < g and ``a^g`` for j = g."""
    if curve:
        s = [1.0, *survival(acceptance, draft_len, curve)]
        return [max(0.0, s[j] - s[j + 1]) for j in range(draft_len)] + [s[draft_len]]
    a = float(acceptance)  # type: ignore[arg-type]
    return [a**j * (1.0 - a) for j in range(draft_len)] + [a**draft_len]


def expected_rounds(acceptance: float | None, draft_len: int, tokens: int, sequences: int,
                    curve: Sequence[float] | None = None,
                    sequence_curves: Sequence[Sequence[float]] | None = None) -> float:
    """Expected rounds until every one of ``sequences`` sequences has committed ``tokens`` tokens: a batch keeps
    verifying until its slowest sequence is done, so this is E[max of the sequences' round counts], each round
    committing j + 1 tokens with ``accepted_drafts_pmf``. Exactly ``tokens`` without speculation.

    ``sequence_curves`` (a calibration's per-sequence curves): acceptance differs from prompt to prompt far more than
    from round to round (one prompt's continuation the draft knows, another's it does not), and the slowest sequence
    sets the batch's rounds. Each sequence of the batch is then a draw from those measured sequences: P(a sequence is
    done after r rounds) is the mean over them, and the batch's rounds E[max] follow from it."""
    if tokens <= 0:
        return 0.0
    if draft_len <= 0:
        return float(tokens)
    if sequence_curves and sequences > 0:
        pmfs = tuple(tuple(round(x, 12) for x in accepted_drafts_pmf(None, draft_len, c)) for c in sequence_curves)
        return _expected_max_rounds_mixture(pmfs, tokens, sequences)
    pmf = tuple(round(x, 12) for x in accepted_drafts_pmf(acceptance, draft_len, curve)) \
        if curve or acceptance is not None else None
    if pmf is None or pmf[-1] >= 1.0 or sequences <= 0:
        return math.ceil(tokens / expected_tokens_per_seq(acceptance, draft_len, curve))
    return _expected_max_rounds_mixture((pmf,), tokens, sequences)


@lru_cache(maxsize=1024)
def _done_by_round(pmf: tuple[float, ...], tokens: int, rounds: int):
    """P(a sequence whose rounds commit j + 1 tokens with ``pmf[j]`` has ``tokens`` after r rounds), r = 0..rounds."""
    import numpy as np

    step = np.zeros(len(pmf) + 1)
    step[1:] = pmf  # P(a round commits j + 1 tokens)
    # dist[t] = P(t tokens committed so far), with everything at or past `tokens` lumped into dist[tokens]
    dist = np.zeros(tokens + 1)
    dist[0] = 1.0
    out = [dist[tokens]]
    for _ in range(rounds):
        nxt = np.convolve(dist[:tokens], step)
        dist = np.concatenate([nxt[:tokens], [nxt[tokens:].sum() + dist[tokens]]])
        out.append(dist[tokens])
    return np.array(out)


@lru_cache(maxsize=4096)
def _expected_max_rounds_mixture(pmfs: tuple[tuple[float, ...], ...], tokens: int, sequences: int) -> float:
    """E[max over ``sequences`` draws of a sequence from ``pmfs`` (equally likely) of its round count]."""
    done = sum(_done_by_round(p, tokens, 4 * tokens) for p in pmfs) / len(pmfs)
    return float((1.0 - done**sequences).sum())
