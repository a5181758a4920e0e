"""The planner's kinds as types: the values are the strings plans and tables carry (``placement_counts`` keys
such as ``"draft@device/host"``), so typing them changes nothing that is written."""

from __future__ import annotations

from typing import Literal, cast

from specplan.contracts.plan import Tier

#: what the engine places whole: a layer's attention weights, its KV cache, its dense MLP, its shared expert, one
#: routed expert; the embedding, the head, and the whole draft model.
UnitKind = Literal["attention", "kv", "mlp", "shared", "expert", "embed", "lm_head", "draft"]
LAYER_UNITS: tuple[UnitKind, ...] = ("attention", "kv", "mlp", "shared", "expert")

#: the draft model's placement, written "<weights tier>/<kv tier>".
DraftTier = Literal["device/device", "device/host", "host/host"]
#: a unit's tier: a plan tier, or a draft tier for the draft model.
UnitTier = Tier | DraftTier

#: the staging pools a fetch fills.
Pool = Literal["device", "host"]
POOLS: tuple[Pool, ...] = ("device", "host")

#: the policy families whose choice changes the cost of some units.
Family = Literal["attention", "experts"]


def draft_tier(weights: str, kv: str) -> DraftTier:
    """The draft tier of weights on ``weights`` and KV cache on ``kv``."""
    return cast(DraftTier, f"{weights}/{kv}")


def draft_tiers(tier: DraftTier | str) -> tuple[Tier, Tier]:
    """(weights tier, KV tier) of a draft tier."""
    weights, kv = tier.split("/")
    return cast(Tier, weights), cast(Tier, kv)
