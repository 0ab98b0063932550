"""Prefix caching (``prefix_cache``, on by default): the K/V of a block's committed prefix enter the cache as it
grows, in the forward that computes them anyway, and later forwards carry only the rows after it. Same tokens and
forwards as without it, fewer rows, and the cache always equals one fresh causal forward over the tokens it holds."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from markers import cover
from single_row import run_draft, run_verify

import s2d2
from s2d2 import DecodeConfig
from s2d2.core.loop import decode_steps
from s2d2.core.requests import DraftRequest, KeepRows, RowState, Scored, VerifyRequest
from s2d2.engine.runner import request_spec, run_request
from s2d2.errors import ConfigError

CONFIGS = [
    dict(method="ar"),
    dict(method="static", block_size=8, steps=4),
    dict(method="dynamic", block_size=8, threshold=0.3),
    dict(method="s2d2", block_size=8, policy="mask_span_length", min_span=1),  # verifies every step
    dict(method="s2d2", block_size=16, threshold=0.3),  # configuration A
    dict(method="s2d2", block_size=8, threshold=0.2, skip_confident=True, commit_confident=True),
    dict(method="s2d2", block_size=8, sub_block_size=4, policy="mask_span_length", min_span=1),
    dict(method="s2d2", block_size=8, fuse_draft=False, policy="mask_span_length", min_span=1),
    dict(method="s2d2", block_size=8, temperature=0.9, seed=3),  # sampled: the same draws
    dict(method="dynamic", block_size=8, temperature=0.9, seed=3, threshold=0.2),
    # pipelined blocks (D2F's schedule): the front block's prefix, spans that cross blocks
    dict(method="s2d2", block_size=4, block_add_threshold=0.25, policy="mask_span_length", min_span=1, threshold=0.2),
    dict(method="dynamic", block_size=4, block_add_threshold=0.5, threshold=0.3),
]
FAMILIES = ["fast_dllm_v2", "llada2", "d2f_llada", "d2f_dream"]
# (a shifted-logit family's forward that writes a finished block may count as the prompt's prefill without prefix
# caching and as a block commit with it, when the draft already cached the prompt's part of the block: their sum)
COUNTERS = ("num_tokens", "nfe", "draft_forwards", "verify_forwards", "fused_drafts", "steps", "proposed_tokens",
            "accepted_tokens", "corrected_tokens", "fallback_tokens")


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(256) for _ in range(n)] for n in (1, 5, 10, 19)]


def _ids(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


@pytest.mark.parametrize("cfg", cover(CONFIGS, [_ids(c) for c in CONFIGS], lambda c: c["method"]))
def test_prefix_caching_changes_no_token_and_no_forward_and_carries_fewer_rows(random_models, family_model, cfg):
    for m in [*random_models[:2], *(family_model(f) for f in FAMILIES)]:
        if "block_add_threshold" in cfg and m.adapter.default_sub_block_size is not None:
            continue  # Fast-dLLM v2 decodes in sub-blocks, which pipelining does not combine with
        runs = {}
        for on in (False, True):
            config = DecodeConfig(**cfg, max_new_tokens=40, stop_token_ids=(), generation_config="none", prefix_cache=on)
            runs[on] = m.generate(_prompts(), config, batch_size=1)
        for off, on in zip(runs[False], runs[True]):
            assert on.token_ids == off.token_ids
            assert [getattr(on.stats, k) for k in COUNTERS] == [getattr(off.stats, k) for k in COUNTERS]
            assert on.stats.query_rows <= off.stats.query_rows
        rows = [sum(o.stats.query_rows for o in runs[on]) for on in (False, True)]
        if cfg["method"] == "ar":
            assert rows[1] == rows[0]  # a block of one token has no prefix
        else:
            assert rows[1] < rows[0]


def _fresh_kv(model: s2d2.Model, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The K/V of one causal forward over ``tokens`` from an empty cache."""
    n = len(tokens)
    cache = model.adapter.new_cache(n)
    model.adapter.model(tokens, torch.arange(n), cache, torch.ones(n, n, dtype=torch.bool).tril(), num_store=n)
    return [k[:, :n] for k in cache.keys], [v[:, :n] for v in cache.values]


# every family with every setting, except pipelined blocks on Fast-dLLM v2, which decodes in sub-blocks (refused)
PURITY_CASES = [(family, cfg) for family in ("sdar", *FAMILIES) for cfg in CONFIGS[1:7] + CONFIGS[-2:]
                if not (family == "fast_dllm_v2" and "block_add_threshold" in cfg)]


@pytest.mark.parametrize(("family", "cfg"), cover(PURITY_CASES, [f"{f}-{_ids(c)}" for f, c in PURITY_CASES],
                                                  lambda case: case[0], lambda case: _ids(case[1])))
def test_the_cache_always_holds_committed_tokens_with_their_causal_kv(model, family_model, family, cfg):
    """After every forward: the cache holds only committed tokens, their K/V equal one fresh causal forward over
    them (cache purity, cached == uncached), and a draft or verification carried only the rows after it."""
    model = model if family == "sdar" else family_model(family)
    config = DecodeConfig(**cfg, max_new_tokens=30, stop_token_ids=(), generation_config="none")
    adapter = model.adapter
    mid_block = 0
    for ids in _prompts():
        state, cache = RowState(), adapter.new_cache(128)
        steps = decode_steps(ids, config, cache, dataclasses.replace(adapter.traits, stop_ids=()), state=state)
        logits = None
        while True:
            try:
                request = steps.send(None if logits is None else Scored.of(logits))
            except StopIteration:
                break
            before = cache.length
            if isinstance(request, KeepRows):  # not a forward: the rows a verification computed are kept
                assert request.count > 0
                cache.commit(request.count)
                logits = None
                continue
            spec = request_spec(adapter, request, before)
            if isinstance(request, DraftRequest):
                assert spec.num_rows == request.block_start + request.block_size * request.num_blocks - before
            if isinstance(request, VerifyRequest):  # 2L rows (aligned), or one causal row per token (shifted)
                end = request.block_start + len(request.filled)
                first_half = end - before
                assert spec.num_rows == first_half + request.next_block + (
                    0 if adapter.shifted_logits else end - request.span_start)
            logits = run_request(adapter, request, cache, spec)
            seq = state.seq
            committed = torch.tensor(seq.tokens[:cache.length])
            assert not (committed == adapter.mask_id).any()
            if cache.length:
                keys, values = _fresh_kv(model, committed)
                for a, b in zip(keys + values, cache.keys + cache.values):
                    assert torch.allclose(a, b[:, :cache.length], atol=1e-5)
            mid_block += cache.length > len(ids) and (cache.length - seq.first_block_start) % config.block_size != 0
    assert mid_block > 0  # the cache did end inside blocks: prefixes were cached


def test_verify_rows_are_the_same_when_the_cache_holds_part_of_the_block(model):
    """The 2L verification of a span after a cached prefix equals the one that recomputes the prefix."""
    adapter = model.adapter
    prefix = [random.Random(5).randrange(256) for _ in range(8)]
    filled = [40, 41, 42, 43, 44, 45, 46, 47]  # block at 8: committed 40-42, drafts 43-47
    ids = torch.tensor(prefix + filled[:3] + [adapter.mask_id] * 5)
    whole, part = adapter.new_cache(32), adapter.new_cache(32)
    run_draft(adapter, ids, whole, 8, 8, 0, cache_ver=True, draft_ver=True)
    run_draft(adapter, ids, part, 8, 8, 3, cache_ver=True, draft_ver=True, cache_prefix=True)
    assert (whole.length, part.length) == (8, 11)
    for next_block in (0, 8):
        want = run_verify(adapter, filled, whole, 8, 11, next_block)
        got = run_verify(adapter, filled, part, 8, 11, next_block)
        assert got.shape == want.shape == (5 + next_block, adapter.vocab_size)
        assert torch.allclose(got, want, atol=1e-5)


def test_prefix_cache_must_be_a_boolean():
    with pytest.raises(ConfigError, match="prefix_cache must be true or false"):
        DecodeConfig(prefix_cache="yes")
