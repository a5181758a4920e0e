"""The placement LP: its whole-unit optimum equals brute force over every whole-tensor placement of small
models, its objective is the prediction of the plan it yields, and pulp/CBC finds the same relaxation."""

import itertools

import pytest

from planner_fixtures import GiB, cpu_profile, hand_plan, tiny_dense, tiny_moe
from specplan.catalog import load_profile
from specplan.contracts import LayerPlacement, Placement, Workload
from specplan.planner.drafts import DraftChoice
from specplan.planner.lp import PlacementLP, tiers_for
from specplan.planner.memory import overflow
from specplan.planner.predict import predict
from specplan.planner.ask import Ask, Candidate, caps_of, costing_for, shape_for
from specplan.planner.realise import knobs_of, spread
from specplan.planner.rounding import integerise
from specplan.planner.solver import solve_with_pulp
from specplan.planner.units import Knobs
from specplan.contracts.plan import Capacities, DraftSpec

WORKLOAD = Workload(prompt_len=32, gen_len=9, num_prompts=8)


def candidate(spec, profile, device_bytes, *, batch=4, prefill=4, modes=None, depth=0):
    """One candidate's LP. Depth 0 (one staging buffer) keeps the buffer smaller than the model, so that small
    models have budgets where a real split of tensors is optimal."""
    ask = Ask(spec=spec, model_name=spec.name, profile=profile, capacities=Capacities(device_bytes=device_bytes),
              workload=WORKLOAD, drafts=(DraftChoice(DraftSpec(), None, None, False),), prefetch_depth=depth)
    draft = ask.drafts[0]
    cand = Candidate(draft, Knobs(prefetch_depth=depth), shape_for(ask, draft, 0, 1, batch, prefill))
    caps = caps_of(ask)
    lp = PlacementLP(costing_for(ask, draft), cand.knobs, cand.shape, caps, modes)
    return ask, cand, lp


def lp_plan(ask, cand, lp):
    """The search's way to a plan: relaxation, whole units (the exact MILP the kept plans get), spread over layers.
    The quick rounding the branch and bound uses is checked to be no better (and close)."""
    relaxed = lp.relax()
    assert relaxed is not None and not any(not f.startswith("tier:") for f in relaxed.mixed)  # one policy
    sol = lp.milp()
    assert sol is not None
    quick = integerise(lp, relaxed)
    if quick is not None:
        assert sol.objective_s <= quick.objective_s * (1 + 1e-9)
        assert quick.objective_s <= sol.objective_s * 1.25
    plan = hand_plan(ask.spec, ask.profile, decode_batch=cand.shape.decode_batch, prefill_batch=cand.shape.prefill_batch,
                     workload=WORKLOAD, device_gib=ask.capacities.device_bytes / GiB,
                     prefetch_depth=cand.knobs.prefetch_depth)
    k = knobs_of(lp.base, {f: (m,) for f, m in sol.modes.items()})  # the policy the solution uses
    plan = plan.model_copy(update={"placement": spread(ask.spec, sol.counts),
                                   "policy": plan.policy.model_copy(update=dict(
                                       attention_on=k.attention_on, experts_on=k.experts_on,
                                       expert_fetch=k.expert_fetch))})
    return relaxed, sol, plan


def brute_force(ask, template, unit_tiers):
    """Every whole-tensor placement: the best predicted total time among those that fit."""
    spec = ask.spec
    best = None
    ffn = [unit_tiers["expert"]] * spec.num_experts if spec.is_moe else [unit_tiers["mlp"]]
    layer_choices = list(itertools.product(unit_tiers["attention"], unit_tiers["kv"], *ffn))
    for layers in itertools.product(layer_choices, repeat=spec.num_layers):
        for embed, head in itertools.product(unit_tiers["embed"], unit_tiers["lm_head"]):
            placement = Placement(embed=embed, lm_head=head, final_norm="device", layers=[
                LayerPlacement(attention=l[0], norms_router="device", kv_cache=l[1],
                               experts=list(l[2:]) if spec.is_moe else [], mlp=None if spec.is_moe else l[2])
                for l in layers])
            plan = template.model_copy(update={"placement": placement})
            if overflow(plan):
                continue
            total = predict(plan).total_s
            if best is None or total < best[0]:
                best = (total, placement)
    return best


@pytest.mark.parametrize("device_mib", [20, 24, 28])
def test_lp_equals_brute_force_cpu(device_mib):
    """No GPU: tensors are resident or stream from disk; 2 layers x 4 experts + head = 2,048 placements."""
    spec = tiny_moe(layers=2, experts=4, hidden=256)
    ask, cand, lp = candidate(spec, cpu_profile(), device_mib * 2**20)
    relaxed, sol, plan = lp_plan(ask, cand, lp)
    tiers = {u: tiers_for(lp.c, u) for u in ("attention", "kv", "expert", "embed", "lm_head")}
    best_total, best_placement = brute_force(ask, plan, tiers)
    got = predict(plan).total_s
    assert not overflow(plan)
    assert got == pytest.approx(sol.objective_s, rel=1e-9)  # the LP's objective is the plan's prediction
    assert got == pytest.approx(best_total, rel=1e-9)  # and nothing whole-tensor does better
    assert relaxed.objective_s <= sol.objective_s * (1 + 1e-9)
    n_disk = sum(t == "disk" for lp_ in best_placement.layers for t in lp_.experts)
    assert 0 < n_disk < 8  # the budgets force a real split


@pytest.mark.parametrize("attention_on,device_mib", [("host", 3), ("host", 4), ("device", 5)])
def test_lp_equals_brute_force_gpu(attention_on, device_mib):
    """A GPU: device / host / disk for weights, device / host for the KV cache; 2 dense layers = 1,944
    placements."""
    spec = tiny_dense(layers=2, hidden=256)
    ask, cand, lp = candidate(spec, load_profile("t4"), device_mib * 2**20,
                              modes={"attention": ((attention_on,),), "experts": (("device", "layer"),)})
    relaxed, sol, plan = lp_plan(ask, cand, lp)
    tiers = {u: tiers_for(lp.c, u) for u in ("attention", "kv", "mlp", "embed", "lm_head")}
    best_total, best_placement = brute_force(ask, plan, tiers)
    assert predict(plan).total_s == pytest.approx(sol.objective_s, rel=1e-9)
    assert sol.objective_s == pytest.approx(best_total, rel=1e-9)
    tiers = [best_placement.embed, best_placement.lm_head] + [t for l in best_placement.layers
                                                               for t in (l.attention, l.kv_cache, l.mlp)]
    assert "device" in tiers and set(tiers) != {"device"}  # the budget forces a real split


def test_pulp_finds_the_same_relaxation():
    spec = tiny_moe(layers=4, experts=8)
    for profile, cap in ((cpu_profile(), 40 * 2**20), (load_profile("rtx4090-pcie4"), 30 * 2**20)):
        _, _, lp = candidate(spec, profile, cap)
        names, rows, cost, upper = lp.rows()
        ours = lp.relax()
        theirs = solve_with_pulp(names, cost, upper, [False] * len(names), rows)
        assert ours is not None and theirs is not None
        assert theirs[0] == pytest.approx(ours.objective_s, rel=1e-6)


def test_infeasible_candidate_has_no_solution():
    spec = tiny_moe(layers=2, experts=4)
    _, _, lp = candidate(spec, cpu_profile(), 2**20)  # 1 MiB cannot hold even the activations
    assert lp.relax() is None


def test_cost_vector_fields_cover_the_vector_once():
    from specplan.planner.costvec import LAYOUT, RES
    from specplan.planner.kinds import POOLS

    idx = list(range(LAYOUT.size))
    fields = [LAYOUT.busy, LAYOUT.compute, LAYOUT.draft, LAYOUT.serial, LAYOUT.prefetchable, LAYOUT.fetched]
    used = sorted(i for f in fields for i in (idx[f] if isinstance(f, slice) else [f]))
    assert used == idx
    assert len(idx[LAYOUT.busy]) == len(idx[LAYOUT.serial]) == len(idx[LAYOUT.prefetchable]) == len(RES)
    assert len(idx[LAYOUT.fetched]) == len(POOLS)
