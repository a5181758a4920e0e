"""Human-readable numbers for tables (files always store plain numbers with units in the key names).

The unit rule: sizes are bytes inside the code; a size a user types (``--vram``, ``--ram``, ``--disk``) is in GiB
(``GiB`` = 2^30 bytes); a printed size is in binary units and names them (``human_bytes``). Rates keep their
decimal prefixes (``human_rate``: 2.70 GB/s), as bandwidths and FLOP/s are quoted.
"""

from __future__ import annotations

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40


def human_bytes(n: float) -> str:
    """Binary units: ``human_bytes(3 * 2**29) == '1.50 GiB'``; below one KiB in bytes."""
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
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
