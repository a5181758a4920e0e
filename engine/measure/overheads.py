"""Fixed costs the engine pays whatever the size of the work: dispatch, the per-layer Python, the step, hand-offs.

- ``per_op_s``: one tiny torch op (``torch.add`` of one-element tensors): framework dispatch (+ launch on CUDA).
- ``per_layer_s`` and ``per_step_s``: the engine's own forward (``model.forward``, traced by the run's
  ``execute.recorder.Recorder``, as a run traces it) of one decode token on a tiny Llama-style model (``TINY``)
  at two depths (``DEPTHS``), followed by the greedy pick a run makes, its matrices blocked where a run's resident
  ones are (``model/blocked.py``): the difference per layer, minus the same layer's 7 linears and 1 attention call
  timed alone (the cost model charges those per op, from the matmul curves and the decode-attention rate), is
  ``per_layer_s`` (norms, rope, the KV write, masks, residuals, the weight lookup, the spans); what the shallower
  forward takes beyond its layers is ``per_step_s`` (embedding, positions, rope tables and mask, final norm, head,
  the pick and reading it back to Python). Both in the compute dtype plans run at (bfloat16 where it is profiled:
  a bfloat16 layer's fixed cost is 1.5x a float32 one's on this VM). An earlier hand-written replica of a layer
  took 117 us here where the engine's layer takes 211-323 us: measuring the engine's own code is the point.
- ``per_layer_per_width_s``: a layer's fixed cost grows with the model's width (on this VM 238-284 us at width 64,
  439 us at 576), so the layer is timed at two widths (``WIDTHS``) and the line through both gives ``per_layer_s``
  (its value at width 0) and this slope (``Overheads.layer_s``).
- ``thread_handoff_s``: handing a ready buffer from a producer thread to a consumer through a ``queue.Queue`` (the
  engine's prefetcher): half a ping-pong round trip between two threads.
"""

from __future__ import annotations

import queue
import threading
import time

from specplan.contracts.hardware import Overheads, Stat
from specplan.contracts.model import ModelSpec
from specplan.engine.execute.recorder import Recorder
from specplan.engine.measure.timing import sample_seconds
from specplan.engine.model.blocked import BlockedLinear, available, blockable
from specplan.engine.model.forward import MemorySource, _linear, attend, forward
from specplan.engine.model.kvcache import KVCache

#: dimensions of the tiny model at width 64: compute is negligible, the fixed costs are what is measured.
TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, context=16, vocab=256)
#: the two depths of the tiny model whose forwards are timed
DEPTHS = (2, 6)
#: the two widths it is timed at: a layer's fixed cost grows with the width (norms, rope, the KV write)
WIDTHS = (64, 512)
HANDOFFS = 2000


def tiny_spec(layers: int, width: int = TINY["hidden"]) -> ModelSpec:
    """The tiny Llama-style model, ``TINY`` at width 64 and scaled with it: heads of 16 up to 64 wide, half as many
    KV heads, an MLP twice as wide."""
    t = TINY
    heads = max(t["heads"], width // 64)
    return ModelSpec(name=f"tiny-{layers}x{width}", family="llama", num_layers=layers, hidden_size=width,
                     num_heads=heads, num_kv_heads=heads // 2, head_dim=width // heads, vocab_size=t["vocab"],
                     intermediate_size=2 * width, dtype="float32")


def tiny_decode(layers: int, device: str, dtype: str, blocked: bool = False, width: int = TINY["hidden"]):
    """(step, its matmuls alone, tensor bytes): one traced decode forward of the tiny model plus the greedy pick, on
    ``device`` in ``dtype`` (``blocked``: its matrices blocked, as a run's resident ones are), over a KV cache of
    ``TINY["context"]`` positions (rolled back after each step); and the same step's linears and attention calls
    (``forward._linear`` on the same weights, ``attend`` on the same cache) without the rest of the forward."""
    import torch

    spec, dt, ctx = tiny_spec(layers, width), getattr(torch, dtype), TINY["context"]
    g = torch.Generator().manual_seed(0)
    tensors = {n: (torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5).to(device=device, dtype=dt)
               for n, t in spec.tensors.by_name.items()}
    weights = {n: BlockedLinear(t) if blocked and blockable(spec.tensors.by_name[n], True) else t
               for n, t in tensors.items()}
    src = MemorySource({**weights, "lm_head": weights.get("lm_head", weights["embed"])})
    kv = KVCache.allocate(spec, 1, ctx + 1, dt, torch.device(device))
    forward(spec, src, kv, torch.zeros((1, ctx), dtype=torch.long))
    token = torch.zeros((1, 1), dtype=torch.long)
    recorder = Recorder()

    def step() -> list[int]:
        logits = forward(spec, src, kv, token, tracer=recorder)
        kv.set_lengths([ctx])
        return logits[:, -1].argmax(-1).tolist()

    h, nh, nkv, d = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    x, inner = torch.zeros((1, 1, h), dtype=dt, device=device), torch.zeros((1, 1, spec.intermediate_size), dtype=dt,
                                                                               device=device)
    q, o = torch.zeros((1, nh, 1, d), dtype=dt, device=device), torch.zeros((1, 1, nh * d), dtype=dt, device=device)
    mask = torch.ones((1, 1, nh // nkv, ctx + 1), dtype=torch.bool, device=device)
    inputs = {"attn.q": x, "attn.k": x, "attn.v": x, "attn.o": o, "mlp.gate": x, "mlp.up": x, "mlp.down": inner}

    def matmuls() -> None:
        for i in range(layers):
            for name, inp in inputs.items():
                _linear(inp, weights[f"layers.{i}.{name}"])
            keys, values = kv.view(i, ctx + 1)
            attend(q, keys, values, mask, nh // nkv, d)

    return step, matmuls, sum(t.nbytes for t in tensors.values()) + kv.bytes()


def handoff_seconds(reps: int, handoffs: int = HANDOFFS) -> Stat:
    """One producer->consumer hand-off through ``queue.Queue``: half of a ping-pong round trip."""
    ping: queue.Queue = queue.Queue(maxsize=1)
    pong: queue.Queue = queue.Queue(maxsize=1)
    buf = bytearray(4096)

    def consumer():
        while (item := ping.get()) is not None:
            pong.put(item)

    t = threading.Thread(target=consumer, daemon=True)
    t.start()
    samples = []
    try:
        for _ in range(reps + 1):  # the first sample warms up the thread
            t0 = time.perf_counter()
            for _ in range(handoffs // 2):
                ping.put(buf)
                pong.get()
            samples.append((time.perf_counter() - t0) / handoffs)
    finally:
        ping.put(None)
        t.join()
    return Stat.from_samples(samples[1:])


def measure_overheads(device: str, dtype: str, reps: int, min_sample_s: float) -> tuple[Overheads, str]:
    """The four fixed costs (the forward's in ``dtype``, its matrices blocked where a run's resident ones are), and
    a note on how ``per_layer_s`` was derived."""
    import torch

    cuda = device == "cuda"
    a = torch.zeros(1, device=device)
    per_op = sample_seconds(lambda: torch.add(a, a), reps, min_sample_s, cuda=cuda)
    blocked = device == "cpu" and available(dtype)
    layers = DEPTHS[1] - DEPTHS[0]

    def at(width: int) -> tuple[list[float], list[float], float]:
        """Per stat (min, median, max): a layer's fixed cost and the step's, at ``width``; the layer's calls."""
        (shallow, _), (deep, deep_mm) = ((sample_seconds(step, reps, min_sample_s, cuda=cuda),
                                          sample_seconds(mm, reps, min_sample_s, cuda=cuda))
                                         for step, mm, _ in (tiny_decode(n, device, dtype, blocked, width)
                                                             for n in DEPTHS))
        # the cost model charges a layer's linears and attention per call: timed alone, per layer, off the layer
        calls = deep_mm.median / DEPTHS[1]
        layer, step = [], []
        for stat in ("min", "median", "max"):  # (min, min) ... (max, max): the medians are the figure
            per = (getattr(deep, stat) - getattr(shallow, stat)) / layers
            layer.append(max(per - calls, 0.1 * per, 0.0))
            step.append(max(getattr(shallow, stat) - DEPTHS[0] * per, 0.1 * getattr(shallow, stat)))
        return layer, step, calls

    (narrow, step_s, calls), (wide, _, wide_calls) = (at(w) for w in WIDTHS)
    slope = max((wide[1] - narrow[1]) / (WIDTHS[1] - WIDTHS[0]), 0.0)
    base = [max(v - WIDTHS[0] * slope, 0.1 * v) for v in narrow]
    handoff = handoff_seconds(reps)
    per_layer = Stat(min=min(base), median=base[1], max=max(base))
    step = Stat(min=min(step_s), median=step_s[1], max=max(step_s))
    overheads = Overheads(
        per_op_s=per_op.median, per_layer_s=per_layer.median, per_layer_per_width_s=slope, per_step_s=step.median,
        thread_handoff_s=handoff.median,
        samples_s={"per_op_s": per_op, "per_layer_s": per_layer, "per_step_s": step, "thread_handoff_s": handoff},
    )
    note = (f"per_layer_s, per_layer_per_width_s and per_step_s: the engine's traced decode forward and greedy pick of "
            f"a tiny {dtype} model ({'blocked' if blocked else 'plain'} matrices) at {DEPTHS[0]} and {DEPTHS[1]} "
            f"layers and widths {WIDTHS[0]} and {WIDTHS[1]}: per layer the difference minus its 7 linears and 1 "
            f"attention timed alone ({calls * 1e6:.0f} and {wide_calls * 1e6:.0f} us), which the cost model charges "
            f"per op: {narrow[1] * 1e6:.0f} us at width {WIDTHS[0]}, {wide[1] * 1e6:.0f} us at {WIDTHS[1]}, a line "
            f"through both; per step the rest of the shallower forward at width {WIDTHS[0]}")
    return overheads, note
