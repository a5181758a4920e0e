"""``specplan profile``: measure this machine into a hardware profile, or show one (table and roofline PNG)."""

from __future__ import annotations

from pathlib import Path

import click

from specplan.errors import SpecplanError
from specplan.machine import here

#: transfer sizes the table shows for every link (measured or published).
SHOW_SIZES = (64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20)


@click.command("profile")
@click.option("-o", "--output", metavar="FILE", default=None,
              help="Write the profile here [default: $SPECPLAN_HOME/profiles/<host>-<UTC time>.json, which the planner "
                   "uses when --profile is not given]. A contended measurement (other processes took more than 10% "
                   "of the CPUs in every attempt) is written only here, marked in its provenance.")
@click.option("--quick", is_flag=True, help="Fewer sizes, shapes and samples: about a minute instead of a few.")
@click.option("--offload-dir", metavar="DIR", default=None,
              help="Folder of the disk test: the one the engine offloads weights to [default: $SPECPLAN_HOME/offload].")
@click.option("--device", metavar="cuda|cpu", default=None,
              help="Compute device to measure [default: cuda if available, else cpu].")
@click.option("--show", "show", metavar="NAME|FILE", default=None,
              help="Print a profile (a file, a bundled name such as rtx4090-pcie4, or a measured one) instead of "
                   "measuring.")
@click.option("--png", metavar="FILE", default=None,
              help="With --show: also draw link bandwidth over size, matmul FLOP/s over rows and a roofline.")
def command(output: str | None, quick: bool, offload_dir: str | None, device: str | None, show: str | None,
            png: str | None) -> None:
    """Measure this machine (disk, memory, matmul, attention, overheads) into a hardware profile.

    Disk figures come from reading a real-data file in the offload folder with O_DIRECT (and buffered), matmul and
    attention from the torch calls the engine makes. Without a GPU the CPU is both device and host (shared memory).
    A measurement during which other processes used more than 10% of the CPUs is made again (3 attempts in all);
    still contended, it is refused as this machine's profile (-o FILE keeps it, marked contended).
    """
    if show is not None:
        given = [flag for flag, v in (("-o", output), ("--quick", quick), ("--offload-dir", offload_dir),
                                      ("--device", device)) if v]
        if given:
            raise SpecplanError(f"--show prints an existing profile and does not measure: drop {', '.join(given)}")
        _show(show, png)
        return
    if png is not None:
        raise SpecplanError("--png draws the profile given with --show: run `specplan profile --show FILE --png OUT.png`")
    _measure(output, quick, offload_dir, device)


def _measure(output: str | None, quick: bool, offload_dir: str | None, device: str | None) -> None:
    from specplan.catalog import contended_profiles_dir, user_profiles_dir
    from specplan.contracts.hardware import CONTENDED_CPU_FRACTION
    from specplan.engine.measure.profiler import configure, measure_this_machine
    from specplan.fmt import console

    out = Path(output).expanduser() if output else None
    if out is not None:
        _check_writable(out)
    config = configure(quick, device, Path(offload_dir) if offload_dir else None)
    m = _with_progress(lambda tick: measure_this_machine(config, tick))
    profile = m.profile
    pv = profile.provenance
    mine = user_profiles_dir().resolve()
    if pv.contended and (out is None or out.resolve().parent == mine):
        kept = _write(contended_profiles_dir() / f"{profile.name}.json", profile)
        raise SpecplanError(f"refused: other processes used {pv.others_cpu_fraction:.0%} of the CPUs while measuring "
                            f"({m.attempts} attempt{'s' if m.attempts > 1 else ''}; contended above "
                            f"{CONTENDED_CPU_FRACTION:.0%}), so it is not stored as this machine's profile in {mine} "
                            f"(kept, marked contended, in {kept}: --profile {kept} plans on it anyway); rerun on an "
                            f"idle machine")
    path = out or user_profiles_dir() / f"{profile.name}.json"
    _write(path, profile)
    con = console()
    con.print(f"measured in {m.seconds:.0f} s ({m.preset}, {m.attempts} attempt{'s' if m.attempts > 1 else ''}); "
              f"{pv.cleanliness()}", highlight=False)
    _print_summary(profile)
    if pv.contended:
        con.print(f"[yellow]warning: a contended profile (written to -o only, marked contended in its provenance): "
                  f"compute figures may be low, and plans and runs on it say so[/yellow]")
    click.echo(f"wrote {path}")


def _check_writable(out: Path) -> None:
    """Fail before minutes of measuring, not after, when ``-o`` cannot be written."""
    import os

    if out.is_dir():
        raise SpecplanError(f"-o {out}: is a folder; pass a file name such as {out / 'profile.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpecplanError(f"-o {out}: cannot create its folder ({e.strerror}); pass another -o FILE") from None
    if not os.access(out.parent, os.W_OK):
        raise SpecplanError(f"-o {out}: folder {out.parent} is not writable; pass another -o FILE")


def _write(path: Path, profile) -> Path:
    from specplan.jsonio import write_json

    try:
        return write_json(path, profile)
    except OSError as e:
        raise SpecplanError(f"cannot write {path}: {e.strerror or e}; pass another -o FILE") from None


def _with_progress(run):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("profiling", total=None)

        def tick(label: str, done: int, total: int) -> None:
            bar.update(task, description=label[:40], completed=done, total=total)

        return run(tick)


# ---- showing a profile -------------------------------------------------------------------------------------------


def _show(name: str, png: str | None) -> None:
    from specplan.catalog import load_profile
    from specplan.validation.figures import plot_profile

    if png is not None and not png.lower().endswith(".png"):
        raise SpecplanError(f"--png {png}: the file name must end in .png")
    profile = load_profile(name)
    print_profile(profile)
    if png is not None:
        path = plot_profile(profile, Path(png).expanduser())
        click.echo(f"wrote {path}")


def _print_summary(p) -> None:
    """The headline figures of a fresh profile, one line each."""
    from specplan.fmt import console, human_bytes, human_rate, human_seconds

    con = console()
    d = p.device
    for dtype in d.dtypes:
        con.print(f"device {dtype} matmul: peak {human_rate(d.peak_matmul_flops(dtype), 'FLOP/s')}, "
                  f"m=1 {human_rate(d.matmul_flops(dtype, 1, 4096, 4096), 'FLOP/s')} (4096x4096 or nearest)")
    con.print(f"memory bandwidth: {human_rate(d.memory_bandwidth_Bps.median, 'B/s')}")
    con.print(f"engine process resident bytes (outside a plan's tensors): {human_bytes(p.process_resident()[0])}")
    for name in ("disk_read_direct", "disk_read_buffered", "disk_write", "h2d_pinned"):
        link = p.link(name)
        if link is not None:
            sustained = ("" if link.sustained_Bps is None else
                         f", sustained {human_rate(link.sustained_Bps.median, 'B/s')} (a stream of "
                         f"{human_rate(link.sustained_Bps.min, 'B/s')}..{human_rate(link.sustained_Bps.max, 'B/s')})")
            con.print(f"{name}: {human_rate((64 << 20) / link.time_s(64 << 20), 'B/s')} at 64 MiB in a stream, "
                      f"latency {human_seconds(link.latency_s)}{sustained}")


def print_profile(p) -> None:
    from rich.table import Table

    from specplan.contracts.hardware import STALE_PROFILE_S
    from specplan.fmt import console, human_bytes, human_rate, human_seconds

    con = console()
    pv = p.provenance
    when = f"{pv.kind} {pv.created_utc}" + (f", torch {pv.torch_version}" if pv.torch_version else "")
    con.print(f"[bold]{p.name}[/bold]  ({when})")
    if pv.kind == "measured":
        age = pv.age_s()
        stale = f" (stale: older than {STALE_PROFILE_S / 86400:.0f} days, re-measure it)" if pv.stale() else ""
        con.print(("age unknown" if age is None else f"measured {_age_words(age)} ago{stale}")
                  + f"; {pv.cleanliness()}", highlight=False, markup=False)
        for line in pv.foreign(*here()):
            con.print(f"warning: {line}", highlight=False, markup=False)
    if pv.command:
        con.print(f"command: {pv.command}")
    if pv.source:
        con.print(f"source: {pv.source}")
    mem = "device and host share one memory (no GPU): host->device is zero copy" if p.shared_memory \
        else "separate device memory"
    con.print(mem)
    disk = p.disk
    if disk.path or disk.filesystem:
        con.print(f"disk: {disk.path or '?'} ({disk.filesystem or '?'}, O_DIRECT {'yes' if disk.o_direct else 'no'}"
                  + (f", {human_bytes(disk.capacity_bytes)}" if disk.capacity_bytes else "") + ")")

    units = [("device", p.device)] + ([] if p.host == p.device else [("host", p.host)])
    t = Table(title="compute units" + (" (device = host: the same CPU)" if p.host == p.device else ""))
    for col in ("unit", "kind", "name", "memory", "memory bw", "threads", "peak matmul", "decode attention"):
        t.add_column(col, justify="left" if col in ("unit", "kind", "name") else "right")
    for label, u in units:
        peaks = ", ".join(f"{d} {human_rate(u.peak_matmul_flops(d), 'FLOP/s')}" for d in u.dtypes)
        attn = human_rate(max(pt.y.median for pt in u.decode_attention_Bps.points), "B/s") \
            if u.decode_attention_Bps else "-"
        t.add_row(label, u.kind, u.name, human_bytes(u.memory_bytes), human_rate(u.memory_bandwidth_Bps.median, "B/s"),
                  str(u.threads or "-"), peaks, attn)
    con.print(t)

    for label, u in units:
        con.print(_curve_table(f"{label} matmul FLOP/s over rows m (F.linear m x k by k x n)",
                               [(f"{c.dtype} {c.k}x{c.n}", c.flops) for c in u.matmul], lambda x: f"{x:g}",
                               lambda y: human_rate(y, "")))
        if u.decode_attention_Bps:
            kv = f", a {u.decode_attention_dtype} cache" if u.decode_attention_dtype else ""
            con.print(_curve_table(f"{label} decode attention: KV bytes read per second over KV bytes per call{kv}",
                                   [("bandwidth", u.decode_attention_Bps)], human_bytes, lambda y: human_rate(y, "B/s")))

    t = Table(title="links: effective bandwidth size / time_s(size)")
    t.add_column("link")
    t.add_column("latency", justify="right")
    for s in SHOW_SIZES:
        t.add_column(human_bytes(s), justify="right")
    t.add_column("measured sizes", justify="right")
    t.add_column("sustained", justify="right")
    for name, link in p.links.items():
        pts = link.bandwidth_Bps.points
        span = f"{human_bytes(pts[0].x)}..{human_bytes(pts[-1].x)}" if len(pts) > 1 else "one figure"
        sustained = "-" if link.sustained_Bps is None else human_rate(link.sustained_Bps.median, "B/s")
        t.add_row(name, human_seconds(link.latency_s), *(human_rate(s / link.time_s(s), "B/s") for s in SHOW_SIZES),
                  span, sustained)
    con.print(t)

    t = Table(title="fixed overheads")
    for col in ("overhead", "median", "min", "max"):
        t.add_column(col, justify="left" if col == "overhead" else "right")
    samples = p.overheads.samples_s or {}
    for name in ("per_op_s", "per_layer_s", "per_step_s", "thread_handoff_s"):
        s = samples.get(name)
        t.add_row(name, human_seconds(getattr(p.overheads, name)), *(
            (human_seconds(s.min), human_seconds(s.max)) if s else ("-", "-")))
    con.print(t)
    resident, source = p.process_resident()
    con.print(f"engine process resident bytes outside a plan's tensors: {human_bytes(resident)} ({source}); with "
              f"{human_bytes(p.os_reserve_bytes())} for the OS, plans leave them out of the host's memory")
    if pv.notes:
        con.print("notes: " + pv.notes)


def _age_words(seconds: float) -> str:
    """An age in the largest unit that makes it at least 1: minutes, hours or days."""
    for unit, size in (("days", 86400), ("hours", 3600)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{max(seconds, 0) / 60:.0f} minutes"


def _curve_table(title: str, curves, fmt_x, fmt_y):
    from rich.table import Table

    xs = sorted({pt.x for _, c in curves for pt in c.points})
    t = Table(title=title)
    t.add_column("")
    for x in xs:
        t.add_column(fmt_x(x), justify="right")
    for label, c in curves:
        by_x = {pt.x: pt.y.median for pt in c.points}
        t.add_row(label, *(fmt_y(by_x[x]) if x in by_x else "-" for x in xs))
    return t
