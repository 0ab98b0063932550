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

    def committed(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The committed keys and values of ``layer``, each ``[num_kv_heads, length, head_dim]`` (views)."""
        return self.keys[layer][:, : self.length], self.values[layer][:, : self.length]
