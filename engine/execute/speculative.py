"""Speculative decoding with a draft model and greedy verification (the output is the target's own greedy output).

Per batch and round:

    propose  the draft takes each sequence's pending tokens (committed, not yet in its cache: one, or two after a
             round that accepted every proposal), then proposes ``g`` tokens one pass at a time
    verify   the target runs one pass over ``[last committed, d1 .. dg]`` (g + 1 tokens per sequence) and takes its
             greedy token at every position: ``t0 .. tg``
    accept   per sequence, ``n`` = the number of leading proposals equal to the target's token before them
             (``d(i+1) == t(i)``); it commits ``d1 .. dn`` and then ``tn`` (the target's correction, or its bonus
             token when all ``g`` were accepted): ``n + 1`` tokens, ragged over the batch
    rollback each cache keeps only what the committed tokens wrote: the target ``last, d1 .. dn``, the draft
             ``pending, d1 .. d(min(n, g-1))``; the next round's pending tokens are ``tn`` (or ``dg, tg``)

A sequence never commits past its limit or its first EOS (``commit`` stops at ``done``). Both caches are allocated
``draft_len`` positions beyond prompt + new tokens, for the verification pass's writes past the final token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specplan.contracts.model import ModelSpec
from specplan.engine.model.kvcache import KVCache
from specplan.engine.model.forward import forward, pad_prompts


@dataclass
class DraftModel:
    """A resident draft: its architecture and weights (any ``WeightSource``)."""

    spec: ModelSpec
    src: object
    tracer: object | None = None  # where its compute spans go (names prefixed "draft.")


@dataclass
class DraftState:
    """A batch's draft cache and, per row, the committed tokens its cache does not hold yet."""

    kv: KVCache
    pending: list[list[int]]
    #: set by ``propose``: the cache lengths before it, and how many pending tokens it fed per row
    base: list[int] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)

    def select(self, rows: Sequence[int]) -> "DraftState":
        return DraftState(self.kv.select(rows), [self.pending[r] for r in rows])


@dataclass
class Acceptance:
    """What verification accepted: per sequence and round, the number of leading proposals accepted."""

    rounds: int = 0  # sequence-rounds verified
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, accepted
    rejections: int = 0  # sequence-rounds that stopped at a rejected proposal (n < g)
    committed: int = 0  # tokens committed by verification passes (accepted + corrections/bonus, within limits)
    histogram: dict[int, int] = field(default_factory=dict)  # n -> sequence-rounds

    def add(self, n: int, g: int) -> None:
        self.rounds += 1
        self.proposed += g
        self.accepted += n
        self.rejections += n < g
        self.histogram[n] = self.histogram.get(n, 0) + 1

    @property
    def per_token(self) -> float | None:
        """The per-token acceptance ``a`` of the model ``P(n >= i) = a^i``: its maximum-likelihood estimate,
        accepted / (accepted + rejections)."""
        trials = self.accepted + self.rejections
        return self.accepted / trials if trials else None

    @property
    def tokens_per_round(self) -> float | None:
        """Mean tokens a sequence commits per verification, before limits (``n + 1``)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else None


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


def propose(draft: DraftModel, state: DraftState, g: int) -> list[list[int]]:
    """``g`` greedy draft tokens per row of ``state`` (its cache advances over pending + ``g - 1`` tokens)."""
    if not state.pending:
        return []
    state.base, state.fed = state.kv.lengths.tolist(), [len(p) for p in state.pending]
    tokens, num_new = pad_prompts(state.pending)
    logits = forward(draft.spec, draft.src, state.kv, tokens, num_new, tracer=_tracer(draft), last_only=True)
    nxt = logits[:, 0].argmax(-1)
    out = [[t] for t in nxt.tolist()]
    for _ in range(g - 1):
        logits = forward(draft.spec, draft.src, state.kv, nxt.reshape(-1, 1), tracer=_tracer(draft))
        nxt = logits[:, 0].argmax(-1)
        for row, t in zip(out, nxt.tolist()):
            row.append(t)
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
             proposals: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> None:
    """Cut both caches back to what the committed tokens wrote and set each row's next pending tokens."""
    g = len(proposals[0]) if proposals else 0
    target_kv.set_lengths([b + 1 + n for b, n in zip(before, accepted)])
    state.kv.set_lengths([b + f + min(n, g - 1) for b, f, n in zip(state.base, state.fed, accepted)])
    state.pending = [[d[-1], t[-1]] if n == g else [t[n]] for n, d, t in zip(accepted, proposals, targets)]


def speculative_step(state: DraftState, target_kv: KVCache, last: Sequence[int],
                     proposals: Sequence[Sequence[int]], target_pass: Callable[[torch.Tensor, torch.Tensor],
                                                                               torch.Tensor],
                     commit: Callable[[int, list[int]], None], stats: Acceptance) -> None:
    """Verify ``proposals`` (from ``propose``) with one target pass, commit per row, roll both caches back."""
    if not proposals:
        return
    g = len(proposals[0])
    before = target_kv.lengths.tolist()
    tokens, num_new = verify_tokens(last, proposals)
    logits = target_pass(tokens, num_new)
    targets = logits.argmax(-1).tolist()
    accepted = []
    for row, (p, t) in enumerate(zip(proposals, targets)):
        n, commit_tokens = accept(p, t)
        accepted.append(n)
        stats.add(n, g)
        commit(row, commit_tokens)
    rollback(target_kv, state, before, accepted, proposals, targets)


def _tracer(draft: DraftModel):
    return _Prefixed(draft.tracer) if draft.tracer is not None else None
