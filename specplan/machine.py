"""What this machine and this copy of specplan are, in the words a measured profile records: the CPU model and a
digest of the engine's code. A profile's fixed costs (per layer, per step, the process's resident bytes) are the
engine's own code timed on this CPU, so a profile measured on another CPU (a VM moved to other hardware) or with
other engine code predicts for something that is no longer here. Torch-free: the planner imports it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo, else ``platform``) and its logical core count."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


@functools.cache
def engine_digest() -> str:
    """The first 16 hex digits of the SHA-256 over the engine's Python sources (relative path and bytes, sorted):
    it changes whenever the engine's code does."""
    spec = importlib.util.find_spec("specplan.engine")
    assert spec is not None and spec.submodule_search_locations
    root = Path(list(spec.submodule_search_locations)[0])
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.cache
def here() -> tuple[str, str]:
    """This machine's CPU name and this engine's digest: what ``Provenance.foreign`` compares a profile with."""
    return cpu_name(), engine_digest()
