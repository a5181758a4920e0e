"""ModelSpec: the shape of a transformer, from any HF ``config.json``, with derived sizes and FLOPs.

Parameters, bytes and matmul FLOPs are read off the model's tensor table (``spec.tensors``,
``specplan.contracts.tensors``); KV bytes come from ``specplan.contracts.memory``.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from specplan.contracts.memory import kv_bytes
from specplan.contracts.tensors import DTYPE_BYTES, TensorTable, nbytes, tensor_table
from specplan.contracts.tensors import WEIGHT_GROUPS, dtype_bytes  # noqa: F401  (re-exported: callers import them here)
from specplan.errors import ContractError

SCHEMA_VERSION = 1

Family = Literal["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
SUPPORTED_FAMILIES: tuple[str, ...] = Family.__args__  # type: ignore[attr-defined]


class ModelSpec(BaseModel):
    """Architecture of a decoder-only transformer (dense or mixture-of-experts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    family: Family
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    #: FFN width of dense layers (dense models, and the dense layers of a partly-MoE model).
    intermediate_size: int = Field(ge=0)
    num_experts: int = Field(0, ge=0)
    experts_per_token: int = Field(0, ge=0)
    moe_intermediate_size: int = Field(0, ge=0)
    #: width of the always-on shared expert (Qwen2-MoE), 0 if none.
    shared_expert_intermediate_size: int = Field(0, ge=0)
    #: indices of the MoE layers; the others are dense. Empty for dense models.
    moe_layers: tuple[int, ...] = ()
    norm_topk_prob: bool = True
    attention_bias: Literal["none", "qkv", "qkvo"] = "none"
    mlp_bias: bool = False
    #: 'per_head' (Qwen3: RMSNorm over head_dim), 'full' (OLMoE: over the whole projection) or 'none'.
    qk_norm: Literal["none", "per_head", "full"] = "none"
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = Field(4096, gt=0)
    sliding_window: int | None = None
    #: dtype of the published checkpoint.
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.num_experts:
            if not 0 < self.experts_per_token <= self.num_experts:
                raise ValueError(f"experts_per_token must be in 1..{self.num_experts}, got {self.experts_per_token}")
            if self.moe_intermediate_size <= 0:
                raise ValueError("a MoE model needs moe_intermediate_size > 0")
            if not self.moe_layers:
                raise ValueError("a MoE model needs at least one MoE layer")
        elif self.moe_layers:
            raise ValueError("moe_layers given but num_experts is 0")
        if any(not 0 <= i < self.num_layers for i in self.moe_layers):
            raise ValueError(f"moe_layers must lie in 0..{self.num_layers - 1}")
        if len(self.moe_layers) < self.num_layers and self.intermediate_size <= 0:
            raise ValueError("dense layers need intermediate_size > 0")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype '{self.dtype}'")
        return self

    # ---- structure -------------------------------------------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self._moe_layer_set

    @cached_property
    def _moe_layer_set(self) -> frozenset[int]:
        return frozenset(self.moe_layers)

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self._moe_layer_set)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ---- parameters and bytes: read off the tensor table --------------------------------------------------------

    @cached_property
    def tensors(self) -> TensorTable:
        """Every weight tensor of the model (``specplan.contracts.tensors``), built once per spec."""
        return tensor_table(self)

    def param_counts(self) -> dict[str, int]:
        """Stored parameters per weight group (``WEIGHT_GROUPS``), over all layers."""
        return dict(self.tensors.group_params)

    def active_param_counts(self) -> dict[str, int]:
        """Parameters one token touches, per weight group (routed experts: ``experts_per_token`` of them)."""
        return dict(self.tensors.active_group_params)

    @property
    def total_params(self) -> int:
        return sum(self.param_counts().values())

    @property
    def active_params(self) -> int:
        return sum(self.active_param_counts().values())

    def group_bytes(self, dtype: str | None = None) -> dict[str, int]:
        """Bytes per weight group at ``dtype`` (default: the checkpoint's)."""
        return {g: nbytes(n, dtype or self.dtype) for g, n in self.param_counts().items()}

    def weight_bytes(self, dtype: str | None = None) -> int:
        return sum(self.group_bytes(dtype).values())

    def expert_bytes(self, dtype: str | None = None) -> int:
        """Bytes of one routed expert (the unit the engine places and streams); 0 for a dense model."""
        if not self.is_moe:
            return 0
        return nbytes(self.tensors.params("experts", self.moe_layers[0], 0), dtype or self.dtype)

    # ---- KV cache and FLOPs ------------------------------------------------------------------------------------

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        """KV-cache bytes one token adds, over all layers (K and V)."""
        return kv_bytes(self, dtype or self.dtype, 1, 1)

    def matmul_flops_per_token(self) -> int:
        """Weight-matmul FLOPs of one token (2 per multiply-add), excluding attention over the context.

        Counts the projection, FFN, router and output-head matrices (the head also when tied to the embedding);
        not the embedding lookup, norms or biases.
        """
        return 2 * self.tensors.active_matmul_params

    def attention_flops_per_token(self, context_len: int) -> int:
        """Score and weighted-sum FLOPs of one new token attending to ``context_len`` positions, all layers."""
        return 4 * self.num_layers * self.q_dim * context_len

    def flops_per_token(self, context_len: int = 0) -> int:
        return self.matmul_flops_per_token() + self.attention_flops_per_token(context_len)

    def summary(self, dtype: str | None = None) -> dict[str, Any]:
        """A flat dict of the headline numbers (units in key names)."""
        dtype = dtype or self.dtype
        return {
            "name": self.name,
            "family": self.family,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "weight_bytes": self.weight_bytes(dtype),
            "dtype": dtype,
            "kv_bytes_per_token": self.kv_bytes_per_token(dtype),
            "flops_per_token": self.flops_per_token(0),
            "flops_per_token_at_4096_context": self.flops_per_token(4096),
        }

    # ---- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str | None = None, source: str = "config.json") -> "ModelSpec":
        """Build from the dict of an HF ``config.json``; raises ``ContractError`` on what it cannot read."""
        return from_hf_config(config, name, source)


def _get(config: dict[str, Any], *keys: str, default: Any = None, required: bool = False, source: str = "") -> Any:
    for k in keys:
        if k in config and config[k] is not None:
            return config[k]
    if required:
        raise ContractError(f"{source or 'config.json'}: missing '{keys[0]}'")
    return default


def from_hf_config(config: dict[str, Any], name: str | None = None, source: str = "config.json") -> ModelSpec:
    """Map the HF config of the supported families to a ``ModelSpec``."""
    if not isinstance(config, dict):
        raise ContractError(f"{source}: expected a JSON object")
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ContractError(
            f"{source}: model_type {family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    h = _get(config, "hidden_size", required=True, source=source)
    n_heads = _get(config, "num_attention_heads", required=True, source=source)
    n_layers = _get(config, "num_hidden_layers", required=True, source=source)
    n_kv = _get(config, "num_key_value_heads", default=n_heads)
    head_dim = _get(config, "head_dim", default=None)
    if head_dim is None:
        if not isinstance(h, int) or not isinstance(n_heads, int) or n_heads <= 0 or h % n_heads:
            raise ContractError(f"{source}: 'hidden_size' must be a multiple of 'num_attention_heads'")
        head_dim = h // n_heads

    rope = _get(config, "rope_parameters", default=None) or {}
    rope_theta = _get(config, "rope_theta", default=rope.get("rope_theta", 10000.0))
    scaling = _get(config, "rope_scaling", default=None)
    if scaling is None and rope.get("rope_type", "default") not in ("default", None):
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}

    fields: dict[str, Any] = dict(
        name=name or config.get("_name_or_path") or family,
        family=family,
        num_layers=n_layers,
        hidden_size=h,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=_get(config, "vocab_size", required=True, source=source),
        intermediate_size=_get(config, "intermediate_size", default=0),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        hidden_act=_get(config, "hidden_act", default="silu"),
        rms_norm_eps=_get(config, "rms_norm_eps", default=1e-5),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=_get(config, "max_position_embeddings", default=4096),
        sliding_window=config.get("sliding_window") if config.get("use_sliding_window", True) else None,
        dtype=str(_get(config, "torch_dtype", "dtype", default="bfloat16")).replace("torch.", ""),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        mlp_bias=bool(config.get("mlp_bias", False)),
    )
    if family in ("llama", "mistral", "mixtral"):
        fields["attention_bias"] = "qkvo" if config.get("attention_bias") else "none"
    elif family in ("qwen2", "qwen2_moe"):
        fields["attention_bias"] = "qkv"
    elif family in ("qwen3", "qwen3_moe", "olmoe"):
        fields["attention_bias"] = "qkvo" if config.get("attention_bias") else "none"
    if family in ("qwen3", "qwen3_moe"):
        fields["qk_norm"] = "per_head"
    elif family == "olmoe":
        fields["qk_norm"] = "full"

    if family == "mixtral":
        e = _get(config, "num_local_experts", "num_experts", required=True, source=source)
        fields.update(
            num_experts=e,
            experts_per_token=_get(config, "num_experts_per_tok", default=2),
            moe_intermediate_size=fields["intermediate_size"],
            moe_layers=tuple(range(n_layers)),
            norm_topk_prob=True,
        )
    elif family == "olmoe":
        fields.update(
            num_experts=_get(config, "num_experts", "num_local_experts", required=True, source=source),
            experts_per_token=_get(config, "num_experts_per_tok", required=True, source=source),
            moe_intermediate_size=fields["intermediate_size"],
            moe_layers=tuple(range(n_layers)),
            norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        )
    elif family in ("qwen2_moe", "qwen3_moe"):
        e = _get(config, "num_experts", "num_local_experts", required=True, source=source)
        step = _get(config, "decoder_sparse_step", default=1) or 1
        dense_only = set(config.get("mlp_only_layers") or [])
        moe_layers = tuple(i for i in range(n_layers) if e > 0 and (i + 1) % step == 0 and i not in dense_only)
        fields.update(
            num_experts=e,
            experts_per_token=_get(config, "num_experts_per_tok", required=True, source=source),
            moe_intermediate_size=_get(config, "moe_intermediate_size", required=True, source=source),
            moe_layers=moe_layers,
            norm_topk_prob=bool(config.get("norm_topk_prob", family == "qwen3_moe")),
            shared_expert_intermediate_size=_get(config, "shared_expert_intermediate_size", default=0)
            if family == "qwen2_moe"
            else 0,
        )
    from specplan.jsonio import validate

    return validate(ModelSpec, fields, source)
