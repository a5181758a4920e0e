"""The tiered store, prefetcher, executor and recorder on tiny random models: greedy tokens identical to plain
transformers generate whatever the placement, fetch mode and prefetch depth; O_DIRECT and its fallback; the budget
refusal; a consistent measured timeline with the right byte counts; the offload file."""

from __future__ import annotations

import math
import os

import pytest
import torch
from engine_fixtures import hf_greedy, hf_model
from runtime_fixtures import make_plan, mixed_placement

from specplan.contracts.plan import Placement
from specplan.contracts.timeline import merged_busy_s
from specplan.engine.io import directio
from specplan.engine.model.checkpoint import open_checkpoint
from specplan.engine.io.offload import cache_folder, ensure_offload, unit_of
from specplan.engine.execute.runtime import run_plan
from specplan.errors import InfeasibleError, SpecplanError

PROMPTS = [[5, 17, 99, 3, 250, 61, 7], [200, 11, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 100]]
NEW = 6


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Factory: (folder, checkpoint, transformers' greedy tokens of PROMPTS) per (family, overrides)."""
    cache = {}

    def get(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tiny_model(family, **overrides)
            model = hf_model(folder)
            cache[key] = (folder, open_checkpoint(folder), [hf_greedy(folder, p, NEW, model=model) for p in PROMPTS])
        return cache[key]

    return get


def tokens_of(out) -> list[list[int]]:
    return [s.generated for s in sorted(out.seqs, key=lambda s: s.index)]


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
@pytest.mark.parametrize("fetch", ["routed", "layer"])
def test_uniform_placements_match_transformers(reference, tier, fetch):
    folder, ckpt, want = reference("mixtral")
    plan = make_plan(ckpt.spec, Placement.uniform(ckpt.spec, tier), expert_fetch=fetch)
    out = run_plan(plan, ckpt, PROMPTS, NEW)
    assert tokens_of(out) == want
    assert out.direct_io is (True if tier == "disk" else None)


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "llama"])
def test_mixed_placement_and_prefetch_depths_match_transformers(reference, family, depth):
    folder, ckpt, want = reference(family)
    plan = make_plan(ckpt.spec, mixed_placement(ckpt.spec), prefetch_depth=depth,
                     expert_fetch="layer" if depth == 1 else "routed", attention_on="host", experts_on="host")
    out = run_plan(plan, ckpt, PROMPTS, NEW)
    assert tokens_of(out) == want
    assert {"host_compute", "device_compute", "disk_read"} <= {e.resource for e in out.timeline.events}


def test_tied_embedding_streamed_for_the_head(reference):
    """A tied model with the embedding on disk: the head streams the embedding again at the end of each pass."""
    folder, ckpt, want = reference("llama", tie_word_embeddings=True)
    plan = make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "disk"), prefetch_depth=1)
    out = run_plan(plan, ckpt, PROMPTS, NEW)
    assert tokens_of(out) == want
    reads = [e for e in out.timeline.events if e.resource == "disk_read"]
    per_head = math.prod(ckpt.tensors["embed"].shape) * 4 + math.prod(ckpt.tensors["final_norm"].shape) * 4
    heads, rest = divmod(sum(e.bytes for e in reads if e.name == "lm_head.read"), per_head)
    passes = out.stats.prefill_passes + out.stats.decode_passes
    assert rest == 0 and passes <= heads <= passes + 2


def test_batches_waves_and_ragged_prefill_chunks(reference):
    """Two interleaved batches, a partial last wave, prefill chunks smaller than the batch: same tokens."""
    folder, ckpt, want = reference("mixtral")
    prompts = PROMPTS * 3  # 9 sequences: waves of 2 x 2, the last wave has one sequence
    plan = make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "disk"), decode_batch=2, num_batches=2, prefill_batch=1)
    out = run_plan(plan, ckpt, prompts, NEW)
    assert tokens_of(out) == want * 3
    assert out.stats.prefill_passes == 9 and {e.batch for e in out.timeline.events if e.resource == "device_compute"} == {0, 1}


def test_stop_at_eos_is_per_sequence_and_never_counts_past_the_limit(reference):
    folder, ckpt, want = reference("mixtral")
    k = next(k for k in range(1, NEW - 1) if want[1][k] not in want[1][:k])
    eos = want[1][k]  # a token the second sequence emits mid-way ends it early
    plan = make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "disk"))
    out = run_plan(plan, ckpt, PROMPTS, NEW, stop_at_eos=True, eos_ids=[eos])
    got = tokens_of(out)
    for g, w in zip(got, want):
        stop = w.index(eos) + 1 if eos in w else len(w)
        assert g == w[:stop]
    assert len(got[1]) == k + 1 < NEW
    assert out.stats.prefill_tokens + out.stats.decode_tokens == sum(len(g) for g in got)


def test_o_direct_is_used_and_the_buffered_fallback_gives_the_same_tokens(reference, monkeypatch):
    folder, ckpt, want = reference("mixtral")
    plan = make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "disk"))
    assert run_plan(plan, ckpt, PROMPTS, NEW).direct_io is True
    dropped = []
    real_drop = directio._drop_cache
    monkeypatch.setattr(directio, "_probe_direct", lambda fd, size: False)  # a filesystem refusing O_DIRECT reads
    monkeypatch.setattr(directio, "_drop_cache", lambda fd, off, n: (dropped.append(n), real_drop(fd, off, n)))
    out = run_plan(plan, ckpt, PROMPTS, NEW)
    assert out.direct_io is False and tokens_of(out) == want
    assert sum(dropped) >= sum(e.bytes for e in out.timeline.events if e.resource == "disk_read") > 0


def test_budget_refused_before_anything_is_allocated_or_converted(reference):
    folder, ckpt, _ = reference("mixtral")
    plan = make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "disk"), device_bytes=4096)
    with pytest.raises(InfeasibleError, match=r"on the device tier .*staging.* but its capacity is 4.00 KiB"):
        run_plan(plan, ckpt, PROMPTS, NEW)
    assert not cache_folder(ckpt, "float32").exists()
    host = make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "host"), host_bytes=10_000)
    with pytest.raises(InfeasibleError, match="host tier"):
        run_plan(host, ckpt, PROMPTS, NEW)


def test_peak_bytes_are_what_was_placed(reference):
    folder, ckpt, _ = reference("mixtral")
    item = 4
    sizes = {n: math.prod(r.shape) * item for n, r in ckpt.tensors.items()}
    plan = make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "host"))
    out = run_plan(plan, ckpt, PROMPTS, NEW)
    assert out.peak_bytes["host"]["weights"] == sum(sizes.values()) and out.peak_bytes["device"]["weights"] == 0
    capacity = max(map(len, PROMPTS)) + NEW
    s = ckpt.spec
    kv = 2 * s.num_layers * 3 * s.num_kv_heads * capacity * s.head_dim * item
    assert out.peak_bytes["host"]["kv_cache"] == kv == out.need_bytes["host"]["kv_cache"]  # uniform host: KV on host
    assert out.peak_bytes["device"]["kv_cache"] == 0


def _expected_read_bytes(ckpt, plan) -> dict[str, int]:
    """Bytes each fetch event must carry, from the checkpoint's shapes (fp32), independently of the store."""
    out: dict[str, int] = {}
    for n, r in ckpt.tensors.items():
        u = unit_of(n)
        nbytes = math.prod(r.shape) * 4
        if u.layer is None:
            key = "embed.read" if u.group == "embed" else "lm_head.read"
        elif u.group == "experts" and plan.policy.expert_fetch == "routed":
            key = f"L{u.layer}.E{u.expert}.read"
        else:
            key = f"L{u.layer}.read"
        out[key] = out.get(key, 0) + nbytes
    return out


@pytest.mark.parametrize("fetch", ["routed", "layer"])
def test_timeline_is_consistent_and_reads_carry_their_bytes(reference, fetch):
    folder, ckpt, want = reference("mixtral")
    plan = make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "disk"), expert_fetch=fetch, prefetch_depth=1)
    out = run_plan(plan, ckpt, PROMPTS, NEW)
    tl = out.timeline
    assert tl.source == "measured" and tokens_of(out) == want
    expect = _expected_read_bytes(ckpt, plan)
    reads = [e for e in tl.events if e.resource == "disk_read"]
    assert reads and all(e.bytes == expect[e.name] for e in reads)
    # one compute thread: compute spans never overlap; each fetch thread's reads never overlap either
    groups = {"compute": [e for e in tl.events if e.resource.endswith("_compute")],
              "prefetch": [e for e in reads if ".E" not in e.name],
              "experts": [e for e in reads if ".E" in e.name]}
    for evs in groups.values():
        iv = sorted((e.start_s, e.end_s) for e in evs)
        assert all(b[0] >= a[1] for a, b in zip(iv, iv[1:]))
        assert merged_busy_s(iv) == pytest.approx(sum(e - s for s, e in iv))
    passes = out.stats.prefill_passes + out.stats.decode_passes
    layer_reads = [e for e in reads if e.name == "L0.read"]
    assert passes <= len(layer_reads) <= passes + plan.policy.prefetch_depth + 1
    if fetch == "routed":  # exactly the experts the router picked are read, once per pass that picked them
        computed = sorted(e.name for e in tl.events if ".E" in e.name and e.resource == "device_compute")
        assert sorted(e.name.removesuffix(".read") for e in groups["experts"]) == computed
    assert {e.batch for e in tl.events if e.resource == "device_compute"} == {0}
    phases = [m["phase"] for m in tl.meta["phases"]]
    assert phases.count("prefill") == out.stats.prefill_passes and "decode" in phases


def test_offload_file_is_aligned_exact_and_built_once(reference):
    folder, ckpt, _ = reference("mixtral", layout="fused")
    off = ensure_offload(ckpt, "float32")
    mtime = off.path.stat().st_mtime_ns
    starts: dict = {}
    for n, e in off.entries.items():
        starts.setdefault(unit_of(n), []).append(e.offset)
    assert all(min(v) % directio.ALIGN == 0 for v in starts.values())
    with open(off.path, "rb") as f:
        for n, e in off.entries.items():
            f.seek(e.offset)
            got = torch.frombuffer(bytearray(f.read(e.nbytes)), dtype=torch.float32).view(e.shape)
            assert torch.equal(got, ckpt.read(n))
    assert ensure_offload(ckpt, "float32").path.stat().st_mtime_ns == mtime  # cached: not rewritten


def test_prefetch_order_broken_is_an_error(reference):
    """A forward asking for units out of the pass order gets a clear error, not wrong weights."""
    from specplan.engine.io.prefetch import PrefetchError
    from specplan.engine.execute.recorder import Recorder
    from specplan.engine.io.store import layout_for, open_store

    folder, ckpt, _ = reference("mixtral")
    plan = make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "disk"))
    off = ensure_offload(ckpt, "float32")
    layout = layout_for(plan, off.entries, os.path.getsize(off.path), torch.device("cpu"), 4)
    store = open_store(plan, ckpt, layout, off, Recorder(), torch.float32, torch.device("cpu"))
    try:
        store.tensor("embed")
        with pytest.raises(PrefetchError, match="asked for L1"):
            store.layer(1)
    finally:
        store.close()


def test_model_architecture_must_match_the_plan(reference, tiny_model):
    folder, ckpt, _ = reference("mixtral")
    other = open_checkpoint(tiny_model("llama"))
    plan = make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "device"))
    with pytest.raises(SpecplanError, match="differs from the plan's model"):
        run_plan(plan, other, PROMPTS, NEW)


def test_an_idle_expert_reader_is_waited_for_until_its_first_read_begins(monkeypatch):
    """Submitting to an idle reader returns once its read has begun (the caller blocks, freeing its core), and only
    then: a read queued behind another has no start to wait for."""
    import threading
    import time
    from types import SimpleNamespace

    from specplan.engine.io import prefetch

    release = threading.Event()
    began: list[float] = []

    def slow_fill(buf, unit, *args):
        began.append(time.perf_counter())
        release.wait(5)
        return {}

    monkeypatch.setattr(prefetch, "fill", slow_fill)
    monkeypatch.setattr(prefetch, "START_WAIT_S", 5.0)  # a start that never came would show as a 5 s submit
    reader = prefetch.ExpertReader([SimpleNamespace(views={}) for _ in range(3)], None, torch.float32, {}, None)
    reader.start()
    try:
        t0 = time.perf_counter()
        first = reader.submit("unit", None)
        assert len(began) == 1 and time.perf_counter() - t0 < 4  # idle: returned once the read had begun
        t0 = time.perf_counter()
        queued = reader.submit("unit", None)
        assert len(began) == 1 and time.perf_counter() - t0 < 1  # busy: queued behind the first, no wait
        release.set()
        for s, f in (first, queued):
            reader.release(s, f)
        reader.submit("unit", None)
        assert len(began) == 3  # idle again: waited for this one's start too
    finally:
        release.set()
        reader.close()
