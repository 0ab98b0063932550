"""The executor: turns a row's forward requests into the family's rows and masks and runs them.

:func:`run` executes one row's forward against its own cache, :func:`run_packed` the rows of many requests in one
forward; the family only lays the rows out (:class:`~s2d2.families.base.FamilyAdapter`), the model computes them.
:func:`decode` drives one row with the single-row forward (what the tests and the engine's batch-1 steps use); the
batched engine (:mod:`s2d2.engine.engine`) builds the same specs with :func:`request_spec` and packs them.
:class:`ForwardTimer` is the one clock both use.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable

import torch

from s2d2.config import DecodeConfig
from s2d2.core.loop import decode_steps
from s2d2.core.requests import (
    CommitRequest,
    DraftRequest,
    FinalizeRequest,
    ForwardRequest,
    HostRead,
    KeepRows,
    RowInput,
    RowState,
    RowSteps,
    Scored,
    VerifyRequest,
)
from s2d2.core.sampler import sample
from s2d2.core.sampling import Sampling, filtered_probs, greedy_choices
from s2d2.core.stats import DecodeStats
from s2d2.core.trace import Tracer
from s2d2.families.base import FamilyAdapter
from s2d2.models.batching import ForwardSpec, PackedBatch, pack
from s2d2.models.cache import BatchKVCache, KVCache, SlotCache
from s2d2.transfer import to_device


@torch.inference_mode()
def decode(adapter: FamilyAdapter, prompt_ids: list[int], cfg: DecodeConfig, cache: KVCache,
           generator: torch.Generator | None = None, stop_check: Callable[[list[int]], bool] | None = None,
           tracer: Tracer | None = None) -> tuple[list[int], str, DecodeStats]:
    """Decode one prompt with the single-row forward (:func:`run`); returns the generated ids (stop token excluded),
    ``"stop"``/``"length"`` and stats. ``stop_check`` as in :func:`decode_steps`; ``tracer`` records a trace."""
    state = RowState(trace=tracer)
    cache.reset()
    timer = ForwardTimer(adapter.device)

    def forward(request: ForwardRequest) -> torch.Tensor | None:
        spec = request_spec(adapter, request, cache.length)
        with timer:
            logits = run_request(adapter, request, cache, spec)
        state.stats.forward_time_s += timer.elapsed
        state.stats.query_rows += spec.num_rows
        if tracer is not None:
            tracer.forward_done(spec.num_rows, timer.elapsed)
        return logits

    return drive(decode_steps(prompt_ids, cfg, cache, adapter.traits, generator, stop_check, state), cache, forward,
                 Sampling.of(cfg))


def drive(steps: RowSteps, cache: KVCache | SlotCache, forward: Callable[[ForwardRequest], torch.Tensor | None],
          sampling: Sampling | None = None) -> tuple[list[int], str, DecodeStats]:
    """Run one row's decoding to its end: each forward it asks for through ``forward`` (which returns its logits,
    sent back :class:`Scored`: with their greedy choices, or a sampled row's distributions under its
    ``sampling``), each :class:`KeepRows` on ``cache``, each :class:`HostRead` at once (the step's sampler over
    one row); returns what the row returns (ids, finish reason, stats)."""
    sent: RowInput = None
    while True:
        try:
            request = steps.send(sent)
        except StopIteration as done:
            return done.value
        if isinstance(request, KeepRows):
            cache.commit(request.count)
            sent = None
        elif isinstance(request, HostRead):
            drawn, results = sample([request.items])
            sent = results(read_together(drawn))[0]
        else:
            logits = forward(request)
            if logits is None:
                sent = None
            elif sampling is None:
                sent = Scored(logits, greedy_choices(logits))
            else:
                sent = Scored(logits, None, filtered_probs(logits, [(sampling, len(logits))]))


def request_spec(adapter: FamilyAdapter, request: ForwardRequest, cache_len: int) -> ForwardSpec:
    """The rows and mask of a request against a cache holding ``cache_len`` committed tokens (the batched engine's
    form of every forward)."""
    if isinstance(request, DraftRequest):
        return adapter.draft_spec(request.ids, cache_len, request.block_start, request.block_size, request.first_mask,
                                  cache_ver=request.cache_ver, draft_ver=request.draft_ver, num_blocks=request.num_blocks,
                                  cache_prefix=request.cache_prefix)
    if isinstance(request, VerifyRequest):
        return adapter.verify_spec(request.filled, cache_len, request.block_start, request.span_start,
                                   request.next_block)
    if isinstance(request, FinalizeRequest):
        return adapter.finalize_spec(request.ids, cache_len, request.end, request.block_size,
                                     cache_ver=request.cache_ver)
    return adapter.commit_spec(request.ids, cache_len, request.end, request.block_size, cache_ver=request.cache_ver)


def run_request(adapter: FamilyAdapter, request: ForwardRequest, cache: KVCache,
                spec: ForwardSpec | None = None) -> torch.Tensor | None:
    """Execute one row's forward request (its ``spec``, if already built) with the single-row forward; returns its
    logits (None for a commit)."""
    logits = run(adapter, spec if spec is not None else request_spec(adapter, request, cache.length), cache)
    return None if isinstance(request, CommitRequest) else logits


def run(adapter: FamilyAdapter, spec: ForwardSpec, cache: KVCache | SlotCache) -> torch.Tensor:
    """One row's forward against its own cache (a single-row cache, or one slot of a batch cache): commits the
    spec's ``num_store`` rows and returns its logits ``[num_rows - logits_from, V]``, banned ids at -inf."""
    n = spec.num_rows
    if cache.length:  # every row sees the whole committed cache, then the spec's own mask
        mask = torch.ones(n, cache.length + n, dtype=torch.bool, device=adapter.device)
        mask[:, cache.length:] = spec.mask
    else:
        mask = spec.mask
    rows = array("q", spec.tokens)
    rows.extend(spec.positions)
    tokens, positions = to_device(rows, torch.long, adapter.device).split(n)  # one copy for both
    logits = adapter.model(tokens, positions, cache, mask, num_store=spec.num_store,
                           logits_from=spec.logits_from, logits_to=spec.logits_to)
    return spec.finish_logits(logits.index_fill_(-1, adapter.banned_ids, float("-inf")))


def run_batch(adapter: FamilyAdapter, specs: list[ForwardSpec], cache: BatchKVCache,
              slots: list[int]) -> list[torch.Tensor]:
    """One forward for several rows, row ``i`` in cache slot ``slots[i]``: commits each row's ``num_store`` rows and
    returns each row's logits (as :func:`run` would, up to float rounding)."""
    batch = pack(specs, slots, [cache.lengths[s] for s in slots], adapter.device)
    return run_packed(adapter, batch, specs, cache, slots)


def run_packed(adapter: FamilyAdapter, batch: PackedBatch, specs: list[ForwardSpec], cache: BatchKVCache,
               slots: list[int]) -> list[torch.Tensor]:
    """:func:`run_batch` once ``batch = pack(specs, slots, ...)`` is built (the engine times the two apart)."""
    parts = split_packed(batch, specs, forward_packed(adapter, batch, specs, cache, slots))
    return [spec.finish_logits(part) for spec, part in zip(specs, parts)]


def forward_packed(adapter: FamilyAdapter, batch: PackedBatch, specs: list[ForwardSpec], cache: BatchKVCache,
                   slots: list[int]) -> torch.Tensor:
    """The packed forward itself: commits each row's ``num_store`` rows and returns every row's logit rows in
    packed order (``batch.order``), banned ids at -inf."""
    logits = adapter.model.forward_packed(batch, cache).index_fill_(-1, adapter.banned_ids, float("-inf"))
    for spec, slot in zip(specs, slots):
        cache.slot(slot).commit(spec.num_store)
    return logits


def split_packed(batch: PackedBatch, specs: list[ForwardSpec], logits: torch.Tensor) -> list[torch.Tensor]:
    """Each row's logit rows (in ``specs`` order) out of the packed ones, as views of them (one operation for the
    batch), without the front padding each spec's :meth:`~s2d2.models.batching.ForwardSpec.finish_logits` adds."""
    out: list[torch.Tensor] = [logits] * len(specs)
    for k, part in zip(batch.order, logits.split(batch.logits_counts)):
        out[k] = part
    return out


def packed_bounds(batch: PackedBatch, specs: list[ForwardSpec]) -> list[tuple[int, int, int]]:
    """Each row's logit rows in the packed logits (in ``specs`` order): start, stop, and the front padding its
    :meth:`~s2d2.models.batching.ForwardSpec.finish_logits` adds."""
    bounds: list[tuple[int, int, int]] = [(0, 0, 0)] * len(specs)
    start = 0
    for k, count in zip(batch.order, batch.logits_counts):  # each row's packed rows, in packed order
        bounds[k], start = (start, start + count, specs[k].pad_front), start + count
    return bounds


def read_together(tables: list[torch.Tensor]) -> list[list[float]]:
    """Device tensors read to the host in ONE transfer (as float64, exact for token ids and float32 values),
    each flattened: how an engine step reads all its rows' numbers at once (issue 28)."""
    if not tables:
        return []
    values, out, start = torch.cat([t.flatten().double() for t in tables]).tolist(), [], 0
    for table in tables:
        out.append(values[start:start + table.numel()])
        start += table.numel()
    return out


class ForwardTimer:
    """Wall time of a forward (CUDA is synchronised around it, so the time is the device's, not the launch's)."""

    def __init__(self, device: torch.device) -> None:
        self._sync = device.type == "cuda"
        self.elapsed = 0.0

    def __enter__(self) -> ForwardTimer:
        if self._sync:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self.elapsed = time.perf_counter() - self._t0
