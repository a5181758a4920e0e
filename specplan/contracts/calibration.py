"""Calibration: measured per-token acceptance of speculative drafts (``specplan search --calibration FILE``).

One record per (draft, target) pair, written by whoever measured it (``specplan run`` on a speculative plan, or by
hand from a published figure, saying so in ``source``)::

    {"schema_version": 1, "created_utc": "...",
     "acceptance": [{"draft": "substitute:int4", "target": "mixtral-8x22b", "per_token_acceptance_mle": 0.91,
                     "accepted_fraction": 0.855, "proposed_tokens": 4096, "accepted_tokens": 3502,
                     "source": "specplan run results/..."}]}

``per_token_acceptance_mle`` is the figure the planner uses: the per-token acceptance ``a`` of the model
``P(at least i of g proposals accepted) = a^i``, so ``E[tokens per round] = (1 - a^(g+1)) / (1 - a)``; measured, its
maximum-likelihood estimate accepted / (accepted + rounds that stopped at a rejection). It is not
``accepted_fraction`` = accepted_tokens / proposed_tokens, which is lower: a rejection ends the round, and the
proposals after it count as proposed but are never tried. Files written before the two were named say
``"acceptance"`` for ``per_token_acceptance_mle``; they read the same.

``acceptance_curve`` is the per-position acceptance measured from the accepted-length histogram of the run's
sequence-rounds (``curve_sequence_rounds`` of them): ``[P(n >= 1), .., P(n >= G)]`` at the run's draft length G.
Where a record has one, the planner uses it (``E[tokens per round] = 1 + sum_i P(n >= i)``) instead of ``a^i``,
and extends it past G at its tail's geometric ratio. Files written before the curve existed have none and read the
same (the one-parameter model).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from specplan.contracts.plan import Sampling, check_acceptance_curve, check_sequence_curves
from specplan.contracts.strict import Strict

SCHEMA_VERSION = 1


class AcceptanceRecord(Strict):
    draft: str = Field(min_length=1)  # draft label: "substitute:int4", a catalog name or a folder name
    target: str | None = None  # the target it was measured against; None = any
    per_token_acceptance_mle: float = Field(ge=0, le=1)  # ``a`` of the model above (what the planner uses)
    accepted_fraction: float | None = Field(None, ge=0, le=1)  # accepted_tokens / proposed_tokens
    proposed_tokens: int | None = Field(None, ge=1)  # draft tokens the target checked
    accepted_tokens: int | None = Field(None, ge=0)
    #: measured [P(n >= 1) .. P(n >= G)] at draft length G (see above); None: only the one-parameter model
    acceptance_curve: list[float] | None = None
    curve_sequence_rounds: int | None = Field(None, ge=1)  # sequence-rounds the curve was measured over
    #: each measured sequence's own curve (same positions): acceptance varies more between prompts than rounds
    sequence_curves: list[list[float]] | None = None
    source: str = Field(min_length=1)  # how it was measured
    #: the decoding it was measured with (acceptance depends on it); files written before sampling existed: greedy
    sampling: Sampling = Sampling()

    @model_validator(mode="before")
    @classmethod
    def _old_name(cls, data):
        """Files written before the figure was named: ``acceptance`` is ``per_token_acceptance_mle``."""
        if isinstance(data, dict) and "acceptance" in data and "per_token_acceptance_mle" not in data:
            data = {("per_token_acceptance_mle" if k == "acceptance" else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _counts(self) -> "AcceptanceRecord":
        if (self.proposed_tokens is None) != (self.accepted_tokens is None):
            raise ValueError("give both proposed_tokens and accepted_tokens, or neither")
        if self.proposed_tokens is not None and self.accepted_tokens > self.proposed_tokens:  # type: ignore[operator]
            raise ValueError("accepted_tokens cannot exceed proposed_tokens")
        if self.acceptance_curve is not None:
            check_acceptance_curve(self.acceptance_curve)
        if self.sequence_curves is not None:
            check_sequence_curves(self.sequence_curves, self.acceptance_curve)
        return self


class Calibration(Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    created_utc: str
    acceptance: list[AcceptanceRecord] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "Calibration":
        keys = [(r.draft, r.target, r.sampling.settings()) for r in self.acceptance]
        if len(keys) != len(set(keys)):
            raise ValueError("two records for the same (draft, target, sampling settings)")
        return self

    def find(self, draft: str, target: str | None = None, sampling: Sampling = Sampling()) -> AcceptanceRecord | None:
        """The record for this draft and target at these sampling settings (the seed aside), else one for this
        draft with no target at them; None if none was measured at these settings."""
        same = [r for r in self.acceptance if r.draft == draft and r.sampling.settings() == sampling.settings()]
        exact = [r for r in same if r.target == target and target is not None]
        anyt = [r for r in same if r.target is None]
        return (exact or anyt or [None])[0]
