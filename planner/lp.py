"""The placement LP of one candidate policy: how many units of each kind sit on each tier.

Variables: for each unit kind u (attention of a layer, KV of a layer, a routed expert, a dense MLP, a shared expert,
embed, lm_head, the draft model), each tier t it may take and each policy choice m that changes its cost (where
decode attention runs for a host KV cache; where and how non-resident experts run), ``x[u,t,m] >= 0`` units with
``sum x[u,.,.] = count(u)``. Every layer of a kind costs the same, so counts suffice; ``realise.spread`` turns
counts into a per-layer placement.

Time, linear in x (coefficients are the cost vectors of ``costvec``, read off ``units.unit_ops`` records costed by
``cost.op_time_s``):
    T    >= busy_r(x)    for every physical resource r (all interleaved batches of a round)
    T    >= chain_l(x)   one batch's serial compute + its on-demand transfers on link l
    T    >= stream_l(x)  speculative: drafting + the fetches on link l that cannot run ahead of it
    Tpf  >= the same for one prefill pass
    minimise  rounds * T + prefill_passes * Tpf      (seconds for the whole workload)
Memory per phase (prefill, decode) and tier: resident units + substitute copies + staging buffers
(``depth + 1`` slots of the average layer's fetched bytes, or of the head's) + activations <= capacity.

The relaxation is solved in process with HiGHS (``highspy``); ``rounding.integerise`` turns it into whole units,
``PlacementLP.milp`` solves the whole-unit problem exactly. ``solve_with_pulp`` (in ``solver.py``) states the same
rows through pulp/CBC as an independent check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from specplan.fmt import GiB
from specplan.planner.costvec import LAYOUT, RES, AccCache
from specplan.planner.expect import expert_touch_prob
from specplan.planner.kinds import LAYER_UNITS, POOLS, Family, UnitKind, UnitTier
from specplan.planner.memory import activation_bytes, substitute_bytes, unit_bytes
from specplan.planner.solver import solve_dense
from specplan.planner.units import UNIT_TIERS, Costing, Knobs, Pass

#: an LP variable: (unit kind, tier, the choice of the family that changes its cost, or ()).
Option = tuple[UnitKind, UnitTier, tuple[str, ...]]


def unit_counts(c: Costing) -> dict[UnitKind, int]:
    s = c.spec
    n_moe = len(s.moe_layers)
    counts: dict[UnitKind, int] = {
        "attention": s.num_layers, "kv": s.num_layers, "mlp": s.num_layers - n_moe,
        "shared": n_moe if s.shared_expert_intermediate_size else 0, "expert": n_moe * s.num_experts,
        "embed": 1, "lm_head": 1, "draft": 1 if c.draft_spec is not None else 0}
    return {u: n for u, n in counts.items() if n}


def tiers_for(c: Costing, unit: UnitKind) -> tuple[UnitTier, ...]:
    tiers = UNIT_TIERS[unit]
    if not c.profile.has_host_tier:  # one memory: nothing lives on a separate host tier
        tiers = tuple(t for t in tiers if "host" not in t)
    if unit == "lm_head" and c.spec.tie_word_embeddings:
        tiers = tuple(t for t in tiers if t != "disk")  # the head is the embedding: it follows the embed's tier
    return tiers


#: policy families whose choice changes the cost of some units: family -> the Knobs fields it sets.
FAMILIES: dict[Family, tuple[str, ...]] = {"attention": ("attention_on",), "experts": ("experts_on", "expert_fetch")}


def family_of(c: Costing, unit: UnitKind, tier: UnitTier) -> Family | None:
    """The family whose choice changes this unit's cost, if any."""
    if unit == "kv" and tier == "host":
        return "attention"
    if unit == "expert" and tier != "device":
        return "experts"
    return None


def mode_values(c: Costing, family: Family, rows: int) -> tuple[tuple[str, ...], ...]:
    """The choices of a family worth trying for a pass of ``rows`` routed tokens."""
    if family == "attention":
        return (("device",), ("host",))
    spec = c.spec
    fetches = ("layer",)
    if expert_touch_prob(spec.num_experts, spec.experts_per_token, rows) < 0.99:
        fetches = ("routed", "layer")  # where every expert is touched anyway, routed reads the same bytes, later
    places = ("device", "host") if c.profile.has_host_tier else ("device",)
    return tuple((p, f) for p in places for f in fetches)


@dataclass(frozen=True)
class Shape:
    """The discrete knobs of one candidate that the LP needs."""

    decode_batch: int
    num_batches: int
    prefill_batch: int
    draft_len: int
    rounds: float  # decode rounds over the whole workload
    prefill_passes: int
    decode_context: int  # mean KV length over decode (costing)
    capacity: int  # KV positions allocated per sequence
    prompt_len: int
    last_context: int  # KV length before the last decode pass (memory peak)


@dataclass
class LPResult:
    objective_s: float
    x: np.ndarray  # units per option
    round_s: float
    prefill_s: float
    counts: dict[tuple[UnitKind, UnitTier], float]  # (unit, tier) -> units
    modes: dict[str, tuple[str, ...]]  # family -> the choice the solution uses (families it uses)
    mixed: dict[str, list[tuple[str, ...]]]  # family -> choices used when more than one is


def _time_rows(accs: np.ndarray, const: np.ndarray, batches: int, window: float, speculative: bool):
    """Rows ``T >= a.x + b`` as (A, b): busy per resource, and per link the chain and stream bounds."""
    L = LAYOUT
    busy, busy_c = accs[:, L.busy], const[L.busy]
    serial, serial_c = accs[:, L.serial], const[L.serial]
    pre, pre_c = accs[:, L.prefetchable], const[L.prefetchable]
    used = np.flatnonzero(np.abs(busy).sum(0) + np.abs(busy_c))
    links = [r for r in range(len(RES)) if RES[r] not in ("device_compute", "host_compute")
             and (serial[:, r].any() or pre[:, r].any() or serial_c[r] or pre_c[r])]
    A = [batches * busy[:, r] for r in used]
    b = [batches * busy_c[r] for r in used]
    for r in links or [None]:
        sio = serial[:, r] if r is not None else 0.0
        sio_c = serial_c[r] if r is not None else 0.0
        A.append(accs[:, L.compute] + sio)
        b.append(const[L.compute] + sio_c)
        if speculative:
            pre_r = pre[:, r] if r is not None else 0.0
            pre_rc = pre_c[r] if r is not None else 0.0
            A.append(accs[:, L.draft] + (1 - window) * pre_r + sio)
            b.append(const[L.draft] + (1 - window) * pre_rc + sio_c)
    return np.array(A), np.array(b)


class PlacementLP:
    """The rows of one candidate. ``modes`` restricts each family to some choices (default: all worth trying).

    Rows: ``E x = e`` (unit counts), ``R x + r <= T`` (round), ``P x + p <= Tpf`` (prefill), ``M x <= m``
    (memory, in GiB). ``caps``: tier -> capacity in bytes, None for a tier without a budget row.
    """

    def __init__(self, c: Costing, base: Knobs, shape: Shape, caps: dict[str, float | None],
                 modes: dict[str, tuple[tuple[str, ...], ...]] | None = None, cache: AccCache | None = None):
        self.c, self.base, self.shape, self.caps = c, base, shape, caps
        self.cache = cache or AccCache()
        rows = shape.decode_batch * (shape.draft_len + 1)
        self.counts = unit_counts(c)
        defaults: dict[str, tuple[tuple[str, ...], ...]] = {f: mode_values(c, f, rows) for f in FAMILIES}
        # single units (embed, lm_head, the draft) branch like policies: their tier is a family too, so that a
        # relaxation that splits one is split into children instead of being rounded
        defaults.update({f"tier:{u}": tuple((t,) for t in tiers_for(c, u)) for u, n in self.counts.items() if n == 1})
        self.modes = {**defaults, **(modes or {})}
        self.options: list[Option] = []
        for u in self.counts:
            for t in tiers_for(c, u):
                if self.counts[u] == 1 and (t,) not in self.modes[f"tier:{u}"]:
                    continue
                fam = family_of(c, u, t)
                for m in (self.modes[fam] if fam else ((),)):
                    self.options.append((u, t, m))
        self.n = len(self.options)
        self._time()
        self._counts()
        self._memory()

    def choice_of(self, option: Option) -> tuple[str, tuple[str, ...]] | None:
        """(family, choice) an option belongs to: a policy family, or the tier family of a single unit."""
        u, t, m = option
        fam = family_of(self.c, u, t)
        if fam:
            return fam, m
        if self.counts[u] == 1:
            return f"tier:{u}", (t,)
        return None

    def knobs(self, option: Option | None) -> Knobs:
        if option is None:
            return self.base
        u, t, m = option
        fam = family_of(self.c, u, t)
        return self.cache.knob(self.base, FAMILIES[fam] if fam else (), m)

    def _acc(self, passes: list[Pass], option: Option | None, tag: tuple) -> np.ndarray:
        unit, tier = (option[0], option[1]) if option else (None, None)
        return self.cache.get(self.c, self.knobs(option), tuple(passes), unit, tier, tag)

    def _passes(self) -> tuple[Pass, list[Pass], Pass, Pass]:
        """(verification, draft steps, prefill, the verification at the last context) of the candidate."""
        c, sh = self.c, self.shape
        verify = Pass("verify" if sh.draft_len else "decode", sh.decode_batch, sh.draft_len + 1, sh.decode_context)
        drafts = [Pass("draft", sh.decode_batch, 1, sh.decode_context + s, substitute=bool(c.substitute_bits))
                  for s in range(sh.draft_len)]
        prefill = Pass("prefill", sh.prefill_batch, sh.prompt_len, 0)
        return verify, drafts, prefill, replace(verify, context=sh.last_context)

    def _time(self) -> None:
        """The round rows ``R, r`` and the prefill rows ``P, p``."""
        sh, opts = self.shape, self.options
        verify, drafts, prefill, _ = self._passes()
        tag = ("round", sh.decode_batch, sh.draft_len, sh.decode_context)
        round_acc = np.array([self._acc([verify, *drafts], o, tag) for o in opts])
        round_const = self._acc([verify, *[d for d in drafts if d.substitute]], None, tag)
        pf_tag = ("prefill", sh.prefill_batch, sh.prompt_len)
        self.pf_acc = np.array([self._acc([prefill], o, pf_tag) for o in opts])
        pf_const = self._acc([prefill], None, pf_tag)
        window = min(1.0, (self.base.prefetch_depth + 1) / self.c.spec.num_layers)
        self.R, self.r = _time_rows(round_acc, round_const, sh.num_batches, window, sh.draft_len > 0)
        self.P, self.p = _time_rows(self.pf_acc, pf_const, 1, window, False)

    def _counts(self) -> None:
        """The unit-count rows ``E x = e`` (and the tied head following the embedding)."""
        c, opts = self.c, self.options
        E, e = [], []
        for u, cnt in self.counts.items():
            E.append([1.0 if o[0] == u else 0.0 for o in opts])
            e.append(float(cnt))
        if c.spec.tie_word_embeddings:
            for t in tiers_for(c, "lm_head"):
                E.append([1.0 if o[:2] == ("lm_head", t) else -1.0 if o[:2] == ("embed", t) else 0.0 for o in opts])
                e.append(0.0)
        self.E, self.e = np.array(E), np.array(e)

    def _memory(self) -> None:
        """The memory rows ``M x <= m`` per tier and phase (GiB); ``M_int`` and ``stage`` for whole units."""
        c, sh, opts = self.c, self.shape, self.options
        _, _, prefill, last = self._passes()
        last_tag = ("last", sh.decode_batch, sh.draft_len, last.context)
        fetched_of = LAYOUT.fetched
        decode_staging = np.array([self._acc([last], o, last_tag)[fetched_of] if o[0] != "draft"
                                   else np.zeros(len(POOLS)) for o in opts])
        staging = {"decode": decode_staging, "prefill": self.pf_acc[:, fetched_of]}
        seqs = sh.num_batches * sh.decode_batch
        slots = self.base.prefetch_depth + 1
        layers = c.spec.num_layers
        n_moe = len(c.spec.moe_layers)
        const_device = c.sizes["final_norm"] + n_moe * c.sizes["router_norms"] + (layers - n_moe) * c.sizes["norms"]
        act = {"decode": sh.num_batches * activation_bytes(c, replace(last, phase="verify")),
               "prefill": activation_bytes(c, prefill)}
        is_layer = np.array([o[0] in LAYER_UNITS for o in opts])
        is_head = np.array([o[0] == "lm_head" for o in opts])
        per_layer = {"attention": layers, "kv": layers, "mlp": layers - n_moe, "shared": n_moe, "expert": n_moe}
        M, m, M_int = [], [], []
        self.stage: list[tuple[int, list[tuple[np.ndarray, int, float]]]] = []
        for tier, cap in self.caps.items():
            if cap is None:
                continue
            resident = np.array([unit_bytes(c, o[0], o[1], seqs, sh.capacity).get(tier, 0.0)
                                 + (substitute_bytes(c, o[0], o[1]) if tier == "device" else 0.0) for o in opts])
            const = const_device if tier == "device" else 0.0
            for phase in ("prefill", "decode"):
                extra = act[phase] if tier == "device" else 0.0
                if tier in POOLS:
                    fetched = staging[phase][:, POOLS.index(tier)]  # type: ignore[arg-type]
                    # the LP: the average layer's fetches; whole units: a layer with the rounded-up share of
                    # every kind (``spread`` deals units evenly, so no layer holds more)
                    groups = []
                    for kind, n_layers in per_layer.items():
                        idx = np.array([i for i, o in enumerate(opts) if o[0] == kind and fetched[i] > 0])
                        if len(idx) and n_layers:
                            groups.append((idx, n_layers, slots * float(fetched[idx].max()) / GiB))
                    self.stage.append((len(M), groups))
                    M.append(resident + slots * fetched * is_layer / layers)
                    M_int.append(resident)
                    M.append(resident + slots * fetched * is_head)
                    M_int.append(M[-1])
                    m += [cap - const - extra] * 2
                else:
                    M.append(resident)
                    M_int.append(resident)
                    m.append(cap - const - extra)
        self.M, self.m, self.M_int = np.array(M) / GiB, np.array(m) / GiB, np.array(M_int) / GiB

    # ---- solving -----------------------------------------------------------------------------------------------

    def upper(self) -> np.ndarray:
        """Column upper bounds: each option holds at most all units of its kind."""
        return np.array([float(self.counts[o[0]]) for o in self.options])

    def dense(self, upper: np.ndarray | None = None):
        """(cost, A, lower, upper, column upper) over the variables [x..., T, Tpf]."""
        n, sh = self.n, self.shape
        inf = math.inf
        cost = np.concatenate([np.zeros(n), [sh.rounds, float(sh.prefill_passes)]])
        blocks = [
            (np.hstack([self.E, np.zeros((len(self.E), 2))]), self.e, self.e),
            (np.hstack([self.R, -np.ones((len(self.R), 1)), np.zeros((len(self.R), 1))]),
             np.full(len(self.R), -inf), -self.r),
            (np.hstack([self.P, np.zeros((len(self.P), 1)), -np.ones((len(self.P), 1))]),
             np.full(len(self.P), -inf), -self.p),
            (np.hstack([self.M, np.zeros((len(self.M), 2))]), np.full(len(self.M), -inf), self.m),
        ]
        A = np.vstack([b[0] for b in blocks])
        lo = np.concatenate([b[1] for b in blocks])
        up = np.concatenate([b[2] for b in blocks])
        col_up = np.concatenate([self.upper() if upper is None else upper, [inf, inf]])
        return cost, A, lo, up, col_up

    def rows(self) -> tuple[list, list[tuple[dict, float, float]], list[float], list[float]]:
        """The same problem as named rows (for pulp): (names, rows, cost, column upper bounds)."""
        cost, A, lo, up, col_up = self.dense()
        names = [*self.options, "T", "Tpf"]
        rows = [({names[j]: A[i, j] for j in np.flatnonzero(A[i])}, lo[i], up[i]) for i in range(len(A))]
        return names, rows, list(cost), list(col_up)

    def evaluate(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For integer points (one per row of X): objective, round time, prefill pass time, feasible."""
        X = np.atleast_2d(X)
        T = (X @ self.R.T + self.r).max(axis=1)
        Tpf = (X @ self.P.T + self.p).max(axis=1)
        ok = self.overflow_gib(X) <= 1e-9
        return self.shape.rounds * T + self.shape.prefill_passes * Tpf, T, Tpf, ok

    def overflow_gib(self, X: np.ndarray) -> np.ndarray:
        """GiB by which whole-unit points exceed the memory rows (summed), plus any unit-count mismatch; staging
        holds the rounded-up per-layer share of each kind's fetched units."""
        X = np.atleast_2d(X)
        use = X @ self.M_int.T
        for row, groups in self.stage:
            for idx, n_layers, nbytes in groups:
                use[:, row] += np.ceil(X[:, idx].sum(axis=1) / n_layers - 1e-9) * nbytes
        over = np.clip(use - self.m, 0, None).sum(axis=1)
        return over + np.abs(X @ self.E.T - self.e).sum(axis=1)

    def result(self, x: np.ndarray, objective: float, T: float, Tpf: float) -> LPResult:
        counts: dict[tuple[str, str], float] = {}
        used: dict[str, set] = {}
        for o, v in zip(self.options, x):
            if v > 1e-7:
                counts[(o[0], o[1])] = counts.get((o[0], o[1]), 0.0) + float(v)
                choice = self.choice_of(o)
                if choice:
                    used.setdefault(choice[0], set()).add(choice[1])
        modes = {f: min(v) for f, v in used.items()}
        mixed = {f: sorted(v) for f, v in used.items() if len(v) > 1}
        return LPResult(float(objective), x, float(T), float(Tpf), counts, modes, mixed)

    def project(self, other: "PlacementLP", sol: LPResult) -> LPResult:
        """A solution of ``other`` (a wider set of options) expressed over this LP's options."""
        where = {o: i for i, o in enumerate(other.options)}
        x = np.array([sol.x[where[o]] if o in where else 0.0 for o in self.options])
        return self.result(x, sol.objective_s, sol.round_s, sol.prefill_s)

    def relax(self, upper: np.ndarray | None = None) -> LPResult | None:
        """The LP relaxation (a lower bound on every whole-unit placement of this candidate)."""
        sol = solve_dense(*self.dense(upper))
        if sol is None:
            return None
        objective, v = sol
        return self.result(v[: self.n], objective, v[self.n], v[self.n + 1])

    def milp(self) -> LPResult | None:
        """The whole-unit optimum (HiGHS branch and bound): unit counts are integers, and each kind's staging
        share of a layer is an integer ``y >= fetched units / layers`` (the rounded-up share ``overflow_gib``
        charges). Exact for the linear model; a few ms to tens of ms."""
        cost, A, lo, up, col_up = self.dense()
        n = self.n
        groups = [(row, idx, n_layers, nbytes) for row, gs in self.stage for idx, n_layers, nbytes in gs]
        first_mem = len(self.E) + len(self.R) + len(self.P)
        A = np.hstack([A, np.zeros((len(A), len(groups)))])
        A[first_mem:first_mem + len(self.M), :n] = self.M_int  # staging moves to the y columns
        share = np.zeros((len(groups), A.shape[1]))
        for j, (row, idx, n_layers, nbytes) in enumerate(groups):
            A[first_mem + row, n + 2 + j] = nbytes
            share[j, idx] = 1.0 / n_layers
            share[j, n + 2 + j] = -1.0
        A = np.vstack([A, share])
        lo = np.concatenate([lo, np.full(len(groups), -math.inf)])
        up = np.concatenate([up, np.zeros(len(groups))])
        cost = np.concatenate([cost, np.zeros(len(groups))])
        col_up = np.concatenate([col_up, np.full(len(groups), math.inf)])
        integer = [True] * n + [False, False] + [True] * len(groups)
        sol = solve_dense(cost, A, lo, up, col_up, integer)
        if sol is None:
            return None
        x = np.round(sol[1][:n])
        obj, T, Tpf, ok = self.evaluate(x)
        return self.result(x, obj[0], T[0], Tpf[0]) if ok[0] else None

