"""The aligned offload layout: a checkpoint converted once into one file where every placement unit (the tensors of
one group of one layer, each routed expert's gate/up/down together, the embedding, the head) starts at a
4096-aligned offset, so one O_DIRECT read fetches one unit, and adjacent units one read.

The file holds every tensor of the model at one dtype (any placement of the same model reuses it); it is cached
under ``specplan.catalog.user_dir() / "offload"``, keyed by the checkpoint's files and the dtype, written once
(temporary name, fsync, rename) and dropped from the page cache, so later reads come from the disk.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from specplan.engine.model.checkpoint import convert_scratch
from specplan.errors import SpecplanError

#: placement groups of the canonical tensor names (engine_api.md); the order is the file order within a layer.
LAYER_GROUPS = ("norms_router", "attention", "shared_experts", "mlp", "experts")

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"experts\.(\d+)\.")


@dataclass(frozen=True, order=True)
class UnitKey:
    """What the plan places whole: ``group`` of ``layer`` (None for embed / final_norm / lm_head), or one expert."""

    layer: int | None
    group: str
    expert: int | None = None

    @property
    def label(self) -> str:
        if self.layer is None:
            return self.group
        tail = f"E{self.expert}" if self.expert is not None else self.group
        return f"L{self.layer}.{tail}"


def unit_of(name: str) -> UnitKey:
    """The placement unit a canonical tensor name belongs to."""
    if name in ("embed", "final_norm", "lm_head"):
        return UnitKey(None, name)
    m = _LAYER.fullmatch(name)
    if not m:
        raise SpecplanError(f"tensor '{name}' has no placement group (unknown canonical name)")
    layer, rest = int(m.group(1)), m.group(2)
    if rest.startswith("experts."):
        e = _EXPERT.match(rest)
        if not e:
            raise SpecplanError(f"tensor '{name}': expected layers.<i>.experts.<e>.<part>")
        return UnitKey(layer, "experts", int(e.group(1)))
    if rest.startswith("attn."):
        return UnitKey(layer, "attention")
    if rest.startswith("mlp."):
        return UnitKey(layer, "mlp")
    if rest.startswith("shared"):  # shared.gate|up|down and shared_gate
        return UnitKey(layer, "shared_experts")
    if rest == "router" or rest.endswith("norm"):
        return UnitKey(layer, "norms_router")
    raise SpecplanError(f"tensor '{name}' has no placement group (unknown canonical name)")


def _file_sort_key(u: UnitKey) -> tuple:
    if u.layer is None:
        return ({"embed": -1, "final_norm": 1 << 30, "lm_head": (1 << 30) + 1}[u.group], 0, 0)
    return (u.layer, LAYER_GROUPS.index(u.group), u.expert or 0)


@dataclass(frozen=True)
class Entry:
    """One tensor in the offload file."""

    offset: int
    nbytes: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class OffloadFile:
    path: Path
    dtype: str  # torch dtype name of every tensor in the file
    entries: dict[str, Entry]

    def extent(self, names: list[str]) -> tuple[int, int]:
        """(first offset, end) of a set of tensors."""
        es = [self.entries[n] for n in names]
        return min(e.offset for e in es), max(e.offset + e.nbytes for e in es)


def units_in_file_order(names) -> dict[UnitKey, list[str]]:
    """Tensor names grouped by unit, units in the file's order, names sorted within a unit."""
    by_unit: dict[UnitKey, list[str]] = {}
    for n in names:
        by_unit.setdefault(unit_of(n), []).append(n)
    return {u: sorted(by_unit[u]) for u in sorted(by_unit, key=_file_sort_key)}


def cache_folder(ckpt: Any, dtype: str) -> Path:
    """Where the offload file of this checkpoint at ``dtype`` lives: keyed by the folder and its weight files."""
    from specplan.catalog import user_dir

    folder = Path(ckpt.folder).resolve()
    h = hashlib.sha256(str(folder).encode())
    for ref_file in sorted({Path(r.file) for r in ckpt.tensors.values()}):
        st = ref_file.stat()
        h.update(f"{ref_file.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.name)[:60]
    return user_dir() / "offload" / f"{safe}-{h.hexdigest()[:12]}-{dtype}"


def layout_of(ckpt: Any, dtype: str) -> dict[str, Entry]:
    """Where each tensor goes in the offload file at ``dtype`` (computed from the shapes; nothing is read)."""
    from specplan.contracts.model import dtype_bytes
    from specplan.engine.io.directio import align_up

    size = dtype_bytes(dtype)
    entries: dict[str, Entry] = {}
    pos = 0
    for names in units_in_file_order(ckpt.tensors).values():
        pos = align_up(pos)
        for n in names:
            shape = tuple(int(d) for d in ckpt.tensors[n].shape)
            nbytes = int(math.prod(shape) * size)
            entries[n] = Entry(pos, nbytes, shape)
            pos += nbytes
    return entries


def ensure_offload(ckpt: Any, dtype: str = "float32", progress=None) -> OffloadFile:
    """The offload file of ``ckpt`` at ``dtype``, converting the checkpoint the first time."""
    folder = cache_folder(ckpt, dtype)
    entries = layout_of(ckpt, dtype)
    data = folder / "weights.bin"
    if _cached(folder, dtype, entries):
        return OffloadFile(data, dtype, entries)
    _convert(ckpt, dtype, folder, entries, progress)
    return OffloadFile(data, dtype, entries)


def _layout_json(dtype: str, entries: dict[str, Entry], file_bytes: int, source: str) -> dict[str, Any]:
    return {"dtype": dtype, "file_bytes": file_bytes, "source": source,
            "tensors": {n: {"offset": e.offset, "nbytes": e.nbytes, "shape": list(e.shape)} for n, e in entries.items()}}


def _cached(folder: Path, dtype: str, entries: dict[str, Entry]) -> bool:
    from specplan.jsonio import read_json

    layout, data = folder / "layout.json", folder / "weights.bin"
    if not (layout.is_file() and data.is_file()):
        return False
    try:
        raw = read_json(layout)
        want = _layout_json(dtype, entries, data.stat().st_size, raw.get("source", ""))
        return raw == want
    except (SpecplanError, AttributeError):
        return False  # an unreadable cache is rebuilt


def _convert(ckpt: Any, dtype: str, folder: Path, entries: dict[str, Entry], progress) -> None:
    import torch

    from specplan.engine.io.directio import write_aligned
    from specplan.jsonio import write_json

    tdtype = getattr(torch, dtype)
    units = units_in_file_order(ckpt.tensors)

    def chunks() -> Iterator[bytes]:
        scratch = convert_scratch()
        for names in units.values():
            parts = []
            for n in names:
                t = ckpt.read(n, dtype=tdtype, scratch=scratch).contiguous()
                if tuple(t.shape) != entries[n].shape:
                    raise SpecplanError(f"{ckpt.folder}: tensor {n} has shape {tuple(t.shape)}, its index says {entries[n].shape}")
                parts.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            if progress is not None:
                progress(sum(len(p) for p in parts))
            yield b"".join(parts)

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "weights.bin"
    try:
        offsets = write_aligned(data, chunks())
    except OSError as e:
        raise SpecplanError(f"cannot write the offload file {data}: {e.strerror or e}; free disk space or set SPECPLAN_HOME") from None
    starts = [entries[names[0]].offset for names in units.values()]
    if offsets != starts:  # write_aligned and layout_of must agree on the alignment rule
        raise RuntimeError(f"offload layout mismatch in {data}")
    write_json(folder / "layout.json", _layout_json(dtype, entries, data.stat().st_size, str(Path(ckpt.folder).resolve())))
