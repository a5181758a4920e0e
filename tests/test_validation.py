"""The validation room's parts without running the engine: which prediction a measured run is compared with, signed
errors, the grid's families and summary, the calibration file of a run, the demo's speedup lines; and the contracts'
physical resource and the planner's ``make_ask`` they rely on (``specplan run`` and ``specplan validate`` run them
end to end in test_run.py and test_validate.py)."""

from __future__ import annotations

import json
import statistics
from types import SimpleNamespace

import pytest
from planner_fixtures import GiB, cpu_profile, hand_plan, tiny_moe
from scipy.stats import spearmanr

from specplan.contracts.calibration import Calibration
from specplan.contracts.plan import DraftSpec, Workload
from specplan.contracts.timeline import physical_resource
from specplan.errors import SpecplanError
from specplan.jsonio import load, write_json
from specplan.planner.asking import make_ask
from specplan.planner.predict import predict
from specplan.validation.compare import prediction_for, signed_error
from specplan.validation.demo import comparison_lines
from specplan.validation.grid import spanning_grid, summarise
from specplan.validation.runs import calibration_of, plan_id, read_prompts
from specplan.validation.trials import Trial, median_trial
from specplan.validation.trials import summarise as summarise_trials


def ran(wl: Workload, prompt_len_mean: float | None = None) -> SimpleNamespace:
    """The part of a ``RunOutput`` that says which workload ran."""
    meta = {"prompt_len_mean": wl.prompt_len if prompt_len_mean is None else prompt_len_mean, "gen_len": wl.gen_len,
            "num_prompts": wl.num_prompts}
    return SimpleNamespace(timeline=SimpleNamespace(meta=meta))


@pytest.fixture(scope="module")
def speculative_plan():
    plan = hand_plan(tiny_moe(), cpu_profile(), draft=DraftSpec(kind="substitute", bits=4), draft_len=3,
                     acceptance=0.6)
    return plan.model_copy(update={"prediction": predict(plan)})


def test_signed_error_is_relative_to_the_measurement():
    assert signed_error(12.0, 10.0) == pytest.approx(0.2)
    assert signed_error(8.0, 10.0) == pytest.approx(-0.2)
    assert signed_error(None, 10.0) is None and signed_error(1.0, 0.0) is None and signed_error(1.0, None) is None


def test_the_plans_own_prediction_only_for_the_workload_it_was_made_for(speculative_plan):
    plan = speculative_plan
    pred, source = prediction_for(plan, ran(plan.workload))
    assert source == "plan" and pred is plan.prediction
    longer = plan.workload.model_copy(update={"gen_len": 2 * plan.workload.gen_len})
    pred, source = prediction_for(plan, ran(longer))
    assert source.startswith("planner") and pred.total_s > plan.prediction.total_s
    assert pred == predict(plan.model_copy(update={"workload": longer, "prediction": None}))
    # the mean prompt length is rounded to the planned one: the plan's prediction still applies
    assert prediction_for(plan, ran(plan.workload, plan.workload.prompt_len + 0.4))[1] == "plan"


def test_a_higher_measured_acceptance_predicts_more_throughput(speculative_plan):
    plan = speculative_plan
    low, _ = prediction_for(plan, ran(plan.workload), {"measured": 0.3, "measured_curve": None})
    high, source = prediction_for(plan, ran(plan.workload), {"measured": 0.9, "measured_curve": None})
    assert source.startswith("planner") and high.decode_tok_s > plan.prediction.decode_tok_s > low.decode_tok_s


def test_the_grid_spans_the_plan_space_from_each_budgets_choice():
    """The planner's choice at each budget first (best predicted first), then greedily the plan adding most
    uncovered axis values; a plan found at two budgets is taken once; never more than asked."""
    spec, prof = tiny_moe(), cpu_profile()

    def plan(**kw):
        p = hand_plan(spec, prof, **kw)
        return p.model_copy(update={"prediction": predict(p)})

    a, b = plan(num_batches=1, decode_batch=4), plan(num_batches=1, decode_batch=2)
    c, d = plan(num_batches=2, decode_batch=2), plan(num_batches=1, decode_batch=4, expert_fetch="layer")
    searched = {1.0: [a, b, c], 0.5: [d, a]}
    got = spanning_grid(searched, 10)
    assert [g.chosen for g in got[:2]] == [True, True] and {g.vram_gib for g in got[:2]} == {1.0, 0.5}
    assert got[0].plan.prediction.e2e_tok_s >= got[1].plan.prediction.e2e_tok_s
    assert len({plan_id(g.plan) for g in got}) == len(got) == 4
    assert plan_id(got[2].plan) == plan_id(c)  # two new values (2 batches, batch 2) beat b's one (batch 2)
    assert len(spanning_grid(searched, 3)) == 3 and len(spanning_grid(searched, 1)) == 1


def grid_row(plan: int, vram: float, chosen: bool, pred: float, meas: float, sim: float) -> dict:
    return {"plan": plan, "vram_gib": vram, "chosen": chosen, "predicted_e2e_tok_s": pred, "measured_e2e_tok_s": meas,
            "predicted_decode_tok_s": 2 * pred, "measured_decode_tok_s": 2 * meas,
            "signed_error_predicted_e2e": (pred - meas) / meas, "signed_error_simulated_e2e": (sim - meas) / meas,
            "signed_error_predicted_decode": (pred - meas) / meas, "signed_error_simulated_decode": (sim - meas) / meas}


def test_the_summary_of_a_grid():
    rows = [grid_row(0, 1.0, True, 12.0, 10.0, 9.0), grid_row(1, 1.0, False, 11.0, 15.0, 15.75),
            grid_row(2, 0.5, True, 4.0, 5.0, 6.5), grid_row(3, 0.5, False, 3.0, 4.0, 4.0)]
    s = summarise(rows)
    errs = [r["signed_error_predicted_e2e"] for r in rows]
    assert s["plans"] == 4
    assert s["regret_e2e_by_budget"]["1"] == {"regret": pytest.approx(1.5), "chosen_plan": 0,
                                              "best_measured_plan": 1, "plans_at_budget": 2}
    assert s["regret_e2e_by_budget"]["0.5"]["regret"] == pytest.approx(1.0) and s["regret_e2e_worst"] == 1.5
    assert s["e2e_error_predicted"]["median"] == pytest.approx(statistics.median(errs))
    assert s["e2e_error_predicted"]["median_abs"] == pytest.approx(statistics.median(abs(e) for e in errs))
    assert s["e2e_error_predicted"]["worst"] == pytest.approx(max(errs, key=abs))
    assert s["e2e_error_simulated"]["worst"] == pytest.approx(0.3)
    rho = spearmanr([12.0, 11.0, 4.0, 3.0], [10.0, 15.0, 5.0, 4.0]).statistic
    assert s["spearman_predicted_vs_measured_e2e"] == pytest.approx(rho)
    assert summarise(rows[:2])["spearman_predicted_vs_measured_e2e"] is None  # two plans: no rank correlation


def test_a_runs_measured_acceptance_becomes_a_calibration_file(speculative_plan, tmp_path):
    acc = {"measured": 0.55, "proposed_tokens": 300, "accepted_tokens": 165, "sequence_rounds": 100, "draft_len": 3}
    path = write_json(tmp_path / "calibration.json", calibration_of(speculative_plan, acc, tmp_path))
    rec = load(Calibration, path).acceptance[0]
    assert rec.per_token_acceptance_mle == 0.55 and rec.proposed_tokens == 300 and rec.accepted_tokens == 165
    assert rec.accepted_fraction == pytest.approx(165 / 300)
    written = json.loads(path.read_text())["acceptance"][0]
    assert {"per_token_acceptance_mle", "accepted_fraction"} <= set(written) and "acceptance" not in written
    assert rec.draft == speculative_plan.draft.label and rec.target == speculative_plan.model.name
    assert "100 sequence-rounds of 3 proposals" in rec.source


def test_an_old_calibration_file_reads_its_acceptance_as_the_mle(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema_version": 1, "created_utc": "2026-01-01T00:00:00Z", "acceptance": [
        {"draft": "d", "acceptance": 0.925, "proposed_tokens": 576, "accepted_tokens": 434, "source": "old run"}]}))
    rec = load(Calibration, old).acceptance[0]
    assert rec.per_token_acceptance_mle == 0.925 and rec.accepted_fraction is None


def test_the_demo_compares_medians_of_interleaved_trials(tmp_path):
    """Medians and min..max per contender, the speedup as the ratio of the medians with its spread paired by
    repetition, the prediction's signed error against the median; a contended trial is counted."""
    def report(g: int, decode: float, e2e: float, pred_decode: float, pred_e2e: float) -> dict:
        return {"policy": {"draft_len": g}, "measured": {"decode_tok_s": decode, "e2e_tok_s": e2e},
                "predicted": {"decode_tok_s": pred_decode, "e2e_tok_s": pred_e2e}}

    trials = [Trial("best", r, tmp_path / f"b{r}", report(4, d, d / 2, 8.0, 4.0), o)
              for r, d, o in ((1, 6.0, 0.01), (2, 9.0, 0.5), (3, 5.0, None))]
    trials += [Trial("baseline", r, tmp_path / f"a{r}", report(0, d, d / 2, 4.0, 4.0), 0.0)
               for r, d in ((1, 4.0), (2, 3.0), (3, 5.0))]
    s = summarise_trials(trials)
    assert s["best"]["decode_tok_s"]["measured"] == {"median": 6.0, "min": 5.0, "max": 9.0}
    assert s["best"]["decode_tok_s"]["signed_error"] == pytest.approx((8.0 - 6.0) / 6.0)
    assert s["best"]["contended_trials"] == 1 and s["baseline"]["contended_trials"] == 0
    assert median_trial(trials, "best").rep == 1
    lines, speedups = comparison_lines(s, trials)
    r = speedups["decode_tok_s"]
    assert r["measured"] == pytest.approx(6.0 / 4.0) and r["predicted"] == pytest.approx(2.0)
    assert (r["measured_min"], r["measured_max"]) == pytest.approx((1.0, 3.0))  # 5/5 and 9/3
    assert "draft length 4" in lines[0] and "1 contended" in lines[0] and "no draft" in lines[1]
    assert "decode-only: measured 1.50x" in lines[2] and "predicted 2.00x" in lines[2]
    assert "end-to-end: measured 1.50x" in lines[3] and "predicted 1.00x" in lines[3]


def test_each_repetition_rotates_the_order_so_no_contender_always_follows_the_same_one():
    from specplan.validation.trials import rotated

    orders = [rotated(["a", "b", "c"], rep) for rep in (1, 2, 3, 4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert {o[0] for o in orders[:3]} == {"a", "b", "c"} and rotated([], 2) == []


def test_prompts_as_text_or_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("one\n\n  two  \n")
    assert read_prompts(text) == ["one", "two"]
    jl = tmp_path / "p.txt.jsonl"
    jl.write_text('{"prompt": "a"}\n{"prompt": "b c"}\n')
    assert read_prompts(jl) == ["a", "b c"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(SpecplanError, match="line 2 is not JSON"):
        read_prompts(tmp_path / "bad.jsonl")
    assert read_prompts(None)[0].startswith("Explain in simple terms")


def test_without_a_gpu_host_compute_is_the_device():
    assert physical_resource("host_compute", shared_memory=True) == "device_compute"
    assert physical_resource("host_compute", shared_memory=False) == "host_compute"
    assert physical_resource("disk_read", shared_memory=True) == "disk_read"


def test_make_ask_turns_gib_into_bytes_and_checks_shared_memory(tmp_path):
    ask = make_ask("mixtral-8x7b", 16, 64, 500, "t4", ("none",), None, None, 512, 128, 256, 5, "specplan search")
    cap = ask.capacities
    assert (cap.device_bytes, cap.host_bytes, cap.disk_bytes) == (16 * GiB, 64 * GiB, 500 * GiB)
    assert [d.label for d in ask.drafts] == ["none"] and ask.workload.num_prompts == 256 and ask.model_path is None
    prof = write_json(tmp_path / "cpu.json", cpu_profile())
    shared = make_ask("mixtral-8x7b", 1, None, None, str(prof), ("none",), None, None, 8, 8, 1, 1)
    assert shared.capacities.host_bytes is None
    with pytest.raises(SpecplanError, match="exceeds this machine's memory.*--profile rtx4090-pcie4"):
        make_ask("mixtral-8x7b", 10_000, None, None, str(prof), ("none",), None, None, 8, 8, 1, 1)


def test_gpu_budgets_beyond_the_hardware_are_refused_and_the_host_keeps_a_headroom():
    def ask(vram, ram=None):
        return make_ask("mixtral-8x7b", vram, ram, None, "rtx4090-pcie4", ("none",), None, None, 64, 8, 1, 1)

    with pytest.raises(SpecplanError, match=r"--vram 1000 GiB exceeds the device's memory \(24.0 GiB"):
        ask(1000)
    with pytest.raises(SpecplanError, match=r"--ram 512 GiB exceeds the host's memory \(128.0 GiB"):
        ask(24, 512)
    cap = ask(24).capacities
    head = cap.headroom
    assert head.os_bytes == int(0.02 * 128 * GiB) and head.process_bytes == 2 * GiB and "default" in head.source
    assert cap.host_bytes == 128 * GiB - head.total_bytes  # the default host budget leaves the headroom
    assert ask(24, 100).capacities.host_bytes == 100 * GiB
