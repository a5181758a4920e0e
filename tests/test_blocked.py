"""Resident weights in the CPU kernel's blocked layout (``engine/model/blocked.py``): the same results as plain
``F.linear``, used exactly where the plan's profile has blocked curves, and rated on them by the cost model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from planner_fixtures import cpu_profile as planner_profile, curve, tiny_moe
from runtime_fixtures import cpu_profile, make_plan, mixed_placement

from specplan.contracts.hardware import MatmulCurve
from specplan.contracts.plan import Placement
from specplan.engine.execute.runtime import run_plan
from specplan.engine.model.blocked import BlockedLinear, available, blockable
from specplan.engine.model.checkpoint import open_checkpoint
from specplan.engine.model.forward import MemorySource
from specplan.engine.model.kvcache import KVCache
from specplan.engine.model.forward import forward
from specplan.planner.cost import op_time_s
from specplan.planner.units import Costing, Knobs, Pass, attention_ops, expert_ops, lm_head_ops

needs_kernel = pytest.mark.skipif(not available("bfloat16"), reason="this torch has no blocked bf16 CPU kernel")


@needs_kernel
@pytest.mark.parametrize("rows", [0, 1, 5, 16, 144])
def test_blocked_matmul_is_bit_identical_to_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
    b = BlockedLinear(w)
    assert torch.equal(b(x), F.linear(x, w))
    assert torch.equal(b(x.view(1, rows, 64)), F.linear(x, w).view(1, rows, 96))  # leading dims kept
    assert (b.shape, b.dtype, b.nbytes) == ((96, 64), torch.bfloat16, w.nbytes)


def test_only_the_matrices_the_forward_multiplies_by_are_blockable(tiny_model):
    spec = open_checkpoint(tiny_model("qwen2_moe")).spec
    picked = {n for n, t in spec.tensors.by_name.items() if blockable(t, spec.tie_word_embeddings)}
    assert "layers.0.attn.q" in picked and "layers.0.experts.1.down" in picked and "layers.0.shared.up" in picked
    assert not picked & {"embed", "layers.0.router", "layers.0.shared_gate", "layers.0.input_norm", "final_norm"}
    tied = open_checkpoint(tiny_model("llama", tie_word_embeddings=True)).spec
    assert not any(blockable(t, True) for n, t in tied.tensors.by_name.items() if n in ("embed", "lm_head"))


@needs_kernel
@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe"])
def test_a_blocked_model_computes_the_same_logits(tiny_model, family):
    ckpt = open_checkpoint(tiny_model(family))
    plain = MemorySource.from_checkpoint(ckpt, torch.bfloat16)
    fast = MemorySource.from_checkpoint(ckpt, torch.bfloat16, blocked=True)
    assert isinstance(fast.tensors["layers.0.attn.q"], BlockedLinear)
    toks = torch.randint(0, 200, (3, 7), generator=torch.Generator().manual_seed(2))
    out = [forward(ckpt.spec, src, KVCache.allocate(ckpt.spec, 3, 16, torch.bfloat16), toks) for src in (plain, fast)]
    assert torch.equal(out[0], out[1])


def _with_blocked_curves(profile):
    bf16 = [MatmulCurve(dtype="bfloat16", k=1024, n=1024, flops=profile.device.matmul[0].flops, blocked=b)
            for b in (False, True)]
    unit = profile.device.model_copy(update={"matmul": [*profile.device.matmul, *bf16]})
    return profile.model_copy(update={"device": unit, "host": unit})


@needs_kernel
def test_a_run_blocks_its_resident_weights_where_its_profile_has_blocked_curves(tiny_model, monkeypatch):
    """The same bf16 plan (resident, host and streamed tensors) on a profile without and with blocked curves: the
    same tokens, and only the second multiplies by blocked weights (the streamed ones stay plain)."""
    calls = []
    real = BlockedLinear.__call__
    monkeypatch.setattr(BlockedLinear, "__call__", lambda self, x: calls.append(self.shape) or real(self, x))
    ckpt = open_checkpoint(tiny_model("mixtral"))
    prompts = [[5, 9, 2, 7], [11, 3], [8, 8, 1, 4, 6]]
    plan = make_plan(ckpt.spec, mixed_placement(ckpt.spec), weight_dtype="bfloat16", kv_dtype="bfloat16")
    plain = run_plan(plan, ckpt, prompts, 5)
    assert not calls
    fast = run_plan(plan.model_copy(update={"profile": _with_blocked_curves(cpu_profile())}), ckpt, prompts, 5)
    assert calls and [s.generated for s in fast.seqs] == [s.generated for s in plain.seqs]
    streamed = make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "disk"), weight_dtype="bfloat16",
                         kv_dtype="bfloat16")
    calls.clear()
    run_plan(streamed.model_copy(update={"profile": _with_blocked_curves(cpu_profile())}), ckpt, prompts, 2)
    assert not calls  # nothing resident to block


def test_the_cost_model_rates_resident_matmuls_on_the_blocked_curves():
    """Twice as fast blocked curves halve the matmul time of resident ops only: streamed weights, a substitute's
    low-bit copies and a head tied to the embedding stay on the plain curves."""
    base = planner_profile()
    plain = MatmulCurve(dtype="bfloat16", k=4096, n=4096, flops=curve("rows", "flops", [(1, 6e9), (512, 140e9)]))
    fast = MatmulCurve(dtype="bfloat16", k=4096, n=4096, blocked=True,
                       flops=curve("rows", "flops", [(1, 12e9), (512, 280e9)]))
    unit = base.device.model_copy(update={"matmul": [*base.device.matmul, plain, fast]})
    prof = base.model_copy(update={"device": unit, "host": unit})
    c = Costing(tiny_moe(), prof, "bfloat16", "bfloat16")
    p = Pass("decode", seqs=8, tokens=1, context=32)
    k = Knobs()
    for ops in (attention_ops, expert_ops):
        resident, streamed = (next(o for o in ops(c, k, p, t) if o.kind == "matmul") for t in ("device", "disk"))
        assert resident.blocked and not streamed.blocked
        assert op_time_s(resident, prof) < op_time_s(streamed, prof)
    head = next(o for o in lm_head_ops(c, k, p, "device") if o.kind == "matmul")
    assert head.blocked != c.spec.tie_word_embeddings
    plain_only = Costing(tiny_moe(), base.model_copy(update={"device": base.device.model_copy(
        update={"matmul": [*base.device.matmul, plain]})}), "bfloat16", "bfloat16")
    assert not any(o.blocked for o in attention_ops(plain_only, k, p, "device"))


@needs_kernel
def test_matrices_to_block_are_read_through_one_reusable_buffer(tiny_model, monkeypatch):
    """A plain copy per matrix, allocated and freed, would stay in the allocator's heap next to the blocked one:
    every matrix the reader blocks is read into the same buffer, everything else as a tensor of its own."""
    from specplan.engine.model.blocked import BlockedReader

    ckpt = open_checkpoint(tiny_model("mixtral"))
    buffers = []
    real = ckpt.read
    monkeypatch.setattr(ckpt, "read", lambda n, dtype, scratch=None, into=None: buffers.append(
        (n, None if into is None else into.data_ptr())) or real(n, dtype, scratch, into))
    reader = BlockedReader(ckpt, torch.bfloat16, True)
    got = {n: reader.read(n) for n in ckpt.tensors}
    blocked_names = {n for n, t in got.items() if isinstance(t, BlockedLinear)}
    assert blocked_names and {p for n, p in buffers if n in blocked_names} == {reader._buf.data_ptr()}
    assert all(p is None for n, p in buffers if n not in blocked_names)
