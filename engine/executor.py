"""The batch loop: waves of sequences, batched prefill, then decode passes until every sequence is done.

    waves     = prompts in groups of num_batches * decode_batch (the last may be partial), one after the other
    batches   = a wave split over the num_batches interleaved batches, each with its own KV cache
    prefill   = per batch, chunks of prefill_batch ragged prompts (right-padded) into rows of the batch's cache
    decode    = rounds; per round and batch one ``step``: today one greedy token per active sequence

A sequence is done after ``max_new_tokens`` tokens, or (``stop_at_eos``) at its first EOS token (kept in its
output); tokens past either are never generated nor counted. Finished sequences leave their batch
(``KVCache.select``). Speculative decoding (next wave) replaces ``decode_step`` by draft steps plus one
verification pass over ``draft_len + 1`` tokens per sequence (``forward`` already takes ragged ``num_new``) and a
per-sequence rollback (``KVCache.set_lengths``); two interleaved batches are already two ``Batch`` objects with
their own caches, stepped in turn by ``decode_round``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specplan.contracts.plan import Plan
from specplan.engine.kvcache import KVCache
from specplan.engine.model import forward, pad_prompts


@dataclass
class SeqState:
    """One prompt in flight."""

    index: int  # position in the run's prompt list
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    done: bool = False
    first_token_s: float | None = None  # recorder time of its first token
    done_s: float | None = None


@dataclass
class Batch:
    """One interleaved batch: its sequences (rows of ``kv``, in order) and its KV cache."""

    id: int
    seqs: list[SeqState]
    kv: KVCache

    @property
    def active(self) -> list[SeqState]:
        return [s for s in self.seqs if not s.done]


@dataclass
class RunStats:
    prefill_s: float = 0.0  # wall time of prefill passes
    decode_s: float = 0.0  # wall time of decode passes (sampling and bookkeeping included)
    prefill_passes: int = 0
    decode_passes: int = 0
    decode_tokens: int = 0  # tokens produced by decode passes (each sequence's first token comes from prefill)
    prefill_tokens: int = 0  # first tokens
    ttft_s: float | None = None  # start of the run to the first token of the first batch
    kv_peak_bytes: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0})


class Executor:
    """Runs prompts through a plan's policy on a weight store; compute events go to ``recorder``."""

    def __init__(self, plan: Plan, store, recorder, dtype: torch.dtype, kv_devices: Sequence[torch.device],
                 max_new_tokens: int, eos_ids: Sequence[int] = (), stop_at_eos: bool = False,
                 on_tokens: Callable[[int], None] | None = None):
        self.plan, self.spec, self.store, self.recorder = plan, plan.model.spec, store, recorder
        self.dtype, self.kv_devices = dtype, list(kv_devices)
        self.max_new_tokens, self.eos = max_new_tokens, set(eos_ids) if stop_at_eos else set()
        self.on_tokens = on_tokens or (lambda n: None)
        self.stats = RunStats()
        pol, pl = plan.policy, plan.placement
        self._attention_on = ["host_compute" if lp.kv_cache == "host" and pol.attention_on == "host"
                              else "device_compute" for lp in pl.layers]
        self._experts_on = {(i, e): "host_compute" if t != "device" and pol.experts_on == "host" else "device_compute"
                            for i, lp in enumerate(pl.layers) for e, t in enumerate(lp.experts)}

    # ---- one forward pass -----------------------------------------------------------------------------------------

    def _pass(self, batch_id: int, kv: KVCache, tokens: torch.Tensor, num_new: torch.Tensor,
              last_only: bool) -> torch.Tensor:
        with self.recorder.in_batch(batch_id):
            try:
                return forward(self.spec, self.store, kv, tokens, num_new, tracer=self.recorder,
                               attention_resource=self._attention_on.__getitem__,
                               experts_resource=lambda i, e: self._experts_on[(i, e)], last_only=last_only)
            finally:
                self.store.end_pass()

    def _take(self, seq: SeqState, token: int) -> None:
        """Commit one generated token to a sequence (never past its limit)."""
        if seq.done:
            return
        seq.generated.append(token)
        now = self.recorder.now()
        if seq.first_token_s is None:
            seq.first_token_s = now
        if len(seq.generated) >= self.max_new_tokens or token in self.eos:
            seq.done, seq.done_s = True, now

    # ---- phases ---------------------------------------------------------------------------------------------------

    def prefill(self, batch: Batch) -> None:
        """The batch's prompts in chunks of ``prefill_batch`` (ragged, right-padded) into its cache rows."""
        step = self.plan.policy.prefill_batch
        for start in range(0, len(batch.seqs), step):
            seqs = batch.seqs[start: start + step]
            tokens, num_new = pad_prompts([s.prompt for s in seqs])
            t0 = time.perf_counter()
            with self.recorder.phase("prefill", batch.id, sequences=len(seqs)):
                logits = self._pass(batch.id, batch.kv.rows(start, start + len(seqs)), tokens, num_new, True)
                for s, t in zip(seqs, logits[:, 0].argmax(-1).tolist()):
                    self._take(s, t)
            self.stats.prefill_s += time.perf_counter() - t0
            self.stats.prefill_passes += 1
            self.stats.prefill_tokens += len(seqs)
            if self.stats.ttft_s is None:
                self.stats.ttft_s = self.recorder.now()
            self.on_tokens(len(seqs))

    def decode_step(self, batch: Batch) -> None:
        """One greedy token for every active sequence of the batch."""
        self._drop_finished(batch)
        if not batch.seqs:
            return
        tokens = torch.tensor([[s.generated[-1]] for s in batch.seqs], dtype=torch.long)
        t0 = time.perf_counter()
        logits = self._pass(batch.id, batch.kv, tokens, torch.ones(len(batch.seqs), dtype=torch.long), False)
        for s, t in zip(batch.seqs, logits[:, 0].argmax(-1).tolist()):
            self._take(s, t)
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.decode_passes += 1
        self.stats.decode_tokens += len(batch.seqs)
        self.on_tokens(len(batch.seqs))

    def decode_round(self, batches: list[Batch]) -> None:
        """One round: a step of every interleaved batch in turn."""
        for b in batches:
            self.decode_step(b)

    @staticmethod
    def _drop_finished(batch: Batch) -> None:
        keep = [r for r, s in enumerate(batch.seqs) if not s.done]
        if len(keep) < len(batch.seqs):
            batch.kv = batch.kv.select(keep) if keep else batch.kv
            batch.seqs = [batch.seqs[r] for r in keep]

    # ---- the run --------------------------------------------------------------------------------------------------

    def waves(self, seqs: list[SeqState]) -> list[list[list[SeqState]]]:
        """Waves of num_batches * decode_batch sequences, each split over its interleaved batches."""
        pol = self.plan.policy
        size = pol.num_batches * pol.decode_batch
        out = []
        for w in range(0, len(seqs), size):
            wave = seqs[w: w + size]
            per = -(-len(wave) // pol.num_batches)
            out.append([wave[i: i + per] for i in range(0, len(wave), per)])
        return out

    def run(self, prompts: list[list[int]]) -> list[SeqState]:
        seqs = [SeqState(i, list(p)) for i, p in enumerate(prompts)]
        self.recorder.start()
        for w, groups in enumerate(self.waves(seqs)):
            capacity = max(len(s.prompt) for g in groups for s in g) + self.max_new_tokens
            batches = [Batch(b, g, self._allocate_kv(len(g), capacity)) for b, g in enumerate(groups)]
            self._note_kv(batches)
            for b in batches:
                self.prefill(b)
            with self.recorder.phase("decode", None, wave=w):
                while any(b.active for b in batches):
                    self.decode_round(batches)
            del batches
        return seqs

    def _allocate_kv(self, rows: int, capacity: int) -> KVCache:
        return KVCache.allocate(self.spec, rows, capacity, self.dtype, self.kv_devices)

    def _note_kv(self, batches: list[Batch]) -> None:
        """Peak KV bytes per tier: the caches of one wave are alive together."""
        now = {"device": 0, "host": 0}
        for b in batches:
            for i in range(b.kv.num_layers):
                tier = "host" if self.plan.placement.layers[i].kv_cache == "host" else "device"
                now[tier] += b.kv.layer_bytes(i)
        for t in now:
            self.stats.kv_peak_bytes[t] = max(self.stats.kv_peak_bytes[t], now[t])
