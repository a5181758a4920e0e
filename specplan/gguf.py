"""A model's architecture from a GGUF file (llama.cpp's format), for planning: no weights are read.

``gguf_config`` maps the file's metadata (``{arch}.block_count``, ``{arch}.attention.head_count`` ...) and tensor
names (which layers have a router, whether an output matrix exists, which attention biases) to the keys of an HF
``config.json``, so ``contracts.model.from_hf_config`` builds the ``ModelSpec`` as for any other source. The
formats of the stored tensors (q4_1, q8_0, float32 ...) become the spec's ``dtype`` (the one holding most
parameters) and ``group_bytes_per_param`` (each weight group's bytes over its parameters, where they differ), so a
plan sizes the model as the file does. A model split over several files (``name-00001-of-00003.gguf``) is read from all its parts.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from specplan.contracts.model import ModelSpec, from_hf_config
from specplan.contracts.tensors import DTYPE_BYTES, dtype_bytes
from specplan.errors import ContractError, SpecplanError
from specplan.jsonio import validate

MAGIC = b"GGUF"

#: GGUF ``general.architecture`` -> HF ``model_type`` (a ``llama`` file with experts is Mixtral).
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe",
                 "qwen3moe": "qwen3_moe", "olmoe": "olmoe"}

#: ggml type names that are not block formats -> specplan's dtype names.
_PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8"}

#: GGUF tensor name (after ``blk.N.``) -> weight group.
_GROUPS = [
    (re.compile(r"attn_(q|k|v|output|qkv)(_norm)?\.(weight|bias)$"), "attention"),
    (re.compile(r"ffn_(gate|up|down)_exps\.weight$"), "experts"),
    (re.compile(r"ffn_(gate|up|down)_shexp\.weight$|ffn_gate_inp_shexp\.weight$"), "shared_experts"),
    (re.compile(r"ffn_(gate|up|down)\.(weight|bias)$"), "mlp"),
]
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return p.is_file() and f.read(4) == MAGIC
    except OSError:
        return False


def refuse_gguf_weights(path: str | Path, what: str) -> None:
    """One line saying the engine cannot run ``path`` if it is a GGUF file (plans can be made for one)."""
    if is_gguf(path):
        raise SpecplanError(f"{what} {path} is a GGUF file: specplan plans for GGUF models but its engine runs HF "
                            f"folders (config.json + *.safetensors); pass --model DIR with the same model as an HF "
                            f"folder (transformers can convert it: from_pretrained(gguf_file=...), then "
                            f"save_pretrained)")


def group_of(name: str) -> str:
    """The weight group of a GGUF tensor name (``token_embd.weight``, ``blk.3.ffn_down_exps.weight`` ...)."""
    if name.startswith("token_embd."):
        return "embed"
    if name.startswith("output."):
        return "lm_head"
    layer_part = name.split(".", 2)[2] if name.startswith("blk.") and name.count(".") >= 2 else name
    for pattern, group in _GROUPS:
        if pattern.search(layer_part):
            return group
    return "norms_router"  # norms, the router (ffn_gate_inp), the final norm


def dtype_name(ggml_type: str) -> str:
    """specplan's name of a ggml tensor type (``Q4_K`` -> ``q4_k``, ``F16`` -> ``float16``)."""
    name = _PLAIN.get(ggml_type, ggml_type.lower())
    if name not in DTYPE_BYTES:
        raise ContractError(f"tensor type {ggml_type} is not one specplan can size; known: {', '.join(DTYPE_BYTES)}")
    return name


def _read(path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], str, int]]]:
    """(metadata, [(tensor name, shape, ggml type name, bytes)]) of one GGUF file; one-line error if unreadable."""
    from gguf import GGUFReader  # numpy only; imported here so `specplan --help` stays fast

    try:
        reader = GGUFReader(str(path), "r")
        meta: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.bos_token_id",
                                                                 "tokenizer.ggml.eos_token_id"):
                if key == "tokenizer.ggml.tokens":
                    meta[key + ".count"] = len(field.data)
                continue
            meta[key] = field.contents()
        tensors = [(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name, int(t.n_bytes))
                   for t in reader.tensors]
    except ContractError:
        raise
    except Exception as e:  # a truncated or corrupt file: the reader raises whatever numpy or struct raise
        raise ContractError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:80]})") from None
    return meta, tensors


def _parts(path: Path, meta: dict[str, Any]) -> list[Path]:
    """The other files of a split model (``split.count`` > 1), in order; [] for a single file."""
    count = meta.get("split.count")
    if not isinstance(count, int) or count <= 1:
        return []
    m = _SPLIT.match(path.name)
    if m is None:
        raise ContractError(f"{path}: is part of a model split in {count} files, but its name does not say which "
                            f"(expected NAME-00001-of-{count:05d}.gguf)")
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ContractError(f"{path}: the model is split in {count} files and {', '.join(missing)} is missing; put "
                            f"all parts in one folder")
    return [p for p in parts if p != path]


def gguf_config(path: str | Path) -> tuple[dict[str, Any], tuple[str, dict[str, float]]]:
    """(HF-style config dict, (main dtype, {weight group: bytes per parameter})) of the model in the GGUF file."""
    path = Path(path)
    meta, tensors = _read(path)
    for part in _parts(path, meta):
        tensors += _read(part)[1]
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        shown = repr(arch)[:60]
        raise ContractError(f"{path}: GGUF architecture {shown} is not supported; supported: "
                            f"{', '.join(ARCHITECTURES)}")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    names = {t[0] for t in tensors}
    layers = get("block_count")
    experts = get("expert_count", 0)
    family = ARCHITECTURES[arch]
    if family in ("llama", "mistral") and experts:
        family = "mixtral"
    vocab = get("vocab_size") or meta.get("tokenizer.ggml.tokens.count")
    if vocab is None and "token_embd.weight" in names:
        vocab = next(t[1][0] for t in tensors if t[0] == "token_embd.weight")
    config: dict[str, Any] = {
        "model_type": family,
        "_name_or_path": meta.get("general.name") or path.stem,
        "num_hidden_layers": layers,
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length", 0),
        "num_attention_heads": get("attention.head_count"),
        "num_key_value_heads": get("attention.head_count_kv", get("attention.head_count")),
        "head_dim": get("attention.key_length"),
        "vocab_size": vocab,
        "max_position_embeddings": get("context_length", 4096),
        "rope_theta": get("rope.freq_base", 10000.0),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if experts:
        config.update(num_local_experts=experts, num_experts=experts,
                      num_experts_per_tok=get("expert_used_count"),
                      moe_intermediate_size=get("expert_feed_forward_length", get("feed_forward_length", 0)),
                      shared_expert_intermediate_size=get("expert_shared_feed_forward_length", 0))
        if isinstance(layers, int):
            config["mlp_only_layers"] = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in names]
        if isinstance(get("expert_weights_norm"), bool):
            config["norm_topk_prob"] = get("expert_weights_norm")
        if family in ("mixtral", "olmoe"):  # their HF configs give the experts' width as intermediate_size
            config["intermediate_size"] = config["moe_intermediate_size"]
    return config, _formats(tensors)


def _formats(tensors: list[tuple[str, tuple[int, ...], str, int]]) -> tuple[str, dict[str, float]]:
    """(the dtype holding most of the model's parameters, {group: bytes per parameter over its tensors})."""
    params: Counter = Counter()
    nbytes: Counter = Counter()
    by_dtype: Counter = Counter()
    for name, shape, ggml_type, size in tensors:
        n = 1
        for d in shape:
            n *= d
        params[group_of(name)] += n
        nbytes[group_of(name)] += size
        by_dtype[dtype_name(ggml_type)] += n
    main = by_dtype.most_common(1)[0][0] if by_dtype else "float32"
    return main, {g: nbytes[g] / n for g, n in params.items() if n}


def file_group_bytes(path: str | Path) -> dict[str, int]:
    """Bytes the file (all its parts) stores per weight group, as the tensors are laid out in it."""
    path = Path(path)
    meta, tensors = _read(path)
    for part in _parts(path, meta):
        tensors += _read(part)[1]
    out: dict[str, int] = {}
    for name, _, _, nbytes in tensors:
        out[group_of(name)] = out.get(group_of(name), 0) + nbytes
    return out


def load_gguf_spec(path: str | Path, name: str | None = None) -> ModelSpec:
    """The ``ModelSpec`` of the model in the GGUF file ``path``, sized at the formats its tensors are stored in."""
    config, (main, per_group) = gguf_config(path)
    config["torch_dtype"] = main
    spec = from_hf_config(config, name=name or Path(path).stem, source=str(path))
    mixed = {g: b for g, b in per_group.items() if b != dtype_bytes(main)}
    return validate(ModelSpec, {**spec.model_dump(), "group_bytes_per_param": mixed}, str(path))
