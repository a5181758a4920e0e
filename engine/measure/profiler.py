"""``specplan profile``: measure this machine into a ``HardwareProfile``.

    profile = measure_profile(ProfileConfig.quick())

Links (disk; on a GPU also host<->device copies) are in ``profile_links``, compute throughput in
``profile_compute``, fixed costs in ``profile_overheads``, the timing primitives in ``profile_timing``. On a machine
without a GPU the CPU is measured once and used for both ``device`` and ``host`` (``shared_memory=True``: one memory,
zero-copy host->device, no h2d/d2h links).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from specplan.contracts.hardware import ComputeUnit, HardwareProfile, Provenance, Stat
from specplan.engine.measure import compute as pc
from specplan.engine.measure import links as pl
from specplan.engine.measure.interference import ROWS, expert_probe, streaming_slowdown
from specplan.engine.measure.overheads import measure_overheads
from specplan.engine.measure.resident import measure_process_resident
from specplan.engine.measure.timing import CpuUsage, Ticker
from specplan.errors import SpecplanError
from specplan.fmt import GiB, KiB, MiB
from specplan.machine import cpu_name, engine_digest


def _pow(lo: int, hi: int, step: int) -> tuple[int, ...]:
    out, x = [], lo
    while x <= hi:
        out.append(x)
        x *= step
    return tuple(out)


@dataclass(frozen=True)
class ProfileConfig:
    """What to measure and how hard. ``quick()``, ``full()`` and ``tiny()`` (tests) are the presets."""

    device: str = "cpu"
    #: folder of the disk test (the engine's offload folder); None = ``specplan.catalog.user_dir() / "offload"``.
    offload_dir: Path | None = None
    link_sizes: tuple[int, ...] = _pow(64 * KiB, 256 * MiB, 4)
    disk_file_bytes: int = 1 * GiB
    #: seconds of back-to-back O_DIRECT reads for the sustained disk bandwidth (0: not measured)
    disk_stream_s: float = 3.0
    reps: int = 5
    min_sample_s: float = 0.02
    matmul_shapes: tuple[tuple[int, int], ...] = ((576, 1536), (2048, 2048), (4096, 4096))
    decode_rows: tuple[int, ...] = _pow(1, 512, 2)
    prefill_rows: tuple[int, ...] = (1024, 2048)
    attention_kv_bytes: tuple[int, ...] = _pow(64 * KiB, 64 * MiB, 4)
    #: catalog model whose attention geometry (heads, KV heads, head dim) the decode-attention test uses.
    attention_model: str = "llama-3.1-8b"
    membw_bytes: int = 256 * MiB
    #: bytes of the rotated weight / KV copies per curve; None = ``default_working_set``.
    working_set_bytes: int | None = None
    #: CPU threads torch computes with while measuring; None = torch's default (all cores).
    threads: int | None = None
    preset: str = "quick"
    name: str | None = None
    command: str | None = None
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def quick(cls, **kw) -> "ProfileConfig":
        return cls(**kw)

    @classmethod
    def full(cls, **kw) -> "ProfileConfig":
        base = dict(
            link_sizes=_pow(64 * KiB, 256 * MiB, 2), disk_file_bytes=2 * GiB, disk_stream_s=6.0, reps=7,
            min_sample_s=0.04,
            matmul_shapes=((576, 1536), (2048, 2048), (4096, 4096), (4096, 14336)), prefill_rows=(1024, 2048, 4096),
            attention_kv_bytes=_pow(64 * KiB, 256 * MiB, 4), membw_bytes=512 * MiB, preset="full",
        )
        return cls(**{**base, **kw})

    @classmethod
    def tiny(cls, **kw) -> "ProfileConfig":
        """A few seconds: for tests (every figure is measured, on fewer and smaller points)."""
        base = dict(
            link_sizes=_pow(64 * KiB, 4 * MiB, 4), disk_file_bytes=48 * MiB, disk_stream_s=0.2, reps=3,
            min_sample_s=0.005,
            matmul_shapes=((576, 1536), (2048, 2048)), decode_rows=(1, 4, 16, 64, 256), prefill_rows=(),
            attention_kv_bytes=(64 * KiB, 1 * MiB, 4 * MiB), membw_bytes=128 * MiB, working_set_bytes=64 * MiB,
            preset="tiny",
        )
        return cls(**{**base, **kw})

    @property
    def rows(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.decode_rows) | set(self.prefill_rows)))

    def resolved(self) -> "ProfileConfig":
        """Defaults filled in from this machine: the offload folder and the working set."""
        from specplan.catalog import user_dir

        return replace(
            self,
            offload_dir=Path(self.offload_dir or user_dir() / "offload").expanduser(),
            working_set_bytes=self.working_set_bytes or default_working_set(pc.last_level_cache_bytes(),
                                                                            host_memory_bytes()),
        )


def default_working_set(llc_bytes: int | None, host_bytes: int) -> int:
    """Bytes of weight copies each matmul curve rotates over: 4 x the last-level cache, at least 128 MiB, and at
    most 1/64 of the host's memory. All curves are held at once and sampled round-robin, so together they exceed
    the cache many times even where a VM reports its host's whole shared L3 (480 MiB here: 4 x that per curve over a
    dozen curves was more than the machine's 24 GiB)."""
    return max(128 * MiB, min(4 * (llc_bytes or 32 * MiB), host_bytes // 64))


def check_device(device: str) -> str:
    """``device`` if this machine has it; ``SpecplanError`` with what to do otherwise."""
    import torch

    if device not in ("cpu", "cuda"):
        raise SpecplanError(f"--device {device}: unknown device; use cuda or cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecplanError(
            f"--device cuda: no CUDA device here (torch {torch.__version__}, "
            f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu"
        )
    return device


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _attention_spec(config: ProfileConfig):
    from specplan.catalog import load_model_spec

    return load_model_spec(config.attention_model)


def _steps_compute(config: ProfileConfig, dtypes: list[str], blocked: bool) -> int:
    """Progress steps of ``measure_unit``: matmul points, attention points, memory bandwidth."""
    c = config
    return (pc.matmul_steps(len(pc.curve_keys(c.matmul_shapes, dtypes, blocked)), c.rows, c.reps)
            + pc.attention_steps(len(c.attention_kv_bytes), c.reps) + 1)


def plans_dtype(dtypes: list[str]) -> str:
    """The compute dtype the fixed costs, decode attention and the stream's slowdown are measured in: bfloat16 where
    it is profiled (plans on this CPU run at it: its matmuls are the faster and its bytes half), else float32."""
    return "bfloat16" if "bfloat16" in dtypes else "float32"


def measure_unit(config: ProfileConfig, device: str, dtypes: list[str], name: str, memory_bytes: int,
                 ticker: Ticker, blocked: bool = False) -> tuple[ComputeUnit, list[str]]:
    """Matmul curves (``blocked``: also the blocked kernel's, ``compute.matmul_curves``), decode attention and
    memory bandwidth of one compute unit."""
    import torch

    c = config
    matmul = pc.matmul_curves(c.matmul_shapes, c.rows, dtypes, device, c.reps, c.min_sample_s, c.working_set_bytes,
                              ticker, blocked)
    spec = _attention_spec(c)
    attention = pc.attention_curve(spec, c.attention_kv_bytes, device, c.reps, c.min_sample_s, c.working_set_bytes,
                                   ticker, plans_dtype(dtypes))
    membw, note = pc.memory_bandwidth(device, c.membw_bytes, c.reps, c.min_sample_s)
    ew_dtypes = [d for d in ("float32", "bfloat16", "float16") if d in dtypes]
    elementwise = {d: pc.elementwise_rate(d, device, c.reps, c.min_sample_s) for d in ew_dtypes}
    ticker.tick(f"memory bandwidth ({device})")
    unit = ComputeUnit(
        kind="cuda" if device == "cuda" else "cpu", name=name, memory_bytes=memory_bytes, memory_bandwidth_Bps=membw,
        matmul=matmul, decode_attention_Bps=attention,
        decode_attention_dtype=None if device == "cuda" else plans_dtype(dtypes), elementwise_Bps=elementwise,
        threads=None if device == "cuda" else torch.get_num_threads(),
    )
    notes = [note, f"decode attention: the engine's attend (SDPA, bool mask, GQA), {spec.name} geometry "
                   f"({spec.num_heads} heads, {spec.num_kv_heads} KV heads of {spec.head_dim}), {plans_dtype(dtypes)}, "
                   f"one sequence per call",
             *([f"matmul blocked: {', '.join(b)} weights in oneDNN's blocked layout, reordered once (the engine's "
                f"resident weights, engine/model/blocked.py)"] if (b := pc.blocked_dtypes(dtypes, blocked)) else []),
             f"elementwise_Bps: the engine's elementwise code of one MoE layer ({', '.join(ew_dtypes)}, "
             f"{' and '.join(map(str, pc.EW_ROWS))} rows) as its matmuls' activation bytes per second"]
    return unit, notes


def prepare(config: ProfileConfig) -> ProfileConfig:
    """The config resolved for this machine, after checking the device and the offload folder (``SpecplanError``
    with what to do if either is unusable). Nothing is measured yet."""
    c = config.resolved()
    check_device(c.device)
    pl.prepare_offload_dir(c.offload_dir, pl.disk_bytes_needed(c.link_sizes, c.reps, c.disk_file_bytes))
    return c


#: measurements ``measure_this_machine`` makes in all while each comes out contended, before it gives up.
MEASURE_ATTEMPTS = 3


def measure_profile(config: ProfileConfig, on_tick: Callable[[str, int, int], None] | None = None,
                    probe: Callable[[], CpuUsage] | None = None) -> HardwareProfile:
    """Measure this machine. ``on_tick(label, done, total)`` is called after each step (for a progress bar). The
    share of the CPUs other processes used meanwhile, as ``probe()`` (default ``CpuUsage``) reports it, goes into the
    provenance (``others_cpu_fraction``: above ``CONTENDED_CPU_FRACTION`` the profile is contended)."""
    import torch

    c = prepare(config)
    usage = (probe or CpuUsage)()
    before = torch.get_num_threads()
    if c.threads:
        torch.set_num_threads(c.threads)
    try:
        profile = _measure(c, on_tick)
    finally:
        torch.set_num_threads(before)
    provenance = Provenance.model_validate({**profile.provenance.model_dump(),
                                            "others_cpu_fraction": usage.others_fraction()})
    return profile.model_copy(update={"provenance": provenance})


def _measure(c: ProfileConfig, on_tick: Callable[[str, int, int], None] | None) -> HardwareProfile:
    import torch

    now = dt.datetime.now(dt.timezone.utc)
    cuda = c.device == "cuda"
    notes = [f"preset {c.preset}: medians of {c.reps}+ samples, each >= {c.min_sample_s * 1e3:.0f} ms of calls",
             f"matmul: F.linear over {len(c.matmul_shapes)} weight shapes, all points sampled round-robin; weight "
             f"copies rotated over {c.working_set_bytes >> 20} MiB (> last-level cache) so small-m figures stream "
             f"weights from memory"]
    dtypes = {"device": pc.well_supported_dtypes(c.device, c.reps, c.min_sample_s)}
    if cuda:
        dtypes["host"] = pc.well_supported_dtypes("cpu", c.reps, c.min_sample_s)
    notes += [f"{unit}: {note}" for unit, (_, note) in dtypes.items()]
    total = (sum(_steps_compute(c, d, not cuda) for d, _ in dtypes.values()) + pl.disk_steps(c.link_sizes, c.reps, c.disk_stream_s)
             + (pl.copy_steps(c.link_sizes) if cuda else 0) + 1)
    ticker = Ticker(total, on_tick)

    cpu = cpu_name()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device, dev_notes = measure_unit(c, "cuda", dtypes["device"][0], props.name, props.total_memory, ticker)
        host, host_notes = measure_unit(c, "cpu", dtypes["host"][0], cpu, host_memory_bytes(), ticker)
        notes += [f"device: {n}" for n in dev_notes] + [f"host: {n}" for n in host_notes]
        links = pl.measure_copies(c.link_sizes, c.reps, c.min_sample_s, ticker)
    else:
        device, unit_notes = measure_unit(c, "cpu", dtypes["device"][0], cpu, host_memory_bytes(), ticker, True)
        host = device
        notes += unit_notes
        notes.append("no GPU: the CPU was measured once and its figures serve as both device and host "
                     "(shared memory: host->device is zero copy, so there are no h2d/d2h links)")
        links = {}
    compute = plans_dtype(dtypes["device"][0])
    overheads, oh_note = measure_overheads(c.device, compute, c.reps, c.min_sample_s)
    notes.append(oh_note)
    try:
        resident, resident_note = measure_process_resident(c.device, dtype=compute)
        overheads = overheads.model_copy(update={"process_resident_bytes": resident})
        notes.append(resident_note)
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
        notes.append(f"process_resident_bytes not measured ({e}): plans use the default for the device kind")
    ticker.tick("overheads")
    slowdown: list[Stat] = []
    probe_dtype = plans_dtype(dtypes["device"][0])

    def interference(path: Path) -> None:
        if not cuda:  # a GPU computes apart from the host's disk
            slowdown.append(streaming_slowdown(path, expert_probe(probe_dtype), c.reps, c.min_sample_s))

    disk_links, disk = pl.measure_disk(c.offload_dir, c.link_sizes, c.reps, c.disk_file_bytes, ticker,
                                       c.disk_stream_s, interference)
    if slowdown:
        s = slowdown[0]
        overheads = overheads.model_copy(update={"compute_slowdown_while_streaming": s.median})
        notes.append(f"compute_slowdown_while_streaming = {s.median:.2f} (paired ratios {s.min:.2f}..{s.max:.2f}): "
                     f"a {probe_dtype} expert FFN ({ROWS} rows) while a thread streams the disk test file with "
                     f"O_DIRECT over the same with the disk idle")
    links.update(disk_links)
    if not disk.o_direct:
        notes.append(f"O_DIRECT does not work in {disk.path} ({disk.filesystem}): offloaded weights are read buffered")
    notes.append("links: latency_s = median time of a 4 KiB transfer; bandwidth_Bps = size / (time - latency), so "
                 "Link.time_s(size) gives the measured median time at each measured size; disk_read_direct."
                 f"sustained_Bps = {c.disk_stream_s:g} s of back-to-back reads of the largest size (after its first "
                 "third), a floor under the time of every transfer of a stream")

    hostname = socket.gethostname()
    name = c.name or f"{hostname}-{now.strftime('%Y%m%dT%H%M%SZ')}"
    provenance = Provenance(
        kind="measured", created_utc=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        command=c.command or f"measure_profile(ProfileConfig.{c.preset}(device={c.device!r}))",
        torch_version=torch.__version__, hostname=hostname, device_name=device.name, cpu_name=cpu,
        engine_digest=engine_digest(),
        notes="; ".join(notes + list(c.notes)),
    )
    return HardwareProfile(name=name, provenance=provenance, device=device, host=host, shared_memory=not cuda,
                           links=links, overheads=overheads, disk=disk)


def command_line() -> str:
    """How this process was started, for the provenance."""
    return " ".join(["specplan" if Path(sys.argv[0]).name == "specplan" else sys.argv[0], *sys.argv[1:]])


@dataclass(frozen=True)
class Measured:
    profile: HardwareProfile  # its provenance says how clean it is (``others_cpu_fraction``, ``contended``)
    seconds: float  # wall time of the measurements, all attempts
    preset: str
    attempts: int  # measurements made: more than one when the earlier ones were contended


def configure(quick: bool, device: str | None = None, offload_dir: Path | None = None) -> ProfileConfig:
    """The measurement ``specplan profile`` runs: the quick or full preset on a checked device, its offload folder
    prepared (``SpecplanError`` in one line for what cannot work, before anything is measured)."""
    dev = check_device(device) if device is not None else default_device()
    make = ProfileConfig.quick if quick else ProfileConfig.full
    return prepare(make(device=dev, offload_dir=offload_dir, command=command_line()))


def measure_this_machine(config: ProfileConfig, on_tick: Callable[[str, int, int], None] | None = None,
                         probe: Callable[[], CpuUsage] | None = None, attempts: int = MEASURE_ATTEMPTS) -> Measured:
    """Measure this machine as ``config`` says; a contended measurement (other processes took more than
    ``CONTENDED_CPU_FRACTION`` of the CPUs meanwhile, as ``probe`` reports) is made again, up to ``attempts`` in
    all. The last one is returned, contended or not: whoever stores it decides (``specplan profile`` refuses to keep
    a contended profile as this machine's)."""
    t0 = time.perf_counter()
    for attempt in range(1, attempts + 1):
        profile = measure_profile(config, on_tick, probe)
        if not profile.provenance.contended:
            break
    return Measured(profile, time.perf_counter() - t0, config.preset, attempt)
