"""The tensor table (``spec.tensors``) against real checkpoints of every supported family, and every consumer of
tensor sizes (parameter counts, placement bytes, the planner's sizes and FLOPs, the engine's budget) against it."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import pytest
from engine_fixtures import ALL_FAMILIES, MOE_FAMILIES
from planner_fixtures import cpu_profile, hand_plan, tiny_dense, tiny_moe

from specplan.catalog import load_model_spec
from specplan.contracts.memory import kv_capacity
from specplan.contracts.model import SUPPORTED_FAMILIES, WEIGHT_GROUPS, ModelSpec
from specplan.contracts.plan import DraftSpec, Placement
from specplan.planner.memory import tier_bytes
from specplan.planner.units import Costing

CASES = [(f, "per_expert") for f in SUPPORTED_FAMILIES] + [(f, "fused") for f in MOE_FAMILIES]
ELEMENT_BYTES = {"F32": 4, "BF16": 2, "F16": 2}
FUSED = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj)$")


def read_headers(folder: Path) -> dict[str, tuple[tuple[int, ...], int, str]]:
    """HF name -> (shape, bytes, dtype code) straight from the safetensors headers of ``folder``."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                start, stop = meta["data_offsets"]
                out[name] = (tuple(meta["shape"]), stop - start, meta["dtype"])
    return out


def hf_group(name: str) -> str:
    """The weight group of an HF tensor name, read off the HF name alone (independent of the table)."""
    if "embed_tokens" in name:
        return "embed"
    if name.startswith("lm_head"):
        return "lm_head"
    if "self_attn" in name:
        return "attention"
    if "shared_expert" in name:
        return "shared_experts"
    if ".experts." in name:
        return "experts"
    if re.search(r"\.mlp\.(gate|up|down)_proj\.", name):
        return "mlp"
    return "norms_router"  # input/post-attention/final norms and the router


def test_every_supported_family_is_checked():
    assert sorted(ALL_FAMILIES) == sorted(SUPPORTED_FAMILIES) and set(MOE_FAMILIES) < set(SUPPORTED_FAMILIES)


@pytest.mark.parametrize("family,layout", CASES)
def test_table_matches_the_checkpoint_on_disk(tiny_model, family, layout):
    from specplan.engine.model.checkpoint import canonical_name

    folder = tiny_model(family, layout=layout)
    spec = ModelSpec.from_hf_config(json.loads((folder / "config.json").read_text()))
    table = spec.tensors.by_name
    assert spec.dtype == "float32"  # the fixture writes float32: the table's bytes are at that dtype
    seen: set[str] = set()
    file_bytes = dict.fromkeys(WEIGHT_GROUPS, 0)
    for hf, (shape, nbytes, code) in read_headers(folder).items():
        assert nbytes == ELEMENT_BYTES[code] * math.prod(shape), hf
        file_bytes[hf_group(hf)] += nbytes
        fused = FUSED.match(hf)
        if fused:
            layer, kind = int(fused.group(1)), fused.group(2)
            parts = ("gate", "up") if kind == "gate_up_proj" else ("down",)
            names = [f"layers.{layer}.experts.{e}.{p}" for e in range(spec.num_experts) for p in parts]
            first = table[names[0]].shape
            assert shape == (spec.num_experts, len(parts) * first[0], first[1]), hf
            assert nbytes == sum(table[n].nbytes("float32") for n in names), hf
            assert all(table[n].group == "experts" for n in names)
            seen.update(names)
            continue
        name = canonical_name(hf)
        assert name in table, f"{hf} ({name}) is not in the table"
        t = table[name]
        assert (t.shape, t.nbytes("float32"), t.group) == (shape, nbytes, hf_group(hf)), hf
        seen.add(name)
    assert seen == set(table), f"in the table, not on disk: {sorted(set(table) - seen)[:5]}"
    assert file_bytes == spec.group_bytes("float32")
    assert sum(file_bytes.values()) == spec.weight_bytes("float32") == 4 * spec.total_params


def _specs() -> list[ModelSpec]:
    return [load_model_spec(n) for n in ("mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "olmoe-1b-7b",
                                         "smollm2-135m")] + [tiny_moe(), tiny_dense()]


@pytest.mark.parametrize("spec", _specs(), ids=lambda s: s.name)
def test_every_consumer_agrees_with_the_table(spec):
    t = spec.tensors
    by_group = dict.fromkeys(WEIGHT_GROUPS, 0)
    for x in t.tensors:
        by_group[x.group] += x.params
    assert spec.param_counts() == by_group
    assert spec.total_params == sum(x.params for x in t.tensors)
    # placement bytes: everything on the device is every tensor's bytes
    gb = Placement.uniform(spec).group_bytes(spec, "float32")
    assert {g: row["device"] for g, row in gb.items()} == {g: 4 * n for g, n in by_group.items() if n}
    # the planner's unit sizes, times how many units the model has, are the table's group bytes
    c = Costing(spec, cpu_profile(), "float32", "float32")
    n_moe, n_dense = len(spec.moe_layers), len(spec.dense_layers)
    planned = {"embed": c.sizes["embed"], "attention": spec.num_layers * c.sizes["attention"],
               "norms_router": c.sizes["final_norm"] + n_moe * c.sizes["router_norms"] + n_dense * c.sizes["norms"],
               "mlp": n_dense * c.sizes["mlp"], "experts": n_moe * spec.num_experts * c.sizes["expert"],
               "shared_experts": n_moe * c.sizes["shared"],
               "lm_head": 0 if spec.tie_word_embeddings else c.sizes["lm_head"]}
    assert planned == {g: 4 * n for g, n in by_group.items()}
    # matmul FLOPs: the planner's per-unit matmul parameters add up to the spec's per-token FLOPs
    m = c.matmul_params
    per_token = (spec.num_layers * m["attention"] + n_dense * m["mlp"]
                 + n_moe * (spec.experts_per_token * m["expert"] + m["router"] + m["shared"]) + m["lm_head"])
    assert 2 * per_token == spec.matmul_flops_per_token()
    active = sum(x.params for x in t.tensors if len(x.shape) == 2 and x.name != "embed"
                 and (x.expert is None or x.expert < spec.experts_per_token))
    assert per_token == active + (t.head.params if spec.tie_word_embeddings else 0)


def test_planner_and_engine_budget_count_the_same_kv_bytes():
    from specplan.engine.execute.budget import draft_kv_bytes, kv_bytes_by_tier

    spec, draft = tiny_moe(layers=3), tiny_dense(layers=1)
    plan = hand_plan(spec, cpu_profile(), draft=DraftSpec(kind="model", name="d", spec=draft), draft_len=3,
                     acceptance=0.8, decode_batch=4, num_batches=2)
    wl, pol = plan.workload, plan.policy
    capacity = kv_capacity(wl.prompt_len, wl.gen_len, pol.draft_len)
    planned = tier_bytes(plan)["decode"]["device"]
    assert kv_bytes_by_tier(plan, capacity, "float32")["device"] == planned["kv_cache"] > 0
    assert draft_kv_bytes(plan, capacity, "float32") == planned["draft_kv"] > 0
    assert planned["kv_cache"] == 2 * 4 * capacity * spec.kv_bytes_per_token("float32")
