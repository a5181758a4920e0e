"""Resident matmul weights in the CPU kernel's own blocked layout.

``F.linear`` on a plain bfloat16 weight makes oneDNN reorder the weight into its blocked (AMX tile) layout on every
call; for the row counts of decoding the reorder costs more than the matmul (this 2-core VM: a 1536 x 576 weight at
16 rows, 62 us plain against 31 us blocked; the 49152 x 576 head at 16 rows, 1.98 ms against 1.34 ms). A weight
that stays in memory for the whole run is reordered once, at load (``torch.ops.mkldnn._reorder_linear_weight``),
and multiplied by with ``torch.ops.mkldnn._linear_pointwise``: the same oneDNN matmul, bit for bit the same result
(tested), without the per-call reorder. Streamed weights land in staging buffers as the offload file holds them and
stay plain (a reorder per read would cost more than it saves).

Which runs block: CPU runs in a dtype whose blocked matmul rates the plan's profile measured
(``ComputeUnit.blocks``; the profiler measures them where ``available`` says the kernel exists), so that the cost
model (``planner/units.py``) rates exactly the matmuls the engine blocks. Which tensors: ``blockable``.
"""

from __future__ import annotations

from functools import cache

import torch

from specplan.contracts.tensors import WeightTensor

#: weight dtypes oneDNN keeps a blocked layout for here (float32 and float16 gain nothing on this CPU: measured)
BLOCKED_DTYPES = ("bfloat16",)


@cache
def available(dtype: str) -> bool:
    """Whether this torch has the blocked kernels for ``dtype`` on the CPU (a tiny matmul runs and matches)."""
    if dtype not in BLOCKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones((32, 32), dtype=getattr(torch, dtype))
        x = torch.ones((2, 32), dtype=w.dtype)
        return bool(torch.equal(BlockedLinear(w)(x), torch.nn.functional.linear(x, w)))
    except (RuntimeError, AttributeError):
        return False


def blockable(t: WeightTensor, tied_head: bool) -> bool:
    """The matrices the forward multiplies by with ``forward._linear``: attention projections, MLP, expert and
    shared-expert matrices and an untied head (not routers or shared-expert gates, whose few columns gain nothing,
    nor a head tied to the embedding, which the embedding lookup needs plain)."""
    if len(t.shape) != 2 or not t.matmul or t.group == "norms_router" or t.name.endswith("shared_gate"):
        return False
    return not (t.name in ("lm_head", "embed") and tied_head) and t.name != "embed"


class BlockedLinear:
    """A weight ``[out, in]`` in the blocked layout, used where the forward would use the tensor
    (``forward._linear``): ``self(x)`` is ``x @ w.T``; ``shape``, ``dtype``, ``device`` and ``nbytes`` as the
    plain tensor has them."""

    def __init__(self, w: torch.Tensor):
        self.shape, self.dtype, self.device = tuple(w.shape), w.dtype, w.device
        self.nbytes = w.nbytes
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.new_zeros((*x.shape[:-1], self.shape[0]))
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, None, "none", [], "")


class BlockedReader:
    """Reads a model's resident tensors for a run, its ``blockable`` CPU matrices blocked (``blocked``; else all
    plain). Each matrix to block is read into one reusable buffer, then reordered into its own allocation: a plain
    copy allocated and freed per matrix would leave its memory in the allocator's heap (measured: the demo draft's
    270 MB of weights held 370 MB of resident memory that way, 270 MB this way)."""

    def __init__(self, ckpt, dtype: torch.dtype, blocked: bool):
        spec = ckpt.spec
        self.ckpt, self.dtype, self.table, self.tied = ckpt, dtype, spec.tensors.by_name, spec.tie_word_embeddings
        sizes = [t.params * dtype.itemsize for t in self.table.values() if blockable(t, self.tied)] if blocked else []
        self._buf = torch.empty(max(sizes), dtype=torch.uint8) if sizes else None

    def read(self, name: str, scratch: torch.Tensor | None = None):
        entry = self.table.get(name)
        if self._buf is None or entry is None or not blockable(entry, self.tied):
            return self.ckpt.read(name, self.dtype, scratch)
        return BlockedLinear(self.ckpt.read(name, self.dtype, scratch, into=self._buf))

    def close(self) -> None:
        self._buf = None
