"""Speculative decoding in the engine: the output is plain greedy target decoding, token for token, whatever the
draft (perfect, close, random), draft length, interleaved batches, placement, limits and EOS; ragged acceptance
rolls back both caches per sequence; the acceptance bookkeeping; the draft counts in the memory budget."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import hf_greedy
from runtime_fixtures import make_plan

from specplan.contracts.plan import DraftSpec, Placement, Plan
from specplan.engine.build.models import upcycle_to_mixtral
from specplan.engine.model.checkpoint import open_checkpoint
from specplan.engine.model.kvcache import KVCache
from specplan.engine.execute.runtime import run_plan
from specplan.engine.execute.speculative import DraftState, accept, rollback
from specplan.errors import InfeasibleError, SpecplanError

PROMPTS = [[5, 17, 99, 3, 250, 61, 7], [200, 11, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 100], [1, 2], [77] * 5]
NEW = 9


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """A dense tiny Llama, the MoE upcycled from it (noisy experts: the Llama is a close draft), a random Llama."""
    dense = tiny_model("llama")
    moe = upcycle_to_mixtral(dense, tmp_path_factory.mktemp("moe") / "moe", num_experts=4, top_k=2, noise=0.3, seed=3)
    other = tiny_model("llama", seed=7)
    return {"target": moe, "close": dense, "random": other, "perfect": moe}


def spec_plan(target_ckpt, draft_folder, g: int, placement="disk", acceptance=0.8, **policy) -> Plan:
    spec = target_ckpt.spec
    data = make_plan(spec, Placement.uniform(spec, placement), **policy).model_dump()
    dspec = open_checkpoint(draft_folder).spec
    data["policy"].update(draft_len=g, acceptance=acceptance)
    data["draft"] = DraftSpec(kind="model", name=dspec.name, path=str(draft_folder), spec=dspec).model_dump()
    return Plan.model_validate(data)


def tokens_of(out) -> list[list[int]]:
    return [s.generated for s in sorted(out.seqs, key=lambda s: s.index)]


@pytest.fixture(scope="module")
def plain(models):
    """Plain greedy decoding of the target by the engine (float64) and by transformers (float32)."""
    ckpt = open_checkpoint(models["target"])
    out = run_plan(make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "device")), ckpt, PROMPTS, NEW,
                   dtype=torch.float64)
    return ckpt, tokens_of(out)


@pytest.mark.parametrize("draft", ["perfect", "close", "random"])
@pytest.mark.parametrize("g", [1, 3, 5])
def test_speculative_output_is_plain_greedy_decoding(models, plain, draft, g):
    ckpt, want = plain
    plan = spec_plan(ckpt, models[draft], g, decode_batch=3, prefill_batch=2)
    out = run_plan(plan, ckpt, PROMPTS, NEW, dtype=torch.float64)
    assert tokens_of(out) == want
    acc = out.stats.acceptance
    assert acc.proposed == g * acc.rounds and 0 <= acc.accepted <= acc.proposed
    assert out.stats.prefill_tokens + out.stats.decode_tokens == len(PROMPTS) * NEW  # nothing past the limit
    if draft == "perfect":
        assert acc.per_token == 1.0 and acc.rejections == 0
        # every verification commits g + 1 tokens until a sequence's limit
        assert out.stats.decode_passes < len(PROMPTS) * (NEW - 1) // (g + 1) + len(PROMPTS)
    if draft == "random":
        assert acc.per_token < 0.5  # a random draft rarely agrees: most rounds roll back


def test_the_close_draft_is_accepted_more_than_the_random_one(models, plain):
    ckpt, _ = plain
    rates = {d: run_plan(spec_plan(ckpt, models[d], 4), ckpt, PROMPTS, NEW, dtype=torch.float64).stats.acceptance
             .per_token for d in ("close", "random")}
    assert rates["close"] > rates["random"]


@pytest.mark.parametrize("placement", ["device", "disk"])
def test_two_interleaved_batches_draft_in_turn_without_crosstalk(models, plain, placement):
    """The draft of one batch runs in a second thread while the other verifies: each batch gets its own
    proposals (SpecOffload's start-up race gave batches each other's candidates)."""
    ckpt, want = plain
    prompts = PROMPTS * 2  # two waves of 2 x 3 sequences, the last one partial
    plan = spec_plan(ckpt, models["close"], 3, placement, decode_batch=3, num_batches=2, prefill_batch=3)
    out = run_plan(plan, ckpt, prompts, NEW, dtype=torch.float64)
    assert tokens_of(out) == want * 2
    drafted = [e for e in out.timeline.events if e.name.startswith("draft.")]
    assert {e.batch for e in drafted} == {0, 1} and all(e.resource == "device_compute" for e in drafted)


def test_float32_speculative_tokens_equal_transformers(models, plain):
    ckpt, _ = plain
    want = [hf_greedy(models["target"], p, NEW) for p in PROMPTS]
    out = run_plan(spec_plan(ckpt, models["close"], 3, "disk", expert_fetch="routed"), ckpt, PROMPTS, NEW)
    assert tokens_of(out) == want


def test_eos_ends_a_sequence_inside_an_accepted_run(models, plain):
    ckpt, want = plain
    k = next(k for k in range(2, NEW - 1) if want[0][k] not in want[0][:k])
    eos = want[0][k]
    out = run_plan(spec_plan(ckpt, models["perfect"], 5), ckpt, PROMPTS, NEW, dtype=torch.float64,
                   stop_at_eos=True, eos_ids=[eos])
    for got, w in zip(tokens_of(out), want):
        assert got == (w[: w.index(eos) + 1] if eos in w else w)
    assert out.stats.prefill_tokens + out.stats.decode_tokens == sum(len(g) for g in tokens_of(out))


def test_accept_and_rollback_per_sequence(models):
    assert accept([4, 5, 6], [4, 5, 9, 1]) == (2, [4, 5, 9])
    assert accept([4, 5, 6], [7, 5, 6, 1]) == (0, [7])
    assert accept([4, 5, 6], [4, 5, 6, 1]) == (3, [4, 5, 6, 1])
    spec = open_checkpoint(models["close"]).spec
    target, draft = KVCache.allocate(spec, 3, 20), KVCache.allocate(spec, 3, 20)
    target.lengths[:] = torch.tensor([10, 4, 7]) + 4  # each verified last + 3 proposals
    state = DraftState(draft, [[1], [2, 3], [4]], base=[9, 2, 6], fed=[1, 2, 1])
    draft.lengths[:] = torch.tensor([9, 2, 6]) + torch.tensor([1, 2, 1]) + 2  # pending + g - 1 proposals
    rollback(target, state, [10, 4, 7], [0, 3, 1], [[5, 6, 7], [8, 9, 10], [11, 12, 13]], [20, 21, 22])
    assert target.lengths.tolist() == [11, 8, 9]
    assert draft.lengths.tolist() == [10, 6, 8]
    assert state.pending == [[20], [10, 21], [22]]


def test_budget_counts_the_draft_and_refusals(models, plain):
    ckpt, _ = plain
    plan = spec_plan(ckpt, models["close"], 3, "device")
    out = run_plan(plan, ckpt, PROMPTS[:2], 3, dtype=torch.float64)
    need, peak = out.need_bytes["device"], out.peak_bytes["device"]
    assert need["draft_weights"] == peak["draft_weights"] > 0 and need["draft_kv"] >= peak["draft_kv"] > 0
    tight = plan.model_copy(update={"capacities": plan.capacities.model_copy(
        update={"device_bytes": sum(v for k, v in need.items() if not k.startswith("draft")) + 1})})
    with pytest.raises(InfeasibleError, match="draft_weights"):
        run_plan(tight, ckpt, PROMPTS[:2], 3, dtype=torch.float64)
    missing = plan.model_copy(update={"draft": plan.draft.model_copy(update={"path": None})})
    with pytest.raises(SpecplanError, match="--draft-model DIR"):
        run_plan(missing, ckpt, PROMPTS[:2], 3)
    with pytest.raises(SpecplanError, match="differs from the plan's model"):
        run_plan(plan, ckpt, PROMPTS[:2], 3, draft_dir=str(models["target"]))
