"""Synthetic acceptance (``run --synthetic-acceptance A``, a benchmark mode): each proposal accepted with probability
A from a seeded generator; the accepted fraction of the coin flips lies within a binomial bound of A, the run
repeats with its seed, the committed token at a rejection is the target's own, and every output says the run is
not lossless (no calibration.json). And a real speculative run's report keeps the cost model's error apart from the
acceptance model's."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from runtime_fixtures import make_plan

from specplan.cli import main
from specplan.contracts.plan import DraftSpec, Placement, Plan, Sampling
from specplan.engine.build.models import upcycle_to_mixtral
from specplan.engine.execute.runtime import run_plan
from specplan.engine.model.checkpoint import open_checkpoint
from specplan.errors import SpecplanError
from specplan.jsonio import write_json
from specplan.planner.expect import expected_tokens_per_seq

PROMPTS = [[5, 17, 99, 3, 250, 61, 7], [200, 11, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 100], [1, 2], [77] * 5]
NEW = 24


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """The MoE target upcycled from a tiny Llama, a random Llama (a draft it almost never accepts), and itself."""
    dense = tiny_model("llama")
    moe = upcycle_to_mixtral(dense, tmp_path_factory.mktemp("moe") / "moe", num_experts=4, top_k=2, noise=0.3, seed=3)
    return {"target": moe, "random": tiny_model("llama", seed=7), "perfect": moe}


def spec_plan(target, draft_folder, g: int, path: str | None = None, **policy) -> Plan:
    spec = open_checkpoint(target).spec
    data = make_plan(spec, Placement.uniform(spec, "disk"), path=path, decode_batch=3, prefill_batch=2,
                     **policy).model_dump()
    dspec = open_checkpoint(draft_folder).spec
    data["policy"].update(draft_len=g, acceptance=0.8)
    data["draft"] = DraftSpec(kind="model", name=dspec.name, path=str(draft_folder), spec=dspec).model_dump()
    return Plan.model_validate(data)


def tokens_of(out) -> list[list[int]]:
    return [s.generated for s in sorted(out.seqs, key=lambda s: s.index)]


@pytest.mark.parametrize("a,sampling", [(0.3, None), (0.7, None), (0.95, Sampling(temperature=0.8, seed=5))])
def test_the_synthetic_acceptance_is_a_within_a_binomial_bound(models, a, sampling):
    ckpt = open_checkpoint(models["target"])
    plan = spec_plan(models["target"], models["random"], 4)
    acc = run_plan(plan, ckpt, PROMPTS * 2, NEW, synthetic_acceptance=a, sampling=sampling).stats.acceptance
    trials = acc.accepted + acc.rejections  # coin flips: every accepted proposal and each round's first rejection
    assert trials > 150
    assert abs(acc.accepted / trials - a) <= 4 * math.sqrt(a * (1 - a) / trials)
    # the random draft alone is accepted far less (greedy: almost never): the coin decided, not the target
    real = run_plan(plan, ckpt, PROMPTS * 2, NEW, sampling=sampling).stats.acceptance
    assert abs(acc.per_token - real.per_token) > 0.2


def test_a_synthetic_run_repeats_with_its_seed_and_accepts_everything_at_one(models):
    ckpt = open_checkpoint(models["target"])
    plan = spec_plan(models["target"], models["random"], 3)
    one, two = (run_plan(plan, ckpt, PROMPTS, NEW, synthetic_acceptance=0.5) for _ in range(2))
    assert one.stats.acceptance.histogram == two.stats.acceptance.histogram and tokens_of(one) == tokens_of(two)
    full = run_plan(plan, ckpt, PROMPTS, NEW, synthetic_acceptance=1.0).stats.acceptance
    assert full.accepted == full.proposed and full.rejections == 0
    assert run_plan(plan, ckpt, PROMPTS, NEW, synthetic_acceptance=0.5).timeline.meta["synthetic_acceptance"] == 0.5


def test_at_a_rejection_the_target_commits_its_own_token(models):
    """With the target as its own draft, the proposals are the target's greedy tokens, so whatever the coin says
    the committed tokens are plain greedy decoding: the token after the accepted ones is the target's."""
    ckpt = open_checkpoint(models["target"])
    plain = run_plan(make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "device")), ckpt, PROMPTS, NEW,
                     dtype=torch.float64)
    out = run_plan(spec_plan(models["target"], models["perfect"], 3), ckpt, PROMPTS, NEW, dtype=torch.float64,
                   synthetic_acceptance=0.4)
    assert tokens_of(out) == tokens_of(plain)
    assert out.stats.acceptance.rejections > 0  # the coin rejected proposals the target would have accepted


def test_a_plan_without_a_draft_is_refused(models):
    ckpt = open_checkpoint(models["target"])
    with pytest.raises(SpecplanError, match="speculative plan"):
        run_plan(make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "device")), ckpt, PROMPTS, NEW,
                 synthetic_acceptance=0.5)


def run_cli(*args):
    return CliRunner().invoke(main, ["run", *map(str, args)])


def test_every_output_of_a_synthetic_run_is_marked_and_no_calibration_is_written(models, tmp_path):
    plan_file = write_json(tmp_path / "plan.json", spec_plan(models["target"], models["random"], 3,
                                                             path=str(models["target"]), num_prompts=4, gen_len=8))
    out = tmp_path / "res"
    out.mkdir()
    (out / "calibration.json").write_text("{}")  # an earlier run's: not left beside a synthetic one
    r = run_cli(plan_file, "--synthetic-acceptance", "0.6", "--fixed-length", "-o", out)
    assert r.exit_code == 0, r.output
    assert "NOT lossless" in r.output and "cost model's error" in r.output
    result = json.loads((out / "result.json").read_text())
    assert result["benchmark_mode"]["lossless"] is False and result["benchmark_mode"]["synthetic_acceptance"] == 0.6
    assert result["acceptance"]["synthetic_acceptance"] == 0.6 and result["policy"]["acceptance"] == 0.6
    rows = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert rows and all("NOT lossless" in row["benchmark_mode"] for row in rows)
    assert not (out / "calibration.json").exists()
    assert json.loads((out / "trace.json").read_text())["otherData"]["synthetic_acceptance"] == 0.6


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_a_synthetic_acceptance_outside_zero_one_is_one_line_and_exit_2(models, tmp_path, value):
    plan_file = write_json(tmp_path / "plan.json", spec_plan(models["target"], models["random"], 3,
                                                             path=str(models["target"])))
    r = run_cli(plan_file, "--synthetic-acceptance", value, "-o", tmp_path / "res")
    assert r.exit_code == 2 and "(0, 1]" in r.output and len(r.output.strip().splitlines()) == 1


def test_a_synthetic_acceptance_on_a_plan_without_a_draft_is_one_line_and_exit_2(models, tmp_path):
    spec = open_checkpoint(models["target"]).spec
    plan_file = write_json(tmp_path / "plan.json", make_plan(spec, Placement.uniform(spec, "device"),
                                                             path=str(models["target"])))
    r = run_cli(plan_file, "--synthetic-acceptance", "0.5", "-o", tmp_path / "res")
    assert r.exit_code == 2 and "speculative plan" in r.output and len(r.output.strip().splitlines()) == 1


def test_a_speculative_run_reports_the_cost_models_error_apart_from_the_acceptance_models(models, tmp_path):
    plan_file = write_json(tmp_path / "plan.json", spec_plan(models["target"], models["random"], 3,
                                                             path=str(models["target"]), num_prompts=4, gen_len=8,
                                                             expert_fetch="routed"))
    out = tmp_path / "res"
    r = run_cli(plan_file, "--fixed-length", "-o", out)
    assert r.exit_code == 0, r.output
    assert "acceptance model's error" in r.output and "cost model's error" in r.output and "routing:" in r.output
    result = json.loads((out / "result.json").read_text())
    acc, e = result["acceptance"], result["errors"]
    assert "benchmark_mode" not in result
    curve = acc["measured_curve"]
    assert len(curve) == 3 and 1 + sum(curve) == pytest.approx(acc["tokens_per_seq_round_measured"])
    # the acceptance model: the plan's expected tokens per round (a = 0.8) against the measured
    assert acc["tokens_per_seq_round_expected"] == pytest.approx(expected_tokens_per_seq(0.8, 3))
    assert e["acceptance_model"]["signed_error"] == pytest.approx(
        (acc["tokens_per_seq_round_expected"] - acc["tokens_per_seq_round_measured"])
        / acc["tokens_per_seq_round_measured"])
    # the cost model: predicted at the measured curve, so at the measured tokens per round
    cost = e["cost_model"]
    assert "measured acceptance curve" in cost["predicted_at"]
    assert cost["measured_decode_tok_s"] == result["measured"]["decode_tok_s"]
    assert cost["signed_error"]["decode_tok_s"] == pytest.approx(
        (cost["predicted_decode_tok_s"] - cost["measured_decode_tok_s"]) / cost["measured_decode_tok_s"])
    # a random draft is accepted far less than the plan's 0.8: the prediction at the measurement is lower
    assert cost["predicted_decode_tok_s"] < result["predicted"]["decode_tok_s"]
    # routing measured from the timeline: between k and E distinct experts per layer pass (top-2 of 4)
    routing = e["routing"]
    assert 2 <= routing["distinct_experts_per_layer_pass_measured"] <= 4 and routing["layer_passes"] > 0
    assert 2 <= routing["distinct_experts_per_layer_pass_expected"] <= 4
    calib = json.loads((out / "calibration.json").read_text())["acceptance"][0]
    assert calib["acceptance_curve"] == pytest.approx(curve)
