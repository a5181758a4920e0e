"""The harness of ``bench/peers.py`` (issue 15) on fakes and tiny models: medians and spreads, ratios, the token by
token comparison, the memory group (made on a fake controller tree, refused in one line where none is mounted, and
where a real one is writable: a run inside it measured, and a run over its limit reported as killed), and the
transformers + accelerate contender's child on a tiny model with most of it offloaded to disk, against transformers'
own greedy decoding of the model held in memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from engine_fixtures import hf_greedy

from specplan.errors import SpecplanError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402
import peers_harness as h  # noqa: E402


def test_spread_and_the_ratio_of_medians():
    assert h.spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0}
    assert h.spread([]) is None
    assert h.ratio_of_medians(h.spread([4.0, 6.0, 5.0]), h.spread([2.0, 3.0, 1.0])) == 2.5
    assert h.ratio_of_medians(h.spread([4.0]), None) is None
    assert h.ratio_of_medians(h.spread([4.0]), h.spread([0.0])) is None


def test_tokens_compared_sequence_by_sequence_with_the_first_divergence():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    assert h.compare_tokens(ref, [list(r) for r in ref]) == {"identical_seqs": 3, "seqs": 3, "first_divergence": None}
    got = h.compare_tokens(ref, [[1, 2, 3, 4], [5, 6, 0, 8], [9, 0, 9, 9]])
    assert got == {"identical_seqs": 1, "seqs": 3, "first_divergence": 1}
    assert h.compare_tokens(ref, [[1, 2, 3], *ref[1:]])["identical_seqs"] == 3  # shorter: over its own length
    assert h.compare_tokens(ref, [[1, 2, 0], *ref[1:]])["first_divergence"] == 2
    assert h.compare_tokens(ref, ref[:2])["identical_seqs"] == 0


def test_the_group_is_made_on_a_controller_tree_and_refused_in_one_line_without_one(tmp_path):
    with pytest.raises(SpecplanError, match="no cgroup v1 memory controller") as e:
        h.make_group(1 << 30, root=tmp_path)
    assert "\n" not in str(e.value)
    for f in ("cgroup.procs", "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
        (tmp_path / f).write_text("0\n")
    group = h.make_group(123 << 20, root=tmp_path, name="g")
    assert group == tmp_path / "g"
    assert h.read_int(group / "memory.limit_in_bytes") == h.read_int(group / "memory.memsw.limit_in_bytes") == 123 << 20
    (group / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert h.oom_kills(group) == 2 and h.oom_kills(tmp_path) is None


def test_the_planners_regret_is_the_fastest_specplan_plan_over_its_choice():
    from types import SimpleNamespace

    def gen(x):
        return {"gen_tok_s": {"median": x}}

    plans = {"specplan-best": SimpleNamespace(policy=SimpleNamespace(draft_len=6, num_batches=1, decode_batch=8))}
    s = {"accelerate": gen(50.0), "specplan-nodraft": gen(26.2), "specplan-draft": gen(16.9), "specplan-best": gen(16.9)}
    (line,) = peers.regret_lines(s, plans)
    assert "draft length 6, 1 x 8" in line and "specplan-nodraft 26.20" in line and line.endswith("regret 1.55")
    s["specplan-nodraft"] = gen(10.0)  # the choice was the fastest: regret 1, whatever accelerate ran at
    assert peers.regret_lines(s, plans)[0].endswith("regret 1.00")
    assert peers.regret_lines({"specplan-best": gen(16.9)}, plans) == []  # nothing to compare it with


def test_an_unknown_contender_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "peers.py"), "--contenders", "accelerate,vllm"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --contenders: unknown vllm; use some of accelerate, assisted, "
                                                "llamacpp-f32, llamacpp-bf16, llamacpp-bf16-draft, specplan-nodraft, "
                                                "specplan-draft, specplan-best"]


@pytest.fixture
def group():
    try:
        g = h.make_group(200 << 20, name=f"specplan-test-peers-{id(object())}")
    except SpecplanError as e:
        pytest.skip(str(e))
    yield g
    h.remove_group(g)


def test_a_run_in_the_group_is_measured_and_only_one_over_its_limit_is_reported_oom_killed(group, tmp_path):
    ok = h.run_in_group([sys.executable, "-c", "b = bytearray(50 << 20)"], group, tmp_path / "ok.log", 60)
    assert ok.status == "ok" and ok.returncode == 0 and ok.wall_s > 0
    assert ok.group_peak_bytes is not None and ok.group_peak_bytes >= 50 << 20
    over = h.run_in_group([sys.executable, "-c", "b = bytearray(400 << 20)"], group, tmp_path / "over.log", 60)
    assert over.status == "oom-killed" and over.returncode != 0
    shot = h.run_in_group([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], group,
                          tmp_path / "shot.log", 60)
    assert shot.status == "failed"  # killed, but not by the group's OOM killer
    slow = h.run_in_group([sys.executable, "-c", "import time; time.sleep(30)"], group, tmp_path / "slow.log", 1)
    assert slow.status == "timeout"


def test_the_accelerate_child_offloads_to_disk_and_gives_transformers_greedy_tokens(tiny_model, tmp_path):
    folder = tiny_model("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    prompts = [[5, 17, 33, 2, 9, 41], [7, 7, 8, 100, 3, 12]]
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(prompts))
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "bench" / "peers_hf.py"), "--model", str(folder), "--ids", str(ids),
           "--tokens", "6", "--dtype", "float32", "--max-memory-bytes", str(3 << 20), "--offload-folder",
           str(tmp_path / "offload"), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(out.read_text())
    assert "disk" in res["device_map"]  # the limit put some of the model on disk
    assert res["generated_tokens"] == 12 and res["decode_tokens"] == 10 and res["batch"] == 2
    assert 0 < res["ttft_s"] <= res["gen_s"] and res["decode_tok_s"] > 0 and res["peak_rss_bytes"] > 0
    assert res["token_ids"] == [hf_greedy(folder, p, 6) for p in prompts]


def test_llama_cpp_set_up_without_the_sdist_or_a_build_is_one_line(tmp_path, monkeypatch):
    """The set-up downloads the sdist when it is missing; when that brings nothing (no registry here), one line."""
    import peers_llamacpp

    asked = []
    monkeypatch.setattr(peers_llamacpp, "step", lambda cmd, what, env=None: asked.append(cmd))
    with pytest.raises(SpecplanError, match="no llama-cpp-python sdist there") as e:
        peers_llamacpp.setup(tmp_path / "missing.tar.gz", tmp_path / "cache", [(tmp_path / "model", "bf16")])
    assert "\n" not in str(e.value)
    assert asked and asked[0][1:4] == ["-m", "pip", "download"] and str(tmp_path) in asked[0]
