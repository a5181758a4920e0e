"""The tensor table: every weight tensor of a model (canonical name, shape, group, layer, expert), derived once from
its ``ModelSpec`` (``spec.tensors``, cached on the spec).

The names are the engine's canonical ones (``engine.model.checkpoint`` maps both HF layouts to them), so the
checkpoint's shape check, the parameter counts, the placement bytes and the planner's sizes and matmul FLOPs all
read this one table. Element sizes of the planning dtypes live here too (``dtype_bytes``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from specplan.errors import ContractError

if TYPE_CHECKING:
    from specplan.contracts.model import ModelSpec

#: bytes per element of the plain dtypes the engine and the planner compute with (int4 packs two values per byte).
PLAIN_DTYPES: dict[str, float] = {
    "float64": 8,
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "int8": 1,
    "int4": 0.5,
}
#: GGUF block formats (llama.cpp's ggml types): (elements per block, bytes per block), scales included. A model read
#: from a GGUF file is planned at these sizes; the engine does not compute in them.
GGUF_BLOCKS: dict[str, tuple[int, int]] = {
    "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
    "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210),
    "iq1_s": (256, 50), "iq1_m": (256, 56), "iq2_xxs": (256, 66), "iq2_xs": (256, 74), "iq2_s": (256, 82),
    "iq3_xxs": (256, 98), "iq3_s": (256, 110), "iq4_nl": (32, 18), "iq4_xs": (256, 136),
    "tq1_0": (256, 54), "tq2_0": (256, 66), "mxfp4": (32, 17),
}
#: bytes per element of every dtype a model's weights may be planned in.
DTYPE_BYTES: dict[str, float] = {**PLAIN_DTYPES, **{k: b / n for k, (n, b) in GGUF_BLOCKS.items()}}

#: weight tensor groups, each with its own placement in a Plan.
WEIGHT_GROUPS = ("embed", "attention", "norms_router", "mlp", "experts", "shared_experts", "lm_head")


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of ``dtype`` (0.5 for int4)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ContractError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPE_BYTES)}") from None


def unpacked_dtype(dtype: str) -> str:
    """The dtype values stored as ``dtype`` are computed and cached in: a GGUF block format unpacks to float16
    (llama.cpp's default KV cache and dequantised tiles); a plain dtype is its own."""
    return "float16" if dtype in GGUF_BLOCKS else dtype


def param_bytes(spec: ModelSpec, group: str, dtype: str) -> float:
    """Bytes per parameter of ``group``'s tensors when a plan stores the weights at ``dtype``: a checkpoint that mixes
    formats (a quantised GGUF, ``spec.group_bytes_per_param``) keeps its own mix when planned at its own dtype; any
    other dtype applies to every group."""
    if dtype == spec.dtype and group in spec.group_bytes_per_param:
        return spec.group_bytes_per_param[group]
    return dtype_bytes(dtype)


def group_nbytes(spec: ModelSpec, group: str, params: int, dtype: str) -> int:
    """Bytes of ``params`` parameters of ``group`` stored at ``dtype`` (``param_bytes``), to a whole byte."""
    return int(round(params * param_bytes(spec, group, dtype)))


def nbytes(params: int, dtype: str) -> int:
    """Bytes of ``params`` elements at ``dtype``, rounded to a whole byte."""
    return int(round(params * dtype_bytes(dtype)))


@dataclass(frozen=True)
class WeightTensor:
    """One weight tensor of the model."""

    name: str  # canonical name: "embed", "final_norm", "lm_head", "layers.{i}.attn.q", "layers.{i}.experts.{e}.up"
    shape: tuple[int, ...]
    group: str  # one of WEIGHT_GROUPS
    layer: int | None  # None for embed, final_norm and lm_head
    expert: int | None  # the routed expert's index, None for every other tensor
    matmul: bool  # a matrix the forward multiplies by (not the embedding lookup, a norm or a bias)

    @property
    def params(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, dtype: str) -> int:
        """Bytes at ``dtype``."""
        return nbytes(self.params, dtype)


@dataclass(frozen=True)
class TensorTable:
    """The stored tensors of a model, plus the attention biases a checkpoint may hold though the config has none."""

    tensors: tuple[WeightTensor, ...]
    optional: tuple[WeightTensor, ...]  # tolerated in a checkpoint, not part of the model (the forward ignores them)
    tied_head: bool  # the output head multiplies by the embedding
    experts_per_token: int  # routed experts one token goes through, per MoE layer (0 for a dense model)

    @cached_property
    def by_name(self) -> dict[str, WeightTensor]:
        return {t.name: t for t in self.tensors}

    @cached_property
    def _instances(self) -> dict[tuple[str, int | None, int | None], tuple[int, int]]:
        """(group, layer, expert) -> (parameters, matmul parameters): what the engine places as one piece."""
        out: dict[tuple[str, int | None, int | None], tuple[int, int]] = {}
        for t in self.tensors:
            key = (t.group, t.layer, t.expert)
            n, m = out.get(key, (0, 0))
            out[key] = (n + t.params, m + (t.params if t.matmul else 0))
        return out

    def instances(self) -> Iterator[tuple[str, int | None, int | None, int]]:
        """(group, layer, expert, parameters) of every placed piece: a group's tensors of one layer (one expert)."""
        for (group, layer, expert), (n, _) in self._instances.items():
            yield group, layer, expert, n

    @cached_property
    def _members(self) -> dict[tuple[str, int | None, int | None], tuple[WeightTensor, ...]]:
        out: dict[tuple[str, int | None, int | None], tuple[WeightTensor, ...]] = {}
        for t in self.tensors:
            out[(t.group, t.layer, t.expert)] = out.get((t.group, t.layer, t.expert), ()) + (t,)
        return out

    def members(self, group: str, layer: int | None = None, expert: int | None = None) -> tuple[WeightTensor, ...]:
        """The tensors of one placed piece (``instances``)."""
        return self._members.get((group, layer, expert), ())

    def params(self, group: str, layer: int | None = None, expert: int | None = None) -> int:
        """Parameters of ``group``'s tensors at ``layer`` (None: the model-level ones) and ``expert``; 0 if none."""
        return self._instances.get((group, layer, expert), (0, 0))[0]

    def matmul_params(self, group: str, layer: int | None = None, expert: int | None = None) -> int:
        """Parameters of the matrices a token is multiplied by in that piece (2 FLOPs per row each)."""
        return self._instances.get((group, layer, expert), (0, 0))[1]

    @property
    def head(self) -> WeightTensor:
        """The matrix the output head multiplies by: ``lm_head``, or the embedding when tied."""
        return self.by_name["embed" if self.tied_head else "lm_head"]

    def _active(self, t: WeightTensor) -> bool:
        """Whether one token touches ``t``: every tensor but the routed experts past ``experts_per_token`` (all
        experts are alike, so the first ones stand for those a token is routed to)."""
        return t.expert is None or t.expert < self.experts_per_token

    @cached_property
    def group_params(self) -> dict[str, int]:
        """Stored parameters per weight group (every group of ``WEIGHT_GROUPS``)."""
        out = dict.fromkeys(WEIGHT_GROUPS, 0)
        for t in self.tensors:
            out[t.group] += t.params
        return out

    @cached_property
    def active_group_params(self) -> dict[str, int]:
        """Parameters one token touches, per weight group (``experts_per_token`` routed experts per MoE layer)."""
        out = dict.fromkeys(WEIGHT_GROUPS, 0)
        for t in self.tensors:
            if self._active(t):
                out[t.group] += t.params
        return out

    @cached_property
    def active_matmul_params(self) -> int:
        """Matrix parameters one token is multiplied by, the output head included (also when tied)."""
        n = sum(t.params for t in self.tensors if t.matmul and self._active(t))
        return n + (self.head.params if self.tied_head else 0)


#: the int4 CPU kernel (``_convert_weight_to_int4pack_for_cpu``) packs output rows in tiles of this many.
INT4_ROW_TILE = 16


def substitute_quantises(t: WeightTensor, bits: int, group_size: int, as_head: bool = False) -> bool:
    """Whether a substitute draft keeps a low-bit copy of ``t``: a matrix the forward multiplies by (the embedding
    only as a tied output head, ``as_head``), not a router or a shared-expert gate (they stay at full precision, as
    do norms, biases and the embedding lookup), whose input width is a whole number of groups and, at 4 bits, whose
    output rows fill the kernel's tiles."""
    if len(t.shape) != 2 or t.group == "norms_router" or t.name.endswith("shared_gate"):
        return False
    if not (t.matmul or (as_head and t.name == "embed")):
        return False
    n, k = t.shape
    if group_size and k % group_size:
        return False
    return bits == 8 or n % INT4_ROW_TILE == 0


def substitute_nbytes(t: WeightTensor, bits: int, group_size: int, dtype: str, as_head: bool = False) -> int:
    """Bytes of a substitute draft's copy of ``t``: ``bits`` per weight plus, per group of ``group_size`` input
    columns of a row (0: the whole row), a scale (4-bit: and a zero point) at ``dtype``, the activations' dtype;
    a tensor it does not quantise (``substitute_quantises``) at full size at ``dtype``."""
    if not substitute_quantises(t, bits, group_size, as_head):
        return t.nbytes(dtype)
    n, k = t.shape
    groups = n * (k // group_size if group_size else 1)
    return n * k * bits // 8 + nbytes(groups * (2 if bits == 4 else 1), dtype)


def tensor_table(spec: ModelSpec) -> TensorTable:
    """The table of ``spec`` (use the cached ``spec.tensors``)."""
    stored, optional = [], []
    for t, is_stored in _all_tensors(spec):
        (stored if is_stored else optional).append(t)
    return TensorTable(tuple(stored), tuple(optional), spec.tie_word_embeddings, spec.experts_per_token)


def _all_tensors(spec: ModelSpec) -> Iterator[tuple[WeightTensor, bool]]:
    """(tensor, stored) for every tensor of the model; not stored: an attention bias the config has none of."""
    h, q, kvd, hd = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.head_dim
    yield WeightTensor("embed", (spec.vocab_size, h), "embed", None, None, False), True
    yield WeightTensor("final_norm", (h,), "norms_router", None, None, False), True
    if not spec.tie_word_embeddings:
        yield WeightTensor("lm_head", (spec.vocab_size, h), "lm_head", None, None, True), True
    qkv_bias = spec.attention_bias in ("qkv", "qkvo")
    for i in range(spec.num_layers):
        yield _at(i, "input_norm", (h,), "norms_router", False), True
        yield _at(i, "post_attn_norm", (h,), "norms_router", False), True
        for n, shape in (("q", (q, h)), ("k", (kvd, h)), ("v", (kvd, h)), ("o", (h, q))):
            yield _at(i, f"attn.{n}", shape, "attention", True), True
        for n, size in (("q", q), ("k", kvd), ("v", kvd)):
            yield _at(i, f"attn.{n}_bias", (size,), "attention", False), qkv_bias
        yield _at(i, "attn.o_bias", (h,), "attention", False), spec.attention_bias == "qkvo"
        if spec.qk_norm != "none":
            per_head = spec.qk_norm == "per_head"
            yield _at(i, "attn.q_norm", (hd if per_head else q,), "attention", False), True
            yield _at(i, "attn.k_norm", (hd if per_head else kvd,), "attention", False), True
        if spec.is_moe_layer(i):
            yield _at(i, "router", (spec.num_experts, h), "norms_router", True), True
            for e in range(spec.num_experts):
                for t in _ffn(f"experts.{e}.", h, spec.moe_intermediate_size, False):
                    yield _at(i, t[0], t[1], "experts", t[2], e), True
            if spec.shared_expert_intermediate_size:
                for t in _ffn("shared.", h, spec.shared_expert_intermediate_size, False):
                    yield _at(i, t[0], t[1], "shared_experts", t[2]), True
                yield _at(i, "shared_gate", (1, h), "shared_experts", True), True
        else:
            for t in _ffn("mlp.", h, spec.intermediate_size, spec.mlp_bias):
                yield _at(i, t[0], t[1], "mlp", t[2]), True


def _at(layer: int, name: str, shape: tuple[int, ...], group: str, matmul: bool,
        expert: int | None = None) -> WeightTensor:
    return WeightTensor(f"layers.{layer}.{name}", shape, group, layer, expert, matmul)


def _ffn(prefix: str, h: int, inter: int, bias: bool) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, matmul) of one gated FFN: gate and up ``[inter, h]``, down ``[h, inter]``, optional biases."""
    out = [(prefix + "gate", (inter, h), True), (prefix + "up", (inter, h), True), (prefix + "down", (h, inter), True)]
    if bias:
        out += [(prefix + "gate_bias", (inter,), False), (prefix + "up_bias", (inter,), False),
                (prefix + "down_bias", (h,), False)]
    return out
