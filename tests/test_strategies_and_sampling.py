"""Base unmasking strategies (s2d2.core.strategies) and the logits -> distribution -> token path
(s2d2.core.sampling)."""

from __future__ import annotations

import math

import pytest
import torch

import s2d2
from s2d2.core.sampling import Sampling, choose_tokens, draw_tokens, filtered_probs, token_probs, transform_logits
from s2d2.core.strategies import most_confident, select, select_dynamic, select_static, step_quotas

NEG_INF = float("-inf")

# ------------------------------------------------------------------------------------------------ step quotas


@pytest.mark.parametrize(
    ("block_size", "steps", "expected"),
    [
        (8, 8, [1] * 8),
        (8, 3, [3, 3, 2]),
        (4, 4, [1, 1, 1, 1]),
        (5, 2, [3, 2]),
        (16, 5, [4, 3, 3, 3, 3]),
        (8, 1, [8]),
        (1, 1, [1]),
        (10, 4, [3, 3, 2, 2]),
    ],
)
def test_step_quotas(block_size: int, steps: int, expected: list[int]) -> None:
    assert step_quotas(block_size, steps) == expected


def test_step_quotas_sum_to_block_size() -> None:
    for block_size in range(1, 33):
        for steps in range(1, block_size + 1):
            quotas = step_quotas(block_size, steps)
            assert len(quotas) == steps
            assert sum(quotas) == block_size
            assert min(quotas) >= 1
            assert max(quotas) - min(quotas) <= 1
            assert quotas == sorted(quotas, reverse=True)


# ------------------------------------------------------------------------------------------------- selection


def test_select_static_most_confident() -> None:
    conf = (0.1, 0.5, 0.7, 0.3)
    assert select_static([0, 1, 2, 3], conf, 2) == [2, 1]
    assert select_static([0, 1, 2, 3], conf, 1) == [2]
    assert sorted(select_static([0, 1, 2, 3], conf, 3)) == [1, 2, 3]


def test_select_static_ties_leftmost_first() -> None:
    conf = (0.5, 0.5, 0.5, 0.5, 0.5)
    assert select_static([0, 1, 2, 3, 4], conf, 2) == [0, 1]
    assert select_static([1, 3, 4], conf, 2) == [1, 3]
    conf = (0.2, 0.6, 0.9, 0.6, 0.6)
    assert select_static([0, 1, 2, 3, 4], conf, 3) == [2, 1, 3]


def test_select_static_k_larger_than_candidates() -> None:
    assert sorted(select_static([2, 5], (0.0,) * 6, 4)) == [2, 5]


def test_select_never_picks_a_non_candidate() -> None:
    conf = (0.99, 0.1, 0.99, 0.2, 0.99)  # committed offsets 0, 2, 4 are the most confident
    assert select_static([1, 3], conf, 1) == [3]
    assert select_static([1, 3], conf, 2) == [3, 1]
    assert select_dynamic([1, 3], conf, 1, 0.5) == [3]
    assert sorted(select_dynamic([1, 3], conf, 2, 0.05)) == [1, 3]
    assert select_dynamic([1, 3], conf, 5, 0.5) in ([3, 1], [1, 3])


def test_select_dynamic_commits_every_confident_candidate() -> None:
    conf = (0.9, 0.2, 0.95, 0.86, 0.1)
    # 3 candidates above 0.85 and k = 2 -> all three, more than the quota
    assert sorted(select_dynamic([0, 1, 2, 3, 4], conf, 2, 0.85)) == [0, 2, 3]
    assert sorted(select_dynamic([0, 1, 2, 3, 4], conf, 3, 0.85)) == [0, 2, 3]


def test_select_dynamic_falls_back_to_top_k() -> None:
    conf = (0.9, 0.2, 0.95, 0.86, 0.1)
    # only 3 above 0.85 but k = 4 -> the 4 most confident
    assert sorted(select_dynamic([0, 1, 2, 3, 4], conf, 4, 0.85)) == [0, 1, 2, 3]
    # none above 0.99 -> top-1
    assert select_dynamic([0, 1, 2, 3, 4], conf, 1, 0.99) == [2]


def test_select_dynamic_threshold_is_strict() -> None:
    conf = (0.85, 0.85, 0.85)
    # nothing is > 0.85, so only the quota (left-most on ties) is committed, not all three
    assert select_dynamic([0, 1, 2], conf, 1, 0.85) == [0]
    assert sorted(select_dynamic([0, 1, 2], conf, 1, 0.84)) == [0, 1, 2]


def test_select_dynamic_when_k_exceeds_candidates() -> None:
    conf = (0.0, 0.9, 0.95)
    # both remaining candidates are confident, and k = 3 > 2 candidates: both committed
    assert sorted(select_dynamic([1, 2], conf, 3, 0.85)) == [1, 2]
    assert sorted(select_dynamic([1, 2], (0.0, 0.1, 0.2), 3, 0.85)) == [1, 2]


def test_select_dispatch() -> None:
    conf = (0.9, 0.2, 0.95, 0.86)
    assert sorted(select("dynamic", [0, 1, 2, 3], conf, 1, 0.85)) == [0, 2, 3]
    assert select("static", [0, 1, 2, 3], conf, 1, 0.85) == [2]


def test_most_confident_zero_k() -> None:
    assert most_confident([0, 1], (0.5, 0.6), 0) == []


# ------------------------------------------------------------------------------------------- transform_logits


def test_temperature_divides() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-2.0, 0.0, 2.0, 8.0]])
    out = transform_logits(logits, 2.0, 0, 1.0)
    assert torch.equal(out, torch.tensor([[0.5, 1.0, 1.5, 2.0], [-1.0, 0.0, 1.0, 4.0]]))
    out = transform_logits(logits, 0.5, 0, 1.0)
    assert torch.equal(out, torch.tensor([[2.0, 4.0, 6.0, 8.0], [-4.0, 0.0, 4.0, 16.0]]))
    assert torch.equal(transform_logits(logits, 1.0, 0, 1.0), logits)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (1, [NEG_INF, NEG_INF, NEG_INF, 4.0, NEG_INF]),
        (2, [NEG_INF, NEG_INF, 3.0, 4.0, NEG_INF]),
        (3, [NEG_INF, 2.0, 3.0, 4.0, NEG_INF]),
        (4, [1.0, 2.0, 3.0, 4.0, NEG_INF]),
        (5, [1.0, 2.0, 3.0, 4.0, 0.5]),  # k = V: off
        (9, [1.0, 2.0, 3.0, 4.0, 0.5]),  # k > V: off
        (0, [1.0, 2.0, 3.0, 4.0, 0.5]),  # 0: off
    ],
)
def test_top_k_keeps_exactly_k(k: int, expected: list[float]) -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.5]])
    out = transform_logits(logits, 1.0, k, 1.0)
    assert out[0].tolist() == expected


def test_top_k_per_row() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    out = transform_logits(logits, 1.0, 1, 1.0)
    assert out.tolist() == [[NEG_INF, NEG_INF, 3.0], [3.0, NEG_INF, NEG_INF]]


def _kept(logits: torch.Tensor) -> list[list[int]]:
    return [[i for i, v in enumerate(row) if v != NEG_INF] for row in logits.tolist()]


# probabilities 0.15, 0.5, 0.05, 0.3 (unsorted on purpose): sorted 0.5, 0.3, 0.15, 0.05 with mass before each
# token 0, 0.5, 0.8, 0.95
PROBS = torch.tensor([[0.15, 0.5, 0.05, 0.3]])


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.01, [1]),  # the top token always stays
        (0.49, [1]),
        (0.51, [1, 3]),  # 0.5 < 0.51: need the second token
        (0.79, [1, 3]),
        (0.81, [0, 1, 3]),
        (0.94, [0, 1, 3]),
        (0.96, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),  # off
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p: float, kept: list[int]) -> None:
    out = transform_logits(PROBS.log(), 1.0, 0, top_p)
    assert _kept(out) == [kept]
    kept_logits = out[0, kept]
    assert torch.allclose(kept_logits, PROBS.log()[0, kept])  # kept entries are unchanged


def test_top_p_per_row_with_different_orders() -> None:
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.6, 0.05, 0.3, 0.05], [0.25, 0.25, 0.25, 0.25]])
    out = transform_logits(probs.log(), 1.0, 0, 0.7)
    # row 0: 0.5 + 0.3 = 0.8 >= 0.7; row 1: 0.6 + 0.3 = 0.9; row 2: 0.75 after three (ties in order)
    kept = _kept(out)
    assert kept[0] == [1, 3]
    assert kept[1] == [0, 2]
    assert len(kept[2]) == 3


def test_temperature_applies_before_top_p() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # T = 1: mass before the third token 0.8 < 0.9 -> keep three
    assert _kept(transform_logits(logits, 1.0, 0, 0.9)) == [[0, 1, 2]]
    # T = 0.5: probs ~ p^2 = [0.25, 0.09, 0.0225, 0.0025] / 0.365 = [0.685, 0.247, 0.062, 0.007];
    # mass before the third token 0.932 >= 0.9 -> keep two
    assert _kept(transform_logits(logits, 0.5, 0, 0.9)) == [[0, 1]]


def test_top_k_applies_before_top_p() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # top-k 2 renormalises to [0.625, 0.375]; top-p 0.6 then keeps only the top token (0.625 >= 0.6).
    # (top-p first would keep 0.5 + 0.3, then top-k 2 would keep both.)
    assert _kept(transform_logits(logits, 1.0, 2, 0.6)) == [[0]]


def test_transform_does_not_modify_its_input() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.3, -1.0, 2.0, 0.0]])
    before = logits.clone()
    for temperature, k, p in [(2.0, 0, 1.0), (1.0, 2, 1.0), (1.0, 0, 0.5), (0.7, 3, 0.8), (0.0, 1, 0.1)]:
        transform_logits(logits, temperature, k, p)
        token_probs(logits, temperature, k, p)
        assert torch.equal(logits, before)


# ------------------------------------------------------------------------------------------------ token_probs


LN_1234 = torch.tensor([[0.0, math.log(2), math.log(3), math.log(4)]])  # softmax = [1, 2, 3, 4] / 10


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (1, 1.0), (2, 0.3), (0, 0.05)])
def test_token_probs_greedy_is_plain_softmax(top_k: int, top_p: float) -> None:
    probs = token_probs(LN_1234, 0.0, top_k, top_p)
    assert probs.dtype == torch.float32
    assert torch.allclose(probs, torch.tensor([[0.1, 0.2, 0.3, 0.4]]), atol=1e-6)


def test_token_probs_greedy_ignores_a_non_float32_input_dtype() -> None:
    probs = token_probs(LN_1234.double(), 0.0, 0, 1.0)
    assert probs.dtype == torch.float32
    probs = token_probs(LN_1234.to(torch.bfloat16), 0.7, 0, 1.0)
    assert probs.dtype == torch.float32


def test_token_probs_sampling_transforms() -> None:
    # T = 0.5 squares the probabilities: [1, 4, 9, 16] / 30
    assert torch.allclose(token_probs(LN_1234, 0.5, 0, 1.0), torch.tensor([[1, 4, 9, 16]]) / 30.0, atol=1e-6)
    # top-k 2: [0, 0, 3, 4] / 7
    assert torch.allclose(token_probs(LN_1234, 1.0, 2, 1.0), torch.tensor([[0, 0, 3, 4]]) / 7.0, atol=1e-6)
    # top-p 0.65: sorted 0.4, 0.3 (mass before 0.3 is 0.4 < 0.65; before 0.2 is 0.7) -> [0, 0, 3, 4] / 7
    assert torch.allclose(token_probs(LN_1234, 1.0, 0, 0.65), torch.tensor([[0, 0, 3, 4]]) / 7.0, atol=1e-6)
    # T = 1 without filters: plain softmax
    assert torch.allclose(token_probs(LN_1234, 1.0, 0, 1.0), torch.tensor([[0.1, 0.2, 0.3, 0.4]]), atol=1e-6)


def test_token_probs_rows_sum_to_one() -> None:
    logits = torch.randn(7, 11, generator=torch.Generator().manual_seed(0))
    for temperature, k, p in [(0.0, 0, 1.0), (0.3, 0, 1.0), (1.0, 3, 1.0), (1.5, 0, 0.6), (0.8, 5, 0.9)]:
        assert torch.allclose(token_probs(logits, temperature, k, p).sum(-1), torch.ones(7), atol=1e-5)


# ----------------------------------------------------------------------------------------------- choose_tokens


def test_choose_tokens_greedy_argmax() -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    tokens = choose_tokens(probs, True, None)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == [1, 0, 2]


def test_choose_tokens_greedy_is_seed_independent() -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    a = choose_tokens(probs, True, torch.Generator().manual_seed(1))
    b = choose_tokens(probs, True, torch.Generator().manual_seed(2))
    assert a.tolist() == b.tolist() == [1, 0]


def test_choose_tokens_sampled_reproducible() -> None:
    probs = torch.full((64, 8), 1 / 8)
    a = choose_tokens(probs, False, torch.Generator().manual_seed(7))
    b = choose_tokens(probs, False, torch.Generator().manual_seed(7))
    c = choose_tokens(probs, False, torch.Generator().manual_seed(8))
    assert a.shape == (64,) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # 8^-64 chance of a spurious equality
    gen = torch.Generator().manual_seed(7)
    first, second = choose_tokens(probs, False, gen), choose_tokens(probs, False, gen)
    assert torch.equal(first, a) and not torch.equal(first, second)  # the generator advances


def test_choose_tokens_sampled_respects_support() -> None:
    probs = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.5, 0.0, 0.0, 0.5]]).repeat(50, 1)
    tokens = choose_tokens(probs, False, torch.Generator().manual_seed(0)).view(50, 2)
    assert (tokens[:, 0] == 2).all()
    assert set(tokens[:, 1].tolist()) == {0, 3}


def test_draw_tokens_inverts_the_cumulative_distribution_exactly() -> None:
    """Uniforms on a grid of 1000 cells land on each token in proportion to its probability, cell for cell: the
    draw is the first token whose cumulative probability exceeds u; a token of probability 0 is never drawn, not even
    at u = 0 or at the largest uniform below 1."""
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.125, 0.625, 0.0]])
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    tokens = draw_tokens(probs.expand(1000, -1), u)
    assert torch.bincount(tokens, minlength=6).tolist() == [0, 250, 0, 125, 625, 0]
    edges = torch.tensor([0.0, 1.0 - 2.0**-53], dtype=torch.float64)
    assert draw_tokens(probs.expand(2, -1), edges).tolist() == [1, 4]
    unnormalised = torch.tensor([[0.2, 0.0, 0.6, 0.0]])  # rows that do not sum to 1 (a residual, before dividing)
    assert draw_tokens(unnormalised.expand(2, -1), torch.tensor([0.24, 0.26], dtype=torch.float64)).tolist() == [0, 2]


SAMPLINGS = [Sampling(0.7, 5, 0.8), Sampling(1.0, 0, 0.9), Sampling(0.5, 10, 1.0), Sampling(1.3, 3, 0.6),
             Sampling(0.9, 0, 1.0)]


@pytest.mark.parametrize("mix", [[0, 1, 2], [0, 2, 3], [3, 1, 4], [4], [2, 4, 0, 3]])
def test_rows_filtered_together_equal_each_row_alone(mix: list[int]) -> None:
    """Issue 28: a batch's rows are filtered in one set of operations, each with its own temperature, top-k and
    top-p, and each row's distribution is bit for bit what it is alone (batched == batch 1), whether the batch
    takes top-p from the top-k candidates (every row cutting by top-p has a top-k) or from a whole sort."""
    logits = torch.randn(12, 40, generator=torch.Generator().manual_seed(sum(mix)))
    counts = [4, 3, 5, 2][:len(mix)] if len(mix) > 1 else [12]
    counts[-1] = 12 - sum(counts[:-1])
    rows = [(SAMPLINGS[i], n) for i, n in zip(mix, counts)]
    together = filtered_probs(logits, rows)
    alone, start = [], 0
    for sampling, n in rows:
        alone.append(filtered_probs(logits[start:start + n], [(sampling, n)]))
        assert torch.equal(alone[-1], token_probs(logits[start:start + n], sampling.temperature, sampling.top_k,
                                                  sampling.top_p))
        start += n
    assert torch.equal(together, torch.cat(alone))
    kept = (together > 0).sum(dim=-1)
    start = 0
    for sampling, n in rows:  # each row's own top-k held
        if sampling.top_k:
            assert (kept[start:start + n] <= sampling.top_k).all()
        start += n


def test_whole_number_sampling_values_filter_as_their_floats() -> None:
    """JSON and Python give temperature 1 and top-p 1 as integers (an OpenAI client's "temperature": 1): they filter
    exactly as 1.0 does, alone and beside rows sampled otherwise."""
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(8))
    for rows_int, rows_float in [([(Sampling(1, 0, 1), 6)], [(Sampling(1.0, 0, 1.0), 6)]),
                                 ([(Sampling(2, 5, 1), 3), (Sampling(1, 0, 0.9), 3)],
                                  [(Sampling(2.0, 5, 1.0), 3), (Sampling(1.0, 0, 0.9), 3)])]:
        assert torch.equal(filtered_probs(logits, rows_int), filtered_probs(logits, rows_float))
    assert Sampling.of(s2d2.DecodeConfig(temperature=1, top_p=1)) == Sampling(1.0, 0, 1.0)


def test_the_stage_works_in_chunks_within_its_memory_and_changes_no_value(monkeypatch) -> None:
    """At a real vocabulary the filter and the draws work through a step's rows in chunks, so that their temporaries
    stay within what the memory planner reserved for the stage; the values are those of one pass."""
    import s2d2.core.sampling as sampling

    logits = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    rows = [(SAMPLINGS[0], 7), (SAMPLINGS[1], 20), (SAMPLINGS[3], 13)]
    u = torch.rand(40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    whole = filtered_probs(logits, rows)
    drawn = draw_tokens(whole, u)
    assert sampling.row_chunks(40, 64, sampling.FILTER_BYTES) == [(0, 40)]
    monkeypatch.setattr(sampling, "MIN_CHUNK_BYTES", 1)
    assert sampling.row_chunks(40, 64, sampling.FILTER_BYTES) == [(0, 10), (10, 20), (20, 30), (30, 40)]
    assert sampling.row_chunks(40, 151_936, sampling.DRAW_BYTES) == [(0, 20), (20, 40)]
    calls = []
    real = sampling.filter_logits
    monkeypatch.setattr(sampling, "filter_logits", lambda x, r: calls.append(len(x)) or real(x, r))
    assert torch.equal(filtered_probs(logits, rows), whole) and calls == [10, 10, 10, 10]
    assert torch.equal(draw_tokens(whole, u), drawn)


# ------------------------------------------------------------------------------------------------ row seeds


def test_row_seeds_keep_the_batch_contract_and_scatter_further_choices():
    from s2d2.core.sampling import row_seed

    assert [row_seed(5, i) for i in range(4)] == [5, 6, 7, 8]  # prompt i draws from seed + i
    assert row_seed(5, 0, choice=0) == 5  # choice 0 is the request with n = 1
    # seed + k would make choice 1 of seed 1 the first choice of seed 2; derived seeds do not collide so
    firsts = {row_seed(s, 0) for s in range(1000)}
    seconds = [row_seed(s, 0, choice=k) for s in range(1000) for k in (1, 2, 3)]
    assert not firsts & set(seconds) and len(set(seconds)) == len(seconds)
    assert all(0 <= x < 2**64 for x in (*seconds, row_seed(2**64 - 1, 1), row_seed(2**64 - 1, 0, choice=5)))


def test_row_generators_draw_per_choice_streams(model):
    from s2d2 import DecodeConfig

    def first_draws(seed: int, count: int, choices: int = 1) -> list[list[float]]:
        gens = model.row_generators(DecodeConfig(seed=seed), count, choices)
        return [torch.rand(3, generator=g).tolist() for g in gens]

    one, two = first_draws(1, 2, choices=2), first_draws(2, 1)
    assert one[0] == first_draws(1, 1)[0]  # choice 0 is the plain request
    assert one[1] != two[0]  # choice 1 of seed 1 is not seed 2's first
    assert first_draws(1, 2) == [first_draws(1, 1)[0], two[0]]  # prompts: seed + i, unchanged
    assert len(first_draws(2**64 - 1, 2, choices=2)) == 2  # the largest seed wraps, no overflow
    with pytest.raises(s2d2.ConfigError, match="below 2"):
        DecodeConfig(seed=2**64)
