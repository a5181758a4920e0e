"""Per-unit op records: the FLOPs and bytes one placed tensor (or one fixed step) costs in one pass.

A *unit* is what the engine places whole: the attention weights of a layer, one routed expert, the dense MLP of a
layer, the shared expert, the KV cache of a layer, embed, lm_head, the draft model. ``unit_ops`` returns the ops a
unit at a tier costs in one pass (fetches, then compute), with ``count`` identical units folded into one record
(times are linear in the count). The programs (``program.py``) wire these ops with dependencies; the LP
(``lp.py``) reads per-resource times off the very same records, so both see one cost model.

Sizes and matmul FLOPs come from the model's tensor table (``spec.tensors``: parameters per placed piece; 2 FLOPs
per multiply-add), KV bytes and causal positions from ``specplan.contracts.memory``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from specplan.contracts.hardware import HardwareProfile
from specplan.contracts.memory import causal_positions, kv_bytes
from specplan.contracts.model import ModelSpec, dtype_bytes
from specplan.contracts.rows import attention_activation_bytes, ffn_activation_bytes, mean_bucket_rows
from specplan.contracts.tensors import param_bytes, substitute_nbytes, unpacked_dtype
from specplan.planner.expect import expert_touch_prob, rows_per_touched_expert
from specplan.planner.kinds import DraftTier, UnitKind, UnitTier, draft_tiers
from specplan.planner.ops import Op, Phase

#: tiers each unit may take (the LP's variables); a machine without a host tier drops the host ones.
UNIT_TIERS: dict[UnitKind, tuple[UnitTier, ...]] = {
    "attention": ("device", "host", "disk"),
    "kv": ("device", "host"),
    "mlp": ("device", "host", "disk"),
    "expert": ("device", "host", "disk"),
    "shared": ("device", "host", "disk"),
    "embed": ("device", "host"),
    "lm_head": ("device", "host", "disk"),
    "draft": ("device/device", "device/host", "host/host"),
}

#: kernel calls per op (each pays profile.overheads.per_op_s); the per-layer Python cost is
#: ``Overheads.layer_s`` of the layer's width.
CALLS = {"attn_proj": 4, "attention": 1, "router": 2, "combine": 2, "expert": 5, "mlp": 4, "shared": 5,
         "embed": 1, "lm_head": 2}


@dataclass(frozen=True)
class Costing:
    """What stays fixed while the search varies the policy: model, draft, profile and dtypes."""

    spec: ModelSpec
    profile: HardwareProfile
    weight_dtype: str
    kv_dtype: str
    draft_spec: ModelSpec | None = None  # a draft model
    substitute_bits: int | None = None  # a quantised substitute of the target's streamed weights
    substitute_group: int = 0  # its group size (input columns per scale; 0: one group per row)

    @property
    def shared(self) -> bool:
        """No separate host tier (``HardwareProfile.has_host_tier``)."""
        return not self.profile.has_host_tier

    @cached_property
    def act(self) -> float:
        """Bytes per activation element: the weight dtype's (unpacked for a GGUF block format)."""
        return dtype_bytes(unpacked_dtype(self.weight_dtype))

    @cached_property
    def params(self) -> dict[str, int]:
        """Parameters of one unit of each weight kind, from the tensor table (a kind the model lacks: 0)."""
        s, t = self.spec, self.spec.tensors
        moe = s.moe_layers[0] if s.moe_layers else None
        dense = s.dense_layers[0] if s.dense_layers else None

        def at(group: str, layer: int | None, expert: int | None = None) -> int:
            return 0 if layer is None else t.params(group, layer, expert)

        return {
            "attention": t.params("attention", 0),
            "mlp": at("mlp", dense),
            "expert": at("experts", moe, 0),
            "shared": at("shared_experts", moe),
            "embed": t.params("embed"),
            "lm_head": t.head.params,  # a tied head reads the embedding
            "router_norms": at("norms_router", moe),
            "norms": at("norms_router", dense),
            "final_norm": t.params("norms_router"),
        }

    @cached_property
    def matmul_params(self) -> dict[str, int]:
        """Matrix parameters one row is multiplied by in one unit of each compute kind (tensor table)."""
        s, t = self.spec, self.spec.tensors
        moe = s.moe_layers[0] if s.moe_layers else 0
        dense = s.dense_layers[0] if s.dense_layers else 0
        return {
            "attention": t.matmul_params("attention", 0),
            "mlp": t.matmul_params("mlp", dense),
            "expert": t.matmul_params("experts", moe, 0),
            "shared": t.matmul_params("shared_experts", moe),
            "router": t.matmul_params("norms_router", moe),
            "lm_head": t.head.params,
        }

    @cached_property
    def sizes(self) -> dict[str, float]:
        """Bytes of one unit of each weight kind at the weight dtype (each group in its own format where the
        checkpoint mixes them: ``contracts.tensors.param_bytes``)."""
        head = "embed" if self.spec.tensors.tied_head else "lm_head"
        group = {"attention": "attention", "mlp": "mlp", "expert": "experts", "shared": "shared_experts",
                 "embed": "embed", "lm_head": head, "router_norms": "norms_router", "norms": "norms_router",
                 "final_norm": "norms_router"}
        return {kind: n * param_bytes(self.spec, group[kind], self.weight_dtype)
                for kind, n in self.params.items()}

    def layer_read_bytes(self, whole: bool) -> float:
        """The size of the read a layer's scheduled fetch issues: the engine reads a layer's streamed tensors as one
        unit, merging neighbours in the offload file (``engine/io/prefetch.make_unit``). ``whole`` (whole-layer
        fetches): attention and the dense MLP, or every expert and the shared one; else (routed experts, each its
        own read) the layer without its experts. Averaged over the layers, and all of it: the LP prices a unit
        before the placement says how much of its layer is on disk, so where most of a layer is resident this is
        an upper bound of the read. The layer's non-expert units are priced at ``whole=False`` in both fetch modes
        (the LP prices them apart from the experts' mode; in a whole-layer read they are a few percent of it)."""
        s, sz = self.spec, self.sizes
        moe = len(s.moe_layers)
        per_moe = sz["attention"] + sz["shared"] + (s.num_experts * sz["expert"] if whole else 0.0)
        per_dense = sz["attention"] + sz["mlp"]
        return (moe * per_moe + (s.num_layers - moe) * per_dense) / s.num_layers

    def kv_layer_bytes(self, seqs: int, positions: int) -> int:
        """KV bytes of one layer for ``seqs`` sequences of ``positions`` positions, at the KV dtype."""
        return kv_bytes(self.spec, self.kv_dtype, seqs, positions, layers=1)

    @cached_property
    def draft_bytes(self) -> float:
        return self.draft_spec.weight_bytes(self.weight_dtype) if self.draft_spec else 0.0

    def draft_kv_bytes(self, seqs: int, positions: int) -> int:
        """KV bytes of the draft model (all its layers) for ``seqs`` sequences of ``positions`` positions."""
        return kv_bytes(self.draft_spec, self.kv_dtype, seqs, positions) if self.draft_spec else 0

    def quantised(self, kind: str) -> float:
        """Bytes of the substitute copy of one unit of weight kind ``kind`` (0 without a substitute)."""
        return self._quantised.get(kind, 0.0) if self.substitute_bits else 0.0

    @cached_property
    def _quantised(self) -> dict[str, float]:
        """Per weight kind, ``contracts.tensors.substitute_nbytes`` over one unit's tensors (the low-bit copies of
        its matrices, scales and zero points at the activations' dtype, and full-size copies of the rest); a tied
        head quantises the embedding."""
        s, t = self.spec, self.spec.tensors
        moe = s.moe_layers[0] if s.moe_layers else None
        dense = s.dense_layers[0] if s.dense_layers else None
        pieces = {"attention": t.members("attention", 0), "mlp": t.members("mlp", dense) if dense is not None else (),
                  "expert": t.members("experts", moe, 0) if moe is not None else (),
                  "shared": t.members("shared_experts", moe) if moe is not None else ()}
        dtype, bits, group = unpacked_dtype(self.weight_dtype), self.substitute_bits or 8, self.substitute_group
        out = {kind: float(sum(substitute_nbytes(w, bits, group, dtype) for w in ws)) for kind, ws in pieces.items()}
        out["lm_head"] = float(substitute_nbytes(t.head, bits, group, dtype, as_head=True))
        return out

    def substituted(self, tier: str) -> bool:
        """Whether a substitute keeps a copy of a unit at ``tier``: one the target fetches to compute it (disk; the
        host on a machine with a separate host tier, without one host tensors are used in place)."""
        return tier == "disk" or (tier == "host" and not self.shared)


@dataclass(frozen=True)
class Knobs:
    """The policy choices that change op records."""

    attention_on: str = "device"
    experts_on: str = "device"
    expert_fetch: str = "routed"
    prefetch_depth: int = 1


@dataclass(frozen=True)
class Pass:
    """One forward pass of one batch: ``seqs`` sequences, ``tokens`` new tokens each, over ``context`` cached."""

    phase: Phase
    seqs: int
    tokens: int
    context: int
    batch: int = 0
    substitute: bool = False  # a draft step of the quantised substitute (reads resident copies, no fetches)

    @property
    def rows(self) -> int:
        return self.seqs * self.tokens

    @property
    def logit_rows(self) -> int:
        """Rows that need logits: the last token of each prompt in prefill, every new token otherwise."""
        return self.seqs if self.phase == "prefill" else self.rows

    @property
    def positions(self) -> int:
        """Key positions the new tokens of one sequence attend to (causal)."""
        return causal_positions(self.tokens, self.context)


# ---- fetches -----------------------------------------------------------------------------------------------------


def fetch_ops(c: Costing, p: Pass, name: str, group: str, nbytes: float, tier: str, *, to: str = "device",
              prob: float = 1.0, on_demand: bool = False, calls: float = 1, read_bytes: float | None = None) -> list[Op]:
    """Bring ``nbytes`` of a ``tier`` tensor to where it is computed (``to``: device or host).

    Disk: a read (into host staging on a GPU machine, device staging without one), then host->device on a GPU.
    Host -> device: one copy. Nothing when the tensor already lives where it is computed. The slot index is a
    placeholder (0): the program sets it from the layer's position. ``read_bytes``: the read is part of one of that
    size (``Costing.layer_read_bytes``).
    """
    if tier == to or nbytes <= 0 or (c.shared and tier != "disk"):
        return []
    common = dict(group=group, phase=p.phase, batch=p.batch, prob=prob, on_demand=on_demand, calls=calls)
    ops = []
    if tier == "disk":
        pool = "device" if c.shared else "host"
        ops.append(Op(f"{name}.read", "disk_read", "transfer", bytes=nbytes, slot=(pool, 0), read_bytes=read_bytes,
                      **common))
    if to == "device" and not c.shared:
        ops.append(Op(f"{name}.h2d", "h2d", "transfer", bytes=nbytes, slot=("device", 0), **common))
    return ops


def _handoff(fetches: list[Op], n: float = 1) -> tuple[tuple[str, float], ...]:
    return (("thread_handoff_s", n),) if fetches else ()


def _weight_bytes(c: Costing, p: Pass, kind: str, tier: str) -> float:
    """Bytes a compute op reads for one unit: the tensor, or its quantised copy in a substitute draft step."""
    return c.quantised(kind) if p.substitute and c.substituted(tier) else c.sizes[kind]


def _blocked(c: Costing, p: Pass, tier: str, head: bool = False) -> bool:
    """Whether the engine keeps this op's weights blocked (``engine/model/blocked.py``): resident (on a CPU: the
    device or host tier) at a weight dtype the profile has blocked curves for, not a substitute's low-bit copy,
    not a head tied to the embedding."""
    if not (c.shared and tier in ("device", "host") and c.profile.device.blocks(c.weight_dtype)):
        return False
    return not (p.substitute and c.substituted(tier)) and not (head and c.spec.tie_word_embeddings)


def _weight_dtype(c: Costing, p: Pass, tier: str) -> str:
    """The dtype whose matmul rates a compute op runs at: the substitute's low-bit kernels (``int8`` / ``int4``,
    where the profile measured them) on its copies, else the weight dtype."""
    if p.substitute and c.substituted(tier) and f"int{c.substitute_bits}" in c.profile.device.dtypes:
        return f"int{c.substitute_bits}"
    return c.weight_dtype


# ---- units -------------------------------------------------------------------------------------------------------


def attention_ops(c: Costing, k: Knobs, p: Pass, tier: str, n: float = 1) -> list[Op]:
    s, rows = c.spec, p.rows
    fetch = [] if p.substitute else fetch_ops(c, p, "attn", "attention", n * c.sizes["attention"], tier, calls=n,
                                              read_bytes=c.layer_read_bytes(False))
    act = attention_activation_bytes(rows, s.hidden_size, s.q_dim, s.kv_dim, c.act)
    compute = Op("attn_proj", "device_compute", "matmul", flops=n * 2 * rows * c.matmul_params["attention"],
                 bytes=n * (_weight_bytes(c, p, "attention", tier) + act), act_bytes=n * act,
                 shape=(rows, s.hidden_size, s.q_dim),
                 dtype=_weight_dtype(c, p, tier), blocked=_blocked(c, p, tier), calls=n * CALLS["attn_proj"],
                 group="attention", phase=p.phase,
                 batch=p.batch,
                 overheads=(("per_layer_s", n), ("per_layer_per_width_s", n * s.hidden_size)) + _handoff(fetch, n))
    return fetch + [compute]


def kv_ops(c: Costing, k: Knobs, p: Pass, tier: str, n: float = 1) -> list[Op]:
    """Attention over the KV cache of one layer, where the cache lives and the policy says it is computed."""
    s = c.spec
    common = dict(group="kv_cache", phase=p.phase, batch=p.batch)
    flops = n * p.seqs * s.attention_flops_per_token(1) / s.num_layers * p.positions
    kv_read = n * c.kv_layer_bytes(p.seqs, p.context + p.tokens)
    kv_new = n * c.kv_layer_bytes(p.seqs, p.tokens)
    shape = (p.rows, s.head_dim, p.context + p.tokens)

    def attn(resource: str, extra: tuple = ()) -> Op:
        read = kv_new if p.phase == "prefill" else kv_read
        return Op("attention", resource, "attention", flops=flops, bytes=read, shape=shape,
                  dtype=c.kv_dtype, calls=n * CALLS["attention"], overheads=extra, **common)

    if tier == "device" or c.shared:
        return [attn("device_compute")]
    if p.phase == "prefill":  # the whole prompt is in the pass: attend on the device, write the new KV back
        return [attn("device_compute"),
                Op("kv_writeback", "d2h", "transfer", bytes=kv_new, calls=n, **common)]
    if k.attention_on == "host":  # FlexGen / SpecOffload style: ship q, k, v to the host, attend there, ship back
        qkv = n * p.rows * (s.q_dim + 2 * s.kv_dim) * c.act
        out = n * p.rows * s.q_dim * c.act
        return [Op("qkv_d2h", "d2h", "transfer", bytes=qkv, calls=n, on_demand=True, **common),
                attn("host_compute"),
                Op("attn_out_h2d", "h2d", "transfer", bytes=out, calls=n, on_demand=True, **common)]
    # the cache streams to the device every pass, the new entries go back
    fetch = [Op("kv_h2d", "h2d", "transfer", bytes=n * c.kv_layer_bytes(p.seqs, p.context), calls=n,
                slot=("device", 0), **common)]
    return fetch + [attn("device_compute", _handoff(fetch, n)),
                    Op("kv_writeback", "d2h", "transfer", bytes=kv_new, calls=n, **common)]


def ffn_ops(c: Costing, k: Knobs, p: Pass, kind: str, tier: str, n: float = 1) -> list[Op]:
    """The dense MLP (``kind="mlp"``) or the shared expert (``"shared"``) of a layer: all tokens go through it."""
    s, rows = c.spec, p.rows
    width = s.intermediate_size if kind == "mlp" else s.shared_expert_intermediate_size
    group = "mlp" if kind == "mlp" else "shared_experts"
    fetch = [] if p.substitute else fetch_ops(c, p, kind, group, n * c.sizes[kind], tier, calls=n,
                                              read_bytes=c.layer_read_bytes(False))
    act = ffn_activation_bytes(rows, s.hidden_size, width, c.act)
    compute = Op(kind, "device_compute", "matmul", flops=n * 2 * rows * c.matmul_params[kind],
                 bytes=n * (_weight_bytes(c, p, kind, tier) + act), act_bytes=n * act, shape=(rows, s.hidden_size, width),
                 dtype=_weight_dtype(c, p, tier), blocked=_blocked(c, p, tier), calls=n * CALLS[kind], group=group,
                 phase=p.phase, batch=p.batch,
                 overheads=_handoff(fetch, n))
    return fetch + [compute]


def expert_ops(c: Costing, k: Knobs, p: Pass, tier: str, n: float = 1) -> list[Op]:
    """One routed expert: touched with probability ``1 - (1 - k/E)^N`` for the pass's N routed tokens."""
    s = c.spec
    prob = expert_touch_prob(s.num_experts, s.experts_per_token, p.rows)
    m = mean_bucket_rows(rows_per_touched_expert(s.num_experts, s.experts_per_token, p.rows))  # as the engine pads
    name = "E"
    common = dict(group="experts", phase=p.phase, batch=p.batch)
    on_host = tier != "device" and k.experts_on == "host" and not c.shared and not p.substitute
    routed = k.expert_fetch == "routed" and p.phase != "prefill"
    fetch = [] if p.substitute else fetch_ops(
        c, p, name, "experts", n * c.sizes["expert"], tier, to="host" if on_host else "device",
        prob=prob if routed else 1.0, on_demand=routed, calls=n,
        read_bytes=None if k.expert_fetch == "routed" else c.layer_read_bytes(True))
    act = ffn_activation_bytes(m, s.hidden_size, s.moe_intermediate_size, c.act)
    compute = Op(name, "host_compute" if on_host else "device_compute", "matmul",
                 flops=n * 2 * m * c.matmul_params["expert"],
                 bytes=n * (_weight_bytes(c, p, "expert", tier) + act), act_bytes=n * act,
                 shape=(m, s.hidden_size, s.moe_intermediate_size),
                 dtype=_weight_dtype(c, p, tier), blocked=_blocked(c, p, tier), calls=n * CALLS["expert"], prob=prob,
                 overheads=_handoff(fetch, n), **common)
    if not on_host:
        return fetch + [compute]
    # Fiddler style: the expert's tokens go to the host, the result comes back
    tokens = n * m * s.hidden_size * c.act
    return fetch + [Op(f"{name}.act_d2h", "d2h", "transfer", bytes=tokens, calls=n, prob=prob, on_demand=True, **common),
                    compute,
                    Op(f"{name}.act_h2d", "h2d", "transfer", bytes=tokens, calls=n, prob=prob, on_demand=True, **common)]


def embed_ops(c: Costing, k: Knobs, p: Pass, tier: str) -> list[Op]:
    rows_bytes = p.rows * c.spec.hidden_size * c.act
    common = dict(group="embed", phase=p.phase, batch=p.batch)
    if tier == "device" or c.shared:
        return [Op("embed", "device_compute", "elementwise", bytes=rows_bytes, calls=CALLS["embed"], **common)]
    return [Op("embed", "host_compute", "elementwise", bytes=rows_bytes, calls=CALLS["embed"], **common),
            Op("embed.h2d", "h2d", "transfer", bytes=rows_bytes, on_demand=True, **common)]


def lm_head_ops(c: Costing, k: Knobs, p: Pass, tier: str) -> list[Op]:
    s = c.spec
    fetch = [] if p.substitute else fetch_ops(c, p, "lm_head", "lm_head", c.sizes["lm_head"], tier)
    rows = p.logit_rows
    compute = Op("lm_head", "device_compute", "matmul", flops=2 * rows * c.matmul_params["lm_head"],
                 bytes=_weight_bytes(c, p, "lm_head", tier) + c.sizes["final_norm"] + rows * s.vocab_size * 4,
                 shape=(rows, s.hidden_size, s.vocab_size), dtype=_weight_dtype(c, p, tier),
                 blocked=_blocked(c, p, tier, head=True), calls=CALLS["lm_head"],
                 group="lm_head", phase=p.phase, batch=p.batch, overheads=(("per_step_s", 1),) + _handoff(fetch))
    return fetch + [compute]


def router_op(c: Costing, p: Pass, n: float = 1) -> Op:
    s, rows = c.spec, p.rows
    return Op("router", "device_compute", "matmul", flops=n * 2 * rows * c.matmul_params["router"],
              bytes=n * (c.sizes["router_norms"] + 2 * rows * s.hidden_size * c.act),
              shape=(rows, s.hidden_size, s.num_experts), dtype=c.weight_dtype, calls=n * CALLS["router"],
              group="norms_router", phase=p.phase, batch=p.batch)


def combine_op(c: Costing, p: Pass, n: float = 1) -> Op:
    s = c.spec
    return Op("moe_combine", "device_compute", "elementwise",
              bytes=n * p.rows * (s.experts_per_token + 1) * s.hidden_size * c.act, calls=n * CALLS["combine"],
              group="norms_router", phase=p.phase, batch=p.batch)


def draft_model_ops(c: Costing, p: Pass, tier: DraftTier, step: int | None = None) -> list[Op]:
    """One forward of the draft model over the pass (a draft step, or its prefill), all layers folded."""
    d = c.draft_spec
    assert d is not None
    w_tier, kv_tier = draft_tiers(tier)
    unit = {"device": "device_compute", "host": "host_compute"}
    tag = "draft" if step is None else f"draft{step}"
    common = dict(group="draft", phase=p.phase, batch=p.batch)
    head = 2 * d.tensors.head.params
    head_bytes = d.tensors.head.nbytes(c.weight_dtype)
    act = p.rows * (4 * d.hidden_size + 2 * max(d.intermediate_size, d.moe_intermediate_size)) * c.act
    width = max(d.intermediate_size, d.moe_intermediate_size)
    layer_act = (attention_activation_bytes(p.rows, d.hidden_size, d.q_dim, d.kv_dim, c.act)
                 + ffn_activation_bytes(p.rows, d.hidden_size, width, c.act))
    # the layers' matmuls folded into one op, the head in its own (blocked or not on its own: a tied head is not)
    blocked = c.shared and c.profile.device.blocks(c.weight_dtype)
    ops = [Op(f"{tag}.matmuls", unit[w_tier], "matmul", flops=p.rows * (d.matmul_flops_per_token() - head),
              bytes=c.draft_bytes - head_bytes + act, act_bytes=d.num_layers * layer_act,
              shape=(p.rows, d.hidden_size, max(d.intermediate_size, d.moe_intermediate_size, 1)),
              dtype=c.weight_dtype, blocked=blocked, calls=7 * d.num_layers,
              overheads=(("per_layer_s", d.num_layers), ("per_layer_per_width_s", d.num_layers * d.hidden_size),
                         ("per_step_s", 1)), **common),
           Op(f"{tag}.lm_head", unit[w_tier], "matmul", flops=p.logit_rows * head,
              bytes=head_bytes + p.logit_rows * d.vocab_size * 4, shape=(p.logit_rows, d.hidden_size, d.vocab_size),
              dtype=c.weight_dtype, blocked=blocked and not d.tie_word_embeddings, calls=1, **common)]
    kv = c.draft_kv_bytes(p.seqs, p.tokens if p.phase == "prefill" else p.context + p.tokens)
    attention = Op(f"{tag}.attention", unit[kv_tier if not c.shared else "device"], "attention",
                   flops=p.seqs * d.attention_flops_per_token(1) * p.positions, bytes=kv,
                   shape=(p.rows, d.head_dim, p.context + p.tokens), dtype=c.weight_dtype, calls=d.num_layers,
                   **common)
    if w_tier == kv_tier or c.shared:
        return ops + [attention]
    qkv = p.rows * d.num_layers * (d.q_dim + 2 * d.kv_dim) * c.act
    out = p.rows * d.num_layers * d.q_dim * c.act
    return ops + [Op(f"{tag}.qkv_d2h", "d2h", "transfer", bytes=qkv, calls=d.num_layers, on_demand=True, **common),
                  attention,
                  Op(f"{tag}.attn_out_h2d", "h2d", "transfer", bytes=out, calls=d.num_layers, on_demand=True, **common)]


def unit_ops(c: Costing, k: Knobs, p: Pass, unit: UnitKind, tier: UnitTier, n: float = 1) -> list[Op]:
    """The ops of ``n`` identical units of kind ``unit`` at ``tier`` in pass ``p``; names are relative to the
    layer (the program prefixes ``L{i}.``), fetch slots carry a placeholder index."""
    if unit == "attention":
        return attention_ops(c, k, p, tier, n)
    if unit == "kv":
        return kv_ops(c, k, p, tier, n)
    if unit in ("mlp", "shared"):
        return ffn_ops(c, k, p, unit, tier, n)
    if unit == "expert":
        return expert_ops(c, k, p, tier, n)
    if unit == "embed":
        return embed_ops(c, k, p, tier)
    if unit == "lm_head":
        return lm_head_ops(c, k, p, tier)
    if unit == "draft":
        return draft_model_ops(c, p, tier)
    raise ValueError(f"unknown unit {unit}")


def fixed_layer_ops(c: Costing, p: Pass, moe_layers: float) -> list[Op]:
    """Ops every pass pays whatever the placement: routers and expert combines of the MoE layers."""
    if not moe_layers:
        return []
    return [router_op(c, p, moe_layers), combine_op(c, p, moe_layers)]
