"""The contract between the family-agnostic decoding loop and a model family.

A family adapter knows how to build its three kinds of forward (masks, positions, logit alignment, special ids);
the loop never does. Every forward reads the committed cache, and may first write *pending* tokens, those
committed but not yet cached (``cache.length`` up to the current block's start: the prompt, or the previous
block), so that a finished block's K/V ride along with the next draft instead of costing a forward of their own.
"""

from __future__ import annotations

from typing import Protocol

import torch

from s2d2.core.requests import FamilyTraits
from s2d2.models.batching import ForwardSpec, PackedBatch
from s2d2.models.cache import BatchKVCache, KVCache, SlotCache
from s2d2.models.decoder import Qwen3Decoder


class FamilyAdapter(Protocol):
    """What the decoding loop needs from a model family."""

    model: Qwen3Decoder  # the network (compiled by load(..., compile=True))
    mask_id: int
    stop_ids: tuple[int, ...]
    max_positions: int
    vocab_size: int
    device: torch.device
    # Row t-1 predicts token t (Fast-dLLM v2): every block opens with an AR-decoded token, and AR mode is a plain
    # causal forward. False: a mask's own row predicts it (SDAR), and AR mode is the 2L construction.
    shifted_logits: bool
    default_block_size: int | None  # the checkpoint's block size (Fast-dLLM v2's bd_size), for configs leaving it unset
    default_sub_block_size: int | None  # the family's sub-block size (Fast-dLLM v2: 8), for configs leaving it unset
    supports_editing: bool  # whether editing_threshold may be used (LLaDA2.x)
    # D2F: blocks start at the prompt's end (not at absolute multiples of the block size), and without the
    # AR-consistent cache the prompt is one bidirectional chunk
    blocks_from_prompt_end: bool

    @property
    def traits(self) -> FamilyTraits:
        """The fields above that the per-row algorithm reads, as one frozen value."""
        ...

    def new_cache(self, capacity: int) -> KVCache:
        """An empty cache for ``capacity`` token slots."""
        ...

    def draft(self, ids: torch.Tensor, cache: KVCache, block_start: int, block_size: int, first_mask: int,
              *, cache_ver: bool, draft_ver: bool, num_blocks: int = 1, cache_prefix: bool = False) -> torch.Tensor:
        """Diffusion-mode pass over ``ids[block_start : block_start + num_blocks * block_size]`` (the block, or the
        blocks in flight of pipelined decoding, each seeing itself and those before); returns logits ``[R, V]``.

        First writes the pending tokens ``ids[cache.length : block_start]`` into the cache (causally if
        ``cache_ver``). With ``draft_ver`` the rows of the first block before ``first_mask`` attend causally; with
        ``cache_prefix`` too (prefix caching) they are pending as well, written to the cache, and the cache may
        already hold part of them.
        """
        ...

    def verify(self, filled: list[int], cache: KVCache, block_start: int, span_start: int,
               next_block: int = 0) -> torch.Tensor:
        """AR-mode (block size 1) pass; returns logits ``[n + next_block, V]``: first for positions
        ``span_start .. span_start + n``, then (``next_block`` > 0, span ending at the block's end) a diffusion-mode
        draft of the next ``next_block`` positions given ``filled``.

        ``filled`` holds the block's tokens from ``block_start`` to the span's end, with drafts in the span. Row i
        of the result is the AR conditional of span position i given the cache and ``filled`` before it. The
        cache's committed part is left unchanged and must hold everything before ``block_start`` (and with prefix
        caching may hold ``filled``'s committed tokens up to the span); the K/V of the rest of ``filled`` are left
        in the scratch slots right after it, computed causally, so that the caller may commit the accepted ones.
        """
        ...

    def commit(self, ids: torch.Tensor, cache: KVCache, end: int, block_size: int, *, cache_ver: bool) -> None:
        """Write the K/V of ``ids[cache.length : end]`` into the cache (a forward of its own)."""
        ...

    def finalize(self, ids: torch.Tensor, cache: KVCache, end: int, block_size: int, *,
                 cache_ver: bool) -> torch.Tensor:
        """Shifted-logit families: :meth:`commit`, and return the last row's logits ``[1, V]`` (the prediction for
        position ``end``, the next block's AR token)."""
        ...

    # The batched engine builds the same three forwards as specs (``cache_len`` is the row's committed length) and
    # runs the rows of many requests in one forward.
    def draft_spec(self, ids: torch.Tensor, cache_len: int, block_start: int, block_size: int, first_mask: int,
                   *, cache_ver: bool, draft_ver: bool, num_blocks: int = 1, cache_prefix: bool = False) -> ForwardSpec:
        """The rows and mask of :meth:`draft`."""
        ...

    def verify_spec(self, filled: list[int], cache_len: int, block_start: int, span_start: int,
                    next_block: int = 0) -> ForwardSpec:
        """The rows and mask of :meth:`verify`."""
        ...

    def commit_spec(self, ids: torch.Tensor, cache_len: int, end: int, block_size: int, *,
                    cache_ver: bool) -> ForwardSpec:
        """The rows and mask of :meth:`commit`."""
        ...

    def finalize_spec(self, ids: torch.Tensor, cache_len: int, end: int, block_size: int, *,
                      cache_ver: bool) -> ForwardSpec:
        """The rows and mask of :meth:`finalize`."""
        ...

    def run(self, spec: ForwardSpec, cache: KVCache | SlotCache) -> torch.Tensor:
        """One row's forward against its own cache (a single-row cache, or one slot of a batch cache): commits its
        ``num_store`` rows and returns its logits ``[num_rows - logits_from, V]``."""
        ...

    def new_batch_cache(self, num_slots: int, capacity: int) -> BatchKVCache:
        """An empty cache of ``num_slots`` rows of ``capacity`` token slots each."""
        ...

    def run_batch(self, specs: list[ForwardSpec], cache: BatchKVCache, slots: list[int]) -> list[torch.Tensor]:
        """One forward for several rows (row ``i`` in cache slot ``slots[i]``): commits each row's ``num_store``
        rows and returns each row's logits ``[num_rows - logits_from, V]``."""
        ...

    def run_packed(self, batch: PackedBatch, specs: list[ForwardSpec], cache: BatchKVCache,
                   slots: list[int]) -> list[torch.Tensor]:
        """:meth:`run_batch` with the rows already packed (``batch = s2d2.models.batching.pack(specs, slots, ...)``)."""
        ...
