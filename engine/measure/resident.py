"""The engine's own resident bytes outside a plan's tensors: what a run holds in host RAM beyond its weights, KV
caches, staging buffers and activations (``Overheads.process_resident_bytes``, part of a plan's host headroom).

Method: a fresh Python process (so nothing the profiler itself allocated counts) imports the libraries a
``specplan run`` process holds (torch, transformers' tokenizers, the engine, and for the comparison and the result
files scipy, pandas and matplotlib), initialises the device (the CUDA context on a GPU), runs a
tiny decode forward of the engine's on it (``overheads.tiny_decode``) (so the allocator, the thread pools and the kernels' code pages are in
use), and reads its peak resident set (``VmHWM`` of ``/proc/self/status``, else ``ru_maxrss``). The tiny forward's
own tensors (a few hundred KiB, counted from their shapes) are subtracted; what remains is the interpreter, the
libraries' code and data, the allocator's arenas and the thread stacks: bytes a run pays whatever its plan.
A margin (``MARGIN``) covers what a real run adds on top (tokenizer vocabularies, allocator fragmentation between
passes, Python objects of the sequences and the timeline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from specplan.engine.io.memstat import peak_rss_bytes

#: a real run's extra over the tiny forward's process (fraction of the measured bytes, and a floor), see the module.
MARGIN, MARGIN_MIN_BYTES = 0.25, 128 << 20


def _child(device: str, dtype: str = "float32") -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  the run's Gantt chart
    import pandas  # noqa: F401  the validate grid's table
    import scipy.optimize  # noqa: F401  the planner's LP, which predicts the workload a run measured
    import scipy.stats  # noqa: F401
    import torch
    from transformers import AutoTokenizer  # noqa: F401  the tokenizer's library, imported by every run

    from specplan.engine.io import store  # noqa: F401  the engine's code as a run imports it (measure -> io/model)
    from specplan.engine.model import forward  # noqa: F401
    from specplan.engine.measure.overheads import DEPTHS, tiny_decode
    from specplan.engine.model.blocked import available

    # in the plans' compute dtype, blocked where a run blocks: the kernels' code and caches are a run's too
    step, _, tensors = tiny_decode(DEPTHS[0], device, dtype, device == "cpu" and available(dtype))
    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        tensors = 0  # CUDA tensors are not in the host's resident set
    return {"peak_rss_bytes": peak_rss_bytes(), "tensor_bytes": tensors, "torch": torch.__version__}


def measure_process_resident(device: str = "cpu", timeout_s: float = 300,
                             dtype: str = "float32") -> tuple[int, str]:
    """(bytes, note): the engine process's resident bytes outside the plan's tensors, measured in a fresh process,
    with ``MARGIN``."""
    code = (f"import json; from specplan.engine.measure.resident import _child; "
            f"print(json.dumps(_child({device!r}, {dtype!r})))")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, env=env,
                          check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measuring the engine's resident bytes failed: {tail}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    own = max(got["peak_rss_bytes"] - got["tensor_bytes"], 0)
    total = int(own + max(MARGIN * own, MARGIN_MIN_BYTES))
    note = (f"process_resident_bytes = peak RSS {got['peak_rss_bytes'] >> 20} MiB of a fresh process that imported "
            f"torch {got['torch']}, transformers, scipy, pandas, matplotlib and the engine and ran a tiny {dtype} forward on {device}, minus its "
            f"{got['tensor_bytes'] >> 10} KiB of tensors, plus max({MARGIN:.0%}, {MARGIN_MIN_BYTES >> 20} MiB) for "
            f"what a real run adds")
    return total, note
