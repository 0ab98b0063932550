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
from array import array
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
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

    tokens: Sequence[int]  # [L] ids, on the host: a step's rows reach the device in one copy (pack)
    positions: Sequence[int]  # [L], on the host (a range where they follow each other)
    mask: torch.Tensor  # [L, L] bool, on the device (a few cached masks serve every step)
    num_store: int
    logits_from: int
    logits_to: int | None = None
    pad_front: int = 0

    @property
    def num_rows(self) -> int:
        return len(self.tokens)

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
        key = (args, tuple(sorted(kwargs.items()))) if kwargs else args
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
    a row whose slot is in ``own_slots`` (buffers of its own) attends in a group of its own.

    Every index the forward needs (tokens, positions, where each row's K/V go, each row's place in its group's
    padded layout, the rows that get logits, each group's sizes) is built on the host from the specs' host values
    and reaches the device in ONE copy: the device work of packing is a few operations per attention group, however
    many rows the step holds (issue 28)."""
    alone = [i for i, slot in enumerate(slots) if slot in own_slots]
    shared = [i for i in range(len(specs)) if slots[i] not in own_slots]
    grouping = [[shared[k] for k in g] for g in attention_groups([specs[i].num_rows for i in shared])]
    grouping += [[i] for i in alone]
    order = [i for g in grouping for i in g]
    specs, lengths, slots = [specs[i] for i in order], [lengths[i] for i in order], [slots[i] for i in order]
    sizes = [s.num_rows for s in specs]
    # the host buffers, in the order they are laid out in the one copy
    tokens, positions, slot_of_row, cache_pos, query_index, logits_index = (array("q") for _ in range(6))
    bounds, first, start = [], 0, 0
    for g in grouping:
        last = first + len(g)
        width = max(sizes[first:last])
        for j in range(first, last):
            spec, n = specs[j], sizes[j]
            tokens.extend(spec.tokens)
            positions.extend(spec.positions)
            if j < len(shared):  # rows of shared slots write their K/V through slot_of_row / cache_pos
                slot_of_row.extend([slots[j]] * n)
                cache_pos.extend(range(lengths[j], lengths[j] + n))
            query_index.extend(range((j - first) * width, (j - first) * width + n))
            logits_index.extend(range(start + spec.logits_from, start + spec.logits_end))
            start += n
        bounds.append((first, last, width))
        first = last
    host = tokens + positions + slot_of_row + cache_pos + query_index + logits_index
    per_row = array("q", sizes + lengths + slots)
    values = to_device(host + per_row, torch.long, device)
    parts = values.split([len(tokens), len(positions), len(slot_of_row), len(cache_pos), len(query_index),
                          len(logits_index), len(sizes), len(sizes), len(sizes)])
    tokens_t, positions_t, slot_of_row_t, cache_pos_t, query_t, logits_t, size_t, length_t, slots_t = parts
    groups, first_row = [], 0
    for (first, last, width), g in zip(bounds, grouping):
        n_rows = sum(sizes[first:last])
        rows = slice(first_row, first_row + n_rows)
        group = _group(specs[first:last], lengths[first:last], size_t[first:last], length_t[first:last],
                       slots_t[first:last], slots[first:last], rows, query_t[rows], width)
        if g[0] in alone:
            group = replace(group, slot_range=None, own_slot=slots[first], own_start=lengths[first])
        groups.append(group)
        first_row += n_rows
    return PackedBatch(
        tokens=tokens_t,
        positions=positions_t,
        num_shared=len(slot_of_row),
        slot_of_row=slot_of_row_t,
        cache_pos=cache_pos_t,
        groups=tuple(groups),
        logits_index=logits_t,
        logits_counts=tuple(s.logits_end - s.logits_from for s in specs),
        order=tuple(order),
    )


def _group(specs: list[ForwardSpec], lengths: list[int], size_t: torch.Tensor, length_t: torch.Tensor,
           slots_t: torch.Tensor, slots: list[int], rows: slice, query_index: torch.Tensor,
           width: int) -> AttentionGroup:
    """The padded attention layout of one group (``width`` rows per batch row; ``query_index``: each query row's
    place in it): each query row sees its slot's committed keys, then its own batch row's rows through that row's
    local mask."""
    device = size_t.device
    b = len(specs)
    # from the host values: reading size_t / length_t back would wait for the device
    key_len = max(s.num_rows + length for s, length in zip(specs, lengths))
    # Each key column k of batch row r is a committed key (k < length), one of the row's own rows, or outside it: a
    # column of the row's padded local mask (column 0 the committed keys, then its rows, then a False column), so
    # the whole layout is one gather from the rows' (cached) padded masks.
    tables: dict[int, torch.Tensor] = {}  # each distinct mask's table (many rows share one)
    for s in specs:
        if id(s.mask) not in tables:
            tables[id(s.mask)] = _padded_mask(s.mask, width)
    local = torch.stack([tables[id(s.mask)] for s in specs])  # [b, width, width + 2]
    key = torch.arange(key_len, device=device)[None, :] - length_t[:, None]  # [b, key_len] local column
    column = torch.where(key < size_t[:, None], key.clamp(min=-1) + 1, width + 1)
    mask = local.gather(2, column[:, None, :].expand(b, width, key_len))
    contiguous = slots == list(range(slots[0], slots[0] + b))
    return AttentionGroup(rows=rows, query_index=query_index, key_slots=slots_t,
                          slot_range=(slots[0], slots[0] + b) if contiguous else None, attn_mask=mask[:, None],
                          width=width, key_len=key_len)


@MaskCache
def _padded_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """A spec's local ``mask`` (``[n, n]``) as a ``[width, width + 2]`` table for :func:`_group`'s gather: column 0
    (the committed keys) True, its columns in 1..n, then False up to the last column (keys outside the row).
    Padding rows (n and after) see column 0 and the row's first key, so that key 0, committed or not, is visible to
    every padding row (no row of NaN)."""
    n = mask.shape[0]
    table = torch.zeros(width, width + 2, dtype=torch.bool, device=mask.device)
    table[:, 0] = True
    table[:n, 1:n + 1] = mask
    table[n:, 1] = True
    return table
