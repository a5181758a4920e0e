"""The tiered weight store: the ``WeightSource`` the forward reads, following a plan's placement.

- device tier: tensors resident where compute runs (the CPU's RAM without a GPU), within the VRAM budget;
- host tier: tensors in host RAM (pinned on a GPU machine, copied to the device ahead of use; on a CPU the same
  memory as the device, so used in place, but counted against the host budget);
- disk tier: tensors read on every use from the aligned offload file (``io/offload.py``) with O_DIRECT into
  staging buffers — ahead of compute by ``policy.prefetch_depth`` units (``Prefetcher``), or, for routed experts
  (``policy.expert_fetch == "routed"``), on demand once the router has chosen them (``ExpertReader``).

A pass asks for its weights in a fixed order (embed, layer 0 .. L-1, head); the prefetch schedule is that order
restricted to the units with something to fetch, repeated pass after pass. ``layout_for`` computes everything
(tiers, units, staging sizes) without allocating, so the budget check runs first; ``open_store`` allocates.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from specplan.contracts.plan import Plan
from specplan.engine.io.offload import Entry, UnitKey, unit_of
from specplan.engine.io.prefetch import ExpertReader, FetchUnit, Prefetcher, allocate_staging, make_unit
from specplan.engine.model.blocked import BlockedReader
from specplan.engine.model.checkpoint import convert_scratch


def tier_of(key: UnitKey, plan: Plan) -> str:
    """The tier the plan gives a placement unit."""
    pl = plan.placement
    if key.layer is None:
        return getattr(pl, key.group)
    lp = pl.layers[key.layer]
    if key.group == "experts":
        return lp.experts[key.expert]  # type: ignore[index]
    tier = {"attention": lp.attention, "norms_router": lp.norms_router, "mlp": lp.mlp,
            "shared_experts": lp.shared_experts}[key.group]
    assert tier is not None, f"placement has no tier for {key.label}"
    return tier


@dataclass(frozen=True)
class StoreLayout:
    """Where every tensor lives and what gets fetched, for one plan on one device (computed, nothing allocated)."""

    tiers: dict[str, str]  # canonical name -> tier
    resident: dict[str, str]  # canonical name -> "device" | "host": kept in memory for the whole run
    schedule: tuple[FetchUnit, ...]  # prefetched units in pass order
    experts: dict[tuple[int, int], FetchUnit]  # routed on-demand units
    ring_buffers: int  # prefetch_depth + 1 (0 when nothing is prefetched)
    ring_bytes: int  # bytes of one ring buffer
    expert_buffers: int
    expert_bytes: int
    item_bytes: int  # bytes per element at the compute dtype
    shapes: dict[str, tuple[int, ...]] = field(repr=False, default_factory=dict)

    def weight_bytes(self) -> dict[str, int]:
        """Resident weight bytes per tier."""
        out = {"device": 0, "host": 0}
        for n, tier in self.resident.items():
            out[tier] += int(torch.Size(self.shapes[n]).numel()) * self.item_bytes
        return out

    def staging_bytes(self) -> int:
        return self.ring_buffers * self.ring_bytes + self.expert_buffers * self.expert_bytes


def layout_for(plan: Plan, entries: Mapping[str, Entry], file_bytes: int, device: torch.device,
               item_bytes: int) -> StoreLayout:
    """Assign every tensor of the offload layout (``entries``) to its tier and plan the fetches."""
    cuda = device.type == "cuda"
    tiers = {n: tier_of(unit_of(n), plan) for n in entries}
    shapes = {n: e.shape for n, e in entries.items()}
    # on a CPU the host tier is the same memory as the device: host tensors are used in place
    fetched = {n for n, t in tiers.items() if t == "disk" or (cuda and t == "host")}
    resident = {n: t for n, t in tiers.items() if n not in fetched}
    routed = plan.policy.expert_fetch == "routed"

    def unit(key: str, name: str, layer: int | None, names: list[str]) -> FetchUnit:
        disk = {n: entries[n] for n in names if tiers[n] == "disk"}
        host = {n: shapes[n] for n in names if tiers[n] == "host" and cuda}
        return make_unit(key, name, layer, disk, file_bytes, host, item_bytes)

    by_unit: dict[UnitKey, list[str]] = {}
    for n in sorted(fetched):
        by_unit.setdefault(unit_of(n), []).append(n)
    schedule: list[FetchUnit] = []
    experts: dict[tuple[int, int], FetchUnit] = {}
    if any(k.group == "embed" for k in by_unit):
        schedule.append(unit("embed", "embed.read", None, by_unit[UnitKey(None, "embed")]))
    spec = plan.model.spec
    for i in range(spec.num_layers):
        names = []
        for k, ns in by_unit.items():
            if k.layer != i:
                continue
            if k.group == "experts" and routed:
                experts[(i, k.expert)] = unit(f"L{i}.E{k.expert}", f"L{i}.E{k.expert}.read", i, ns)  # type: ignore[index]
            else:
                names += ns
        if names:
            schedule.append(unit(f"L{i}", f"L{i}.read", i, names))
    head = [n for k, ns in by_unit.items() if k.group in ("final_norm", "lm_head") for n in ns]
    if spec.tie_word_embeddings and "embed" in fetched:
        head.append("embed")  # the tied head streams the embedding again
    if head:
        schedule.append(unit("head", "lm_head.read", None, head))
    per_layer = [sum(1 for (i, _) in experts if i == layer) for layer in range(spec.num_layers)]
    return StoreLayout(
        tiers=tiers, resident=resident, schedule=tuple(schedule), experts=experts,
        ring_buffers=plan.policy.prefetch_depth + 1 if schedule else 0,
        ring_bytes=max((u.nbytes for u in schedule), default=0),
        expert_buffers=max(per_layer, default=0),
        expert_bytes=max((u.nbytes for u in experts.values()), default=0),
        item_bytes=item_bytes, shapes=shapes)


class _LazyExperts(Mapping):
    """The routed experts of one layer; ``[e]`` blocks until expert e's read has landed."""

    def __init__(self, ids: Sequence[int], get):
        self._ids, self._get = list(ids), get

    def __getitem__(self, e: int) -> Mapping[str, torch.Tensor]:
        if e not in self._ids:
            raise KeyError(e)
        return self._get(e)

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


class TieredStore:
    """``WeightSource`` over resident tensors and the fetch threads. Use ``open_store`` to build one."""

    def __init__(self, spec, layout: StoreLayout, resident: dict[str, torch.Tensor], prefetcher: Prefetcher | None,
                 reader: ExpertReader | None, recorder):
        self.spec, self.layout, self.recorder = spec, layout, recorder
        self.resident, self.prefetcher, self.reader = resident, prefetcher, reader
        self._layers: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(spec.num_layers)}
        self._resident_experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for n, t in resident.items():
            k = unit_of(n) if n.startswith("layers.") else None
            if k is None:
                continue
            part = n.split(".", 2)[2]
            if k.group == "experts":
                self._resident_experts.setdefault((k.layer, k.expert), {})[part.split(".", 2)[2]] = t  # type: ignore[index]
            else:
                self._layers[k.layer][part] = t  # type: ignore[index]
        self._scheduled = {u.key for u in layout.schedule}
        self._held: dict[str, int] = {}  # unit key -> ring buffer
        self._misc: dict[str, torch.Tensor] = {}  # tensors of the held embed / head unit
        self._staged_experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # expert_fetch == "layer"
        self._reads: dict[int, list[tuple[int, object]]] = {}  # layer -> on-demand expert reads [(buffer, future)]
        self._after_layers = False  # once the pass's last layer is released, "embed" means the tied head
        self.file = None  # the offload file (DirectFile) the fetch threads read

    # ---- WeightSource ---------------------------------------------------------------------------------------------

    def tensor(self, name: str) -> torch.Tensor:
        role = "head" if name in ("final_norm", "lm_head") or (name == "embed" and self._after_layers) else "embed"
        if role in self._scheduled:
            if role not in self._held:
                self._release_misc("embed")
                slot, views = self.prefetcher.acquire(role)  # type: ignore[union-attr]
                self._held[role] = slot
                self._misc = dict(views)
                if role == "head" and "embed" in views:
                    self._misc["lm_head"] = views["embed"]  # the tied head streams the embedding
            if name in self._misc:
                return self._misc[name]
        return self.resident[name]

    def layer(self, i: int) -> Mapping[str, torch.Tensor]:
        self._release_misc("embed")
        key = f"L{i}"
        if key not in self._scheduled:
            return self._layers[i]
        slot, views = self.prefetcher.acquire(key)  # type: ignore[union-attr]
        self._held[key] = slot
        out = dict(self._layers[i])
        for n, t in views.items():
            part = n.split(".", 2)[2]
            if part.startswith("experts."):
                _, e, p = part.split(".", 2)
                self._staged_experts.setdefault((i, int(e)), {})[p] = t
            else:
                out[part] = t
        return out

    def experts(self, i: int, ids: Sequence[int]) -> Mapping[int, Mapping[str, torch.Tensor]]:
        pending = {e: self.reader.submit(self.layout.experts[(i, e)], self.recorder.batch)  # type: ignore[union-attr]
                   for e in ids if (i, e) in self.layout.experts}
        self._reads[i] = list(pending.values())

        def get(e: int) -> Mapping[str, torch.Tensor]:
            if e in pending:
                views = self.reader.wait(*pending[e])  # type: ignore[union-attr]
                return {n.rsplit(".", 1)[1]: t for n, t in views.items()}
            return self._staged_experts.get((i, e)) or self._resident_experts[(i, e)]

        return _LazyExperts(ids, get)

    def release(self, i: int) -> None:
        for slot, fut in self._reads.pop(i, []):
            self.reader.release(slot, fut)  # type: ignore[union-attr]
        key = f"L{i}"
        if key in self._held:
            for k in [k for k in self._staged_experts if k[0] == i]:
                del self._staged_experts[k]
            self.prefetcher.release(self._held.pop(key))  # type: ignore[union-attr]
        if i == self.spec.num_layers - 1:
            self._after_layers = True

    # ---- pass bookkeeping -----------------------------------------------------------------------------------------

    def end_pass(self) -> None:
        """The forward returned: give the head's buffer back; the next ``tensor("embed")`` starts a new pass."""
        self._release_misc("head")
        self._release_misc("embed")
        self._after_layers = False

    def _release_misc(self, key: str) -> None:
        if key in self._held:
            self._misc = {}
            self.prefetcher.release(self._held.pop(key))  # type: ignore[union-attr]

    # ---- lifetime -------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the threads and free the staging buffers (also after a failed pass)."""
        for reads in self._reads.values():
            for _, fut in reads:
                fut.exception()  # let reads in flight land before their buffers go
        self._reads.clear()
        self._held.clear()
        self._misc, self._staged_experts = {}, {}
        for worker in (self.prefetcher, self.reader):
            if worker is not None:
                worker.close()
                for b in worker.buffers:
                    b.close()
        if self.file is not None:
            self.file.close()

    def stats(self) -> dict[str, float]:
        """Seconds compute waited for prefetched units and for on-demand expert reads."""
        return {"prefetch_wait_s": self.prefetcher.wait_s if self.prefetcher else 0.0,
                "expert_wait_s": self.reader.wait_s if self.reader else 0.0}


def open_store(plan: Plan, ckpt, layout: StoreLayout, offload, recorder, dtype: torch.dtype,
               device: torch.device, blocked: bool = False) -> TieredStore:
    """Load the resident tensors (``blocked``: their matrices in the CPU kernel's layout, ``model/blocked.py``),
    allocate the staging buffers and start the fetch threads."""
    from specplan.engine.io.directio import open_direct

    resident, scratch = {}, convert_scratch()
    reader = BlockedReader(ckpt, dtype, blocked and device.type == "cpu")
    for n, tier in layout.resident.items():
        t = reader.read(n, scratch)
        if device.type == "cuda":
            t = t.to(device) if tier == "device" else t.pin_memory()
        resident[n] = t
    reader.close()
    if plan.model.spec.tie_word_embeddings and "embed" in resident:
        resident["lm_head"] = resident["embed"]
    needs_file = any(u.reads for u in (*layout.schedule, *layout.experts.values()))
    file = open_direct(offload.path) if needs_file else None
    prefetcher = reader = None
    if layout.schedule:
        ring = [allocate_staging(layout.ring_bytes, device) for _ in range(layout.ring_buffers)]
        prefetcher = Prefetcher(list(layout.schedule), ring, file, dtype, resident, recorder)
        prefetcher.start()
    if layout.experts:
        on = device if plan.policy.experts_on == "device" else torch.device("cpu")
        pool = [allocate_staging(layout.expert_bytes, on) for _ in range(layout.expert_buffers)]
        reader = ExpertReader(pool, file, dtype, resident, recorder)
        reader.start()
    store = TieredStore(plan.model.spec, layout, resident, prefetcher, reader, recorder)
    store.file = file
    return store
