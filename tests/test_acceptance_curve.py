"""The per-position acceptance curve P(n >= i): measured from the accepted-length histogram (the engine's
``Acceptance``), stored in calibration.json (old files still read), used by the planner (E[tokens per round] =
1 + sum_i P(n >= i), extended past its length at its tail's geometric ratio), and equal to the one-parameter model
when the curve is geometric."""

from __future__ import annotations

import json

import pytest
from planner_fixtures import cpu_profile, hand_plan, tiny_moe

from specplan.contracts.calibration import AcceptanceRecord, Calibration
from specplan.contracts.plan import DraftSpec, Policy
from specplan.engine.execute.speculative import Acceptance
from specplan.errors import ContractError
from specplan.jsonio import load, write_json
from specplan.planner.drafts import acceptance_for
from specplan.planner.expect import (accepted_drafts_pmf, expected_rounds, expected_tokens_per_seq, survival,
                                     tail_ratio)
from specplan.planner.predict import predict
from specplan.validation.runs import calibration_of


def test_the_curve_from_a_known_histogram():
    acc = Acceptance()
    for n, count in {0: 2, 1: 3, 2: 1, 3: 4}.items():  # 10 sequence-rounds of 3 proposals
        for _ in range(count):
            acc.add(n, 3)
    assert acc.survival == pytest.approx([8 / 10, 5 / 10, 4 / 10])
    # E[n + 1] = 1 + sum_i P(n >= i): the measured tokens per round
    assert 1 + sum(acc.survival) == pytest.approx(acc.tokens_per_round) == pytest.approx(2.7)
    assert acc.per_token == pytest.approx(17 / (17 + 6))  # the MLE is kept: accepted / (accepted + rejections)
    assert Acceptance().survival is None


def test_a_histogram_with_no_full_acceptance_ends_the_curve_at_zero():
    acc = Acceptance()
    for n in (0, 1, 1, 2):
        acc.add(n, 4)
    assert acc.survival == pytest.approx([0.75, 0.25, 0.0, 0.0])


@pytest.mark.parametrize("a", [0.0, 0.3, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("g", [1, 3, 6])
def test_a_geometric_curve_is_the_one_parameter_model(a, g):
    curve = [a**i for i in range(1, g + 1)]
    assert expected_tokens_per_seq(None, g, curve) == pytest.approx(expected_tokens_per_seq(a, g), rel=1e-12)
    assert accepted_drafts_pmf(None, g, curve) == pytest.approx(accepted_drafts_pmf(a, g), abs=1e-12)
    for seqs in (1, 4):
        assert expected_rounds(None, g, 15, seqs, curve) == pytest.approx(expected_rounds(a, g, 15, seqs), rel=1e-9)
    # a geometric curve measured at a shorter draft extends to the same model
    if g > 1 and a > 0:
        assert survival(None, g, curve[:1]) == pytest.approx(survival(a, g), rel=1e-12)


def test_expected_tokens_from_a_curve_and_its_tail():
    curve = [0.9, 0.6]  # conditional acceptance falls: 0.9, then 0.667
    assert expected_tokens_per_seq(0.5, 2, curve) == pytest.approx(2.5)  # the curve, not a = 0.5
    assert expected_tokens_per_seq(0.5, 1, curve) == pytest.approx(1.9)
    assert tail_ratio(curve) == pytest.approx(0.6 / 0.9)
    assert survival(None, 4, curve) == pytest.approx([0.9, 0.6, 0.4, 0.4 * 0.6 / 0.9])
    assert tail_ratio([0.8, 0.6, 0.45, 0.3]) == pytest.approx((0.3 / 0.6) ** 0.5)  # second half: i = 2..4
    assert tail_ratio([0.5, 0.0]) == 0.0
    pmf = accepted_drafts_pmf(None, 4, curve)
    assert sum(pmf) == pytest.approx(1.0) and pmf[0] == pytest.approx(0.1) and pmf[1] == pytest.approx(0.3)


def test_the_prediction_follows_the_curve():
    spec = tiny_moe()
    plan = hand_plan(spec, cpu_profile(), draft=DraftSpec(kind="substitute", bits=4), draft_len=3, acceptance=0.6)
    curve = [0.9, 0.8, 0.7]
    with_curve = plan.model_copy(update={"policy": plan.policy.model_copy(update={"acceptance_curve": curve})})
    p, q = predict(plan), predict(with_curve)
    assert p.tokens_per_seq_round == pytest.approx(expected_tokens_per_seq(0.6, 3))
    assert q.tokens_per_seq_round == pytest.approx(1 + sum(curve))
    assert q.decode_tok_s > p.decode_tok_s  # more tokens per round at the same round cost
    assert q.round_s == pytest.approx(p.round_s)


def test_policy_and_record_refuse_a_curve_that_rises_or_leaves_zero_one():
    with pytest.raises(ValueError, match="never rises"):
        Policy(prefill_batch=1, decode_batch=1, draft_len=2, acceptance=0.5, acceptance_curve=[0.5, 0.6])
    with pytest.raises(ValueError, match="speculative"):
        Policy(prefill_batch=1, decode_batch=1, acceptance_curve=[0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        AcceptanceRecord(draft="d", per_token_acceptance_mle=0.5, source="x", acceptance_curve=[1.5])


def test_an_old_calibration_file_without_a_curve_still_loads_and_plans_geometrically(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema_version": 1, "created_utc": "2026-01-01T00:00:00Z", "acceptance": [
        {"draft": "substitute:int4", "acceptance": 0.8, "proposed_tokens": 100, "accepted_tokens": 70,
         "source": "old run"}]}))
    calib = load(Calibration, old)
    assert calib.acceptance[0].acceptance_curve is None
    choice = acceptance_for(DraftSpec(kind="substitute", bits=4), "t", None, calib)
    assert choice.acceptance == 0.8 and choice.curve is None and choice.measured


def test_a_bad_curve_in_a_calibration_file_is_one_contract_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 1, "created_utc": "2026-01-01T00:00:00Z", "acceptance": [
        {"draft": "d", "per_token_acceptance_mle": 0.8, "acceptance_curve": [0.5, 0.9], "source": "x"}]}))
    with pytest.raises(ContractError, match="bad.json"):
        load(Calibration, bad)


def test_a_runs_curve_goes_to_calibration_json_and_the_planner_uses_it(tmp_path):
    spec = tiny_moe()
    plan = hand_plan(spec, cpu_profile(), draft=DraftSpec(kind="substitute", bits=4), draft_len=3, acceptance=0.6)
    acc = {"measured": 0.7, "measured_curve": [0.8, 0.6, 0.5], "proposed_tokens": 300, "accepted_tokens": 190,
           "sequence_rounds": 100, "draft_len": 3}
    path = write_json(tmp_path / "calibration.json", calibration_of(plan, acc, tmp_path))
    rec = load(Calibration, path).acceptance[0]
    assert rec.acceptance_curve == [0.8, 0.6, 0.5] and rec.curve_sequence_rounds == 100
    choice = acceptance_for(plan.draft, plan.model.name, None, load(Calibration, path))
    assert choice.curve == (0.8, 0.6, 0.5) and choice.acceptance == 0.7 and "P(n >= i)" in choice.source
    # --acceptance overrides the calibration, curve and all
    assert acceptance_for(plan.draft, plan.model.name, 0.4, load(Calibration, path)).curve is None


def test_the_search_plans_with_the_calibrated_curve_and_says_when_it_extends_it():
    from specplan.contracts import Capacities, Workload
    from specplan.planner.drafts import choices
    from specplan.planner.search import Ask, search

    spec = tiny_moe()
    curve = [0.9, 0.85]  # measured at g = 2; the search tries longer drafts too
    calib = Calibration(created_utc="2026-01-01T00:00:00Z", acceptance=[AcceptanceRecord(
        draft="substitute:int4", per_token_acceptance_mle=0.88, acceptance_curve=curve, source="a test run")])
    ask = Ask(spec=spec, model_name=spec.name, profile=cpu_profile(), capacities=Capacities(device_bytes=1 << 30),
              workload=Workload(prompt_len=64, gen_len=16, num_prompts=8),
              drafts=tuple(choices(["substitute:int4"], spec, spec.name, None, calib)), top=20)
    plans = [p for p in search(ask).plans if p.policy.speculative]
    assert {p.policy.draft_len > len(curve) for p in plans} == {True, False}  # within the curve and past it
    for plan in plans:
        g = plan.policy.draft_len
        assert plan.policy.acceptance_curve == curve
        assert plan.prediction.tokens_per_seq_round == pytest.approx(1 + sum(survival(None, g, curve)))
        extended = [a for a in plan.prediction.assumptions if "past the measured curve" in a]
        assert bool(extended) == (g > len(curve))


def test_the_simulator_draws_from_the_curve():
    from specplan.simulator import simulate

    plan = hand_plan(tiny_moe(), cpu_profile(), draft=DraftSpec(kind="substitute", bits=4), draft_len=3,
                     acceptance=0.6)

    def with_curve(curve):
        return plan.model_copy(update={"policy": plan.policy.model_copy(update={"acceptance_curve": curve})})

    # a geometric curve draws exactly what the one-parameter model draws
    same = simulate(with_curve([0.6, 0.36, 0.216]), seed=4).summary
    assert same.decode_tok_s == pytest.approx(simulate(plan, seed=4).summary.decode_tok_s, rel=1e-12)
    # a curve that accepts everything commits g + 1 tokens a round: fewer rounds, more throughput
    assert simulate(with_curve([1.0, 1.0, 1.0]), seed=4).summary.decode_tok_s > same.decode_tok_s


# ---- acceptance per sequence: prompts differ more than rounds, and the slowest sequence sets a batch's rounds ----


def test_each_sequence_gets_its_own_curve():
    acc = Acceptance()
    for seq, ns in {3: (2, 2, 2), 1: (0, 0, 1, 0)}.items():
        for n in ns:
            acc.add(n, 2, seq)
    assert acc.sequence_survival == [pytest.approx([1 / 4, 0.0]), pytest.approx([1.0, 1.0])]  # by the run's index
    assert acc.survival == pytest.approx([4 / 7, 3 / 7])  # the pooled curve is unchanged


def test_expected_rounds_of_a_mixture_of_sequences_match_a_monte_carlo_batch():
    import numpy as np

    g, tokens, batch = 4, 24, 8
    curves = [[0.95**i for i in range(1, g + 1)], [0.3**i for i in range(1, g + 1)]]
    # alike sequences: the mixture of one curve is the i.i.d. model
    assert expected_rounds(None, g, tokens, batch, curves[0], [curves[0]] * 3) == pytest.approx(
        expected_rounds(None, g, tokens, batch, curves[0]), rel=1e-9)
    rng = np.random.default_rng(0)
    pmfs = [accepted_drafts_pmf(None, g, c) for c in curves]
    trials = []
    for _ in range(4000):
        kinds = rng.integers(2, size=batch)
        rounds = []
        for k in kinds:
            done, r = 0, 0
            while done < tokens:
                done += rng.choice(g + 1, p=pmfs[k]) + 1
                r += 1
            rounds.append(r)
        trials.append(max(rounds))
    mixed = expected_rounds(None, g, tokens, batch, curves[0], curves)
    assert mixed == pytest.approx(np.mean(trials), rel=0.02)
    # the pooled curve of the same sequences under-counts the batch's rounds: its slowest sequence is slower
    pooled = [(a + b) / 2 for a, b in zip(*curves)]
    assert mixed > 1.2 * expected_rounds(None, g, tokens, batch, pooled)


def test_per_sequence_curves_go_from_a_run_to_the_plan(tmp_path):
    spec = tiny_moe()
    plan = hand_plan(spec, cpu_profile(), draft=DraftSpec(kind="substitute", bits=4), draft_len=3, acceptance=0.6)
    acc = {"measured": 0.7, "measured_curve": [0.8, 0.6, 0.5], "measured_sequence_curves": [[1.0, 0.9, 0.9],
                                                                                             [0.6, 0.3, 0.1]],
           "proposed_tokens": 300, "accepted_tokens": 190, "sequence_rounds": 100, "draft_len": 3}
    calib = calibration_of(plan, acc, tmp_path)
    assert calib.acceptance[0].sequence_curves == [[1.0, 0.9, 0.9], [0.6, 0.3, 0.1]]
    choice = acceptance_for(plan.draft, plan.model.name, None, calib)
    fields = choice.policy_curves(3)
    assert fields["acceptance_sequence_curves"] == [[1.0, 0.9, 0.9], [0.6, 0.3, 0.1]]
    assert choice.policy_curves(0) == {"acceptance": None, "acceptance_curve": None,
                                       "acceptance_sequence_curves": None}
    spread = plan.model_copy(update={"policy": plan.policy.model_copy(update=fields), "prediction": None})
    alike = plan.model_copy(update={"policy": plan.policy.model_copy(update={
        **fields, "acceptance_sequence_curves": None}), "prediction": None})
    assert predict(spread).decode_s > predict(alike).decode_s  # the slow sequence holds its batch


def test_per_sequence_curves_of_another_length_or_without_a_pooled_curve_are_refused():
    with pytest.raises(ValueError, match="positions"):
        Policy(prefill_batch=1, decode_batch=1, draft_len=2, acceptance=0.5, acceptance_curve=[0.5, 0.2],
               acceptance_sequence_curves=[[0.5]])
    with pytest.raises(ValueError, match="pooled"):
        AcceptanceRecord(draft="d", per_token_acceptance_mle=0.5, source="x", sequence_curves=[[0.5]])
