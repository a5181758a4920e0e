"""From a Plan to the stages the scheduler runs: waves, prefill passes, then decode rounds until every sequence
has its ``gen_len`` tokens.

- Waves of ``num_batches * decode_batch`` sequences (``planner.predict.wave_sizes``; the last may be partial), one
  after the other. A wave's sequences are split over the interleaved batches (``ceil(wave / num_batches)`` each).
- Prefill: ``ceil(wave / prefill_batch)`` passes (``planner.program.prefill_pass``); each yields the first token
  of its sequences at its target ``lm_head``, where the next pass's target compute may start (a draft model's
  prefill of the pass runs on after it). The wave's decode starts when every prefill pass is done.
- Decode: per round and batch, the draft steps (``draft_steps``) and one verification pass over ``draft_len + 1``
  tokens per sequence (``target_pass``, phase "verify"; without speculation one "decode" pass of one token).
  Round r + 1 of a batch follows round r of that batch; the batches of a round are issued batch 0 first, so the
  device serves batch 1's drafting in the gaps of batch 0's verification (SpecOffload's interleaving).
- Accepted drafts: with a seed, per sequence and round ``j ~ P(j) = a^j (1 - a)`` (j < g), ``a^g`` (j = g) and j + 1
  tokens committed; without a seed, the expectation ``(1 - a^(g+1)) / (1 - a)`` per sequence. Never past
  ``gen_len``: a sequence that has its tokens leaves its batch (later rounds serve fewer sequences).
- KV growth: a batch's pass is built at the mean KV length of its active sequences (prompt + committed - 1),
  rounded to a multiple of ``kv_step`` positions so programs are built once per step (attention cost is linear in
  the length; ``kv_step=1`` is exact).
- Routed experts: with a seed, one Bernoulli draw per expert per pass (its fetch and compute happen together);
  without, every op runs for its expected time (prob x time), as the planner's round model assumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from specplan.contracts.plan import Plan, Workload
from specplan.errors import SpecplanError
from specplan.planner.expect import accepted_drafts_pmf, expected_tokens_per_seq
from specplan.planner.predict import wave_sizes
from specplan.planner.program import draft_steps, prefill_pass, target_pass
from specplan.simulator.core import Stage, Template, drawn_stage, expected_stage, make_template


def with_workload(plan: Plan, gen_len: int | None = None, num_prompts: int | None = None) -> Plan:
    """The plan with its generation length and number of prompts replaced (None keeps the plan's)."""
    wl = plan.workload
    if (gen_len or wl.gen_len) == wl.gen_len and (num_prompts or wl.num_prompts) == wl.num_prompts:
        return plan
    new = Workload(prompt_len=wl.prompt_len, gen_len=gen_len or wl.gen_len, num_prompts=num_prompts or wl.num_prompts)
    return plan.model_copy(update={"workload": new})


def auto_kv_step(plan: Plan) -> int:
    """About 16 KV lengths over the generation."""
    return max(1, plan.workload.gen_len // 16)


class Templates:
    """Programs of the plan costed on its profile, built once per (kind, batch, KV length, sequences)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._cache: dict[tuple, Template] = {}

    def _get(self, key: tuple, build) -> Template:
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = make_template(build().ops, self.plan.profile)
        return t

    def prefill(self, seqs: int, batch: int) -> Template:
        return self._get(("prefill", batch, seqs), lambda: prefill_pass(self.plan, seqs, batch))

    def draft(self, batch: int, context_len: int, seqs: int) -> Template:
        return self._get(("draft", batch, context_len, seqs), lambda: draft_steps(self.plan, batch, context_len, seqs))

    def target(self, batch: int, context_len: int, seqs: int) -> Template:
        pol = self.plan.policy
        phase = "verify" if pol.speculative else "decode"
        return self._get(("target", batch, context_len, seqs),
                         lambda: target_pass(self.plan, batch, context_len, pol.draft_len + 1, seqs, phase))

    def __len__(self) -> int:
        return len(self._cache)


@dataclass
class Script:
    """The stages of a whole workload, in issue order."""

    plan: Plan
    stages: list[Stage]
    seed: int | None
    kv_step: int
    templates: int  # distinct programs built


class _Batch:
    """The sequences of one interleaved batch and the tokens each has committed."""

    def __init__(self, index: int, seqs: int, kinds: np.ndarray | None = None) -> None:
        self.index = index
        self.committed = np.ones(seqs)  # prefill yields the first token
        self.last_stage: int | None = None
        #: each sequence's acceptance: the index of the calibration sequence it is drawn as (None: all alike)
        self.kinds = kinds


def split_wave(seqs: int, num_batches: int) -> list[int]:
    """Sequences per interleaved batch: ``ceil(seqs / num_batches)`` each, the rest in the last."""
    per = math.ceil(seqs / num_batches)
    return [n for n in (min(per, seqs - b * per) for b in range(num_batches)) if n > 0]


def build_script(plan: Plan, seed: int | None = None, kv_step: int | None = None) -> Script:
    pol, wl = plan.policy, plan.workload
    if pol.speculative and plan.draft.kind == "none":
        raise SpecplanError("the plan drafts tokens (policy.draft_len > 0) but has no draft")
    step = kv_step or auto_kv_step(plan)
    rng = np.random.default_rng(seed) if seed is not None else None
    templates = Templates(plan)
    stages: list[Stage] = []

    def add(template: Template, after: tuple[tuple[int, int], ...], **info) -> int:
        if rng is None:
            stages.append(expected_stage(template, after, **info))
        else:
            stages.append(drawn_stage(template, rng.random(template.num_draws), after, **info))
        return len(stages) - 1

    def tail(i: int) -> tuple[int, int]:
        return (i, stages[i].template.tail)

    #: each calibration sequence's accepted-length pmf (a sequence of a batch is drawn as one of them), computed once
    kind_pmfs = [accepted_drafts_pmf(None, pol.draft_len, c) for c in pol.acceptance_sequence_curves or ()]
    previous_wave: tuple[tuple[int, int], ...] = ()
    for wave, seqs in enumerate(wave_sizes(plan)):
        sizes = split_wave(seqs, pol.num_batches)
        per = sizes[0]
        after, prefills = previous_wave, []
        for k, first in enumerate(range(0, seqs, pol.prefill_batch)):
            n = min(pol.prefill_batch, seqs - first)
            i = add(templates.prefill(n, first // per), after, kind="prefill", wave=wave, batch=first // per,
                    pass_index=k, seqs=n, context_len=0, tokens=float(n))
            prefills.append(tail(i))
            after = ((i, stages[i].template.token),)  # the next pass follows the target's part of this one
        batches = [_Batch(b, n, rng.integers(len(kind_pmfs), size=n) if kind_pmfs and rng is not None else None)
                   for b, n in enumerate(sizes)]
        rounds = 0
        while True:
            active_any = False
            for b in batches:
                active = b.committed < wl.gen_len - 1e-9
                n = int(active.sum())
                if not n:
                    continue
                active_any = True
                mean_len = wl.prompt_len + float(b.committed[active].mean()) - 1
                context = wl.prompt_len + step * round((mean_len - wl.prompt_len) / step)
                prev = (tail(b.last_stage),) if b.last_stage is not None else tuple(prefills)
                if pol.speculative:
                    prev = (tail(add(templates.draft(b.index, context, n), prev, kind="draft", wave=wave,
                                     batch=b.index, round=rounds, seqs=n, context_len=context, tokens=0.0)),)
                new = _commit(b.committed, active, gen_len=wl.gen_len, acceptance=pol.acceptance,
                              draft_len=pol.draft_len, rng=rng, curve=pol.acceptance_curve,
                              kinds=b.kinds, kind_pmfs=kind_pmfs)
                b.last_stage = add(templates.target(b.index, context, n), prev,
                                   kind="verify" if pol.speculative else "decode", wave=wave, batch=b.index,
                                   round=rounds, seqs=n, context_len=context, tokens=new)
            if not active_any:
                break
            rounds += 1
        previous_wave = tuple(tail(b.last_stage) for b in batches if b.last_stage is not None) or tuple(prefills)
    return Script(plan, stages, seed, step, len(templates))


def _commit(committed: np.ndarray, active: np.ndarray, *, gen_len: int, acceptance: float | None, draft_len: int,
            rng: np.random.Generator | None, curve: list[float] | None = None, kinds: np.ndarray | None = None,
            kind_pmfs: list[list[float]] | None = None) -> float:
    """Add one round's tokens to the active sequences (never past gen_len); return how many were added. With
    ``kinds``, each sequence draws from its own calibration sequence's accepted-length pmf (``kind_pmfs[kind]``)."""
    left = gen_len - committed[active]
    if rng is None:
        got = np.full(left.shape, expected_tokens_per_seq(acceptance, draft_len, curve))
    elif draft_len and kinds is not None and kind_pmfs:
        got = np.array([rng.choice(draft_len + 1, p=kind_pmfs[k]) for k in kinds[active]]) + 1.0
    elif draft_len:
        got = rng.choice(draft_len + 1, size=left.shape, p=accepted_drafts_pmf(acceptance, draft_len, curve)) + 1.0
    else:
        got = np.ones(left.shape)
    new = np.minimum(got, left)
    committed[active] += new
    return float(new.sum())
