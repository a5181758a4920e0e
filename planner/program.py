"""Op programs of a plan: the prefill of one prefill batch, one decode round (draft steps + verification per
interleaved batch), with weight fetches as separate ops that the compute depends on.

The simulator schedules these programs; ``steady_state`` turns one into the search's analytic round time.

Wiring (``deps``): a unit's transfers chain one after another, the first on nothing (prefetchable: it may run
ahead) or, when on demand, on the op that triggers it; its compute waits for the unit's previous op and for the
pass's previous step. A fetch fills staging slot ``layer % (prefetch_depth + 1)`` of its pool.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from specplan.contracts.hardware import HardwareProfile
from specplan.contracts.plan import Plan
from specplan.planner.cost import expected_time_s, op_time_s, physical_resource
from specplan.planner.expect import expected_tokens_per_seq
from specplan.planner.kinds import DraftTier, draft_tier
from specplan.planner.ops import Op
from specplan.planner.units import Costing, Knobs, Pass, draft_model_ops, fixed_layer_ops, unit_ops


@dataclass(frozen=True)
class Program:
    ops: tuple[Op, ...]
    tokens: float  # expected committed tokens, all sequences (prefill: the first token of each sequence)
    sequences: int
    context_len: int
    kind: Literal["prefill", "round", "pass", "draft"]
    #: fraction of a pass's prefetchable fetches that can run ahead while its batch drafts: (depth + 1) / layers
    prefetch_window: float = 1.0
    prefetch_depth: int = 1
    #: (first op, end op, the pass, how it was built) for ``with_context``
    segments: tuple[tuple[int, int, Pass, str], ...] = ()


def costing_of(plan: Plan) -> Costing:
    d = plan.draft
    return Costing(spec=plan.model.spec, profile=plan.profile, weight_dtype=plan.policy.weight_dtype,
                   kv_dtype=plan.policy.kv_dtype, draft_spec=d.spec if d.kind == "model" else None,
                   substitute_bits=d.bits if d.kind == "substitute" else None, substitute_group=d.group)


def knobs_of(plan: Plan) -> Knobs:
    p = plan.policy
    return Knobs(attention_on=p.attention_on, experts_on=p.experts_on, expert_fetch=p.expert_fetch,
                 prefetch_depth=p.prefetch_depth)


def draft_tier_of(plan: Plan) -> DraftTier:
    return draft_tier(plan.placement.draft_weights, plan.placement.draft_kv)


def _window(plan: Plan) -> float:
    return min(1.0, (plan.policy.prefetch_depth + 1) / plan.model.spec.num_layers)


def _clone(op: Op, **changes) -> Op:
    """A copy of a frozen op with some fields changed (``dataclasses.replace`` without its per-call overhead)."""
    new = object.__new__(Op)
    new.__dict__.update(op.__dict__)
    new.__dict__.update(changes)
    return new


class _Builder:
    """Appends ops, turning the wiring rules (module docstring) into ``deps`` indices."""

    def __init__(self, depth: int = 1) -> None:
        self.ops: list[Op] = []
        self.depth = depth
        self.segments: list[tuple[int, int, Pass, str]] = []

    def add(self, op: Op, deps=(), **changes) -> int:
        changes["deps"] = tuple(sorted({d for d in deps if d is not None}))
        self.ops.append(_clone(op, **changes))
        return len(self.ops) - 1

    def unit(self, ops: list[Op], head: int | None, trigger: int | None, layer: int | None = None,
             expert: int | None = None, position: int | None = None) -> int | None:
        """Wire one unit's ops: transfers chain from the trigger (on demand) or from nothing (prefetchable);
        compute waits for the previous op of the unit and for ``head``. Returns the unit's result index (its last
        compute or on-demand transfer), the op the next step of the pass waits for."""
        prev, result = None, head
        prefix = "" if layer is None else f"L{layer}."
        for op in ops:
            name = op.name if expert is None else op.name.replace("E", f"E{expert}", 1)
            changes = dict(name=prefix + name, layer=layer, expert=expert)
            if op.slot is not None:
                changes["slot"] = (op.slot[0], (position or 0) % (self.depth + 1))
            if op.is_transfer:
                deps = (prev,) if prev is not None else ((trigger,) if op.on_demand else ())
            else:
                deps = (prev, head)
            prev = self.add(op, deps, **changes)
            if op.is_compute or op.on_demand:
                result = prev
        return result

    def chain_all(self, ops: list[Op], head: int | None) -> int | None:
        """Ops that run one after another (folded draft steps)."""
        for op in ops:
            head = self.add(op, (head,))
        return head


def unit_counts_of(plan: Plan) -> dict[tuple[str, str], int]:
    """How many layer units of each kind sit on each tier (the placement, folded over layers)."""
    counts: dict[tuple[str, str], int] = {}
    for lp in plan.placement.layers:
        for unit, tier in (("attention", lp.attention), ("kv", lp.kv_cache), ("mlp", lp.mlp),
                           ("shared", lp.shared_experts), *(("expert", t) for t in lp.experts)):
            if tier is not None:
                counts[(unit, tier)] = counts.get((unit, tier), 0) + 1
    return counts


def folded_ops(plan: Plan, p: Pass, prefix: str) -> list[Op]:
    """One pass with identical units folded into one op per (kind, tier): the same sums per resource as the
    per-layer program (op time is linear in the number of identical units), in a few dozen records. Used for
    substitute draft steps, and for predictions (``folded=True``)."""
    c, k = costing_of(plan), knobs_of(plan)
    spec, pl = plan.model.spec, plan.placement
    counts = unit_counts_of(plan)

    def named(ops: list[Op], tag: str) -> list[Op]:
        return [_clone(o, name=f"{prefix}{tag}.{o.name}" if tag else f"{prefix}{o.name}") for o in ops]

    def folded(units: tuple[str, ...]) -> list[Op]:
        return [o for (u, tier), n in sorted(counts.items()) if u in units
                for o in named(unit_ops(c, k, p, u, tier, n=n), f"{u}@{tier}")]

    router_combine = named(fixed_layer_ops(c, p, len(spec.moe_layers)), "")
    return (named(unit_ops(c, k, p, "embed", pl.embed), "") + folded(("attention", "kv")) + router_combine[:1]
            + folded(("mlp", "shared", "expert")) + router_combine[1:] + named(unit_ops(c, k, p, "lm_head", pl.lm_head), ""))


def target_pass(plan: Plan, batch: int, context_len: int, tokens_per_seq: int, num_seqs: int | None = None,
                phase: str = "decode", after: int | None = None, builder: _Builder | None = None,
                folded: bool = False) -> Program:
    """One target forward of one batch; ``after`` = index (in ``builder``) the pass starts after."""
    c, k = costing_of(plan), knobs_of(plan)
    spec, pl = plan.model.spec, plan.placement
    seqs = num_seqs or (plan.policy.prefill_batch if phase == "prefill" else plan.policy.decode_batch)
    p = Pass(phase=phase, seqs=seqs, tokens=tokens_per_seq, context=context_len, batch=batch)  # type: ignore[arg-type]
    b = builder or _Builder(plan.policy.prefetch_depth)
    start = len(b.ops)
    if folded:
        b.chain_all(folded_ops(plan, p, f"b{batch}.{phase}."), after)
        b.segments.append((start, len(b.ops), p, f"folded:b{batch}.{phase}."))
        return Program(tuple(b.ops), float(seqs if phase == "prefill" else 0), seqs, context_len, "pass",
                       _window(plan), plan.policy.prefetch_depth, tuple(b.segments))
    templates: dict[tuple[str, str], list[Op]] = {}

    def ops(unit: str, tier: str) -> list[Op]:
        if (unit, tier) not in templates:
            templates[(unit, tier)] = unit_ops(c, k, p, unit, tier)
        return templates[(unit, tier)]

    router, combine = fixed_layer_ops(c, p, 1) if spec.is_moe else (None, None)
    head = b.unit(ops("embed", pl.embed), after, after)
    for i in range(spec.num_layers):
        lp = pl.layers[i]
        head = b.unit(ops("attention", lp.attention), head, head, layer=i, position=i)
        head = b.unit(ops("kv", lp.kv_cache), head, head, layer=i, position=i)
        if spec.is_moe_layer(i):
            r = b.add(router, (head,), name=f"L{i}.router", layer=i)
            results = [r]
            if lp.shared_experts is not None:
                results.append(b.unit(ops("shared", lp.shared_experts), r, r, layer=i, position=i))
            for e, tier in enumerate(lp.experts):
                results.append(b.unit(ops("expert", tier), r, r, layer=i, expert=e, position=i))
            head = b.add(combine, results, name=f"L{i}.moe_combine", layer=i)
        else:
            head = b.unit(ops("mlp", lp.mlp or "device"), head, head, layer=i, position=i)
    b.unit(ops("lm_head", pl.lm_head), head, head, position=spec.num_layers)
    b.segments.append((start, len(b.ops), p, "target"))
    return Program(tuple(b.ops), float(seqs if phase == "prefill" else 0), seqs, context_len, "pass", _window(plan),
                   plan.policy.prefetch_depth, tuple(b.segments))


def _substitute_step(plan: Plan, p: Pass, step: int) -> list[Op]:
    """One draft step of the quantised substitute: the target's layers from resident and quantised copies."""
    return folded_ops(plan, p, f"draft{step}.")


def draft_steps(plan: Plan, batch: int, context_len: int, num_seqs: int | None = None,
                after: int | None = None, builder: _Builder | None = None) -> Program:
    """The ``draft_len`` draft steps of one batch (a draft model, or the quantised substitute)."""
    b = builder or _Builder(plan.policy.prefetch_depth)
    seqs = num_seqs or plan.policy.decode_batch
    c, head = costing_of(plan), after
    for s in range(plan.policy.draft_len):
        p = Pass(phase="draft", seqs=seqs, tokens=1, context=context_len + s, batch=batch,
                 substitute=plan.draft.kind == "substitute")
        if plan.draft.kind == "model":
            ops, how = draft_model_ops(c, p, draft_tier_of(plan), step=s), f"draft:{s}"
        else:
            ops, how = _substitute_step(plan, p, s), f"folded:draft{s}."
        start = len(b.ops)
        head = b.chain_all(ops, head)
        b.segments.append((start, len(b.ops), p, how))
    return Program(tuple(b.ops), 0.0, seqs, context_len, "draft", _window(plan), plan.policy.prefetch_depth,
                   tuple(b.segments))


def decode_round(plan: Plan, context_len: int, num_seqs: int | None = None, folded: bool = False) -> Program:
    """One steady-state round: per interleaved batch, its draft steps then one target pass over g + 1 tokens.
    ``folded``: identical units of the target pass folded (same steady state, far fewer records)."""
    pol = plan.policy
    seqs = num_seqs or pol.decode_batch
    b = _Builder(pol.prefetch_depth)
    phase = "verify" if pol.speculative else "decode"
    for batch in range(pol.num_batches):
        draft_steps(plan, batch, context_len, seqs, builder=b)
        last = len(b.ops) - 1 if pol.speculative else None
        target_pass(plan, batch, context_len, pol.draft_len + 1, seqs, phase, after=last, builder=b, folded=folded)
    tokens = pol.num_batches * seqs * expected_tokens_per_seq(pol.acceptance, pol.draft_len, pol.acceptance_curve)
    return Program(tuple(b.ops), tokens, pol.num_batches * seqs, context_len, "round", _window(plan),
                   plan.policy.prefetch_depth, tuple(b.segments))


def prefill_pass(plan: Plan, num_seqs: int | None = None, batch: int = 0, folded: bool = False,
                 with_draft: bool = True) -> Program:
    """One prefill pass: ``num_seqs`` prompts through the target and, for a draft model, the draft (its KV)."""
    seqs = num_seqs or plan.policy.prefill_batch
    b = _Builder(plan.policy.prefetch_depth)
    target_pass(plan, batch, 0, plan.workload.prompt_len, seqs, "prefill", builder=b, folded=folded)
    if plan.draft.kind == "model" and with_draft:
        p = Pass(phase="prefill", seqs=seqs, tokens=plan.workload.prompt_len, context=0, batch=batch)
        b.chain_all(draft_model_ops(costing_of(plan), p, draft_tier_of(plan)), len(b.ops) - 1)
    return Program(tuple(b.ops), float(seqs), seqs, 0, "prefill", _window(plan), plan.policy.prefetch_depth)


def with_context(plan: Plan, program: Program, context_len: int) -> Program:
    """The same program at another KV length: only the ops that depend on it (attention over the KV cache, KV
    streamed to the device, the draft's attention) are re-costed; names, deps and slots are unchanged. Much
    cheaper than rebuilding a round of a large model at every context."""
    shift = context_len - program.context_len
    if shift == 0 or not program.segments:
        return program
    c, k = costing_of(plan), knobs_of(plan)
    ops = list(program.ops)
    segments = []
    for start, end, p, how in program.segments:
        q = replace(p, context=p.context + shift)
        if how == "target":
            fresh: dict[str, dict[str, Op]] = {}
            for i in range(start, end):
                op = ops[i]
                if op.group == "kv_cache":
                    tier = plan.placement.layers[op.layer].kv_cache  # type: ignore[index]
                    if tier not in fresh:
                        fresh[tier] = {o.name: o for o in unit_ops(c, k, q, "kv", tier)}
                    ops[i] = _recost(op, fresh[tier][op.name.split(".", 1)[1]])
        else:
            if how.startswith("draft:"):
                new = draft_model_ops(c, q, draft_tier_of(plan), step=int(how.split(":")[1]))
            else:
                new = folded_ops(plan, q, how.split(":", 1)[1])
            for i, o in zip(range(start, end), new):
                ops[i] = _recost(ops[i], o)
        segments.append((start, end, q, how))
    return replace(program, ops=tuple(ops), context_len=context_len, segments=tuple(segments))


def _recost(op: Op, new: Op) -> Op:
    assert op.resource == new.resource, (op.name, new.name)
    if (op.flops, op.bytes, op.shape) == (new.flops, new.bytes, new.shape):
        return op
    return _clone(op, flops=new.flops, bytes=new.bytes, shape=new.shape)


# ---- the analytic steady state -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """Analytic time of one program run once in steady state (``steady_state``)."""

    busy_s: dict[str, float]  # physical resource -> expected busy seconds
    chain_s: dict[int, float]  # batch -> serial compute + its on-demand transfers on the busiest link
    stream_s: dict[int, float]  # batch -> drafting + what of its fetches cannot run ahead of it
    round_s: float
    bottleneck: str


def is_serial(op: Op, prefetch_depth: int = 1) -> bool:
    """Ops on a batch's serial chain: compute (except routed experts, which overlap the same layer's on-demand
    reads) and transfers the compute waits for (with no spare staging buffer every fetch is one of them)."""
    if op.is_compute:
        return op.group != "experts"
    return op.on_demand or (prefetch_depth == 0 and op.slot is not None)


def _cost_key(op: Op) -> tuple:
    return (op.resource, op.kind, op.flops, op.bytes, op.act_bytes, op.shape, op.dtype, op.calls, op.overheads,
            op.prob, op.read_bytes)


def op_times(ops, profile: HardwareProfile, expected: bool = True, streaming: bool = False) -> list[float]:
    """Seconds of each op: expected (``prob * op_time_s``), or when it happens (``expected=False``).
    Identical records (the same op in every layer) are costed once. ``streaming``: ``ops`` are one pass (or round),
    and its target compute is slowed by the disk stream it overlaps (``streaming_factor``)."""
    memo: dict[tuple, float] = {}
    out = []
    cost = expected_time_s if expected else op_time_s
    for op in ops:
        key = _cost_key(op)
        t = memo.get(key)
        if t is None:
            t = memo[key] = cost(op, profile)
        out.append(t)
    if streaming:
        f = streaming_factor(ops, out if expected else op_times(ops, profile), profile)
        if f != 1.0:
            out = [t * f if op.is_compute and op.phase != "draft" else t for op, t in zip(ops, out)]
    return out


def streaming_factor(ops, expected_s: list[float], profile: HardwareProfile) -> float:
    """How much longer a pass's target compute takes because the disk streams meanwhile: the profile's
    ``compute_slowdown_while_streaming`` s over the part of the compute the stream overlaps. With C seconds of
    compute (at the idle-disk rates) and D seconds of disk reads in the pass, the compute runs at 1/s speed while
    the disk streams: it takes D + C - D/s when D < s C, else s C. Drafting is left at the idle rate (the disk only
    prefetches a few layers while the draft runs)."""
    s = profile.overheads.compute_slowdown_while_streaming
    if s <= 1.0:
        return 1.0
    disk = sum(t for op, t in zip(ops, expected_s) if op.resource == "disk_read")
    comp = sum(t for op, t in zip(ops, expected_s) if op.is_compute and op.phase != "draft")
    if disk <= 0 or comp <= 0:
        return 1.0
    return min(s, 1.0 + disk / comp * (1.0 - 1.0 / s))


def steady_state(program: Program, profile: HardwareProfile) -> Estimate:
    """round = max(busiest physical resource; per batch, its serial compute plus its on-demand transfers on its
    busiest link; for speculative batches, drafting plus the fetches that cannot run ahead of it)."""
    depth = program.prefetch_depth
    busy: dict[str, float] = {}
    compute: dict[int, float] = {}
    draft: dict[int, float] = {}
    pre: dict[tuple[int, str], float] = {}
    serial_io: dict[tuple[int, str], float] = {}
    for op, t in zip(program.ops, op_times(program.ops, profile, streaming=True)):
        r = physical_resource(op.resource, profile)
        busy[r] = busy.get(r, 0.0) + t
        b = op.batch or 0
        if op.is_compute:
            if is_serial(op, depth):
                compute[b] = compute.get(b, 0.0) + t
            if op.phase == "draft":
                draft[b] = draft.get(b, 0.0) + t
        elif is_serial(op, depth):
            serial_io[(b, r)] = serial_io.get((b, r), 0.0) + t
        else:
            pre[(b, r)] = pre.get((b, r), 0.0) + t
    batches = sorted(set(compute) | {b for b, _ in serial_io} | {b for b, _ in pre})
    chain, stream = {}, {}
    for b in batches:
        links = sorted({r for (bb, r) in list(serial_io) + list(pre) if bb == b})
        chain[b] = compute.get(b, 0.0) + max((serial_io.get((b, r), 0.0) for r in links), default=0.0)
        if b in draft:
            stream[b] = draft[b] + max(((1 - program.prefetch_window) * pre.get((b, r), 0.0)
                                        + serial_io.get((b, r), 0.0) for r in links), default=0.0)
    bounds = dict(busy)
    for b, t in chain.items():
        bounds[f"serial chain (batch {b})"] = t
    for b, t in stream.items():
        bounds[f"drafting + stream (batch {b})"] = t
    if depth == 0 and len(chain) > 1:
        bounds["one staging buffer (batches in series)"] = sum(chain.values())
    bottleneck = max(sorted(bounds), key=lambda x: bounds[x]) if bounds else "none"
    return Estimate(busy, chain, stream, bounds.get(bottleneck, 0.0), bottleneck)
