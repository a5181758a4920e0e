"""The simulator on real plans made by the planner's search: agreement with the analytic prediction where it
describes the steady state, conservation, speculative rounds (seeded draws, never past gen_len), interleaved
batches, KV growth, the Timeline it writes, and that its stages are the planner's own decode round."""

import math
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from click.testing import CliRunner

from specplan.cli import main
from specplan.contracts import DraftSpec, Plan, Timeline
from specplan.jsonio import load, write_json
from specplan.planner.expect import accepted_drafts_pmf, expected_tokens_per_seq
from specplan.planner.program import decode_round, draft_steps, target_pass
from specplan.simulator import simulate
from specplan.simulator.core import make_template
from specplan.simulator.script import _commit
from test_simulator import check_conservation, cpu_profile


@lru_cache(maxsize=None)
def searched(model: str, profile: str, vram_gib: float, drafts: tuple[str, ...] | None = ("none",),
             gen_len: int = 32, num_prompts: int = 256, prompt_len: int = 512):
    """The best plan of ``specplan search`` (profile "cpu-test" is test_simulator.cpu_profile())."""
    with tempfile.TemporaryDirectory() as d:
        if profile == "cpu-test":
            profile = str(write_json(Path(d) / "cpu-test.json", cpu_profile()))
        args = ["search", "--model", model, "--vram", str(vram_gib), "--profile", profile, "--top", "1",
                "--gen-len", str(gen_len), "--num-prompts", str(num_prompts), "--prompt-len", str(prompt_len),
                "-o", str(Path(d) / "plan.json")]
        for draft in drafts or ():
            args += ["--draft", draft]
        r = CliRunner().invoke(main, args, catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return load(Plan, Path(d) / "plan.json")


def interleaved(plan, draft: DraftSpec | None = None, draft_len: int = 3, acceptance: float = 0.8):
    """The plan with two interleaved batches (and a draft, if given); its prediction dropped."""
    pol = plan.policy.model_copy(update={"num_batches": 2, **({"draft_len": draft_len, "acceptance": acceptance}
                                                              if draft is not None else {})})
    update = {"policy": pol, "prediction": None}
    if draft is not None:
        update["draft"] = draft
    return plan.model_copy(update=update)


# (model, profile, VRAM GiB, drafts, gen_len, prompts): the search's best plan for these
AGREEMENT = [
    ("mixtral-8x22b", "rtx4090-pcie4", 24, ("none",), 32, 256),  # disk-bound, whole layers streamed
    ("mixtral-8x7b", "t4", 16, ("none",), 32, 64),  # host->device bound
    ("olmoe-1b-7b", "cpu-test", 6, ("none",), 32, 16),  # no GPU: routed experts read from disk on demand
]


@pytest.mark.parametrize("case", AGREEMENT, ids=lambda c: f"{c[0]}-{c[1]}")
def test_simulated_decode_throughput_is_within_3_percent_of_the_search(case):
    plan = searched(*case)
    sim = simulate(plan, expected=True)
    assert sim.prediction_source == "plan" and sim.prediction == plan.prediction
    s, pred = sim.summary, plan.prediction
    assert abs(pred.decode_tok_s - s.decode_tok_s) / s.decode_tok_s < 0.03, (case, s.decode_tok_s, pred.decode_tok_s)
    assert s.tokens == pytest.approx(plan.workload.num_prompts * plan.workload.gen_len)
    assert s.prefill_s + s.decode_s == pytest.approx(s.total_s)
    check_conservation(sim.schedule)


def test_speculative_rounds_agree_with_the_planner():
    """The T4 plan with a 4-bit substitute drafting 3 tokens at acceptance 0.8: in expectation the steady rounds
    give the predicted tokens per second within 3%; drawn runs (which end when a batch's slowest sequence is done,
    as the planner's expected round count assumes) give the predicted decode throughput within 5%."""
    plan = interleaved(searched("mixtral-8x7b", "t4", 16, ("none",), 32, 64), DraftSpec(kind="substitute", bits=4))
    plan = plan.model_copy(update={"policy": plan.policy.model_copy(update={"num_batches": 1})})
    sim = simulate(plan, tokens=64, expected=True)
    pred = sim.prediction
    steady = pred.tokens_per_round / pred.round_s
    assert abs(steady - sim.summary.steady_decode_tok_s) / sim.summary.steady_decode_tok_s < 0.03
    drawn = np.mean([simulate(plan, tokens=64, seed=seed).summary.decode_tok_s for seed in range(3)])
    assert abs(pred.decode_tok_s - drawn) / drawn < 0.05
    assert drawn < sim.summary.decode_tok_s  # stragglers cost rounds
    check_conservation(sim.schedule)


def test_drawn_runs_are_seeded_and_never_count_tokens_past_gen_len():
    plan = searched("mixtral-8x7b", "rtx4090-pcie4", 24, None, 128, 256)
    assert plan.policy.speculative
    plan = plan.model_copy(update={"prediction": None})
    a = simulate(plan, tokens=24, prompts=40, seed=7)
    b = simulate(plan, tokens=24, prompts=40, seed=7)
    c = simulate(plan, tokens=24, prompts=40, seed=8)
    assert a.summary == b.summary and a.schedule.end_s == b.schedule.end_s
    assert a.schedule.end_s != c.schedule.end_s
    for sim in (a, c):
        assert sim.summary.tokens == 40 * 24  # every sequence gets exactly gen_len tokens
        assert sim.summary.decode_tokens == 40 * 23
        assert all(float(st.info["tokens"]).is_integer() for st in sim.schedule.stages)
        check_conservation(sim.schedule)
    # sequences finish at different rounds, the batch runs until the last one: more rounds than the expectation
    expected = simulate(plan, tokens=24, prompts=40, expected=True)
    per_seq = expected_tokens_per_seq(plan.policy.acceptance, plan.policy.draft_len)
    assert expected.summary.rounds == math.ceil(23 / per_seq)
    assert a.summary.rounds > expected.summary.rounds


def test_accepted_drafts_follow_the_acceptance_model():
    rng = np.random.default_rng(0)
    n, a, g = 40_000, 0.7, 4
    committed = np.ones(n)
    got = _commit(committed, committed < 100, gen_len=100, acceptance=a, draft_len=g, rng=rng)
    per_seq = committed - 1
    assert got == per_seq.sum()
    assert per_seq.mean() == pytest.approx(expected_tokens_per_seq(a, g), abs=4 * per_seq.std() / math.sqrt(n))
    freq = np.bincount(per_seq.astype(int) - 1, minlength=g + 1) / n
    assert np.allclose(freq, accepted_drafts_pmf(a, g), atol=0.01)
    # capped at gen_len: 3 tokens left, never more
    committed = np.full(5, 7.0)
    _commit(committed, committed < 10, gen_len=10, acceptance=1.0, draft_len=g, rng=rng)
    assert (committed == 10).all()


def test_kv_growth_makes_attention_longer_round_after_round():
    plan = searched("mixtral-8x7b", "t4", 16, ("none",), 32, 64)
    sim = simulate(plan, kv_step=1, expected=True)
    durations = []
    for i, st in enumerate(sim.schedule.stages):
        if st.info["kind"] == "decode" and st.info["batch"] == 0:
            k = next(j for j, op in enumerate(st.template.ops) if op.name == "L0.attention")
            g = sim.schedule.base[i] + k
            durations.append((st.info["context_len"], sim.schedule.end_s[g] - sim.schedule.start_s[g]))
    contexts = [c for c, _ in durations]
    assert contexts == list(range(512, 512 + 31))  # prompt, then one more cached token per round
    assert all(b[1] > a[1] for a, b in zip(durations, durations[1:]))


def test_two_interleaved_batches_draft_while_the_other_verifies():
    plan = interleaved(searched("mixtral-8x7b", "t4", 16, ("none",), 32, 64), DraftSpec(kind="substitute", bits=4))
    sim = simulate(plan, tokens=8)
    s = sim.schedule
    check_conservation(s)
    stages = {(st.info["kind"], st.info.get("batch"), st.info.get("round")): i for i, st in enumerate(s.stages)}
    verify0, draft1 = stages[("verify", 0, 1)], stages[("draft", 1, 1)]
    draft1_start = min(s.start_s[g] for g in s.op_range(draft1))
    verify0_ops = s.op_range(verify0)
    assert min(s.start_s[g] for g in verify0_ops) < draft1_start < max(s.end_s[g] for g in verify0_ops)
    assert {e.batch for e in sim.timeline().events} == {0, 1}
    assert sim.prediction_source == "planner"  # the plan had no prediction: the planner's, for this workload


def test_stages_are_the_planners_decode_round():
    """A round of the simulator (per batch: draft steps, then the verification pass waiting for the last draft
    step) has exactly the ops and dependencies of planner.program.decode_round."""
    base = searched("mixtral-8x7b", "t4", 16, ("none",), 32, 64)
    for plan in (interleaved(base, DraftSpec(kind="substitute", bits=8)),
                 interleaved(searched("mixtral-8x7b", "rtx4090-pcie4", 24, None, 128, 256))):
        ctx = 600
        round_ops = decode_round(plan, ctx).ops
        mine = []
        for b in range(plan.policy.num_batches):
            d = make_template(draft_steps(plan, b, ctx).ops, plan.profile)
            t = make_template(target_pass(plan, b, ctx, plan.policy.draft_len + 1, None,
                                          "verify" if plan.policy.speculative else "decode").ops, plan.profile)
            off = len(mine)
            mine += [(op, {off + x for x in op.deps}) for op in d.ops]
            tail = off + d.tail
            off = len(mine)
            mine += [(op, {off + x for x in op.deps} | ({tail} if i in t.external else set()))
                     for i, op in enumerate(t.ops)]
        assert len(mine) == len(round_ops)
        for (op, deps), ref in zip(mine, round_ops):
            assert (op.name, op.resource, op.batch, op.flops, op.bytes, op.slot) == \
                   (ref.name, ref.resource, ref.batch, ref.flops, ref.bytes, ref.slot)
            assert deps == set(ref.deps), op.name


def test_timeline_contract_names_and_bytes(tmp_path):
    plan = searched("olmoe-1b-7b", "cpu-test", 6, ("none",), 32, 16)
    sim = simulate(plan, tokens=6, expected=True)
    tl = sim.timeline()
    write_json(tmp_path / "t.json", tl)
    back = load(Timeline, tmp_path / "t.json")
    assert back.source == "simulated" and len(back.events) == len(tl.events) == sim.num_ops
    assert back.meta["decode_tok_s"] == sim.summary.decode_tok_s and back.meta["gen_len"] == 6
    names = {e.name for e in tl.events}
    assert {"embed", "lm_head", "L0.attn_proj", "L0.attention", "L0.router", "L0.moe_combine"} <= names
    assert all(e.resource in ("device_compute", "disk_read") for e in tl.events)  # no GPU: one compute queue
    reads = [e for e in tl.events if e.resource == "disk_read"]
    assert reads and all((e.layer is not None or e.name == "lm_head.read") and e.batch == 0 for e in reads)
    # expected mode: a routed read carries its expected bytes, and the bytes add up to what the programs read
    ops = [op for st in sim.schedule.stages for op in st.template.ops if op.resource == "disk_read"]
    assert sum(e.bytes for e in reads) == pytest.approx(sum(op.prob * op.bytes for op in ops), rel=1e-6)
    assert tl.busy_s("disk_read") == pytest.approx(sim.summary.busy_s["disk_read"])
    drawn = simulate(plan, tokens=6, seed=3).timeline()
    assert len(drawn.events) < len(tl.events)  # untouched experts are not events


def test_bubbles_account_for_the_bottlenecks_idle_decode_time():
    plan = searched("olmoe-1b-7b", "cpu-test", 6, ("none",), 32, 16)
    s = simulate(plan).summary
    assert s.bottleneck == "disk_read"
    busy = s.decode_utilisation["disk_read"] * s.decode_s
    assert busy + s.bubble_s == pytest.approx(s.decode_s)
    assert sum(s.bubble_causes.values()) == pytest.approx(s.bubble_s)
    assert any(k.startswith("L*.") for k in s.bubble_causes)  # on-demand expert reads wait for their router
    assert s.bubbles == sorted(s.bubbles, key=lambda b: -b.duration_s)
    assert all(b.waiting_for for b in s.bubbles if b.after)


def test_simulate_does_not_import_torch(tmp_path):
    plan = searched("mixtral-8x7b", "t4", 16, ("none",), 32, 64)
    write_json(tmp_path / "plan.json", plan)
    code = (
        "import sys\n"
        "from specplan.cli import main\n"
        f"try:\n    main(['simulate', {str(tmp_path / 'plan.json')!r}, '--tokens', '3'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
