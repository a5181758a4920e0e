"""Draft candidates and their acceptance: measured (``--acceptance``, ``--calibration``) or a documented prior.

Priors are assumptions, printed with their source and stored in the plan; measure and pass ``--calibration``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from specplan.contracts.calibration import Calibration
from specplan.contracts.hardware import HardwareProfile
from specplan.contracts.model import ModelSpec
from specplan.contracts.plan import DraftSpec, Sampling
from specplan.errors import SpecplanError

#: (draft label, target name or None for any) -> (acceptance, source). Assumptions, not measurements.
PRIORS: dict[tuple[str, str | None], tuple[float, str]] = {
    ("substitute:int8", None): (
        0.95, "assumed: an 8-bit copy of the target's streamed weights agrees with the target on nearly every token "
              "(SubSpec, arXiv:2509.18344, reports acceptance lengths well above small drafts' 3-5 tokens)"),
    ("substitute:int4", None): (
        0.90, "assumed from SubSpec (arXiv:2509.18344): 4-bit substitutes of the offloaded layers, sharing the "
              "resident layers and KV cache, accept long drafts"),
    ("smollm2-135m", None): (
        0.90, "the demo target is upcycled from SmolLM2-135M, its greedy agreement with it is about 0.9 "
              "(measure it with specplan run)"),
    ("model", None): (
        0.70, "assumed: Leviathan et al. 2023 (arXiv:2211.17192) measured per-token acceptance of roughly 0.5-0.8 "
              "for small drafts of the same family"),
}


@dataclass(frozen=True)
class DraftChoice:
    spec: DraftSpec
    acceptance: float | None
    source: str | None  # where the acceptance comes from
    measured: bool
    #: the measured per-position acceptance [P(n >= 1) .. P(n >= G)] of the calibration record, when it has one
    curve: tuple[float, ...] | None = None
    #: each calibration sequence's own curve (``AcceptanceRecord.sequence_curves``), when the record has them
    sequence_curves: tuple[tuple[float, ...], ...] | None = None

    def policy_curves(self, draft_len: int) -> dict:
        """The ``Policy`` fields of this acceptance for a plan of ``draft_len``."""
        spec = bool(draft_len)
        return {"acceptance": self.acceptance if spec else None,
                "acceptance_curve": list(self.curve) if spec and self.curve else None,
                "acceptance_sequence_curves": ([list(c) for c in self.sequence_curves]
                                               if spec and self.curve and self.sequence_curves else None)}

    @property
    def label(self) -> str:
        return self.spec.label


def parse_draft(value: str, target: ModelSpec) -> DraftSpec:
    """``none``, ``substitute:int8``, ``substitute:int4``, or a catalog name / model folder with the target's vocab."""
    v = value.strip()
    if v.lower() == "none":
        return DraftSpec()
    if v.lower().startswith("substitute"):
        return parse_substitute(v)
    from specplan.catalog import load_model_spec, model_weights

    spec = load_model_spec(v)
    if spec.vocab_size != target.vocab_size:
        raise SpecplanError(f"draft '{value}' has a vocabulary of {spec.vocab_size} tokens, the target "
                            f"{target.vocab_size}: a draft must share the target's tokenizer")
    if spec.total_params >= target.total_params:
        raise SpecplanError(f"draft '{value}' ({spec.total_params / 1e9:.1f}B parameters) is not smaller than the target")
    return DraftSpec(kind="model", name=spec.name, path=model_weights(v), spec=spec)


def parse_substitute(value: str) -> DraftSpec:
    """``substitute:int4`` or ``substitute:int8``, optionally followed by ``:g<group size>`` and ``:hqq``."""
    usage = ("use substitute:int8 or substitute:int4, optionally with :g<group size> (int4: 32, 64, 128, 256; "
             "int8 also 0, one group per row) and :hqq (error-minimising scales)")
    parts = value.lower().split(":")
    bits = {"int8": 8, "int4": 4}.get(parts[1]) if len(parts) > 1 and parts[0] == "substitute" else None
    if bits is None:
        raise SpecplanError(f"unknown substitute draft '{value}': {usage}")
    fields: dict = {"kind": "substitute", "bits": bits}
    for part in parts[2:]:
        if part == "hqq" and "quantiser" not in fields:
            fields["quantiser"] = "hqq"
        elif re.fullmatch(r"g\d{1,6}", part) and "group_size" not in fields:
            fields["group_size"] = int(part[1:])
        else:
            raise SpecplanError(f"unknown substitute draft '{value}': {usage}")
    try:
        return DraftSpec(**fields)
    except ValueError as e:
        raise SpecplanError(f"substitute draft '{value}': {e.errors()[0]['msg'].removeprefix('Value error, ')}") \
            from None


#: catalog models the search tries as drafts when their vocabulary matches the target's and they are much smaller.
DEFAULT_MODEL_DRAFTS = ("smollm2-135m", "qwen2.5-0.5b", "mistral-7b")


def default_drafts(target: ModelSpec) -> list[str]:
    """What the search tries without ``--draft``: no draft, both substitutes, and the catalog drafts that share
    the target's vocabulary and have at most a quarter of its parameters."""
    from specplan.catalog import catalog_models, load_model_spec

    out = ["none", "substitute:int8", "substitute:int4"]
    for name in DEFAULT_MODEL_DRAFTS:
        if name not in catalog_models():
            continue
        spec = load_model_spec(name)
        if spec.vocab_size == target.vocab_size and spec.total_params * 4 <= target.total_params:
            out.append(name)
    return out


def acceptance_for(draft: DraftSpec, target_name: str, fixed: float | None, calibration: Calibration | None,
                   sampling: Sampling = Sampling()) -> DraftChoice:
    """The draft with its acceptance: --acceptance, then the calibration file's record at the same sampling
    settings (with its per-position curve when it has one), then the prior."""
    if draft.kind == "none":
        return DraftChoice(draft, None, None, False)
    label = draft.label
    if fixed is not None:
        return DraftChoice(draft, fixed, "given with --acceptance", True)
    if calibration is not None:
        rec = calibration.find(label, target_name, sampling)
        elsewhere = [r.sampling.label() for r in calibration.acceptance if r.draft == label]
        if rec is None and elsewhere:
            prior_note = f" (the calibration measured {label} only at {'; '.join(elsewhere)}, not {sampling.label()})"
        else:
            prior_note = ""
        if rec is not None:
            frac = f", accepted fraction {rec.accepted_fraction:.3f}" if rec.accepted_fraction is not None else ""
            if rec.acceptance_curve is None:
                return DraftChoice(draft, rec.per_token_acceptance_mle, f"calibration: {rec.source} (the per-token "
                                   f"acceptance's maximum-likelihood estimate{frac})", True)
            return DraftChoice(draft, rec.per_token_acceptance_mle, f"calibration: {rec.source} (the measured "
                               f"per-position curve P(n >= i), i = 1..{len(rec.acceptance_curve)}; per-token "
                               f"maximum-likelihood estimate {rec.per_token_acceptance_mle:.3f}{frac})", True,
                               tuple(rec.acceptance_curve),
                               tuple(map(tuple, rec.sequence_curves)) if rec.sequence_curves else None)
    base = f"substitute:int{draft.bits}" if draft.kind == "substitute" else label  # the priors ignore the grouping
    prior = PRIORS.get((base, target_name)) or PRIORS.get((base, None))
    if prior is None and draft.kind == "model":
        prior = PRIORS[("model", None)]
    assert prior is not None
    note = prior_note if calibration is not None else ""
    return DraftChoice(draft, prior[0], f"prior (assumption, not measured): {prior[1]}{note}", False)


def uncostable(spec: DraftSpec, profile: HardwareProfile) -> str | None:
    """Why ``profile`` cannot time ``spec``, or None: a substitute on a CPU runs on torch's low-bit CPU kernels,
    whose rates the profile holds only where they were fast enough to profile (``specplan profile --show`` says)."""
    if spec.kind != "substitute" or profile.device.kind != "cpu" or f"int{spec.bits}" in profile.device.dtypes:
        return None
    return (f"the profile has no int{spec.bits} matmul rates (the profiler leaves out low-bit kernels much slower "
            f"than float32 on this CPU; `specplan profile --show` says how slow): a {spec.label} draft cannot be "
            f"timed here")


def choices(values: list[str] | None, target: ModelSpec, target_name: str, fixed: float | None,
            calibration: Calibration | None, sampling: Sampling = Sampling(),
            profile: HardwareProfile | None = None) -> list[DraftChoice]:
    """The drafts to search with their acceptance; ``values`` None: ``default_drafts`` less those ``profile``
    cannot time (asked for by name, such a draft is an error)."""
    labels = values or default_drafts(target)
    out, seen = [], set()
    for v in labels:
        spec = parse_draft(v, target)
        if spec.label in seen:
            continue
        seen.add(spec.label)
        why = uncostable(spec, profile) if profile is not None else None
        if why and values:
            raise SpecplanError(f"--draft {v}: {why}; search without it")
        if why:
            continue
        out.append(acceptance_for(spec, target_name, fixed, calibration, sampling))
    return out
