"""The KV cache of one batch: per-layer K and V, right-padded, with a length per sequence.

Sequence ``b`` holds ``lengths[b]`` valid positions ``0 .. lengths[b]-1`` in every layer; what lies beyond is never
visible to attention (the mask is built from the lengths), so rolling a sequence back is just lowering its length
(``truncate``) — the speculative-decoding rollback. Each layer's tensors live on a device of their own (the plan's
KV tier: the device, or the host where attention then runs), ``[batch, kv_heads, capacity, head_dim]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specplan.contracts.model import ModelSpec
from specplan.errors import SpecplanError


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer [B, kv_heads, capacity, head_dim]
    v: list[torch.Tensor]
    lengths: torch.Tensor  # int64 [B], on the CPU

    @classmethod
    def allocate(cls, spec: ModelSpec, batch: int, capacity: int, dtype: torch.dtype = torch.float32,
                 devices: Sequence[torch.device | str] | torch.device | str | None = None) -> "KVCache":
        """A zeroed cache for ``batch`` sequences of up to ``capacity`` positions; ``devices``: one for all layers
        or one per layer (default CPU)."""
        if batch <= 0 or capacity <= 0:
            raise SpecplanError(f"KV cache needs batch > 0 and capacity > 0 (got batch {batch}, capacity {capacity})")
        if devices is None or isinstance(devices, (str, torch.device)):
            devices = [devices or "cpu"] * spec.num_layers
        if len(devices) != spec.num_layers:
            raise SpecplanError(f"KV cache: {len(devices)} devices given for {spec.num_layers} layers")
        shape = (batch, spec.num_kv_heads, capacity, spec.head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        v = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        return cls(k=k, v=v, lengths=torch.zeros(batch, dtype=torch.long))

    # ---- shape ----------------------------------------------------------------------------------------------------

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.k[0].shape[2])

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def bytes(self) -> int:
        """Bytes allocated (K and V, all layers)."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def layer_bytes(self, i: int) -> int:
        return 2 * self.k[i].numel() * self.k[i].element_size()

    # ---- bookkeeping ----------------------------------------------------------------------------------------------

    def check_room(self, num_new: torch.Tensor) -> None:
        """``SpecplanError`` if adding ``num_new[b]`` positions to some sequence would pass the capacity."""
        need = self.lengths + num_new.to(self.lengths.dtype)
        if bool((need > self.capacity).any()):
            b = int(torch.argmax(need))
            raise SpecplanError(f"KV cache full: sequence {b} needs {int(need[b])} positions, capacity is "
                                f"{self.capacity}; allocate a larger cache (prompt length + new tokens)")

    def slots(self, num_new: torch.Tensor, T: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """Where one forward's ``T`` new tokens per row go, the same in every layer: the (batch rows, positions)
        of the real ones (``lengths[b] + t`` for ``t < num_new[b]``), and which of the ``[B, T]`` are real (None:
        all). Computed once per forward, before ``advance``."""
        B = self.batch
        t = torch.arange(T)
        pos = self.lengths[:, None] + t  # [B, T]
        rows = torch.arange(B)[:, None].expand(B, T)
        if bool((num_new == T).all()):
            return (rows, pos), None
        real = t[None, :] < num_new[:, None]
        return (rows[real], pos[real]), real

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor,
              slots: tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]) -> None:
        """Store the new keys/values ``[B, kv_heads, T, head_dim]`` of ``layer`` at ``slots`` (``slots(num_new,
        T)``: padding is not stored)."""
        (rows, pos), real = slots
        k_dst, v_dst = self.k[layer], self.v[layer]
        k_src, v_src = k_new.transpose(1, 2), v_new.transpose(1, 2)  # [B, T, H, D]
        if real is not None:
            k_src, v_src = k_src[real.to(k_new.device)], v_src[real.to(k_new.device)]
        sel = (rows.to(k_dst.device), pos.to(k_dst.device))
        k_dst.transpose(1, 2).index_put_(sel, k_src.to(k_dst.device, k_dst.dtype))
        v_dst.transpose(1, 2).index_put_(sel, v_src.to(v_dst.device, v_dst.dtype))

    def view(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``layer`` over positions ``0 .. upto-1`` (what attention reads)."""
        return self.k[layer][:, :, :upto], self.v[layer][:, :, :upto]

    def advance(self, num_new: torch.Tensor) -> None:
        """After a forward: each sequence holds ``num_new[b]`` more positions."""
        self.lengths += num_new.to(self.lengths.dtype)

    def truncate(self, seq: int, length: int) -> None:
        """Roll sequence ``seq`` back to its first ``length`` positions (speculative-decoding rollback)."""
        cur = int(self.lengths[seq])
        if not 0 <= length <= cur:
            raise ValueError(f"truncate: sequence {seq} has {cur} positions, cannot set it to {length}")
        self.lengths[seq] = length

    def set_lengths(self, lengths: torch.Tensor | Sequence[int]) -> None:
        """Roll several sequences back at once (each new length <= the current one)."""
        new = torch.as_tensor(lengths, dtype=torch.long)
        if new.shape != self.lengths.shape or bool((new < 0).any()) or bool((new > self.lengths).any()):
            raise ValueError(f"set_lengths: {new.tolist()} is not a rollback of {self.lengths.tolist()}")
        self.lengths.copy_(new)

    def reset(self) -> None:
        """Empty every sequence (the buffers are reused)."""
        self.lengths.zero_()

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of sequences ``start .. stop-1`` sharing storage with this cache (K, V and lengths): a forward on
        the view writes into this cache (e.g. prefill a slice of a decode batch)."""
        if not 0 <= start < stop <= self.batch:
            raise ValueError(f"rows({start}, {stop}) is outside a batch of {self.batch}")
        return KVCache(k=[t[start:stop] for t in self.k], v=[t[start:stop] for t in self.v],
                       lengths=self.lengths[start:stop])

    def select(self, seq_ids: Sequence[int]) -> "KVCache":
        """A cache with only the sequences ``seq_ids`` (in that order), e.g. after some finished. Copies."""
        idx = torch.as_tensor(list(seq_ids), dtype=torch.long)
        k = [t.index_select(0, idx.to(t.device)) for t in self.k]
        v = [t.index_select(0, idx.to(t.device)) for t in self.v]
        return KVCache(k=k, v=v, lengths=self.lengths.index_select(0, idx).clone())
