"""The plan search: enumerate the discrete knobs, place tensors with an LP per combination, keep the best.

Knobs: draft kind (none / a draft model / substitute:int8|int4), draft length g, interleaved batches (1, or 2 with
a draft), decode batch, prefill batch; inside each LP also where decode attention runs, where non-resident experts
run and how they are fetched (policy *families*), and the tier of each single unit (embed, lm_head, the draft).

Search: best bound first over ``lp.PlacementLP`` relaxations. A relaxation that mixes two choices of a family is
split into one child per choice; a relaxation on one choice is rounded to whole units (``rounding.integerise``) and kept
if among the best K, and the rest of its policy space is queued with its bound. The best plan's placement is then
solved exactly (``PlacementLP.milp``) unless its rounding is already within 0.1% of the bound.

Pruning that cannot drop the optimum: relaxation bounds against the K-th best whole-unit placement; a streaming
floor (every pass must move what the device cannot hold, at the fastest rates) that skips whole batch sizes;
drafts whose smallest configuration does not fit; larger draft lengths once one does not fit (memory only grows).
Heuristic scans (they could, in principle, miss an optimum): prefill batches are explored from the previous draft
length's best towards better neighbours, and draft lengths stop after two lengthenings that did not lower the
bound; routed expert fetching is not tried where a pass touches every expert anyway (99%+).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace

from specplan.errors import InfeasibleError
from specplan.fmt import GiB
from specplan.planner.ask import Ask, Candidate, SearchResult, caps_of, costing_for, shape_for
from specplan.planner.drafts import DraftChoice
from specplan.planner.expect import expert_touch_prob
from specplan.planner.costvec import AccCache
from specplan.planner.lp import LPResult, PlacementLP
from specplan.planner.realise import realise, same_plan
from specplan.planner.rounding import integerise
from specplan.planner.units import Knobs

DRAFT_LENS = (1, 2, 3, 4, 6, 8)
MILP_GAP = 1e-3  # a rounding this close to the LP bound is not re-solved as a MILP
MAX_BATCH = 1024

__all__ = ["Ask", "Candidate", "SearchResult", "search", "costing_for", "shape_for"]


def batches(ask: Ask, nb: int) -> list[int]:
    most = max(1, min(MAX_BATCH, ask.workload.num_prompts // nb))
    out, b = [], 1
    while b <= most:
        out.append(b)
        b *= 2
    if out[-1] != most and ask.workload.num_prompts % nb == 0:
        out.append(most)  # all prompts in one wave
    return out


def prefill_batches(wave: int) -> list[int]:
    """Prefill batch sizes worth trying: powers of two up to the wave, and the wave itself."""
    out, b = {wave}, 1
    while b < wave:
        out.add(b)
        b *= 2
    return sorted(out, reverse=True)


@dataclass
class Node:
    """A candidate with its policy families restricted to ``modes`` (None: all); ``lp`` and ``relaxed`` once
    solved, else ``relaxed`` is the parent's (a valid bound)."""

    cand: Candidate
    modes: dict | None
    relaxed: LPResult | None = None
    lp: PlacementLP | None = None

    def key(self) -> tuple:
        return (*self.cand.key(), tuple(sorted((self.modes or {}).items())))


class Searcher:
    """Best-bound-first search over candidates (see the module docstring)."""

    def __init__(self, ask: Ask, want: int):
        self.ask, self.want = ask, want
        self.caps = caps_of(ask)
        self.cache = AccCache()
        self.result = SearchResult(plans=[])
        self.costings = {d.label: costing_for(ask, d) for d in ask.drafts}
        self.found: list[tuple[float, tuple, Node, LPResult]] = []  # the best whole-unit placements (worst first)
        self.queue: list[tuple[float, tuple, Node]] = []
        self.stream_floor = streaming_floor(ask)

    # ---- bookkeeping -------------------------------------------------------------------------------------------

    def incumbent(self) -> float:
        """The objective a candidate must beat to enter the kept set."""
        return -self.found[0][0] if len(self.found) >= self.want else math.inf

    def keep(self, node: Node, sol: LPResult) -> None:
        heapq.heappush(self.found, (-sol.objective_s, node.key(), node, sol))
        if len(self.found) > self.want:
            heapq.heappop(self.found)

    def lp(self, cand: Candidate, modes) -> PlacementLP:
        return PlacementLP(self.costings[cand.draft.label], cand.knobs, cand.shape, self.caps, modes, self.cache)

    def solve(self, cand: Candidate, modes=None) -> Node:
        lp = self.lp(cand, modes)
        self.result.lps += 1
        n = Node(cand, lp.modes, lp.relax(), lp)
        if n.relaxed is None:
            self.result.infeasible += 1
        return n

    def visit(self, n: Node) -> None:
        """A solved node: keep its whole-unit placement if its relaxation is one policy, else branch."""
        assert n.relaxed is not None and n.lp is not None and n.modes is not None
        if n.relaxed.mixed:  # the relaxation mixes two choices of a family: one child per choice
            fam = sorted(n.relaxed.mixed)[0]
            children = [Node(n.cand, {**n.modes, fam: (choice,)}, n.relaxed) for choice in n.modes[fam]]
            # solve at once the child of the choice the relaxation leans on most: an early whole-unit placement
            share = {m: 0.0 for m in n.modes[fam]}
            for o, v in zip(n.lp.options, n.relaxed.x):
                choice = n.lp.choice_of(o)
                if choice and choice[0] == fam:
                    share[choice[1]] += v
            lean = max(n.modes[fam], key=lambda m: (share[m], m))
            for child in children:
                if child.modes[fam] == (lean,) and len(self.found) < self.want:
                    solved = self.solve(child.cand, child.modes)  # early incumbents make the pruning bite
                    if solved.relaxed is not None:
                        self.visit(solved)
                else:
                    self.push(child)
            return
        chosen = {f: n.relaxed.modes.get(f, vals[0]) for f, vals in n.modes.items()}
        fixed: dict = {}
        for fam in sorted(n.modes):  # the rest of the policy space, as a partition
            others = tuple(m for m in n.modes[fam] if m != chosen[fam])
            if others:
                self.push(Node(n.cand, {**n.modes, **fixed, fam: others}, n.relaxed))
            fixed[fam] = (chosen[fam],)
        pure = n.lp
        if any(len(v) > 1 for v in n.modes.values()):
            pure = self.lp(n.cand, {f: (m,) for f, m in chosen.items()})
        self.result.milps += 1
        sol = integerise(pure, pure.project(n.lp, n.relaxed)) or pure.milp()  # rounding failing is rare: exact then
        if sol is not None:
            self.keep(Node(n.cand, pure.modes, n.relaxed, pure), sol)

    def push(self, n: Node) -> None:
        """Queue an unsolved child (its parent's bound holds for it)."""
        heapq.heappush(self.queue, (n.relaxed.objective_s, n.key(), n))  # type: ignore[union-attr]

    # ---- the search --------------------------------------------------------------------------------------------

    def floor_s(self, draft: DraftChoice, g: int, nb: int, batch: int, rows_g: int | None = None) -> float:
        """A lower bound on the time of any placement: every decode pass and every prefill pass streams what the
        device cannot hold (``rows_g``: the draft length whose routed-token count to use, for a bound over g)."""
        sh = shape_for(self.ask, draft, g, nb, batch, nb * batch)
        rows = batch * ((g if rows_g is None else rows_g) + 1)
        waves = sh.prefill_passes  # one prefill pass per wave at the largest prefill batch
        return sh.rounds * nb * self.stream_floor(rows) + waves * self.stream_floor(math.inf)

    def scan_prefill(self, draft: DraftChoice, g: int, nb: int, batch: int, start: int | None) -> tuple[float, int] | None:
        """Prefill batches (powers of two up to the wave): from ``start`` (the best of the previous draft length)
        or the whole wave, step towards smaller or larger ones while the relaxation bound improves; what does not
        fit sends the scan to smaller ones. Returns (best bound, its prefill batch), None when nothing fits."""
        sizes = sorted(prefill_batches(nb * batch))
        bounds: dict[int, float | None] = {}

        def bound(i: int) -> float | None:
            if i not in bounds:
                self.result.candidates += 1
                cand = Candidate(draft, Knobs(prefetch_depth=self.ask.prefetch_depth),
                                 shape_for(self.ask, draft, g, nb, batch, sizes[i]))
                n = self.solve(cand)
                bounds[i] = None if n.relaxed is None else n.relaxed.objective_s
                if n.relaxed is not None:
                    if n.relaxed.objective_s < self.incumbent():
                        self.visit(n)
                    else:
                        self.result.pruned += 1
            return bounds[i]

        i = sizes.index(start) if start in sizes else len(sizes) - 1
        while i > 0 and bound(i) is None:
            i -= 1
        if bound(i) is None:
            return None
        for step in (-1, 1):
            while 0 <= i + step < len(sizes) and (b := bound(i + step)) is not None and b < bound(i):  # type: ignore[operator]
                i += step
        return bound(i), sizes[i]  # type: ignore[return-value]

    def enumerate(self) -> None:
        """(draft, batches, batch size) groups in order of their streaming floor, skipped once the floor cannot
        beat the kept set; in a group, draft lengths from short to long, stopping after two lengthenings that
        did not help or when a length does not fit."""
        groups = []
        for draft in self.ask.drafts:
            if not fits_at_all(self.ask, draft):
                self.result.notes.append(f"draft {draft.label} does not fit even at batch 1")
                continue
            lens = (0,) if draft.spec.kind == "none" else DRAFT_LENS
            for nb in ((1,) if draft.spec.kind == "none" else (1, 2)):
                for batch in batches(self.ask, nb):
                    floor = self.floor_s(draft, lens[-1], nb, batch, rows_g=lens[0])
                    groups.append((floor, (draft.label, nb, batch), draft, lens, nb, batch))
        for floor, _, draft, lens, nb, batch in sorted(groups, key=lambda t: (t[0], t[1])):
            if floor >= self.incumbent():
                self.result.pruned += 1
                continue  # no draft length can make this batch fast enough
            worse, last, start = 0, math.inf, None
            for g in lens:
                if self.floor_s(draft, g, nb, batch) >= self.incumbent():
                    self.result.pruned += 1
                    continue
                found = self.scan_prefill(draft, g, nb, batch, start)
                if found is None:
                    break  # longer drafts need more memory still
                bound, start = found
                worse = worse + 1 if bound >= last else 0
                last = min(last, bound)
                if worse >= 2:
                    break

    def run(self) -> list[tuple[float, Node, LPResult]]:
        self.enumerate()
        while self.queue:
            bound, _, n = heapq.heappop(self.queue)
            if bound >= self.incumbent() * (1 - 1e-9):
                self.result.pruned += 1 + len(self.queue)
                break
            if n.lp is None:
                n = self.solve(n.cand, n.modes)
                if n.relaxed is not None:
                    heapq.heappush(self.queue, (n.relaxed.objective_s, n.key(), n))
                continue
            self.visit(n)
        ordered = sorted(self.found, key=lambda t: (-t[0], t[1]))
        return [(-neg, node, sol) for neg, _, node, sol in ordered]


def streaming_floor(ask: Ask):
    """f(rows) -> seconds one pass must at least spend moving the target's weights that do not fit on the device:
    everything off the device streams through the host->device link or is read by the host CPU from its RAM (at
    best both at full speed at once), and what fits in neither device nor host memory is read from disk. Routed
    experts count only with the probability that a pass of ``rows`` tokens touches them."""
    w = ask.weight_dtype
    spec, prof = ask.spec, ask.profile
    total = spec.weight_bytes(w)
    experts = spec.group_bytes(w)["experts"]
    caps = caps_of(ask)
    off = max(0.0, total - ask.capacities.device_bytes)
    on_disk = max(0.0, off - (caps["host"] or 0.0)) if prof.has_host_tier else off
    big = GiB  # one large transfer, where links reach their best rate
    disk_rate = big / prof.disk_read_time_s(big)
    near_rate = big / prof.h2d_time_s(big) + prof.host.memory_bandwidth_Bps.max if prof.has_host_tier else math.inf

    def streamed(nbytes: float, p: float) -> float:
        """Fewest bytes a pass reads of ``nbytes`` off a tier: experts first, each touched with probability p."""
        return max(0.0, nbytes - experts) + min(nbytes, experts) * p

    def floor(rows: float) -> float:
        p = expert_touch_prob(spec.num_experts, spec.experts_per_token, rows) if spec.is_moe else 1.0
        return max(streamed(off, p) / near_rate, streamed(on_disk, p) / disk_rate)

    return floor


def fits_at_all(ask: Ask, draft: DraftChoice) -> bool:
    """Whether the smallest configuration with this draft (batch 1, every weight on its lowest tier) fits."""
    from specplan.planner.diagnose import smallest_plan
    from specplan.planner.memory import overflow

    return not overflow(smallest_plan(ask, draft))


def search(ask: Ask) -> SearchResult:
    """The best plans for ``ask``: one search per candidate weight dtype (``planner.dtypes``), merged by predicted
    time, so the cost model decides between fewer bytes and faster kernels."""
    dtypes = ask.candidates
    if len(dtypes) == 1:
        return search_at(replace(ask, dtypes=dtypes))
    results, refusals = [], []
    for d in dtypes:
        try:
            results.append((d, search_at(replace(ask, dtypes=(d,)))))
        except InfeasibleError as e:
            refusals.append(e)
    if not results:
        raise refusals[0]
    merged = SearchResult(plans=[])
    ranked = sorted(((p.prediction.total_s, i, p) for i, (_, r) in enumerate(results) for p in r.plans),  # type: ignore[union-attr]
                    key=lambda t: (t[0], t[1]))
    merged.plans = [p for _, _, p in ranked[:ask.top]]
    for d, r in results:
        merged.candidates += r.candidates
        merged.lps += r.lps
        merged.milps += r.milps
        merged.pruned += r.pruned
        merged.infeasible += r.infeasible
        merged.notes += [n for n in r.notes if n not in merged.notes]
        best = r.plans[0].prediction
        merged.notes.append(f"weights in {d}: best {best.e2e_tok_s:.2f} tok/s end-to-end")  # type: ignore[union-attr]
    merged.notes += [f"weights in {d}: nothing fits" for d in dtypes if d not in {d for d, _ in results}]
    return merged


def search_at(ask: Ask) -> SearchResult:
    """The search at the ask's one weight dtype (``ask.dtypes``)."""
    s = Searcher(ask, ask.top + 2)  # spares: rounding may not fit, near-duplicates are dropped
    found = s.run()
    plans, seen = [], []
    for _, leaf, sol in found:
        twin = (leaf.cand.draft.label, leaf.cand.shape, sorted(sol.counts.items()), round(sol.objective_s, 9))
        if twin in seen:
            continue  # the same placement and time under another (here irrelevant) policy choice
        seen.append(twin)
        # the best placement gets the exact whole-unit optimum (MILP), unless its rounding is provably within 0.1%
        # of it; the runners-up keep their rounding (within a fraction of a percent, see the tests)
        if not plans and (leaf.relaxed is None or sol.objective_s > leaf.relaxed.objective_s * (1 + MILP_GAP)):
            exact = leaf.lp.milp()  # type: ignore[union-attr]
            if exact is not None and exact.objective_s < sol.objective_s:
                sol = exact
        plan = realise(ask, leaf.cand, leaf.lp, sol)  # type: ignore[arg-type]
        if plan is not None:
            plans.append((plan.prediction.total_s, leaf.key(), plan))  # type: ignore[union-attr]
        if len(plans) >= ask.top:
            break
    plans.sort(key=lambda t: (t[0], t[1]))
    result = s.result
    for _, _, plan in plans:
        if not any(same_plan(plan, kept) for kept in result.plans):
            result.plans.append(plan)
    if not result.plans:
        from specplan.planner.diagnose import why_infeasible

        raise InfeasibleError(why_infeasible(ask))
    return result
