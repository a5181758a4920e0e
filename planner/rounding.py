"""From the LP's continuous unit fractions to whole units: branch on the single units a relaxation splits, round
the counts (every way of rounding the split ones up or down), then move single units while that helps.

Whole-unit points are scored by ``PlacementLP.evaluate`` and ``PlacementLP.overflow_gib`` (the rounded-up staging
share of each layer), so a point kept here is one the LP's rows accept.
"""

from __future__ import annotations

import itertools

import numpy as np

from specplan.planner.lp import LPResult, PlacementLP


def integerise(lp: PlacementLP, relaxed: LPResult) -> LPResult | None:
    """The best whole-unit placement found from ``relaxed`` (a relaxation of ``lp``); None if none fits."""
    best: LPResult | None = None
    single = [u for u, cnt in lp.counts.items() if cnt == 1]
    split = [u for u in single if max(relaxed.x[i] for i, o in enumerate(lp.options) if o[0] == u) < 1 - 1e-6]
    choices = [[i for i, o in enumerate(lp.options) if o[0] == u] for u in split]
    for pick in itertools.product(*choices):
        sol = relaxed
        if pick:
            upper = lp.upper()
            for u, chosen in zip(split, pick):
                for i, o in enumerate(lp.options):
                    if o[0] == u and i != chosen:
                        upper[i] = 0.0
            sol = lp.relax(upper)  # type: ignore[assignment]
            if sol is None:
                continue
        x = round_point(lp, sol.x)
        if x is None:
            continue
        obj, T, Tpf, _ = lp.evaluate(x)
        if best is None or obj[0] < best.objective_s:
            best = lp.result(x, obj[0], T[0], Tpf[0])
    return best


def round_point(lp: PlacementLP, x: np.ndarray) -> np.ndarray | None:
    """Best whole-unit point among the roundings of ``x``, then single-unit moves: first out of any memory
    overflow, then while they lower the objective. None if no point fits."""
    floor = np.floor(x + 1e-9)
    frac = x - floor
    per_unit = []
    for u, cnt in lp.counts.items():
        mine = [i for i, o in enumerate(lp.options) if o[0] == u]
        idx = sorted((i for i in mine if frac[i] > 1e-9), key=lambda i: -frac[i])
        need = int(round(cnt - floor[mine].sum()))
        idx = idx[: max(need + 2, 4)]
        per_unit.append(list(itertools.combinations(idx, need))[:16] if need else [()])
    points = []
    for combo in itertools.product(*per_unit):
        p = floor.copy()
        for up in combo:
            p[list(up)] += 1
        points.append(p)
        if len(points) >= 256:
            break
    X = np.array(points)
    obj = lp.evaluate(X)[0]
    score = obj * (1 + 1e6 * lp.overflow_gib(X))
    best = improve(lp, X[int(np.argmin(score))])
    return best if lp.overflow_gib(best)[0] <= 1e-9 else None


def improve(lp: PlacementLP, x: np.ndarray, rounds: int = 60) -> np.ndarray:
    """Move one unit between two options of the same kind while the best such move lowers the memory overflow,
    then the objective."""
    pairs = [(i, j) for i, a in enumerate(lp.options) for j, b in enumerate(lp.options) if i != j and a[0] == b[0]]
    if not pairs:
        return x
    src = np.array([i for i, _ in pairs])
    dst = np.array([j for _, j in pairs])
    rows = np.arange(len(pairs))

    def score(X: np.ndarray) -> np.ndarray:
        return np.stack([lp.overflow_gib(X), lp.evaluate(X)[0]], axis=1)

    current = score(x)[0]
    for _ in range(rounds):
        movable = x[src] >= 1
        if not movable.any():
            break
        X = np.repeat(x[None, :], len(pairs), axis=0)
        X[rows, src] -= 1
        X[rows, dst] += 1
        s = score(X)
        s[~movable] = np.inf
        k = int(np.lexsort((s[:, 1], s[:, 0]))[0])
        better = s[k, 0] < current[0] - 1e-12 or (s[k, 0] <= current[0] + 1e-12 and s[k, 1] < current[1] * (1 - 1e-12))
        if not better:
            break
        x, current = X[k], s[k]
    return x
