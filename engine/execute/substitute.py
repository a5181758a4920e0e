"""A plan's substitute draft (SubSpec): the target itself, with a low-bit copy of every matrix the target streams.

The draft shares with the target every tensor the target keeps resident (on a CPU: the device and host tiers; the
embedding, norms, head and resident layers and experts) and its KV cache (``speculative.DraftModel.shares_kv``).
Of each tensor the target fetches (disk; the host on a GPU machine) it holds a copy on the device: a low-bit one of
each matrix the substitute quantises (``contracts.tensors.substitute_quantises``, from the cache
``io/substitute.py`` builds once per model), a full-precision one of the rest (norms, biases, routers). Its memory
is counted by ``substitute_bytes`` before anything is allocated, with the planner's byte function.
"""

from __future__ import annotations

import torch

from specplan.contracts.plan import Plan
from specplan.contracts.tensors import substitute_nbytes
from specplan.engine.io.store import StoreLayout
from specplan.engine.io.substitute import ensure_substitute, load_substitute, quantised_tensors
from specplan.engine.model.forward import MemorySource
from specplan.engine.model.quant import kernel_dtype
from specplan.errors import SpecplanError


def copied_names(plan: Plan, layout: StoreLayout) -> tuple[list[str], list[str]]:
    """(low-bit, full-precision) names of the copies the substitute holds: the tensors the target fetches; a tied
    head the target streams (with the embedding) gets a low-bit copy as ``lm_head``."""
    spec, d = plan.model.spec, plan.draft
    table = quantised_tensors(spec, d.bits, d.group)  # type: ignore[arg-type]
    fetched = [n for n in sorted(layout.tiers) if n not in layout.resident]
    lowbit = [n for n in fetched if n in table]
    full = [n for n in fetched if n not in table]
    if spec.tie_word_embeddings and "embed" in fetched and "lm_head" in table:
        lowbit.append("lm_head")
    return lowbit, full


def substitute_bytes(plan: Plan, layout: StoreLayout, dtype: torch.dtype) -> int:
    """Device bytes of the substitute's copies for a run computing in ``dtype`` (``contracts.tensors``)."""
    spec, d = plan.model.spec, plan.draft
    lowbit, full = copied_names(plan, layout)
    scales = str(kernel_dtype(dtype)).removeprefix("torch.")
    table = quantised_tensors(spec, d.bits, d.group)  # type: ignore[arg-type]
    bits = d.bits or 8
    quantised = sum(substitute_nbytes(table[n], bits, d.group, scales, as_head=n == "lm_head") for n in lowbit)
    return quantised + sum(int(torch.Size(layout.shapes[n]).numel()) * layout.item_bytes for n in full)


def substitute_source(plan: Plan, ckpt, layout: StoreLayout, resident: dict[str, torch.Tensor], dtype: torch.dtype,
                      on_convert=None) -> tuple[MemorySource, int]:
    """The substitute's weights: the target's ``resident`` tensors and its own copies of the rest (the low-bit
    cache is built the first time, ``on_convert`` getting the source bytes it quantised), and the bytes of the
    copies it allocated."""
    spec, d = plan.model.spec, plan.draft
    lowbit, full = copied_names(plan, layout)
    tensors = dict(resident)
    if lowbit:
        path = ensure_substitute(ckpt, d.bits, d.group, d.method, on_convert)  # type: ignore[arg-type]
        tensors.update(load_substitute(path, lowbit, spec, d.bits, d.group, dtype))  # type: ignore[arg-type]
    for n in full:
        tensors[n] = ckpt.read(n, dtype=dtype)
    held = sum(tensors[n].nbytes for n in (*lowbit, *full))
    if "lm_head" not in tensors:
        tensors["lm_head"] = tensors["embed"]  # a tied head the target keeps resident with the embedding
    return MemorySource(tensors), held


def check_substitute(plan: Plan, device: torch.device) -> None:
    """``SpecplanError`` for a substitute the engine cannot run: its low-bit kernels are torch's CPU ones."""
    if device.type != "cpu":
        raise SpecplanError(f"the plan drafts with {plan.draft.label}, whose low-bit kernels the engine runs on the "
                            f"CPU only; search for a CPU profile, or with --draft none or a draft model")
