"""The KV cache: committed tokens only.

Layout: one key and one value buffer per layer, each ``[num_kv_heads, capacity, head_dim]``. Slots
``[0, length)`` hold the K/V of *committed* tokens. A forward writes the K/V of all its input rows into the slots
that follow, ``[length, length + L)``, and attends over ``[0, length + L)``; those slots are scratch until
:meth:`KVCache.commit` makes a leading part of them permanent. Draft and verify forwards commit nothing, so they
leave the committed part, and ``length``, exactly as they found it (design invariant 1), and they never copy the
cache to concatenate it with their own K/V.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated per-layer K/V buffers whose first ``length`` slots are committed tokens."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0

    def reset(self) -> None:
        """Forget every committed token (the buffers are reused)."""
        self.length = 0

    def commit(self, num_tokens: int) -> None:
        """Make the K/V just written for the first ``num_tokens`` rows of the last forward permanent."""
        if self.length + num_tokens > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.length} + {num_tokens} > {self.capacity}")
        self.length += num_tokens



class BatchKVCache:
    """K/V buffers for ``num_slots`` independent rows (the engine's batch), each with its own committed length.

    Layout per layer: ``[num_slots, num_kv_heads, capacity, head_dim]``. Slot ``s`` holds one request's committed
    tokens in ``[0, lengths[s])``; a batched forward writes each row's K/V into the slots right after them (scratch
    until committed), exactly as :class:`KVCache` does for a single row. A finished request's slot is reused by the
    next one after :meth:`SlotCache.reset`.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_slots: int, capacity: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (num_slots, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.lengths = [0] * num_slots
        self.capacity = capacity

    def slot(self, index: int) -> SlotCache:
        """The single-row view of slot ``index`` that a row's decoding loop reads and commits through."""
        return SlotCache(self, index)

    def ensure_capacity(self, capacity: int) -> None:
        """Grow every slot to at least ``capacity`` token slots, keeping what they hold (a longer request arrived)."""
        if capacity <= self.capacity:
            return
        capacity = max(capacity, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, : self.capacity] = old
                buffers[i] = new
        self.capacity = capacity


class SlotCache:
    """One slot of a :class:`BatchKVCache`, with the committed-length interface of :class:`KVCache`."""

    def __init__(self, batch: BatchKVCache, index: int) -> None:
        self.batch, self.index = batch, index
        self._views: tuple[int, list[torch.Tensor], list[torch.Tensor]] | None = None

    @property
    def keys(self) -> list[torch.Tensor]:
        """Per-layer ``[num_kv_heads, capacity, head_dim]`` views of the slot, as :attr:`KVCache.keys`: a slot runs
        the single-row forward unchanged."""
        return self._layer_views()[0]

    @property
    def values(self) -> list[torch.Tensor]:
        return self._layer_views()[1]

    def _layer_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # rebuilt only when ensure_capacity has replaced the buffers (the capacity changes exactly then)
        if self._views is None or self._views[0] != self.batch.capacity:
            b, i = self.batch, self.index
            self._views = (b.capacity, [k[i] for k in b.keys], [v[i] for v in b.values])
        return self._views[1], self._views[2]

    @property
    def length(self) -> int:
        return self.batch.lengths[self.index]

    @property
    def capacity(self) -> int:
        return self.batch.capacity

    def reset(self) -> None:
        """Forget the slot's committed tokens (a new request takes it)."""
        self.batch.lengths[self.index] = 0

    def commit(self, num_tokens: int) -> None:
        """Make the K/V just written for this slot's first ``num_tokens`` scratch rows permanent."""
        if self.length + num_tokens > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.length} + {num_tokens} > {self.capacity}")
        self.batch.lengths[self.index] += num_tokens
