"""Invariant 3: sampled S2D2 that verifies every step samples from the AR distribution.

Three generated tokens from a tiny random model, restricted by top-k = 3 (applied identically to drafter and
verifier, so the target is the top-3-renormalised AR chain): 27 possible sequences whose exact probabilities we
compute by enumeration from explicit causal forwards. A chi-square test with a fixed seed must accept S2D2's
samples, and the same test must reject the dynamic baseline's (parallel commits without verification), which
shows the test has the power to fail.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

import s2d2
from s2d2 import DecodeConfig
from s2d2.core.sampling import token_probs

pytestmark = pytest.mark.slow  # statistical: thousands of sampled decodes

PROMPT = [72, 101, 108, 108, 111]  # 5 tokens: the block at position 4 holds one prompt token and three masks
NUM_NEW, TOP_K, TEMPERATURE, N = 3, 3, 1.0, 1500


@torch.inference_mode()
def exact_ar_distribution(model: s2d2.Model) -> dict[tuple[int, ...], float]:
    """P(x1 x2 x3 | prompt) under the top-k AR chain, from explicit causal forwards with a mask query."""
    adapter = model.adapter

    def conditional(prefix: list[int]) -> torch.Tensor:
        tokens = prefix + [adapter.mask_id]
        n = len(tokens)
        cache = adapter.new_cache(n)
        logits = adapter.model(torch.tensor(tokens), torch.arange(n), cache, torch.ones(n, n, dtype=torch.bool).tril())
        logits = logits[-1:].index_fill_(-1, adapter.banned_ids, float("-inf"))
        return token_probs(logits, TEMPERATURE, TOP_K, 1.0)[0]

    dist: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(NUM_NEW):
        nxt = {}
        for seq, p in dist.items():
            q = conditional(PROMPT + list(seq))
            for tok in torch.nonzero(q).flatten().tolist():
                nxt[seq + (tok,)] = p * float(q[tok])
        dist = nxt
    assert len(dist) == TOP_K ** NUM_NEW
    return dist


def sample_counts(model: s2d2.Model, batch_size: int = 1, **cfg) -> Counter:
    cfg.setdefault("block_size", 4)
    cfg.setdefault("seed", 0)
    config = DecodeConfig(temperature=TEMPERATURE, top_k=TOP_K, max_new_tokens=NUM_NEW, stop_token_ids=(), **cfg)
    return Counter(tuple(g.token_ids) for g in model.generate([PROMPT] * N, config, batch_size=batch_size))


def chi_square_pvalue(counts: Counter, dist: dict[tuple[int, ...], float]) -> float:
    """Pearson chi-square over the 27 outcomes, pooling those with expected count < 5 into one cell.

    An outcome the target gives probability 0 rejects outright (p-value 0).
    """
    assert sum(counts.values()) == N
    if not set(counts) <= set(dist):
        return 0.0
    observed, expected, pooled_obs, pooled_exp = [], [], 0, 0.0
    for seq, p in dist.items():
        if N * p >= 5:
            observed.append(counts.get(seq, 0))
            expected.append(N * p)
        else:
            pooled_obs += counts.get(seq, 0)
            pooled_exp += N * p
    if pooled_exp > 0:
        observed.append(pooled_obs)
        expected.append(pooled_exp)
    # scale away the float rounding of the enumerated probabilities (scipy requires equal sums to 1.5e-8)
    total = sum(expected)
    return float(chisquare(observed, [e * N / total for e in expected]).pvalue)


@pytest.fixture(scope="module")
def target(model):
    return exact_ar_distribution(model)


def test_sampled_s2d2_matches_the_ar_distribution(model, target):
    counts = sample_counts(model, method="s2d2", policy="mask_span_length", min_span=1, cache_ver=True)
    assert chi_square_pvalue(counts, target) > 1e-3


def test_sampled_ar_matches_the_exact_distribution(model, target):
    assert chi_square_pvalue(sample_counts(model, method="ar", block_size=1), target) > 1e-3


def test_the_test_rejects_unverified_parallel_decoding(model, target):
    counts = sample_counts(model, method="dynamic", threshold=0.0)  # all three tokens in one parallel step
    assert chi_square_pvalue(counts, target) < 1e-6


def test_sampled_s2d2_batched_matches_the_ar_distribution(model, target):
    """Invariant 3 through the batched engine: 16 rows per forward, each verifying every step."""
    counts = sample_counts(model, batch_size=16, method="s2d2", policy="mask_span_length", min_span=1, seed=1)
    assert chi_square_pvalue(counts, target) > 1e-3
