"""Many rows in one forward: each row's part of a forward (:class:`ForwardSpec`), and their packing.

A row is one request of the engine's batch, with its own committed K/V in its own cache slot. Rows need forwards of
different sizes in the same engine step (a 5-row draft beside a 12-row verification, a long prefill beside both), so
padding every row to the longest would compute mostly padding. Instead the rows are **packed**: the token-wise work
(embeddings, projections, MLP, which is nearly all of a forward) runs over the concatenated valid rows only, and only
attention, which must see each row's own cache, uses a padded ``[rows, longest, keys]`` layout. Padding therefore
costs attention scores, not matmuls; :attr:`PackedBatch.num_padded` counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ForwardSpec:
    """One row's part of a forward: query rows that follow its committed cache.

    Every query row sees the row's whole committed cache; among the query rows, ``mask`` decides (True = may
    attend). The K/V of the first ``num_store`` rows become committed after the forward; logits are computed for rows
    ``>= logits_from`` only.
    """

    tokens: torch.Tensor  # [L] int64
    positions: torch.Tensor  # [L] int64
    mask: torch.Tensor  # [L, L] bool
    num_store: int
    logits_from: int

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class PackedBatch:
    """The rows of several :class:`ForwardSpec` packed for :meth:`Qwen3Decoder.forward_packed` (N valid query rows
    over b batch rows, the longest with ``width`` query rows, keys ``[0, key_len)`` of each row's slot)."""

    tokens: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    slot_of_row: torch.Tensor  # [N] cache slot each query row writes its K/V into
    cache_pos: torch.Tensor  # [N] position in that slot (after the slot's committed tokens)
    query_index: torch.Tensor  # [N] place of each query row in the padded [b * width] attention layout
    key_slots: torch.Tensor  # [b] cache slot of each batch row
    contiguous_slots: bool  # key_slots == 0..b-1: the keys are a view, not a gather
    attn_mask: torch.Tensor  # [b, 1, width, key_len] bool
    width: int
    key_len: int
    logits_index: torch.Tensor  # [R] packed rows that get logits, batch row by batch row
    logits_counts: tuple[int, ...]  # [b] how many of those each batch row owns

    @property
    def num_rows(self) -> int:
        """Valid query rows, the rows the token-wise layers compute."""
        return int(self.tokens.shape[0])

    @property
    def num_padded(self) -> int:
        """Padding query rows in the attention layout."""
        return len(self.logits_counts) * self.width - self.num_rows


def pack(specs: list[ForwardSpec], slots: list[int], lengths: list[int], device: torch.device) -> PackedBatch:
    """Pack ``specs`` (one per batch row) whose rows live in cache ``slots`` holding ``lengths`` committed tokens."""
    sizes = [s.num_rows for s in specs]
    b, width = len(specs), max(sizes)
    key_len = max(c + n for c, n in zip(lengths, sizes))
    size_t = torch.tensor(sizes, device=device)
    length_t = torch.tensor(lengths, device=device)
    row_of = torch.repeat_interleave(torch.arange(b, device=device), size_t)  # [N] batch row of each query row
    starts = torch.cumsum(size_t, 0) - size_t
    local = torch.arange(row_of.shape[0], device=device) - starts[row_of]  # [N] index within its batch row
    slots_t = torch.tensor(slots, device=device)
    # attention mask: every query row sees its slot's committed keys, then its own rows through its local mask
    local_masks = torch.stack([F.pad(s.mask, (0, width - n, 0, width - n)) for s, n in zip(specs, sizes)])
    key = torch.arange(key_len, device=device)[None, :] - length_t[:, None]  # [b, key_len] local column
    inside = (key >= 0) & (key < size_t[:, None])
    own = local_masks.gather(2, key.clamp(0, width - 1)[:, None, :].expand(b, width, key_len)) & inside[:, None, :]
    mask = own | (key < 0)[:, None, :]
    mask[:, :, 0] |= torch.arange(width, device=device)[None, :] >= size_t[:, None]  # padding rows: no NaN rows
    logits_from = torch.tensor([s.logits_from for s in specs], device=device)
    wants = local >= logits_from[row_of]
    return PackedBatch(
        tokens=torch.cat([s.tokens for s in specs]),
        positions=torch.cat([s.positions for s in specs]),
        slot_of_row=slots_t[row_of],
        cache_pos=length_t[row_of] + local,
        query_index=row_of * width + local,
        key_slots=slots_t,
        contiguous_slots=slots == list(range(b)),
        attn_mask=mask[:, None],
        width=width,
        key_len=key_len,
        logits_index=wants.nonzero().flatten(),
        logits_counts=tuple(n - s.logits_from for s, n in zip(specs, sizes)),
    )
