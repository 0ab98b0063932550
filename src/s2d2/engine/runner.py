"""The executor: turns a row's forward requests into the family's rows and masks and runs them.

:func:`decode` drives one row with the family's single-row forward (what ``Model.generate`` with one prompt and the
tests use); the batched engine (:mod:`s2d2.engine.engine`) builds the same specs with :func:`request_spec` and
packs them. :class:`ForwardTimer` is the one clock both use.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from s2d2.config import DecodeConfig
from s2d2.core.loop import decode_steps
from s2d2.core.requests import CommitRequest, DraftRequest, FinalizeRequest, ForwardRequest, RowState, VerifyRequest
from s2d2.core.stats import DecodeStats
from s2d2.core.trace import Tracer
from s2d2.families.base import FamilyAdapter
from s2d2.models.batching import ForwardSpec
from s2d2.models.cache import KVCache


@torch.inference_mode()
def decode(adapter: FamilyAdapter, prompt_ids: list[int], cfg: DecodeConfig, cache: KVCache,
           generator: torch.Generator | None = None, stop_check: Callable[[list[int]], bool] | None = None,
           tracer: Tracer | None = None) -> tuple[list[int], str, DecodeStats]:
    """Decode one prompt with the adapter's single-row forwards; returns the generated ids (stop token excluded),
    ``"stop"``/``"length"`` and stats. ``stop_check`` as in :func:`decode_steps`; ``tracer`` records a trace."""
    state = RowState(trace=tracer)
    steps = decode_steps(prompt_ids, cfg, cache, adapter.traits, generator, stop_check, state)
    timer = ForwardTimer(adapter.device)
    logits = None
    while True:
        try:
            request = steps.send(logits)
        except StopIteration as done:
            return done.value
        spec = request_spec(adapter, request, cache.length)
        with timer:
            logits = run_request(adapter, request, cache, spec)
        state.stats.forward_time_s += timer.elapsed
        state.stats.query_rows += spec.num_rows
        if tracer is not None:
            tracer.forward_done(spec.num_rows, timer.elapsed)


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
    """Execute one row's request (its ``spec``, if already built) with the adapter's single-row forward; returns
    its logits (None for a commit)."""
    logits = adapter.run(spec if spec is not None else request_spec(adapter, request, cache.length), cache)
    return None if isinstance(request, CommitRequest) else logits


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
