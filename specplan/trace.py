"""Writing a Timeline: the contract JSON, a Chrome/Perfetto trace, and a Gantt PNG (one row per resource)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from specplan.contracts.timeline import Timeline
from specplan.jsonio import write_atomic, write_json

#: batch index -> colour (tab10); events without a batch are grey.
_BATCH_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def write_timeline(timeline: Timeline, path: str | Path) -> Path:
    return write_json(path, timeline)


def write_chrome_trace(timeline: Timeline, path: str | Path) -> Path:
    """A file chrome://tracing and ui.perfetto.dev open."""
    return write_atomic(path, json.dumps(timeline.to_chrome_trace()) + "\n")


def occupancy(spans: list[tuple[float, float]], edges) -> "np.ndarray":
    """Busy fraction of each bin ``[edges[i], edges[i+1])`` covered by the (start, end) spans (overlaps counted once)."""
    import numpy as np

    merged: list[list[float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    edges = np.asarray(edges, dtype=float)
    if not merged:
        return np.zeros(len(edges) - 1)
    starts, ends = np.array(merged).T
    done = np.concatenate(([0.0], np.cumsum(ends - starts)))
    k = np.searchsorted(starts, edges, side="right")  # spans started before each edge
    busy = done[k] - np.where(k > 0, np.clip(ends[k - 1] - edges, 0, None), 0.0)  # busy time before each edge
    return np.diff(busy) / np.diff(edges)


def write_gantt_png(timeline: Timeline, path: str | Path, title: str | None = None, max_events: int = 200_000) -> Path:
    """One row per resource, coloured by batch; atomically written PNG.

    Each row is drawn per pixel column: a bar whose height is the share of that column's time the resource was busy
    (stacked by batch), so a long run of short ops reads as its true utilisation and a short timeline as plain bars.
    """
    import numpy as np
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    resources = timeline.resources()
    fig_h = 1.0 + 0.45 * max(1, len(resources))
    fig, ax = plt.subplots(figsize=(12, fig_h))
    events = timeline.events[:max_events]
    t0 = min((e.start_s for e in events), default=0.0)
    t1 = max((e.end_s for e in events), default=0.0)
    edges = np.linspace(0.0, max(t1 - t0, 1e-12), 12 * 110 + 1)  # about one bin per pixel of the saved width
    for row, r in enumerate(resources):
        bars: dict[str, list[tuple[float, float]]] = {}
        for e in events:
            if e.resource != r:
                continue
            colour = "#999999" if e.batch is None else _BATCH_COLOURS[e.batch % len(_BATCH_COLOURS)]
            bars.setdefault(colour, []).append((e.start_s - t0, e.end_s - t0))
        stacked = np.zeros(len(edges) - 1)
        for colour, spans in sorted(bars.items()):
            frac = np.minimum(occupancy(spans, edges), 1.0 - stacked)
            low, high = row + 0.4 - 0.8 * stacked, row + 0.4 - 0.8 * (stacked + frac)
            ax.fill_between(edges, np.append(low, low[-1]), np.append(high, high[-1]), step="post", color=colour,
                            linewidth=0)
            stacked += frac
    ax.set_yticks(range(len(resources)))
    ax.set_yticklabels(resources)
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    batches = sorted({e.batch for e in events if e.batch is not None})
    if batches:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=_BATCH_COLOURS[b % len(_BATCH_COLOURS)], label=f"batch {b}") for b in batches],
                  loc="upper right", fontsize="small")
    ax.set_title(title or f"{timeline.source} timeline")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())
