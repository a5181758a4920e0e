"""HardwareProfile: what a machine achieves, measured (``specplan profile``) or from published figures.

The planner reads profiles only through the methods here (``Curve.at``, ``Link.time_s``,
``ComputeUnit.matmul_flops`` ...), which interpolate over transfer size and matmul shape. Measured and published
profiles go through the same interface.
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
from typing import Literal

from pydantic import Field, model_validator

from specplan.contracts.strict import Strict
from specplan.contracts.tensors import dtype_bytes
from specplan.errors import ContractError

SCHEMA_VERSION = 1

#: the link names a profile may carry.
LINKS = (
    "h2d_pinned",
    "h2d_pageable",
    "d2h_pinned",
    "d2h_pageable",
    "disk_read_direct",
    "disk_read_buffered",
    "disk_write",
)


#: the engine process's resident bytes outside a plan's tensors where a profile has no measured figure (published
#: profiles). cpu: ``engine.measure.resident`` on a 24 GiB x86 VM with torch 2.13 measured 388 MiB of peak RSS,
#: 516 MiB with its margin; rounded up to 640 MiB for other library versions. cuda: that plus the CUDA context's
#: host side and the cuBLAS / cuDNN images a first matmul loads (commonly 1-1.5 GiB of host RSS), rounded up; an
#: estimate, not measured here. ``specplan profile`` measures a machine and replaces the estimate.
DEFAULT_PROCESS_RESIDENT_BYTES = {"cpu": 640 << 20, "cuda": 2 << 30}
#: host RAM left to the operating system (page tables, services, the page cache of the offload reads) whatever the
#: plan: this fraction of the host's memory, at least ``OS_RESERVE_MIN_BYTES``.
OS_RESERVE_FRACTION, OS_RESERVE_MIN_BYTES = 0.02, 1 << 30
#: a measured profile is contended when other processes (and the hypervisor's steal) used more than this share of
#: the CPUs while it was measured: ``specplan profile`` re-measures it, then refuses to keep it as this machine's.
CONTENDED_CPU_FRACTION = 0.10
#: a measured profile older than this is stale: plans and runs on it say so.
STALE_PROFILE_S = 7 * 86400.0


class Stat(Strict):
    """A measured quantity over repeated samples (a published figure has min = median = max)."""

    min: float = Field(gt=0)
    median: float = Field(gt=0)
    max: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Stat":
        if not self.min <= self.median <= self.max:
            raise ValueError(f"expected min <= median <= max, got {self.min}, {self.median}, {self.max}")
        return self

    @classmethod
    def of(cls, value: float) -> "Stat":
        return cls(min=value, median=value, max=value)

    @classmethod
    def from_samples(cls, samples: list[float]) -> "Stat":
        s = sorted(samples)
        if not s:
            raise ValueError("no samples")
        n = len(s)
        med = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
        return cls(min=s[0], median=med, max=s[-1])

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative noise of the samples."""
        return (self.max - self.min) / self.median

    def scaled(self, factor: float) -> "Stat":
        """Every sample times ``factor`` (> 0)."""
        return Stat(min=self.min * factor, median=self.median * factor, max=self.max * factor)


class Point(Strict):
    """One x of a curve with the statistics of y there."""

    x: float = Field(gt=0)
    y: Stat


class Curve(Strict):
    """y over a positive x (a size in bytes, a number of rows ...), interpolated linearly in log(x).

    Outside the measured range the value of the nearest end is used (no extrapolation).
    """

    x_name: str
    y_name: str
    points: list[Point] = Field(min_length=1)

    @model_validator(mode="after")
    def _sorted(self) -> "Curve":
        xs = [p.x for p in self.points]
        if any(b <= a for a, b in zip(xs, xs[1:])):
            raise ValueError("points must have strictly increasing x")
        return self

    @classmethod
    def constant(cls, x_name: str, y_name: str, value: float, x: float = 1.0) -> "Curve":
        return cls(x_name=x_name, y_name=y_name, points=[Point(x=x, y=Stat.of(value))])

    def scaled(self, factor: float) -> "Curve":
        """The curve with every y times ``factor`` (> 0)."""
        return self.model_copy(update={"points": [Point(x=p.x, y=p.y.scaled(factor)) for p in self.points]})

    def at(self, x: float, stat: Literal["min", "median", "max"] = "median") -> float:
        pts = self.points
        if x <= pts[0].x:
            return getattr(pts[0].y, stat)
        if x >= pts[-1].x:
            return getattr(pts[-1].y, stat)
        i = bisect.bisect_right([p.x for p in pts], x)
        a, b = pts[i - 1], pts[i]
        t = (math.log(x) - math.log(a.x)) / (math.log(b.x) - math.log(a.x))
        ya, yb = getattr(a.y, stat), getattr(b.y, stat)
        return ya + t * (yb - ya)


class Link(Strict):
    """A data path: achieved bandwidth over transfer size plus a fixed latency per transfer."""

    bandwidth_Bps: Curve
    latency_s: float = Field(ge=0)
    #: measured profiles: the samples behind ``latency_s`` (its min / median / max).
    latency_samples_s: Stat | None = None
    #: measured disk reads: the bandwidth of a stream of back-to-back transfers lasting seconds, after its first
    #: third (a VM's disk may throttle a stream after a burst); no transfer in a stream goes faster than this.
    sustained_Bps: Stat | None = None

    def bandwidth_at(self, nbytes: float) -> float:
        return self.bandwidth_Bps.at(nbytes)

    def time_s(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` in one transfer of a stream (0 bytes cost nothing): the measured time at that
        size, and never less than ``nbytes / sustained_Bps`` where the link has a sustained figure."""
        if nbytes <= 0:
            return 0.0
        t = self.latency_s + nbytes / self.bandwidth_at(nbytes)
        if self.sustained_Bps is not None:
            t = max(t, nbytes / self.sustained_Bps.median)
        return t

    def scaled(self, speed: float) -> "Link":
        """The link ``speed`` times as fast (> 0): bandwidths times ``speed``, latencies over it, so that
        ``time_s`` of every size is divided by ``speed``."""
        return self.model_copy(update={
            "bandwidth_Bps": self.bandwidth_Bps.scaled(speed), "latency_s": self.latency_s / speed,
            "latency_samples_s": None if self.latency_samples_s is None else self.latency_samples_s.scaled(1 / speed),
            "sustained_Bps": None if self.sustained_Bps is None else self.sustained_Bps.scaled(speed)})


class MatmulCurve(Strict):
    """Achieved FLOP/s of ``(m x k) @ (k x n)`` in ``dtype`` over the number of rows ``m``; ``blocked``: on a weight
    kept in the CPU kernel's own blocked layout (``engine/model/blocked.py``: the engine's resident weights where
    the profile has such curves), else on a plain row-major weight, as every streamed weight is."""

    dtype: str
    k: int = Field(gt=0)
    n: int = Field(gt=0)
    flops: Curve  # x = rows m, y = achieved FLOP/s
    blocked: bool = False


class ComputeUnit(Strict):
    """The device (a GPU, or the CPU itself when there is none) or the host CPU."""

    kind: Literal["cuda", "cpu"]
    name: str
    memory_bytes: int = Field(gt=0)
    memory_bandwidth_Bps: Stat
    matmul: list[MatmulCurve] = Field(min_length=1)
    #: decode attention (one query token per sequence over its KV cache): bytes of KV read per second,
    #: over the KV bytes read by one call.
    decode_attention_Bps: Curve | None = None
    #: the cache's dtype that curve was measured in, where its time follows the elements read rather than the bytes
    #: (a CPU's SDPA: a bfloat16 cache reads half the bytes per second of a float32 one); None: the rate is bytes per
    #: second whatever the dtype (a GPU's attention is bound by memory bandwidth; published figures)
    decode_attention_dtype: str | None = None
    #: the engine's elementwise work around a layer's matmuls (norms, rope, activation, gathers, residuals), as the
    #: matmuls' activation bytes (``contracts.rows``) per second, by the activations' dtype; None: not measured
    #: (charged nothing)
    elementwise_Bps: dict[str, Stat] | None = None
    threads: int | None = None

    @property
    def dtypes(self) -> list[str]:
        return sorted({c.dtype for c in self.matmul})

    def attention_time_s(self, kv_bytes: float, calls: float, dtype: str | None) -> float | None:
        """Seconds of decode attention reading ``kv_bytes`` of a ``dtype`` cache in ``calls`` calls, at the measured
        rate of the same number of elements in ``decode_attention_dtype`` where that is recorded; None: not measured."""
        if self.decode_attention_Bps is None:
            return None
        measured = self.decode_attention_dtype
        read = kv_bytes * (dtype_bytes(measured) / dtype_bytes(dtype) if measured and dtype else 1.0)
        return read / self.decode_attention_Bps.at(read / max(calls, 1))

    def blocks(self, dtype: str) -> bool:
        """Whether resident weights of ``dtype`` are kept blocked: the profile measured blocked curves for it (the
        profiler does on a CPU without a GPU where the kernel exists; the engine and the cost model both follow it)."""
        return any(c.blocked and c.dtype == dtype for c in self.matmul)

    def matmul_curve(self, dtype: str, k: int | None = None, n: int | None = None,
                     blocked: bool = False) -> MatmulCurve:
        """The curve of ``dtype`` (blocked or plain weights; plain where no blocked curve was measured) whose weight
        shape is the nearest to ``k x n`` (in log size; the first without one).

        A dtype without figures raises ``KeyError``: the planner never silently assumes a rate.
        """
        curves = [c for c in self.matmul if c.dtype == dtype]
        if blocked and any(c.blocked for c in curves):
            curves = [c for c in curves if c.blocked]
        else:
            curves = [c for c in curves if not c.blocked] or curves
        if not curves:
            raise KeyError(f"no matmul figures for dtype {dtype} on {self.name} (have {', '.join(self.dtypes)})")
        if k is not None and n is not None and len(curves) > 1:
            target = math.log(k * n)
            curves.sort(key=lambda c: abs(math.log(c.k * c.n) - target))
        return curves[0]

    def matmul_flops(self, dtype: str, m: float, k: int | None = None, n: int | None = None,
                     blocked: bool = False) -> float:
        """Achieved FLOP/s for ``m`` rows on the curve ``matmul_curve(dtype, k, n, blocked)``."""
        return self.matmul_curve(dtype, k, n, blocked).flops.at(max(m, 1))

    def peak_matmul_flops(self, dtype: str) -> float:
        return max(p.y.median for c in self.matmul if c.dtype == dtype for p in c.flops.points)


class Overheads(Strict):
    """Fixed costs the engine pays regardless of size."""

    per_op_s: float = Field(ge=0)  # framework dispatch of one kernel / torch op
    per_layer_s: float = Field(ge=0)  # python and bookkeeping per transformer layer (at width 0, see below)
    #: the part of a layer's fixed cost that grows with the model's hidden size: seconds per unit of width (0: not
    #: measured); a layer of width h costs ``layer_s(h)``
    per_layer_per_width_s: float = Field(0.0, ge=0)
    per_step_s: float = Field(ge=0)  # per forward pass (sampling, batch bookkeeping)
    thread_handoff_s: float = Field(ge=0)  # handing a ready buffer from the prefetch thread to the compute thread
    #: host RAM the engine process holds outside a plan's tensors (interpreter, torch and its libraries, the CUDA
    #: context's host side, allocator arenas, thread stacks), measured by ``specplan profile``
    #: (``engine.measure.resident``); None: ``DEFAULT_PROCESS_RESIDENT_BYTES`` of the device kind.
    process_resident_bytes: int | None = Field(None, gt=0)
    #: compute time while the disk streams (O_DIRECT) over compute time with the disk idle, measured by
    #: ``specplan profile`` on a CPU device (``engine.measure.interference``); 1: no slowdown (GPUs, bundled profiles)
    compute_slowdown_while_streaming: float = Field(1.0, ge=1.0)
    #: measured profiles: the samples behind each figure above, by field name (min / median / max).
    samples_s: dict[str, Stat] | None = None

    def layer_s(self, width: int) -> float:
        """The fixed cost of one layer of hidden size ``width``."""
        return self.per_layer_s + width * self.per_layer_per_width_s


class CalibrationFit(Strict):
    """Figures of a profile refitted on measured runs (``specplan calibrate``): what replaced what, and on which
    runs. ``speed``: figure -> the profile's time for the runs' work over the time it took (the factor the
    figure was scaled by); ``overhead_s``: fixed overheads replaced by the fitted seconds."""

    fitted_utc: str
    base_profile: str = Field(min_length=1)  # the name of the profile the figures were refitted from
    fitted_on: list[str] = Field(min_length=1)  # the runs (their folders) the figures were fitted on
    speed: dict[str, float] = {}
    overhead_s: dict[str, float] = {}

    @model_validator(mode="after")
    def _positive(self) -> "CalibrationFit":
        bad = [k for k, v in {**self.speed, **self.overhead_s}.items() if not (v >= 0 and math.isfinite(v))]
        if bad or any(v == 0 for v in self.speed.values()):
            raise ValueError(f"fitted figures must be positive and finite: {', '.join(bad) or 'a speed of 0'}")
        return self


class Provenance(Strict):
    kind: Literal["measured", "published"]
    created_utc: str
    #: for published figures: where each number comes from (datasheets, papers, reviews).
    source: str | None = None
    command: str | None = None
    torch_version: str | None = None
    hostname: str | None = None
    device_name: str | None = None
    cpu_name: str | None = None
    notes: str | None = None
    #: measured profiles: the share of all CPUs' time other processes (and the hypervisor's steal) used while the
    #: profile was measured (None: not recorded); above ``CONTENDED_CPU_FRACTION`` the profile is contended.
    others_cpu_fraction: float | None = Field(None, ge=0, le=1)
    #: measured profiles: the digest of the engine code whose fixed costs were timed (``specplan.machine``;
    #: None: not recorded)
    engine_digest: str | None = None
    #: a profile refitted on measured runs: its figures, the runs, when (None: the figures as measured)
    calibration: CalibrationFit | None = None

    @model_validator(mode="after")
    def _sourced(self) -> "Provenance":
        if self.kind == "published" and not self.source:
            raise ValueError("a published profile must name its source")
        return self

    @property
    def contended(self) -> bool:
        """Measured while other processes took more than ``CONTENDED_CPU_FRACTION`` of the CPUs."""
        return self.others_cpu_fraction is not None and self.others_cpu_fraction > CONTENDED_CPU_FRACTION

    def age_s(self, now: dt.datetime | None = None) -> float | None:
        """Seconds since ``created_utc`` (None when it is not an ISO time)."""
        try:
            created = dt.datetime.strptime(self.created_utc, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
        except ValueError:
            return None
        return ((now or dt.datetime.now(dt.timezone.utc)) - created).total_seconds()

    def stale(self, now: dt.datetime | None = None) -> bool:
        """A measured profile older than ``STALE_PROFILE_S``."""
        age = self.age_s(now)
        return self.kind == "measured" and age is not None and age > STALE_PROFILE_S

    def cleanliness(self) -> str:
        """How clean the measurement was, in words."""
        if self.kind != "measured":
            return "published figures (not measured here)"
        if self.others_cpu_fraction is None:
            return "cleanliness not recorded (measured before specplan recorded other processes' CPU share)"
        verdict = "CONTENDED" if self.contended else "clean"
        return (f"{verdict}: other processes used {self.others_cpu_fraction:.0%} of the CPUs while measuring "
                f"(contended above {CONTENDED_CPU_FRACTION:.0%})")

    def foreign(self, cpu_name: str, engine_digest: str) -> list[str]:
        """What differs between where this measured profile was taken and ``cpu_name`` / ``engine_digest`` (this
        machine's, ``specplan.machine``), one line each: its figures are another CPU's, or its fixed costs another
        engine's. Empty for published profiles and figures not recorded."""
        if self.kind != "measured":
            return []
        out = []
        if self.cpu_name and self.cpu_name != cpu_name:
            out.append(f"the profile was measured on another CPU ({self.cpu_name}; this one is {cpu_name}): "
                       f"re-measure it here (specplan profile)")
        if self.engine_digest and self.engine_digest != engine_digest:
            out.append(f"the profile was measured with other engine code (digest {self.engine_digest}, this "
                       f"engine's {engine_digest}): its fixed costs may have changed; re-measure it (specplan profile)")
        return out

    def warnings(self, now: dt.datetime | None = None, here: tuple[str, str] | None = None) -> list[str]:
        """One line each when a measured profile is contended, older than ``STALE_PROFILE_S``, or (``here``: this
        machine's CPU name and engine digest) ``foreign``; none otherwise."""
        if self.kind != "measured":
            return []
        out = self.foreign(*here) if here else []
        if self.contended:
            out.append(f"the profile was measured while other processes used {self.others_cpu_fraction:.0%} of the "
                       f"CPUs (contended): its figures may be low; re-measure on an idle machine (specplan profile)")
        if self.stale(now):
            age = self.age_s(now) or 0.0
            out.append(f"the profile is {age / 86400:.1f} days old (stale after {STALE_PROFILE_S / 86400:.0f}): "
                       f"the machine may have changed; re-measure it (specplan profile)")
        return out


class DiskInfo(Strict):
    path: str | None = None  # the offload folder measured
    filesystem: str | None = None
    o_direct: bool = False  # whether O_DIRECT reads work there
    capacity_bytes: int | None = None


class HardwareProfile(Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    provenance: Provenance
    device: ComputeUnit
    host: ComputeUnit
    #: True when there is no separate device memory (no GPU): device and host are one memory and one compute
    #: unit, the host->device link is free (zero copy), and offloaded weights stream from disk.
    shared_memory: bool
    links: dict[str, Link]
    overheads: Overheads
    disk: DiskInfo = DiskInfo()

    @model_validator(mode="after")
    def _links(self) -> "HardwareProfile":
        unknown = set(self.links) - set(LINKS)
        if unknown:
            raise ValueError(f"unknown link(s) {sorted(unknown)}; known: {', '.join(LINKS)}")
        if not self.shared_memory and not ({"h2d_pinned", "h2d_pageable"} & set(self.links)):
            raise ValueError("a profile with separate device memory needs an h2d_pinned or h2d_pageable link")
        if self.shared_memory and self.device.kind != "cpu":
            raise ValueError("shared_memory is only for a device of kind 'cpu'")
        return self

    @property
    def has_host_tier(self) -> bool:
        """Whether host memory is a tier of its own (a GPU machine). Without one (``shared_memory``) nothing is
        placed on a separate host tier, host compute is the device's, and fetches are disk reads only."""
        return not self.shared_memory

    def process_resident(self) -> tuple[int, str]:
        """(bytes, source): the engine process's own resident bytes outside a plan's tensors on this machine."""
        measured = self.overheads.process_resident_bytes
        if measured is not None:
            return measured, f"measured by specplan profile ({self.provenance.kind} profile {self.name})"
        return DEFAULT_PROCESS_RESIDENT_BYTES[self.device.kind], (
            f"the default for a {self.device.kind} machine: profile {self.name} has no measured figure")

    def os_reserve_bytes(self) -> int:
        """Host RAM left to the operating system: ``OS_RESERVE_FRACTION`` of it, at least ``OS_RESERVE_MIN_BYTES``."""
        return max(OS_RESERVE_MIN_BYTES, int(OS_RESERVE_FRACTION * self.host.memory_bytes))

    def link(self, name: str) -> Link | None:
        return self.links.get(name)

    def h2d_link_name(self, pinned: bool = True) -> str:
        """The link host->device copies are timed on: pinned or pageable as asked, the other where only it is there
        (a profile with a host tier has one: the validator checks it)."""
        return next(n for n in ("h2d_pinned", "h2d_pageable")[:: 1 if pinned else -1] if n in self.links)

    def h2d_time_s(self, nbytes: float, pinned: bool = True) -> float:
        """Host->device copy time; zero when host and device share memory."""
        if not self.has_host_tier or nbytes <= 0:
            return 0.0
        return self.links[self.h2d_link_name(pinned)].time_s(nbytes)

    def d2h_time_s(self, nbytes: float, pinned: bool = True) -> float:
        if not self.has_host_tier or nbytes <= 0:
            return 0.0
        link = self.links.get("d2h_pinned" if pinned else "d2h_pageable") or self.links.get(
            "d2h_pageable" if pinned else "d2h_pinned"
        )
        if link is None:  # fall back to the host->device figure, links are roughly symmetric
            return self.h2d_time_s(nbytes, pinned)
        return link.time_s(nbytes)

    def disk_read_link_name(self, direct: bool = True) -> str:
        """The link disk reads are timed on: O_DIRECT or buffered as asked, the other where only it is there."""
        for name in ("disk_read_direct", "disk_read_buffered")[:: 1 if direct else -1]:
            if name in self.links:
                return name
        raise ContractError(f"profile '{self.name}' has no disk read figures (links disk_read_direct or "
                            f"disk_read_buffered); measure one with `specplan profile`, or add them to the file")

    def disk_read_time_s(self, nbytes: float, direct: bool = True) -> float:
        return self.links[self.disk_read_link_name(direct)].time_s(nbytes)
