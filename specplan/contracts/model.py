"""ModelSpec: the shape of a transformer, from any HF ``config.json``, with derived sizes and FLOPs.

Parameters, bytes and matmul FLOPs are read off the model's tensor table (``spec.tensors``,
``specplan.contracts.tensors``); KV bytes come from ``specplan.contracts.memory``.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from pydantic import Field, model_validator

from specplan.contracts.memory import kv_bytes
from specplan.contracts.strict import Strict
from specplan.contracts.tensors import DTYPE_BYTES, TensorTable, group_nbytes, tensor_table, unpacked_dtype
from specplan.contracts.tensors import WEIGHT_GROUPS, dtype_bytes  # noqa: F401  (re-exported: callers import them here)
from specplan.errors import ContractError

SCHEMA_VERSION = 1

Family = Literal["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
SUPPORTED_FAMILIES: tuple[str, ...] = Family.__args__  # type: ignore[attr-defined]


class ModelSpec(Strict):
    """Architecture of a decoder-only transformer (dense or mixture-of-experts)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    family: Family
    num_layers: int = Field(gt=0, le=1024)  # MAX_LAYERS
    hidden_size: int = Field(gt=0, le=1 << 20)
    num_heads: int = Field(gt=0, le=1 << 14)
    num_kv_heads: int = Field(gt=0, le=1 << 14)
    head_dim: int = Field(gt=0, le=1 << 14)
    vocab_size: int = Field(gt=0, le=1 << 24)
    #: FFN width of dense layers (dense models, and the dense layers of a partly-MoE model).
    intermediate_size: int = Field(ge=0, le=1 << 22)
    num_experts: int = Field(0, ge=0, le=1024)  # MAX_EXPERTS
    experts_per_token: int = Field(0, ge=0)
    moe_intermediate_size: int = Field(0, ge=0, le=1 << 22)
    #: width of the always-on shared expert (Qwen2-MoE), 0 if none.
    shared_expert_intermediate_size: int = Field(0, ge=0, le=1 << 22)
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
    max_position_embeddings: int = Field(4096, gt=0, le=1 << 40)
    sliding_window: int | None = None
    #: dtype of the published checkpoint (a GGUF file: the block format holding most of its parameters).
    dtype: str = "bfloat16"
    #: bytes per parameter of the weight groups a checkpoint stores otherwise than ``dtype`` says (a GGUF's
    #: embedding in q8_0, norms in float32, a q6_k tensor among q4_k ones: the group's average over its tensors);
    #: empty for checkpoints with one dtype. Read through ``contracts.tensors.param_bytes``.
    group_bytes_per_param: dict[str, float] = {}
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
        if set(self.group_bytes_per_param) - set(WEIGHT_GROUPS):
            raise ValueError(f"group_bytes_per_param: unknown groups "
                             f"{sorted(set(self.group_bytes_per_param) - set(WEIGHT_GROUPS))}")
        if not all(0 < b <= 8 for b in self.group_bytes_per_param.values()):
            raise ValueError("group_bytes_per_param: bytes per parameter must lie in (0, 8]")
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
        """Bytes per weight group at ``dtype`` (default: the checkpoint's, with its per-group formats)."""
        d = dtype or self.dtype
        return {g: group_nbytes(self, g, n, d) for g, n in self.param_counts().items()}

    def weight_bytes(self, dtype: str | None = None) -> int:
        return sum(self.group_bytes(dtype).values())

    def expert_bytes(self, dtype: str | None = None) -> int:
        """Bytes of one routed expert (the unit the engine places and streams); 0 for a dense model."""
        if not self.is_moe:
            return 0
        return group_nbytes(self, "experts", self.tensors.params("experts", self.moe_layers[0], 0), dtype or self.dtype)

    @property
    def kv_dtype(self) -> str:
        """The KV cache's default dtype: the checkpoint's, unpacked for a GGUF block format (float16)."""
        return unpacked_dtype(self.dtype)

    # ---- KV cache and FLOPs ------------------------------------------------------------------------------------

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        """KV-cache bytes one token adds, over all layers (K and V)."""
        return kv_bytes(self, dtype or self.kv_dtype, 1, 1)

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
            "kv_bytes_per_token": self.kv_bytes_per_token(unpacked_dtype(dtype)),
            "flops_per_token": self.flops_per_token(0),
            "flops_per_token_at_4096_context": self.flops_per_token(4096),
        }

    # ---- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str | None = None, source: str = "config.json") -> "ModelSpec":
        """Build from the dict of an HF ``config.json``; raises ``ContractError`` on what it cannot read."""
        return from_hf_config(config, name, source)


#: sizes beyond any published model: a config past them is a typo or garbage, refused before anything is built.
MAX_LAYERS = 1024
MAX_EXPERTS = 1024

_EXPECTED = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", dict: "a JSON object",
             list: "a list"}


def _is(value: Any, kind: type) -> bool:
    if kind in (int, float) and isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _get(config: dict[str, Any], *keys: str, default: Any = None, required: bool = False, source: str = "",
         kind: type | None = None) -> Any:
    """The first of ``keys`` present (and not null); of type ``kind`` or a one-line ``ContractError``."""
    for k in keys:
        if k in config and config[k] is not None:
            value = config[k]
            if kind is not None and not _is(value, kind):
                got = repr(value)
                got = got if len(got) <= 60 else got[:57] + "..."
                raise ContractError(f"{source or 'config.json'}: field '{k}': expected {_EXPECTED[kind]}, got {got}")
            return value
    if required:
        raise ContractError(f"{source or 'config.json'}: missing '{keys[0]}'")
    return default


def _count(config: dict[str, Any], key: str, most: int, source: str, *aliases: str, required: bool = True,
           default: int = 0) -> int:
    n = _get(config, key, *aliases, required=required, default=default, source=source, kind=int)
    if not 0 <= n <= most:
        raise ContractError(f"{source}: field '{key}': expected a whole number in 0..{most}, got {n}")
    return n


def from_hf_config(config: dict[str, Any], name: str | None = None, source: str = "config.json") -> ModelSpec:
    """Map the HF config of the supported families to a ``ModelSpec``; strict about types (no coercion)."""
    if not isinstance(config, dict):
        raise ContractError(f"{source}: expected a JSON object")
    family = config.get("model_type")
    if not isinstance(family, str) or family not in SUPPORTED_FAMILIES:
        shown = repr(family) if len(repr(family)) <= 60 else repr(family)[:57] + "..."
        raise ContractError(
            f"{source}: model_type {shown} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )

    def get(*keys: str, kind: type | None = None, default: Any = None, required: bool = False) -> Any:
        return _get(config, *keys, default=default, required=required, source=source, kind=kind)

    h = get("hidden_size", required=True, kind=int)
    n_heads = get("num_attention_heads", required=True, kind=int)
    n_layers = _count(config, "num_hidden_layers", MAX_LAYERS, source)
    n_kv = get("num_key_value_heads", default=n_heads, kind=int)
    head_dim = get("head_dim", default=None, kind=int)
    if head_dim is None:
        if n_heads <= 0 or h % n_heads:
            raise ContractError(f"{source}: 'hidden_size' must be a multiple of 'num_attention_heads'")
        head_dim = h // n_heads

    rope = get("rope_parameters", default=None, kind=dict) or {}
    rope_theta = get("rope_theta", default=rope.get("rope_theta", 10000.0), kind=float)
    scaling = get("rope_scaling", default=None, kind=dict)
    if scaling is None and rope.get("rope_type", "default") not in ("default", None):
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    sliding = get("sliding_window", kind=int) if get("use_sliding_window", default=True, kind=bool) else None
    name_or_path = get("_name_or_path", kind=str)

    fields: dict[str, Any] = dict(
        name=name or name_or_path or family,
        family=family,
        num_layers=n_layers,
        hidden_size=h,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=get("vocab_size", required=True, kind=int),
        intermediate_size=get("intermediate_size", default=0, kind=int),
        tie_word_embeddings=get("tie_word_embeddings", default=False, kind=bool),
        hidden_act=get("hidden_act", default="silu", kind=str),
        rms_norm_eps=get("rms_norm_eps", default=1e-5, kind=float),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=get("max_position_embeddings", default=4096, kind=int),
        sliding_window=sliding,
        dtype=get("torch_dtype", "dtype", default="bfloat16", kind=str).replace("torch.", ""),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        mlp_bias=get("mlp_bias", default=False, kind=bool),
    )
    attention_bias = get("attention_bias", default=False, kind=bool)
    if family in ("llama", "mistral", "mixtral"):
        fields["attention_bias"] = "qkvo" if attention_bias else "none"
    elif family in ("qwen2", "qwen2_moe"):
        fields["attention_bias"] = "qkv"
    elif family in ("qwen3", "qwen3_moe", "olmoe"):
        fields["attention_bias"] = "qkvo" if attention_bias else "none"
    if family in ("qwen3", "qwen3_moe"):
        fields["qk_norm"] = "per_head"
    elif family == "olmoe":
        fields["qk_norm"] = "full"

    if family == "mixtral":
        e = _count(config, "num_local_experts", MAX_EXPERTS, source, "num_experts")
        fields.update(
            num_experts=e,
            experts_per_token=get("num_experts_per_tok", default=2, kind=int),
            moe_intermediate_size=fields["intermediate_size"],
            moe_layers=tuple(range(n_layers)),
            norm_topk_prob=True,
        )
    elif family == "olmoe":
        fields.update(
            num_experts=_count(config, "num_experts", MAX_EXPERTS, source, "num_local_experts"),
            experts_per_token=get("num_experts_per_tok", required=True, kind=int),
            moe_intermediate_size=fields["intermediate_size"],
            moe_layers=tuple(range(n_layers)),
            norm_topk_prob=get("norm_topk_prob", default=False, kind=bool),
        )
    elif family in ("qwen2_moe", "qwen3_moe"):
        e = _count(config, "num_experts", MAX_EXPERTS, source, "num_local_experts")
        step = get("decoder_sparse_step", default=1, kind=int) or 1
        dense_only = get("mlp_only_layers", default=[], kind=list)
        if not all(_is(i, int) for i in dense_only):
            raise ContractError(f"{source}: field 'mlp_only_layers': expected a list of layer numbers")
        dense_only = set(dense_only)
        moe_layers = tuple(i for i in range(n_layers) if e > 0 and (i + 1) % step == 0 and i not in dense_only)
        fields.update(
            num_experts=e,
            experts_per_token=get("num_experts_per_tok", required=True, kind=int),
            moe_intermediate_size=get("moe_intermediate_size", required=True, kind=int),
            moe_layers=moe_layers,
            norm_topk_prob=get("norm_topk_prob", default=family == "qwen3_moe", kind=bool),
            shared_expert_intermediate_size=get("shared_expert_intermediate_size", default=0, kind=int)
            if family == "qwen2_moe"
            else 0,
        )
    from specplan.jsonio import validate

    return validate(ModelSpec, fields, source)
