"""The substitute draft's low-bit weights: built once per model from the checkpoint and cached beside its offload
file, then loaded for the tensors a plan streams.

The cache holds a low-bit copy of every matrix the substitute quantises (``contracts.tensors.substitute_quantises``:
every layer's attention and FFN matrices, every routed expert of an MoE target, the output head; a tied head is a
copy of the embedding), so any placement of the same model at the same bits, group size and quantiser reuses it.
It lives under ``offload/<checkpoint key>-int<bits>-g<group>-<quantiser>/substitute.pt``, keyed by the checkpoint's
files like the offload file (``offload.cache_folder``), written once (temporary name, fsync, rename). 4-bit codes
are stored two to a byte.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from specplan.contracts.model import ModelSpec
from specplan.contracts.tensors import WeightTensor, substitute_quantises
from specplan.engine.io.offload import cache_folder
from specplan.engine.model.quant import LowBitLinear, Quantised, quantise
from specplan.errors import SpecplanError

FORMAT = 1


def quantised_tensors(spec: ModelSpec, bits: int, group_size: int) -> dict[str, WeightTensor]:
    """Canonical name -> the tensor its low-bit copy is made of: every matrix the substitute quantises, and
    ``lm_head`` (the embedding when tied)."""
    out = {t.name: t for t in spec.tensors.tensors if t.name != "embed" and substitute_quantises(t, bits, group_size)}
    head = spec.tensors.head
    if substitute_quantises(head, bits, group_size, as_head=True):
        out["lm_head"] = head
    return out


def substitute_path(ckpt: Any, bits: int, group_size: int, method: str) -> Path:
    return cache_folder(ckpt, f"int{bits}-g{group_size}-{method}") / "substitute.pt"


def ensure_substitute(ckpt: Any, bits: int, group_size: int, method: str,
                      progress: Callable[[int], None] | None = None) -> Path:
    """The cached substitute of ``ckpt`` (building it the first time); ``progress`` gets source bytes converted."""
    path = substitute_path(ckpt, bits, group_size, method)
    names = sorted(quantised_tensors(ckpt.spec, bits, group_size))
    if _cached(path, bits, group_size, method, names):
        return path
    table = quantised_tensors(ckpt.spec, bits, group_size)
    data: dict[str, torch.Tensor] = {}
    for n in names:
        w = ckpt.read(table[n].name, dtype=torch.float32)
        qz = quantise(w, bits, group_size, method)
        data[f"{n}.q"] = _pack(qz.q) if bits == 4 else qz.q
        data[f"{n}.scale"] = qz.scale
        if qz.offset is not None:
            data[f"{n}.offset"] = qz.offset
        if progress is not None:
            progress(w.nbytes)
    meta = {"format": FORMAT, "bits": bits, "group_size": group_size, "method": method, "names": names}
    _write(path, {"meta": meta, "tensors": data})
    return path


def load_substitute(path: Path, names: Iterable[str], spec: ModelSpec, bits: int, group_size: int,
                    dtype: torch.dtype) -> dict[str, LowBitLinear]:
    """The packed low-bit weights of ``names`` (a subset of ``quantised_tensors``), ready for ``dtype`` passes."""
    table = quantised_tensors(spec, bits, group_size)
    blob = _load(path)
    data, out = blob["tensors"], {}
    for n in names:
        n_out, k = table[n].shape
        q = _unpack(data[f"{n}.q"], k) if bits == 4 else data[f"{n}.q"]
        scale = data[f"{n}.scale"]
        qz = Quantised(bits, group_size or k, q, scale, data.get(f"{n}.offset"))
        if qz.shape != (n_out, k):
            raise SpecplanError(f"{path}: {n} has shape {qz.shape}, the model's is {(n_out, k)}; delete the file")
        out[n] = LowBitLinear(qz, dtype)
    return out


def _pack(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes [n, k] (k even) -> bytes [n, k / 2], the even column in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.empty((packed.shape[0], k), dtype=torch.uint8)
    out[:, 0::2], out[:, 1::2] = packed & 0xF, packed >> 4
    return out


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise SpecplanError(f"cannot read the substitute cache {path}: {e}; delete it to rebuild") from None


def _cached(path: Path, bits: int, group_size: int, method: str, names: list[str]) -> bool:
    if not path.is_file():
        return False
    try:
        meta = _load(path).get("meta", {})
    except SpecplanError:
        return False  # an unreadable cache is rebuilt
    return meta == {"format": FORMAT, "bits": bits, "group_size": group_size, "method": method, "names": names}


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SpecplanError(f"cannot write the substitute cache {path}: {e.strerror or e}; free disk space or set "
                            f"SPECPLAN_HOME") from None
