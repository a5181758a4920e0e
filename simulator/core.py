"""The discrete-event scheduler: stages of ``Op`` programs served by the machine's resources.

A *template* is one op program (the planner's ``Op`` records with their ``deps``) costed once on a profile; a
*stage* is one run of a template (a prefill pass, the draft steps of a batch, a verification pass ...) with the
stages it waits for. The scheduler runs all stages on one timeline:

- every physical resource (``planner.cost.physical_resource``) serves one op at a time; among the ops ready for
  it, the one issued first (lowest global sequence: stage order, then program order) goes first;
- an op starts once all its dependencies have finished; a stage's entry ops (compute, on-demand and unslotted
  transfers without dependencies in the program) also wait for the ops of earlier stages it follows (``after``:
  usually their ``tail``, the last op of their program);
- staging slots (``Op.slot = (pool, index)``): the fetches of a slot are granted strictly in issue order; a fetch
  takes the slot when it is granted, fetches of the same owner (stage and layer) share it, and each holds it
  until every op that depends on it directly has finished. So the fetch of layer i + depth + 1 waits until the
  compute of layer i frees its buffer, within a pass and across passes, rounds and the two interleaved batches;
- an op that does not happen (a routed expert drawn untouched) takes no time and no resource, and still releases
  its dependents.

Times come only from ``planner.cost.op_time_s`` (through ``planner.program.op_times``, memoised per template).
"""

from __future__ import annotations

from heapq import heappop, heappush
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from specplan.contracts.hardware import HardwareProfile
from specplan.contracts.timeline import RESOURCES
from specplan.errors import ContractError, SpecplanError
from specplan.planner.cost import physical_resource
from specplan.planner.ops import Op
from specplan.planner.program import op_times
from specplan.simulator.events import DISPATCH, FINISH, EventQueue


class SimulationError(SpecplanError):
    """The op programs cannot be scheduled (a dependency or staging-slot cycle)."""


@dataclass(frozen=True)
class Template:
    """One op program costed on one profile, with its wiring precomputed (shared by the stages that run it)."""

    ops: tuple[Op, ...]
    resource: tuple[int, ...]  # index into RESOURCES of the physical resource
    time_s: tuple[float, ...]  # op_time_s: the seconds the op takes when it happens
    prob: tuple[float, ...]  # probability that it happens
    ndeps: tuple[int, ...]
    dependents: tuple[tuple[int, ...], ...]
    slot_deps: tuple[tuple[int, ...], ...]  # the dependencies that hold a staging slot
    external: tuple[int, ...]  # entry ops that also wait for the stages this one follows
    tail: int  # the last op: what following stages wait for (as in planner.program.decode_round)
    token: int  # the op whose end delivers tokens (the target's lm_head), else the tail
    draw: tuple[int, ...]  # -1, or the routed-expert draw this op shares with the rest of its expert
    num_draws: int

    def __len__(self) -> int:
        return len(self.ops)


def make_template(ops: Sequence[Op], profile: HardwareProfile) -> Template:
    """Cost ``ops`` on ``profile`` and precompute the wiring the scheduler needs."""
    ops = tuple(ops)
    n = len(ops)
    try:
        happens_s = op_times(ops, profile, expected=False, streaming=True)
    except (KeyError, ContractError) as e:  # a rate the profile lacks (e.g. disk reads on a profile without disk figures)
        raise SimulationError(f"cannot cost the plan's ops on profile '{profile.name}': {e.args[0]}") from None
    dependents: list[list[int]] = [[] for _ in range(n)]
    slot_deps: list[list[int]] = [[] for _ in range(n)]
    for i, op in enumerate(ops):
        for d in op.deps:
            if not 0 <= d < i:
                raise SimulationError(f"op {i} '{op.name}' depends on op {d}: dependencies must come earlier")
            dependents[d].append(i)
            if ops[d].slot is not None:
                slot_deps[i].append(d)
    external = tuple(
        i for i, op in enumerate(ops)
        if not op.deps and (op.is_compute or op.on_demand or op.slot is None)
    )
    heads = [i for i, op in enumerate(ops) if op.group == "lm_head" and op.is_compute]
    draws: dict[tuple, int] = {}
    draw = []
    for op in ops:
        if op.expert is not None and op.prob < 1.0:
            draw.append(draws.setdefault((op.batch, op.phase, op.layer, op.expert), len(draws)))
        else:
            draw.append(-1)
    queue_of = {r: RESOURCES.index(physical_resource(r, profile)) for r in RESOURCES}
    return Template(
        ops=ops,
        resource=tuple(queue_of[op.resource] for op in ops),
        time_s=tuple(happens_s),
        prob=tuple(op.prob for op in ops),
        ndeps=tuple(len(op.deps) for op in ops),
        dependents=tuple(tuple(d) for d in dependents),
        slot_deps=tuple(tuple(d) for d in slot_deps),
        external=external,
        tail=n - 1,
        token=heads[-1] if heads else n - 1,
        draw=tuple(draw),
        num_draws=len(draws),
    )


@dataclass
class Stage:
    """One run of a template. ``duration_s[i]`` is what op i takes in this run; ``happens[i]`` False means it
    does not happen at all (no resource, no slot, zero time)."""

    template: Template
    duration_s: list[float]
    happens: list[bool] | None = None  # None: every op happens
    #: what this stage's entry ops wait for: (earlier stage, op index in it), e.g. its tail or its token op
    after: tuple[tuple[int, int], ...] = ()
    info: dict[str, Any] = field(default_factory=dict)  # kind, batch, wave, round, tokens ... (for the report)


def expected_stage(template: Template, after: tuple[tuple[int, int], ...] = (), **info: Any) -> Stage:
    """Every op happens, an op with probability p taking p times its time (the expectation the planner uses)."""
    return Stage(template, [p * t for p, t in zip(template.prob, template.time_s)], None, after, info)


def drawn_stage(template: Template, uniforms: Sequence[float], after: tuple[tuple[int, int], ...] = (),
                **info: Any) -> Stage:
    """Routed experts drawn: the ops of expert draw k happen iff ``uniforms[k] < prob`` (one draw per expert, so
    its fetch and its compute happen together); other ops happen with their own probability's expectation."""
    happens, dur = [], []
    for k, p, t in zip(template.draw, template.prob, template.time_s):
        if k >= 0:
            h = uniforms[k] < p
            happens.append(h)
            dur.append(t if h else 0.0)
        else:
            happens.append(True)
            dur.append(p * t)
    return Stage(template, dur, happens, after, info)


@dataclass
class Schedule:
    """When each op of each stage ran. Op ``j`` of stage ``s`` is global op ``base[s] + j``."""

    stages: list[Stage]
    base: list[int]
    start_s: list[float]
    end_s: list[float]
    resource: list[int]  # physical resource index, -1 for ops that did not happen

    def op_range(self, stage: int) -> range:
        return range(self.base[stage], self.base[stage] + len(self.stages[stage].template))

    def tail_end_s(self, stage: int) -> float:
        return self.end_s[self.base[stage] + self.stages[stage].template.tail]

    def token_end_s(self, stage: int) -> float:
        return self.end_s[self.base[stage] + self.stages[stage].template.token]

    def deps_of(self, g: int) -> list[int]:
        """Global indices of what op ``g`` waited for (its program deps and, for entry ops, earlier stages' tails)."""
        s = self.stage_of(g)
        b, t = self.base[s], self.stages[s].template
        local = g - b
        out = [b + d for d in t.ops[local].deps]
        if local in t.external:
            out += [self.base[a] + i for a, i in self.stages[s].after]
        return out

    def stage_of(self, g: int) -> int:
        return bisect_right(self.base, g) - 1


def run(stages: list[Stage]) -> Schedule:
    """Schedule every op of every stage; raises ``SimulationError`` if some op can never start."""
    n_total = sum(len(s.template) for s in stages)
    remaining = [0] * n_total
    dur = [0.0] * n_total
    res = [-1] * n_total
    stage_of = [0] * n_total
    base: list[int] = []
    holder_slot: list[Any] = [None] * n_total  # slot key of a fetch that holds a slot
    pend = [0] * n_total  # direct dependents a slot holder still waits for
    owner: list[Any] = [None] * n_total
    ext: dict[int, list[int]] = {}
    slots: dict[Any, list] = {}  # key -> [queue of fetches in issue order, holders, owner]

    g0 = 0
    for si, st in enumerate(stages):
        t = st.template
        n = len(t)
        base.append(g0)
        stage_of[g0:g0 + n] = [si] * n
        remaining[g0:g0 + n] = t.ndeps
        dur[g0:g0 + n] = st.duration_s
        happens = st.happens
        res[g0:g0 + n] = t.resource if happens is None else [r if h else -1 for r, h in zip(t.resource, happens)]
        for a, j in st.after:
            if not 0 <= a < si or not 0 <= j < len(stages[a].template):
                raise SimulationError(f"stage {si} waits for op {j} of stage {a}: only ops of earlier stages")
            for i in t.external:
                remaining[g0 + i] += 1
                ext.setdefault(base[a] + j, []).append(g0 + i)
        for i, op in enumerate(t.ops):
            if op.slot is not None and (happens is None or happens[i]):
                g = g0 + i
                state = slots.setdefault(op.slot, [deque(), 0, None])
                state[0].append(g)
                holder_slot[g] = op.slot
                pend[g] = len(t.dependents[i])
                owner[g] = (si, op.layer)
        g0 += n

    start = [0.0] * n_total
    end: list[float | None] = [None] * n_total
    queue = EventQueue()
    push, pop = queue.push, queue.pop
    ready: list[list[int]] = [[] for _ in RESOURCES]
    busy = [False] * len(RESOURCES)
    dispatching = [False] * len(RESOURCES)
    now = 0.0

    def offer(g: int) -> None:
        """Op g may run: queue it on its resource (or finish it at once if it does not happen)."""
        r = res[g]
        if r < 0:
            start[g] = now
            push(now, FINISH, g)
            return
        heappush(ready[r], g)
        if not busy[r] and not dispatching[r]:
            dispatching[r] = True
            push(now, DISPATCH, r)

    def grant(key: Any) -> None:
        """Hand the slot to the fetches at the head of its queue, in issue order."""
        state = slots[key]
        q = state[0]
        while q:
            g = q[0]
            if remaining[g] or (state[1] and state[2] != owner[g]):
                return
            q.popleft()
            state[1] += 1
            state[2] = owner[g]
            offer(g)

    def release(g: int) -> None:
        state = slots[holder_slot[g]]
        state[1] -= 1
        if not state[1]:
            grant(holder_slot[g])

    def became_ready(g: int) -> None:
        if holder_slot[g] is not None:
            grant(holder_slot[g])
        else:
            offer(g)

    for g in range(n_total):
        if not remaining[g]:
            became_ready(g)

    templates = [st.template for st in stages]
    while (event := pop()) is not None:
        now, prio, _, item = event
        if prio == DISPATCH:
            r = item
            dispatching[r] = False
            if busy[r] or not ready[r]:
                continue
            g = heappop(ready[r])
            busy[r] = True
            start[g] = now
            push(now + dur[g], FINISH, g)
            continue
        g = item
        end[g] = now
        r = res[g]
        if r >= 0:
            busy[r] = False
            if ready[r] and not dispatching[r]:
                dispatching[r] = True
                push(now, DISPATCH, r)
        si = stage_of[g]
        b = base[si]
        t = templates[si]
        local = g - b
        for d in t.dependents[local]:
            h = b + d
            remaining[h] -= 1
            if not remaining[h]:
                if holder_slot[h] is None:
                    offer(h)
                else:
                    grant(holder_slot[h])
        if g in ext:
            for h in ext[g]:
                remaining[h] -= 1
                if not remaining[h]:
                    became_ready(h)
        for d in t.slot_deps[local]:
            h = b + d
            if holder_slot[h] is not None:
                pend[h] -= 1
                if not pend[h]:
                    release(h)
        if holder_slot[g] is not None and not pend[g]:
            release(g)

    if any(e is None for e in end):
        _stuck(stages, base, end, remaining, holder_slot)
    return Schedule(stages, base, start, end, res)  # type: ignore[arg-type]


def _stuck(stages: list[Stage], base: list[int], end: list, remaining: list[int], holder_slot: list) -> None:
    """Explain a schedule that cannot finish (a cycle of dependencies or staging slots)."""
    waiting = [g for g, e in enumerate(end) if e is None]
    g = waiting[0]
    s = bisect_right(base, g) - 1
    op = stages[s].template.ops[g - base[s]]
    why = f"{remaining[g]} unfinished dependencies" if remaining[g] else f"staging slot {holder_slot[g]}"
    raise SimulationError(
        f"{len(waiting)} ops can never start (first: '{op.name}' of stage {s}, waiting for {why}); "
        "the plan's programs form a cycle of dependencies or staging buffers"
    )
