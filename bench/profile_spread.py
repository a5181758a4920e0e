"""The spread of key figures over several measured profiles of one machine (e.g. three `specplan profile --quick`).

    python bench/profile_spread.py A.json B.json C.json

Per figure: each profile's value, the median, and the spread max / min. The figures are the ones the planner leans
on: O_DIRECT and buffered disk reads at 4 and 64 MiB, fp32 matmul at decode (m=1, 16) and prefill (m=512) rows on a
4096x4096 weight (or the nearest measured shape), memory bandwidth, decode attention over a 16 MiB KV cache, and the
per-layer overhead.
"""

from __future__ import annotations

import statistics
import sys

from specplan.catalog import load_profile

MiB = 1 << 20


def figures(p) -> dict[str, tuple[float, str]]:
    out: dict[str, tuple[float, str]] = {}
    for name in ("disk_read_direct", "disk_read_buffered"):
        link = p.link(name)
        if link is not None:
            for size in (4 * MiB, 64 * MiB):
                out[f"{name} {size // MiB} MiB"] = (size / link.time_s(size), "B/s")
    for m in (1, 16, 512):
        out[f"fp32 matmul m={m} 4096x4096"] = (p.device.matmul_flops("float32", m, 4096, 4096), "FLOP/s")
    out["memory bandwidth"] = (p.device.memory_bandwidth_Bps.median, "B/s")
    out["decode attention 16 MiB KV"] = (p.host.decode_attention_Bps.at(16 * MiB), "B/s")
    out["per-layer overhead"] = (p.overheads.per_layer_s, "s")
    return out


def main(paths: list[str]) -> int:
    if len(paths) < 2:
        print("usage: python bench/profile_spread.py PROFILE.json PROFILE.json [...]", file=sys.stderr)
        return 2
    profiles = [load_profile(path) for path in paths]
    table = [figures(p) for p in profiles]
    print(f"{len(profiles)} profiles: " + ", ".join(f"{p.name} ({p.provenance.created_utc})" for p in profiles))
    print(f"{'figure':<40} " + " ".join(f"{'run ' + str(i + 1):>10}" for i in range(len(profiles)))
          + f" {'median':>10} {'max/min':>8}")
    for key in table[0]:
        if not all(key in t for t in table):
            continue
        vals = [t[key][0] for t in table]
        unit = table[0][key][1]
        scale, shown = (1e-6, "us") if unit == "s" else (1e9, "G" + unit)
        fmt = (lambda v: f"{v / scale:>10.1f}") if unit == "s" else (lambda v: f"{v / scale:>10.2f}")
        print(f"{key + ' [' + shown + ']':<40} " + " ".join(fmt(v) for v in vals)
              + f" {fmt(statistics.median(vals))} {max(vals) / min(vals):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
