"""What a schedule says: throughput (decode-only and end-to-end), time to first token, per-resource busy time and
utilisation, the idle gaps ("bubbles") of the bottleneck resource, and the ``Timeline`` contract.

Phases: wave w starts when wave w - 1's last token is out (0 for the first); its prefill ends with its last prefill
pass; its decode ends with its last token. prefill_s and decode_s sum these over the waves, and add up to total_s.
Decode-only throughput = tokens of the decode rounds / decode_s; end-to-end = every generated token (the first one
of each sequence comes from prefill) / total_s. No token past gen_len is ever committed (see script.py).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from specplan.contracts.timeline import RESOURCES, Timeline
from specplan.simulator.core import Schedule


@dataclass(frozen=True)
class Bubble:
    """An idle gap of a resource: when, what ran before, what ran after and what that op was waiting for."""

    start_s: float
    end_s: float
    before: str | None
    after: str | None
    waiting_for: str | None

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Summary:
    ttft_s: float
    prefill_s: float
    decode_s: float
    total_s: float
    tokens: float  # every generated token, all sequences
    decode_tokens: float  # tokens of the decode rounds
    decode_tok_s: float
    e2e_tok_s: float
    rounds: int  # decode rounds of the first wave (the longest batch)
    steady_round_s: float | None  # median period of batch 0's rounds in the middle half of the first wave
    steady_decode_tok_s: float | None  # tokens per second over that middle half, all batches
    busy_s: dict[str, float]
    utilisation: dict[str, float]  # busy / total_s
    decode_utilisation: dict[str, float]  # busy within the decode windows / decode_s
    bottleneck: str  # the busiest resource during decode
    bubbles: list[Bubble] = field(default_factory=list)  # the bottleneck's idle gaps during decode, longest first
    bubble_count: int = 0
    bubble_s: float = 0.0
    bubble_causes: dict[str, float] = field(default_factory=dict)  # idle seconds by what the next op waited for

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "bubbles"}
        out["bubbles"] = [dict(b.__dict__, duration_s=b.duration_s) for b in self.bubbles]
        return out


def phase_windows(s: Schedule) -> list[tuple[float, float, float]]:
    """Per wave: (start, end of prefill, end of decode)."""
    waves: dict[int, dict[str, float]] = {}
    for i, st in enumerate(s.stages):
        w = waves.setdefault(st.info.get("wave", 0), {"prefill": 0.0, "decode": 0.0})
        if st.info.get("kind") == "prefill":
            w["prefill"] = max(w["prefill"], s.tail_end_s(i))
        else:
            w["decode"] = max(w["decode"], s.token_end_s(i))
    out, start = [], 0.0
    for w in sorted(waves):
        pre = waves[w]["prefill"]
        dec = max(waves[w]["decode"], pre)
        out.append((start, pre, dec))
        start = dec
    return out


@dataclass(frozen=True)
class Lane:
    """The ops one physical resource ran, by start time (a resource serves one op at a time)."""

    ops: np.ndarray  # global op indices
    start_s: np.ndarray
    end_s: np.ndarray

    def busy_s(self, windows: list[tuple[float, float]]) -> float:
        """Busy time inside the windows."""
        return float(sum((np.minimum(self.end_s, hi) - np.maximum(self.start_s, lo)).clip(min=0).sum()
                         for lo, hi in windows))


def lanes(s: Schedule) -> dict[str, Lane]:
    start, end, res = np.asarray(s.start_s), np.asarray(s.end_s), np.asarray(s.resource)
    out = {}
    for r in np.unique(res[res >= 0]):
        idx = np.flatnonzero(res == r)
        idx = idx[np.argsort(start[idx], kind="stable")]
        out[RESOURCES[r]] = Lane(idx, start[idx], end[idx])
    return out


def _op_name(s: Schedule, g: int) -> str:
    st = s.stage_of(g)
    info = s.stages[st].info
    tag = f"{info['kind']} b{info.get('batch', 0)}" + (f" r{info['round']}" if "round" in info else "")
    return f"{s.stages[st].template.ops[g - s.base[st]].name} ({tag})"


def _waited_for(s: Schedule, g: int) -> int | str:
    """What op g was waiting for when it started: its last dependency (global index), else why it could not
    start earlier ("staging slot pool:index" or "its turn on the resource")."""
    deps = s.deps_of(g)
    last = max(deps, key=lambda d: s.end_s[d], default=None)
    if last is not None and s.end_s[last] >= s.start_s[g] - 1e-12:
        return last
    st = s.stage_of(g)
    op = s.stages[st].template.ops[g - s.base[st]]
    return f"staging slot {op.slot[0]}:{op.slot[1]}" if op.slot else "its turn on the resource"


def _reason(s: Schedule, g: int) -> str:
    w = _waited_for(s, g)
    return _op_name(s, w) if isinstance(w, int) else w


def _cause(s: Schedule, g: int) -> str:
    """The kind of thing op g waited for, layer and expert numbers folded: 'L*.attention', 'staging slot ...'."""
    w = _waited_for(s, g)
    if not isinstance(w, int):
        return re.sub(r":\d+$", "", w)
    st = s.stage_of(w)
    return re.sub(r"\d+", "*", s.stages[st].template.ops[w - s.base[st]].name)


def causes(s: Schedule, found: list[tuple[float, float, int, int]]) -> dict[str, float]:
    """Idle seconds by what the op after each gap waited for, largest first ('end of decode' for a trailing gap)."""
    out: dict[str, float] = {}
    for a, b, _, after in found:
        key = _cause(s, after) if after >= 0 else "end of decode"
        out[key] = out.get(key, 0.0) + (b - a)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def gaps(lane: Lane, windows: list[tuple[float, float]], eps: float = 1e-12) -> list[tuple[float, float, int, int]]:
    """Idle gaps of one resource inside the windows: (start, end, op before or -1, op after or -1)."""
    out = []
    for lo, hi in windows:
        sel = np.flatnonzero((lane.end_s > lo) & (lane.start_s < hi))
        if not len(sel):
            out.append((lo, hi, -1, -1))
            continue
        a = np.maximum(lane.start_s[sel], lo)
        b = np.maximum.accumulate(np.minimum(lane.end_s[sel], hi))
        prev = np.concatenate(([lo], b[:-1]))
        ops = lane.ops[sel]
        for k in np.flatnonzero(a > prev + eps):
            out.append((float(prev[k]), float(a[k]), int(ops[k - 1]) if k else -1, int(ops[k])))
        if hi > b[-1] + eps:
            out.append((float(b[-1]), hi, int(ops[-1]), -1))
    return out


def bubbles(s: Schedule, found: list[tuple[float, float, int, int]], top: int) -> list[Bubble]:
    """The ``top`` longest gaps, with what ran around them and what the next op waited for."""
    longest = sorted(found, key=lambda x: x[0] - x[1])[:top]
    return [Bubble(a, b, _op_name(s, before) if before >= 0 else None, _op_name(s, after) if after >= 0 else None,
                   _reason(s, after) if after >= 0 else None) for a, b, before, after in longest]


def summarise(s: Schedule, top_bubbles: int = 5) -> Summary:
    windows = phase_windows(s)
    total = windows[-1][2] if windows else 0.0
    prefill_s = sum(p - a for a, p, _ in windows)
    decode_s = sum(d - p for _, p, d in windows)
    decode_windows = [(p, d) for _, p, d in windows if d > p]
    tokens = sum(st.info.get("tokens", 0.0) for st in s.stages)
    decode_tokens = sum(st.info.get("tokens", 0.0) for st in s.stages if st.info.get("kind") != "prefill")
    first = next((i for i, st in enumerate(s.stages) if st.info.get("kind") == "prefill"), None)
    ttft = s.token_end_s(first) if first is not None else 0.0

    lane = lanes(s)
    busy = {r: v.busy_s([(0.0, total)]) for r, v in lane.items()}
    dbusy = {r: v.busy_s(decode_windows) for r, v in lane.items()}
    bottleneck = max(sorted(dbusy), key=lambda r: dbusy[r]) if dbusy and decode_s > 0 else (
        max(sorted(busy), key=lambda r: busy[r]) if busy else "none")
    idle = gaps(lane[bottleneck], decode_windows or [(0.0, total)]) if bottleneck in lane else []
    steady = _steady(s)
    return Summary(
        ttft_s=ttft, prefill_s=prefill_s, decode_s=decode_s, total_s=total, tokens=tokens,
        decode_tokens=decode_tokens,
        decode_tok_s=decode_tokens / decode_s if decode_s > 0 else 0.0,
        e2e_tok_s=tokens / total if total > 0 else 0.0,
        rounds=1 + max((st.info.get("round", -1) for st in s.stages if st.info.get("wave") == 0), default=-1),
        steady_round_s=steady[0], steady_decode_tok_s=steady[1],
        busy_s=busy,
        utilisation={r: b / total if total > 0 else 0.0 for r, b in busy.items()},
        decode_utilisation={r: b / decode_s if decode_s > 0 else 0.0 for r, b in dbusy.items()},
        bottleneck=bottleneck, bubbles=bubbles(s, idle, top_bubbles), bubble_count=len(idle),
        bubble_s=sum(b - a for a, b, _, _ in idle), bubble_causes=causes(s, idle),
    )


def _steady(s: Schedule) -> tuple[float | None, float | None]:
    """Batch 0's round period and the decode rate of all batches over the middle half of the first wave."""
    rounds = [i for i, st in enumerate(s.stages)
              if st.info.get("wave") == 0 and st.info.get("kind") in ("decode", "verify")]
    times = sorted(s.token_end_s(i) for i in rounds if s.stages[i].info.get("batch") == 0)
    m = len(times) - 1
    if m < 2:
        return None, None
    q = m // 4
    lo, hi = times[q], times[m - q]
    periods = [b - a for a, b in zip(times[q:m - q], times[q + 1:m - q + 1])]
    tokens = sum(s.stages[i].info["tokens"] for i in rounds if lo < s.token_end_s(i) <= hi)
    return statistics.median(periods), tokens / (hi - lo) if hi > lo else None


def to_timeline(s: Schedule, meta: dict[str, Any] | None = None) -> Timeline:
    """Every op that happened as an event on its physical resource, named as the planner names it, with batch,
    layer, bytes and FLOPs (an op run for its expected time carries its expected bytes and FLOPs)."""
    events = []
    for si, st in enumerate(s.stages):
        t = st.template
        g0 = s.base[si]
        for i, op in enumerate(t.ops):
            g = g0 + i
            r = s.resource[g]
            if r < 0:
                continue
            scale = op.prob if st.happens is None or t.draw[i] < 0 else 1.0
            events.append({"resource": RESOURCES[r], "name": op.name, "start_s": s.start_s[g], "end_s": s.end_s[g],
                           "batch": op.batch, "layer": op.layer, "bytes": int(round(op.bytes * scale)),
                           "flops": op.flops * scale})
    events.sort(key=lambda e: (e["start_s"], e["end_s"]))
    return Timeline.model_validate({"source": "simulated", "meta": meta or {}, "events": events})
