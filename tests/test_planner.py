"""The cost model: golden bytes and FLOPs per layer for Mixtral, the expectation formulas against Monte-Carlo,
programs against their folded form and against ModelSpec, memory accounting."""

import random

import pytest

from planner_fixtures import cpu_profile, hand_plan, tiny_dense, tiny_moe
from specplan.catalog import load_model_spec, load_profile
from specplan.contracts.plan import DraftSpec
from specplan.planner.cost import op_time_s
from specplan.planner.expect import (
    accepted_drafts_pmf, expected_distinct_experts, expected_rounds, expected_tokens_per_seq,
)
from specplan.planner.memory import tier_bytes
from specplan.planner.ops import Op
from specplan.planner.predict import predict
from specplan.planner.program import decode_round, prefill_pass, steady_state, target_pass, with_context
from specplan.planner.units import Costing, Knobs, Pass, unit_ops

# ---- golden numbers for one Mixtral-8x22B layer, computed by hand ---------------------------------------------------
# hidden 6144, 48 query heads and 8 KV heads of 128, FFN 16384, 8 experts top-2, bf16 (2 bytes)
ATTN_PARAMS = 6144 * 6144 + 2 * 6144 * 1024 + 6144 * 6144  # q, k, v, o = 88,080,384
EXPERT_PARAMS = 3 * 6144 * 16384  # gate, up, down = 301,989,888


@pytest.fixture(scope="module")
def mixtral():
    return Costing(load_model_spec("mixtral-8x22b"), load_profile("rtx4090-pcie4"), "bfloat16", "bfloat16")


def test_golden_mixtral_layer_bytes_and_flops(mixtral):
    assert ATTN_PARAMS == 88_080_384 and EXPERT_PARAMS == 301_989_888
    k = Knobs()
    one = Pass("decode", seqs=1, tokens=1, context=511)
    # the attention weights of a layer streamed from disk on a GPU machine: read into host staging, then copied
    read, h2d, proj = unit_ops(mixtral, k, one, "attention", "disk")
    assert (read.resource, h2d.resource) == ("disk_read", "h2d")
    assert read.bytes == h2d.bytes == 2 * ATTN_PARAMS == 176_160_768
    assert proj.flops == 2 * ATTN_PARAMS  # one token: 2 FLOPs per multiply-add
    # attention over 511 cached positions + the new one: 4 * q_dim * positions FLOPs, K and V of 8 heads x 128 x 2 B
    (attn,) = unit_ops(mixtral, k, one, "kv", "device")
    assert attn.flops == 4 * 6144 * 512
    assert attn.bytes == 512 * 2 * 1024 * 2 == 2_097_152
    # one routed expert: touched by one token with probability k/E = 1/4; then it computes that token
    fetch, copy, expert = unit_ops(mixtral, k, one, "expert", "disk")
    assert fetch.bytes == 2 * EXPERT_PARAMS == 603_979_776
    assert fetch.prob == expert.prob == pytest.approx(0.25)
    assert fetch.on_demand  # routed: the read waits for the router
    assert expert.flops == 2 * EXPERT_PARAMS
    # a verification of 5 tokens for 64 sequences: 320 routed tokens touch every expert; compute scales, bytes do not
    wide = Pass("verify", seqs=64, tokens=5, context=511)
    fetch5, _, expert5 = unit_ops(mixtral, k, wide, "expert", "disk")
    assert fetch5.bytes == fetch.bytes and fetch5.prob == pytest.approx(1.0)
    # 80 rows per expert, computed at the engine's padded row count (a bucket of 8 per octave: 80 + 3.5 mean)
    assert expert5.prob * expert5.flops == pytest.approx((80 + 3.5) * 2 * EXPERT_PARAMS)
    (router,) = [o for o in target_pass(hand_plan(mixtral.spec, mixtral.profile), 0, 511, 1, 1).ops
                 if o.name == "L0.router"]
    assert router.flops == 2 * 6144 * 8


def test_pass_flops_match_model_spec():
    """A decode pass of one token costs exactly ModelSpec's matmul FLOPs per token (+ attention over the context)."""
    for spec in (load_model_spec("mixtral-8x22b"), load_model_spec("qwen1.5-moe-a2.7b"), load_model_spec("llama-3.1-8b")):
        plan = hand_plan(spec, load_profile("rtx4090-pcie4"), decode_batch=1)
        ops = target_pass(plan, 0, 100, 1, 1).ops
        matmul = sum(o.prob * o.flops for o in ops if o.kind == "matmul")
        attention = sum(o.prob * o.flops for o in ops if o.kind == "attention")
        assert matmul == pytest.approx(spec.matmul_flops_per_token(), rel=1e-12)
        assert attention == pytest.approx(spec.attention_flops_per_token(101), rel=1e-12)


def test_expected_tokens_formula_and_monte_carlo():
    assert expected_tokens_per_seq(None, 0) == 1
    assert expected_tokens_per_seq(1.0, 4) == 5  # a = 1: every draft accepted, plus the bonus token
    assert expected_tokens_per_seq(0.0, 4) == 1
    assert expected_tokens_per_seq(0.999999, 4) == pytest.approx(5, rel=1e-5)  # continuous at a = 1
    values = [expected_tokens_per_seq(a / 20, 4) for a in range(21)]
    assert values == sorted(values)  # monotone in the acceptance (SpecOffload's formula was not)
    rng = random.Random(7)
    for a, g in ((0.6, 3), (0.9, 6)):
        pmf = accepted_drafts_pmf(a, g)
        assert sum(pmf) == pytest.approx(1)
        draws = []
        for _ in range(40_000):
            j = 0
            while j < g and rng.random() < a:
                j += 1
            draws.append(j + 1)
        assert sum(draws) / len(draws) == pytest.approx(expected_tokens_per_seq(a, g), rel=0.01)


def test_expected_rounds_of_the_slowest_sequence_monte_carlo():
    assert expected_rounds(None, 0, 31, 8) == 31
    rng = random.Random(3)
    a, g, n, seqs = 0.7, 4, 40, 8
    worst = []
    for _ in range(3000):
        rounds = []
        for _ in range(seqs):
            t = r = 0
            while t < n:
                j = 0
                while j < g and rng.random() < a:
                    j += 1
                t, r = t + j + 1, r + 1
            rounds.append(r)
        worst.append(max(rounds))
    assert sum(worst) / len(worst) == pytest.approx(expected_rounds(a, g, n, seqs), rel=0.01)
    assert expected_rounds(a, g, n, 1) < expected_rounds(a, g, n, seqs)  # more sequences wait for a slower one


def test_distinct_experts_formula_monte_carlo():
    rng = random.Random(11)
    for experts, k, tokens in ((8, 2, 1), (8, 2, 5), (64, 8, 3), (128, 8, 40)):
        touched = []
        for _ in range(4000):
            seen = set()
            for _ in range(tokens):
                seen.update(rng.sample(range(experts), k))
            touched.append(len(seen))
        assert sum(touched) / len(touched) == pytest.approx(expected_distinct_experts(experts, k, tokens), rel=0.02)


def test_roofline_and_overheads():
    prof = cpu_profile()
    unit = prof.device
    mm = Op("x", "device_compute", "matmul", flops=2e9, bytes=1e6, shape=(512, 4096, 4096), dtype="float32")
    assert op_time_s(mm, prof) == pytest.approx(2e9 / 140e9 + prof.overheads.per_op_s)
    memory_bound = Op("x", "device_compute", "matmul", flops=1e6, bytes=1.2e9, shape=(1, 4096, 4096), dtype="float32")
    assert op_time_s(memory_bound, prof) == pytest.approx(0.1 + 5e-6)
    assert unit.memory_bandwidth_Bps.median == 12e9
    read = Op("r", "disk_read", "transfer", bytes=2 * 2**24, calls=2)
    assert op_time_s(read, prof) == pytest.approx(2 * (1e-4 + 2**24 / 2.7e9))
    charged = Op("x", "device_compute", "elementwise", overheads=(("per_layer_s", 3), ("per_step_s", 1)))
    assert op_time_s(charged, prof) == pytest.approx(5e-6 + 3 * 5e-5 + 2e-4)
    assert op_time_s(Op("h", "h2d", "transfer", bytes=1e9), prof) == 0  # one memory: host->device is free


def test_folded_programs_have_the_same_steady_state():
    spec, gpu = load_model_spec("mixtral-8x7b"), load_profile("rtx4090-pcie4")
    experts = ["device", "host", "host", "disk", "disk", "disk", "disk", "disk"]
    cases = [
        hand_plan(spec, gpu, experts=experts, kv="host", attention_on="host", decode_batch=16, num_batches=2,
                  draft=DraftSpec(kind="substitute", bits=4), draft_len=3, acceptance=0.8),
        hand_plan(spec, gpu, experts=experts, attention="host", experts_on="host", expert_fetch="layer",
                  draft=DraftSpec(kind="model", name="mistral-7b", spec=load_model_spec("mistral-7b")), draft_len=2,
                  acceptance=0.7),
        hand_plan(tiny_dense(), cpu_profile(), attention="disk", mlp="disk"),
        hand_plan(tiny_moe(), cpu_profile(), experts=["device", "disk", "disk", "disk"], prefetch_depth=0),
    ]
    for plan in cases:
        for full, folded in ((decode_round(plan, 300), decode_round(plan, 300, folded=True)),
                             (prefill_pass(plan), prefill_pass(plan, folded=True))):
            a, b = steady_state(full, plan.profile), steady_state(folded, plan.profile)
            assert len(folded.ops) < len(full.ops)
            assert b.round_s == pytest.approx(a.round_s, rel=1e-12) and a.bottleneck == b.bottleneck
            for r in a.busy_s:
                assert b.busy_s[r] == pytest.approx(a.busy_s[r], rel=1e-12, abs=1e-15)


def test_program_dependencies_and_slots():
    plan = hand_plan(tiny_moe(layers=3), cpu_profile(), experts=["device", "disk", "disk", "disk"], attention="disk",
                     decode_batch=1)
    ops = decode_round(plan, 50).ops
    index = {o.name: i for i, o in enumerate(ops)}
    assert all(d < i for i, o in enumerate(ops) for d in o.deps)
    assert len(index) == len(ops)  # names are unique
    # routed expert reads wait for the router; the expert waits for its read; the combine for every expert
    assert ops[index["L1.E2.read"]].deps == (index["L1.router"],) and ops[index["L1.E2.read"]].on_demand
    assert index["L1.E2.read"] in ops[index["L1.E2"]].deps
    assert {index[f"L1.E{e}"] for e in range(4)} <= set(ops[index["L1.moe_combine"]].deps)
    # attention weights are fetched ahead (no deps) into the slot of their layer: depth 1 -> two slots
    assert ops[index["L1.attn.read"]].deps == () and ops[index["L1.attn.read"]].slot == ("device", 1)
    assert ops[index["L2.attn.read"]].slot == ("device", 0)
    assert index["L1.attn.read"] in ops[index["L1.attn_proj"]].deps
    # on a GPU a disk tensor goes through host staging, then the link
    gpu = hand_plan(tiny_moe(), load_profile("t4"), experts=["device", "host", "disk", "disk"], decode_batch=1)
    g = {o.name: o for o in target_pass(gpu, 0, 10, 1).ops}
    assert g["L0.E2.read"].slot == ("host", 0) and g["L0.E2.h2d"].slot == ("device", 0)
    assert "L0.E1.read" not in g and g["L0.E1.h2d"].bytes == g["L0.E2.read"].bytes


def test_speculative_round_structure_and_tokens():
    spec = tiny_moe()
    plan = hand_plan(spec, cpu_profile(), draft=DraftSpec(kind="substitute", bits=8), draft_len=3, acceptance=0.8,
                     num_batches=2, decode_batch=4)
    r = decode_round(plan, 64)
    assert r.tokens == pytest.approx(2 * 4 * expected_tokens_per_seq(0.8, 3))
    for b in (0, 1):
        mine = [(i, o) for i, o in enumerate(r.ops) if o.batch == b]
        drafts = [i for i, o in mine if o.phase == "draft"]
        verify = [i for i, o in mine if o.phase == "verify"]
        assert len({r.ops[i].name.split(".")[0] for i in drafts}) == 3  # three draft steps
        assert max(drafts) in r.ops[min(verify)].deps  # the verification waits for the last draft step
    # the verification computes g + 1 tokens per sequence but fetches weights once
    one = steady_state(target_pass(plan, 0, 64, 1), plan.profile)
    four = steady_state(target_pass(plan, 0, 64, 4), plan.profile)
    assert four.busy_s["device_compute"] > one.busy_s["device_compute"]
    assert four.busy_s.get("disk_read", 0) == one.busy_s.get("disk_read", 0)


def test_memory_accounting():
    spec, prof = tiny_moe(layers=2, experts=4), cpu_profile()
    plan = hand_plan(spec, prof, experts=["device", "disk", "disk", "disk"], decode_batch=4, num_batches=2)
    t = tier_bytes(plan)["decode"]
    w = 4  # float32 on a CPU
    assert t["device"]["experts"] == 2 * spec.tensors.params("experts", 0, 0) * w
    assert t["disk"]["experts"] == 6 * spec.tensors.params("experts", 0, 0) * w
    assert t["device"]["kv_cache"] == 2 * 4 * (64 + 16) * spec.kv_bytes_per_token("float32")
    assert t["device"]["staging"] == 2 * 3 * spec.tensors.params("experts", 0, 0) * w  # two slots of a layer's three streamed experts
    total = sum(v for tier in t.values() for k, v in tier.items() if k not in ("kv_cache", "staging", "activations"))
    assert total == spec.weight_bytes("float32")
    sub = hand_plan(spec, prof, experts=["device", "disk", "disk", "disk"], draft=DraftSpec(kind="substitute", bits=4),
                    draft_len=2, acceptance=0.9)
    # int4 of 6 experts in groups of 64, with a float32 scale and zero point per group: 4 + 64 / 64 bits a weight
    assert tier_bytes(sub)["decode"]["device"]["substitute"] == 6 * spec.tensors.params("experts", 0, 0) * 5 // 8
    drafted = hand_plan(spec, prof, draft=DraftSpec(kind="model", name="d", spec=tiny_dense(layers=1)), draft_len=2,
                        acceptance=0.7)
    t = tier_bytes(drafted)["decode"]["device"]
    assert t["draft_weights"] == tiny_dense(layers=1).weight_bytes("float32")
    assert t["draft_kv"] == 4 * (64 + 16 + 2) * tiny_dense(layers=1).kv_bytes_per_token("float32")


def test_prediction_counts_tokens_up_to_gen_len_only():
    plan = hand_plan(tiny_moe(), cpu_profile(), decode_batch=4, prefill_batch=4)
    p = predict(plan)
    wl = plan.workload
    assert p.e2e_tok_s == pytest.approx(wl.num_prompts * wl.gen_len / p.total_s)
    assert p.decode_tok_s == pytest.approx(wl.num_prompts * (wl.gen_len - 1) / p.decode_s)
    assert p.total_s == pytest.approx(p.prefill_s + p.decode_s)
    rnd = steady_state(decode_round(plan, wl.prompt_len + wl.gen_len // 2, folded=True), plan.profile)
    assert p.decode_s == pytest.approx(2 * (wl.gen_len - 1) * rnd.round_s)  # 8 prompts in two waves of 4
    assert p.ttft_s <= p.prefill_pass_s and p.decode_tok_s > 0


def test_with_context_recosts_only_what_the_kv_length_changes():
    spec, gpu = load_model_spec("mixtral-8x7b"), load_profile("rtx4090-pcie4")
    experts = ["device", "host", "disk", "disk", "disk", "disk", "disk", "disk"]
    plans = [
        hand_plan(spec, gpu, experts=experts, kv="host", attention_on="device", num_batches=2,
                  draft=DraftSpec(kind="substitute", bits=4), draft_len=3, acceptance=0.8),
        hand_plan(spec, gpu, experts=experts, kv="host", attention_on="host",
                  draft=DraftSpec(kind="model", name="mistral-7b", spec=load_model_spec("mistral-7b")), draft_len=2,
                  acceptance=0.7),
    ]
    for plan in plans:
        for folded in (False, True):
            moved = with_context(plan, decode_round(plan, 100, folded=folded), 400)
            fresh = decode_round(plan, 400, folded=folded)
            assert moved.context_len == 400 and len(moved.ops) == len(fresh.ops)
            for a, b in zip(moved.ops, fresh.ops):
                assert (a.name, a.deps, a.slot, a.resource) == (b.name, b.deps, b.slot, b.resource)
                assert a.flops == pytest.approx(b.flops) and a.bytes == pytest.approx(b.bytes) and a.shape == b.shape


def test_compute_slowed_by_the_disk_stream_it_overlaps():
    """s = 2: compute that the stream covers entirely takes 2x; past the stream's end it runs at full speed; drafting
    and plans that stream nothing are untouched."""
    from specplan.planner.program import streaming_factor

    prof = cpu_profile()
    slow = prof.model_copy(update={"overheads": prof.overheads.model_copy(
        update={"compute_slowdown_while_streaming": 2.0})})
    comp = Op("E", "device_compute", "matmul", phase="verify")
    draft = Op("draft.m", "device_compute", "matmul", phase="draft")
    read = Op("E.read", "disk_read", "transfer", phase="verify")
    assert streaming_factor([comp, read], [1.0, 4.0], slow) == 2.0  # D >= s C: all of it at half speed
    assert streaming_factor([comp, read], [1.0, 1.0], slow) == pytest.approx(1.5)  # D + C - D / s = 1.5
    assert streaming_factor([comp, read, draft], [1.0, 0.0, 5.0], slow) == 1.0  # nothing streams
    assert streaming_factor([comp, read], [1.0, 4.0], prof) == 1.0  # a profile without the figure
    # a whole plan: the disk-bound round's compute grows, the prediction falls, the disk time stays
    spec = tiny_moe()
    plan = hand_plan(spec, prof, experts=["disk"] * spec.num_experts, draft=DraftSpec(kind="substitute", bits=4),
                     draft_len=2, acceptance=0.7)
    slowed = plan.model_copy(update={"profile": slow})
    a = steady_state(decode_round(plan, 128), prof)
    b = steady_state(decode_round(slowed, 128), slow)
    assert b.busy_s["disk_read"] == pytest.approx(a.busy_s["disk_read"])
    assert b.busy_s["device_compute"] > a.busy_s["device_compute"]


def test_activation_bytes_are_charged_at_the_elementwise_rate_after_the_matmul():
    from specplan.contracts.hardware import Stat

    prof = cpu_profile()
    assert prof.device.elementwise_Bps is None
    op = Op("E", "device_compute", "matmul", flops=1e9, bytes=1e6, act_bytes=4e6, shape=(64, 576, 1536),
            dtype=prof.device.dtypes[0])
    base = op_time_s(op, prof)  # not measured: nothing charged
    rates = {prof.device.dtypes[0]: Stat.of(2e9), "float16": Stat.of(1e9)}
    ew = prof.model_copy(update={"device": prof.device.model_copy(update={"elementwise_Bps": rates}),
                                 "host": prof.host.model_copy(update={"elementwise_Bps": rates})})
    assert op_time_s(op, ew) == pytest.approx(base + 4e6 / 2e9)  # at the rate of the op's dtype
    # the activation bytes are the matmuls' inputs and outputs, one formula for the planner and the probe
    spec = tiny_moe()
    (expert,) = [o for o in unit_ops(Costing(spec=spec, profile=prof, weight_dtype="float32", kv_dtype="float32"),
                                     Knobs(), Pass("verify", seqs=4, tokens=1, context=64), "expert", "device")
                 if o.is_compute]
    from specplan.contracts.rows import ffn_activation_bytes, mean_bucket_rows
    from specplan.planner.expect import rows_per_touched_expert

    m = mean_bucket_rows(rows_per_touched_expert(spec.num_experts, spec.experts_per_token, 4))
    assert expert.act_bytes == pytest.approx(ffn_activation_bytes(m, spec.hidden_size, spec.moe_intermediate_size, 4))
