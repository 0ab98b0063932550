"""Single-row forwards for tests: the family's spec for one kind of forward, run by the same executor the engine
uses (:func:`s2d2.engine.runner.run`) against a single-row cache."""

from __future__ import annotations

import torch

from s2d2.engine.runner import run
from s2d2.families.base import FamilyAdapter
from s2d2.models.cache import KVCache


def _host(ids: torch.Tensor | list[int]) -> list[int]:
    """A sequence's ids as the specs take them (host ints)."""
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


def run_draft(adapter: FamilyAdapter, ids: torch.Tensor | list[int], cache: KVCache, block_start: int, block_size: int,
          first_mask: int, **kw: object) -> torch.Tensor:
    """A draft forward (``FamilyAdapter.draft_spec``); returns its logits."""
    return run(adapter, adapter.draft_spec(_host(ids), cache.length, block_start, block_size, first_mask, **kw), cache)


def run_verify(adapter: FamilyAdapter, filled: list[int], cache: KVCache, block_start: int, span_start: int,
           next_block: int = 0) -> torch.Tensor:
    """A verify forward (``FamilyAdapter.verify_spec``); returns its logits."""
    return run(adapter, adapter.verify_spec(filled, cache.length, block_start, span_start, next_block), cache)


def run_commit(adapter: FamilyAdapter, ids: torch.Tensor | list[int], cache: KVCache, end: int, block_size: int, *,
           cache_ver: bool) -> None:
    """A forward of its own writing ``ids[cache.length : end]`` to the cache (``FamilyAdapter.commit_spec``)."""
    run(adapter, adapter.commit_spec(_host(ids), cache.length, end, block_size, cache_ver=cache_ver), cache)
