"""The process's memory as the operating system counts it (read by runs and by the profiler)."""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """This process's peak resident set in bytes: ``VmHWM`` of ``/proc/self/status`` (this program's own pages
    only), else ``ru_maxrss``, which after ``exec`` also counts the high-water mark of the process that spawned it
    (a large parent inflates it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
