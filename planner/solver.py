"""Solving the placement LP/MILP: HiGHS in process (``highspy``), or pulp (CBC) as an independent check.

Rows are ``(coefficients {variable: a}, lower, upper)``; variables have bounds ``[0, upper]`` and a cost.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Hashable


_HIGHS = []


def new_highs():
    """A silent HiGHS instance. Its constructor prints a banner from C on file descriptor 1 (before any option can
    say otherwise), which would land in the middle of our tables: standard output is pointed at /dev/null for it."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    h.setOptionValue("output_flag", False)
    return h


def _highs(fresh: bool = False):
    """A HiGHS instance: for LPs one per process, reused (creating one costs more than solving our small LPs);
    MILPs get a fresh one (a branch and bound leaves state behind that upsets later LPs on the same instance)."""
    if fresh or not _HIGHS:
        h = new_highs()
        h.setOptionValue("presolve", "off")
        if fresh:
            return h
        _HIGHS.append(h)
    h = _HIGHS[0]
    h.clearModel()
    return h


def solve_dense(cost, A, lower, upper, col_upper, integer=None, time_limit_s: float = 2.0
                ) -> tuple[float, "np.ndarray"] | None:
    """Minimise ``cost . x`` s.t. ``lower <= A x <= upper``, ``0 <= x <= col_upper``; ``integer`` marks integer
    columns (a MILP, stopped after ``time_limit_s`` with the best point found). None when nothing feasible is
    found. Arrays are numpy; infinities allowed."""
    import highspy
    import numpy as np

    inf = highspy.kHighsInf
    m, n = A.shape
    milp = integer is not None and any(integer)
    h = _highs(fresh=milp)
    if milp:
        h.setOptionValue("time_limit", float(time_limit_s))
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n, m
    lp.col_cost_ = np.asarray(cost, dtype=float)
    lp.col_lower_ = np.zeros(n)
    lp.col_upper_ = np.where(np.isinf(col_upper), inf, col_upper)
    lp.row_lower_ = np.where(np.isinf(lower), -inf, lower)
    lp.row_upper_ = np.where(np.isinf(upper), inf, upper)
    nz = A != 0
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.concatenate([[0], np.cumsum(nz.sum(axis=1))]).astype(np.int32)
    lp.a_matrix_.index_ = np.nonzero(nz)[1].astype(np.int32)
    lp.a_matrix_.value_ = A[nz]
    if milp:
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in integer]
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    solved = status == highspy.HighsModelStatus.kOptimal or (
        status == highspy.HighsModelStatus.kTimeLimit and h.getInfo().primal_solution_status == 2)
    if not solved:
        return None
    return h.getInfo().objective_function_value, np.array(h.getSolution().col_value)


def solve_with_pulp(names: list[Hashable], cost: list[float], upper: list[float], integer: list[bool],
                    rows: list[tuple[dict, float, float]]) -> tuple[float, dict[Hashable, float]] | None:
    """The same problem through pulp and its bundled CBC (slower: for tests and cross-checks)."""
    import pulp

    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    var: dict[Any, pulp.LpVariable] = {}
    for i, (name, up, integral) in enumerate(zip(names, upper, integer)):
        var[name] = pulp.LpVariable(f"x{i}", lowBound=0, upBound=None if math.isinf(up) else up,
                                    cat="Integer" if integral else "Continuous")
    prob += pulp.lpSum(c * var[n] for n, c in zip(names, cost) if c)
    for coef, lo, up in rows:
        expr = pulp.lpSum(a * var[v] for v, a in coef.items())
        if lo == up:
            prob += expr == lo
        else:
            if not math.isinf(lo):
                prob += expr >= lo
            if not math.isinf(up):
                prob += expr <= up
    status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        return None
    return pulp.value(prob.objective), {n: var[n].value() for n in names}
