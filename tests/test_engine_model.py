"""The forward against transformers' own models on the same weights, ragged batches, KV rollback, tracing."""

from __future__ import annotations

import contextlib

import pytest
import torch
from engine_fixtures import ALL_FAMILIES, MOE_FAMILIES, hf_greedy, hf_logits, hf_model

from specplan.contracts.memory import kv_bytes
from specplan.engine.model.checkpoint import open_checkpoint
from specplan.engine.model.kvcache import KVCache
from specplan.engine.model.forward import MemorySource, decode_one_token, forward, generate, prefill
from specplan.errors import SpecplanError

#: transformers computes RMSNorm and RoPE in float32 even for float64 models, so float64 agreement is bounded by
#: float32 rounding inside the reference (~1e-6); float32 agreement is at the level of summation order.
ATOL = {torch.float32: 2e-5, torch.float64: 5e-6}


def engine(folder, dtype=torch.float32):
    ckpt = open_checkpoint(folder)
    return ckpt.spec, MemorySource.from_checkpoint(ckpt, dtype)


def tokens(batch, length, seed=1):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(spec, src, toks, dtype, capacity=64):
    kv = KVCache.allocate(spec, toks.shape[0], capacity, dtype)
    return forward(spec, src, kv, toks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_logits_match_transformers(tiny_model, family, dtype):
    folder = tiny_model(family)
    spec, src = engine(folder, dtype)
    toks = tokens(3, 12)
    ref = hf_logits(folder, toks, dtype)
    out = run(spec, src, toks, dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_layout_gives_the_same_model(tiny_model, family):
    per_expert, fused = tiny_model(family), tiny_model(family, layout="fused")
    toks = tokens(2, 9)
    a = run(*engine(per_expert), toks, torch.float32)
    b = run(*engine(fused), toks, torch.float32)
    assert torch.equal(a, b)
    torch.testing.assert_close(b, hf_logits(fused, toks), atol=ATOL[torch.float32], rtol=0)


def test_sharded_checkpoint(tiny_model):
    folder = tiny_model("mixtral", max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    toks = tokens(2, 7)
    torch.testing.assert_close(run(*engine(folder), toks, torch.float32), hf_logits(folder, toks), atol=2e-5, rtol=0)


def test_bfloat16_checkpoint_is_converted_at_load(tiny_model):
    folder = tiny_model("qwen2", dtype=torch.bfloat16)
    spec, src = engine(folder, torch.float32)
    assert spec.dtype == "bfloat16" and src.tensor("embed").dtype == torch.float32
    toks = tokens(2, 8)
    torch.testing.assert_close(run(spec, src, toks, torch.float32), hf_logits(folder, toks, torch.float32),
                               atol=2e-5, rtol=0)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
], ids=["linear", "llama3"])
def test_rope_scaling(tiny_model, scaling):
    folder = tiny_model("llama", rope_parameters={"rope_theta": 10000.0, **scaling})
    spec, src = engine(folder, torch.float64)
    assert spec.rope_scaling["rope_type"] == scaling["rope_type"]
    toks = tokens(1, 40)
    torch.testing.assert_close(run(spec, src, toks, torch.float64), hf_logits(folder, toks, torch.float64),
                               atol=ATOL[torch.float64], rtol=0)


def test_sliding_window(tiny_model):
    folder = tiny_model("mistral", sliding_window=5)
    spec, src = engine(folder, torch.float64)
    assert spec.sliding_window == 5
    toks = tokens(2, 14)
    out = run(spec, src, toks, torch.float64)
    torch.testing.assert_close(out, hf_logits(folder, toks, torch.float64), atol=ATOL[torch.float64], rtol=0)
    no_window = run(spec.model_copy(update={"sliding_window": None}), src, toks, torch.float64)
    assert not torch.allclose(out[:, 6:], no_window[:, 6:], atol=1e-3)  # the window really cuts keys
    # decode past the window too: token by token equals the full pass
    kv = KVCache.allocate(spec, 2, 20, torch.float64)
    steps = [forward(spec, src, kv, toks[:, t:t + 1]) for t in range(14)]
    torch.testing.assert_close(torch.cat(steps, 1), out, atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_greedy_tokens_identical_to_transformers(tiny_model, family):
    folder = tiny_model(family)
    spec, src = engine(folder)
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (5, 11, 8)]  # ragged: one batch, different lengths
    ours = generate(spec, src, prompts, 10)
    model = hf_model(folder)
    assert ours == [hf_greedy(folder, p, 10, model=model) for p in prompts]


def test_ragged_prefill_equals_each_prompt_alone(tiny_model):
    folder = tiny_model("qwen2_moe")
    spec, src = engine(folder, torch.float64)
    lengths = [3, 9, 1, 6]
    prompts = [tokens(1, n, seed=10 + n)[0] for n in lengths]
    padded = torch.zeros(4, 9, dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = p
    kv = KVCache.allocate(spec, 4, 16, torch.float64)
    batch_logits = forward(spec, src, kv, padded, torch.tensor(lengths))
    assert kv.lengths.tolist() == lengths
    nxt = torch.tensor([5, 6, 7, 8])
    batch_next = decode_one_token(spec, src, kv, nxt)
    for b, p in enumerate(prompts):
        alone_kv = KVCache.allocate(spec, 1, 16, torch.float64)
        alone = forward(spec, src, alone_kv, p[None])
        torch.testing.assert_close(batch_logits[b, : lengths[b]], alone[0], atol=1e-10, rtol=0)
        alone_next = decode_one_token(spec, src, alone_kv, nxt[b:b + 1])
        torch.testing.assert_close(batch_next[b], alone_next[0], atol=1e-10, rtol=0)


def test_a_row_with_no_new_tokens_is_left_alone(tiny_model):
    spec, src = engine(tiny_model("mixtral"), torch.float64)
    kv = KVCache.allocate(spec, 2, 8, torch.float64)
    prefill(spec, src, kv, [[1, 2, 3], [4, 5]])
    k_before = kv.k[0][1].clone()
    forward(spec, src, kv, torch.tensor([[6], [0]]), torch.tensor([1, 0]))
    assert kv.lengths.tolist() == [4, 2] and torch.equal(kv.k[0][1], k_before)
    after = decode_one_token(spec, src, kv, torch.tensor([7, 8]))
    alone = run(spec, src, torch.tensor([[4, 5, 8]]), torch.float64)
    torch.testing.assert_close(after[1], alone[0, -1], atol=1e-10, rtol=0)


def test_prefill_last_only_is_the_last_real_row(tiny_model):
    spec, src = engine(tiny_model("llama"), torch.float64)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    last = prefill(spec, src, KVCache.allocate(spec, 3, 8, torch.float64), prompts)
    for b, p in enumerate(prompts):
        alone = run(spec, src, torch.tensor([p]), torch.float64)
        torch.testing.assert_close(last[b], alone[0, -1], atol=1e-10, rtol=0)


def test_logits_at_selected_tokens(tiny_model):
    spec, src = engine(tiny_model("qwen3_moe"), torch.float64)
    toks = tokens(2, 6)
    full = run(spec, src, toks, torch.float64)
    at = torch.tensor([[0, 5], [3, 2]])
    some = forward(spec, src, KVCache.allocate(spec, 2, 8, torch.float64), toks, logits_at=at)
    torch.testing.assert_close(some, torch.stack([full[0, [0, 5]], full[1, [3, 2]]]), atol=1e-10, rtol=0)


def test_kv_rollback_then_redecode(tiny_model):
    """Speculative rollback: verify 3 drafted tokens at once, keep a different number per sequence, go on."""
    spec, src = engine(tiny_model("mixtral"), torch.float64)
    prompts = [[10, 11, 12, 13], [20, 21], [30, 31, 32]]
    kv = KVCache.allocate(spec, 3, 16, torch.float64)
    prefill(spec, src, kv, prompts)
    drafted = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    forward(spec, src, kv, drafted)  # verification pass over 3 tokens per sequence
    keep = [0, 2, 3]
    kv.set_lengths([len(p) + k for p, k in zip(prompts, keep)])
    nxt = torch.tensor([40, 41, 42])
    after = decode_one_token(spec, src, kv, nxt)
    for b, p in enumerate(prompts):  # never having decoded the rolled-back tokens
        seq = torch.tensor([p + drafted[b, : keep[b]].tolist() + [int(nxt[b])]])
        torch.testing.assert_close(after[b], run(spec, src, seq, torch.float64)[0, -1], atol=1e-10, rtol=0)
    kv.truncate(1, 1)
    assert kv.lengths.tolist() == [5, 1, 7]
    with pytest.raises(ValueError):
        kv.truncate(1, 2)


def test_select_keeps_the_chosen_sequences(tiny_model):
    spec, src = engine(tiny_model("llama"), torch.float64)
    kv = KVCache.allocate(spec, 3, 8, torch.float64)
    prefill(spec, src, kv, [[1, 2], [3, 4, 5], [6]])
    sub = kv.select([2, 0])
    assert sub.lengths.tolist() == [1, 2] and sub.batch == 2
    a = decode_one_token(spec, src, sub, torch.tensor([7, 8]))
    b = decode_one_token(spec, src, kv, torch.tensor([8, 0, 7]))
    torch.testing.assert_close(a, b[[2, 0]], atol=1e-10, rtol=0)


def test_prefill_row_slices_of_a_decode_batch(tiny_model):
    """Chunked prefill: rows [0, 2) then [2, 3) of one cache through views, then one decode of all rows."""
    spec, src = engine(tiny_model("olmoe"), torch.float64)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    kv = KVCache.allocate(spec, 3, 8, torch.float64)
    prefill(spec, src, kv.rows(0, 2), prompts[:2])
    prefill(spec, src, kv.rows(2, 3), prompts[2:])
    assert kv.lengths.tolist() == [3, 2, 4]
    together = KVCache.allocate(spec, 3, 8, torch.float64)
    prefill(spec, src, together, prompts)
    nxt = torch.tensor([3, 4, 5])
    torch.testing.assert_close(decode_one_token(spec, src, kv, nxt), decode_one_token(spec, src, together, nxt),
                               atol=1e-10, rtol=0)


def test_kv_capacity_is_checked(tiny_model):
    spec, src = engine(tiny_model("llama"))
    kv = KVCache.allocate(spec, 2, 6)
    prefill(spec, src, kv, [[1, 2, 3, 4, 5], [1]])
    with pytest.raises(SpecplanError, match="KV cache full: sequence 0 needs 7 positions, capacity is 6"):
        forward(spec, src, kv, torch.tensor([[1, 2], [3, 4]]))
    assert kv.lengths.tolist() == [5, 1]  # nothing written
    assert kv_bytes(spec, "float32", 2, 6) == kv.bytes()  # the budget's formula is what allocate takes


def test_low_precision_kv_cache(tiny_model):
    spec, src = engine(tiny_model("qwen3"))
    toks = tokens(2, 10)
    kv = KVCache.allocate(spec, 2, 16, torch.bfloat16)
    out = forward(spec, src, kv, toks)
    assert kv.k[0].dtype == torch.bfloat16
    torch.testing.assert_close(out, run(spec, src, toks, torch.float32), atol=5e-2, rtol=0)


class Recorder:
    def __init__(self):
        self.spans = []

    @contextlib.contextmanager
    def span(self, name, resource, layer, flops, bytes):
        self.spans.append((name, resource, layer, flops, bytes))
        yield


class CountingSource(MemorySource):
    def __init__(self, tensors):
        super().__init__(tensors)
        self.calls = []

    def experts(self, i, ids):
        self.calls.append(("experts", i, list(ids)))
        return super().experts(i, ids)

    def release(self, i):
        self.calls.append(("release", i))


def test_tracer_spans_use_model_spec_flops(tiny_model):
    folder = tiny_model("qwen2_moe")
    ckpt = open_checkpoint(folder)
    spec, src = ckpt.spec, CountingSource(MemorySource.from_checkpoint(ckpt).tensors)
    kv = KVCache.allocate(spec, 3, 16)
    prefill(spec, src, kv, [[1, 2, 3], [4, 5, 6, 7, 8], [9]])
    tr = Recorder()
    src.calls.clear()
    forward(spec, src, kv, torch.tensor([[1], [2], [3]]), tracer=tr, attention_resource=["host_compute"] * 2,
            experts_resource=lambda i, e: "host_compute" if e % 2 else "device_compute")
    rows = 3
    matmul = sum(s[3] for s in tr.spans if not s[0].endswith(".attention"))
    assert matmul == rows * spec.matmul_flops_per_token()
    attention = sum(s[3] for s in tr.spans if s[0].endswith(".attention"))
    assert attention == sum(spec.attention_flops_per_token(n + 1) for n in (3, 5, 1))
    assert all(s[1] == "host_compute" for s in tr.spans if s[0].endswith(".attention"))
    experts = [s for s in tr.spans if ".E" in s[0]]
    routed = {(i, e) for kind, i, *rest in src.calls if kind == "experts" for e in rest[0]}
    assert {(s[2], int(s[0].split(".E")[1])) for s in experts} == routed  # a span per routed expert, no more
    assert all(s[1] == ("host_compute" if int(s[0].split(".E")[1]) % 2 else "device_compute") for s in experts)
    assert all(len(ids) <= rows * spec.experts_per_token for kind, _, *rest in src.calls if kind == "experts"
               for ids in rest[:1])
    assert [c for c in src.calls if c[0] == "release"] == [("release", i) for i in range(spec.num_layers)]
    expert_bytes = spec.expert_bytes("float32")
    assert all(s[4] == expert_bytes for s in experts)
    names = [s[0] for s in tr.spans]
    assert names[0] == "embed" and names[-1] == "lm_head" and "L1.mlp" in names and "L0.shared" in names


def test_padding_is_not_routed(tiny_model):
    ckpt = open_checkpoint(tiny_model("mixtral"))
    spec, src = ckpt.spec, CountingSource(MemorySource.from_checkpoint(ckpt).tensors)
    tr = Recorder()
    kv = KVCache.allocate(spec, 2, 16)
    forward(spec, src, kv, torch.tensor([[5, 0, 0, 0, 0, 0], [6, 7, 0, 0, 0, 0]]), torch.tensor([1, 2]), tracer=tr)
    routed_rows = sum(s[3] for s in tr.spans if ".E" in s[0]) / (2 * spec.tensors.matmul_params("experts", 0, 0))
    assert routed_rows == spec.num_layers * 3 * spec.experts_per_token  # 3 real tokens, top-2 each, per layer


#: bfloat16 keeps 8 mantissa bits (relative rounding 2^-9); the engine and transformers round at different points
#: (fused vs unfused ops, accumulation order), and in MoE layers a near-tie of two router scores can flip an expert.
#: Stated tolerances, logits of scale ~3: dense families agree with transformers in bf16 to 0.1 on every logit;
#: every family is at least as close to the float32 model as transformers in bf16 is (1.25x its worst error + 0.02).
BF16_ATOL = 0.1
DENSE = ("llama", "mistral", "qwen2", "qwen3")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_bfloat16_logits_match_transformers_in_bfloat16(tiny_model, family):
    folder = tiny_model(family)
    spec, src = engine(folder, torch.bfloat16)
    toks = tokens(3, 12)
    out = run(spec, src, toks, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    ref = hf_logits(folder, toks, torch.bfloat16).float()
    exact = hf_logits(folder, toks, torch.float32)
    if family in DENSE:
        torch.testing.assert_close(out.float(), ref, atol=BF16_ATOL, rtol=0)
    ours, theirs = (out.float() - exact).abs().max(), (ref - exact).abs().max()
    assert ours <= 1.25 * theirs + 0.02, f"engine bf16 off the float32 model by {ours:.3f}, transformers by {theirs:.3f}"


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_bfloat16_greedy_tokens_equal_where_the_margin_is_clear(tiny_model, family):
    """Greedy tokens of the engine in bf16 equal transformers' in bf16 at every step before the first whose top-2
    margin in the float32 model is not clear, i.e. not above twice the larger of the two bf16 logit deviations from
    float32 at that step (where it is, both bf16 argmaxes are the float32 one); past it they may part."""
    folder = tiny_model(family)
    spec, src = engine(folder, torch.bfloat16)
    model, exact_model = hf_model(folder, torch.bfloat16), hf_model(folder, torch.float32)
    checked = 0
    for n in (5, 11, 8, 6, 9, 13, 4, 7):
        prompt = tokens(1, n, seed=n)[0].tolist()
        ours = generate(spec, src, [prompt], 10)[0]
        ref = hf_greedy(folder, prompt, 10, model=model)
        ctx = torch.tensor([prompt + ref])
        at = slice(len(prompt) - 1, ctx.shape[1] - 1)  # the logits that chose each new token
        exact = hf_logits(folder, ctx, model=exact_model)[0, at]
        dev = torch.maximum((run(spec, src, ctx, torch.bfloat16)[0, at].float() - exact).abs().amax(-1),
                            (hf_logits(folder, ctx, model=model)[0, at].float() - exact).abs().amax(-1))
        top2 = exact.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * dev
        upto = int(clear.long().cumprod(0).sum())  # steps before the first unclear margin
        assert ours[:upto] == ref[:upto], (n, upto)
        checked += upto
    assert checked >= 8, f"only {checked} clear steps to compare: the test would test too little"
