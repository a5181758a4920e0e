"""``specplan simulate``: what it prints, the files it writes, and one-line errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from specplan.cli import main
from specplan.contracts import Timeline
from specplan.jsonio import load, write_json
from specplan.trace import occupancy
from test_simulator_plans import searched


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    write_json(path, searched("olmoe-1b-7b", "cpu-test", 6, ("none",), 32, 16))
    return path


def test_prints_labelled_throughput_ttft_utilisation_and_bubbles_and_writes_files(plan_file, tmp_path):
    r = run("simulate", plan_file, "--tokens", 4, "-o", tmp_path / "t.json", "--trace", tmp_path / "trace.json",
            "--png", tmp_path / "g.png")
    assert r.exit_code == 0, r.output
    for text in ("decode-only throughput", "end-to-end throughput", "time to first token", "tok/s",
                 "disk_read", "device_compute", "bubbles of disk_read", "prediction recomputed by the planner",
                 "drawn with seed 0"):
        assert text in r.output, text
    tl = load(Timeline, tmp_path / "t.json")
    assert tl.source == "simulated" and tl.meta["gen_len"] == 4 and tl.meta["mode"] == "drawn"
    trace = json.loads((tmp_path / "trace.json").read_text())
    threads = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    assert threads == {"device_compute", "disk_read"}
    assert sum(e.get("ph") == "X" for e in trace["traceEvents"]) == len(tl.events)
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_json_summary_against_the_stored_prediction(plan_file):
    r = run("simulate", plan_file, "--json", "--seed", 2)
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["mode"] == "drawn" and d["seed"] == 2 and d["prediction_source"] == "plan"
    for key in ("decode_tok_s", "e2e_tok_s", "ttft_s", "predicted_decode_tok_s", "utilisation", "bubble_s"):
        assert isinstance(d[key], (int, float, dict)), key
    assert d["tokens"] == 16 * 32 and 0 < d["decode_tok_s"] and d["e2e_tok_s"] < d["decode_tok_s"]
    assert d["bubbles"] and all("waiting_for" in b for b in d["bubbles"])


def test_expected_mode(plan_file):
    r = run("simulate", plan_file, "--expected", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["mode"] == "expected" and d["seed"] is None
    r = run("simulate", plan_file, "--expected", "--seed", 3)
    assert r.exit_code == 2 and "drop --seed" in r.output


def test_bad_input_is_one_line_and_exit_code_2(plan_file, tmp_path):
    r = run("simulate", tmp_path / "missing.json")
    assert r.exit_code == 2 and "no such file" in r.output and len(r.output.strip().splitlines()) == 1
    (tmp_path / "bad.json").write_text('{"schema_version": 1}')
    r = run("simulate", tmp_path / "bad.json")
    assert r.exit_code == 2 and "not a valid Plan" in r.output and len(r.output.strip().splitlines()) == 1
    r = run("simulate", plan_file, "-o", tmp_path)
    assert r.exit_code == 2 and "is a folder" in r.output
    r = run("simulate", plan_file, "--tokens", 0)
    assert r.exit_code == 2


def test_gantt_occupancy_is_the_busy_share_of_each_bin():
    spans = [(0.0, 1.0), (0.5, 1.5), (3.0, 3.5)]  # the first two overlap: counted once
    assert np.allclose(occupancy(spans, [0, 1, 2, 3, 4]), [1.0, 0.5, 0.0, 0.5])
    assert np.allclose(occupancy([], [0, 1]), [0.0])
