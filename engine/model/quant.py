"""Low-bit copies of linear weights (a substitute draft's) and their matmuls on torch's CPU low-bit kernels.

Quantisation is group-wise over the input columns of a weight ``[out, in]`` (``group_size`` columns share one step;
0: the whole row):

    int8  symmetric:  q = round(w / s) in -127..127,        s = max|w| / 127 per group,    w ~ q s
    int4  asymmetric: q = round((w - lo) / s) in 0..15,     s = (max - min) / 15 per group, w ~ q s + lo

Round-to-nearest (``rtn``) leaves every weight within half a step (``s / 2``) of its value. ``hqq`` minimises the
error instead (HQQ, Badri & Shaji 2023, the half-quadratic solver): int4 keeps each group's step and moves its zero
point to minimise the l_p error (p = 0.7, which weighs the many small errors over the few outliers); int8, whose
kernel has no zero point, shrinks each group's step where that lowers the squared error (outliers clip).

Matmuls: int8 through ``torch.ops.aten._weight_int8pack_mm`` (int8 weights, one scale per output row: one call per
group of columns), int4 through ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on weights packed once by
``_convert_weight_to_int4pack_for_cpu`` (groups of 32..256 columns, output rows in tiles of 16). Both take float32,
bfloat16 or float16 activations; a float64 pass runs them in float32. No pass dequantises a weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specplan.contracts.tensors import INT4_ROW_TILE

METHODS = ("rtn", "hqq")
#: activation dtypes the kernels take; anything else computes in float32
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HQQ_ITERS, _HQQ_P, _HQQ_BETA, _HQQ_KAPPA = 20, 0.7, 10.0, 1.01
_INT8_SHRINKS = torch.linspace(1.0, 0.7, 16)


@dataclass(frozen=True)
class Quantised:
    """A low-bit weight as cached: codes ``q [out, in]`` (int8: -127..127; int4: 0..15, as uint8), per group the
    step ``scale [out, groups]`` and (int4) the value of code 0, ``offset [out, groups]`` (float32)."""

    bits: int
    group_size: int  # columns per group (the row's width when quantised per row)
    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantise(self) -> torch.Tensor:
        """The float32 weight the codes stand for (references and tests; a pass never calls it)."""
        n, k = self.shape
        g = self.q.view(n, k // self.group_size, self.group_size).float() * self.scale[..., None]
        if self.offset is not None:
            g = g + self.offset[..., None]
        return g.view(n, k)

    def half_step(self) -> torch.Tensor:
        """Round-to-nearest's bound on each weight's error, per group: half a step ``[out, groups]``."""
        return self.scale / 2


def quantise(w: torch.Tensor, bits: int, group_size: int, method: str = "rtn") -> Quantised:
    """The ``bits``-bit copy of ``w [out, in]`` in groups of ``group_size`` columns (0: one group per row)."""
    if bits not in (4, 8) or method not in METHODS:
        raise ValueError(f"quantise: bits must be 4 or 8 and method one of {METHODS}, got {bits}, {method!r}")
    n, k = w.shape
    size = group_size or k
    if k % size:
        raise ValueError(f"quantise: {k} columns are not a whole number of groups of {size}")
    wg = w.detach().float().reshape(n, k // size, size)
    if bits == 8:
        scale = _int8_scale(wg, method)
        q = torch.round(wg / scale[..., None]).clamp(-127, 127).to(torch.int8)
        return Quantised(8, size, q.view(n, k), scale)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo))  # a constant group: code 0 is exact
    offset = lo if method == "rtn" else _hqq_offset(wg, scale, lo)
    q = torch.round((wg - offset[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return Quantised(4, size, q.view(n, k), scale, offset)


def _int8_scale(wg: torch.Tensor, method: str) -> torch.Tensor:
    """Per group: max|w| / 127 (rtn), or the shrink of it with the least squared error (hqq)."""
    top = wg.abs().amax(-1)
    base = torch.where(top > 0, top / 127, torch.ones_like(top))
    if method == "rtn":
        return base
    best, best_err = base, None
    for c in _INT8_SHRINKS.tolist():
        s = base * c
        err = (wg - torch.round(wg / s[..., None]).clamp(-127, 127) * s[..., None]).pow(2).sum(-1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The proximal step of the l_p norm (HQQ's generalised soft threshold)."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-8).pow(p - 1))


def _hqq_offset(wg: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """HQQ's zero point per group (4-bit), returned as the value of code 0: alternate the codes, the sparse error
    ``e`` (proximal l_p step) and the zero point ``z`` of ``w ~ (q - z) s`` that fits ``w - e``; keep the best."""
    s = scale[..., None]
    z = (-lo / scale)[..., None]
    best_z, best_err = z, torch.full_like(scale, float("inf"))
    beta = _HQQ_BETA
    for _ in range(_HQQ_ITERS + 1):
        q = torch.round(wg / s + z).clamp(0, 15)
        r = (q - z) * s
        err = (wg - r).abs().pow(_HQQ_P).mean(-1)
        better = err < best_err
        best_z, best_err = torch.where(better[..., None], z, best_z), torch.where(better, err, best_err)
        e = _shrink(wg - r, beta, _HQQ_P)
        z = (q - (wg - e) / s).mean(-1, keepdim=True)
        beta *= _HQQ_KAPPA
    return (-best_z * s)[..., 0]


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activation dtype the low-bit kernels run at for a pass in ``dtype``."""
    return dtype if dtype in KERNEL_DTYPES else torch.float32


class LowBitLinear:
    """A packed low-bit weight the forward multiplies by where it would use a tensor (``forward._linear``):
    ``self(x)`` is ``x @ w.T`` in the dtype of ``x``; ``shape``, ``device`` and ``nbytes`` as a tensor has them."""

    def __init__(self, qz: Quantised, dtype: torch.dtype):
        self.bits, self.group_size, self.shape = qz.bits, qz.group_size, qz.shape
        self.dtype = kernel_dtype(dtype)
        self.device = torch.device("cpu")
        n, k = self.shape
        if qz.bits == 4:
            if n % INT4_ROW_TILE:
                raise ValueError(f"int4 weights need a multiple of {INT4_ROW_TILE} output rows, not {n}")
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qz.q.to(torch.int32), 1)
            # the kernel's dequantisation is (code - 8) * scale + zero
            zero = qz.offset + 8 * qz.scale  # type: ignore[operator]
            self.scales_zeros = torch.stack([qz.scale, zero], -1).transpose(0, 1).contiguous().to(self.dtype)
            self.parts: list[tuple[slice, torch.Tensor, torch.Tensor]] = []
        else:
            groups = k // qz.group_size
            self.parts = [(slice(j * qz.group_size, (j + 1) * qz.group_size),
                           qz.q[:, j * qz.group_size:(j + 1) * qz.group_size].contiguous(),
                           qz.scale[:, j].contiguous().to(self.dtype)) for j in range(groups)]

    @property
    def nbytes(self) -> int:
        if self.bits == 4:
            return self.packed.nbytes + self.scales_zeros.nbytes
        return sum(q.nbytes + s.nbytes for _, q, s in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        lead = x.shape[:-1]
        rows = x.reshape(-1, k).to(self.dtype).contiguous()
        if rows.shape[0] == 0:
            return x.new_zeros((*lead, n))
        if self.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales_zeros)
        elif len(self.parts) == 1:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.parts[0][1], self.parts[0][2])
        else:
            y = sum(torch.ops.aten._weight_int8pack_mm(rows[:, cols].contiguous(), q, s).float()
                    for cols, q, s in self.parts)
        return y.to(x.dtype).reshape(*lead, n)
