"""Fuzzing every reader and command with malformed input: never a traceback, never a file left half written.

Each reader gets random bytes, random text, random JSON and structured mutations of a valid file (a field dropped,
a type changed, a string for a number, nested garbage, NaN / Infinity literals, huge integers, truncation). Commands
run in process (click's CliRunner). The rule: exit 0 or 2; on 2, one line "Error: ..." and no traceback.
"""

from __future__ import annotations

import copy
import json
import signal
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specplan.cli import main
from specplan.errors import SpecplanError

HERE = Path(__file__).parent / "golden"
N = 1000  # examples per reader / command
FAST = settings(max_examples=N, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# ---- strategies ---------------------------------------------------------------------------------------------------

NUMBER_TEXT = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "-1", "0", "-0", "0.0", "1e309", "1e-320", "",
                     " ", "1,5", "0x10", "1_000", "١٢", "9" * 5000, str(2**64), str(-2**63), "1e30", "abc",
                     "--", "None", "true", "[]", "{}", "1 2", "\x00", "16\n", "2.5", "1", "4", "0.5", "24"]),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)

GARBAGE = st.one_of(
    st.just("16"), st.just(""), st.just("x" * 300), st.just(None), st.just(True), st.just(False), st.just([]),
    st.just({}), st.just(-1), st.just(0), st.just(10**30), st.just(2**63), st.just(-2**63), st.just(1.5),
    st.just(1e308), st.just(float("nan")), st.just(float("inf")), st.just([[[[[]]]]]), st.just({"a": {"b": [1]}}),
    st.integers(), st.floats(), st.text(max_size=20),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                 max_leaves=8),
)

JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20)


def _paths(doc, prefix=()):
    """Every path (tuple of keys / indices) into a JSON document."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:8]):
            yield from _paths(v, prefix + (i,))


def _mutate(doc, path, how, value):
    doc = copy.deepcopy(doc)
    if not path:
        return value
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    key = path[-1]
    if how == "drop":
        del parent[key]
    elif how == "extra" and isinstance(parent, dict):
        parent["unknown_field_x"] = value
    elif how == "string" and not isinstance(parent[key], (dict, list)):
        parent[key] = str(parent[key])
    else:
        parent[key] = value
    return doc


@st.composite
def mutated(draw, valid: dict, mutations: int = 3) -> bytes:
    """A valid document with 1..``mutations`` structured mutations, sometimes also broken as text."""
    doc = valid
    for _ in range(draw(st.integers(1, mutations))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths[1:] if len(paths) > 1 else paths))
        doc = _mutate(doc, path, draw(st.sampled_from(["drop", "extra", "string", "value", "value"])), draw(GARBAGE))
    text = json.dumps(doc, indent=1)  # NaN and Infinity come out as literals
    form = draw(st.integers(0, 9))
    raw = text.encode()
    if form == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif form == 1:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    elif form == 2:
        raw = raw.replace(b"1", b"1" * 400, 1)
    return raw


def raw_inputs(valid: dict) -> st.SearchStrategy[bytes]:
    return st.one_of(
        mutated(valid), mutated(valid), mutated(valid),
        st.binary(max_size=600),
        st.text(max_size=300).map(str.encode),
        JSON_VALUE.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"GGUF\x03\x00\x00\x00" + bytes(64), b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"[" * 100_000,
                         b"{\"a\": " * 50_000, b"1" * 5000, b"NaN", b"{}", b"[]", b"null", b"\x00" * 100]),
    )


# ---- checks -------------------------------------------------------------------------------------------------------


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang("took more than 20 s")


def invoke(args: list[str], out_dir: Path | None = None):
    """Run the CLI in process and check the rules; returns the result."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    try:
        result = CliRunner().invoke(main, args, catch_exceptions=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    exc = result.exception
    where = f"specplan {' '.join(a[:80] for a in args)}"
    assert exc is None or isinstance(exc, SystemExit), f"{where}: {type(exc).__name__}: {exc}\n{result.output}"
    assert result.exit_code in (0, 2), f"{where}: exit {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output, f"{where}\n{result.output}"
    if result.exit_code == 2:
        lines = [line for line in result.output.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("Error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], f"{where}: not a one-line error:\n{result.output}"
    if out_dir is not None:
        assert not list(out_dir.rglob("*.tmp*")), f"{where}: temporary files left: {list(out_dir.rglob('*.tmp*'))}"
    return result


def reader_ok(fn, *args) -> None:
    """A reader either returns or raises a one-line ``SpecplanError``."""
    try:
        fn(*args)
    except SpecplanError as e:
        assert "\n" not in str(e), f"multi-line error: {e}"
        assert str(e).strip()


# ---- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Valid files of every kind, and a scratch folder."""
    d = tmp_path_factory.mktemp("fuzz")
    plan = d / "plan.json"
    r = CliRunner().invoke(main, ["search", "--model", str(HERE / "demo-target.json"), "--vram", "1", "--profile",
                                  str(HERE / "cpu-profile.json"), "--draft", "none", "--gen-len", "2",
                                  "--num-prompts", "2", "--prompt-len", "4", "-o", str(plan)])
    assert r.exit_code == 0, r.output
    spec_plan = d / "spec-plan.json"
    r = CliRunner().invoke(main, ["search", "--model", str(HERE / "demo-target.json"), "--vram", "1", "--profile",
                                  str(HERE / "cpu-profile.json"), "--draft", "substitute:int8", "--acceptance", "0.7",
                                  "--gen-len", "2", "--num-prompts", "2", "--prompt-len", "4", "-o", str(spec_plan)])
    assert r.exit_code == 0, r.output
    calibration = {"schema_version": 1, "created_utc": "2024-01-01T00:00:00Z", "acceptance": [
        {"draft": "substitute:int8", "target": None, "acceptance": 0.8, "proposed_tokens": 100,
         "accepted_tokens": 80, "source": "measured"}]}
    return {
        "dir": d,
        "plan": json.loads(plan.read_text()),
        "spec_plan": json.loads(spec_plan.read_text()),
        "plan_file": plan,
        "profile": json.loads((HERE / "cpu-profile.json").read_text()),
        "calibration": calibration,
        "config": json.loads((HERE / "demo-target.json").read_text()),
    }


def _write(folder: Path, name: str, raw: bytes) -> Path:
    p = folder / name
    p.write_bytes(raw)
    return p


# ---- readers through the commands ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_fuzz_plan_files_simulate(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")

    @FAST
    @given(st.one_of(raw_inputs(files["plan"]), mutated(files["spec_plan"])))
    def check(raw):
        plan = _write(out, "fuzz.plan.json", raw)
        invoke(["simulate", str(plan), "--tokens", "2", "--prompts", "2", "-o", str(out / "tl.json")], out)

    check()


@pytest.mark.slow
def test_fuzz_plan_files_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")

    @settings(FAST, max_examples=N)
    @given(raw_inputs(files["plan"]))
    def check(raw):
        plan = _write(out, "fuzz.plan.json", raw)
        invoke(["run", str(plan), "-o", str(out / "res")], out)
        assert not (out / "res").exists() or not any((out / "res").iterdir())

    check()


@pytest.mark.slow
def test_fuzz_model_configs(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")

    @FAST
    @given(raw_inputs(files["config"]), st.booleans())
    def check(raw, as_folder):
        if as_folder:
            (out / "m").mkdir(exist_ok=True)
            path = _write(out / "m", "config.json", raw).parent
        else:
            path = _write(out, "config.json", raw)
        invoke(["models", str(path), "--json"])

    check()


@pytest.mark.slow
def test_fuzz_profiles(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("profiles")

    @FAST
    @given(raw_inputs(files["profile"]))
    def check(raw):
        invoke(["profile", "--show", str(_write(out, "fuzz-profile.json", raw))])

    check()


@pytest.fixture
def no_search(monkeypatch):
    """The search replaced by a stub: the command's reading and checking of its input run for real, fast."""
    import specplan.planner.search as search_module

    def stub(ask):
        raise SpecplanError("stub search reached")

    monkeypatch.setattr(search_module, "search", stub)


DEMO = ["search", "--model", str(HERE / "demo-target.json"), "--profile", str(HERE / "cpu-profile.json")]


@pytest.mark.slow
def test_fuzz_profiles_and_calibrations_in_search(files, tmp_path_factory, no_search):
    out = tmp_path_factory.mktemp("search")

    @FAST
    @given(raw_inputs(files["profile"]), raw_inputs(files["calibration"]), st.booleans())
    def check(profile_raw, calib_raw, good_profile):
        profile = HERE / "cpu-profile.json" if good_profile else _write(out, "p.json", profile_raw)
        calib = _write(out, "calibration.json", calib_raw)
        invoke(["search", "--model", str(HERE / "demo-target.json"), "--vram", "1", "--profile", str(profile),
                "--calibration", str(calib)])

    check()


@pytest.mark.slow
def test_fuzz_search_numbers(no_search):
    flags = ["--vram", "--ram", "--disk", "--gen-len", "--prompt-len", "--num-prompts", "--acceptance", "--top"]

    @FAST
    @given(st.dictionaries(st.sampled_from(flags), NUMBER_TEXT, min_size=1, max_size=4))
    def check(values):
        values.setdefault("--vram", "1")
        args = list(DEMO)
        for flag, v in values.items():
            args += [flag, v]
        invoke(args)

    check()


@pytest.mark.slow
def test_fuzz_search_for_real(files, tmp_path_factory):
    """Extreme values that pass the checks, through the real search: a plan or one line, and -o whole or absent."""
    out = tmp_path_factory.mktemp("search-real")
    num = st.sampled_from(["1", "2", "3", "1e-9", "0.001", "0.5", "1000", "1e6", "1e12", "123456789"])

    @settings(FAST, max_examples=60)
    @given(num, st.one_of(st.none(), num), st.one_of(st.none(), num), st.sampled_from(["1", "7", "4096", "100000", "16777216"]),
           st.sampled_from(["1", "3", "65536", "16777216"]), st.sampled_from(["1", "2", "1000", "65536"]),
           st.sampled_from([[], ["--draft", "none"], ["--draft", "substitute:int4", "--acceptance", "0"],
                            ["--draft", "substitute:int8", "--acceptance", "1"]]))
    def check(vram, ram, disk, prompt_len, gen_len, num_prompts, draft):
        args = list(DEMO) + ["--vram", vram, "--prompt-len", prompt_len, "--gen-len", gen_len,
                             "--num-prompts", num_prompts, "-o", str(out / "best.json"), *draft]
        for flag, v in (("--ram", ram), ("--disk", disk)):
            if v is not None:
                args += [flag, v]
        (out / "best.json").unlink(missing_ok=True)
        r = invoke(args, out)
        if r.exit_code == 0:
            json.loads((out / "best.json").read_text())
        else:
            assert not (out / "best.json").exists()

    check()


@pytest.mark.slow
def test_fuzz_simulate_and_run_numbers(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("numbers")
    plan = str(files["plan_file"])

    @FAST
    @given(st.sampled_from(["simulate", "run"]), st.dictionaries(
        st.sampled_from(["--tokens", "--prompts", "--seed", "--kv-step", "--max-new-tokens", "--num-prompts"]),
        NUMBER_TEXT, min_size=1, max_size=3))
    def check(cmd, values):
        args = [cmd, plan]
        for flag, v in values.items():
            if cmd == "simulate" and flag in ("--max-new-tokens", "--num-prompts"):
                continue
            if cmd == "run" and flag in ("--tokens", "--prompts", "--seed", "--kv-step"):
                continue
            if cmd == "simulate" and flag in ("--tokens", "--prompts") and _big(v):
                continue  # a valid but enormous workload is a long simulation, not an error
            args += [flag, v]
        invoke(args + (["-o", str(out / "res")] if cmd == "run" else []), out)

    check()


def _big(text: str) -> bool:
    try:
        return float(text) > 64
    except ValueError:
        return False


# ---- readers called directly --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fuzz_prompt_files(tmp_path_factory, files):
    from specplan.validation.runs import read_prompts

    out = tmp_path_factory.mktemp("prompts")
    line = st.one_of(st.text(max_size=40), JSON_VALUE.map(json.dumps),
                     st.builds(lambda v: json.dumps({"prompt": v}), GARBAGE))
    text_file = st.lists(line, max_size=6).map(lambda ls: "\n".join(ls).encode())

    @FAST
    @given(st.one_of(text_file, text_file, st.binary(max_size=400), st.sampled_from(
        [b"GGUF" + bytes(40), b"\xff\xfe", b"{\"prompt\": " * 10_000, b"{\"prompt\": 1" + b"0" * 5000 + b"}"])),
        st.sampled_from(["prompts.txt", "prompts.jsonl"]))
    def check(raw, name):
        reader_ok(read_prompts, _write(out, name, raw))

    check()
    # and through `run` (the prompts are read before the model folder is opened)
    for raw in (b"\xff\xfe\x00", b"", b"{\"prompt\": 1}", b"GGUF\x03" + bytes(20)):
        invoke(["run", str(files["plan_file"]), "--prompts", str(_write(out, "p.txt", raw)), "-o", str(out / "r")])


def _safetensors(header, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.mark.slow
def test_fuzz_safetensors_headers(tmp_path_factory):
    from specplan.engine.model.checkpoint import read_safetensors_header

    out = tmp_path_factory.mktemp("st")
    valid = {"__metadata__": {"format": "pt"},
             "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
             "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}

    @st.composite
    def files_(draw):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            return draw(st.binary(max_size=200))
        if kind == 1:  # a length that lies
            return _safetensors(valid, bytes(32), draw(st.sampled_from([0, 1, 2**63, 2**64 - 1, 10**8, 10**9, 7])))
        if kind == 2:  # a header that is not UTF-8 / not JSON
            return _safetensors(draw(st.binary(max_size=100)), bytes(draw(st.integers(0, 64))))
        if kind == 3:  # truncated data
            return _safetensors(valid, bytes(draw(st.integers(0, 31))))
        raw = draw(mutated(valid))
        return _safetensors(raw, bytes(draw(st.sampled_from([0, 32, 64]))))

    @FAST
    @given(files_())
    def check(raw):
        reader_ok(read_safetensors_header, _write(out, "model.safetensors", raw))

    check()


@pytest.mark.slow
def test_fuzz_contract_loaders(files, tmp_path_factory):
    """Every contract loader on mutated files: a contract or one line naming the file."""
    from specplan.contracts.calibration import Calibration
    from specplan.contracts.hardware import HardwareProfile
    from specplan.contracts.plan import Plan
    from specplan.jsonio import load

    out = tmp_path_factory.mktemp("contracts")
    kinds = {"plan": Plan, "profile": HardwareProfile, "calibration": Calibration}

    @FAST
    @given(st.sampled_from(sorted(kinds)).flatmap(lambda k: st.tuples(st.just(k), raw_inputs(files[k]))))
    def check(case):
        kind, raw = case
        path = _write(out, f"{kind}.json", raw)
        try:
            load(kinds[kind], path)
        except SpecplanError as e:
            assert "\n" not in str(e) and str(path) in str(e), str(e)

    check()


# ---- strictness, by example ---------------------------------------------------------------------------------------


def test_a_string_for_a_number_is_refused(files, tmp_path):
    doc = copy.deepcopy(files["plan"])
    doc["policy"]["decode_batch"] = str(doc["policy"]["decode_batch"])
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    r = invoke(["simulate", str(path)])
    assert r.exit_code == 2
    assert str(path) in r.output and "policy.decode_batch" in r.output and "valid integer" in r.output


def test_strict_files_still_take_lists_for_tuples_and_ints_for_floats(files, tmp_path):
    from specplan.contracts.plan import Plan
    from specplan.jsonio import load

    doc = copy.deepcopy(files["plan"])
    assert isinstance(doc["model"]["spec"]["moe_layers"], list)  # a tuple field, written as a JSON array
    doc["model"]["spec"]["rope_theta"] = 10000  # a float field given an integer
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    plan = load(Plan, path)
    assert plan.model.spec.rope_theta == 10000.0 and isinstance(plan.model.spec.moe_layers, tuple)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinity_are_refused(files, tmp_path, literal):
    text = json.dumps(files["plan"]).replace('"decode_batch": ', f'"decode_batch": {literal}, "x": ', 1)
    path = tmp_path / "plan.json"
    path.write_text(text)
    r = invoke(["simulate", str(path)])
    assert r.exit_code == 2 and str(path) in r.output


@pytest.mark.parametrize("cmd", [["models"], ["search", "--vram", "1", "--model"], ["simulate"], ["run"],
                                 ["profile", "--show"]])
def test_a_gguf_where_json_is_expected_is_one_line(tmp_path, cmd):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4)
    r = invoke([*cmd, str(gguf)])
    assert r.exit_code == 2 and "model.gguf" in r.output


def test_a_config_with_a_string_for_a_number_names_the_field(files, tmp_path):
    cfg = dict(files["config"], num_hidden_layers="30")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = invoke(["models", str(tmp_path / "config.json")])
    assert r.exit_code == 2 and "num_hidden_layers" in r.output and "whole number" in r.output

