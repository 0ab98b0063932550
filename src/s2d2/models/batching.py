"""Many rows in one forward: each row's part of a forward (:class:`ForwardSpec`), and their packing.

A row is one request of the engine's batch, with its own committed K/V in its own cache slot. Rows need forwards of
different sizes in the same engine step (a 5-row draft beside a 12-row verification, a long prefill beside both), so
padding every row to the longest would compute mostly padding. Instead the rows are **packed**: the token-wise work
(embeddings, projections, MLP, which is nearly all of a forward) runs over the concatenated valid rows only, and only
attention, which must see each row's own cache, uses a padded ``[rows, longest, keys]`` layout, per group of rows of
similar length (so that one prompt's prefill does not pad every one-token AR row). Padding therefore costs attention
scores, not matmuls; :attr:`PackedBatch.num_padded` counts it.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

import torch

from s2d2.transfer import to_device


@dataclass(frozen=True)
class ForwardSpec:
    """One row's part of a forward: query rows that follow its committed cache.

    Every query row sees the row's whole committed cache; among the query rows, ``mask`` decides (True = may
    attend). The K/V of the first ``num_store`` rows become committed after the forward; logits are computed for rows
    ``logits_from .. logits_to - 1`` only (``logits_to`` None: to the last row), and ``pad_front`` copies of the
    first of them are put in front (a shifted-logit family's draft whose first offset has no row before it in the
    forward: that offset is committed, so its row is never read).
    """

    tokens: torch.Tensor  # [L] int64
    positions: torch.Tensor  # [L] int64
    mask: torch.Tensor  # [L, L] bool
    num_store: int
    logits_from: int
    logits_to: int | None = None
    pad_front: int = 0

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def logits_end(self) -> int:
        """One past the last row that gets logits."""
        return self.num_rows if self.logits_to is None else self.logits_to

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The forward's logit rows for this spec, with ``pad_front`` applied."""
        if self.pad_front:
            return torch.cat([logits[:1].expand(self.pad_front, -1), logits])
        return logits


@dataclass(frozen=True)
class AttentionGroup:
    """Batch rows of similar length whose attention runs as one padded ``[rows, width, key_len]`` call."""

    rows: slice  # their packed query rows (contiguous: packing orders batch rows group by group)
    query_index: torch.Tensor  # [n] place of each of those rows in the padded [num_batch_rows * width] layout
    key_slots: torch.Tensor  # [num_batch_rows] cache slot of each batch row
    slot_range: tuple[int, int] | None  # the slots are start..stop-1 in order: keys are a view, not a gather
    attn_mask: torch.Tensor  # [num_batch_rows, 1, width, key_len] bool
    width: int
    key_len: int
    # a group of one batch row whose slot has buffers of its own (BatchKVCache.give_own): its slot, and where its
    # rows' K/V go in those buffers (after its committed tokens)
    own_slot: int | None = None
    own_start: int = 0

    @property
    def num_padded(self) -> int:
        return int(self.attn_mask.shape[0]) * self.width - int(self.query_index.shape[0])


@dataclass(frozen=True)
class PackedBatch:
    """The rows of several :class:`ForwardSpec` packed for :meth:`Decoder.forward_packed`.

    Batch rows are reordered into attention groups of similar length (``order[k]`` is the spec that packed batch row
    ``k`` comes from), so that a long row (a prompt's prefill) does not pad every short one.
    """

    tokens: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    # The first num_shared query rows belong to slots in the shared buffers; for each of them, the slot it writes its
    # K/V into and the position there (after the slot's committed tokens). The rows after them belong to slots with
    # buffers of their own, and write through their groups (AttentionGroup.own_slot).
    num_shared: int
    slot_of_row: torch.Tensor  # [num_shared]
    cache_pos: torch.Tensor  # [num_shared]
    groups: tuple[AttentionGroup, ...]
    logits_index: torch.Tensor  # [R] packed rows that get logits, packed batch row by packed batch row
    logits_counts: tuple[int, ...]  # how many of those each packed batch row owns
    order: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        """Valid query rows, the rows the token-wise layers compute."""
        return int(self.tokens.shape[0])

    @property
    def num_padded(self) -> int:
        """Padding query rows in the attention layouts."""
        return sum(g.num_padded for g in self.groups)


class MaskCache:
    """A least-recently-used cache for a function building attention masks, keeping only masks of at most
    ``max_elements`` entries: decoding builds the same few small masks (a block's draft, a 2L verification) over and
    over, while a prompt's prefill mask grows with the prompt's square (a 16k-token prompt's is 256 MiB) and is built
    once per prompt length, so caching every mask would hold memory without bound on a long-context server."""

    def __init__(self, build: Callable[..., torch.Tensor], max_entries: int = 1024,
                 max_elements: int = 1 << 16) -> None:
        self.build, self.max_entries, self.max_elements = build, max_entries, max_elements
        self.masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        functools.update_wrapper(self, build)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        key = (args, tuple(sorted(kwargs.items())))
        mask = self.masks.get(key)
        if mask is not None:
            self.masks.move_to_end(key)
            return mask
        mask = self.build(*args, **kwargs)
        if mask.numel() <= self.max_elements:
            self.masks[key] = mask
            if len(self.masks) > self.max_entries:
                self.masks.popitem(last=False)
        return mask


# a batch row joins the current attention group while it is at most this many times the group's shortest row
GROUP_RATIO = 2
MAX_GROUPS = 4  # each group is one more attention call per layer


def attention_groups(sizes: list[int]) -> list[list[int]]:
    """Batch rows (indices into ``sizes``) in groups of similar length, shortest first; within a group, rows keep
    their order."""
    by_size = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    groups: list[list[int]] = []
    for i in by_size:
        if groups and (sizes[i] <= GROUP_RATIO * sizes[groups[-1][0]] or len(groups) == MAX_GROUPS):
            groups[-1].append(i)
        else:
            groups.append([i])
    return [sorted(g) for g in groups]


def pack(specs: list[ForwardSpec], slots: list[int], lengths: list[int], device: torch.device,
         own_slots: Collection[int] = ()) -> PackedBatch:
    """Pack ``specs`` (one per batch row) whose rows live in cache ``slots`` holding ``lengths`` committed tokens;
    a row whose slot is in ``own_slots`` (buffers of its own) attends in a group of its own."""
    alone = [i for i, slot in enumerate(slots) if slot in own_slots]
    shared = [i for i in range(len(specs)) if slots[i] not in own_slots]
    grouping = [[shared[k] for k in g] for g in attention_groups([specs[i].num_rows for i in shared])]
    grouping += [[i] for i in alone]
    order = [i for g in grouping for i in g]
    specs = [specs[i] for i in order]
    # one host-to-tensor copy for every per-batch-row integer (tiny tensor ops cost microseconds each)
    size_t, length_t, slots_t = to_device(
        [[s.num_rows for s in specs], [lengths[i] for i in order], [slots[i] for i in order]], torch.long, device)
    num_rows = sum(s.num_rows for s in specs)
    # [N] batch row of each row (output_size from the host: without it the op reads size_t back from the device)
    row_of = torch.repeat_interleave(torch.arange(len(specs), device=device), size_t, output_size=num_rows)
    starts = torch.cumsum(size_t, 0) - size_t
    local = torch.arange(row_of.shape[0], device=device) - starts[row_of]  # [N] index within its batch row
    groups, first, first_row = [], 0, 0
    for g in grouping:
        last = first + len(g)
        n_rows = sum(s.num_rows for s in specs[first:last])
        group = _group(specs[first:last], [lengths[i] for i in order[first:last]], size_t[first:last],
                       length_t[first:last], slots_t[first:last], [slots[i] for i in order[first:last]],
                       slice(first_row, first_row + n_rows), local[first_row:first_row + n_rows],
                       row_of[first_row:first_row + n_rows] - first)
        if g[0] in alone:
            group = replace(group, slot_range=None, own_slot=slots[g[0]], own_start=lengths[g[0]])
        groups.append(group)
        first, first_row = last, first_row + n_rows
    # the rows of shared slots come first (their groups were packed first)
    num_shared = sum(specs[k].num_rows for k in range(len(shared)))
    # the rows that get logits, from the host values (a nonzero() over a device mask would wait for the device)
    wanted, start = [], 0
    for spec in specs:
        wanted.extend(range(start + spec.logits_from, start + spec.logits_end))
        start += spec.num_rows
    return PackedBatch(
        tokens=torch.cat([s.tokens for s in specs]),
        positions=torch.cat([s.positions for s in specs]),
        num_shared=num_shared,
        slot_of_row=slots_t[row_of[:num_shared]],
        cache_pos=(length_t[row_of] + local)[:num_shared],
        groups=tuple(groups),
        logits_index=to_device(wanted, torch.long, device),
        logits_counts=tuple(s.logits_end - s.logits_from for s in specs),
        order=tuple(order),
    )


def _group(specs: list[ForwardSpec], lengths: list[int], size_t: torch.Tensor, length_t: torch.Tensor,
           slots_t: torch.Tensor, slots: list[int], rows: slice, local: torch.Tensor,
           row_of: torch.Tensor) -> AttentionGroup:
    """The padded attention layout of one group: each query row sees its slot's committed keys, then its own
    batch row's rows through that row's local mask."""
    device = size_t.device
    b, width = len(specs), max(s.num_rows for s in specs)
    # from the host values: reading size_t / length_t back would wait for the device
    key_len = max(s.num_rows + length for s, length in zip(specs, lengths))
    # Local masks come from a few cached tensors (many rows share one), so they are placed one distinct mask at a
    # time rather than one row at a time.
    local_masks = torch.zeros(b, width, width, dtype=torch.bool, device=device)
    by_mask: dict[int, tuple[torch.Tensor, list[int]]] = {}
    for r, s in enumerate(specs):
        by_mask.setdefault(id(s.mask), (s.mask, []))[1].append(r)
    for mask, batch_rows in by_mask.values():
        n = mask.shape[0]
        local_masks[batch_rows, :n, :n] = mask
    key = torch.arange(key_len, device=device)[None, :] - length_t[:, None]  # [b, key_len] local column
    inside = (key >= 0) & (key < size_t[:, None])
    own = local_masks.gather(2, key.clamp(0, width - 1)[:, None, :].expand(b, width, key_len)) & inside[:, None, :]
    mask = own | (key < 0)[:, None, :]
    mask[:, :, 0] |= torch.arange(width, device=device)[None, :] >= size_t[:, None]  # padding rows: no NaN rows
    contiguous = slots == list(range(slots[0], slots[0] + b))
    return AttentionGroup(rows=rows, query_index=row_of * width + local, key_slots=slots_t,
                          slot_range=(slots[0], slots[0] + b) if contiguous else None, attn_mask=mask[:, None],
                          width=width, key_len=key_len)
