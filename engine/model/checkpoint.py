"""Local HF checkpoints: config.json + safetensors (one file or a sharded index) -> canonical tensor references.

``open_checkpoint(folder)`` reads only the config and the safetensors headers: every tensor becomes a ``TensorRef``
(file, absolute byte offset, byte count, dtype, shape) under a canonical name that does not depend on the HF layout
(the names of ``specplan.contracts.tensors``). Both MoE layouts map to the same names: the published per-expert one
(``block_sparse_moe.experts.N.w1/w2/w3``, ``mlp.experts.N.gate_proj/...``) and the fused one transformers 5 writes
(``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]), where each expert's gate, up and
down is a contiguous byte range inside the fused tensor. Problems (missing config or shard, truncated or corrupted
file, weights that do not match the config) raise ``SpecplanError`` with one line naming the file.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specplan.contracts.model import ModelSpec, from_hf_config
from specplan.errors import SpecplanError
from specplan.jsonio import read_json

#: safetensors dtype codes -> torch dtype names (the ones the engine can read).
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
#: a header longer than this is not a real safetensors header (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: ``nbytes`` contiguous bytes at absolute ``offset`` of ``file``."""

    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class Checkpoint:
    """An opened checkpoint: its ``ModelSpec`` and a ``TensorRef`` per canonical tensor name (no data read yet)."""

    folder: Path
    spec: ModelSpec
    tensors: dict[str, TensorRef]
    config: dict = field(repr=False, default_factory=dict)

    def read(self, name: str, dtype: torch.dtype | None = torch.float32,
             scratch: torch.Tensor | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor ``name`` read from disk (buffered), converted to ``dtype`` (None: as stored), through
        ``scratch`` when given, as a view of ``into`` when given (``read_tensor``)."""
        ref = self.tensors.get(name)
        if ref is None:
            raise KeyError(f"{self.folder}: no tensor '{name}'")
        return read_tensor(ref, dtype, scratch, into)

    def layer_refs(self, i: int) -> dict[str, TensorRef]:
        """Non-expert tensors of layer ``i``, keyed without the ``layers.{i}.`` prefix ("attn.q", "router", ...)."""
        prefix = f"layers.{i}."
        return {n[len(prefix):]: r for n, r in self.tensors.items()
                if n.startswith(prefix) and not n.startswith(prefix + "experts.")}

    def expert_refs(self, i: int, e: int) -> dict[str, TensorRef]:
        """The ``gate``, ``up`` and ``down`` references of expert ``e`` of layer ``i``."""
        prefix = f"layers.{i}.experts.{e}."
        return {p: self.tensors[prefix + p] for p in ("gate", "up", "down")}

    @property
    def has_tokenizer(self) -> bool:
        return any((self.folder / f).is_file() for f in TOKENIZER_FILES)

    def tokenizer(self):
        """The folder's tokenizer (transformers ``AutoTokenizer``); ``SpecplanError`` if the folder has none."""
        if not self.has_tokenizer:
            raise SpecplanError(f"{self.folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                                f"pass token ids, or use a model folder that includes its tokenizer")
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.folder))
        except Exception as e:  # a corrupt tokenizer file raises whatever its parser raises
            why = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise SpecplanError(f"{self.folder}: cannot load the tokenizer ({why}); re-download the tokenizer "
                                f"files ({', '.join(TOKENIZER_FILES)})") from None


# ---- canonical names ---------------------------------------------------------------------------------------------


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Canonical name -> (shape, required) of every tensor the config implies: the model's tensor table
    (``spec.tensors``), plus as optional the attention biases the config has none of (tolerated, not used)."""
    out = {t.name: (t.shape, False) for t in spec.tensors.optional}
    out.update({t.name: (t.shape, True) for t in spec.tensors.tensors})
    return out


_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
_LAYER_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"input_layernorm\.weight"), "input_norm"),
    (re.compile(r"post_attention_layernorm\.weight"), "post_attn_norm"),
    (re.compile(r"self_attn\.([qkvo])_proj\.weight"), r"attn.\1"),
    (re.compile(r"self_attn\.([qkvo])_proj\.bias"), r"attn.\1_bias"),
    (re.compile(r"self_attn\.([qk])_norm\.weight"), r"attn.\1_norm"),
    (re.compile(r"(?:block_sparse_moe|mlp)\.gate\.weight"), "router"),
    (re.compile(r"mlp\.shared_expert_gate\.weight"), "shared_gate"),
    (re.compile(r"mlp\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight"), "shared.{proj}"),
    (re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight"),
     "experts.{e}.{proj}"),
    (re.compile(r"mlp\.(gate_proj|up_proj|down_proj)\.weight"), "mlp.{proj}"),
    (re.compile(r"mlp\.(gate_proj|up_proj|down_proj)\.bias"), "mlp.{proj}_bias"),
]
_FUSED = re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj)")
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_TOP = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head",
        "embed_tokens.weight": "embed", "norm.weight": "final_norm"}


def canonical_name(hf_name: str) -> str | None:
    """Canonical name of one HF tensor (None if the engine does not use it; fused expert tensors are handled apart)."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    m = _LAYER.match(hf_name)
    if not m:
        return None
    i, rest = m.group(1), m.group(2)
    for pattern, target in _LAYER_RULES:
        r = pattern.fullmatch(rest)
        if not r:
            continue
        if "{" in target:
            groups = r.groups()
            proj = _PROJ[groups[-1]]
            name = target.format(proj=proj, e=groups[0] if len(groups) > 1 else "")
        else:
            name = r.expand(target)
        return f"layers.{i}.{name}"
    return None


# ---- safetensors headers -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Raw:
    """One tensor as the safetensors header describes it."""

    hf_name: str
    file: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> list[_Raw]:
    """Parse and check one safetensors header; the data ranges must lie inside the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SpecplanError(f"{path}: truncated safetensors file ({size} bytes, no header); "
                                    f"re-download or rebuild the checkpoint")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise SpecplanError(f"{path}: corrupted safetensors header (claims {n} header bytes); "
                                    f"re-download or rebuild the checkpoint")
            if 8 + n > size:
                raise SpecplanError(f"{path}: truncated safetensors file (header says {n} header bytes, file has "
                                    f"{size} bytes in all); re-download or rebuild the checkpoint")
            text = f.read(n)
    except OSError as e:
        raise SpecplanError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(text.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        why = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise SpecplanError(f"{path}: corrupted safetensors header ({why}); "
                            f"re-download or rebuild the checkpoint") from None
    base, data_size = 8 + n, size - 8 - n
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        out.append(_check_entry(path, name, meta, base, data_size))
    need = max((r.offset + r.nbytes - base for r in out), default=0)
    if need > data_size:
        raise SpecplanError(f"{path}: truncated safetensors file (header says {need} bytes of tensor data, the file "
                            f"has {data_size}); re-download or rebuild the checkpoint")
    return out


def _check_entry(path: Path, name: str, meta, base: int, data_size: int) -> _Raw:
    def bad(why: str) -> SpecplanError:
        return SpecplanError(f"{path}: corrupted safetensors header (tensor {_short(name)}: {why}); "
                             f"re-download or rebuild the checkpoint")

    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
        raise bad("needs dtype, shape and data_offsets")
    if not isinstance(meta["dtype"], str):
        raise bad(f"dtype must be a string, got {_short(meta['dtype'])}")
    dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
    if dtype is None:
        raise SpecplanError(f"{path}: tensor {_short(name)} has dtype {_short(meta['dtype'])}, which the engine cannot "
                            f"read (supported: {', '.join(SAFETENSORS_DTYPES)})")
    shape, offs = meta["shape"], meta["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= 16 and all(_whole(d) and d >= 0 for d in shape)):
        raise bad(f"bad shape {_short(shape)}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_whole(o) for o in offs)
            and 0 <= offs[0] <= offs[1]):
        raise bad(f"bad data_offsets {_short(offs)}")
    nbytes = math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    if offs[1] - offs[0] != nbytes:
        raise bad(f"data_offsets span {offs[1] - offs[0]} bytes, shape {shape} x {dtype} needs {nbytes}")
    return _Raw(name, path, base + offs[0], nbytes, dtype, tuple(shape))


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


#: bytes read at a time when a tensor is converted on the way in (the scratch buffer's size)
CONVERT_CHUNK_BYTES = 16 << 20


def convert_scratch() -> torch.Tensor:
    """A scratch buffer for ``read_tensor``'s conversions: one per loop over many tensors, so that the reads
    allocate nothing but their results."""
    return torch.empty(CONVERT_CHUNK_BYTES, dtype=torch.uint8)


def read_tensor(ref: TensorRef, dtype: torch.dtype | None = torch.float32,
                scratch: torch.Tensor | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes (buffered) and convert it to ``dtype`` (None keeps the stored dtype). A conversion
    goes chunk by chunk through ``scratch`` (a ``convert_scratch``; None: one of its own), straight into the
    result: reading a float32 tensor whole and converting it would leave the float32 copy's memory in the
    allocator's heap, and so would a scratch buffer allocated and freed per tensor (measured: a bfloat16 plan on
    float32 weights then stayed resident at up to its float32 size). ``into`` (a uint8 buffer at least the
    result's size): the result is a view of it, for a caller that only needs it for a moment."""
    stored = ref.torch_dtype
    out_dtype = stored if dtype is None else dtype
    size = torch.Size(ref.shape).numel() * out_dtype.itemsize
    # not zero-filled: the reads overwrite every byte
    buf = torch.empty(size, dtype=torch.uint8) if into is None else into[:size]
    if out_dtype == stored:
        _read_into(ref, memoryview(buf.numpy()), ref.offset)
        return buf.view(stored).reshape(ref.shape)
    out = buf.view(dtype).reshape(-1)
    item = stored.itemsize
    scratch = convert_scratch() if scratch is None else scratch
    per = max(1, scratch.numel() // item)
    for lo in range(0, out.numel(), per):
        n = min(per, out.numel() - lo)
        part = scratch[:n * item]
        _read_into(ref, memoryview(part.numpy()), ref.offset + lo * item)
        out[lo:lo + n].copy_(part.view(stored))
    return out.reshape(ref.shape)


def _read_into(ref: TensorRef, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the file's bytes at ``offset`` (part of tensor ``ref``)."""
    got = 0
    try:
        with ref.file.open("rb", buffering=0) as f:
            f.seek(offset)
            while got < len(view):  # one read(2) returns at most ~2 GiB
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    except OSError as e:
        raise SpecplanError(f"{ref.file}: cannot read tensor '{ref.name}' ({e.strerror})") from None
    if got != len(view):
        raise SpecplanError(f"{ref.file}: truncated while reading tensor '{ref.name}' (got {offset - ref.offset + got}"
                            f" of {ref.nbytes} bytes); re-download or rebuild the checkpoint")


# ---- opening a folder --------------------------------------------------------------------------------------------


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: from the sharded index when there is one, else ``model.safetensors``."""
    index = folder / INDEX_NAME
    if index.is_file():
        data = read_json(index)
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise SpecplanError(f"{index}: no 'weight_map'; re-download the index or the checkpoint")
        if not all(isinstance(v, str) and v and "/" not in v for v in wm.values()):
            raise SpecplanError(f"{index}: field 'weight_map': expected shard file names; re-download the index")
        files = []
        for shard in sorted(set(wm.values())):
            p = folder / shard
            if not p.is_file():
                raise SpecplanError(f"{index}: shard '{shard}' named in the index is missing from {folder}; "
                                    f"re-download it")
            files.append(p)
        return files
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    bins = sorted(folder.glob("*.bin"))
    hint = " (only PyTorch .bin files: re-save with safetensors)" if bins else ""
    raise SpecplanError(f"{folder}: no safetensors weights{hint}; pass an HF folder with model.safetensors or "
                        f"a sharded {INDEX_NAME}")


def open_checkpoint(folder: str | Path) -> Checkpoint:
    """Open a local HF model folder; reads the config and the headers only."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SpecplanError(f"{folder}: no such model folder")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SpecplanError(f"{folder}: no config.json; pass an HF model folder (config.json + safetensors)")
    config = read_json(cfg_path)
    spec = from_hf_config(config, name=folder.name, source=str(cfg_path))
    _check_supported(config, spec, cfg_path)
    raws: list[_Raw] = []
    for f in weight_files(folder):
        raws.extend(read_safetensors_header(f))
    tensors = _map_tensors(raws, spec)
    _check_against_config(tensors, spec, cfg_path)
    return Checkpoint(folder=folder, spec=spec, tensors=tensors, config=config)


def _check_supported(config: dict, spec: ModelSpec, cfg_path: Path) -> None:
    from specplan.engine.model.forward import ACTIVATIONS, ROPE_TYPES  # the forward decides what it can compute

    if spec.hidden_act not in ACTIVATIONS:
        raise SpecplanError(f"{cfg_path}: hidden_act '{spec.hidden_act}' is not supported by the engine "
                            f"(supported: {', '.join(ACTIVATIONS)})")
    rope_type = (spec.rope_scaling or {}).get("rope_type", (spec.rope_scaling or {}).get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise SpecplanError(f"{cfg_path}: rope scaling '{rope_type}' is not supported by the engine "
                            f"(supported: {', '.join(ROPE_TYPES)})")
    if spec.sliding_window and spec.family not in ("mistral", "mixtral"):
        raise SpecplanError(f"{cfg_path}: per-layer sliding-window attention ({spec.family} with use_sliding_window) "
                            f"is not supported by the engine")
    if config.get("clip_qkv") is not None:
        raise SpecplanError(f"{cfg_path}: clip_qkv is not supported by the engine")
    if spec.is_moe and spec.mlp_bias:
        raise SpecplanError(f"{cfg_path}: MoE experts with biases (mlp_bias) are not supported by the engine")


def _map_tensors(raws: list[_Raw], spec: ModelSpec) -> dict[str, TensorRef]:
    tensors: dict[str, TensorRef] = {}
    for r in raws:
        m = _LAYER.match(r.hf_name)
        fused = _FUSED.fullmatch(m.group(2)) if m else None
        if fused:
            for ref in _split_fused(r, int(m.group(1)), fused.group(1), spec):
                tensors[ref.name] = ref
            continue
        name = canonical_name(r.hf_name)
        if name is None:
            continue
        if name in tensors:
            raise SpecplanError(f"{r.file}: tensor '{r.hf_name}' ({name}) appears twice in the checkpoint; "
                                f"re-download or rebuild it")
        tensors[name] = TensorRef(name, r.file, r.offset, r.nbytes, r.dtype, r.shape)
    if spec.tie_word_embeddings:
        tensors.pop("lm_head", None)  # tied: the model uses the embedding
    return tensors


def _split_fused(r: _Raw, layer: int, kind: str, spec: ModelSpec) -> list[TensorRef]:
    """Per-expert references into a fused [E, 2I, H] gate_up or [E, H, I] down tensor."""
    e, p = spec.num_experts, f"layers.{layer}.experts."
    if f"{p}0.gate" not in spec.tensors.by_name:
        raise SpecplanError(f"{r.file}: tensor '{r.hf_name}' is not part of the model config.json describes (layer "
                            f"{layer} has no routed experts); the weights do not match the config")
    gate, down = (spec.tensors.by_name[f"{p}0.{n}"].shape for n in ("gate", "down"))
    want = (e, 2 * gate[0], gate[1]) if kind == "gate_up_proj" else (e, *down)
    if r.shape != want:
        raise SpecplanError(f"{r.file}: tensor '{r.hf_name}' has shape {list(r.shape)} but config.json implies "
                            f"{list(want)}; the weights do not match the config")
    item = r.nbytes // max(1, math.prod(r.shape))
    per_expert = r.nbytes // e
    refs = []
    for x in range(e):
        base = r.offset + x * per_expert
        if kind == "gate_up_proj":
            half = math.prod(gate) * item
            refs.append(TensorRef(f"{p}{x}.gate", r.file, base, half, r.dtype, gate))
            refs.append(TensorRef(f"{p}{x}.up", r.file, base + half, half, r.dtype, gate))
        else:
            refs.append(TensorRef(f"{p}{x}.down", r.file, base, per_expert, r.dtype, down))
    return refs


def _check_against_config(tensors: dict[str, TensorRef], spec: ModelSpec, cfg_path: Path) -> None:
    expected = expected_shapes(spec)
    for name, (shape, required) in expected.items():
        ref = tensors.get(name)
        if ref is None:
            if required:
                raise SpecplanError(f"{cfg_path.parent}: tensor '{name}' that {cfg_path.name} implies is missing "
                                    f"from the weights; the weights do not match the config")
            continue
        if ref.shape != shape:
            raise SpecplanError(f"{ref.file}: tensor '{name}' has shape {list(ref.shape)} but {cfg_path.name} "
                                f"implies {list(shape)}; the weights do not match the config")
    extra = sorted(n for n in tensors if n not in expected)
    if extra:
        raise SpecplanError(f"{tensors[extra[0]].file}: tensor '{extra[0]}' is not part of the model {cfg_path.name} "
                            f"describes (e.g. more layers or experts); the weights do not match the config")
