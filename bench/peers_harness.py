"""The harness of ``bench/peers.py``: one memory limit for every contender (a cgroup v1 memory group, the page cache
charged to it), a cold page cache before each run, one fresh process per run, peak memory, medians and spreads,
ratios, and the token-by-token comparison of greedy outputs. Pure parts take their paths as arguments (tested on
fakes in ``tests/test_peers.py``); nothing here imports torch.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from specplan.errors import SpecplanError

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
#: how the limit is applied, printed and stored with the results
METHOD = ("cgroup v1 memory controller: each run's process in one group with memory.limit_in_bytes (and "
          "memory.memsw.limit_in_bytes where present) = the limit; the page cache its reads bring in is charged to the "
          "group, so the limit binds file-backed (mmap) and anonymous memory alike; `sync; echo 3 > "
          "/proc/sys/vm/drop_caches` before every run (cold cache)")


def make_group(limit_bytes: int, root: Path = CGROUP_ROOT, name: str | None = None) -> Path:
    """A fresh memory group under ``root`` limited to ``limit_bytes`` (swap included where the kernel accounts it);
    a SpecplanError in one line where the controller is missing or not writable."""
    if not (root / "cgroup.procs").exists() or not (root / "memory.limit_in_bytes").exists():
        raise SpecplanError(f"{root}: no cgroup v1 memory controller mounted there; the benchmark needs one to bind "
                            f"every contender by the same memory limit (mount it, or run where it is)")
    if not os.access(root, os.W_OK):
        raise SpecplanError(f"{root}: the cgroup v1 memory controller is not writable by this user; run the "
                            f"benchmark as root (it creates a child group and writes its limit)")
    group = root / (name or f"specplan-peers-{os.getpid()}")
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        if (root / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
    except OSError as e:
        remove_group(group)
        raise SpecplanError(f"{group}: cannot create the memory group or write its limit ({e.strerror})") from None
    return group


def remove_group(group: Path) -> None:
    try:
        group.rmdir()
    except OSError:
        pass


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def oom_kills(group: Path) -> int | None:
    """The group's OOM kills so far (``memory.oom_control``'s oom_kill; None where the kernel does not say)."""
    try:
        for line in (group / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def drop_caches(path: Path = DROP_CACHES) -> bool:
    """``sync; echo 3 > drop_caches``; False where this user may not (the output then says the cache was warm)."""
    os.sync()
    try:
        path.write_text("3\n")
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Run:
    """One process of one contender: how it ended and what the harness measured around it."""
    status: str  # ok | oom-killed | timeout | failed
    returncode: int
    wall_s: float  # the whole process, start to exit: interpreter, imports, load, prefill, decode
    group_peak_bytes: int | None  # memory.max_usage_in_bytes: the group's peak, page cache included
    cold_cache: bool
    log: Path


def run_in_group(cmd: list[str], group: Path, log: Path, timeout_s: float, env: dict | None = None) -> Run:
    """``cmd`` in a fresh process inside ``group`` after a cold-cache drop, its output to ``log``."""
    cold = drop_caches()
    (group / "memory.max_usage_in_bytes").write_text("0")
    kills = oom_kills(group)
    log.parent.mkdir(parents=True, exist_ok=True)
    join = lambda: (group / "cgroup.procs").write_text(str(os.getpid()))  # noqa: E731 (runs in the child)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=join, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, status = proc.wait(), "timeout"
    wall = time.perf_counter() - t0
    after = oom_kills(group)
    if status == "failed" and (after > kills if after is not None and kills is not None
                               else rc in (-signal.SIGKILL, 137)):  # a kernel that does not count: a SIGKILL
        status = "oom-killed"
    return Run(status, rc, wall, read_int(group / "memory.max_usage_in_bytes"), cold, log)


def spread(values: list[float]) -> dict[str, float] | None:
    """Median, min and max (None for no values)."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio_of_medians(a: dict | None, b: dict | None) -> float | None:
    """``a``'s median over ``b``'s (None where either is missing or ``b``'s is 0)."""
    if a is None or b is None or not b["median"]:
        return None
    return a["median"] / b["median"]


def compare_tokens(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Greedy outputs token for token: how many sequences are identical, and for the others the first position
    where they part (the sequences in the same order, the same prompts). A sequence that came back shorter (a
    contender that sent fewer tokens than asked) is compared over its own length."""
    if len(reference) != len(other):
        return {"identical_seqs": 0, "seqs": max(len(reference), len(other)), "first_divergence": None,
                "note": f"{len(other)} sequences against {len(reference)}"}
    same, first = 0, None
    for r, o in zip(reference, other):
        n = min(len(r), len(o))
        if r[:n] == o[:n]:
            same += 1
            continue
        at = next(i for i, (x, y) in enumerate(zip(r, o)) if x != y)
        first = at if first is None else min(first, at)
    return {"identical_seqs": same, "seqs": len(reference), "first_divergence": first}


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def fmt_spread(s: dict | None, spec: str = ".2f") -> str:
    """``median (min..max)``, or ``-``."""
    if s is None:
        return "-"
    return f"{s['median']:{spec}} ({s['min']:{spec}}..{s['max']:{spec}})"


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain text table: ``columns`` are (key, heading); cells are strings already."""
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in columns]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line([h for _, h in columns]), line(["-" * w for w in widths]),
                      *(line([r[k] for k, _ in columns]) for r in rows)])
