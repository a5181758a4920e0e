"""The command line: only working commands, one-line errors, the models command's numbers."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from specplan import __version__
from specplan.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_version_and_help_list_only_working_commands():
    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.output
    r = run("--help")
    assert r.exit_code == 0
    listed = [line.split()[0] for line in r.output.split("Commands:")[1].strip().splitlines() if line.strip()]
    assert "models" in listed
    for name in listed:  # every listed command has working help
        sub = run(name, "--help")
        assert sub.exit_code == 0, (name, sub.output)


def test_models_list_and_one():
    r = run("models")
    assert r.exit_code == 0 and "mixtral-8x22b" in r.output and "qwen3-30b-a3b" in r.output
    r = run("models", "mixtral-8x22b")
    assert r.exit_code == 0
    assert "140.62B total" in r.output and "39.15B active" in r.output
    assert "224.00 KiB per token" in r.output and "576.00 MiB" in r.output


def test_models_json_is_numbers_with_units_in_keys():
    r = run("models", "mixtral-8x22b", "--json", "--dtype", "int4")
    d = json.loads(r.output)
    assert d["total_params"] == 140_620_634_112
    assert d["weight_bytes"] == d["total_params"] // 2
    assert d["kv_bytes_per_token"] == 229_376  # the KV cache keeps the checkpoint's dtype unless --kv-dtype
    d = json.loads(run("models", "mixtral-8x22b", "--json", "--kv-dtype", "float32").output)
    assert d["kv_bytes_per_token"] == 2 * 229_376
    assert isinstance(d["flops_per_token"], int)


def test_bad_inputs_give_one_line_and_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["models", "no-such-model"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "unknown model" in r.output
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "mixtral"}')
    r = CliRunner().invoke(main, ["models", str(bad)])
    assert r.exit_code == 2 and r.output.strip().startswith("Error:") and "missing 'hidden_size'" in r.output
    assert "Traceback" not in r.output


def test_console_script_runs_without_torch():
    code = "import sys; from specplan.cli import main; sys.argv=['specplan','models','mixtral-8x7b']\n" \
           "try:\n    main()\nexcept SystemExit: pass\nassert 'torch' not in sys.modules, 'models imported torch'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
