"""Benchmark: wall time of `specplan search` for Mixtral-8x22B on a 24 GiB RTX 4090 (PCIe 4), process start
included, against the 1 s goal (FlexGen's own LP search takes 2-11 s).

    python bench/bench_search.py [-n 7] [--profile rtx4090-pcie4]

Runs the command as a subprocess N times (after one warm-up run that fills the OS file cache and Python's
bytecode cache), prints each wall time and CPU time (user + system of the child), the medians and the ratio to the
goal. Timings on a shared machine are noisy: read the medians, and the CPU time when other work competes for the
cores. The subprocess runs with Python's default bytecode caching even if PYTHONDONTWRITEBYTECODE is set here
(an installed package has its .pyc files; recompiling every module on every start is not the command's cost).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

GOAL_S = 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=7, help="timed runs [7]")
    ap.add_argument("--profile", default="rtx4090-pcie4")
    ap.add_argument("--model", default="mixtral-8x22b")
    ap.add_argument("--vram", default="24")
    args = ap.parse_args()
    exe = shutil.which("specplan")
    cmd = [exe] if exe else [sys.executable, "-m", "specplan"]
    cmd += ["search", "--model", args.model, "--vram", args.vram, "--profile", args.profile]
    print("command:", " ".join(cmd[-7:]) if exe is None else " ".join(["specplan", *cmd[1:]]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if first.returncode != 0:
        print(first.stdout, first.stderr)
        return 1
    print("\n".join(line for line in first.stdout.splitlines() if line.startswith(("best:", "searched"))))
    times, cpus = [], []
    for i in range(args.n):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True, env=env)
        times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        print(f"run {i + 1}: {times[-1]:.3f} s wall, {cpus[-1]:.3f} s CPU")
    med, cpu = statistics.median(times), statistics.median(cpus)
    load = os.getloadavg()[0]
    print(f"median {med:.3f} s wall (min {min(times):.3f}, max {max(times):.3f}), {cpu:.3f} s CPU, over {args.n} "
          f"runs; load average {load:.1f} on {os.cpu_count()} cores")
    print(f"goal {GOAL_S:.1f} s wall: {med / GOAL_S:.2f}x of the goal -> {'met' if med <= GOAL_S else 'NOT met'}"
          f" (CPU time {cpu / GOAL_S:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
