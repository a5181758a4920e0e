"""ModelSpec: golden numbers against published figures, and parameter counts against transformers' own models."""

import json

import pytest

from specplan.catalog import catalog_models, load_model_spec
from specplan.contracts import ModelSpec
from specplan.errors import ContractError, SpecplanError

# (catalog name, published total params, published active params or None); 1% tolerance
GOLDEN = [
    ("mixtral-8x7b", 46.7e9, 12.9e9),  # Mistral AI, "Mixtral of experts" (2024)
    ("mixtral-8x22b", 141e9, 39e9),  # Mistral AI, Mixtral 8x22B announcement
    ("mistral-7b", 7.24e9, None),  # Mistral-7B-v0.1 model card
    # Qwen3 model card: "30.5B in total and 3.3B activated". 3.3B is 3.35B cut to one decimal (the card's
    # Qwen3-235B-A22B "22B" is 22.1B the same way), so the active count is checked against 3.35B at 1% and
    # below against the card's digits.
    ("qwen3-30b-a3b", 30.5e9, 3.35e9),
    ("qwen1.5-moe-a2.7b", 14.3e9, 2.7e9),  # Qwen1.5-MoE-A2.7B model card
    ("olmoe-1b-7b", 6.9e9, None),  # OLMoE paper: 6.9B total; active "1.3B" is checked to one decimal below
    ("llama-3.1-8b", 8.03e9, None),
    ("llama-3.1-70b", 70.6e9, None),
    ("qwen2.5-0.5b", 0.49e9, None),  # Qwen2.5 model card: 0.49B
    ("qwen2.5-7b", 7.61e9, None),
    ("qwen2.5-32b", 32.5e9, None),
    ("smollm2-135m", 135e6, None),
]


@pytest.mark.parametrize("name,total,active", GOLDEN)
def test_golden_parameter_counts(name, total, active):
    spec = load_model_spec(name)
    assert spec.total_params == pytest.approx(total, rel=0.01)
    if active is not None:
        assert spec.active_params == pytest.approx(active, rel=0.01)
    elif not spec.is_moe:
        assert spec.active_params == spec.total_params


def test_olmoe_active_params_round_to_the_published_digits():
    assert round(load_model_spec("olmoe-1b-7b").active_params / 1e9, 1) == 1.3


def test_qwen3_active_params_truncate_to_the_published_digits():
    active = load_model_spec("qwen3-30b-a3b").active_params
    assert 3.3e9 <= active < 3.4e9


def test_catalog_has_the_required_models():
    required = {"mixtral-8x7b", "mixtral-8x22b", "mistral-7b", "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-32b",
                "qwen3-30b-a3b", "olmoe-1b-7b", "llama-3.1-8b", "llama-3.1-70b", "smollm2-135m"}
    assert required <= set(catalog_models())


def test_mixtral_8x22b_derived_numbers():
    s = load_model_spec("mixtral-8x22b")
    # KV: 2 (K,V) x 56 layers x 8 heads x 128 x 2 bytes
    assert s.kv_bytes_per_token() == 2 * 56 * 8 * 128 * 2 == 229_376
    assert s.kv_bytes_per_token("float32") == 2 * s.kv_bytes_per_token()
    # one expert: 3 x 6144 x 16384 parameters
    assert s.tensors.params("experts", 0, 0) == 3 * 6144 * 16384
    assert s.expert_bytes() == 2 * 3 * 6144 * 16384
    g = s.group_bytes("bfloat16")
    assert g["experts"] == 56 * 8 * 2 * 3 * 6144 * 16384
    assert g["attention"] == 56 * 2 * (2 * 6144 * 6144 + 2 * 6144 * 1024)
    assert sum(g.values()) == s.weight_bytes() == 2 * s.total_params
    # int4 halves int8
    assert s.weight_bytes("int4") * 2 == s.weight_bytes("int8")
    # FLOPs: 2 per active matmul parameter (embedding lookup and norms excluded) + 4 * q_dim * ctx per layer
    norms = 56 * 2 * 6144 + 6144
    assert s.matmul_flops_per_token() == 2 * (s.active_params - s.tensors.params("embed") - norms)
    assert s.flops_per_token(1000) - s.flops_per_token(0) == 4 * 56 * 6144 * 1000


def test_tied_embeddings_are_counted_once_but_used_as_head():
    s = load_model_spec("smollm2-135m")
    assert s.tie_word_embeddings and "lm_head" not in s.tensors.by_name
    norms = 30 * 2 * 576 + 576
    assert s.matmul_flops_per_token() == 2 * (s.active_params - norms)  # the tied head is a matmul, the lookup not


def _tiny_configs():
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, vocab_size=101,
                intermediate_size=96, max_position_embeddings=128)
    return {
        "llama": dict(base, model_type="llama"),
        "llama_bias": dict(base, model_type="llama", attention_bias=True, mlp_bias=True),
        "mistral": dict(base, model_type="mistral"),
        "qwen2": dict(base, model_type="qwen2", tie_word_embeddings=True),
        "qwen3": dict(base, model_type="qwen3", head_dim=24),
        "mixtral": dict(base, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": dict(base, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[1]),
        "qwen3_moe": dict(base, model_type="qwen3_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40,
                          head_dim=20, decoder_sparse_step=1, mlp_only_layers=[]),
        "olmoe": dict(base, model_type="olmoe", num_experts=4, num_experts_per_tok=2),
    }


@pytest.mark.parametrize("key", list(_tiny_configs()))
def test_param_count_matches_transformers(key):
    """Independent reference: the parameter count of transformers' own model built from the same config."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = _tiny_configs()[key]
    hf_cfg = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    hf_total = sum(p.numel() for p in model.parameters())  # tied parameters are counted once
    spec = ModelSpec.from_hf_config(json.loads(hf_cfg.to_json_string()), name=key)
    assert spec.total_params == hf_total


def test_qwen2_moe_dense_layers():
    cfg = _tiny_configs()["qwen2_moe"]
    s = ModelSpec.from_hf_config(cfg)
    assert s.moe_layers == (0, 2) and s.dense_layers == (1,)
    assert s.param_counts()["mlp"] == s.tensors.params("mlp", 1) == 3 * 64 * 96
    assert s.param_counts()["shared_experts"] == 2 * s.tensors.params("shared_experts", 0) == 2 * (3 * 64 * 48 + 64)


def test_model_folder_and_file_paths(tmp_path):
    cfg = _tiny_configs()["mixtral"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a = load_model_spec(str(tmp_path))
    b = load_model_spec(str(tmp_path / "config.json"))
    assert a == b and a.name == tmp_path.name and a.num_experts == 4


@pytest.mark.parametrize(
    "mutate,expect",
    [
        (lambda c: c.pop("hidden_size"), "missing 'hidden_size'"),
        (lambda c: c.update(model_type="gpt2"), "model_type 'gpt2' is not supported"),
        (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_kv_heads"),
        (lambda c: c.update(num_experts_per_tok=9), "experts_per_token"),
        (lambda c: c.update(vocab_size="many"), "vocab_size"),
    ],
)
def test_bad_config_gives_one_line_naming_the_file(tmp_path, mutate, expect):
    cfg = _tiny_configs()["mixtral"]
    mutate(cfg)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ContractError) as e:
        load_model_spec(str(path))
    msg = str(e.value)
    assert expect in msg and str(path) in msg and "\n" not in msg


def test_not_json_and_unknown_name(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ContractError, match="not valid JSON"):
        load_model_spec(str(p))
    with pytest.raises(SpecplanError, match="unknown model 'nosuchmodel'"):
        load_model_spec("nosuchmodel")
    with pytest.raises(SpecplanError, match="did you mean"):
        load_model_spec("mixtral")  # ambiguous prefix
