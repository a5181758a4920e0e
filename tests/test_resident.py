"""A run's peak resident set stays within the plan's bytes plus the measured headroom (issue 14).

``specplan run`` runs in a subprocess on a small model (~150 MiB of float32 weights, all resident in RAM) whose
profile carries this machine's measured ``process_resident_bytes`` (``engine.measure.resident``). The child's peak
RSS is read twice: by the run itself (result.json, ``VmHWM``) and by its parent (``getrusage(RUSAGE_CHILDREN)
.ru_maxrss``, in a small watcher process). Both must stay within the
plan's RAM bytes + the process headroom. Where a cgroup v1 memory controller is writable (root in a container), the
child also runs under a memory limit of exactly that sum, plus the page cache its reads bring in (file pages count
against a v1 limit), and must not be killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_fixtures import cpu_profile, make_plan

from specplan.contracts.plan import Placement
from specplan.engine.measure.resident import measure_process_resident
from specplan.engine.model.checkpoint import open_checkpoint
from specplan.jsonio import load, write_json

CGROUP = Path("/sys/fs/cgroup/memory")
#: runs the command and prints its peak RSS from getrusage(RUSAGE_CHILDREN): from a small process, because a child
#: spawned (vfork + exec) from a large one inherits the parent's high-water mark in ru_maxrss.
WATCHER = ("import resource, subprocess, sys\n"
           "rc = subprocess.run(sys.argv[1:]).returncode\n"
           "print('child maxrss bytes', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
           "file=sys.stderr)\n"
           "sys.exit(rc)")


def _cgroup(limit_bytes: int) -> Path | None:
    """A fresh cgroup v1 memory group limited to ``limit_bytes``, or None where that is not possible here."""
    if not (CGROUP / "cgroup.procs").exists() or not os.access(CGROUP, os.W_OK):
        return None
    group = CGROUP / f"specplan-test-{os.getpid()}"
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
    except OSError:
        _remove(group)
        return None
    return group


def _remove(group: Path) -> None:
    try:
        group.rmdir()
    except OSError:
        pass


def test_a_runs_peak_rss_stays_within_the_plan_bytes_plus_the_measured_headroom(tiny_model, tmp_path):
    folder = tiny_model("llama", hidden_size=768, intermediate_size=3072, num_hidden_layers=4,
                        num_attention_heads=12, num_key_value_heads=4, head_dim=64)
    spec = open_checkpoint(folder).spec
    resident, note = measure_process_resident("cpu")
    prof = cpu_profile()
    prof = prof.model_copy(update={"overheads": prof.overheads.model_copy(
        update={"process_resident_bytes": resident})})
    plan = make_plan(spec, Placement.uniform(spec, "device"), path=str(folder), device_bytes=1 << 30, prompt_len=64,
                     gen_len=8, num_prompts=4, decode_batch=4, prefill_batch=4)
    plan = plan.model_copy(update={"profile": prof, "capacities": plan.capacities.model_copy(
        update={"headroom": None})})  # the run falls back to the profile's measured figure
    path = write_json(tmp_path / "plan.json", plan)
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "specplan", "run", str(path), "-o", str(out)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", WATCHER, *cmd], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((out / "result.json").read_text())["resident"]
    child_peak = int(done.stderr.strip().splitlines()[-1].removeprefix("child maxrss bytes "))
    assert res["plan_ram_bytes"] > 100 << 20  # a plan whose own bytes matter, not only the process's
    assert res["headroom_process_bytes"] == resident and res["headroom_source"].startswith("measured")
    limit = res["limit_bytes"]
    assert limit == res["plan_ram_bytes"] + resident
    print(f"peak RSS {res['peak_rss_bytes'] >> 20} MiB (getrusage of the child: {child_peak >> 20} MiB), plan "
          f"{res['plan_ram_bytes'] >> 20} MiB + headroom {resident >> 20} MiB = {limit >> 20} MiB; {note}")
    assert res["peak_rss_bytes"] <= limit and res["within_limit"]
    assert child_peak <= limit
    assert "process peak RSS" in done.stdout and "within the plan's RAM bytes" in done.stdout

    # a second run under a cgroup limit of the same bytes (the limit is known from the first run's budget check)
    group = _cgroup(limit + plan_file_bytes(folder))
    if group is None:
        return
    try:
        limited = subprocess.run(cmd[:-1] + [str(tmp_path / "limited")], capture_output=True, text=True, timeout=300,
                                 env=env, preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        killed = limited.returncode in (-signal.SIGKILL, 137)
        assert not killed, f"the run was killed under a {limit >> 20} MiB cgroup limit"
        assert limited.returncode == 0, limited.stderr[-2000:]
    finally:
        _remove(group)


def plan_file_bytes(folder: Path) -> int:
    """The checkpoint's file bytes: what reading it may bring into the page cache, charged to a v1 memory cgroup."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
