"""Time of one ``Op`` on a ``HardwareProfile``: a roofline over achieved rates plus fixed overheads.

    compute:   max(flops / achieved_flops(shape, dtype), bytes / memory_bandwidth) + act_bytes / elementwise_Bps
               + calls * per_op_s (an elementwise op: its bytes at elementwise_Bps)
    attention: the same, with the bytes (the KV cache read) at the measured decode-attention rate
    transfer:  calls * (bytes / calls / link_bandwidth(bytes / calls) + latency); a disk read that is part of a
               larger read of R bytes (a whole layer): bytes * (R / link_bandwidth(R) + latency) / R
    plus the fixed costs the op names (per layer, per step, thread hand-off), from ``profile.overheads``.

This is the only place the formulas live; search, prediction and simulator all call ``op_time_s``.
"""

from __future__ import annotations

from specplan.contracts.hardware import ComputeUnit, HardwareProfile
from specplan.contracts.tensors import unpacked_dtype
from specplan.contracts.timeline import physical_resource as physical_of
from specplan.errors import ContractError
from specplan.planner.ops import COMPUTE_RESOURCES, Op


def physical_resource(resource: str, profile: HardwareProfile) -> str:
    """The resource that really does the work on ``profile`` (``contracts.timeline.physical_resource``)."""
    return physical_of(resource, not profile.has_host_tier)


def compute_unit(resource: str, profile: HardwareProfile) -> ComputeUnit:
    if resource == "device_compute":
        return profile.device
    if resource == "host_compute":
        return profile.host
    raise ValueError(f"{resource} is not a compute resource")


def compute_dtype(unit: ComputeUnit, dtype: str | None) -> str:
    """The dtype whose matmul figures apply: the op's own (a GGUF block format: the dtype it unpacks to), or
    float32 when the unit has none for it (a CPU without bf16 figures computes bf16 weights after converting them)."""
    have = unit.dtypes
    if dtype is not None and unpacked_dtype(dtype) in have:
        return unpacked_dtype(dtype)
    return "float32" if "float32" in have else have[0]


def elementwise_rate(unit: ComputeUnit, dtype: str | None) -> float | None:
    """The unit's measured elementwise bytes per second for activations of the op's compute dtype (else the nearest
    measured: float32's for a dtype without figures); None where none was measured."""
    rates = unit.elementwise_Bps
    if not rates:
        return None
    d = compute_dtype(unit, dtype)
    got = rates.get(d) or rates.get("float32") or next(iter(rates.values()))
    return got.median


def compute_time_s(op: Op, unit: ComputeUnit, per_op_s: float) -> float:
    t_mem = op.bytes / unit.memory_bandwidth_Bps.median if op.bytes else 0.0
    t_flop = 0.0
    if op.kind in ("matmul", "attention") and op.flops:
        m, k, n = op.shape if op.shape else (1, None, None)
        t_flop = op.flops / unit.matmul_flops(compute_dtype(unit, op.dtype), m, k, n, op.blocked)
    if op.kind == "attention" and op.bytes and unit.decode_attention_Bps is not None:
        # attention streams the KV cache: its achieved rate is measured over the KV bytes of one call
        t_mem = unit.attention_time_s(op.bytes, op.calls, op.dtype)
    ew = elementwise_rate(unit, op.dtype)
    if op.kind == "elementwise" and op.bytes and ew is not None:
        t_mem = op.bytes / ew
    t_act = op.act_bytes / ew if op.act_bytes and ew is not None else 0.0
    return max(t_flop, t_mem) + t_act + op.calls * per_op_s


def transfer_time_s(op: Op, profile: HardwareProfile) -> float:
    if op.bytes <= 0:
        return 0.0
    size = op.bytes / max(op.calls, 1)  # each call moves one tensor of this size
    if op.resource == "h2d":
        return op.calls * profile.h2d_time_s(size)
    if op.resource == "d2h":
        return op.calls * profile.d2h_time_s(size)
    if op.resource == "disk_read":
        if op.read_bytes:  # its share of one larger read
            return op.bytes * profile.disk_read_time_s(op.read_bytes, direct=profile.disk.o_direct) / op.read_bytes
        return op.calls * profile.disk_read_time_s(size, direct=profile.disk.o_direct)
    if op.resource == "disk_write":
        link = profile.link("disk_write")
        if link is None:
            raise ContractError(f"profile '{profile.name}' has no disk write figures (link disk_write); measure one "
                                f"with `specplan profile`, or add it to the file")
        return op.calls * link.time_s(size)
    raise ValueError(f"{op.resource} is not a transfer resource")


def overhead_s(op: Op, profile: HardwareProfile) -> float:
    """The fixed costs the op carries (per layer, per step, thread hand-off), from the profile."""
    return sum(getattr(profile.overheads, name) * count for name, count in op.overheads)


def op_time_s(op: Op, profile: HardwareProfile) -> float:
    """Seconds ``op`` occupies its resource when it happens."""
    if op.resource in COMPUTE_RESOURCES:
        t = compute_time_s(op, compute_unit(op.resource, profile), profile.overheads.per_op_s)
    else:
        t = transfer_time_s(op, profile)
    return t + overhead_s(op, profile) if op.overheads else t


def expected_time_s(op: Op, profile: HardwareProfile) -> float:
    """``prob * op_time_s``: the expected seconds of an op that happens with probability ``op.prob``."""
    return op.prob * op_time_s(op, profile) if op.prob else 0.0
