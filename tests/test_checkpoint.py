"""Checkpoint loading: canonical names for both MoE layouts, groups, and one-line errors for broken folders."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from engine_fixtures import ALL_FAMILIES, MOE_FAMILIES, hf_logits
from safetensors.torch import load_file, save_file

from specplan.engine.model.checkpoint import open_checkpoint, read_tensor
from specplan.engine.model.kvcache import KVCache
from specplan.engine.model.forward import MemorySource, forward
from specplan.errors import SpecplanError


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_groups_match_model_spec_param_counts(tiny_model, family):
    ckpt = open_checkpoint(tiny_model(family))
    counts: dict[str, int] = {}
    for name, ref in ckpt.tensors.items():
        group = ckpt.spec.tensors.by_name[name].group
        counts[group] = counts.get(group, 0) + int(torch.Size(ref.shape).numel())
    expected = {g: n for g, n in ckpt.spec.param_counts().items() if n}
    assert counts == expected


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_expert_refs_point_at_each_experts_bytes(tiny_model, family):
    per_expert = open_checkpoint(tiny_model(family))
    fused = open_checkpoint(tiny_model(family, layout="fused"))
    assert per_expert.tensors.keys() == fused.tensors.keys()
    for name, ref in per_expert.tensors.items():
        assert torch.equal(per_expert.read(name, None), fused.read(name, None)), name
    layer = per_expert.spec.moe_layers[0]
    refs = fused.expert_refs(layer, 1)
    assert refs["up"].offset == refs["gate"].offset + refs["gate"].nbytes  # gate and up adjacent: one read
    raw = load_file(fused.tensors[f"layers.{layer}.experts.1.down"].file)
    down = next(t for k, t in raw.items() if k.endswith(f"layers.{layer}.mlp.experts.down_proj"))
    assert torch.equal(read_tensor(refs["down"], None), down[1])


def test_layer_refs_and_tokenizer(tiny_model):
    ckpt = open_checkpoint(tiny_model("qwen2_moe"))
    assert set(ckpt.layer_refs(0)) == {
        "input_norm", "post_attn_norm", "attn.q", "attn.k", "attn.v", "attn.o", "attn.q_bias", "attn.k_bias",
        "attn.v_bias", "router", "shared.gate", "shared.up", "shared.down", "shared_gate"}
    assert {"mlp.gate", "mlp.up", "mlp.down"} <= set(ckpt.layer_refs(1))  # layer 1 is dense
    tok = ckpt.tokenizer()
    assert tok.decode(tok("héllo")["input_ids"]) == "héllo"


def test_tied_embeddings(tiny_model):
    folder = tiny_model("llama", tie_word_embeddings=True)
    ckpt = open_checkpoint(folder)
    assert ckpt.spec.tie_word_embeddings and "lm_head" not in ckpt.tensors
    src = MemorySource.from_checkpoint(ckpt)
    toks = torch.tensor([[1, 2, 3, 4, 5]])
    out = forward(ckpt.spec, src, KVCache.allocate(ckpt.spec, 1, 8), toks)
    torch.testing.assert_close(out, hf_logits(folder, toks), atol=2e-5, rtol=0)


# ---- broken folders: one clear line each ---------------------------------------------------------------------


@pytest.fixture
def broken(tiny_model, tmp_path):
    """A writable copy of a tiny sharded Mixtral checkpoint."""
    src = tiny_model("mixtral", max_shard_size="60KB")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def shards(folder):
    return sorted(folder.glob("model-*.safetensors"))


def expect_error(folder, *parts):
    with pytest.raises(SpecplanError) as e:
        open_checkpoint(folder)
    msg = str(e.value)
    assert "\n" not in msg
    for p in parts:
        assert p in msg, msg
    return msg


def test_missing_folder_and_config(broken, tmp_path):
    expect_error(tmp_path / "nope", "no such model folder")
    (broken / "config.json").unlink()
    expect_error(broken, "no config.json", str(broken))


def test_unsupported_family(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (broken / "config.json").write_text(json.dumps(cfg))
    expect_error(broken, "config.json", "'gpt2' is not supported")


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope scaling 'yarn' is not supported"),
    ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new' is not supported"),
    ({"model_type": "olmoe", "num_experts": 4, "num_experts_per_tok": 2, "clip_qkv": 8.0}, "clip_qkv"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8}, "sliding-window"),
], ids=["yarn", "activation", "clip_qkv", "qwen_window"])
def test_unsupported_config_features(broken, change, message):
    cfg = json.loads((broken / "config.json").read_text())
    cfg.update(change)
    (broken / "config.json").write_text(json.dumps(cfg))
    expect_error(broken, "config.json", message)


def test_missing_shard(broken):
    victim = shards(broken)[1]
    victim.unlink()
    expect_error(broken, "model.safetensors.index.json", victim.name, "missing", "re-download")


def test_no_weights(broken):
    for f in broken.glob("*.safetensors*"):
        f.unlink()
    expect_error(broken, "no safetensors weights")


def test_truncated_data(broken):
    victim = shards(broken)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    expect_error(broken, victim.name, "truncated", "re-download or rebuild")


def test_truncated_header(broken):
    victim = shards(broken)[0]
    victim.write_bytes(victim.read_bytes()[:50])
    expect_error(broken, victim.name, "truncated")


def test_corrupted_header(broken):
    victim = shards(broken)[0]
    data = bytearray(victim.read_bytes())
    data[8:20] = b"#garbage#{[!"
    victim.write_bytes(bytes(data))
    expect_error(broken, victim.name, "corrupted safetensors header")


def test_absurd_header_length(broken):
    victim = shards(broken)[0]
    data = bytearray(victim.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)
    victim.write_bytes(bytes(data))
    expect_error(broken, victim.name, "corrupted safetensors header")


def test_offsets_inconsistent_with_shape(broken):
    victim = shards(broken)[0]
    data = victim.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] + 1] + header[name]["shape"][1:]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    victim.write_bytes(data[:8] + text + data[8 + n:])
    expect_error(broken, victim.name, "corrupted safetensors header", name)


def test_shape_mismatch_with_config(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (broken / "config.json").write_text(json.dumps(cfg))
    expect_error(broken, "has shape", "implies", "the weights do not match the config")


def test_missing_tensor(broken):
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    hf_name = "model.layers.1.self_attn.k_proj.weight"
    shard = broken / index["weight_map"][hf_name]
    tensors = load_file(shard)
    del tensors[hf_name]
    save_file(tensors, shard, metadata={"format": "pt"})
    expect_error(broken, "layers.1.attn.k", "missing from the weights", "do not match the config")


def test_more_layers_than_the_config(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (broken / "config.json").write_text(json.dumps(cfg))
    expect_error(broken, "layers.1.", "not part of the model")


def test_bfloat16_read_converts(tiny_model):
    ckpt = open_checkpoint(tiny_model("llama", dtype=torch.bfloat16))
    ref = ckpt.tensors["layers.0.attn.q"]
    assert ref.dtype == "bfloat16" and ref.nbytes == 2 * ref.shape[0] * ref.shape[1]
    raw, f32 = ckpt.read(ref.name, None), ckpt.read(ref.name)
    assert raw.dtype == torch.bfloat16 and f32.dtype == torch.float32 and torch.equal(raw.float(), f32)


def test_a_converting_read_goes_chunk_by_chunk_and_equals_the_whole_conversion(tiny_model, monkeypatch):
    """Reading float32 weights as bfloat16 through a scratch buffer smaller than the tensor (chunks not a divisor of
    its size) gives exactly the whole tensor converted, without the process keeping a float32 copy around."""
    from specplan.engine.model import checkpoint

    ckpt = open_checkpoint(tiny_model("llama"))
    ref = ckpt.tensors["layers.0.mlp.down"]
    whole = ckpt.read(ref.name, None)
    assert whole.dtype == torch.float32
    monkeypatch.setattr(checkpoint, "CONVERT_CHUNK_BYTES", 4 * 97)
    got = ckpt.read(ref.name, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == whole.shape and torch.equal(got, whole.to(torch.bfloat16))
    assert torch.equal(ckpt.read(ref.name, torch.float64), whole.double())
