"""What the user asks for (model, machine, budgets, workload, drafts) and the discrete knobs of one candidate."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from specplan.contracts.hardware import HardwareProfile
from specplan.contracts.memory import kv_capacity, last_decode_context, mean_decode_context
from specplan.contracts.model import ModelSpec
from specplan.contracts.plan import Capacities, Plan, Workload
from specplan.planner.drafts import DraftChoice
from specplan.planner.dtypes import candidate_dtypes, kv_dtype_for
from specplan.planner.expect import expected_rounds
from specplan.planner.lp import Shape
from specplan.planner.units import Costing, Knobs


@dataclass(frozen=True)
class Ask:
    spec: ModelSpec
    model_name: str
    profile: HardwareProfile
    capacities: Capacities
    workload: Workload
    drafts: tuple[DraftChoice, ...]
    top: int = 5
    model_path: str | None = None
    command: str | None = None
    prefetch_depth: int = 1
    #: the weight dtypes to search, preferred first (``planner.dtypes.candidate_dtypes``); empty: all candidates
    dtypes: tuple[str, ...] = ()

    @property
    def candidates(self) -> tuple[str, ...]:
        return self.dtypes or candidate_dtypes(self.profile, self.spec)

    @property
    def weight_dtype(self) -> str:
        """The dtype this search costs weights (and compute) in: the first candidate."""
        return self.candidates[0]

    @property
    def kv_dtype(self) -> str:
        return kv_dtype_for(self.weight_dtype)


@dataclass(frozen=True)
class Candidate:
    draft: DraftChoice
    knobs: Knobs
    shape: Shape

    def key(self) -> tuple:
        """A total order for ties (deterministic output)."""
        k, s = self.knobs, self.shape
        return (self.draft.label, s.draft_len, s.num_batches, s.decode_batch, s.prefill_batch, k.attention_on,
                k.experts_on, k.expert_fetch)


@dataclass
class SearchResult:
    plans: list[Plan]
    candidates: int = 0
    lps: int = 0
    milps: int = 0
    pruned: int = 0
    infeasible: int = 0
    notes: list[str] = field(default_factory=list)


def costing_for(ask: Ask, draft: DraftChoice) -> Costing:
    d = draft.spec
    return Costing(ask.spec, ask.profile, ask.weight_dtype, ask.kv_dtype, draft_spec=d.spec if d.kind == "model" else None,
                   substitute_bits=d.bits if d.kind == "substitute" else None, substitute_group=d.group)


def caps_of(ask: Ask) -> dict[str, float | None]:
    """tier -> the LP's budget in bytes; None where the LP has no row (no host tier, an unlimited disk)."""
    caps: dict[str, float | None] = {}
    for tier in ("device", "host", "disk"):
        cap = ask.capacities.capacity_bytes(tier, ask.profile)
        caps[tier] = None if cap is None or (tier == "host" and not ask.profile.has_host_tier) else float(cap)
    return caps


def shape_for(ask: Ask, draft: DraftChoice, g: int, nb: int, batch: int, prefill: int) -> Shape:
    wl = ask.workload
    sizes = wl.wave_sizes(nb * batch)
    rounds = sum(expected_rounds(draft.acceptance, g, wl.gen_len - 1, n, draft.curve, draft.sequence_curves)
                 for n in sizes)
    return Shape(decode_batch=batch, num_batches=nb, prefill_batch=prefill, draft_len=g,
                 rounds=rounds, prefill_passes=sum(math.ceil(n / prefill) for n in sizes),
                 decode_context=mean_decode_context(wl.prompt_len, wl.gen_len),
                 capacity=kv_capacity(wl.prompt_len, wl.gen_len, g), prompt_len=wl.prompt_len,
                 last_context=last_decode_context(wl.prompt_len, wl.gen_len))
