"""Fixed costs the engine pays whatever the size of the work: dispatch, the per-layer Python, the step, hand-offs.

- ``per_op_s``: one tiny torch op (``torch.add`` of one-element tensors): framework dispatch (+ launch on CUDA).
- ``per_layer_s``: a Llama-style decoder layer on tiny tensors (norms, q/k/v/o, rope, KV write, the engine's GQA
  attention, residuals, gated MLP, and the per-layer weight lookup) minus the dispatch of the ``COUNTED_OPS`` calls
  the cost model charges ``per_op_s`` for (its 7 linears and 1 attention): the rest of a layer's fixed cost.
- ``per_step_s``: per forward pass outside the layers: embedding lookup, final norm, greedy sampling, appending the
  token and reading it back to Python (the lm_head matmul is costed as an op).
- ``thread_handoff_s``: handing a ready buffer from a producer thread to a consumer through a ``queue.Queue`` (the
  engine's prefetcher): half a ping-pong round trip between two threads.
"""

from __future__ import annotations

import queue
import threading
import time

from specplan.contracts.hardware import Overheads, Stat
from specplan.engine.measure.compute import decode_attention
from specplan.engine.measure.timing import sample_seconds

#: calls of the tiny layer that the cost model already charges ``per_op_s`` for (7 linears, 1 attention).
COUNTED_OPS = 8
#: dimensions of the tiny layer: compute is negligible, the fixed costs are what is measured.
TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, context=16, vocab=256)
HANDOFFS = 2000


def _tiny_layer(device: str):
    import torch
    import torch.nn.functional as F

    h, nh, nkv, d, inter, ctx = (TINY[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "context"))
    g = torch.Generator(device="cpu").manual_seed(0)

    def w(out: int, inp: int):
        return (torch.randn(out, inp, generator=g) / inp**0.5).to(device)

    weights = {f"layers.{i}.{n}": t for i in range(2) for n, t in (
        ("attn.q", w(nh * d, h)), ("attn.k", w(nkv * d, h)), ("attn.v", w(nkv * d, h)), ("attn.o", w(h, nh * d)),
        ("mlp.gate", w(inter, h)), ("mlp.up", w(inter, h)), ("mlp.down", w(h, inter)),
        ("input_norm", torch.ones(h, device=device)), ("post_attn_norm", torch.ones(h, device=device)))}
    cache_k = torch.zeros(1, nkv, ctx + 1, d, device=device)
    cache_v = torch.zeros_like(cache_k)
    cos = torch.randn(1, 1, 1, d, generator=g).to(device)
    sin = torch.randn(1, 1, 1, d, generator=g).to(device)
    mask = torch.ones(1, 1, 1, ctx + 1, dtype=torch.bool, device=device)
    x0 = torch.randn(1, 1, h, generator=g).to(device)

    def rope(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-t2, t1), dim=-1) * sin

    def layer(i: int = 0):
        p = f"layers.{i}."
        ws = {k[len(p):]: v for k, v in weights.items() if k.startswith(p)}  # the weight source's layer lookup
        x = x0
        r = F.rms_norm(x, (h,), ws["input_norm"], 1e-5)
        q = rope(F.linear(r, ws["attn.q"]).view(1, 1, nh, d).transpose(1, 2))
        k = rope(F.linear(r, ws["attn.k"]).view(1, 1, nkv, d).transpose(1, 2))
        v = F.linear(r, ws["attn.v"]).view(1, 1, nkv, d).transpose(1, 2)
        cache_k[:, :, ctx : ctx + 1] = k
        cache_v[:, :, ctx : ctx + 1] = v
        a = decode_attention(q, cache_k, cache_v, mask)
        x = x + F.linear(a.transpose(1, 2).reshape(1, 1, nh * d), ws["attn.o"])
        r = F.rms_norm(x, (h,), ws["post_attn_norm"], 1e-5)
        return x + F.linear(F.silu(F.linear(r, ws["mlp.gate"])) * F.linear(r, ws["mlp.up"]), ws["mlp.down"])

    return layer


def _tiny_step(device: str):
    import torch
    import torch.nn.functional as F

    h, vocab = TINY["hidden"], TINY["vocab"]
    embed = torch.randn(vocab, h, device=device)
    norm = torch.ones(h, device=device)
    logits = torch.randn(1, vocab, device=device)
    tokens = torch.zeros(1, 8, dtype=torch.long, device=device)

    def step():
        x = F.embedding(tokens[:, -1:], embed)
        F.rms_norm(x, (h,), norm, 1e-5)
        nxt = torch.argmax(logits, dim=-1)
        out = torch.cat((tokens, nxt[:, None]), dim=1)
        return out[:, -1].tolist()

    return step


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


def measure_overheads(device: str, reps: int, min_sample_s: float) -> tuple[Overheads, str]:
    """The four fixed costs, and a note on how ``per_layer_s`` was derived."""
    import torch

    cuda = device == "cuda"
    a = torch.zeros(1, device=device)
    per_op = sample_seconds(lambda: torch.add(a, a), reps, min_sample_s, cuda=cuda)
    layer = sample_seconds(_tiny_layer(device), reps, min_sample_s, cuda=cuda)
    step = sample_seconds(_tiny_step(device), reps, min_sample_s, cuda=cuda)
    handoff = handoff_seconds(reps)
    counted = COUNTED_OPS * per_op.median
    per_layer = Stat(**{s: max(getattr(layer, s) - counted, 0.1 * getattr(layer, s)) for s in ("min", "median", "max")})
    overheads = Overheads(
        per_op_s=per_op.median, per_layer_s=per_layer.median, per_step_s=step.median,
        thread_handoff_s=handoff.median,
        samples_s={"per_op_s": per_op, "per_layer_s": per_layer, "per_step_s": step, "thread_handoff_s": handoff},
    )
    note = (f"per_layer_s = a tiny Llama-style layer ({layer.median * 1e6:.0f} us) minus {COUNTED_OPS} x per_op_s for "
            f"its 7 linears and 1 attention, which the cost model charges per op")
    return overheads, note
