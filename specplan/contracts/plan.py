"""Plan: how to run one model on one machine (``plan.json``), written by ``specplan search``.

The placement is already rounded to what the engine really places: whole tensors of a layer, whole experts.
The prediction is computed from that rounded placement.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from specplan.contracts.hardware import HardwareProfile
from specplan.contracts.model import DTYPE_BYTES, ModelSpec
from specplan.contracts.strict import Strict as _Strict
from specplan.contracts.tensors import group_nbytes

SCHEMA_VERSION = 1

Tier = Literal["device", "host", "disk"]
TIERS: tuple[str, ...] = ("device", "host", "disk")


class ModelRef(_Strict):
    """The target model: a catalog name or a local folder, and its architecture."""

    name: str
    path: str | None = None  # local HF folder with weights, if the plan was made for one
    spec: ModelSpec


#: group sizes a substitute draft of each width takes, the default first: the int4 CPU kernel's group sizes;
#: 8-bit per output row (0, the int8 kernel's layout) or in groups
SUBSTITUTE_GROUP_SIZES: dict[int, tuple[int, ...]] = {4: (64, 32, 128, 256), 8: (0, 32, 64, 128, 256)}


class DraftSpec(_Strict):
    """The speculative draft: none, a small model, or a quantised substitute of the target."""

    kind: Literal["none", "model", "substitute"] = "none"
    name: str | None = None  # catalog name or folder of a draft model
    path: str | None = None  # local weights folder of the draft model
    bits: Literal[4, 8] | None = None  # substitute: bits per weight of the quantised copy
    #: substitute: input columns sharing one scale (0: one group per output row); None: the default for its bits,
    #: 64 (4-bit) or 0 (8-bit) (``group``)
    group_size: int | None = Field(None, ge=0, le=1 << 16)
    #: substitute: how scales are chosen: round-to-nearest from each group's range (None, the default), or
    #: error-minimising (HQQ-style) (``method``)
    quantiser: Literal["rtn", "hqq"] | None = None
    spec: ModelSpec | None = None  # architecture of a draft model

    @model_validator(mode="after")
    def _consistent(self) -> "DraftSpec":
        if self.kind == "model" and (self.spec is None or not self.name):
            raise ValueError("a draft of kind 'model' needs a name and a spec")
        if self.kind == "substitute":
            if self.bits is None:
                raise ValueError("a draft of kind 'substitute' needs bits (4 or 8)")
            if self.group not in SUBSTITUTE_GROUP_SIZES[self.bits]:
                sizes = ", ".join(map(str, SUBSTITUTE_GROUP_SIZES[self.bits]))
                raise ValueError(f"an int{self.bits} substitute takes a group size of {sizes}"
                                 f"{' (0: one group per row)' if self.bits == 8 else ''}, not {self.group}")
        elif self.group_size is not None or self.quantiser is not None:
            raise ValueError("only a substitute draft takes a group size and a quantiser")
        if self.kind == "none" and (self.name or self.spec or self.bits):
            raise ValueError("a draft of kind 'none' takes no name, spec or bits")
        return self

    @property
    def group(self) -> int:
        """A substitute's group size (the default for its bits where the plan leaves it unset); 0 otherwise."""
        if self.kind != "substitute":
            return 0
        if self.group_size is not None:
            return self.group_size
        return SUBSTITUTE_GROUP_SIZES[self.bits or 8][0]

    @property
    def method(self) -> str:
        """A substitute's quantiser: ``rtn`` unless the plan says ``hqq``."""
        return self.quantiser or "rtn"

    @property
    def label(self) -> str:
        """``substitute:int4`` (with ``:g<size>`` / ``:hqq`` where not the defaults), the model's name, or none."""
        if self.kind == "substitute":
            extra = "" if self.group == SUBSTITUTE_GROUP_SIZES[self.bits][0] else f":g{self.group}"
            return f"substitute:int{self.bits}{extra}" + (":hqq" if self.method == "hqq" else "")
        if self.kind == "model":
            return self.name or "model"
        return "none"


#: the largest workload a plan describes: beyond it, searching and simulating take hours, not seconds.
MAX_TOKENS = 1 << 24
MAX_PROMPTS = 1 << 16


class Sampling(_Strict):
    """How tokens are chosen: greedy (temperature 0), or sampled from the softmax at ``temperature`` of the top-k
    tokens (0: all) within the top-p nucleus (1: all); ``seed`` makes every sequence's draws repeatable."""

    temperature: float = Field(0.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1 << 24)
    seed: int = Field(0, ge=0, lt=1 << 63)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def settings(self) -> tuple[float, float, int]:
        """What changes the output distribution (and so the acceptance): not the seed; greedy is one setting."""
        return (0.0, 1.0, 0) if self.greedy else (self.temperature, self.top_p, self.top_k)

    def label(self) -> str:
        if self.greedy:
            return "greedy"
        return f"temperature {self.temperature:g}, top-p {self.top_p:g}, top-k {self.top_k or 'all'}, seed {self.seed}"


class Workload(_Strict):
    prompt_len: int = Field(gt=0, le=MAX_TOKENS)  # tokens per prompt
    gen_len: int = Field(gt=0, le=MAX_TOKENS)  # new tokens per prompt (throughput never counts tokens past this)
    num_prompts: int = Field(gt=0, le=MAX_PROMPTS)
    sampling: Sampling = Sampling()

    def wave_sizes(self, wave: int) -> list[int]:
        """Sequences of each wave of at most ``wave`` sequences: full waves, then the rest."""
        n = self.num_prompts
        return [wave] * (n // wave) + ([n % wave] if n % wave else [])


def check_acceptance_curve(curve: list[float]) -> None:
    """A per-position acceptance curve ``P(n >= i)``, i = 1..len: at least one value, each in [0, 1], none above the
    one before it (``ValueError`` otherwise)."""
    if not curve:
        raise ValueError("an acceptance curve needs P(n >= 1) at least")
    if any(not 0.0 <= x <= 1.0 for x in curve):
        raise ValueError("an acceptance curve's values P(n >= i) lie in [0, 1]")
    if any(b > a + 1e-12 for a, b in zip(curve, curve[1:])):
        raise ValueError("an acceptance curve P(n >= i) never rises with i")


def check_sequence_curves(curves: list[list[float]], pooled: list[float] | None) -> None:
    """Per-sequence curves: at least one, each a valid curve of the pooled curve's length."""
    if pooled is None:
        raise ValueError("per-sequence acceptance curves come with the pooled acceptance_curve")
    if not curves:
        raise ValueError("per-sequence acceptance curves: give at least one, or none (null)")
    for c in curves:
        check_acceptance_curve(c)
        if len(c) != len(pooled):
            raise ValueError(f"a per-sequence acceptance curve has {len(c)} positions, the pooled curve {len(pooled)}")


class Policy(_Strict):
    prefill_batch: int = Field(gt=0)
    decode_batch: int = Field(gt=0)  # sequences per batch
    num_batches: Literal[1, 2] = 1  # batches interleaved so the draft works while the target waits (SpecOffload)
    draft_len: int = Field(0, ge=0)  # tokens proposed per round; 0 = no speculation
    attention_on: Literal["device", "host"] = "device"  # where decode attention runs
    experts_on: Literal["device", "host"] = "device"  # where non-resident experts compute (stream vs Fiddler)
    expert_fetch: Literal["routed", "layer"] = "routed"  # stream only the routed experts, or the whole layer
    prefetch_depth: int = Field(1, ge=0)  # layers fetched ahead of compute (staging buffers = depth + 1)
    acceptance: float | None = Field(None, ge=0, le=1)  # per-token acceptance the prediction assumes
    #: measured P(n >= i) for i = 1..len (a calibration's curve): the prediction uses it instead of ``acceptance``
    #: (past its length, extended at its tail's geometric ratio: ``planner.expect.survival``); None: ``a^i``
    acceptance_curve: list[float] | None = None
    #: each calibration sequence's own P(n >= i) (``AcceptanceRecord.sequence_curves``): the expected rounds of a
    #: batch, which its slowest sequence sets, treat each sequence as a draw from these (``expect.expected_rounds``)
    acceptance_sequence_curves: list[list[float]] | None = None
    weight_dtype: str = "bfloat16"
    kv_dtype: str = "bfloat16"

    @model_validator(mode="after")
    def _dtypes(self) -> "Policy":
        for d in (self.weight_dtype, self.kv_dtype):
            if d not in DTYPE_BYTES:
                raise ValueError(f"unknown dtype '{d}'; use one of {', '.join(DTYPE_BYTES)}")
        if self.draft_len > 0 and self.acceptance is None:
            raise ValueError("speculative plans (draft_len > 0) need an acceptance")
        if self.acceptance_curve is not None:
            if self.draft_len == 0:
                raise ValueError("acceptance_curve is for speculative plans (draft_len > 0)")
            check_acceptance_curve(self.acceptance_curve)
        if self.acceptance_sequence_curves is not None:
            check_sequence_curves(self.acceptance_sequence_curves, self.acceptance_curve)
        return self

    @property
    def speculative(self) -> bool:
        return self.draft_len > 0


class LayerPlacement(_Strict):
    """Where each tensor group of one layer lives."""

    attention: Tier
    norms_router: Tier
    kv_cache: Tier
    mlp: Tier | None = None  # the FFN of a dense layer
    experts: list[Tier] = []  # MoE layer: one tier per routed expert
    shared_experts: Tier | None = None


class Placement(_Strict):
    embed: Tier
    lm_head: Tier
    final_norm: Tier
    layers: list[LayerPlacement]
    draft_weights: Tier = "device"
    draft_kv: Tier = "device"

    def check(self, spec: ModelSpec) -> None:
        """Raise ``ValueError`` if the placement does not match the model's structure."""
        if len(self.layers) != spec.num_layers:
            raise ValueError(f"placement has {len(self.layers)} layers, the model {spec.num_layers}")
        for i, lp in enumerate(self.layers):
            if spec.is_moe_layer(i):
                if len(lp.experts) != spec.num_experts or lp.mlp is not None:
                    raise ValueError(f"layer {i} is MoE: needs {spec.num_experts} expert tiers and no mlp")
                if (lp.shared_experts is None) != (spec.shared_expert_intermediate_size == 0):
                    raise ValueError(f"layer {i}: shared_experts tier must be given iff the model has one")
            elif lp.mlp is None or lp.experts or lp.shared_experts is not None:
                raise ValueError(f"layer {i} is dense: needs an mlp tier and no experts")

    def group_bytes(self, spec: ModelSpec, weight_dtype: str) -> dict[str, dict[str, int]]:
        """Weight bytes per group per tier (the human summary and the capacity check), one placed piece at a time
        from the model's tensor table; only the groups the model has."""
        out: dict[str, dict[str, int]] = {}
        for group, layer, expert, params in spec.tensors.instances():
            row = out.setdefault(group, {t: 0 for t in TIERS})
            row[self.tier_of(group, layer, expert)] += group_nbytes(spec, group, params, weight_dtype)
        return out

    def tier_of(self, group: str, layer: int | None, expert: int | None) -> Tier:
        """The tier of one placed piece: ``group``'s tensors of ``layer`` (None: model-level) and ``expert``."""
        if layer is None:
            return {"embed": self.embed, "lm_head": self.lm_head, "norms_router": self.final_norm}[group]
        lp = self.layers[layer]
        if group == "experts":
            return lp.experts[expert]  # type: ignore[index]
        tier = {"attention": lp.attention, "norms_router": lp.norms_router, "mlp": lp.mlp,
                "shared_experts": lp.shared_experts}[group]
        assert tier is not None, f"layer {layer} has no {group} tier"
        return tier

    @classmethod
    def uniform(cls, spec: ModelSpec, tier: Tier = "device", kv: Tier | None = None) -> "Placement":
        """Everything on one tier (KV on ``kv`` if given): the simplest valid placement."""
        layers = []
        for i in range(spec.num_layers):
            moe = spec.is_moe_layer(i)
            layers.append(
                LayerPlacement(
                    attention=tier,
                    norms_router=tier,
                    kv_cache=kv or ("host" if tier == "disk" else tier),
                    mlp=None if moe else tier,
                    experts=[tier] * spec.num_experts if moe else [],
                    shared_experts=tier if moe and spec.shared_expert_intermediate_size else None,
                )
            )
        return cls(embed=tier, lm_head=tier, final_norm=tier, layers=layers)


class Headroom(_Strict):
    """Host RAM a plan leaves outside its budgets, in bytes: the engine process's own resident bytes outside the
    plan's tensors (``HardwareProfile.process_resident``) and a reserve for the operating system. A run's peak
    resident set stays within the plan's host-RAM bytes plus ``process_bytes``."""

    process_bytes: int = Field(ge=0)
    os_bytes: int = Field(ge=0)
    source: str = Field(min_length=1)  # where process_bytes comes from (measured, or the documented default)

    @property
    def total_bytes(self) -> int:
        return self.process_bytes + self.os_bytes

    @classmethod
    def of(cls, profile: HardwareProfile) -> "Headroom":
        process, source = profile.process_resident()
        return cls(process_bytes=process, os_bytes=profile.os_reserve_bytes(), source=source)


class Capacities(_Strict):
    """Budgets the plan was made for, in bytes; ``capacity_bytes`` resolves the one a tier has."""

    device_bytes: int = Field(gt=0)
    #: the host tier's budget; None = all of the profile's host memory (``profile.host.memory_bytes``). A machine
    #: without a host tier (``HardwareProfile.has_host_tier``) places nothing there, whatever the budget.
    host_bytes: int | None = Field(None, gt=0)
    #: None = not limited.
    disk_bytes: int | None = Field(None, gt=0)
    #: host RAM reserved outside the budgets (the process and the OS); None in plans written before it existed.
    headroom: Headroom | None = None

    def capacity_bytes(self, tier: str, profile: HardwareProfile) -> int | None:
        """The effective budget of ``tier`` on ``profile``'s machine; None only for an unlimited disk."""
        if tier == "host":
            return self.host_bytes if self.host_bytes is not None else profile.host.memory_bytes
        return {"device": self.device_bytes, "disk": self.disk_bytes}[tier]


class Prediction(_Strict):
    """What the planner expects. Every throughput says whether it is decode-only or end-to-end."""

    decode_tok_s: float = Field(ge=0)  # generated tokens / decode time (prefill excluded)
    e2e_tok_s: float = Field(ge=0)  # generated tokens / (prefill + decode)
    prefill_s: float = Field(ge=0)
    decode_s: float = Field(ge=0)
    total_s: float = Field(ge=0)
    ttft_s: float = Field(ge=0)  # time to first token of the first batch
    round_s: float = Field(ge=0)  # one steady-state decode round over all interleaved batches
    tokens_per_round: float = Field(ge=0)  # expected committed tokens per round, all sequences
    busy_s: dict[str, float]  # per resource, whole run
    bottleneck: str  # the resource that binds in steady-state decode
    peak_bytes: dict[str, int]  # per tier
    acceptance: float | None = None
    # optional detail (planner): one steady-state decode round, and what the prediction assumes
    round_busy_s: dict[str, float] = {}  # per physical resource, one round (all interleaved batches)
    round_chain_s: float = Field(0.0, ge=0)  # one batch's serial chain (compute + on-demand transfers)
    round_stream_s: float = Field(0.0, ge=0)  # one batch's drafting + the fetches that cannot run ahead of it
    prefill_pass_s: float = Field(0.0, ge=0)  # one full prefill pass
    decode_context_len: int = Field(0, ge=0)  # KV length the round was costed at (mean over decode)
    tokens_per_seq_round: float = Field(1.0, ge=0)  # E[tokens one sequence commits per round]
    assumptions: list[str] = []  # e.g. where the acceptance figure comes from


class Plan(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    created_utc: str
    command: str | None = None
    model: ModelRef
    draft: DraftSpec = DraftSpec()
    profile: HardwareProfile  # embedded, so the plan simulates and runs the same way anywhere
    capacities: Capacities
    workload: Workload
    policy: Policy
    placement: Placement
    prediction: Prediction | None = None
    #: how the search found the plan (LP objective, continuous solution, candidates evaluated ...); numbers only
    search: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Plan":
        self.placement.check(self.model.spec)
        if self.policy.speculative and self.draft.kind == "none":
            raise ValueError("policy.draft_len > 0 but the draft is 'none'")
        if not self.policy.speculative and self.draft.kind != "none":
            raise ValueError("a draft is given but policy.draft_len is 0")
        return self
