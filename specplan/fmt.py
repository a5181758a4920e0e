"""Human-readable numbers for tables (files always store plain numbers with units in the key names)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Decimal units (GB = 1e9 bytes), as model sizes and bandwidths are quoted."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def human_rate(n: float, unit: str) -> str:
    """A rate such as FLOP/s or B/s with a decimal prefix: ``human_rate(2.7e9, 'B/s') == '2.70 GB/s'``."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.2f} {unit}"


def human_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def console():
    """A rich console that keeps tables readable when the output is a file or a pipe (no 80-column wrap)."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 150)
