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

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tokenizers import Tokenizer

from s2d2.checkpoint import SpecialIds
from s2d2.core.requests import FamilyTraits
from s2d2.models.batching import ForwardSpec, MaskCache
from s2d2.models.cache import BatchKVCache, KVCache
from s2d2.models.decoder import QWEN_WEIGHT_NAMES as QWEN_WEIGHT_NAMES  # SDAR's (Qwen3's) checkpoint names, re-exported
from s2d2.models.decoder import Decoder, DecoderConfig


@MaskCache
def draft_mask(num_pending: int, block_size: int, first_mask: int, cache_ver: bool, draft_ver: bool,
               device: torch.device, prompt_rows: int = 0, num_blocks: int = 1) -> torch.Tensor:
    """Local mask ``[P + R, P + R]`` (True = may attend) for ``num_pending`` pending rows, then ``R = num_blocks *
    block_size`` rows: the block, or (pipelined decoding) the blocks in flight, each seeing itself and those before.

    The pending rows start at a block boundary; without ``cache_ver`` they attend block-causally, the mask SDAR
    was trained with, except that the first ``prompt_rows`` of them (a D2F prompt: one chunk, blocks counted from
    its end) attend to each other bidirectionally and the blocks after them are counted from there.
    """
    n = num_pending + num_blocks * block_size
    idx = torch.arange(n, device=device)
    if cache_ver:
        mask = idx[:, None] >= idx[None, :]
    else:
        block = (idx - prompt_rows).div(block_size, rounding_mode="floor")  # the prompt chunk is block -1
        block[:prompt_rows] = -1
        mask = block[:, None] >= block[None, :]
    region = (idx[num_pending:] - num_pending) // block_size
    mask[num_pending:, num_pending:] = region[:, None] >= region[None, :]  # each block is bidirectional ...
    if draft_ver and first_mask > 0:  # ... except its committed prefix, which attends causally
        rows = slice(num_pending, num_pending + first_mask)
        mask[rows, num_pending:] = idx[None, num_pending:] <= idx[rows, None]
    return mask


@MaskCache
def prefix_draft_mask(num_pending: int, num_cached: int, block_size: int, first_mask: int, device: torch.device,
                      num_blocks: int = 1) -> torch.Tensor:
    """:func:`draft_mask` with the AR-consistent cache and ``draft_ver`` for a block whose first ``num_cached``
    offsets are already in the cache (their rows dropped; every query row sees the whole cache, as each of them saw
    those causal rows). ``num_pending`` > 0 only with ``num_cached`` 0."""
    mask = draft_mask(num_pending, block_size, first_mask, True, True, device, 0, num_blocks)
    return mask[num_cached:, num_cached:].contiguous()


@MaskCache
def commit_mask(num_pending: int, block_size: int, cache_ver: bool, device: torch.device,
                prompt_rows: int = 0) -> torch.Tensor:
    """:func:`draft_mask`'s pending rows alone: a forward that only writes them (cached like every mask, so that a
    step's rows sharing it share one tensor)."""
    return draft_mask(num_pending, block_size, 0, cache_ver, False, device, prompt_rows)[:num_pending, :num_pending]


@MaskCache
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
    # SDAR checkpoints say "sdar"; a Qwen3 model trained with the block-diffusion objective may say "qwen3"
    model_types: tuple[str, ...] = ("sdar", "qwen3")
    shifted_logits = False  # a mask's own row predicts it
    default_block_size: int | None = None  # the block size a config that leaves it unset gets (None: DecodeConfig's)
    default_sub_block_size: int | None = None  # likewise for sub_block_size (None: no sub-blocks)
    supports_editing = False  # whether the family's models were trained for token editing (editing_threshold)
    blocks_from_prompt_end = False  # D2F: blocks start at the prompt's end, the prompt one bidirectional chunk
    turn_end_tokens: tuple[str, ...] = ()  # tokens that also end generation, where the tokenizer knows them

    def __init__(self, model: Decoder, mask_id: int, stop_ids: Iterable[int], banned_ids: Iterable[int]) -> None:
        self.model = model
        self.mask_id = mask_id
        self.stop_ids = tuple(stop_ids)
        self.max_positions = model.config.max_position_embeddings
        self.vocab_size = model.config.vocab_size
        self.device = model.embed.weight.device
        # Never sample the mask token (an untrained model predicts it, and "fill masks" would never end) or the
        # padding rows past the tokenizer's vocabulary.
        self.banned_ids = torch.tensor(sorted(set(banned_ids) | {mask_id}), dtype=torch.long, device=self.device)

    @staticmethod
    def decoder_config(config: Mapping[str, Any]) -> DecoderConfig:
        """The network for this family's ``config.json``: the Qwen3 layout (q/k norm; q/k/v bias if configured)."""
        return DecoderConfig.from_hf(config, qk_norm=True, qkv_bias=bool(config.get("attention_bias", False)),
                                     layout=QWEN_WEIGHT_NAMES)

    @classmethod
    def from_checkpoint(cls, model: Decoder, config: Mapping[str, Any], special: SpecialIds, tokenizer: Tokenizer,
                        banned_ids: Iterable[int]) -> SDARAdapter:
        """The adapter around a loaded network; ``special.mask_id`` is set (the loader checked it)."""
        assert special.mask_id is not None
        return cls(model, special.mask_id, cls.stop_ids_for(special, tokenizer), banned_ids)

    @classmethod
    def stop_ids_for(cls, special: SpecialIds, tokenizer: Tokenizer) -> tuple[int, ...]:
        """The checkpoint's eos ids, then the ids of the family's ``turn_end_tokens`` the tokenizer knows."""
        if not cls.turn_end_tokens:
            return special.eos_ids
        known = (tokenizer.token_to_id(t) for t in cls.turn_end_tokens)
        return tuple(dict.fromkeys([*special.eos_ids, *(i for i in known if i is not None)]))

    @staticmethod
    def checkpoint_dtype(config: Mapping[str, Any]) -> str | None:
        """The dtype the checkpoint was trained in, as ``--dtype auto`` reads it on an accelerator (None: unsaid)."""
        value = config.get("torch_dtype") or config.get("dtype")
        return str(value) if value else None

    @property
    def traits(self) -> FamilyTraits:
        """What the per-row algorithm needs of this family, as one frozen value."""
        return FamilyTraits(self.mask_id, self.stop_ids, self.shifted_logits, self.blocks_from_prompt_end)

    def new_cache(self, capacity: int) -> KVCache:
        return self.model.new_cache(capacity)

    def new_batch_cache(self, num_slots: int, capacity: int) -> BatchKVCache:
        return self.model.new_batch_cache(num_slots, capacity)

    def draft_spec(self, ids: Sequence[int], cache_len: int, block_start: int, block_size: int, first_mask: int,
                   *, cache_ver: bool, draft_ver: bool, num_blocks: int = 1, cache_prefix: bool = False) -> ForwardSpec:
        """The draft forward: pending rows ``ids[cache_len : block_start]`` (committed here), then the block (or the
        ``num_blocks`` blocks in flight).

        ``cache_prefix`` (needs ``cache_ver`` and ``draft_ver``): the block's committed prefix (offsets before
        ``first_mask``) is pending too, from wherever the cache ends, and written by this forward; the rows from
        ``first_mask`` on get logits, and the prefix offsets get copies of the first of them (committed offsets,
        never read), so the result keeps one row per offset.
        """
        end = block_start + block_size * num_blocks
        if cache_prefix:
            assert cache_ver and draft_ver, "prefix caching needs the AR-consistent cache (cache_ver, draft_ver)"
            cached = max(0, cache_len - block_start)  # prefix offsets already in the cache
            assert cached <= first_mask, "the cache holds committed tokens only"
            mask = prefix_draft_mask(max(0, block_start - cache_len), cached, block_size, first_mask, self.device,
                                     num_blocks)
            store = block_start + first_mask - cache_len
            return ForwardSpec(ids[cache_len:end], range(cache_len, end), mask,
                               num_store=store, logits_from=store, pad_front=first_mask)
        pending = block_start - cache_len
        mask = draft_mask(pending, block_size, first_mask, cache_ver, draft_ver, self.device,
                          self._prompt_rows(cache_len, pending), num_blocks)
        positions = range(cache_len, end)
        return ForwardSpec(ids[cache_len:end], positions, mask, num_store=pending, logits_from=pending)

    def _prompt_rows(self, cache_len: int, pending: int) -> int:
        """How many of the pending rows form the prompt's bidirectional chunk: with ``blocks_from_prompt_end`` the
        rows written when the cache is empty are exactly the prompt; otherwise none."""
        return pending if self.blocks_from_prompt_end and cache_len == 0 else 0

    def verify_spec(self, filled: list[int], cache_len: int, block_start: int, span_start: int,
                    next_block: int = 0) -> ForwardSpec:
        """The 2L verify forward (module docstring); commits nothing. The cache holds everything before the block
        and, with prefix caching, possibly a committed prefix of it: those rows of ``filled`` are dropped."""
        cached = cache_len - block_start
        assert 0 <= cached <= span_start - block_start, "verify expects the cache to end between block and span"
        filled, block_start = filled[cached:], cache_len
        num_first = len(filled)
        offset = span_start - block_start
        end = block_start + num_first
        tokens = filled + [self.mask_id] * (num_first - offset + next_block)
        positions = [*range(block_start, end), *range(span_start, end + next_block)]
        mask = verify_mask(num_first, offset, self.device, next_block)
        return ForwardSpec(tokens, positions, mask, num_store=0, logits_from=num_first)

    def commit_spec(self, ids: Sequence[int], cache_len: int, end: int, block_size: int, *,
                    cache_ver: bool) -> ForwardSpec:
        """A forward of its own writing the K/V of ``ids[cache_len : end]``."""
        n = end - cache_len
        mask = commit_mask(n, block_size, cache_ver, self.device, self._prompt_rows(cache_len, n))
        return ForwardSpec(ids[cache_len:end], range(cache_len, end), mask,
                           num_store=n, logits_from=n)
