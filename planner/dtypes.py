"""The weight dtypes a search tries: chosen from the profile's measured matmul rates and the bytes each streams.

A dtype the device has matmul figures for is a candidate unless another candidate dominates it: no more bytes
per parameter and at least its rate at every probed shape (decode rows to prefill rows). Candidates that tie keep
one, in the order: the checkpoint's own dtype, bfloat16, float16, float32. The search runs once per candidate and
keeps the fastest plans, so the cost model, not a rule, decides between fewer bytes and faster kernels (on a CPU
with AMX, bfloat16 halves what streams from disk and multiplies faster for large batches, while float32 may be
faster for one row). A GGUF block format plans as stored; ``--dtype`` fixes one.
"""

from __future__ import annotations

from specplan.contracts.hardware import HardwareProfile
from specplan.contracts.model import ModelSpec
from specplan.contracts.tensors import GGUF_BLOCKS, dtype_bytes, unpacked_dtype
from specplan.errors import SpecplanError

#: the dtypes the engine computes in.
ENGINE_DTYPES = ("float32", "bfloat16", "float16")
#: rows of the matmul shapes probed for dominance (one decode row to a prefill chunk), at k = n = 4096.
PROBE_ROWS = (1, 4, 16, 64, 256, 1024)


def candidate_dtypes(profile: HardwareProfile, spec: ModelSpec, override: str | None = None) -> tuple[str, ...]:
    """The weight dtypes to search for ``spec`` on ``profile``, preferred first."""
    if override is not None:
        if override not in ENGINE_DTYPES:
            raise SpecplanError(f"--dtype {override}: use one of {', '.join(ENGINE_DTYPES)}")
        return (override,)
    if spec.dtype in GGUF_BLOCKS:
        return (spec.dtype,)
    have = [d for d in ENGINE_DTYPES if d in profile.device.dtypes]
    if not have:
        return ("float32",)
    order = sorted(have, key=lambda d: (d != spec.dtype, ("bfloat16", "float16", "float32").index(d)))

    def rates(d: str) -> list[float]:
        return [profile.device.matmul_flops(d, m, 4096, 4096) for m in PROBE_ROWS]

    kept: list[str] = []
    for d in order:
        if not any(dtype_bytes(e) <= dtype_bytes(d) and all(a >= b for a, b in zip(rates(e), rates(d)))
                   for e in kept):
            kept.append(d)
    return tuple(kept)


def kv_dtype_for(weight_dtype: str) -> str:
    """The KV cache's dtype for weights in ``weight_dtype``: the same (a GGUF format: the dtype it unpacks to)."""
    return unpacked_dtype(weight_dtype)
