"""``specplan run`` end to end on a tiny model: every result file written, the comparison printed, and bad inputs
answered with one line and exit code 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from runtime_fixtures import make_plan

from specplan.cli import main
from specplan.contracts.plan import Placement, Plan
from specplan.contracts.timeline import Timeline
from specplan.engine.model.checkpoint import open_checkpoint
from specplan.jsonio import load, write_json


def invoke(*args):
    return CliRunner().invoke(main, ["run", *map(str, args)])


@pytest.fixture(scope="module")
def model(tiny_model):
    folder = tiny_model("mixtral")
    return folder, open_checkpoint(folder).spec


@pytest.fixture
def plan_file(model, tmp_path):
    folder, spec = model
    plan = make_plan(spec, Placement.uniform(spec, "disk"), path=str(folder), prompt_len=40, gen_len=5, num_prompts=4,
                     decode_batch=2, prefill_batch=2, expert_fetch="routed")
    return write_json(tmp_path / "plan.json", plan)


def test_run_writes_every_result_and_prints_the_comparison(plan_file, tmp_path):
    out = tmp_path / "res"
    r = invoke(plan_file, "--fixed-length", "-o", out)
    assert r.exit_code == 0, r.output
    for text in ("decode-only throughput", "end-to-end throughput", "time to first token", "(pred - meas) / meas",
                 "disk_read", "device_compute", "O_DIRECT", "peak resident bytes"):
        assert text in r.output
    result = json.loads((out / "result.json").read_text())
    assert result["workload"]["num_prompts"] == 4 and result["workload"]["gen_len"] == 5
    assert result["stop"].startswith("fixed length") and result["prompt_format"] == "raw"  # no chat template
    assert result["measured"]["generated_tokens"] == 20 and result["measured"]["decode_tokens"] == 16
    assert result["measured"]["decode_tok_s"] > 0 and result["measured"]["busy_s"]["disk_read"] > 0
    assert result["predicted"]["decode_tok_s"] > 0 and result["prediction_source"].startswith("planner")
    err = result["signed_error"]["decode_tok_s"]
    assert err == pytest.approx((result["predicted"]["decode_tok_s"] - result["measured"]["decode_tok_s"])
                                / result["measured"]["decode_tok_s"])
    assert result["peak_bytes"]["device"] > 0 and result["o_direct"] is True
    rows = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(row["token_ids"]) == 5 and row["prompt"] for row in rows)
    assert rows[0]["prompt"].startswith("Explain in simple terms why the sky")  # the bundled prompts
    tl = load(Timeline, out / "timeline.json")
    assert tl.source == "measured" and any(e.resource == "disk_read" and e.bytes > 0 for e in tl.events)
    assert json.loads((out / "trace.json").read_text())["traceEvents"]
    assert (out / "gantt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prompts_from_jsonl_and_text(plan_file, tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "Hello there"}\n{"prompt": "How are you?"}\n')
    r = invoke(plan_file, "--prompts", jl, "--max-new-tokens", 2, "--num-prompts", 2, "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "a" / "outputs.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["Hello there", "How are you?"]
    assert [row["prompt_tokens"] for row in rows] == [11, 12]  # byte-level tokenizer: one token per byte


def _one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error:") and r.output.count("\n") == 1, r.output
    for n in needles:
        assert n in r.output, r.output


def test_bad_inputs_give_one_line_and_exit_2(plan_file, model, tmp_path, tiny_model):
    folder, spec = model
    _one_line_error(invoke(tmp_path / "nope.json"), "no such plan file")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    _one_line_error(invoke(bad), "not valid JSON")
    _one_line_error(invoke(plan_file, "--max-new-tokens", 0), "--max-new-tokens must be a positive whole number")
    _one_line_error(invoke(plan_file, "--num-prompts", "x"), "--num-prompts")
    _one_line_error(invoke(plan_file, "--prompts", tmp_path / "missing.txt"), "no such prompts file")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    _one_line_error(invoke(plan_file, "--prompts", empty), "no prompts")
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"text": "hi"}\n')
    _one_line_error(invoke(plan_file, "--prompts", nokey), 'no "prompt"')
    _one_line_error(invoke(plan_file, "--model", tiny_model("llama")), "differs from the plan's model")
    catalog = make_plan(spec, Placement.uniform(spec, "disk"))  # no local path: a catalog plan
    _one_line_error(invoke(write_json(tmp_path / "cat.json", catalog)),
                    f"pass --model DIR with the weights of {spec.name}")
    small = make_plan(spec, Placement.uniform(spec, "device"), path=str(folder), device_bytes=10_000)
    _one_line_error(invoke(write_json(tmp_path / "small.json", small), "-o", tmp_path / "s"),
                    "on the device tier", "capacity")
    assert not (tmp_path / "s").exists()


def test_a_substitute_draft_plan_runs_and_records_its_acceptance(model, tmp_path):
    """``specplan run`` of a substitute:int8 plan: the target streams from disk, the draft is its low-bit copy; the
    calibration file names the substitute."""
    from specplan.contracts.plan import DraftSpec

    folder, spec = model
    data = make_plan(spec, Placement.uniform(spec, "disk"), path=str(folder), prompt_len=40, gen_len=5,
                     num_prompts=2).model_dump()
    data["policy"].update(draft_len=3, acceptance=0.8)
    data["draft"] = DraftSpec(kind="substitute", bits=8).model_dump()
    out = tmp_path / "r"
    r = invoke(write_json(tmp_path / "spec.json", Plan.model_validate(data)), "--fixed-length", "--num-prompts", 2,
               "-o", out)
    assert r.exit_code == 0, r.output
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["acceptance"][0]["draft"] == "substitute:int8"
    assert 0 < calib["acceptance"][0]["per_token_acceptance_mle"] <= 1
    assert json.loads((out / "result.json").read_text())["measured"]["generated_tokens"] == 10
