"""The row counts the engine runs a routed expert's matmuls at, which the cost model prices.

A routed expert computes the tokens routed to it: a count that differs from call to call. oneDNN (torch's CPU
matmul) builds and JIT-compiles a kernel for every new shape, ~2.6 ms each on this 2-core machine, and caches up to
1024 of them (~0.1 MiB each): a prefill whose experts see hundreds of distinct row counts spent ~1.2 s of 1.7 s
building kernels. The engine pads an expert's rows up to a bucket of 8 per octave (exact below 16, then a multiple of 2 up to 32,
of 4 up to 64, ...), at most 12.5% more rows and ~6% on average, so a run builds a few dozen kernels per weight shape.
"""

from __future__ import annotations

import math

#: buckets per doubling of the row count (the padding is at most 1 / BUCKETS_PER_OCTAVE of the rows).
BUCKETS_PER_OCTAVE = 8


def row_step(rows: float) -> int:
    """The bucket width at ``rows``: ``2**floor(log2(rows)) / 8``, and 1 below 16 rows (every count exact)."""
    return 2 ** max(0, math.floor(math.log2(max(rows, 1))) - int(math.log2(BUCKETS_PER_OCTAVE)))


def bucket_rows(rows: int) -> int:
    """The padded row count the engine computes ``rows`` real rows at."""
    step = row_step(rows)
    return -(-rows // step) * step if rows > 0 else 0


def mean_bucket_rows(rows: float) -> float:
    """The expected padded count for a count near ``rows`` (the padding averages half a bucket, less a row)."""
    return rows + (row_step(rows) - 1) / 2 if rows > 0 else 0.0


# ---- activation bytes: what the elementwise work around a layer's matmuls is priced by --------------------------
# The engine's norms, rope, activation function, gathers and residual adds run as separate kernels next to the
# matmuls; their time grows with the activations, not the weights. Both the cost model (each op's ``act_bytes``) and
# the profiler's probe (``ComputeUnit.elementwise_Bps``: these bytes per second of the engine's elementwise code)
# count them with these two functions: the inputs and outputs of each matmul, at the activations' dtype.


def attention_activation_bytes(rows: float, hidden: int, q_dim: int, kv_dim: int, nbytes: float) -> float:
    """An attention block's projections: x in, q / k / v out, the attention output in, x out."""
    return rows * (2 * hidden + 2 * q_dim + 2 * kv_dim) * nbytes


def ffn_activation_bytes(rows: float, hidden: int, intermediate: int, nbytes: float) -> float:
    """A gated FFN (a dense MLP or one expert): x in, gate / up out (one width), down in, y out."""
    return rows * (2 * hidden + 2 * intermediate) * nbytes
