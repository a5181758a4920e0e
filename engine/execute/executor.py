"""The batch loop: waves of sequences, batched prefill, then decode passes until every sequence is done.

    waves     = prompts in groups of num_batches * decode_batch (the last may be partial), one after the other
    batches   = a wave split over the num_batches interleaved batches, each with its own KV cache
    prefill   = per batch, chunks of prefill_batch ragged prompts (right-padded) into rows of the batch's cache
    decode    = rounds; per round and batch one ``step``: one token per active sequence (greedy or sampled,
                ``execute/sampling.py``), or (speculative plans) the draft's proposals verified by one target pass
                (``execute/speculative.py``)

A sequence is done after ``max_new_tokens`` tokens, or (``stop_at_eos``) at its first EOS token (kept in its
output); tokens past either are never generated nor counted. Finished sequences leave their batch
(``KVCache.select``). With two interleaved batches and a draft, the draft of one batch runs in a second thread
while the target verifies the other (SpecOffload): the verification waits mostly on weight reads, which leaves the
compute free for drafting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from specplan.contracts.memory import kv_capacity
from specplan.contracts.plan import Plan
from specplan.engine.model.kvcache import KVCache
from specplan.engine.model.forward import forward, pad_prompts
from specplan.contracts.plan import Sampling
from specplan.engine.execute.sampling import Sampler
from specplan.engine.execute.speculative import Acceptance, DraftModel, DraftState, draft_prefill, propose, speculative_step


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
    draft: DraftState | None = None  # the draft's cache of these rows (speculative plans)

    @property
    def active(self) -> list[SeqState]:
        return [s for s in self.seqs if not s.done]


@dataclass
class RunStats:
    prefill_s: float = 0.0  # wall time of prefill passes
    decode_s: float = 0.0  # wall time of the decode phases (drafting, sampling and bookkeeping included)
    prefill_passes: int = 0
    decode_passes: int = 0
    decode_tokens: int = 0  # tokens produced by decode passes (each sequence's first token comes from prefill)
    prefill_tokens: int = 0  # first tokens
    ttft_s: float | None = None  # start of the run to the first token of the first batch
    kv_peak_bytes: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0})
    draft_kv_peak_bytes: int = 0
    draft_passes: int = 0
    acceptance: Acceptance = field(default_factory=Acceptance)


class Executor:
    """Runs prompts through a plan's policy on a weight store; compute events go to ``recorder``."""

    def __init__(self, plan: Plan, store, recorder, dtype: torch.dtype, kv_devices: Sequence[torch.device],
                 max_new_tokens: int, eos_ids: Sequence[int] = (), stop_at_eos: bool = False,
                 on_tokens: Callable[[int], None] | None = None, draft: DraftModel | None = None,
                 draft_kv_device: torch.device | None = None, sampling: Sampling = Sampling(),
                 synthetic_acceptance: float | None = None):
        if plan.policy.speculative and draft is None:
            raise ValueError("a speculative plan needs its draft model")
        self.plan, self.spec, self.store, self.recorder = plan, plan.model.spec, store, recorder
        self.draft = draft if plan.policy.speculative else None
        self.draft_kv_device = draft_kv_device or torch.device("cpu")
        self.dtype, self.kv_devices = dtype, list(kv_devices)
        self.max_new_tokens, self.eos = max_new_tokens, set(eos_ids) if stop_at_eos else set()
        self.on_tokens = on_tokens or (lambda n: None)
        self.stats = RunStats()
        self.sampler = Sampler(sampling, synthetic_acceptance)  # synthetic: benchmark mode (``execute/sampling.py``)
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
                for s, t in zip(seqs, self.sampler.pick(logits[:, 0], [s.index for s in seqs])[0]):
                    self._take(s, t)
                if batch.draft is not None and not batch.draft.shared:
                    with self.recorder.in_batch(batch.id):
                        draft_prefill(self.draft, batch.draft.kv.rows(start, start + len(seqs)),
                                      [s.prompt for s in seqs])
                    self.stats.draft_passes += 1
            self.stats.prefill_s += time.perf_counter() - t0
            self.stats.prefill_passes += 1
            self.stats.prefill_tokens += len(seqs)
            if self.stats.ttft_s is None:
                self.stats.ttft_s = self.recorder.now()
        if batch.draft is not None:
            batch.draft.pending = [[s.generated[-1]] for s in batch.seqs]
            batch.draft.seqs = [s.index for s in batch.seqs]

    def decode_step(self, batch: Batch) -> None:
        """One token for every active sequence of the batch (or, speculative: propose, then verify)."""
        if self.draft is not None:
            self.verify(batch, self.propose(batch))
            return
        self._drop_finished(batch)
        if not batch.seqs:
            return
        tokens = torch.tensor([[s.generated[-1]] for s in batch.seqs], dtype=torch.long)
        logits = self._pass(batch.id, batch.kv, tokens, torch.ones(len(batch.seqs), dtype=torch.long), False)
        for s, t in zip(batch.seqs, self.sampler.pick(logits[:, 0], [s.index for s in batch.seqs])[0]):
            self._take(s, t)
        self.stats.decode_passes += 1
        self.stats.decode_tokens += len(batch.seqs)
        self.on_tokens(len(batch.seqs))

    def propose(self, batch: Batch) -> list[list[int]]:
        """The draft's ``draft_len`` proposals for every active sequence of the batch (drops finished ones)."""
        self._drop_finished(batch)
        if not batch.seqs:
            return []
        with self.recorder.in_batch(batch.id):
            out = propose(self.draft, batch.draft, self.plan.policy.draft_len, self.sampler)
        self.stats.draft_passes += self.plan.policy.draft_len
        return out

    def verify(self, batch: Batch, proposals: list[list[int]]) -> None:
        """One target pass over ``[last, proposals]`` per sequence; commit the accepted tokens, roll back."""
        if not proposals:
            return
        committed = 0

        def commit(row: int, tokens: list[int]) -> None:
            nonlocal committed
            seq = batch.seqs[row]
            for t in tokens:
                if not seq.done:
                    self._take(seq, t)
                    committed += 1

        speculative_step(batch.draft, batch.kv, [s.generated[-1] for s in batch.seqs], proposals,
                         lambda tokens, num_new: self._pass(batch.id, batch.kv, tokens, num_new, False), commit,
                         self.stats.acceptance, self.sampler)
        self.stats.acceptance.committed += committed
        self.stats.decode_passes += 1
        self.stats.decode_tokens += committed
        self.on_tokens(committed)

    def decode_round(self, batches: list[Batch]) -> None:
        """One round: a step of every interleaved batch in turn."""
        for b in batches:
            self.decode_step(b)

    def decode_interleaved(self, batches: list[Batch]) -> None:
        """Speculative decoding of two or more interleaved batches until all are done: while the target verifies
        one batch (in this thread), the draft proposes for the next (in a second thread)."""
        with ThreadPoolExecutor(1, thread_name_prefix="draft") as pool:
            pending = pool.submit(self.propose, batches[0])
            i = 0
            while True:
                proposals = pending.result()
                batch, i = batches[i], (i + 1) % len(batches)
                if not any(b.active for b in batches):
                    break
                pending = pool.submit(self.propose, batches[i])
                try:
                    self.verify(batch, proposals)
                except BaseException:
                    pending.cancel()
                    raise

    @staticmethod
    def _drop_finished(batch: Batch) -> None:
        keep = [r for r, s in enumerate(batch.seqs) if not s.done]
        if len(keep) < len(batch.seqs):
            batch.kv = batch.kv.select(keep) if keep else batch.kv
            if batch.draft is not None:
                batch.draft = batch.draft.select(keep, batch.kv) if keep else batch.draft
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
            longest = max(len(s.prompt) for g in groups for s in g)
            capacity = kv_capacity(longest, self.max_new_tokens, self.plan.policy.draft_len)
            batches = []
            for b, g in enumerate(groups):
                kv = self._allocate_kv(len(g), capacity)
                batches.append(Batch(b, g, kv, self._allocate_draft(len(g), capacity, kv)))
            self._note_kv(batches)
            for b in batches:
                self.prefill(b)
            t0 = time.perf_counter()
            with self.recorder.phase("decode", None, wave=w):
                if self.draft is not None and len(batches) > 1:
                    self.decode_interleaved(batches)
                while any(b.active for b in batches):
                    self.decode_round(batches)
            self.stats.decode_s += time.perf_counter() - t0
            del batches
        return seqs

    def _allocate_kv(self, rows: int, capacity: int) -> KVCache:
        return KVCache.allocate(self.spec, rows, capacity, self.dtype, self.kv_devices)

    def _allocate_draft(self, rows: int, capacity: int, target_kv: KVCache) -> DraftState | None:
        """The draft's state of a batch: its own cache, or the target's (``DraftModel.shares_kv``)."""
        if self.draft is None:
            return None
        if self.draft.shares_kv:
            return DraftState(target_kv, [], shared=True)
        kv = KVCache.allocate(self.draft.spec, rows, capacity, self.dtype, self.draft_kv_device)
        return DraftState(kv, [])

    def _note_kv(self, batches: list[Batch]) -> None:
        """Peak KV bytes per tier: the caches of one wave are alive together."""
        now = {"device": 0, "host": 0}
        for b in batches:
            for i in range(b.kv.num_layers):
                tier = "host" if self.plan.placement.layers[i].kv_cache == "host" else "device"
                now[tier] += b.kv.layer_bytes(i)
        for t in now:
            self.stats.kv_peak_bytes[t] = max(self.stats.kv_peak_bytes[t], now[t])
        draft = sum(b.draft.kv.bytes() for b in batches if b.draft is not None and not b.draft.shared)
        self.stats.draft_kv_peak_bytes = max(self.stats.draft_kv_peak_bytes, draft)
