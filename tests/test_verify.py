"""Speculative acceptance (s2d2.core.verify) on hand-built logit and probability tables.

Greedy acceptance is deterministic (accept while draft == argmax q, then commit argmax q); sampled acceptance keeps
a draft with probability min(1, q/p), resamples the first rejection from normalize((q - p)+), and so commits exact
samples from q (reference §1.9 and §8.4).
"""

from __future__ import annotations

import math

import pytest
import torch

from s2d2.config import Relaxation
from s2d2.core import verify
from s2d2.core.verify import Verdict, accept_greedy, accept_sampled

V = 5  # vocabulary of the hand-built tables


def _logits(argmaxes: list[int]) -> torch.Tensor:
    """One logit row per entry, with a clear maximum at the given token (and distinct runner-up values)."""
    rows = torch.arange(V, dtype=torch.float32).repeat(len(argmaxes), 1) * 0.1  # 0.0 .. 0.4
    for i, t in enumerate(argmaxes):
        rows[i, t] = 5.0
    return rows


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fixed_uniforms(values: list[float]):
    """Stands in for :func:`s2d2.core.sampling.uniforms` inside s2d2.core.verify: the chosen uniforms for the drafts'
    tests, then 0.5 for the correction's draw (one call per span, as verify makes it)."""

    def uniforms(count, generator=None, device=None):  # noqa: ANN001 - mirrors sampling.uniforms
        assert count == len(values) + 1
        return torch.tensor(values + [0.5], dtype=torch.float64)

    return uniforms


# --------------------------------------------------------------------------------------------------- Verdict


def test_verdict_tokens_all_accepted() -> None:
    assert Verdict(3, None).tokens([7, 8, 9]) == [7, 8, 9]


def test_verdict_tokens_with_correction() -> None:
    assert Verdict(1, 4).tokens([7, 8, 9]) == [7, 4]
    assert Verdict(0, 2).tokens([7, 8, 9]) == [2]
    assert Verdict(2, 0).tokens([7, 8, 9]) == [7, 8, 0]


def test_verdict_tokens_does_not_modify_the_draft() -> None:
    drafted = [7, 8, 9]
    Verdict(1, 4).tokens(drafted)
    assert drafted == [7, 8, 9]


# ---------------------------------------------------------------------------------------------------- greedy


def test_greedy_all_drafts_match_argmax() -> None:
    q = _logits([3, 1, 4, 0])
    verdict = accept_greedy([3, 1, 4, 0], q)
    assert verdict == Verdict(4, None)
    assert verdict.tokens([3, 1, 4, 0]) == [3, 1, 4, 0]


@pytest.mark.parametrize(
    ("drafted", "argmaxes", "expected", "committed"),
    [
        ([2, 1, 4, 0], [3, 1, 4, 0], Verdict(0, 3), [3]),  # mismatch at position 0
        ([3, 1, 2, 0], [3, 1, 4, 0], Verdict(2, 4), [3, 1, 4]),  # mismatch in the middle
        ([3, 1, 4, 1], [3, 1, 4, 0], Verdict(3, 0), [3, 1, 4, 0]),  # mismatch at the last position
        ([3, 0, 0, 0], [3, 1, 4, 0], Verdict(1, 1), [3, 1]),  # later "matches" after a mismatch do not count
    ],
)
def test_greedy_mismatch(drafted: list[int], argmaxes: list[int], expected: Verdict, committed: list[int]) -> None:
    verdict = accept_greedy(drafted, _logits(argmaxes))
    assert verdict == expected
    assert verdict.tokens(drafted) == committed


@pytest.mark.parametrize(("draft", "expected"), [(2, Verdict(1, None)), (0, Verdict(0, 2))])
def test_greedy_single_token_span(draft: int, expected: Verdict) -> None:
    assert accept_greedy([draft], _logits([2])) == expected


def test_greedy_reads_logits_not_probabilities_order() -> None:
    # Negative logits: the argmax is the least negative value (token 1), not the largest magnitude.
    q = torch.tensor([[-3.0, -0.5, -7.0, -1.0]])
    assert accept_greedy([1], q) == Verdict(1, None)
    assert accept_greedy([2], q) == Verdict(0, 1)


def test_greedy_returns_python_ints() -> None:
    verdict = accept_greedy([0], _logits([4]))
    assert type(verdict.correction) is int and verdict.correction == 4


# --------------------------------------------------------------------------------------------------- sampled


def test_sampled_p_equal_q_accepts_everything_for_any_seed() -> None:
    p = torch.tensor([
        [0.1, 0.2, 0.3, 0.4],
        [0.7, 0.1, 0.1, 0.1],
        [0.25, 0.25, 0.25, 0.25],
    ])
    drafted = [0, 3, 2]  # deliberately low-probability drafts: the ratio is still exactly 1
    for seed in range(50):
        assert accept_sampled(drafted, p, p.clone(), _seeded(seed)) == Verdict(3, None)


def test_sampled_p_equal_q_accepts_even_the_largest_uniform(monkeypatch: pytest.MonkeyPatch) -> None:
    # u is drawn from [0, 1); the largest float64 below 1 must still be accepted when q(d) / p(d) = 1.
    below_one = 1.0 - 2.0**-53
    monkeypatch.setattr(verify, "uniforms", _fixed_uniforms([below_one, below_one]))
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    assert accept_sampled([0, 1], p, p.clone(), None) == Verdict(2, None)


def test_sampled_commits_up_to_the_first_of_several_rejections() -> None:
    """Positions 1 and 3 are both certain rejections (q gives their drafts 0): the verdict stops at the first, and
    its correction comes from position 1's residual (token 2), never position 3's (token 3)."""
    certain = [0.0, 1.0, 0.0, 0.0]
    p = torch.tensor([certain, [0.5, 0.5, 0.0, 0.0], certain, [0.0, 1.0, 0.0, 0.0]])
    q = torch.tensor([certain, [0.0, 0.5, 0.5, 0.0], certain, [0.0, 0.0, 0.0, 1.0]])
    for seed in range(20):
        assert accept_sampled([1, 0, 1, 1], p, q, _seeded(seed)) == Verdict(1, 2)


def test_sampled_zero_q_rejects_and_corrects_from_one_hot_residual() -> None:
    # position 0: p == q, accepted with certainty.
    # position 1: draft 0 has q = 0, so it is always rejected; residual (q - p)+ = [0, 0, 0.5, 0] -> token 2.
    # position 2: would be accepted (p == q), but nothing after the first rejection is committed.
    p = torch.tensor([
        [0.6, 0.2, 0.1, 0.1],
        [0.5, 0.5, 0.0, 0.0],
        [0.25, 0.25, 0.25, 0.25],
    ])
    q = torch.tensor([
        [0.6, 0.2, 0.1, 0.1],
        [0.0, 0.5, 0.5, 0.0],
        [0.25, 0.25, 0.25, 0.25],
    ])
    for seed in range(50):
        verdict = accept_sampled([1, 0, 3], p, q, _seeded(seed))
        assert verdict == Verdict(1, 2)
        assert verdict.tokens([1, 0, 3]) == [1, 2]


def test_sampled_first_rejection_at_position_zero() -> None:
    p = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]])
    # draft 1: q(1) = 0 -> rejected; residual (q - p)+ = [0, 0, 0, 1] -> token 3.
    assert accept_sampled([1, 0], p, q, _seeded(0)) == Verdict(0, 3)


@pytest.mark.parametrize(("u", "expected"), [(0.4999, Verdict(1, None)), (0.5, Verdict(0, 2))])
def test_sampled_accepts_iff_u_below_ratio(monkeypatch: pytest.MonkeyPatch, u: float, expected: Verdict) -> None:
    # ratio q(0) / p(0) = 0.4 / 0.8 = 0.5; accept iff u < 0.5. Residual (q - p)+ = [0, 0, 0.4, 0] -> token 2.
    monkeypatch.setattr(verify, "uniforms", _fixed_uniforms([u]))
    p = torch.tensor([[0.8, 0.2, 0.0, 0.0]])
    q = torch.tensor([[0.4, 0.2, 0.4, 0.0]])
    assert accept_sampled([0], p, q, None) == expected


def test_sampled_ratio_above_one_is_capped_and_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    # q(d) / p(d) = 0.9 / 0.1 = 9 -> min(1, 9) = 1 -> accepted for every u in [0, 1).
    monkeypatch.setattr(verify, "uniforms", _fixed_uniforms([1.0 - 2.0**-24]))
    p = torch.tensor([[0.1, 0.9, 0.0, 0.0]])
    q = torch.tensor([[0.9, 0.1, 0.0, 0.0]])
    assert accept_sampled([0], p, q, None) == Verdict(1, None)


def test_sampled_empty_residual_falls_back_to_q() -> None:
    # Draft 0 lies outside the support of both p and q (p(0) = q(0) = 0): ratio 0 / 1e-12 = 0, so it is rejected;
    # q == p elsewhere, so (q - p)+ is all zero and the correction must come from q itself: the one-hot token 2.
    p = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    q = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    for seed in range(20):
        assert accept_sampled([0], p, q, _seeded(seed)) == Verdict(0, 2)


def test_sampled_empty_residual_with_q_below_p_everywhere_falls_back_to_q() -> None:
    # p carries at least as much mass as q at every token (an unnormalised p, as rounding can leave it); draft 0
    # has q(0) = 0 -> rejected. (q - p)+ = [0, 0, 0, 0], so the correction is drawn from q = one-hot at token 1
    # (a draw from p would give token 0 five times in six).
    p = torch.tensor([[5.0, 1.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    for seed in range(20):
        assert accept_sampled([0], p, q, _seeded(seed)) == Verdict(0, 1)


def test_sampled_is_reproducible_with_the_same_seed() -> None:
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 6)
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 6)
    drafted = [0, 1, 0, 2, 0, 1]
    runs = [[accept_sampled(drafted, p, q, _seeded(s)) for s in range(20)] for _ in range(2)]
    assert runs[0] == runs[1]


# -------------------------------------------------------------------------------------- distribution property

P = torch.tensor([0.4, 0.3, 0.2, 0.1])
Q = torch.tensor([0.1, 0.2, 0.3, 0.4])
TRIALS = 20_000


def _total_variation(counts: torch.Tensor, target: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - target).abs().sum())


def _chi_square_pvalue(counts: torch.Tensor, target: torch.Tensor) -> float:
    stats = pytest.importorskip("scipy.stats")
    return float(stats.chisquare(counts.numpy(), (target * counts.sum()).numpy()).pvalue)


@pytest.fixture(scope="module")
def speculative_runs() -> tuple[torch.Tensor, torch.Tensor, int]:
    """Draft d ~ P, verify against Q, TRIALS times; returns (counts of drafts, counts of commits, #accepted)."""
    gen = torch.Generator().manual_seed(1234)
    drafts = torch.multinomial(P, TRIALS, replacement=True, generator=gen).tolist()
    p, q = P[None, :], Q[None, :]
    committed = torch.zeros(4)
    drafted = torch.zeros(4)
    accepted = 0
    for d in drafts:
        verdict = accept_sampled([d], p, q, gen)
        (token,) = verdict.tokens([d])
        committed[token] += 1
        drafted[d] += 1
        accepted += verdict.correction is None
    return drafted, committed, accepted


def test_verified_tokens_follow_q(speculative_runs: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    _, committed, _ = speculative_runs
    assert _total_variation(committed, Q) < 0.02
    assert _chi_square_pvalue(committed, Q) > 1e-3


def test_unverified_drafts_fail_the_same_test(speculative_runs: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    # Committing the drafts as they are gives P, at total variation 0.5 * (0.3 + 0.1 + 0.1 + 0.3) = 0.4 from Q.
    drafted, _, _ = speculative_runs
    assert _total_variation(drafted, Q) > 0.3
    assert _chi_square_pvalue(drafted, Q) < 1e-3
    assert _total_variation(drafted, P) < 0.02  # ... while they do follow P, the draft distribution


def test_acceptance_rate_is_overlap_of_p_and_q(speculative_runs: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    # P(accept) = sum_v min(p_v, q_v) = 0.1 + 0.2 + 0.2 + 0.1 = 0.6
    _, _, accepted = speculative_runs
    assert math.isclose(accepted / TRIALS, 0.6, abs_tol=0.02)


def test_spans_verified_together_equal_each_span_alone() -> None:
    """Issue 28: the step's sampler verifies every sampled row's span in one set of operations; each span's verdict
    (first rejection, correction, ratios) is what it is alone with the same uniforms, whatever its length and its
    relaxation, and a span's rejections never stop another's."""
    gen = torch.Generator().manual_seed(4)
    spans = []
    for n in (3, 1, 4, 2):
        p = torch.softmax(torch.randn(n, 6, generator=gen), dim=-1)
        q = torch.softmax(torch.randn(n, 6, generator=gen), dim=-1)
        drafted = torch.multinomial(p, 1, generator=gen).squeeze(-1).tolist()
        spans.append((drafted, p, q, torch.rand(n + 1, generator=gen, dtype=torch.float64)))
    relax = [None, Relaxation(ratio_tempering=0.5), Relaxation(0.3, 0.2), Relaxation(ratio_threshold=0.1)]
    together = verify.sampled_verdicts([d for d, *_ in spans], torch.cat([p for _, p, _, _ in spans]),
                                       torch.cat([q for _, _, q, _ in spans]),
                                       torch.cat([u[:-1] for *_, u in spans]), torch.cat([u[-1:] for *_, u in spans]),
                                       relax)
    verdicts = verify.read_verdicts(together.tolist(), [d for d, *_ in spans], relax)
    alone = [verify.read_sampled_verdict(verify.sampled_verdicts([d], p, q, u[:-1], u[-1:], [r]).tolist(), d, r)
             for (d, p, q, u), r in zip(spans, relax)]
    assert verdicts == alone
    assert len({v.num_accepted == len(d) for v, (d, *_) in zip(verdicts, spans)}) == 2  # some accept all, some not
