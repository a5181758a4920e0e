"""Compute throughput of a device (a GPU, or the CPU itself), measured with the calls the engine makes.

- Matmul: ``torch.nn.functional.linear(x [m, k], w [n, k])`` — the engine's linear layers — over decode-shaped
  (m = 1..512) and prefill-shaped rows, per weight shape (k, n) and dtype. Each call takes the next of several weight
  copies whose total is larger than the last-level cache, so small-m figures are the rate of streaming weights from
  memory, as they are for a model's layers, not of re-reading a cached matrix. On a CPU also the substitute draft's
  low-bit matmuls (``int8``: per output row, ``int4``: groups of 64, the defaults; ``model.quant.LowBitLinear`` on
  torch's int8 / int4 CPU kernels) with activations in bfloat16 where it is profiled, else float32.
- Decode attention: ``scaled_dot_product_attention`` of one query token per sequence over a KV cache laid out
  [batch, kv_heads, seq, head_dim] with a boolean mask and GQA, through the engine's own ``attend``; the figure is
  KV bytes read per second over the KV bytes of one call.
- Memory bandwidth: the read rate of ``torch.sum`` over a tensor several times the last-level cache.
"""

from __future__ import annotations

import math
from itertools import cycle
from pathlib import Path

from specplan.contracts.hardware import Curve, MatmulCurve, Point, Stat
from specplan.contracts.memory import kv_bytes as kv_cache_bytes
from specplan.contracts.model import ModelSpec, dtype_bytes
from specplan.contracts.rows import attention_activation_bytes, bucket_rows, ffn_activation_bytes
from specplan.engine.measure.timing import Ticker, interleaved_seconds, rate, sample_seconds
from specplan.engine.model.blocked import BlockedLinear, available
from specplan.engine.model.quant import LowBitLinear, quantise

#: at most this many weight / KV copies are rotated (tiny tensors would otherwise need thousands).
MAX_COPIES = 4096
#: weight-only low-bit matmuls (a substitute draft's) -> (bits, group size): the substitute's defaults
LOWBIT_DTYPES = {"int8": (8, 0), "int4": (4, 64)}


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * mult)
    return max(sizes) if sizes else None


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def copies_for(nbytes: int, working_set_bytes: int) -> int:
    return max(1, min(MAX_COPIES, math.ceil(working_set_bytes / max(nbytes, 1))))


def weight_copies(k: int, n: int, dtype: str, device: str, working_set_bytes: int,
                  activations: str = "float32") -> list:
    """Weight copies ``[n, k]`` in ``dtype``; a low-bit dtype (``LOWBIT_DTYPES``) as packed ``LowBitLinear``s for
    ``activations``."""
    import torch

    count = copies_for(int(k * n * dtype_bytes(dtype)), working_set_bytes)
    scale = 1 / math.sqrt(k)
    if dtype in LOWBIT_DTYPES:
        bits, group = LOWBIT_DTYPES[dtype]
        return [LowBitLinear(quantise(torch.empty((n, k)).uniform_(-scale, scale), bits, group),
                             _torch_dtype(activations)) for _ in range(count)]
    return [torch.empty((n, k), dtype=_torch_dtype(dtype), device=device).uniform_(-scale, scale) for _ in range(count)]


def blocked_copies(k: int, n: int, dtype: str, working_set_bytes: int) -> list[BlockedLinear]:
    """``weight_copies`` held as the engine holds a resident weight (``model.blocked.BlockedLinear``)."""
    return [BlockedLinear(w) for w in weight_copies(k, n, dtype, "cpu", working_set_bytes)]


def blocked_dtypes(dtypes: list[str], blocked: bool) -> list[str]:
    """The dtypes of ``dtypes`` that have the CPU's blocked kernels, where the engine blocks (``blocked``: a CPU
    without a GPU; on a GPU machine the host's weights are copied to the device)."""
    return [d for d in dtypes if blocked and available(d)]


def linear_call(weights: list, m: int):
    """One ``F.linear`` of ``m`` rows per call (a low-bit weight: its kernel), each call on the next of ``weights``."""
    import torch
    import torch.nn.functional as F

    w0 = weights[0]
    x = torch.empty((m, w0.shape[1]), dtype=w0.dtype, device=w0.device).uniform_(-1, 1)
    ws = cycle(weights)
    if isinstance(w0, (LowBitLinear, BlockedLinear)):
        return lambda: next(ws)(x)
    return lambda: F.linear(x, next(ws))


def matmul_steps(n_curves: int, rows: tuple[int, ...], reps: int) -> int:
    return n_curves * len(rows) * (reps + 1)


def matmul_curves(
    shapes: tuple[tuple[int, int], ...], rows: tuple[int, ...], dtypes: list[str], device: str, reps: int,
    min_sample_s: float, working_set_bytes: int, ticker: Ticker, blocked: bool = False,
) -> list[MatmulCurve]:
    """Achieved FLOP/s (2 m k n per call) of ``F.linear`` over ``rows`` for each dtype and ``k x n`` weight, and
    (``blocked``) of the blocked kernel (``model.blocked``) for the dtypes that have it (``blocked_dtypes``).

    All points are sampled round-robin (``interleaved_seconds``).
    """
    curves = curve_keys(shapes, dtypes, blocked)
    activations = "bfloat16" if "bfloat16" in dtypes else "float32"  # of the low-bit matmuls
    weights = {c: blocked_copies(c[1], c[2], c[0], working_set_bytes) if c[3]
               else weight_copies(c[1], c[2], c[0], device, working_set_bytes, activations) for c in curves}
    points = [(c, m) for c in curves for m in rows]
    fns = [linear_call(weights[c], m) for c, m in points]
    labels = [f"matmul {d} {k}x{n}{' blocked' if b else ''} m={m}" for (d, k, n, b), m in points]
    seconds = interleaved_seconds(fns, labels, reps, min_sample_s, device == "cuda", ticker)
    by_curve: dict[tuple, list[Point]] = {c: [] for c in curves}
    for ((d, k, n, b), m), t in zip(points, seconds):
        by_curve[(d, k, n, b)].append(Point(x=m, y=rate(2.0 * m * k * n, t)))
    return [MatmulCurve(dtype=d, k=k, n=n, blocked=b,
                        flops=Curve(x_name="rows", y_name="flops", points=by_curve[(d, k, n, b)]))
            for d, k, n, b in curves]


def curve_keys(shapes: tuple[tuple[int, int], ...], dtypes: list[str],
               blocked: bool) -> list[tuple[str, int, int, bool]]:
    """The matmul curves a profile measures: (dtype, k, n, blocked)."""
    return ([(d, k, n, False) for d in dtypes for k, n in shapes]
            + [(d, k, n, True) for d in blocked_dtypes(dtypes, blocked) for k, n in shapes])


def dtype_speed_ratio(dtype: str, device: str, reps: int, min_sample_s: float, k: int = 2048, m: int = 256,
                      activations: str = "float32") -> float:
    """Rate of ``dtype`` relative to float32 on one ``F.linear`` (m x k x k; a low-bit dtype: its kernel with
    activations in ``activations``)."""
    t = {d: sample_seconds(linear_call(weight_copies(k, k, d, device, 0, activations), m), reps, min_sample_s,
                           device == "cuda")
         for d in ("float32", dtype)}
    return t["float32"].median / t[dtype].median


#: a low-bit kernel is profiled (and a substitute draft can be planned) only when it runs at least this fraction of
#: float32's rate at decode rows: a slower one cannot beat the weights it replaces (torch's int8 kernel ran at
#: ~0.05x float32 on an AVX2-only EPYC, where profiling it at every row count took half an hour)
LOWBIT_MIN_RATIO = 0.5
#: the decode-shaped rows the low-bit kernels are judged at
LOWBIT_PROBE_ROWS = 16


def well_supported_dtypes(device: str, reps: int, min_sample_s: float) -> tuple[list[str], str]:
    """The matmul dtypes worth profiling on ``device``, and a note saying why.

    On CUDA: float32, float16 and bfloat16 where the GPU supports it. On a CPU: float32, plus bfloat16 only when it
    runs at least half as fast as float32 (on CPUs without bf16 units it is several times slower, and the engine
    converts such weights to float32 to compute), plus each low-bit ``LOWBIT_DTYPES`` kernel the engine's
    substitute drafts run on the CPU that reaches ``LOWBIT_MIN_RATIO`` of float32 at ``LOWBIT_PROBE_ROWS`` rows
    (the planner takes them for a substitute's copies only, never as a weight dtype).
    """
    if device == "cuda":
        import torch

        dtypes = ["float32", "float16"] + (["bfloat16"] if torch.cuda.is_bf16_supported() else [])
        return dtypes, f"device matmul dtypes: {', '.join(dtypes)}"
    ratio = dtype_speed_ratio("bfloat16", device, reps, min_sample_s)
    floats = ["float32", "bfloat16"] if ratio >= 0.5 else ["float32"]
    note = (f"bfloat16 F.linear runs at {ratio:.2f}x float32 here: profiled" if ratio >= 0.5 else
            f"bfloat16 F.linear runs at {ratio:.2f}x float32 here (2048x2048, m=256): not profiled; the engine "
            f"computes in float32 on this CPU")
    lowbit, slow = [], []
    for d in LOWBIT_DTYPES:
        r = dtype_speed_ratio(d, device, reps, min_sample_s, m=LOWBIT_PROBE_ROWS, activations=floats[-1])
        (lowbit if r >= LOWBIT_MIN_RATIO else slow).append(f"{d} {r:.2f}x")
    kept = [d.split()[0] for d in lowbit]
    if lowbit:
        note += (f"; the substitute draft's low-bit matmuls {', '.join(lowbit)} float32 (weight-only, torch's CPU "
                 f"kernels, 2048x2048, m={LOWBIT_PROBE_ROWS}): profiled")
    if slow:
        note += (f"; low-bit kernels {', '.join(slow)} float32 (2048x2048, m={LOWBIT_PROBE_ROWS}, under "
                 f"{LOWBIT_MIN_RATIO}x): not profiled, so no substitute draft of that kind is planned on this CPU")
    return [*floats, *kept], note


def decode_attention(q, k, v, mask):
    """Decode attention exactly as the engine computes it: ``specplan.engine.model.forward.attend`` (SDPA with a
    boolean mask ``[1, 1, groups, L]``, GQA over ``groups = q.shape[1] // k.shape[1]`` query heads per KV head)."""
    from specplan.engine.model.forward import attend

    return attend(q, k, v, mask, q.shape[1] // k.shape[1], q.shape[-1])


def attention_steps(points: int, reps: int) -> int:
    return points * (reps + 1)


def attention_curve(
    spec: ModelSpec, kv_bytes: tuple[int, ...], device: str, reps: int, min_sample_s: float,
    working_set_bytes: int, ticker: Ticker, dtype: str = "float32",
) -> Curve:
    """KV bytes read per second by one decode-attention call of one sequence, over the KV bytes of the call, with
    the cache and the query in ``dtype`` (the plans' compute dtype: SDPA's time goes with the elements, so a
    bfloat16 cache reads about half the bytes per second a float32 one does; measured here 14 against 29 GB/s).

    Head geometry from ``spec``; the KV length of a point is its KV bytes over ``spec``'s KV bytes per token and
    layer in ``dtype``. Each call reads the next of several caches (more than the last-level cache in total).
    """
    import torch

    dt = _torch_dtype(dtype)
    per_token = kv_cache_bytes(spec, dtype, 1, 1, layers=1)
    q = torch.empty((1, spec.num_heads, 1, spec.head_dim), device=device, dtype=dt).uniform_(-1, 1)
    seqs = sorted({max(1, round(b / per_token)) for b in kv_bytes})

    def call(seq: int):
        shape = (1, spec.num_kv_heads, seq, spec.head_dim)
        caches = [tuple(torch.empty(shape, device=device, dtype=dt).uniform_(-1, 1) for _ in "kv")
                  for _ in range(copies_for(int(seq * per_token), working_set_bytes))]
        mask = torch.ones((1, 1, spec.num_heads // spec.num_kv_heads, seq), dtype=torch.bool, device=device)
        kvs = cycle(caches)

        def one():
            k, v = next(kvs)
            return decode_attention(q, k, v, mask)

        return one

    fns = [call(seq) for seq in seqs]
    labels = [f"decode attention, {seq} tokens of KV" for seq in seqs]
    seconds = interleaved_seconds(fns, labels, reps, min_sample_s, device == "cuda", ticker)
    points = [Point(x=seq * per_token, y=rate(seq * per_token, t)) for seq, t in zip(seqs, seconds)]
    return Curve(x_name="kv_bytes", y_name="bandwidth_Bps", points=points)


def memory_bandwidth(device: str, nbytes: int, reps: int, min_sample_s: float) -> tuple[Stat, str]:
    """Read bandwidth of ``torch.sum`` over ``nbytes`` of float32; the note also gives the ``copy_`` rate."""
    import torch

    x = torch.empty(nbytes // 4, device=device).uniform_(-1, 1)
    cuda = device == "cuda"
    read = rate(nbytes, sample_seconds(lambda: x.sum(), reps, min_sample_s, cuda=cuda))
    y = torch.empty_like(x)
    y.copy_(x)  # first touch of y's pages outside the timing
    copy = rate(2 * nbytes, sample_seconds(lambda: y.copy_(x), reps, min_sample_s, cuda=cuda))
    note = (f"memory_bandwidth_Bps = read rate of torch.sum over {nbytes >> 20} MiB "
            f"(copy_ moves {copy.median / 1e9:.1f} GB/s counting read + write)")
    return read, note


#: the elementwise probe's layer geometry (the demo target: hidden, q, kv, heads, kv heads, FFN width, experts, top-k)
EW_GEOMETRY = dict(hidden=576, q_dim=576, kv_dim=192, heads=9, kv_heads=3, intermediate=1536, experts=8, top_k=2)
#: rows of the probe's passes: a verification pass and a prefill chunk
EW_ROWS = (128, 512)


def elementwise_rate(dtype: str, device: str, reps: int, min_sample_s: float) -> Stat:
    """The engine's elementwise work of one MoE layer (``forward``'s rms_norm and rope, the residuals, the routed
    rows sorted and gathered once (``forward.dispatch``), per expert its bucket padding and silu * up, the routing
    weights and the scatter-add), as the layer's matmul activation bytes (``contracts.rows``) per second: min /
    median / max over ``EW_ROWS``."""
    import torch
    import torch.nn.functional as F

    from specplan.engine.model.forward import apply_rope, dispatch, rms_norm

    g = EW_GEOMETRY
    dt = _torch_dtype(dtype)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    rates = []
    for m in EW_ROWS:
        x, o, wn = rand(m, g["hidden"]), rand(m, g["hidden"]), torch.ones(g["hidden"], device=device, dtype=dt)
        hd = g["q_dim"] // g["heads"]
        q, k = rand(1, g["heads"], m, hd), rand(1, g["kv_heads"], m, hd)
        cos, sin = rand(1, 1, m, hd), rand(1, 1, m, hd)
        chosen = torch.stack([torch.randperm(g["experts"], generator=gen)[: g["top_k"]] for _ in range(m)]).to(device)
        weights = rand(m, g["top_k"])
        counts = torch.bincount(chosen.reshape(-1), minlength=g["experts"]).tolist()
        ffn = [(rand(bucket_rows(n), g["intermediate"]), rand(bucket_rows(n), g["intermediate"]),
                rand(bucket_rows(n), g["hidden"])) for n in counts if n]

        def layer():
            rms_norm(x, wn, 1e-5)
            apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            y = x + o
            h = rms_norm(y, wn, 1e-5)
            out = torch.zeros_like(h)
            rows, weight, token, _ = dispatch(h, weights, chosen, g["experts"])
            ys, start = [], 0
            for n, (gate, up, down) in zip((n for n in counts if n), ffn):
                F.pad(rows[start:start + n], (0, 0, 0, bucket_rows(n) - n))
                F.silu(gate) * up
                ys.append(down[:n])
                start += n
            out.index_add_(0, token, torch.cat(ys) * weight)
            return y + out

        seconds = sample_seconds(layer, reps, min_sample_s, cuda=device == "cuda")
        act = (attention_activation_bytes(m, g["hidden"], g["q_dim"], g["kv_dim"], dtype_bytes(dtype))
               + ffn_activation_bytes(g["top_k"] * m, g["hidden"], g["intermediate"], dtype_bytes(dtype)))
        rates.append(act / seconds.median)
    return Stat.from_samples(rates)
