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

    Layout per layer: ``[num_slots, num_kv_heads, capacity, head_dim]``, shared by the slots. Slot ``s`` holds one
    request's committed tokens in ``[0, lengths[s])``; a batched forward writes each row's K/V into the slots right
    after them (scratch until committed), exactly as :class:`KVCache` does for a single row. A finished request's
    slot is reused by the next one after :meth:`SlotCache.reset`.

    A request longer than the shared ``capacity`` gets buffers of its own for its slot (:meth:`give_own`,
    ``[num_kv_heads, its capacity, head_dim]`` per layer) for as long as it runs (:meth:`release`): one long request
    takes memory for itself alone, and never grows every slot to its length.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_slots: int, capacity: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (num_slots, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.lengths = [0] * num_slots
        self.capacity = capacity
        # slot -> its own per-layer key and value buffers [num_kv_heads, capacity, head_dim] (a long request's)
        self.own: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def slot(self, index: int) -> SlotCache:
        """The single-row view of slot ``index`` that a row's decoding loop reads and commits through."""
        return SlotCache(self, index)

    def give_own(self, index: int, capacity: int) -> None:
        """Give slot ``index`` buffers of its own for ``capacity`` token slots (zeroed: a masked padding key must not
        be NaN, whose zero weight would still poison the attention output)."""
        layer = self.keys[0]
        shape = (layer.shape[1], capacity, layer.shape[3])
        self.own[index] = ([layer.new_zeros(shape) for _ in self.keys], [layer.new_zeros(shape) for _ in self.keys])

    def release(self, index: int) -> None:
        """Return slot ``index``'s own buffers, if it has them (its request ended); it uses the shared ones again."""
        self.own.pop(index, None)

    def capacity_of(self, index: int) -> int:
        """Token slots of slot ``index``: its own buffers' or the shared capacity."""
        own = self.own.get(index)
        return self.capacity if own is None else int(own[0][0].shape[1])

    @property
    def max_capacity(self) -> int:
        """The most token slots any slot has (the positions a forward may reach)."""
        return max([self.capacity, *(int(keys[0].shape[1]) for keys, _ in self.own.values())])

    @property
    def own_bytes(self) -> int:
        """Bytes the slots' own buffers take."""
        return sum(t.numel() * t.element_size() for keys, values in self.own.values() for t in (*keys, *values))


class SlotCache:
    """One slot of a :class:`BatchKVCache`, with the committed-length interface of :class:`KVCache`."""

    def __init__(self, batch: BatchKVCache, index: int) -> None:
        self.batch, self.index = batch, index
        self._views: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # of the shared buffers

    @property
    def keys(self) -> list[torch.Tensor]:
        """Per-layer ``[num_kv_heads, capacity, head_dim]`` views of the slot, as :attr:`KVCache.keys`: a slot runs
        the single-row forward unchanged."""
        return self._layer_views()[0]

    @property
    def values(self) -> list[torch.Tensor]:
        return self._layer_views()[1]

    def _layer_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        own = self.batch.own.get(self.index)
        if own is not None:
            return own
        if self._views is None:  # built once: the shared buffers never change
            b, i = self.batch, self.index
            self._views = ([k[i] for k in b.keys], [v[i] for v in b.values])
        return self._views

    @property
    def length(self) -> int:
        return self.batch.lengths[self.index]

    @property
    def capacity(self) -> int:
        return self.batch.capacity_of(self.index)

    def reset(self) -> None:
        """Forget the slot's committed tokens (a new request takes it)."""
        self.batch.lengths[self.index] = 0

    def commit(self, num_tokens: int) -> None:
        """Make the K/V just written for this slot's first ``num_tokens`` scratch rows permanent."""
        if self.length + num_tokens > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.length} + {num_tokens} > {self.capacity}")
        self.batch.lengths[self.index] += num_tokens
