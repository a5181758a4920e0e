"""Time of one ``Op`` on a ``HardwareProfile``: a roofline over achieved rates plus fixed overheads.

    compute:  max(flops / achieved_flops(shape, dtype), bytes / achieved_bandwidth) + calls * per_op_s
    transfer: bytes / link_bandwidth(size) + latency

This is the only place the formulas live; search and simulator both call ``op_time_s``.
"""

from __future__ import annotations

from specplan.contracts.hardware import ComputeUnit, HardwareProfile
from specplan.planner.ops import Op

COMPUTE_RESOURCES = ("device_compute", "host_compute")


def physical_resource(resource: str, profile: HardwareProfile) -> str:
    """The resource that really does the work: without a GPU, host compute is the device (one CPU)."""
    if profile.shared_memory and resource == "host_compute":
        return "device_compute"
    return resource


def compute_unit(resource: str, profile: HardwareProfile) -> ComputeUnit:
    if resource == "device_compute":
        return profile.device
    if resource == "host_compute":
        return profile.host
    raise ValueError(f"{resource} is not a compute resource")


def compute_time_s(op: Op, unit: ComputeUnit, per_op_s: float) -> float:
    t_mem = op.bytes / unit.memory_bandwidth_Bps.median if op.bytes else 0.0
    t_flop = 0.0
    if op.kind == "matmul" and op.flops:
        m, k, n = op.shape if op.shape else (1, None, None)
        t_flop = op.flops / unit.matmul_flops(op.dtype or unit.dtypes[0], m, k, n)
    elif op.kind == "attention" and op.bytes and unit.decode_attention_Bps is not None:
        # decode attention streams the KV cache: its achieved rate is measured over the KV bytes of one call
        t_mem = op.bytes / unit.decode_attention_Bps.at(op.bytes / max(op.calls, 1))
    return max(t_flop, t_mem) + op.calls * per_op_s


def transfer_time_s(op: Op, profile: HardwareProfile) -> float:
    size = op.bytes / max(op.calls, 1)  # each call moves one tensor of this size
    if op.resource == "h2d":
        return op.calls * profile.h2d_time_s(size)
    if op.resource == "d2h":
        return op.calls * profile.d2h_time_s(size)
    if op.resource == "disk_read":
        return op.calls * profile.disk_read_time_s(size, direct=profile.disk.o_direct)
    if op.resource == "disk_write":
        link = profile.link("disk_write")
        if link is None:
            raise KeyError(f"profile '{profile.name}' has no disk write figures")
        return op.calls * link.time_s(size)
    raise ValueError(f"{op.resource} is not a transfer resource")


def op_time_s(op: Op, profile: HardwareProfile) -> float:
    """Seconds ``op`` occupies its resource."""
    if op.resource in COMPUTE_RESOURCES:
        return compute_time_s(op, compute_unit(op.resource, profile), profile.overheads.per_op_s)
    return transfer_time_s(op, profile)
