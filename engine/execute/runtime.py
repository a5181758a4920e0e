"""Running a plan: check the model and the memory budget, convert the offload file if needed, open the tiered store,
run the executor, and collect the measured timeline, throughput and peak memory.

``run_plan`` is the programmatic entry point (``specplan.validation.runs`` and ``bench/bench_engine.py`` call it).
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from specplan.contracts.memory import kv_capacity
from specplan.contracts.model import ModelSpec
from specplan.contracts.tensors import GGUF_BLOCKS
from specplan.contracts.plan import Plan, Sampling
from specplan.contracts.timeline import Timeline
from specplan.engine.execute.budget import available_memory_bytes, check_budget, required_bytes
from specplan.engine.io.directio import align_up
from specplan.engine.io.memstat import peak_rss_bytes
from specplan.engine.execute.executor import Executor, RunStats, SeqState
from specplan.engine.io.offload import ensure_offload, layout_of
from specplan.engine.execute.recorder import Recorder
from specplan.engine.execute.speculative import DraftModel
from specplan.engine.execute.substitute import check_substitute, substitute_bytes, substitute_source
from specplan.engine.io.store import StoreLayout, layout_for, open_store
from specplan.engine.model.blocked import available
from specplan.errors import InfeasibleError, SpecplanError
from specplan.gguf import refuse_gguf_weights

#: ModelSpec fields that name or describe a checkpoint rather than its architecture.
NOT_ARCHITECTURE = {"name", "dtype", "schema_version", "bos_token_id", "eos_token_id", "max_position_embeddings"}


def check_same_architecture(plan_spec: ModelSpec, spec: ModelSpec, where: str) -> None:
    """``SpecplanError`` naming the first field where the weights' architecture differs from the plan's."""
    a, b = plan_spec.model_dump(), spec.model_dump()
    for k in a:
        if k not in NOT_ARCHITECTURE and a[k] != b.get(k):
            raise SpecplanError(f"{where}: its config differs from the plan's model {plan_spec.name} ({k} is "
                                f"{b.get(k)!r}, the plan has {a[k]!r}); pass --model DIR with the weights of "
                                f"{plan_spec.name}, or plan for this model")


def refuse_speculative(plan: Plan, device: torch.device | str = "cpu") -> None:
    """The engine runs resident draft models (on the device, or in host memory on a CPU) and substitutes on the
    CPU; a plan that streams its draft model from disk would run without what it assumes, so it is refused."""
    if not plan.policy.speculative:
        return
    if plan.draft.kind == "substitute":
        check_substitute(plan, torch.device(device))
        return
    if "disk" in (plan.placement.draft_weights, plan.placement.draft_kv):
        raise SpecplanError("the plan streams the draft from disk, which the engine does not do (it keeps the draft "
                            "resident); search again with more --vram, or with --draft none")


def open_draft_checkpoint(plan: Plan, folder: str | None):
    """The checkpoint of the plan's draft model (``folder`` overrides the plan's draft path), checked against the
    plan's draft spec; None for a plan without a draft. Opening reads only the index, not the weights."""
    if not plan.policy.speculative or plan.draft.kind != "model":
        return None
    from specplan.engine.model.checkpoint import open_checkpoint

    d = plan.draft
    folder = folder or d.path
    if folder is not None:
        refuse_gguf_weights(folder, "the draft")
    if folder is None:
        raise SpecplanError(f"the plan's draft {d.name} has no weights here; pass --draft-model DIR with the weights "
                            f"of {d.name}")
    if not Path(folder).is_dir():
        raise SpecplanError(f"the plan's draft folder {folder} does not exist here; pass --draft-model DIR with the "
                            f"weights of {d.name}")
    ckpt = open_checkpoint(folder)
    check_same_architecture(d.spec, ckpt.spec, f"draft {folder}")
    return ckpt


def compute_dtype(plan: Plan) -> torch.dtype:
    """The dtype the engine computes the plan's weights in: the plan's weight dtype (the search chose it)."""
    if plan.policy.weight_dtype in GGUF_BLOCKS:
        raise SpecplanError(f"the plan stores weights as {plan.policy.weight_dtype} (a GGUF format); the engine "
                            f"computes in float32, bfloat16 or float16: re-plan the model from an HF folder")
    name = plan.policy.weight_dtype
    if name not in ("float32", "bfloat16", "float16"):
        raise SpecplanError(f"the engine computes in float32, bfloat16 or float16; the plan asks for weights in "
                            f"{name}; re-plan with one of those")
    return getattr(torch, name)


@dataclass
class RunOutput:
    seqs: list[SeqState]
    stats: RunStats
    timeline: Timeline
    need_bytes: dict[str, dict[str, int]]  # what the budget check counted, tier -> item
    peak_bytes: dict[str, dict[str, int]]  # what the run allocated, tier -> item
    max_rss_bytes: int  # the process's peak resident set (all tiers, activations, Python, torch)
    wait_s: dict[str, float]  # compute blocked on prefetched units / on-demand expert reads
    direct_io: bool | None  # O_DIRECT reads (None: nothing read from disk)
    wall_s: float
    layout: StoreLayout
    dtype: str


def run_plan(plan: Plan, ckpt, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             device: torch.device | str = "cpu", dtype: torch.dtype | None = None, stop_at_eos: bool = False,
             eos_ids: Sequence[int] = (), on_tokens: Callable[[int], None] | None = None,
             on_convert: Callable[[int], None] | None = None, draft_dir: str | None = None,
             sampling: Sampling | None = None, synthetic_acceptance: float | None = None) -> RunOutput:
    """Run ``prompts`` (token ids) through ``plan`` on the weights of ``ckpt``, decoding as ``sampling`` says
    (default: the plan's workload), speculative with the plan's draft model (from ``draft_dir`` or the plan's draft
    path) when the plan says so. ``synthetic_acceptance`` A (speculative plans; a benchmark mode, not lossless):
    each proposal is accepted with probability A from a seeded generator instead of by the target (the timeline's
    meta says so)."""
    if synthetic_acceptance is not None and not plan.policy.speculative:
        raise SpecplanError("a synthetic acceptance needs a speculative plan (one with a draft); this plan has none")
    device = torch.device(device)
    refuse_speculative(plan, device)
    check_same_architecture(plan.model.spec, ckpt.spec, str(ckpt.folder))
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SpecplanError("every prompt needs at least one token")
    dtype = dtype or compute_dtype(plan)
    dtype_name = str(dtype).removeprefix("torch.")
    item = torch.empty((), dtype=dtype).element_size()
    entries = layout_of(ckpt, dtype_name)
    file_bytes = align_up(max(e.offset + e.nbytes for e in entries.values()))
    layout = layout_for(plan, entries, file_bytes, device, item)
    capacity = kv_capacity(max(len(p) for p in prompts), max_new_tokens, plan.policy.draft_len)
    dckpt = open_draft_checkpoint(plan, draft_dir)
    draft_bytes = sum(e.nbytes for e in layout_of(dckpt, dtype_name).values()) if dckpt is not None else 0
    substitute = plan.policy.speculative and plan.draft.kind == "substitute"
    sub_bytes = substitute_bytes(plan, layout, dtype) if substitute else 0
    need = required_bytes(plan, layout, capacity, max(len(p) for p in prompts), dtype_name, draft_bytes, sub_bytes)
    try:
        check_budget(plan, need, available_memory_bytes() if device.type == "cpu" else None)
    except InfeasibleError as e:
        raise InfeasibleError(str(e) + _longer_than_planned(plan, prompts, max_new_tokens)) from None

    reads = any(u.reads for u in (*layout.schedule, *layout.experts.values()))
    offload = ensure_offload(ckpt, dtype_name, on_convert) if reads else None
    recorder = Recorder()
    blocked = device.type == "cpu" and plan.profile.device.blocks(dtype_name) and available(dtype_name)
    store = open_store(plan, ckpt, layout, offload, recorder, dtype, device, blocked)
    kv_devices = [device if lp.kv_cache == "device" else torch.device("cpu") for lp in plan.placement.layers]
    draft = None
    if dckpt is not None:
        from specplan.engine.model.forward import MemorySource

        on = {tier: device if tier == "device" else torch.device("cpu") for tier in ("device", "host")}
        draft = DraftModel(dckpt.spec, MemorySource.from_checkpoint(dckpt, dtype, on[plan.placement.draft_weights],
                                                                    blocked), recorder)
    if substitute:
        try:
            src, sub_held = substitute_source(plan, ckpt, layout, store.resident, dtype, on_convert)
        except BaseException:
            store.close()
            raise
        draft = DraftModel(plan.model.spec, src, recorder, shares_kv=True)
    ex = Executor(plan, store, recorder, dtype, kv_devices, max_new_tokens, eos_ids, stop_at_eos, on_tokens, draft,
                  on[plan.placement.draft_kv] if dckpt is not None else None,
                  sampling or plan.workload.sampling, synthetic_acceptance)
    t0 = time.perf_counter()
    try:
        seqs = ex.run([list(p) for p in prompts])
    finally:
        wait = store.stats()
        direct = store.file.direct if store.file is not None else None
        store.close()
    wall = time.perf_counter() - t0
    peak = {"device": {"weights": layout.weight_bytes()["device"], "kv_cache": ex.stats.kv_peak_bytes["device"],
                       "staging": layout.staging_bytes()},
            "host": {"weights": layout.weight_bytes()["host"], "kv_cache": ex.stats.kv_peak_bytes["host"]}}
    if substitute:
        peak["device"]["substitute"] = sub_held
    if dckpt is not None:
        for item, tier, nbytes in (("draft_weights", plan.placement.draft_weights, draft_bytes),
                                   ("draft_kv", plan.placement.draft_kv, ex.stats.draft_kv_peak_bytes)):
            peak[tier][item] = nbytes
    meta = _meta(plan, ex.stats, seqs, max_new_tokens, dtype_name, direct)
    if synthetic_acceptance is not None:
        meta["synthetic_acceptance"] = synthetic_acceptance  # benchmark mode: not the target's own output
    return RunOutput(seqs, ex.stats, recorder.timeline(meta), need, peak, peak_rss_bytes(), wait, direct, wall,
                     layout, dtype_name)


def _longer_than_planned(plan: Plan, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> str:
    """The reason a plan that fit at search time may not fit this run: longer prompts or more new tokens."""
    longest, wl = max(len(p) for p in prompts), plan.workload
    if longest + max_new_tokens <= wl.prompt_len + wl.gen_len:
        return ""
    return (f" (these prompts run to {longest} tokens plus {max_new_tokens} new ones; the plan was searched for "
            f"{wl.prompt_len} plus {wl.gen_len}: search with --prompt-len {longest})")


def _meta(plan: Plan, stats: RunStats, seqs: list[SeqState], max_new_tokens: int, dtype: str,
          direct: bool | None) -> dict[str, Any]:
    lens = [len(s.prompt) for s in seqs]
    return {"model": plan.model.name, "profile": plan.profile.name, "num_prompts": len(seqs),
            "prompt_len_mean": sum(lens) / len(lens), "prompt_len_min": min(lens), "prompt_len_max": max(lens),
            "gen_len": max_new_tokens, "generated_tokens": sum(len(s.generated) for s in seqs),
            "compute_dtype": dtype, "o_direct": direct, "prefill_s": stats.prefill_s, "decode_s": stats.decode_s}
