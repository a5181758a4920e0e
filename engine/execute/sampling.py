"""Choosing tokens: greedy, or sampling at a temperature within top-k and top-p, and the rejection step that makes
speculative sampling exact.

``processed`` turns logits into the distribution a sequence samples from (temperature, then top-k, then top-p);
the draft's proposals are drawn from its own ``processed`` distribution ``q`` and the target's is ``p``. Verification
accepts proposal ``d`` with probability ``min(1, p(d) / q(d))``; at the first rejection it draws the correction
from ``max(0, p - q)`` renormalised, and after ``g`` acceptances the bonus token from ``p`` at the last position:
the committed tokens are then distributed exactly as tokens sampled from the target alone (Leviathan et al. 2023,
Chen et al. 2023). Every sequence draws from its own generator, seeded by the run's seed and its index, so a
sequence's tokens repeat with the seed whatever batch it runs in.

Synthetic acceptance (``synthetic``, a benchmark mode: vLLM's synthetic acceptance length, llama.cpp's
``--spec-synth-len``): each proposal is accepted with probability ``A`` by a seeded coin of its own (one generator
per sequence), whatever the target says; the committed tokens are the accepted proposals and the target's own
token at the first rejection (or its bonus token). The output is then not the target's: it is not lossless.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specplan.contracts.plan import Sampling


def processed(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Probabilities (float32, last dim) after temperature, top-k and top-p; not for greedy settings."""
    x = logits.float() / s.temperature
    if s.top_k and s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_x, dim=-1) >= s.top_p  # mass before a token already reaches top_p
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return torch.softmax(x, dim=-1)


class Sampler:
    """Picks tokens for the sequences of a run, each with its own generator."""

    def __init__(self, s: Sampling, synthetic: float | None = None) -> None:
        if synthetic is not None and not 0.0 < synthetic <= 1.0:
            raise ValueError(f"a synthetic acceptance lies in (0, 1], got {synthetic}")
        self.s = s
        self.synthetic = synthetic  # benchmark mode: the probability each proposal is accepted (None: lossless)
        self._gens: dict[int, torch.Generator] = {}
        self._coins: dict[int, torch.Generator] = {}

    @property
    def greedy(self) -> bool:
        return self.s.greedy

    def gen(self, seq: int) -> torch.Generator:
        g = self._gens.get(seq)
        if g is None:
            g = torch.Generator().manual_seed((self.s.seed * 1_000_003 + seq) % (1 << 63))
            self._gens[seq] = g
        return g

    def draw(self, probs: torch.Tensor, seq: int) -> int:
        """One token from ``probs`` (1-D) with sequence ``seq``'s generator."""
        return int(torch.multinomial(probs, 1, generator=self.gen(seq)))

    def uniform(self, seq: int) -> float:
        return float(torch.rand((), generator=self.gen(seq)))

    def coin(self, seq: int) -> float:
        """A uniform draw from sequence ``seq``'s synthetic-acceptance generator (apart from its token draws)."""
        g = self._coins.get(seq)
        if g is None:
            g = torch.Generator().manual_seed((self.s.seed * 1_000_003 + seq + (1 << 40)) % (1 << 63))
            self._coins[seq] = g
        return float(torch.rand((), generator=g))

    def synthetic_accept(self, proposals: Sequence[int], logits: torch.Tensor, seq: int) -> tuple[int, list[int]]:
        """Synthetic acceptance of one sequence's ``g`` proposals: each accepted with probability ``synthetic`` until
        the first rejection, then the target's token at that position (greedy, or drawn from its distribution),
        from its ``logits`` [g + 1, vocab]: ``(n accepted, tokens to commit)``."""
        n = 0
        while n < len(proposals) and self.coin(seq) < self.synthetic:  # type: ignore[operator]
            n += 1
        row = logits[n:n + 1]
        own = self.pick(row, [seq])[0][0]
        return n, [*proposals[:n], own]

    def pick(self, logits: torch.Tensor, seqs: Sequence[int]) -> tuple[list[int], torch.Tensor | None]:
        """(one token per row of ``logits`` [rows, vocab], the rows' distributions or None when greedy)."""
        if self.greedy:
            return logits.argmax(-1).tolist(), None
        probs = processed(logits, self.s)
        return [self.draw(probs[r], seq) for r, seq in enumerate(seqs)], probs

    def accept(self, proposals: Sequence[int], q: torch.Tensor, p: torch.Tensor, seq: int) -> tuple[int, list[int]]:
        """Rejection sampling of one sequence's ``g`` proposals: ``(n accepted, tokens to commit)`` from the
        draft's distributions ``q`` [g, vocab] and the target's ``p`` [g + 1, vocab]."""
        for i, d in enumerate(proposals):
            if self.uniform(seq) * float(q[i, d]) <= float(p[i, d]):
                continue
            residual = (p[i] - q[i]).clamp_min(0)
            total = float(residual.sum())
            return i, [*proposals[:i], self.draw(residual / total if total > 0 else p[i], seq)]
        return len(proposals), [*proposals, self.draw(p[len(proposals)], seq)]
