"""The forward pass: one implementation for every supported family, with explicit weight handles and a pluggable
FFN (dense or MoE).

The forward never owns weights. It asks a ``WeightSource`` for them layer by layer (``layer(i)``), and in MoE layers
only for the experts the router picked (``experts(i, ids)``), then says when it is done with a layer (``release``):
the runtime's tiered store decides where each tensor comes from (resident, host, or streamed from disk).

Batches are ragged and right-padded; one mechanism serves prefill, decode and (later) speculative verification.
Sequence ``b`` has ``kv.lengths[b]`` cached positions; its ``T`` new tokens get positions ``lengths[b] + t``, only the
first ``num_new[b]`` of them are real, query ``t`` attends to keys ``j <= lengths[b] + t`` (and inside the sliding
window, if any). Attention is ``torch.nn.functional.scaled_dot_product_attention`` with an explicit boolean mask,
run on the device that holds the layer's KV cache. RoPE tables and router probabilities are computed in float32
whatever the compute dtype, as in the reference implementations; everything else runs in the weights' dtype.

Semantics (RoPE variants, RMSNorm, routing, shared experts, q/k norms) follow transformers' modeling code for
llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe and olmoe.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import ContextManager, Protocol

import torch
import torch.nn.functional as F

from specplan.contracts.memory import causal_positions, kv_bytes, kv_capacity
from specplan.contracts.model import ModelSpec
from specplan.contracts.rows import bucket_rows
from specplan.engine.model.blocked import BlockedReader
from specplan.engine.model.checkpoint import convert_scratch

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
ROPE_TYPES = ("default", "linear", "llama3")


class WeightSource(Protocol):
    """Where the forward gets its weights, by the canonical names of ``checkpoint.py``."""

    def tensor(self, name: str) -> torch.Tensor: ...  # "embed", "final_norm", "lm_head"

    def layer(self, i: int) -> Mapping[str, torch.Tensor]: ...  # non-expert tensors, keys without "layers.{i}."

    def experts(self, i: int, ids: Sequence[int]) -> Mapping[int, Mapping[str, torch.Tensor]]: ...

    def release(self, i: int) -> None: ...


class Tracer(Protocol):
    """Receives one span per compute op; ``name`` is the planner's op name (``L3.attn_proj``, ``L3.E5``, ...)."""

    def span(self, name: str, resource: str, layer: int | None, flops: float, bytes: float) -> ContextManager: ...


_NO_SPAN = contextlib.nullcontext()


def _span(tracer: Tracer | None, name: str, resource: str, layer: int | None, flops: float, nbytes: float):
    return _NO_SPAN if tracer is None else tracer.span(name, resource, layer, flops, nbytes)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.nbytes for t in tensors if t is not None)  # a tensor's, or a low-bit weight's packed bytes


# ---- an in-memory weight source ----------------------------------------------------------------------------------


class MemorySource:
    """Every tensor held in memory: the simplest ``WeightSource`` (tests, all-resident runs)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = dict(tensors)
        self._layers: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in self.tensors.items():
            parts = name.split(".", 2)
            if parts[0] == "layers" and not parts[2].startswith("experts."):
                self._layers.setdefault(int(parts[1]), {})[parts[2]] = t

    @classmethod
    def from_checkpoint(cls, ckpt, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        blocked: bool = False):
        """Read every tensor of an opened ``Checkpoint``, converted to ``dtype`` (``blocked``: its matrices in the
        CPU kernel's layout, ``model/blocked.py``)."""
        scratch = convert_scratch()
        reader = BlockedReader(ckpt, dtype, blocked and torch.device(device).type == "cpu")
        tensors = {n: reader.read(n, scratch) for n in ckpt.tensors}
        reader.close()
        tensors = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in tensors.items()}
        if "lm_head" not in tensors:  # tied head
            tensors["lm_head"] = tensors["embed"]
        return cls(tensors)

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        return self._layers.get(i, {})

    def experts(self, i: int, ids: Sequence[int]) -> dict[int, dict[str, torch.Tensor]]:
        return {e: {p: self.tensors[f"layers.{i}.experts.{e}.{p}"] for p in ("gate", "up", "down")} for e in ids}

    def release(self, i: int) -> None:
        pass


# ---- building blocks ---------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_type(spec: ModelSpec) -> str:
    s = spec.rope_scaling or {}
    return s.get("rope_type", s.get("type", "default")) or "default"


def inv_freq(spec: ModelSpec) -> torch.Tensor:
    """RoPE inverse frequencies (float32) for the spec's rope type: default, linear, or llama3."""
    dim = spec.head_dim
    freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind, s = rope_type(spec), spec.rope_scaling or {}
    if kind == "default":
        return freq
    if kind == "linear":
        return freq / s["factor"]
    if kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s.get("original_max_position_embeddings", spec.max_position_embeddings)
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > old / lo, freq / factor, freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")


def rope_tables(freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and signed sin ``[B, 1, T, head_dim]`` for integer ``positions [B, T]`` (computed in float32): the sin's
    first half negated, as ``apply_rope`` takes it."""
    angles = positions[..., None].float() * freq.to(positions.device)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1)[:, None].to(dtype), torch.cat((-sin, sin), dim=-1)[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``sin`` from ``rope_tables`` (its first half negated), so the rotation
    is one roll: ``rotate_half(x) * sin == roll(x) * signed_sin`` exactly (negation is exact)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def attention_mask(positions: torch.Tensor, kv_len: int, sliding_window: int | None, groups: int = 1) -> torch.Tensor:
    """Boolean ``[B, 1, groups * T, kv_len]``: query at position p sees keys j <= p (and j > p - window); each
    query row repeated for the ``groups`` query heads that share a KV head (the rows ``attend`` stacks)."""
    j = torch.arange(kv_len, device=positions.device)
    p = positions[:, :, None]
    mask = j <= p
    if sliding_window:
        mask &= j > p - sliding_window
    B, T, L = mask.shape
    return mask[:, None, None].expand(B, 1, groups, T, L).reshape(B, 1, groups * T, L)


def _linear(x, w, b=None):
    """``x @ w.T + b``; ``w`` a tensor, a blocked one (``blocked.BlockedLinear``, a resident weight's) or a low-bit
    one (``quant.LowBitLinear``, a substitute draft's)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    y = w(x)
    return y if b is None else y + b


def gated_ffn(x: torch.Tensor, w: Mapping[str, torch.Tensor], act, prefix: str = "") -> torch.Tensor:
    """down(act(gate(x)) * up(x)); ``w`` holds ``{prefix}gate``/``up``/``down`` (and optional ``_bias``)."""
    g = _linear(x, w[prefix + "gate"], w.get(prefix + "gate_bias"))
    u = _linear(x, w[prefix + "up"], w.get(prefix + "up_bias"))
    return _linear(act(g) * u, w[prefix + "down"], w.get(prefix + "down_bias"))


# ---- the forward -------------------------------------------------------------------------------------------------

Resource = str | Sequence[str] | Callable[..., str]


def _resource(r: Resource, *key) -> str:
    """A label: the same for all, per layer (a sequence indexed by layer), or ``f(*key)``."""
    if isinstance(r, str):
        return r
    if callable(r):
        return r(*key)
    return r[key[0]]


def forward(spec: ModelSpec, src: WeightSource, kv, tokens: torch.Tensor, num_new: torch.Tensor | None = None, *,
            tracer: Tracer | None = None, attention_resource: Resource = "device_compute",
            experts_resource: Resource = "device_compute", last_only: bool = False,
            logits_at: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``tokens [B, T]`` (right-padded; ``num_new[B]`` real tokens per row, default all ``T``) through the model,
    appending their keys/values to ``kv`` and advancing ``kv.lengths`` by ``num_new``.

    A row with ``num_new[b] == 0`` (e.g. a finished sequence kept in the batch) is all padding: nothing is written
    or routed for it and its length stays.
    Returns logits ``[B, T, V]`` (rows past ``num_new[b]`` are padding: ignore them), or with ``last_only`` the
    logits of each row's last real token, ``[B, 1, V]`` (prefill: the head only runs on those rows), or with
    ``logits_at [B, K]`` (token indices per row) the logits of those tokens, ``[B, K, V]``.
    ``attention_resource``: tracer label, a sequence of labels per layer, or ``f(layer) -> label``;
    ``experts_resource``: label, per-layer sequence, or ``f(layer, expert) -> label``. Raises ``SpecplanError`` if the cache has no room (nothing is written then).
    """
    B, T = tokens.shape
    if num_new is None:
        num_new = torch.full((B,), T, dtype=torch.long)
    num_new = num_new.to(torch.long).cpu()
    if num_new.shape != (B,) or bool((num_new < 0).any()) or bool((num_new > T).any()):
        raise ValueError(f"num_new must hold B={B} values in 0..{T}, got {num_new.tolist()}")
    kv.check_room(num_new)
    full = bool((num_new == T).all())
    real_rows = None if full else (torch.arange(T)[None, :] < num_new[:, None]).reshape(-1).nonzero().squeeze(1)
    rows = int(num_new.sum())

    embed = src.tensor("embed")
    with _span(tracer, "embed", "device_compute", None, 0, B * T * spec.hidden_size * embed.element_size()):
        x = F.embedding(tokens.to(embed.device), embed)
    positions = kv.lengths[:, None] + torch.arange(T)  # [B, T], CPU
    kv_len = min(int(positions.max()) + 1, kv.capacity)
    cos, sin = rope_tables(inv_freq(spec), positions.to(x.device), x.dtype)
    mask = attention_mask(positions, kv_len, spec.sliding_window, spec.num_heads // spec.num_kv_heads)
    ctx = _Context(spec, kv, num_new, real_rows, rows, cos, sin, mask, kv_len, kv.slots(num_new, T), tracer)

    for i in range(spec.num_layers):
        w = src.layer(i)
        x = attention_block(ctx, i, x, w, _resource(attention_resource, i))
        if spec.is_moe_layer(i):
            x = moe_ffn(ctx, i, x, w, src, lambda e, i=i: _resource(experts_resource, i, e))
        else:
            with _span(tracer, f"L{i}.mlp", "device_compute", i, 2 * rows * spec.tensors.matmul_params("mlp", i),
                       _nbytes(*(w.get(f"mlp.{p}") for p in ("gate", "up", "down")))):
                y = gated_ffn(ffn_input(ctx, x, w), w, ACTIVATIONS[spec.hidden_act], "mlp.")
                x = x + _scatter_rows(y, real_rows, B, T)
        w = y = None  # no reference to layer i's tensors survives its release
        src.release(i)
    kv.advance(num_new)
    if last_only:
        logits_at = (num_new - 1)[:, None]
    return lm_head(spec, src, x, logits_at, tracer)


class _Context:
    """What every layer of one forward shares."""

    def __init__(self, spec, kv, num_new, real_rows, rows, cos, sin, mask, kv_len, slots, tracer):
        self.spec, self.kv, self.num_new, self.real_rows, self.rows = spec, kv, num_new, real_rows, rows
        self.cos, self.sin, self.mask, self.kv_len, self.slots, self.tracer = cos, sin, mask, kv_len, slots, tracer
        self.attention_cost = _attention_cost(spec, kv, num_new) if tracer is not None else (0.0, 0.0)


def ffn_input(ctx: _Context, x: torch.Tensor, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The post-attention norm of the real tokens, as rows ``[N, H]``."""
    B, T, H = x.shape
    h = rms_norm(x, w["post_attn_norm"], ctx.spec.rms_norm_eps).reshape(B * T, H)
    return h if ctx.real_rows is None else h[ctx.real_rows.to(h.device)]


def _scatter_rows(y: torch.Tensor, real_rows: torch.Tensor | None, B: int, T: int) -> torch.Tensor:
    if real_rows is None:
        return y.view(B, T, -1)
    out = y.new_zeros(B * T, y.shape[-1])
    out[real_rows.to(y.device)] = y
    return out.view(B, T, -1)


def attention_block(ctx: _Context, i: int, x: torch.Tensor, w: Mapping[str, torch.Tensor], resource: str):
    """x + o(attention(rope(q(n(x))), kv cache)); new K/V go into the cache of layer ``i``."""
    spec, tracer = ctx.spec, ctx.tracer
    B, T, H = x.shape
    hd, nh, nkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
    table = spec.tensors.by_name
    proj_flops = 2 * ctx.rows * sum(table[f"layers.{i}.attn.{n}"].params for n in ("q", "k", "v"))
    with _span(tracer, f"L{i}.attn_proj", "device_compute", i, proj_flops,
               _nbytes(*(w.get(f"attn.{n}") for n in ("q", "k", "v", "q_bias", "k_bias", "v_bias")))):
        h = rms_norm(x, w["input_norm"], spec.rms_norm_eps)
        q = _linear(h, w["attn.q"], w.get("attn.q_bias"))
        k = _linear(h, w["attn.k"], w.get("attn.k_bias"))
        v = _linear(h, w["attn.v"], w.get("attn.v_bias"))
        if spec.qk_norm == "full":
            q, k = rms_norm(q, w["attn.q_norm"], spec.rms_norm_eps), rms_norm(k, w["attn.k_norm"], spec.rms_norm_eps)
        q, k, v = (t.view(B, T, n, hd) for t, n in ((q, nh), (k, nkv), (v, nkv)))
        if spec.qk_norm == "per_head":
            q, k = rms_norm(q, w["attn.q_norm"], spec.rms_norm_eps), rms_norm(k, w["attn.k_norm"], spec.rms_norm_eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        ctx.kv.write(i, k, v, ctx.slots)
    keys, values = ctx.kv.view(i, ctx.kv_len)
    with _span(tracer, f"L{i}.attention", resource, i, *ctx.attention_cost):
        o = attend(q, keys, values, ctx.mask, nh // nkv, hd)
    out_flops = 2 * ctx.rows * table[f"layers.{i}.attn.o"].params
    with _span(tracer, f"L{i}.attn_proj", "device_compute", i, out_flops, _nbytes(w["attn.o"], w.get("attn.o_bias"))):
        o = o.to(x.device).transpose(1, 2).reshape(B, T, spec.q_dim)
        x = x + _linear(o, w["attn.o"], w.get("attn.o_bias"))
    return x


def attend(q, keys, values, mask, groups: int, head_dim: int) -> torch.Tensor:
    """Scaled dot-product attention of ``q [B, heads, T, d]`` over ``keys``/``values [B, kv_heads, L, d]`` with a
    boolean ``mask [B|1, 1, groups * T, L]`` (``attention_mask``), on the device of the cache.

    GQA: the ``groups`` query heads that share a KV head are stacked as ``groups * T`` query rows of that KV head
    (query head h uses KV head h // groups, as in transformers' ``repeat_kv``), so the cache is read in place instead
    of being copied ``groups`` times per call — the copy cost 5x the attention itself in decode.
    """
    dev = keys.device
    q = q.to(dev)
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    B, heads, T, d = q.shape
    q = q.reshape(B, heads // groups, groups * T, d)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.to(dev), scale=head_dim ** -0.5)
    return out.view(B, heads, T, d)


def _attention_cost(spec: ModelSpec, kv, num_new: torch.Tensor) -> tuple[float, float]:
    """One layer's attention FLOPs (ModelSpec's per-token attention FLOPs over each token's context) and KV bytes
    read, the same in every layer of one forward (before ``kv.advance``)."""
    before = kv.lengths
    positions = int(causal_positions(num_new, before).sum())  # sum over real tokens of the keys they see
    flops = spec.attention_flops_per_token(positions) / spec.num_layers
    read = kv_bytes(spec, str(kv.k[0].dtype).removeprefix("torch."), 1, int((before + num_new).sum()), layers=1)
    return flops, read


def moe_ffn(ctx: _Context, i: int, x: torch.Tensor, w: Mapping[str, torch.Tensor], src: WeightSource,
            expert_resource: Callable[[int], str]) -> torch.Tensor:
    """Norm, route, fetch only the routed experts, run each on its tokens and add it in with its routing weight;
    plus the gated shared expert. Returns ``x`` with the layer's output added (the residual)."""
    spec, tracer = ctx.spec, ctx.tracer
    act = ACTIVATIONS[spec.hidden_act]
    n = ctx.rows
    with _span(tracer, f"L{i}.router", "device_compute", i, 2 * n * spec.tensors.matmul_params("norms_router", i), _nbytes(w["router"])):
        h = ffn_input(ctx, x, w)
        weights, chosen = route(h, w["router"], spec.experts_per_token, spec.norm_topk_prob)
        rows_sorted, weight_sorted, token, counts = dispatch(h, weights, chosen, spec.num_experts)
    ids = [e for e, m in enumerate(counts) if m]
    out = torch.zeros_like(h)
    if spec.shared_expert_intermediate_size:
        with _span(tracer, f"L{i}.shared", "device_compute", i, 2 * n * spec.tensors.matmul_params("shared_experts", i),
                   _nbytes(*(w[f"shared.{p}"] for p in ("gate", "up", "down")), w["shared_gate"])):
            out += torch.sigmoid(_linear(h, w["shared_gate"])) * gated_ffn(h, w, act, "shared.")
    experts = src.experts(i, ids)
    ys, start = [], 0
    for e in ids:
        m = counts[e]
        padded = bucket_rows(m)  # a row count oneDNN has built a kernel for (see specplan.contracts.rows)
        ew = experts[e]  # a lazy source may block here until this expert's bytes have arrived
        with _span(tracer, f"L{i}.E{e}", expert_resource(e), i, 2 * padded * spec.tensors.matmul_params("experts", i, e),
                   _nbytes(ew["gate"], ew["up"], ew["down"])):
            dev = ew["gate"].device
            rows = rows_sorted[start:start + m]
            rows = F.pad(rows, (0, 0, 0, padded - m)) if padded > m else rows
            ys.append(gated_ffn(rows.to(dev), ew, act)[:m].to(h.device))
        start += m
    with _span(tracer, f"L{i}.moe_combine", "device_compute", i, 0, 3 * _nbytes(x)):
        out.index_add_(0, token, torch.cat(ys) * weight_sorted)
        return x + _scatter_rows(out, ctx.real_rows, *x.shape[:2])


def dispatch(h: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, num_experts: int):
    """The routed (token, slot) pairs sorted by expert, once per layer: their rows of ``h [N, H]`` gathered in that
    order, their routing weights ``[N*k, 1]``, their tokens ``[N*k]`` (for the scatter-add) and the pairs per expert
    (a list), so each expert takes a slice: its work is its three matmuls, not a search and a gather."""
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // chosen.shape[1]
    return h[token], weights.reshape(-1)[order, None], token, torch.bincount(flat, minlength=num_experts).tolist()


def route(h: torch.Tensor, router: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the router logits (float32), top-k, optionally renormalised: (weights [N, k], experts [N, k])."""
    probs = torch.softmax(_linear(h, router).float(), dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    if normalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(h.dtype), idx


def lm_head(spec: ModelSpec, src: WeightSource, x: torch.Tensor, rows_at: torch.Tensor | None,
            tracer: Tracer | None) -> torch.Tensor:
    """Final norm and output head; with ``rows_at [B, K]`` only those tokens of each row. The source is asked
    for ``final_norm`` then ``lm_head`` (also when tied: a source returns the embedding for it)."""
    B = x.shape[0]
    if rows_at is not None:
        x = x[torch.arange(B, device=x.device)[:, None], rows_at.to(x.device)]
    norm = src.tensor("final_norm")
    head = src.tensor("lm_head")  # a tied model's source returns the embedding
    rows = x.shape[0] * x.shape[1]
    with _span(tracer, "lm_head", "device_compute", None, 2 * rows * spec.tensors.head.params,
               _nbytes(head, norm)):
        return _linear(rms_norm(x, norm, spec.rms_norm_eps), head)


# ---- conveniences ------------------------------------------------------------------------------------------------


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(tokens [B, T], num_new [B])``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    return tokens, torch.tensor([len(p) for p in prompts], dtype=torch.long)


def prefill(spec: ModelSpec, src: WeightSource, kv, prompts: Sequence[Sequence[int]], **kw) -> torch.Tensor:
    """Prefill ragged prompts in one batch; returns the logits of each prompt's last token ``[B, V]``."""
    tokens, num_new = pad_prompts(prompts)
    return forward(spec, src, kv, tokens, num_new, last_only=True, **kw)[:, 0]


def decode_one_token(spec: ModelSpec, src: WeightSource, kv, tokens: torch.Tensor, **kw) -> torch.Tensor:
    """One decode step: ``tokens [B]`` (one per sequence) -> logits ``[B, V]``."""
    return forward(spec, src, kv, tokens.reshape(-1, 1), **kw)[:, 0]


def generate(spec: ModelSpec, src: WeightSource, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             kv=None, dtype: torch.dtype | None = None, eos_token_id: int | Sequence[int] | None = None,
             **kw) -> list[list[int]]:
    """Greedy decoding of a batch of ragged prompts; each sequence stops after ``max_new_tokens`` or at EOS
    (included). Unless ``kv`` is given, allocates a cache of the exact size needed, of ``dtype`` (default float32)."""
    from specplan.engine.model.kvcache import KVCache

    if kv is None:
        capacity = kv_capacity(max(len(p) for p in prompts), max_new_tokens, 0)
        kv = KVCache.allocate(spec, len(prompts), capacity, dtype or torch.float32)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    logits = prefill(spec, src, kv, prompts, **kw)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1).cpu()
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in eos or len(out[b]) >= max_new_tokens
        if all(done) or step == max_new_tokens - 1:
            break
        logits = decode_one_token(spec, src, kv, nxt, **kw)
    return out
