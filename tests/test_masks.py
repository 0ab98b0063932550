"""The SDAR attention masks, written out by hand, and ``draft_ver`` pinned by them and end to end.

Rows are query rows, columns key rows (1 = may attend), over the forward's own rows only (every row also sees the
whole committed cache). Pending rows are committed tokens not yet cached; block rows are the block being drafted.
"""

from __future__ import annotations

import random

import pytest
import torch
from single_row import run_commit, run_draft

from s2d2 import DecodeConfig
from s2d2.families.sdar import draft_mask, verify_mask

CPU = torch.device("cpu")


def literal(rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row.split()] for row in rows.strip().splitlines()])


def by_rule(num_pending: int, block_size: int, first_mask: int, cache_ver: bool, draft_ver: bool) -> torch.Tensor:
    """The draft mask from its definition, one cell at a time (pinned to the literals below)."""
    n = num_pending + block_size
    m = torch.zeros(n, n, dtype=torch.bool)
    for r in range(n):
        for c in range(n):
            if r < num_pending:  # pending rows: causal (cache_ver), else block-causal as SDAR was trained
                m[r, c] = c <= r if cache_ver else c // block_size <= r // block_size
            elif c < num_pending:  # block rows see every pending row
                m[r, c] = True
            elif draft_ver and r - num_pending < first_mask:  # the block's committed prefix attends causally
                m[r, c] = c <= r
            else:  # the rest of the block is bidirectional
                m[r, c] = True
    return m


DRAFT_CASES = {
    # 2 pending rows, then a block of 4 whose first 2 offsets are committed; draft_ver on
    (2, 4, 2, True, True): """
        1 0 0 0 0 0
        1 1 0 0 0 0
        1 1 1 0 0 0
        1 1 1 1 0 0
        1 1 1 1 1 1
        1 1 1 1 1 1""",
    # the same without draft_ver: the whole block is bidirectional
    (2, 4, 2, True, False): """
        1 0 0 0 0 0
        1 1 0 0 0 0
        1 1 1 1 1 1
        1 1 1 1 1 1
        1 1 1 1 1 1
        1 1 1 1 1 1""",
    # 8 pending rows (two blocks of 4) written block-causally (no cache_ver), then a fully masked block
    (8, 4, 0, False, True): """
        1 1 1 1 0 0 0 0 0 0 0 0
        1 1 1 1 0 0 0 0 0 0 0 0
        1 1 1 1 0 0 0 0 0 0 0 0
        1 1 1 1 0 0 0 0 0 0 0 0
        1 1 1 1 1 1 1 1 0 0 0 0
        1 1 1 1 1 1 1 1 0 0 0 0
        1 1 1 1 1 1 1 1 0 0 0 0
        1 1 1 1 1 1 1 1 0 0 0 0
        1 1 1 1 1 1 1 1 1 1 1 1
        1 1 1 1 1 1 1 1 1 1 1 1
        1 1 1 1 1 1 1 1 1 1 1 1
        1 1 1 1 1 1 1 1 1 1 1 1""",
    # no pending rows; 3 committed offsets of a block of 4, draft_ver on
    (0, 4, 3, True, True): """
        1 0 0 0
        1 1 0 0
        1 1 1 0
        1 1 1 1""",
}


@pytest.mark.parametrize("case", list(DRAFT_CASES), ids=str)
def test_draft_mask_by_hand(case):
    want = literal(DRAFT_CASES[case])
    assert torch.equal(draft_mask(*case, CPU), want)
    assert torch.equal(by_rule(*case), want)


def test_verify_mask_by_hand():
    # block rows 0..3 (offset 0 committed, drafts at 1..3), then one mask row per span position 1, 2, 3
    assert torch.equal(verify_mask(4, 1, CPU), literal("""
        1 0 0 0 0 0 0
        1 1 0 0 0 0 0
        1 1 1 0 0 0 0
        1 1 1 1 0 0 0
        1 0 0 0 1 0 0
        1 1 0 0 0 1 0
        1 1 1 0 0 0 1"""))
    # the same with 2 rows drafting the next block: they see the whole first half and each other
    assert torch.equal(verify_mask(4, 1, CPU, 2), literal("""
        1 0 0 0 0 0 0 0 0
        1 1 0 0 0 0 0 0 0
        1 1 1 0 0 0 0 0 0
        1 1 1 1 0 0 0 0 0
        1 0 0 0 1 0 0 0 0
        1 1 0 0 0 1 0 0 0
        1 1 1 0 0 0 1 0 0
        1 1 1 1 0 0 0 1 1
        1 1 1 1 0 0 0 1 1"""))


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(length)]


def test_draft_ver_changes_a_draft_exactly_when_the_block_has_a_committed_prefix(model):
    adapter = model.adapter
    prefix = _prompt(8, seed=31)
    for first_mask in (0, 1, 3):
        block = [65, 66, 67][:first_mask] + [adapter.mask_id] * (4 - first_mask)
        ids = torch.tensor(prefix + block)
        with_ver, without = (run_draft(adapter, ids, adapter.new_cache(32), 8, 4, first_mask, cache_ver=True,
                                           draft_ver=flag) for flag in (True, False))
        masked = slice(first_mask, 4)
        if first_mask == 0:
            assert torch.equal(with_ver, without)
        else:
            finite = with_ver[masked].isfinite()  # banned ids (mask, vocabulary padding) are -inf in both
            assert (with_ver[masked][finite] - without[masked][finite]).abs().max() > 1e-3


def test_draft_ver_changes_what_dynamic_and_s2d2_decode(random_models):
    """End to end: with the flag ignored these outputs would all be equal."""
    differ = {"dynamic": 0, "s2d2": 0}
    for m in random_models:
        for seed in range(3):
            if min(differ.values()) > 0:
                break
            ids = _prompt(7, seed)
            for method in differ:
                cfg = DecodeConfig(method=method, block_size=8, threshold=0.6, max_new_tokens=32, stop_token_ids=())
                on = m.generate(ids, cfg)[0].token_ids
                off = m.generate(ids, cfg.replace(draft_ver=False))[0].token_ids
                differ[method] += on != off
    assert differ["dynamic"] > 0 and differ["s2d2"] > 0, differ


@pytest.mark.parametrize("cache_ver,draft_ver,first_mask", [(True, True, 2), (True, False, 0), (False, False, 1)])
def test_cached_draft_equals_uncached_forward(model, cache_ver, draft_ver, first_mask):
    """Invariant 6: a draft against the cache == the same rows of one uncached forward over everything, whose
    mask is built by rule here (not by the code under test)."""
    adapter = model.adapter
    b = 4
    prefix = _prompt(12, seed=8)
    block = [70, 71, adapter.mask_id, adapter.mask_id][:first_mask] + [adapter.mask_id] * (b - first_mask)
    ids = torch.tensor(prefix + block)
    cache = adapter.new_cache(64)
    run_commit(adapter, ids, cache, 8, b, cache_ver=cache_ver)  # blocks 0-1 cached ...
    cached = run_draft(adapter, ids, cache, 12, b, first_mask, cache_ver=cache_ver, draft_ver=draft_ver)  # ... block 2 pending
    assert cache.length == 12
    n = len(prefix) + b
    full = by_rule(12, b, first_mask, cache_ver, draft_ver)
    uncached = adapter.model(torch.tensor(prefix + block), torch.arange(n), adapter.new_cache(n), full)[12:]
    uncached = uncached.index_fill_(-1, adapter.banned_ids, float("-inf"))
    assert torch.allclose(cached, uncached, atol=1e-5)


def test_small_masks_are_cached_and_a_long_prompts_are_not():
    """Decoding's small masks are built once; a long prefill's mask (prompt length squared) is not kept, so a
    long-context server does not hold one per prompt length."""
    cpu = torch.device("cpu")
    small = draft_mask(8, 4, 0, True, True, cpu)
    assert draft_mask(8, 4, 0, True, True, cpu) is small
    big = draft_mask(1000, 4, 0, True, True, cpu)
    assert big.shape == (1004, 1004) and draft_mask(1000, 4, 0, True, True, cpu) is not big
    assert torch.equal(draft_mask(1000, 4, 0, True, True, cpu), big)
    assert all(m.numel() <= draft_mask.max_elements for m in draft_mask.masks.values())
