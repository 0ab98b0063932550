"""Decoding state: the working sequence, the current block, a span, a draft.

Per-step bookkeeping (which positions are masked, the span, the commit choices) runs on small host-side tuples:
for blocks of 1-32 tokens, Python on a tuple costs a fraction of a microsecond where every tiny tensor op costs
several, and on a GPU it avoids a device sync per element (the reference's ``.item()`` loops, its §7.13). The
sequence's tokens live on the host only: each forward's spec takes its rows from them, and the engine copies a
whole step's rows to the device at once (:func:`s2d2.models.batching.pack`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

import torch

from s2d2.core.sampling import Choices, describe


@dataclass(frozen=True)
class Span:
    """The left-most maximal run of masked offsets ``[start, end)`` of the decodable part of a block."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def offsets(self) -> list[int]:
        return list(range(self.start, self.end))


@dataclass(frozen=True)
class Draft:
    """One diffusion-mode forward's proposal for every offset of the block: the token drawn at each offset
    (meaningful at masked offsets) with its probability and its distribution's features, on the host."""

    choices: Choices
    probs: torch.Tensor | None = None  # [B, V] float32: what sampled drafts were drawn from (acceptance's p)
    redraft: bool = False  # made of a rejecting verification's rows (DecodeConfig.redraft): always verified

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.choices.tokens

    @property
    def confidence(self) -> tuple[float, ...]:
        return self.choices.confidence

    @classmethod
    def from_probs(cls, probs: torch.Tensor, tokens: Iterable[int], confidence: Iterable[float] | None = None) -> Draft:
        """A draft of ``tokens`` drawn from ``probs`` (``confidence``: their probabilities, when not those of
        ``probs``, as hand-built tests give them)."""
        index = torch.tensor(list(tokens), device=probs.device)
        given = None if confidence is None else torch.tensor(list(confidence), device=probs.device)
        return cls(describe(probs, index, given), probs)


@dataclass(frozen=True)
class BlockState:
    """The current block: ``size`` positions from absolute ``start``; only offsets ``< end`` are decoded.

    ``end`` is below ``size`` when the block holds the last position allowed by ``max_new_tokens`` or a
    committed stop token: the masks after it stay masks (the model reads them as such) and are never committed.
    """

    start: int
    size: int
    tokens: tuple[int, ...]  # [size] committed ids, or the mask id
    masked: tuple[bool, ...]  # [size]
    end: int
    num_prompt: int  # leading offsets that hold prompt tokens (first block only)

    def masked_offsets(self) -> list[int]:
        """Offsets that still need a token."""
        return [i for i in range(self.end) if self.masked[i]]

    @property
    def num_masked(self) -> int:
        return sum(self.masked[: self.end])

    @property
    def first_mask(self) -> int:
        """First masked offset, or ``size`` if none (the rows before it are committed)."""
        return next((i for i in range(self.size) if self.masked[i]), self.size)

    @property
    def progress(self) -> float:
        """Share of the block committed by decoding so far (prompt tokens excluded), in [0, 1]."""
        return (self.size - self.num_prompt - sum(self.masked)) / self.size

    def span(self) -> Span | None:
        """The left-most maximal run of masks before ``end``, or None when the block is finished."""
        start = next((i for i in range(self.end) if self.masked[i]), None)
        if start is None:
            return None
        end = next((i for i in range(start, self.end) if not self.masked[i]), self.end)
        return Span(start, end)

    def unit(self, sub_block_size: int | None) -> BlockState:
        """The decoding unit: the block itself, or (with ``sub_block_size``) a view of it ending with the sub-block
        that holds its first mask, so that its span, masks and commits stay inside that sub-block (Fast-dLLM v2's
        sub-blocks; drafts still see the whole block)."""
        if sub_block_size is None or sub_block_size >= self.size:
            return self
        first = self.first_mask
        if first >= self.end:
            return self
        return replace(self, end=min(self.end, (first // sub_block_size + 1) * sub_block_size))

    def with_tokens(self, commits: Mapping[int, int]) -> BlockState:
        """A copy where each ``offset: token`` of ``commits`` is committed."""
        tokens, masked = list(self.tokens), list(self.masked)
        for offset, token in commits.items():
            tokens[offset], masked[offset] = token, False
        # (the constructor, not dataclasses.replace: this runs for every row at every step)
        return BlockState(self.start, self.size, tuple(tokens), tuple(masked), self.end, self.num_prompt)


def sequence_length(prompt_len: int, block_size: int, max_new_tokens: int, blocks_from_prompt_end: bool = False) -> int:
    """Positions a prompt and its ``max_new_tokens`` occupy, rounded up to whole blocks (see :class:`Sequence`)."""
    origin = prompt_len if blocks_from_prompt_end else 0
    return origin + -(-(prompt_len + max_new_tokens - origin) // block_size) * block_size


class Sequence:
    """The prompt followed by masks, decoded block by block; blocks sit at absolute multiples of ``block_size``, or
    with ``blocks_from_prompt_end`` (D2F) at the prompt's end plus multiples of it.

    With absolute blocks the prompt's tail (``len(prompt) % block_size`` tokens) opens the first decoded block as
    committed tokens. Decoding stops at ``limit``: ``len(prompt) + max_new_tokens``, lowered to the position of the
    first committed stop token.
    """

    def __init__(self, prompt_ids: list[int], block_size: int, max_new_tokens: int, mask_id: int,
                 stop_ids: Iterable[int], blocks_from_prompt_end: bool = False) -> None:
        self.prompt_len = len(prompt_ids)
        self.block_size = block_size
        self.limit = self.prompt_len + max_new_tokens
        self.origin = self.prompt_len if blocks_from_prompt_end else 0
        self.total_len = sequence_length(self.prompt_len, block_size, max_new_tokens, blocks_from_prompt_end)
        self.mask_id = mask_id
        self.stop_ids = frozenset(stop_ids)
        self.stopped = False
        # On the host only: the algorithm reads them without waiting for a device, and a forward's spec copies the
        # rows it needs (the executor moves a whole step's rows to the device in one copy).
        self.tokens = list(prompt_ids) + [mask_id] * (self.total_len - self.prompt_len)

    @property
    def first_block_start(self) -> int:
        """Where the first decoded block starts (it holds the prompt's tail with absolute blocks)."""
        return self.origin + (self.prompt_len - self.origin) // self.block_size * self.block_size

    def blocks(self) -> Iterator[BlockState]:
        """Open each block in turn until ``limit``; the caller finishes one before asking for the next."""
        for start in range(self.first_block_start, self.total_len, self.block_size):
            if start >= self.limit:
                return
            yield self.view(start)

    def view(self, start: int, num_blocks: int = 1) -> BlockState:
        """The ``num_blocks`` blocks from ``start`` as one :class:`BlockState` (pipelined decoding keeps its blocks in
        flight as one such region), with the tokens committed so far."""
        size = num_blocks * self.block_size
        num_prompt = max(0, self.prompt_len - start)
        tokens = tuple(self.tokens[start:start + size])
        masked = tuple(i >= num_prompt and t == self.mask_id for i, t in enumerate(tokens))
        return BlockState(start, size, tokens, masked, max(0, min(size, self.limit - start)), num_prompt)

    def commit(self, block: BlockState, commits: Mapping[int, int]) -> BlockState:
        """Commit tokens into ``block`` and the sequence; a committed stop token ends the decodable part there."""
        block = block.with_tokens(commits)
        self.tokens[block.start:block.start + block.size] = block.tokens
        stops = [i for i, t in commits.items() if t in self.stop_ids and i < block.end]
        if stops:
            self.stop_at(block.start + min(stops))
            block = replace(block, end=min(stops))
        return block

    def stop_at(self, position: int) -> None:
        """End decoding at absolute ``position`` (a stop token there, or a stop string found in the text)."""
        self.stopped = True
        self.limit = min(self.limit, position)

    def generated(self) -> list[int]:
        """The generated ids committed so far, in order up to the first mask (or ``limit``)."""
        ids = self.tokens[self.prompt_len:self.limit]
        return ids[:ids.index(self.mask_id)] if self.mask_id in ids else ids

    def output(self) -> tuple[list[int], str]:
        """Generated ids (stop token excluded) and the finish reason, ``"stop"`` or ``"length"``."""
        return self.tokens[self.prompt_len:self.limit], "stop" if self.stopped else "length"
