"""Figures of measured numbers: a hardware profile's link bandwidth, matmul rates and roofline (``specplan profile
--show FILE --png OUT.png``). matplotlib is imported inside the functions, so importing this module costs nothing."""

from __future__ import annotations

import io
from pathlib import Path

from specplan.jsonio import write_atomic


def plot_profile(p, path: Path) -> Path:
    """Three panels: link bandwidth over transfer size, matmul FLOP/s over rows, roofline (FLOP/s over FLOP/byte)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from specplan.contracts.model import dtype_bytes

    fig, (ax_l, ax_m, ax_r) = plt.subplots(1, 3, figsize=(17, 5.2))
    sizes = np.geomspace(4 << 10, 1 << 30, 60)
    for name, link in p.links.items():
        line, = ax_l.plot(sizes, [s / link.time_s(s) for s in sizes], label=name)
        xs = [pt.x for pt in link.bandwidth_Bps.points]
        ax_l.plot(xs, [x / link.time_s(x) for x in xs], "o", ms=3, color=line.get_color())
    ax_l.set(xscale="log", yscale="log", xlabel="transfer size (bytes)", ylabel="bandwidth (B/s)",
             title="links: size / time_s(size)")

    units = [("device", p.device)] + ([] if p.host == p.device else [("host", p.host)])
    for label, u in units:
        for c in u.matmul:
            tag = f"{label} {c.dtype} {c.k}x{c.n}"
            xs = [pt.x for pt in c.flops.points]
            ys = [pt.y.median for pt in c.flops.points]
            ax_m.plot(xs, ys, "o-", ms=3, label=tag)
            b = dtype_bytes(c.dtype)
            intensity = [2 * m * c.k * c.n / (b * (m * c.k + c.k * c.n + m * c.n)) for m in xs]
            ax_r.plot(intensity, ys, "o-", ms=3, label=tag)
        ai = np.geomspace(0.1, 1e4, 50)
        bw = u.memory_bandwidth_Bps.median
        ax_r.plot(ai, bw * ai, "k--", lw=1, label=f"{label} memory {bw / 1e9:.0f} GB/s x intensity")
        for d in u.dtypes:
            ax_r.axhline(u.peak_matmul_flops(d), ls=":", lw=1, color="gray")
    ax_m.set(xscale="log", yscale="log", xlabel="rows m", ylabel="achieved FLOP/s", title="matmul (F.linear)")
    top = max(u.peak_matmul_flops(d) for _, u in units for d in u.dtypes)
    ax_r.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte)", ylabel="achieved FLOP/s",
             title="roofline (dotted: measured peaks)", ylim=(top / 1e4, top * 2))
    for ax in (ax_l, ax_m, ax_r):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{p.name} ({p.provenance.kind} {p.provenance.created_utc})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())
