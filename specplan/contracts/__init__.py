"""The JSON contracts every room shares. Import from here."""

from specplan.contracts.hardware import LINKS, ComputeUnit, Curve, HardwareProfile, Link, MatmulCurve, Overheads, Point, Provenance, Stat
from specplan.contracts.model import DTYPE_BYTES, WEIGHT_GROUPS, ModelSpec, dtype_bytes
from specplan.contracts.plan import TIERS, Capacities, DraftSpec, LayerPlacement, ModelRef, Placement, Plan, Policy, Prediction, Workload
from specplan.contracts.strict import Strict
from specplan.contracts.timeline import RESOURCES, Event, Resource, Timeline

__all__ = [
    "LINKS", "ComputeUnit", "Curve", "HardwareProfile", "Link", "MatmulCurve", "Overheads", "Point", "Provenance",
    "Stat", "DTYPE_BYTES", "WEIGHT_GROUPS", "ModelSpec", "dtype_bytes", "TIERS", "Capacities", "DraftSpec",
    "LayerPlacement", "ModelRef", "Placement", "Plan", "Policy", "Prediction", "Workload", "RESOURCES", "Event",
    "Timeline", "Resource", "Strict",
]
