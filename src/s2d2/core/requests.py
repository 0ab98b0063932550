"""The contract between the per-row algorithm and whoever executes its forwards.

A row's decoding (:func:`s2d2.core.loop.decode_steps`) is a generator that *asks* for each forward by yielding one
of the request types below and is sent back that forward's logits as :class:`Scored` (the logit rows and, on the
host, their greedy choices, computed by the executor for a whole batch at once). The executor
(:mod:`s2d2.engine.runner` for one row, :class:`s2d2.engine.engine.Engine` for a batch) turns a request into the
family's rows and mask and runs it; the algorithm never sees a family or a model. What the algorithm needs of the
family travels as one frozen value, :class:`FamilyTraits`.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Generator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from s2d2.core.sampler import Item, Result
from s2d2.core.sampling import FEATURES, Choices, greedy_choices
from s2d2.core.state import Draft, Sequence
from s2d2.core.stats import DecodeStats
from s2d2.core.trace import Tracer


@dataclass(frozen=True)
class FamilyTraits:
    """What the per-row algorithm needs to know of a model family, and nothing else."""

    mask_id: int
    stop_ids: tuple[int, ...]
    # row t-1 predicts token t (Fast-dLLM v2, Dream): every block opens with its first token decoded in AR mode
    shifted_logits: bool = False
    # D2F: blocks start at the prompt's end instead of at absolute multiples of the block size
    blocks_from_prompt_end: bool = False


class CacheView(Protocol):
    """What a row's decoding reads of its cache: the committed length (a :class:`~s2d2.models.cache.KVCache`, or
    one slot of the engine's batch cache). The executor alone writes it: the forwards, and :class:`KeepRows`."""

    @property
    def length(self) -> int: ...


@dataclass(frozen=True)
class DraftRequest:
    """A row asks for a diffusion-mode forward over its block (first writing its pending committed tokens)."""

    ids: list[int]  # the row's whole sequence (Sequence.tokens itself: the executor builds its spec before the row
    # commits again)
    block_start: int
    block_size: int
    first_mask: int
    cache_ver: bool
    draft_ver: bool
    num_blocks: int = 1  # pipelined decoding: the blocks in flight, from block_start
    # also write the K/V of the block's committed prefix (offsets before first_mask): the rows after it only remain
    cache_prefix: bool = False


@dataclass(frozen=True)
class VerifyRequest:
    """A row asks for an AR-mode (2L) forward scoring its span, optionally drafting the next block."""

    filled: list[int]
    block_start: int
    span_start: int
    next_block: int


@dataclass(frozen=True)
class CommitRequest:
    """A row asks for a forward of its own that writes its pending K/V (only without ``fuse_commit``)."""

    ids: list[int]
    end: int
    block_size: int
    cache_ver: bool


@dataclass(frozen=True)
class FinalizeRequest:
    """Shifted-logit families: a row asks for the forward that writes a finished block's (or the prompt's) K/V and
    predicts the next block's first token from its last row."""

    ids: list[int]
    end: int
    block_size: int
    cache_ver: bool


@dataclass(frozen=True)
class KeepRows:
    """Not a forward: the row asks its executor to commit the first ``count`` K/V rows the last forward left in the
    scratch slots after the cache (a verification's accepted drafts, computed causally, are their final K/V)."""

    count: int


@dataclass(frozen=True)
class HostRead:
    """Not a forward: a sampled row asks for what it draws after its forward (:class:`~s2d2.core.sampler.Draw`,
    :class:`~s2d2.core.sampler.Accept`), made on the device by the step's sampler with every other row's and read
    to the host in the step's one transfer (issue 28). It is sent back the results, one per item, in order."""

    items: tuple[Item, ...]


@dataclass(frozen=True)
class Scored:
    """A forward's logit rows (``[n, V]``, on the model's device) and what the row reads of them, computed by the
    executor for a whole batch at once: for a greedy row, their greedy :class:`Choices` on the host (argmax, its
    probability and the distribution's features under the plain softmax; one transfer per step); for a sampled row,
    ``probs``, the distributions it draws from (its temperature, top-k and top-p applied, on the device), from
    which it draws with a :class:`HostRead`. (:meth:`of` for one greedy row's logits.)

    ``raw`` may lack ``pad`` placeholder rows in front (copies of its first row, for offsets nobody reads): they are
    made only if :attr:`logits` is read, so that a greedy row, which reads its choices, costs the device nothing of
    its own (``choices`` and ``probs`` hold every row)."""

    raw: torch.Tensor
    choices: Choices | None
    probs: torch.Tensor | None = None
    pad: int = 0

    @functools.cached_property
    def logits(self) -> torch.Tensor:
        """The logit rows, one per offset (``raw`` with its ``pad`` placeholder rows in front)."""
        return pad_rows(self.raw, self.pad)

    @classmethod
    def of(cls, logits: torch.Tensor, features: Collection[str] = FEATURES) -> Scored:
        """``logits`` with their greedy choices (and the routing ``features`` named)."""
        return cls(logits, greedy_choices(logits, features))

    def rows(self, start: int, stop: int | None = None) -> Scored:
        """Rows ``start .. stop - 1``."""
        return Scored(self.logits[start:stop], None if self.choices is None else self.choices.rows(start, stop),
                      None if self.probs is None else self.probs[start:stop])

    def pad_front(self, count: int) -> Scored:
        """``count`` copies of the first row before the rows (placeholders for offsets nobody reads)."""
        return Scored(self.raw, None if self.choices is None else self.choices.pad_front(count),
                      None if self.probs is None else pad_rows(self.probs, count), self.pad + count)


def pad_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` copies of the first of ``rows`` (``[n, V]``) before them."""
    return torch.cat([rows[:1].expand(count, -1), rows]) if count else rows


@dataclass(frozen=True)
class Carried:
    """The next draft, made from rows a verification computed (handed by the loop to the next draft, or, shifted
    logits, to the next block's AR token, so that it costs no forward): the draft of the block at ``block_start``
    from offset ``first_mask`` on, or with ``token`` a one-row draft whose token is the one at ``block_start``."""

    block_start: int
    first_mask: int
    draft: Draft
    token: bool = False
    redraft: bool = False  # the verifier's rows after a rejection (DecodeConfig.redraft), not a fused next draft


ForwardRequest = DraftRequest | VerifyRequest | CommitRequest | FinalizeRequest
RowRequest = ForwardRequest | KeepRows | HostRead
# A row's decoding as a generator: it yields the forward it needs next (or rows to keep, or draws to read), is sent
# that forward's Scored logits (None for a commit or KeepRows; the results, one per item, for a HostRead), and
# returns (generated ids, finish reason, stats) when done.
RowInput = Scored | list[Result] | None
RowSteps = Generator[RowRequest, RowInput, "tuple[list[int], str, DecodeStats]"]


@dataclass
class RowState:
    """What the driver of :func:`decode_steps` may read while the row runs: its stats (the driver adds forward
    time) and its sequence (committed tokens so far, for streaming)."""

    stats: DecodeStats = field(default_factory=DecodeStats)
    seq: Sequence | None = None
    trace: Tracer | None = None  # set by the driver to record a step trace (s2d2.core.trace); None: no tracing work
