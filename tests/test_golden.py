"""Golden plans: the search's best plan and its prediction for bundled model x profile pairs stay identical
across refactors. The expected files were written by ``python tests/test_golden.py --write`` before the change
they guard; regenerate them only for a change that is meant to alter plans, and say so in the commit."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from specplan.cli import main as cli

HERE = Path(__file__).parent / "golden"
CASES = {
    "mixtral-8x7b-pcie3": ["--model", "mixtral-8x7b", "--vram", "24", "--profile", "rtx4090-pcie3"],
    "mixtral-8x7b-pcie4": ["--model", "mixtral-8x7b", "--vram", "24", "--profile", "rtx4090-pcie4"],
    "mixtral-8x22b-pcie3": ["--model", "mixtral-8x22b", "--vram", "24", "--profile", "rtx4090-pcie3"],
    "mixtral-8x22b-pcie4": ["--model", "mixtral-8x22b", "--vram", "24", "--profile", "rtx4090-pcie4"],
    "mixtral-8x7b-rtx3090-12": ["--model", "mixtral-8x7b", "--vram", "12", "--profile", "rtx3090",
                                "--num-prompts", "8", "--gen-len", "64"],
    "demo-cpu": ["--model", str(HERE / "demo-target.json"), "--vram", "1", "--profile", str(HERE / "cpu-profile.json"),
                 "--draft", "none", "--draft", "substitute:int4", "--draft", "smollm2-135m", "--acceptance", "0.9",
                 "--prompt-len", "64", "--gen-len", "32", "--num-prompts", "16"],
    "demo-cpu-2gib": ["--model", str(HERE / "demo-target.json"), "--vram", "2", "--profile",
                      str(HERE / "cpu-profile.json"), "--draft", "none", "--draft", "smollm2-135m",
                      "--acceptance", "0.8", "--prompt-len", "32", "--gen-len", "16", "--num-prompts", "64"],
}
VOLATILE = ("created_utc", "command")


def best_plan(args: list[str], tmp: Path) -> dict:
    out = tmp / "plan.json"
    res = CliRunner().invoke(cli, ["search", *args, "-o", str(out)])
    assert res.exit_code == 0, res.output
    plan = json.loads(out.read_text())
    for k in VOLATILE:
        plan.pop(k, None)
    plan["model"].pop("name", None)  # the demo target's name is its config path
    return plan


def assert_same(got, want, path: str = "") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: length differs"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), \
            f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_best_plan_unchanged(case: str, tmp_path: Path) -> None:
    want = json.loads((HERE / f"{case}.plan.json").read_text())
    assert_same(best_plan(CASES[case], tmp_path), want)


SIMULATED = ("demo-cpu", "mixtral-8x22b-pcie4", "mixtral-8x7b-pcie3")


def simulated_meta(case: str, tmp: Path) -> dict:
    plan = tmp / "plan.json"
    doc = json.loads((HERE / f"{case}.plan.json").read_text())
    doc["created_utc"] = "2026-01-01T00:00:00Z"
    doc["model"]["name"] = case
    plan.write_text(json.dumps(doc))
    out = tmp / "timeline.json"
    res = CliRunner().invoke(cli, ["simulate", str(plan), "--seed", "0", "-o", str(out)])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())["meta"]


@pytest.mark.parametrize("case", SIMULATED)
def test_simulation_unchanged(case: str, tmp_path: Path) -> None:
    want = json.loads((HERE / f"{case}.timeline-meta.json").read_text())
    assert_same(simulated_meta(case, tmp_path), want)


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    for case, args in CASES.items():
        with tempfile.TemporaryDirectory() as d:
            (HERE / f"{case}.plan.json").write_text(json.dumps(best_plan(args, Path(d)), indent=1) + "\n")
            print("wrote", case)
    for case in SIMULATED:
        with tempfile.TemporaryDirectory() as d:
            meta = simulated_meta(case, Path(d))
            (HERE / f"{case}.timeline-meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            print("wrote", case, "simulation")
