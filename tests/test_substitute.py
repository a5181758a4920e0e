"""Substitute drafts (SubSpec): group-wise low-bit copies of the target's streamed matrices within half a step of
every weight, torch's int8 / int4 CPU kernels against the dequantised weight, the cache built once per model with
every expert, and speculative decoding with int8 and int4 substitutes that is plain greedy target decoding, token for
token (batch 1..16, ragged prompts, draft lengths 1..8, one and two interleaved batches); the budget counts the
copies as the planner does."""

from __future__ import annotations

import pytest
import torch
from runtime_fixtures import make_plan

from specplan.contracts.plan import DraftSpec, LayerPlacement, Placement, Plan
from specplan.engine.build.models import upcycle_to_mixtral
from specplan.engine.execute.runtime import run_plan
from specplan.engine.io.substitute import ensure_substitute, load_substitute, quantised_tensors
from specplan.engine.model.checkpoint import open_checkpoint
from specplan.engine.model.quant import LowBitLinear, quantise
from specplan.errors import InfeasibleError
from specplan.planner.memory import tier_bytes

PROMPTS = [[5, 17, 99, 3, 250, 61, 7], [200, 11, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 100], [1, 2], [77] * 5,
           [31, 4, 15, 9, 26, 5], [250], [6, 28, 49, 6, 28, 49, 6, 28], [101, 102], [13] * 3, [40, 41, 42, 43],
           [2, 3, 5, 7, 11, 13, 17], [99, 98], [60, 70, 80, 90, 100], [8], [21, 34, 55, 89]]
NEW = 8


# ---- quantisation and kernels -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 0), (8, 32), (8, 128)])
def test_round_to_nearest_is_within_half_a_step_of_every_weight(bits, group):
    gen = torch.Generator().manual_seed(bits + group)
    w = torch.randn(48, 256, generator=gen) * torch.rand(48, 1, generator=gen) * 3  # rows of different ranges
    w[3, 10] = 40.0  # an outlier widens its group's step only
    qz = quantise(w, bits, group)
    size = group or 256
    err = (w - qz.dequantise()).abs().view(48, 256 // size, size).amax(-1)
    assert bool((err <= qz.half_step() * (1 + 1e-6)).all())
    # the analytic step: the group's range over the codes' span
    wg = w.view(48, 256 // size, size)
    span = (wg.amax(-1) - wg.amin(-1)) / 15 if bits == 4 else wg.abs().amax(-1) / 127
    assert torch.allclose(qz.scale, span)
    levels = 16 if bits == 4 else 255
    assert int(qz.q.min()) >= (0 if bits == 4 else -127) and int(qz.q.max()) - int(qz.q.min()) < levels


def test_hqq_lowers_the_error_it_minimises():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=gen) ** 3  # heavy tails: the range-based step wastes codes
    rtn, hqq = quantise(w, 4, 64, "rtn"), quantise(w, 4, 64, "hqq")
    lp = {k: (w - q.dequantise()).abs().pow(0.7).mean().item() for k, q in (("rtn", rtn), ("hqq", hqq))}
    assert lp["hqq"] < 0.97 * lp["rtn"]
    r8, h8 = quantise(w, 8, 0, "rtn"), quantise(w, 8, 0, "hqq")
    # int8 (no zero point) searches shrunken steps, the range's own among them: never a worse squared error
    assert (w - h8.dequantise()).pow(2).sum(-1).le((w - r8.dequantise()).pow(2).sum(-1) * (1 + 1e-6)).all()


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 0), (8, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_low_bit_kernels_equal_the_dequantised_matmul(bits, group, dtype):
    gen = torch.Generator().manual_seed(7)
    qz = quantise(torch.randn(64, 256, generator=gen), bits, group)
    lin = LowBitLinear(qz, dtype)
    x = torch.randn(3, 5, 256, generator=gen).to(dtype)
    ref = x.double() @ qz.dequantise().double().T
    got = lin(x)
    assert got.dtype == dtype and got.shape == (3, 5, 64)
    tol = 0.05 if dtype == torch.bfloat16 else 1e-4
    assert (got.double() - ref).abs().max() <= tol * ref.abs().max()
    assert lin.nbytes == 64 * 256 * bits // 8 + qz.scale.numel() * (2 if bits == 4 else 1) * lin.dtype.itemsize
    assert lin(x[:, :0]).shape == (3, 0, 64)


# ---- the model ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(tiny_model, tmp_path_factory):
    """A tiny Mixtral (4 experts) upcycled from a tiny Llama, and plain greedy decoding of it (float64)."""
    folder = upcycle_to_mixtral(tiny_model("llama"), tmp_path_factory.mktemp("sub") / "moe", num_experts=4, top_k=2,
                                noise=0.3, seed=3)
    ckpt = open_checkpoint(folder)
    plain = run_plan(make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "device"), decode_batch=16, prefill_batch=16),
                     ckpt, PROMPTS, NEW, dtype=torch.float64)
    return ckpt, tokens_of(plain)


def tokens_of(out) -> list[list[int]]:
    return [s.generated for s in sorted(out.seqs, key=lambda s: s.index)]


def sub_plan(ckpt, bits: int, g: int, placement: Placement | str = "disk", group: int | None = None,
             quantiser: str | None = None, **policy) -> Plan:
    spec = ckpt.spec
    placement = Placement.uniform(spec, placement) if isinstance(placement, str) else placement
    data = make_plan(spec, placement, path=str(ckpt.folder), **policy).model_dump()
    data["policy"].update(draft_len=g, acceptance=0.9)
    data["draft"] = DraftSpec(kind="substitute", bits=bits, group_size=group, quantiser=quantiser).model_dump()
    return Plan.model_validate(data)


def test_the_cache_is_built_once_with_every_expert(target):
    ckpt, _ = target
    path = ensure_substitute(ckpt, 4, 32, "rtn")
    stamp = path.stat().st_mtime_ns
    assert ensure_substitute(ckpt, 4, 32, "rtn") == path and path.stat().st_mtime_ns == stamp  # cached
    names = quantised_tensors(ckpt.spec, 4, 32)
    spec = ckpt.spec
    assert {f"layers.{i}.experts.{e}.{p}" for i in range(spec.num_layers) for e in range(spec.num_experts)
            for p in ("gate", "up", "down")} <= set(names)
    assert not any(n.endswith("router") or n.endswith("norm") for n in names)
    loaded = load_substitute(path, ["layers.1.experts.3.down"], spec, 4, 32, torch.float32)["layers.1.experts.3.down"]
    w = ckpt.read("layers.1.experts.3.down", dtype=torch.float32)
    x = torch.randn(4, w.shape[1])
    assert torch.allclose(loaded(x), x @ quantise(w, 4, 32).dequantise().T, atol=1e-4)  # codes survive the packing
    assert ensure_substitute(ckpt, 8, 0, "rtn") != path  # one cache per bits, group size and quantiser


#: (bits, group size, draft length, decode batch, interleaved batches)
CASES = [(8, None, 1, 1, 1), (4, 32, 2, 3, 1), (8, None, 4, 16, 1), (4, None, 8, 5, 1), (4, 32, 3, 4, 2),
         (8, 32, 8, 2, 2), (4, 32, 5, 8, 2), (8, None, 6, 16, 2)]


@pytest.mark.parametrize("bits,group,g,batch,num_batches", CASES)
def test_substitute_output_is_plain_greedy_decoding(target, bits, group, g, batch, num_batches):
    ckpt, want = target
    plan = sub_plan(ckpt, bits, g, group=group, decode_batch=batch, num_batches=num_batches,
                    prefill_batch=min(batch, 4), expert_fetch="routed")
    n = max(2, batch * num_batches)  # every batch full once, then a partial one (keeps small batches quick)
    out = run_plan(plan, ckpt, PROMPTS[:n], NEW, dtype=torch.float64)
    assert tokens_of(out) == want[:n]
    acc = out.stats.acceptance
    assert acc.proposed == g * acc.rounds and acc.per_token > 0.5  # the target's own copy: most drafts accepted
    assert out.stats.prefill_tokens + out.stats.decode_tokens == len(PROMPTS[:n]) * NEW
    drafted = [e for e in out.timeline.events if e.name.startswith("draft.")]
    assert drafted and {e.batch for e in drafted} == set(range(num_batches))
    assert out.peak_bytes["device"]["substitute"] == out.need_bytes["device"]["substitute"] > 0
    assert "draft_kv" not in out.need_bytes["device"]  # it drafts in the target's KV cache


def test_a_mixed_placement_shares_the_resident_tensors(target):
    """Resident layers and experts are the target's own tensors; only the streamed ones are copied."""
    ckpt, want = target
    spec = ckpt.spec
    layers = [LayerPlacement(attention="device" if i == 0 else "disk", norms_router="disk" if i else "device",
                             kv_cache="device", experts=["device", "disk", "device", "disk"]) for i in range(2)]
    mixed = Placement(embed="device", lm_head="disk", final_norm="device", layers=layers)
    out = run_plan(sub_plan(ckpt, 8, 4, mixed), ckpt, PROMPTS[:5], NEW, dtype=torch.float64)
    assert tokens_of(out) == want[:5]
    full = run_plan(sub_plan(ckpt, 8, 4), ckpt, PROMPTS[:1], 2, dtype=torch.float64)
    assert 0 < out.need_bytes["device"]["substitute"] < full.need_bytes["device"]["substitute"]


def test_the_budget_counts_the_copies_as_the_planner_does(target):
    ckpt, _ = target
    for bits, group in ((4, 32), (4, 64), (8, 0)):
        plan = sub_plan(ckpt, bits, 3, group=group, prompt_len=11, gen_len=NEW)
        out = run_plan(plan, ckpt, PROMPTS[:3], NEW)
        assert out.need_bytes["device"]["substitute"] == tier_bytes(plan)["decode"]["device"]["substitute"]
    need = out.need_bytes["device"]
    tight = plan.model_copy(update={"capacities": plan.capacities.model_copy(
        update={"device_bytes": sum(v for k, v in need.items() if k != "substitute") + 1})})
    with pytest.raises(InfeasibleError, match="substitute"):
        run_plan(tight, ckpt, PROMPTS[:3], NEW)


def test_sampling_with_a_substitute_runs_and_a_cold_temperature_is_greedy(target):
    """Rejection sampling against the substitute's distributions: near temperature 0 the target's own samples are
    its greedy tokens; at temperature 1 the same seed draws the same tokens in any batch."""
    from specplan.contracts.plan import Sampling

    ckpt, want = target
    plan = sub_plan(ckpt, 4, 3, group=32, quantiser="hqq", decode_batch=4, num_batches=2)
    assert plan.draft.label == "substitute:int4:g32:hqq"
    cold = run_plan(plan, ckpt, PROMPTS[:6], NEW, dtype=torch.float64, sampling=Sampling(temperature=1e-4, seed=1))
    assert tokens_of(cold) == want[:6]
    warm = [tokens_of(run_plan(sub_plan(ckpt, 4, 3, group=32, decode_batch=b), ckpt, PROMPTS[:6], NEW,
                               dtype=torch.float64, sampling=Sampling(temperature=1.0, seed=5)))
            for b in (1, 6)]
    assert warm[0] == warm[1] and warm[0] != want[:6]


def test_the_planner_costs_substitute_steps_at_the_measured_low_bit_rates():
    """A profile's int4 figures price the substitute's draft steps on its copies; they are never a weight dtype."""
    from planner_fixtures import cpu_profile, curve, hand_plan, tiny_moe

    from specplan.contracts.hardware import MatmulCurve
    from specplan.planner.predict import predict

    base = cpu_profile(lowbit=False)

    def with_int4(rate: float):
        int4 = MatmulCurve(dtype="int4", k=4096, n=4096, flops=curve("rows", "flops", [(1, rate), (512, rate)]))
        unit = base.device.model_copy(update={"matmul": [*base.device.matmul, int4]})
        return base.model_copy(update={"device": unit, "host": unit})

    def decode_tok_s(profile) -> float:
        plan = hand_plan(tiny_moe(), profile, experts=["device", "disk", "disk", "disk"], attention="disk",
                         draft=DraftSpec(kind="substitute", bits=4), draft_len=3, acceptance=0.9)
        assert plan.policy.weight_dtype == "float32"
        return predict(plan).decode_tok_s

    slow, fast = decode_tok_s(with_int4(1e8)), decode_tok_s(with_int4(1e13))
    assert slow < 0.5 * fast
    assert slow < decode_tok_s(base)  # without int4 figures: the weight dtype's rate (6-140 GFLOP/s)
