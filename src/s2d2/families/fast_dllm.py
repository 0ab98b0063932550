"""Fast-dLLM v2 family: Qwen2.5-architecture block-diffusion models with right-shifted logits (row t-1 predicts
token t), blocks of ``bd_size`` (32) at absolute multiples, and an autoregressive token at the start of each block.

Forwards (reference §4.1; ``cache_len`` is always the block's start here, except for the first block's draft,
which writes the prompt's block-aligned prefix):

- draft: the block's rows (after any pending prompt rows), block-causal (the SDAR draft mask: pending rows causal
  with ``cache_ver``, the block bidirectional, its committed prefix causal with ``draft_ver``). Offset i is read from
  row i-1. Offset 0 is always committed when drafting (a prompt token, or the block's AR token), so when its row
  before lies in the cache the draft carries a placeholder copy there that the loop never reads.
- verify: AR mode is a plain causal forward; no 2L construction. The block's rows up to the span's end, drafts
  filled in, causal; span offset i is read from row i-1, and one more row (the span's last) predicts the position
  after the span. When the span ends the block and every draft is accepted, that row is the next block's AR token
  and the rows' causal K/V are what a causal (``cache_ver``) cache holds for the block: the loop commits them, and
  the next block opens without a forward of its own.
- finalize: the finished block's rows (or the prompt), written to the cache, causal with ``cache_ver``; its last
  row predicts the next block's first token (the "free" AR token of the reference, which is greedy there even when
  sampling; here it is drawn with the decoding temperature, so sampled decoding stays a sample of the model).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tokenizers import Tokenizer

from s2d2.checkpoint import SpecialIds
from s2d2.errors import ModelLoadError
from s2d2.families.sdar import QWEN_WEIGHT_NAMES, SDARAdapter, draft_mask, prefix_draft_mask
from s2d2.models.batching import ForwardSpec, MaskCache
from s2d2.models.decoder import Decoder, DecoderConfig


@MaskCache
def _verify_mask(num_causal: int, num_next: int, device: torch.device) -> torch.Tensor:
    """``num_causal`` causal rows, then ``num_next`` rows that see all of them and each other."""
    n = num_causal + num_next
    idx = torch.arange(n, device=device)
    mask = idx[:, None] >= idx[None, :]
    mask[num_causal:, :] = True
    return mask


class FastDLLMAdapter(SDARAdapter):
    """Draft / verify / finalize forwards for Fast-dLLM v2 checkpoints (shifted logits)."""

    family = "fast_dllm_v2"
    model_types = ("Fast_dLLM_Qwen",)  # Qwen2.5 architecture, shifted logits
    shifted_logits = True

    def __init__(self, model: Decoder, mask_id: int, stop_ids: Iterable[int], banned_ids: Iterable[int],
                 bd_size: int) -> None:
        super().__init__(model, mask_id, stop_ids, banned_ids)
        self.default_block_size = bd_size
        self.default_sub_block_size = min(8, bd_size)  # the reference's small_block_size

    @staticmethod
    def decoder_config(config: Mapping[str, Any]) -> DecoderConfig:
        """The Qwen2 layout: q/k/v bias, no q/k norm."""
        return DecoderConfig.from_hf(config, qk_norm=False, qkv_bias=True, layout=QWEN_WEIGHT_NAMES)

    @classmethod
    def from_checkpoint(cls, model: Decoder, config: Mapping[str, Any], special: SpecialIds, tokenizer: Tokenizer,
                        banned_ids: Iterable[int]) -> FastDLLMAdapter:
        """The adapter around a loaded network, with the checkpoint's block size (``bd_size``, default 32)."""
        assert special.mask_id is not None
        bd_size = config.get("bd_size", 32)
        if not isinstance(bd_size, int) or isinstance(bd_size, bool) or bd_size < 1:
            raise ModelLoadError(f"config.json field bd_size must be a positive integer, got {bd_size!r}.")
        return cls(model, special.mask_id, cls.stop_ids_for(special, tokenizer), banned_ids, bd_size=bd_size)

    def draft_spec(self, ids: Sequence[int], cache_len: int, block_start: int, block_size: int, first_mask: int,
                   *, cache_ver: bool, draft_ver: bool, num_blocks: int = 1, cache_prefix: bool = False) -> ForwardSpec:
        """Pending rows ``ids[cache_len : block_start]`` (written to the cache), then the block (or the ``num_blocks``
        blocks in flight); logits shifted.

        ``cache_prefix``: the block's committed prefix is written too, except its last token, whose row predicts the
        first mask (so it stays a query row, and the cache never reaches it); the rows from there on get logits, and
        the prefix offsets copies of the first of them (never read).
        """
        size = block_size * num_blocks
        end = block_start + size
        if cache_prefix:
            assert cache_ver and draft_ver, "prefix caching needs the AR-consistent cache"
            last = block_start + first_mask - 1  # the row that predicts the first mask
            assert cache_len <= last, "the row before the first mask must be a query row"
            mask = prefix_draft_mask(max(0, block_start - cache_len), max(0, cache_len - block_start), block_size,
                                     first_mask, self.device, num_blocks)
            # the row before the first mask stays out of the cache (a later forward reads it again), except the
            # previous block's last row when offset 0 is masked (pipelined blocks: offset 0 is committed from it now)
            store = max(last, block_start) - cache_len
            return ForwardSpec(ids[cache_len:end], range(cache_len, end), mask,
                               num_store=store, logits_from=last - cache_len, logits_to=end - 1 - cache_len,
                               pad_front=first_mask)
        pending = block_start - cache_len
        mask = draft_mask(pending, block_size, first_mask, cache_ver, draft_ver, self.device,
                          self._prompt_rows(cache_len, pending), num_blocks)
        positions = range(cache_len, end)
        if pending:  # the last pending row predicts offset 0
            return ForwardSpec(ids[cache_len:end], positions, mask, num_store=pending, logits_from=pending - 1,
                               logits_to=pending + size - 1)
        assert first_mask > 0, "a shifted-logit draft needs offset 0 committed when its row before is cached"
        return ForwardSpec(ids[cache_len:end], positions, mask, num_store=0, logits_from=0,
                           logits_to=size - 1, pad_front=1)

    def verify_spec(self, filled: list[int], cache_len: int, block_start: int, span_start: int,
                    next_block: int = 0) -> ForwardSpec:
        """A causal forward over ``filled`` (the block up to the span's end, drafts in the span); logits for the span
        and for the position after it (``[n + 1, V]``), then for ``next_block`` mask rows that follow (the rest of the
        block), which see every row of ``filled`` and each other: the block's next draft with ``draft_ver`` if
        every draft is accepted. Commits nothing. With prefix caching the cache may hold ``filled``'s committed tokens
        up to, not including, the one before the span (its row predicts the span's first token)."""
        offset = span_start - block_start
        assert offset > 0, "offset 0 of a block is always committed in a shifted-logit family"
        cached = cache_len - block_start
        assert 0 <= cached <= offset - 1, "verify expects the cache to end between the block and the span"
        filled = filled[cached:]
        n = len(filled)
        tokens = filled + [self.mask_id] * next_block
        return ForwardSpec(tokens, range(cache_len, cache_len + n + next_block),
                           _verify_mask(n, next_block, self.device), num_store=0, logits_from=offset - 1 - cached)

    def finalize_spec(self, ids: Sequence[int], cache_len: int, end: int, block_size: int, *,
                      cache_ver: bool) -> ForwardSpec:
        """Write ``ids[cache_len : end]`` to the cache (as a commit forward) and return the last row's logits: the
        prediction for position ``end``."""
        spec = self.commit_spec(ids, cache_len, end, block_size, cache_ver=cache_ver)
        return ForwardSpec(spec.tokens, spec.positions, spec.mask, num_store=spec.num_store,
                           logits_from=spec.num_rows - 1)
