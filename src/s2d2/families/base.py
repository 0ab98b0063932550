"""The contract between the family-agnostic decoding loop and a model family.

A family adapter knows how to build its three kinds of forward (masks, positions, logit alignment, special ids);
the loop never does. Every forward reads the committed cache, and may first write *pending* tokens, those
committed but not yet cached (``cache.length`` up to the current block's start: the prompt, or the previous
block), so that a finished block's K/V ride along with the next draft instead of costing a forward of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from s2d2.core.requests import FamilyTraits
from s2d2.models.batching import ForwardSpec
from s2d2.models.cache import BatchKVCache, KVCache
from s2d2.models.decoder import Decoder


class FamilyAdapter(Protocol):
    """What the executor (:mod:`s2d2.engine.runner`) needs from a model family: the network, and how to lay out each
    kind of forward the decoding loop asks for (:mod:`s2d2.core.requests`) as rows, positions and a mask
    (:class:`~s2d2.models.batching.ForwardSpec`). Every spec method takes ``cache_len``, the committed length of the
    row's cache, so the same spec serves a single-row cache and one slot of the engine's batch cache."""

    family: str  # the family's name, as ``s2d2 init-random --family`` spells it
    model: Decoder  # the network (compiled by load(..., compile=True))
    mask_id: int
    stop_ids: tuple[int, ...]
    max_positions: int
    vocab_size: int
    device: torch.device
    banned_ids: torch.Tensor  # ids never emitted (the mask, padding rows past the tokenizer): their logits are -inf
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
        """An empty single-row cache for ``capacity`` token slots."""
        ...

    def new_batch_cache(self, num_slots: int, capacity: int) -> BatchKVCache:
        """An empty cache of ``num_slots`` rows of ``capacity`` token slots each."""
        ...

    def draft_spec(self, ids: Sequence[int], cache_len: int, block_start: int, block_size: int, first_mask: int,
                   *, cache_ver: bool, draft_ver: bool, num_blocks: int = 1, cache_prefix: bool = False) -> ForwardSpec:
        """Diffusion-mode pass over ``ids[block_start : block_start + num_blocks * block_size]`` (the block, or the
        blocks in flight of pipelined decoding, each seeing itself and those before); its logits are ``[R, V]``.

        First writes the pending tokens ``ids[cache_len : block_start]`` into the cache (causally if ``cache_ver``).
        With ``draft_ver`` the rows of the first block before ``first_mask`` attend causally; with ``cache_prefix``
        too (prefix caching) they are pending as well, written to the cache, and the cache may already hold part of
        them.
        """
        ...

    def verify_spec(self, filled: list[int], cache_len: int, block_start: int, span_start: int,
                    next_block: int = 0) -> ForwardSpec:
        """AR-mode (block size 1) pass; its logits are ``[n + next_block, V]``: first for positions
        ``span_start .. span_start + n``, then (``next_block`` > 0, span ending at the block's end) a diffusion-mode
        draft of the next ``next_block`` positions given ``filled``.

        ``filled`` holds the block's tokens from ``block_start`` to the span's end, with drafts in the span. Row i
        of the result is the AR conditional of span position i given the cache and ``filled`` before it. The
        cache's committed part is left unchanged and must hold everything before ``block_start`` (and with prefix
        caching may hold ``filled``'s committed tokens up to the span); the K/V of the rest of ``filled`` are left
        in the scratch slots right after it, computed causally, so that the caller may commit the accepted ones.
        """
        ...

    def commit_spec(self, ids: Sequence[int], cache_len: int, end: int, block_size: int, *,
                    cache_ver: bool) -> ForwardSpec:
        """Write the K/V of ``ids[cache_len : end]`` into the cache (a forward of its own, no logits used)."""
        ...

    def finalize_spec(self, ids: Sequence[int], cache_len: int, end: int, block_size: int, *,
                      cache_ver: bool) -> ForwardSpec:
        """Shifted-logit families only: :meth:`commit_spec`, keeping the last row's logits ``[1, V]`` (the prediction
        for position ``end``, the next block's AR token)."""
        ...
