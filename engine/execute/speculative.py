"""Speculative decoding with a draft model: greedy verification (the output is the target's own greedy output), or
with sampling, rejection sampling (``execute/sampling.py``: the output is distributed as the target's own samples).

Per batch and round:

    propose  the draft takes each sequence's pending tokens (committed, not yet in its cache: one, or two after a
             round that accepted every proposal), then proposes ``g`` tokens one pass at a time
    verify   the target runs one pass over ``[last committed, d1 .. dg]`` (g + 1 tokens per sequence) and takes its
             greedy token at every position: ``t0 .. tg`` (sampling: its distribution ``p`` at every position)
    accept   per sequence, ``n`` = the number of leading proposals equal to the target's token before them
             (``d(i+1) == t(i)``; sampling: each accepted with probability ``min(1, p/q)``; synthetic acceptance, a
             benchmark mode that is not lossless: a seeded coin, ``Sampler.synthetic_accept``); it commits ``d1 .. dn``
             and then ``tn`` (the target's correction, or its bonus token when all ``g`` were accepted): ``n + 1``
             tokens, ragged over the batch
    rollback each cache keeps only what the committed tokens wrote: the target ``last, d1 .. dn``, the draft
             ``pending, d1 .. d(min(n, g-1))``; the next round's pending tokens are ``tn`` (or ``dg, tg``)

A substitute draft (``DraftModel.shares_kv``) has no cache of its own: it proposes in the target's cache from the
target's committed entries (its pending token is always the last committed one), writing provisional entries at the
positions of ``last, d1 .. d(g-1)``; ``propose`` then lowers the lengths back, and the verification pass writes
``last, d1 .. dg`` over exactly those positions, so no provisional entry survives. Sharing costs no memory and no
draft prefill, and the draft attends to the target's own keys and values of the committed tokens.

A sequence never commits past its limit or its first EOS (``commit`` stops at ``done``). Both caches are allocated
``draft_len`` positions beyond prompt + new tokens, for the verification pass's writes past the final token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specplan.contracts.model import ModelSpec
from specplan.engine.model.kvcache import KVCache
from specplan.engine.execute.sampling import Sampler, processed
from specplan.engine.model.forward import forward, pad_prompts


@dataclass
class DraftModel:
    """A resident draft: its architecture and weights (any ``WeightSource``). A substitute of the target
    (``shares_kv``) has the target's architecture and drafts in the target's own KV cache: its provisional entries
    lie past the committed ones, and the verification pass overwrites every one of them."""

    spec: ModelSpec
    src: object
    tracer: object | None = None  # where its compute spans go (names prefixed "draft.")
    shares_kv: bool = False


@dataclass
class DraftState:
    """A batch's draft cache and, per row, the committed tokens its cache does not hold yet."""

    kv: KVCache  # the draft's own cache, or (``shared``) the target's
    pending: list[list[int]]
    seqs: list[int] = field(default_factory=list)  # the run's index of each row's sequence (its generator)
    shared: bool = False  # ``kv`` is the target's cache (a substitute draft): it holds every committed token but one
    #: set by ``propose``: the cache lengths before it, how many pending tokens it fed per row, and (sampling) the
    #: draft's distribution of every proposal, [rows, g, vocab]
    base: list[int] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None

    def select(self, rows: Sequence[int], target_kv: KVCache) -> "DraftState":
        """The state of ``rows`` (``target_kv``: the target's cache of those rows, the one a shared state uses)."""
        kv = target_kv if self.shared else self.kv.select(rows)
        return DraftState(kv, [self.pending[r] for r in rows], [self.seqs[r] for r in rows], self.shared)


@dataclass
class Acceptance:
    """What verification accepted: per sequence and round, the number of leading proposals accepted."""

    rounds: int = 0  # sequence-rounds verified
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, accepted
    rejections: int = 0  # sequence-rounds that stopped at a rejected proposal (n < g)
    committed: int = 0  # tokens committed by verification passes (accepted + corrections/bonus, within limits)
    histogram: dict[int, int] = field(default_factory=dict)  # n -> sequence-rounds
    draft_len: int = 0  # proposals per sequence-round (the largest seen)
    #: the same histogram per sequence (the run's index of the sequence -> n -> rounds)
    by_sequence: dict[int, dict[int, int]] = field(default_factory=dict)

    def add(self, n: int, g: int, seq: int | None = None) -> None:
        self.draft_len = max(self.draft_len, g)
        self.rounds += 1
        self.proposed += g
        self.accepted += n
        self.rejections += n < g
        self.histogram[n] = self.histogram.get(n, 0) + 1
        if seq is not None:
            own = self.by_sequence.setdefault(seq, {})
            own[n] = own.get(n, 0) + 1

    @property
    def per_token(self) -> float | None:
        """The per-token acceptance ``a`` of the model ``P(n >= i) = a^i``: its maximum-likelihood estimate,
        accepted / (accepted + rejections)."""
        trials = self.accepted + self.rejections
        return self.accepted / trials if trials else None

    @property
    def survival(self) -> list[float] | None:
        """The measured per-position acceptance ``[P(n >= 1) .. P(n >= g)]``: the share of sequence-rounds that
        accepted at least i proposals, from the accepted-length histogram; None before any round."""
        if not self.rounds:
            return None
        return _survival(self.histogram, self.draft_len)

    @property
    def sequence_survival(self) -> list[list[float]]:
        """``survival`` of each sequence on its own rounds, in the order of the run's prompts."""
        return [_survival(self.by_sequence[s], self.draft_len) for s in sorted(self.by_sequence)]

    @property
    def tokens_per_round(self) -> float | None:
        """Mean tokens a sequence commits per verification, before limits (``n + 1``)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else None


def _survival(histogram: dict[int, int], draft_len: int) -> list[float]:
    rounds = sum(histogram.values())
    return [sum(c for n, c in histogram.items() if n >= i) / rounds for i in range(1, draft_len + 1)]


class _Prefixed:
    """A tracer that names the draft's spans ``draft.<name>``."""

    def __init__(self, tracer) -> None:
        self.tracer = tracer

    def span(self, name: str, resource: str, layer: int | None = None, flops: float = 0.0, bytes: float = 0.0):
        return self.tracer.span(f"draft.{name}", resource, layer, flops, bytes)


def draft_prefill(draft: DraftModel, kv: KVCache, prompts: Sequence[Sequence[int]]) -> None:
    """Fill the draft's cache rows with the prompts (its logits are not needed: the target gives the first token)."""
    tokens, num_new = pad_prompts(prompts)
    forward(draft.spec, draft.src, kv, tokens, num_new, tracer=_tracer(draft), last_only=True)


def propose(draft: DraftModel, state: DraftState, g: int, sampler: Sampler) -> list[list[int]]:
    """``g`` draft tokens per row of ``state``, greedy or sampled (its cache advances over pending + ``g - 1``)."""
    if not state.pending:
        return []
    state.base, state.fed = state.kv.lengths.tolist(), [len(p) for p in state.pending]
    tokens, num_new = pad_prompts(state.pending)
    out: list[list[int]] = [[] for _ in state.pending]
    qs = []
    for i in range(g):
        logits = forward(draft.spec, draft.src, state.kv, tokens, num_new if i == 0 else None, tracer=_tracer(draft),
                         last_only=i == 0)
        picked, q = sampler.pick(logits[:, 0], state.seqs)
        qs.append(q)
        for row, t in zip(out, picked):
            row.append(t)
        tokens = torch.tensor(picked, dtype=torch.long).reshape(-1, 1)
    state.q = None if sampler.greedy else torch.stack(qs, dim=1)
    if state.shared:  # the target's cache: its provisional entries stay, for the verification to overwrite
        state.kv.set_lengths(state.base)
    return out


def verify_tokens(last: Sequence[int], proposals: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's input of a verification pass: ``[last, d1 .. dg]`` per row, and ``num_new``."""
    return pad_prompts([[t, *p] for t, p in zip(last, proposals)])


def accept(proposals: Sequence[int], target: Sequence[int]) -> tuple[int, list[int]]:
    """Greedy acceptance of one sequence: ``(n, tokens to commit)`` from the proposals ``d1 .. dg`` and the target's
    greedy tokens ``t0 .. tg`` at the positions of ``last, d1 .. dg``."""
    n = 0
    while n < len(proposals) and proposals[n] == target[n]:
        n += 1
    return n, [*proposals[:n], target[n]]


def rollback(target_kv: KVCache, state: DraftState, before: Sequence[int], accepted: Sequence[int],
             proposals: Sequence[Sequence[int]], last: Sequence[int]) -> None:
    """Cut both caches back to what the committed tokens wrote and set each row's next pending tokens (``last``:
    each row's final committed token, the correction or the bonus)."""
    g = len(proposals[0]) if proposals else 0
    target_kv.set_lengths([b + 1 + n for b, n in zip(before, accepted)])
    if state.shared:  # the target's cache now holds ``last, d1 .. dn``: only the final token is pending
        state.pending = [[t] for t in last]
        return
    state.kv.set_lengths([b + f + min(n, g - 1) for b, f, n in zip(state.base, state.fed, accepted)])
    state.pending = [[d[-1], t] if n == g else [t] for n, d, t in zip(accepted, proposals, last)]


def speculative_step(state: DraftState, target_kv: KVCache, last: Sequence[int],
                     proposals: Sequence[Sequence[int]], target_pass: Callable[[torch.Tensor, torch.Tensor],
                                                                               torch.Tensor],
                     commit: Callable[[int, list[int]], None], stats: Acceptance, sampler: Sampler) -> None:
    """Verify ``proposals`` (from ``propose``) with one target pass, commit per row, roll both caches back."""
    if not proposals:
        return
    g = len(proposals[0])
    before = target_kv.lengths.tolist()
    tokens, num_new = verify_tokens(last, proposals)
    logits = target_pass(tokens, num_new)
    if sampler.synthetic is not None:  # benchmark mode: proposals accepted by a seeded coin, not by the target
        results = [sampler.synthetic_accept(d, logits[row], seq)
                   for row, (d, seq) in enumerate(zip(proposals, state.seqs))]
    elif sampler.greedy:
        targets = logits.argmax(-1).tolist()
        results = [accept(d, t) for d, t in zip(proposals, targets)]
    else:
        p = processed(logits, sampler.s)  # the target's distribution at every position, [rows, g + 1, vocab]
        results = [sampler.accept(d, state.q[row], p[row], seq)
                   for row, (d, seq) in enumerate(zip(proposals, state.seqs))]
    for row, (n, commit_tokens) in enumerate(results):
        stats.add(n, g, state.seqs[row] if row < len(state.seqs) else None)
        commit(row, commit_tokens)
    rollback(target_kv, state, before, [n for n, _ in results], proposals, [c[-1] for _, c in results])



def _tracer(draft: DraftModel):
    return _Prefixed(draft.tracer) if draft.tracer is not None else None
