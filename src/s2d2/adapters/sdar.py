"""SDAR family: Qwen3-architecture block-diffusion models with position-aligned logits (a mask predicts itself).

Forwards (reference §1.5, §1.8, §1.13; ``cache_len`` is always a multiple of the block size here):

- draft: pending rows (committed, not yet cached) then the block. Pending rows attend causally
  (``cache_ver``) or block-causally; block rows see all pending rows and the whole block, except that with
  ``draft_ver`` the committed prefix of the block (rows before the first mask) attends causally.
- verify, the "2L" construction: the block up to the span's end with drafts filled in (first half, causal),
  then one mask per span position (second half). The mask for span position i sees the first-half tokens before
  i and itself, so its logits are the block-size-1 (AR) conditional of position i. Only the second half gets
  logits, and the cache is not written. Unlike the reference we send only the tokens the span rows can see
  (block start .. span end), not the whole block twice. When the span runs to the block's end, ``next_block``
  mask rows may follow: they draft the next block from the first half, which is exactly the next draft forward
  if every draft is accepted (the first half's causal K/V are then the finished block's cache entries).
- commit: pending rows alone, same mask as in a draft.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import torch

from s2d2.cache import KVCache
from s2d2.models.qwen3 import Qwen3Decoder


@lru_cache(maxsize=1024)
def draft_mask(num_pending: int, block_size: int, first_mask: int, cache_ver: bool, draft_ver: bool,
               device: torch.device) -> torch.Tensor:
    """Local mask ``[P + B, P + B]`` (True = may attend) for ``num_pending`` pending rows, then ``block_size`` rows.

    The pending rows start at a block boundary; without ``cache_ver`` they attend block-causally, the mask SDAR
    was trained with.
    """
    n = num_pending + block_size
    idx = torch.arange(n, device=device)
    if cache_ver:
        mask = idx[:, None] >= idx[None, :]
    else:
        mask = (idx[:, None] // block_size) >= (idx[None, :] // block_size)
    mask[num_pending:, num_pending:] = True  # the block is bidirectional ...
    if draft_ver and first_mask > 0:  # ... except its committed prefix, which attends causally
        rows = slice(num_pending, num_pending + first_mask)
        mask[rows, num_pending:] = idx[None, num_pending:] <= idx[rows, None]
    return mask


@lru_cache(maxsize=1024)
def verify_mask(num_first: int, span_offset: int, device: torch.device, num_next: int = 0) -> torch.Tensor:
    """Local 2L mask: ``num_first`` causal rows, then one mask row per span position (span starts at ``span_offset``),
    then ``num_next`` rows drafting the next block.

    Second-half row k (position ``span_offset + k``) sees first-half rows ``< span_offset + k`` and itself. The
    next-block rows see every first-half row and each other: the next block's draft if every draft is accepted.
    """
    num_span = num_first - span_offset
    n = num_first + num_span + num_next
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    first = torch.arange(num_first, device=device)
    mask[:num_first, :num_first] = first[:, None] >= first[None, :]
    k = torch.arange(num_span, device=device)
    mask[num_first:num_first + num_span, :num_first] = first[None, :] < (span_offset + k)[:, None]
    mask[num_first + k, num_first + k] = True
    if num_next:
        nxt = slice(num_first + num_span, n)
        mask[nxt, :num_first] = True
        mask[nxt, nxt] = True
    return mask


class SDARAdapter:
    """Draft / verify / commit forwards for SDAR checkpoints (and plain Qwen3 models trained the same way)."""

    family = "sdar"

    def __init__(self, model: Qwen3Decoder, mask_id: int, stop_ids: Iterable[int], banned_ids: Iterable[int]) -> None:
        self.model = model
        self.mask_id = mask_id
        self.stop_ids = tuple(stop_ids)
        self.max_positions = model.config.max_position_embeddings
        self.vocab_size = model.config.vocab_size
        self.device = model.embed.weight.device
        # Never sample the mask token (an untrained model predicts it, and "fill masks" would never end) or the
        # padding rows past the tokenizer's vocabulary.
        self._banned = torch.tensor(sorted(set(banned_ids) | {mask_id}), dtype=torch.long, device=self.device)

    def new_cache(self, capacity: int) -> KVCache:
        return self.model.new_cache(capacity)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, local_mask: torch.Tensor,
             num_store: int, logits_from: int) -> torch.Tensor:
        n = ids.shape[0]
        if cache.length:
            mask = torch.ones(n, cache.length + n, dtype=torch.bool, device=self.device)
            mask[:, cache.length:] = local_mask
        else:
            mask = local_mask
        logits = self.model(ids, positions, cache, mask, num_store=num_store, logits_from=logits_from)
        return logits.index_fill_(-1, self._banned, float("-inf"))

    def draft(self, ids: torch.Tensor, cache: KVCache, block_start: int, block_size: int, first_mask: int,
              *, cache_ver: bool, draft_ver: bool) -> torch.Tensor:
        c, end = cache.length, block_start + block_size
        pending = block_start - c
        mask = draft_mask(pending, block_size, first_mask, cache_ver, draft_ver, self.device)
        positions = torch.arange(c, end, device=self.device)
        return self._run(ids[c:end], positions, cache, mask, num_store=pending, logits_from=pending)

    def verify(self, filled: list[int], cache: KVCache, block_start: int, span_start: int,
               next_block: int = 0) -> torch.Tensor:
        assert cache.length == block_start, "verify expects the cache to hold everything before the block"
        num_first = len(filled)
        offset = span_start - block_start
        end = block_start + num_first
        tokens = torch.tensor(filled + [self.mask_id] * (num_first - offset + next_block), dtype=torch.long,
                              device=self.device)
        positions = torch.cat((torch.arange(block_start, end, device=self.device),
                               torch.arange(span_start, end + next_block, device=self.device)))
        mask = verify_mask(num_first, offset, self.device, next_block)
        return self._run(tokens, positions, cache, mask, num_store=0, logits_from=num_first)

    def commit(self, ids: torch.Tensor, cache: KVCache, end: int, block_size: int, *, cache_ver: bool) -> None:
        c = cache.length
        n = end - c
        mask = draft_mask(n, block_size, 0, cache_ver, False, self.device)[:n, :n]
        self._run(ids[c:end], torch.arange(c, end, device=self.device), cache, mask, num_store=n, logits_from=n)
