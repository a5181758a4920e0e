"""Check a measured hardware profile against independent tools: ``dd iflag=direct`` and a plain torch matmul.

    python bench/profile_check.py                       # the newest measured profile of this machine
    python bench/profile_check.py --profile mine.json
    python bench/profile_check.py --measure -o mine.json  # run `specplan profile --quick` first

Prints, for the O_DIRECT disk read at 64 and 256 MiB and fp32 matmul at decode (m=1) and prefill (m=512, 2048)
shapes, the profile's figure, the independent figure and their ratio; exits 1 if a ratio is outside [1/2, 2].
Two comparisons: the stored profile against dd / torch now (the disk of a VM changes speed from minute to minute),
and the profiler's own measuring functions alternated with dd / torch over a few rounds (same moment, medians).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from specplan.catalog import load_profile
from specplan.engine.io import directio
from specplan.engine.measure import compute as pc
from specplan.engine.measure import links as pl
from specplan.engine.measure.links import write_random_file
from specplan.engine.measure.timing import Ticker
from specplan.jsonio import write_json

MiB = 1 << 20
DD_FILE_BYTES = 1 << 30
BLOCKS = (64 * MiB, 256 * MiB)
RUNS = 5
ROUNDS = 3


def dd_read_Bps(path: Path, block: int) -> float:
    """Bandwidth of ``dd iflag=direct`` reading the whole file in ``block``-byte reads (the page cache dropped)."""
    directio.drop_file_cache(path)
    out = subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={block}", "iflag=direct"], capture_output=True,
                         text=True, check=True).stderr
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    if not m:
        raise RuntimeError(f"cannot parse dd output: {out!r}")
    return int(m.group(1)) / float(m.group(2))


def torch_matmul_flops(m: int, k: int, n: int) -> float:
    """A plain ``a @ w`` timing: median of RUNS timings of a few back-to-back calls."""
    a, w = torch.randn(m, k), torch.randn(k, n)
    a @ w
    calls = max(1, int(0.1 / max(1e-6, _time(lambda: a @ w, 1))))
    return 2 * m * k * n / statistics.median(_time(lambda: a @ w, calls) for _ in range(RUNS))


def _time(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def dd_rounds(folder: Path) -> dict[int, float]:
    """Median ``dd iflag=direct`` bandwidth per block size over RUNS reads of a fresh 1 GiB random file."""
    path = folder / "specplan-profile-check.bin"
    write_random_file(path, DD_FILE_BYTES)
    try:
        return {b: statistics.median(dd_read_Bps(path, b) for _ in range(RUNS)) for b in BLOCKS}
    finally:
        os.unlink(path)


def same_moment(folder: Path | None, shapes) -> list[tuple[str, float, float, str]]:
    """The profiler's disk and matmul measurements (its own functions, quick settings) alternated with dd and plain
    torch timings; medians over ROUNDS rounds."""
    ours: dict[str, list[float]] = {}
    ref: dict[str, list[float]] = {}
    ws = 128 * MiB
    for _ in range(ROUNDS):
        if folder is not None:
            links, _ = pl.measure_disk(folder, BLOCKS, 3, DD_FILE_BYTES, Ticker(0))
            dd = dd_rounds(folder)
            for b in BLOCKS:
                key = f"disk O_DIRECT read {b // MiB} MiB"
                ours.setdefault(key, []).append(b / links["disk_read_direct"].time_s(b))
                ref.setdefault(key, []).append(dd[b])
        for (k, n), rows in _by_weight(shapes).items():
            curve = pc.matmul_curves(((k, n),), rows, ["float32"], "cpu", 3, 0.02, ws, Ticker(0))[0]
            for m in rows:
                key = f"fp32 matmul m={m} {k}x{n}"
                ours.setdefault(key, []).append(curve.flops.at(m))
                ref.setdefault(key, []).append(torch_matmul_flops(m, k, n))
    return [(key, statistics.median(ours[key]), statistics.median(ref[key]), "dd" if key.startswith("disk") else "torch")
            for key in ours]


def _by_weight(shapes) -> dict[tuple[int, int], tuple[int, ...]]:
    out: dict[tuple[int, int], tuple[int, ...]] = {}
    for m, k, n in shapes:
        out[(k, n)] = out.get((k, n), ()) + (m,)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", help="profile file or name [default: the newest measured profile]")
    ap.add_argument("--measure", action="store_true", help="measure a quick profile first (written to -o)")
    ap.add_argument("-o", "--output", default="mine.json", help="where --measure writes the profile")
    ap.add_argument("--offload-dir", help="folder of the dd test file [default: the profile's disk folder]")
    args = ap.parse_args()

    if args.measure:
        from specplan.engine.measure.profiler import ProfileConfig, measure_profile

        t0 = time.perf_counter()
        prof = measure_profile(ProfileConfig.quick(command="bench/profile_check.py --measure"))
        write_json(args.output, prof)
        print(f"measured a quick profile in {time.perf_counter() - t0:.0f} s -> {args.output}")
        args.profile = args.output
    prof = load_profile(args.profile)
    print(f"profile {prof.name} ({prof.provenance.created_utc})")

    rows = []
    direct = prof.link("disk_read_direct")
    folder = Path(args.offload_dir or prof.disk.path or ".")
    shapes = ((1, 4096, 4096), (512, 4096, 4096), (2048, 4096, 4096))
    if direct is None:
        print("the profile has no O_DIRECT read figures (O_DIRECT unsupported where it was measured): disk skipped")
    else:
        dd = dd_rounds(folder)
        for block in BLOCKS:
            rows.append((f"disk O_DIRECT read {block // MiB} MiB", block / direct.time_s(block), dd[block], "dd"))
    plain = {s: torch_matmul_flops(*s) for s in shapes}
    for s in shapes:
        rows.append((f"fp32 matmul m={s[0]} {s[1]}x{s[2]}", prof.device.matmul_flops("float32", *s), plain[s], "torch"))

    # The disk of a VM changes speed from one minute to the next: measure the profiler's own functions alternately
    # with the independent tools, so both see the same machine.
    print(f"alternating the profiler's measurements with dd / torch, {ROUNDS} rounds ...")
    same = same_moment(folder if direct is not None else None, shapes)
    rows += [(f"{label} (same moment)", ours, ref, how) for label, ours, ref, how in same]

    bad = 0
    print(f"{'figure':<50} {'profile':>15} {'independent':>15} {'ratio':>6}")
    for label, ours, ref, how in rows:
        ratio = ours / ref
        ok = 0.5 <= ratio <= 2
        bad += not ok
        unit = "B/s" if label.startswith("disk") else "FLOP/s"
        print(f"{label:<50} {ours / 1e9:>8.2f} G{unit:<6} {ref / 1e9:>8.2f} G{unit:<6} {ratio:>6.2f}"
              f"  ({'dd iflag=direct' if how == 'dd' else 'torch a @ w'}){'' if ok else '  OUTSIDE 2x'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
