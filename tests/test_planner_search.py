"""The search end to end: monotone in memory, link speed and acceptance; deterministic; clear answers for asks
that cannot fit; the CLI writes a valid Plan; no torch import."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from planner_fixtures import GiB, cpu_profile
from specplan.catalog import load_model_spec, load_profile
from specplan.cli import main
from specplan.contracts import Capacities, Plan, Workload
from specplan.errors import InfeasibleError, SpecplanError
from specplan.jsonio import load, write_json
from specplan.planner.drafts import choices
from specplan.planner.explain import binding_resource, faster
from specplan.planner.memory import overflow
from specplan.planner.search import Ask, search

WL = Workload(prompt_len=256, gen_len=32, num_prompts=64)


def ask_for(model="olmoe-1b-7b", profile=None, vram=4.0, drafts=("none", "substitute:int4"), acceptance=None,
            workload=WL, ram=None):
    spec = load_model_spec(model) if isinstance(model, str) else model
    prof = profile or cpu_profile()
    caps = Capacities(device_bytes=int(vram * GiB), host_bytes=int(ram * GiB) if ram else None)
    return Ask(spec=spec, model_name=spec.name, profile=prof, capacities=caps, workload=workload,
               drafts=tuple(choices(list(drafts), spec, spec.name, acceptance, None)), top=3)


def best(ask) -> float:
    return search(ask).plans[0].prediction.e2e_tok_s


def test_plans_fit_and_say_what_they_assume():
    result = search(ask_for(acceptance=None, vram=10, drafts=("substitute:int4", "none")))
    assert result.plans and result.lps > 0
    totals = [p.prediction.total_s for p in result.plans]
    assert totals == sorted(totals)
    for plan in result.plans:
        assert not overflow(plan)  # rounded to whole tensors and still within the budgets
        Plan.model_validate(plan.model_dump())
        if plan.policy.speculative:
            assert any("assumption" in a and "substitute:int4" in a for a in plan.prediction.assumptions)
    spec = search(ask_for(acceptance=None, vram=10, drafts=("substitute:int4",))).plans[0]
    assert spec.policy.speculative and spec.prediction.acceptance == 0.9
    assert any("prior (assumption, not measured)" in a for a in spec.prediction.assumptions)


@pytest.mark.parametrize("case", ["cpu", "gpu"])
def test_more_memory_never_predicts_less(case):
    if case == "cpu":
        asks = [ask_for(vram=v) for v in (4.0, 6.0, 10.0, 16.0, 23.0)]
    else:
        asks = [ask_for("mixtral-8x7b", load_profile("rtx4090-pcie4"), vram=v, drafts=("none", "mistral-7b"),
                        ram=64) for v in (12.0, 16.0, 24.0, 40.0)]
    values = [best(a) for a in asks]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(values, values[1:])), values
    assert values[-1] > values[0]


def test_a_faster_resource_never_predicts_less():
    """Speeding up the resource that binds the best plan (or any other) never lowers the predicted throughput."""
    for model, prof, drafts in (("olmoe-1b-7b", cpu_profile(), ("none", "substitute:int4")),
                                ("mixtral-8x7b", load_profile("t4"), ("none", "mistral-7b"))):
        vram = 10 if prof.shared_memory else 15
        base = search(ask_for(model, prof, vram=vram, drafts=drafts, ram=64)).plans[0]
        for resource in (binding_resource(base), "h2d", "device_compute"):
            values = [best(ask_for(model, faster(prof, resource, f), vram=vram, drafts=drafts, ram=64))
                      for f in (1.0, 1.5, 3.0)]
            assert all(b >= a * (1 - 1e-9) for a, b in zip(values, values[1:])), (model, resource, values)
            if resource == binding_resource(base):
                assert values[-1] > values[0] * 1.05, (model, resource, values)


def test_higher_acceptance_never_predicts_less():
    values = [best(ask_for(drafts=("substitute:int8",), acceptance=a, vram=12)) for a in (0.3, 0.6, 0.8, 0.95)]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(values, values[1:])), values


def test_search_is_deterministic():
    a = search(ask_for()).plans
    b = search(ask_for()).plans
    strip = lambda p: p.model_dump(exclude={"created_utc"})  # noqa: E731
    assert [strip(p) for p in a] == [strip(p) for p in b]


def test_infeasible_asks_say_what_does_not_fit():
    with pytest.raises(InfeasibleError) as e:
        search(ask_for("mixtral-8x22b", load_profile("rtx4090-pcie4"), vram=0.2, drafts=("none",)))
    msg = str(e.value)
    assert "staging buffers for 2 layer fetch(es)" in msg and "short by" in msg and "--vram" in msg
    with pytest.raises(InfeasibleError) as e:  # a draft model that cannot be resident next to one layer's buffers
        search(ask_for("qwen3-30b-a3b", vram=1.0, drafts=("qwen2.5-0.5b",)))
    assert "draft" in str(e.value) and "short by" in str(e.value)


def test_substitute_memory_is_the_quantised_streamed_weights():
    result = search(ask_for(drafts=("substitute:int4",), acceptance=0.9, vram=10))
    plan = result.plans[0]
    spec = plan.model.spec
    from specplan.planner.memory import tier_bytes

    t = tier_bytes(plan)["decode"]
    streamed = sum(v for item, v in t["disk"].items())
    # int4 of fp32 matrices in groups of 64 with a float32 scale and zero point each: 5 bits a weight, not 32;
    # the streamed q/k norms are copied at full size
    pl = plan.placement
    vectors = sum(w.nbytes("float32") for w in spec.tensors.tensors
                  if len(w.shape) == 1 and w.group == "attention" and pl.layers[w.layer].attention == "disk")
    assert vectors > 0
    assert t["device"]["substitute"] == pytest.approx((streamed - vectors) * 5 / 32 + vectors, rel=1e-6)
    assert spec.is_moe


def run_cli(*args):
    return CliRunner().invoke(main, ["search", *args])


def test_cli_table_and_plan_file(tmp_path):
    prof = tmp_path / "cpu.json"
    write_json(prof, cpu_profile())
    out = tmp_path / "plan.json"
    r = run_cli("--model", "olmoe-1b-7b", "--vram", "10", "--profile", str(prof), "--prompt-len", "256", "--gen-len",
                "32", "--num-prompts", "64", "--draft", "substitute:int4", "-o", str(out), "--top", "3")
    assert r.exit_code == 0, r.output
    assert "e2e tok/s" in r.output and "decode tok/s" in r.output and "end-to-end" in r.output
    assert "assumes acceptance 0.9 for substitute:int4: prior (assumption, not measured)" in r.output
    plan = load(Plan, out)
    assert plan.prediction is not None and plan.prediction.e2e_tok_s > 0
    assert plan.search and plan.search["lp_objective_s"] > 0
    assert plan.command and plan.command.startswith("specplan search")


def test_cli_calibration_and_explain(tmp_path):
    prof = tmp_path / "cpu.json"
    write_json(prof, cpu_profile())
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"created_utc": "2026-01-01T00:00:00Z", "acceptance": [
        {"draft": "substitute:int8", "acceptance": 0.97, "source": "measured by hand for this test"}]}))
    r = run_cli("--model", "olmoe-1b-7b", "--vram", "12", "--profile", str(prof), "--gen-len", "32", "--num-prompts",
                "32", "--draft", "substitute:int8", "--calibration", str(calib), "--explain")
    assert r.exit_code == 0, r.output
    assert "a=0.97" in r.output and "calibration: measured by hand" in r.output
    assert "Why this plan" in r.output and "one more GiB of device memory" in r.output and "twice as fast" in r.output


@pytest.mark.parametrize("args,needle", [
    (["--model", "no-such-model", "--vram", "4"], "unknown model"),
    (["--model", "olmoe-1b-7b", "--vram", "4"], "specplan profile --quick"),  # no measured profile here
    (["--model", "olmoe-1b-7b", "--vram", "4", "--profile", "t4", "--draft", "substitute:int2"], "substitute:int8"),
    (["--model", "olmoe-1b-7b", "--vram", "4", "--profile", "t4", "--draft", "substitute:int4:g0"],
     "group size of 64, 32, 128, 256, not 0"),
    (["--model", "olmoe-1b-7b", "--vram", "4", "--profile", "t4", "--draft", "substitute:int8:hqq:hqq"], ":hqq"),
    (["--model", "olmoe-1b-7b", "--vram", "4", "--profile", "t4", "--draft", "mistral-7b"], "vocabulary"),
    (["--model", "mixtral-8x22b", "--vram", "0.2", "--profile", "rtx4090-pcie4"], "short by"),
    (["--model", "mixtral-8x7b", "--vram", "1000", "--profile", "rtx4090-pcie4"], "exceeds the device's memory"),
    (["--model", "mixtral-8x7b", "--vram", "24", "--ram", "512", "--profile", "rtx4090-pcie4"],
     "exceeds the host's memory"),
    (["--model", "mixtrl-8x22b", "--vram", "4"], "did you mean mixtral-8x22b"),
    (["--model", "mixtral-8x7b", "--vram", "4", "--profile", "rtx4090-pcie5"], "did you mean rtx4090-pcie4"),
])
def test_cli_bad_input_is_one_line(args, needle):
    r = run_cli(*args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error:") and r.output.count("\n") == 1 and needle in r.output
    assert "Traceback" not in r.output


def test_search_does_not_import_torch(tmp_path):
    code = ("import sys; from specplan.cli import main\n"
            "sys.argv = ['specplan', 'search', '--model', 'mixtral-8x7b', '--vram', '16', '--profile', 't4']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "assert 'torch' not in sys.modules, 'search imported torch'\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_the_headline_command_on_a_small_cpu_machine_suggests_the_bundled_gpu_profiles():
    from specplan.catalog import bundled_profiles, user_profiles_dir

    write_json(user_profiles_dir() / "this-machine.json", cpu_profile())  # a measured 24 GiB CPU machine
    r = run_cli("--model", "mixtral-8x22b", "--vram", "24")
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "exceeds this machine's memory" in r.output and "--profile rtx4090-pcie4" in r.output
    assert all(name in r.output for name in bundled_profiles()) and "specplan profile --show" in r.output


def test_a_substitute_with_its_group_size_and_quantiser(tmp_path):
    """``--draft substitute:int4:g128:hqq``: the plan keeps both; a larger group stores fewer scales."""
    from specplan.planner.program import costing_of

    prof = write_json(tmp_path / "cpu.json", cpu_profile())
    bytes_at = {}
    for draft in ("substitute:int4", "substitute:int4:g128:hqq"):
        out = tmp_path / f"{draft.replace(':', '-')}.json"
        r = run_cli("--model", "olmoe-1b-7b", "--vram", "10", "--profile", str(prof), "--draft", draft,
                    "--acceptance", "0.9", "-o", str(out))
        assert r.exit_code == 0, r.output
        plan = load(Plan, out)
        assert plan.draft.label == draft and plan.policy.speculative
        bytes_at[draft] = costing_of(plan).quantised("expert")
    assert load(Plan, tmp_path / "substitute-int4-g128-hqq.json").draft.quantiser == "hqq"
    assert bytes_at["substitute:int4:g128:hqq"] < bytes_at["substitute:int4"]


def test_substitutes_need_the_low_bit_rates_of_a_cpu_profile():
    """A CPU profile without int4 rates (the profiler leaves out low-bit kernels far slower than float32) cannot time
    a substitute:int4 draft: the default drafts leave it out, asked for by name it is a one-line error."""
    spec, prof = load_model_spec("olmoe-1b-7b"), cpu_profile(lowbit=False)
    labels = [c.label for c in choices(None, spec, spec.name, None, None, profile=prof)]
    assert "none" in labels and not [x for x in labels if x.startswith("substitute")]
    with pytest.raises(SpecplanError, match=r"--draft substitute:int4: the profile has no int4 matmul rates"):
        choices(["none", "substitute:int4"], spec, spec.name, None, None, profile=prof)
    # with the rates measured they are searched; published GPU profiles keep their substitutes
    assert "substitute:int4" in [c.label for c in choices(None, spec, spec.name, None, None, profile=cpu_profile())]
    gpu = load_profile("rtx4090-pcie4")
    assert "substitute:int8" in [c.label for c in choices(None, spec, spec.name, None, None, profile=gpu)]
