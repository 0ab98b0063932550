"""Routing policies (s2d2.core.routing): table-driven pure policies, UCB arithmetic, and ``route`` end to end.

Expected values are worked out by hand from reference §2 (scores, hysteresis, UCB buckets and exploration term).
"""

from __future__ import annotations

import math

import pytest
import torch

from s2d2.config import DecodeConfig
from s2d2.core.routing import (
    RouterState,
    linear_bin,
    mask_span_length,
    observe,
    route,
    score_hysteresis,
    score_threshold,
    span_is_confident,
    ucb_bucket,
    ucb_choose,
    verification_score,
)
from s2d2.core.state import BlockState, Draft, Span

# ---------------------------------------------------------------------------------------------- pure policies


@pytest.mark.parametrize(
    ("span_len", "min_span", "expected"),
    [(1, 1, True), (5, 1, True), (3, 4, False), (4, 4, True), (5, 4, True), (1, 2, False), (8, 8, True)],
)
def test_mask_span_length(span_len: int, min_span: int, expected: bool) -> None:
    assert mask_span_length(span_len, min_span) is expected


@pytest.mark.parametrize(
    ("score", "tau", "expected"),
    [(0.0, 0.0, True), (-1e-9, 0.0, False), (2.0, 1.5, True), (1.4999, 1.5, False), (-5.0, -5.0, True),
     (-5.0001, -5.0, False), (-math.inf, -1.0, False)],
)
def test_score_threshold(score: float, tau: float, expected: bool) -> None:
    assert score_threshold(score, tau) is expected


def test_score_hysteresis_sequence() -> None:
    tau_on, tau_off = 1.0, -1.0
    # (score, state after it): off -> on needs s > 1 strictly; on stays while s >= -1; turns off below -1.
    steps = [
        (1.0, False),  # off, 1.0 is not > 1.0
        (0.5, False),
        (1.5, True),  # off -> on
        (-1.0, True),  # on, -1.0 >= -1.0 keeps it on
        (-0.5, True),
        (1.0, True),
        (-1.01, False),  # on -> off
        (0.5, False),  # off: 0.5 >= tau_off but not > tau_on
        (-1.0, False),
        (-5.0, False),
        (1.0001, True),
        (-2.0, False),
    ]
    state = False
    for i, (score, expected) in enumerate(steps):
        state = score_hysteresis(state, score, tau_on, tau_off)
        assert state is expected, f"step {i}: score {score}"


def test_verification_score_static_ignores_num_high() -> None:
    cfg = DecodeConfig(score_type="difference_static", penalty=1.0)
    assert verification_score(2.5, 0, cfg) == 1.5
    assert verification_score(2.5, 7, cfg) == 1.5
    assert verification_score(0.25, 3, DecodeConfig(score_type="difference_static", penalty=4.0)) == -3.75


def test_verification_score_dynamic() -> None:
    cfg = DecodeConfig(score_type="difference_dynamic", penalty=2.0)
    assert verification_score(2.5, 3, cfg) == -3.5  # 2.5 - 2 * 3
    assert verification_score(2.5, 0, cfg) == 2.5
    assert verification_score(1.0, 1, DecodeConfig(score_type="difference_dynamic", penalty=0.5)) == 0.5


@pytest.mark.parametrize(
    ("value", "low", "high", "bins", "expected"),
    [
        (1, 1, 4, 2, 0),  # low edge
        (4, 1, 4, 2, 1),  # high edge goes to the last bin, not past it
        (2.5, 1, 4, 2, 1),  # (1.5 / 3) * 2 = 1.0
        (2.49, 1, 4, 2, 0),
        (0, 1, 4, 2, 0),  # below range
        (-10, 1, 4, 2, 0),
        (10, 1, 4, 2, 1),  # above range
        (0.25, 0.0, 1.0, 4, 1),
        (0.2499, 0.0, 1.0, 4, 0),
        (0.5, 0.0, 1.0, 4, 2),
        (0.999, 0.0, 1.0, 4, 3),
        (1.0, 0.0, 1.0, 4, 3),
        (0.7, 0.0, 1.0, 1, 0),  # one bin
        (5, 1, 1, 3, 0),  # high == low
        (5, 2, 1, 3, 0),  # high < low
        (-5, 2, 1, 3, 0),
    ],
)
def test_linear_bin(value: float, low: float, high: float, bins: int, expected: int) -> None:
    assert linear_bin(value, low, high, bins) == expected


@pytest.mark.parametrize(
    ("span_len", "progress", "entropy", "expected"),
    [
        # default bins 2/2/2, block size 4: bucket = (span_bin * 2 + progress_bin) * 2 + entropy_bin
        (1, 0.0, 0.0, 0),
        (4, 0.5, 0.9, 7),  # (1*2 + 1)*2 + 1
        (3, 0.25, 0.6, 5),  # span (3-1)/3*2 = 1.33 -> 1; (1*2 + 0)*2 + 1
        (2, 0.75, 0.2, 2),  # span (2-1)/3*2 = 0.67 -> 0; (0*2 + 1)*2 + 0
        (1, 1.0, 1.0, 3),
    ],
)
def test_ucb_bucket_default_bins(span_len: int, progress: float, entropy: float, expected: int) -> None:
    assert ucb_bucket(span_len, progress, entropy, 4, DecodeConfig()) == expected


def test_ucb_bucket_custom_bins() -> None:
    cfg = DecodeConfig(block_size=8, ucb_span_bins=3, ucb_progress_bins=4, ucb_entropy_bins=2)
    # span 8 over [1, 8] -> last bin 2; progress 0.6 -> int(2.4) = 2; entropy 0.3 -> 0: (2*4 + 2)*2 + 0 = 20
    assert ucb_bucket(8, 0.6, 0.3, 8, cfg) == 20
    # span 4 -> int(3/7*3) = 1; progress 0.1 -> 0; entropy 0.75 -> 1: (1*4 + 0)*2 + 1 = 9
    assert ucb_bucket(4, 0.1, 0.75, 8, cfg) == 9
    assert ucb_bucket(1, 0.0, 0.0, 8, cfg) == 0
    assert ucb_bucket(8, 1.0, 1.0, 8, cfg) == 3 * 4 * 2 - 1


# --------------------------------------------------------------------------------------------------- UCB choice


def test_ucb_unpulled_verify_arm_wins() -> None:
    assert ucb_choose((5, 0), (10.0, 0.0), 0, 6, 1.0) == 1


def test_ucb_unpulled_skip_arm_wins() -> None:
    assert ucb_choose((0, 5), (0.0, 10.0), 0, 6, 1.0) == 0


def test_ucb_two_unpulled_arms_tie_to_verify() -> None:
    assert ucb_choose((0, 0), (0.0, 0.0), 0, 1, 1.0) == 1


def test_ucb_equal_finite_scores_tie_to_verify() -> None:
    assert ucb_choose((2, 2), (3.0, 3.0), 0, 5, 1.0) == 1
    assert ucb_choose((2, 2), (3.0, 3.0), 0, 5, 0.0) == 1


def test_ucb_exploration_term_by_hand() -> None:
    # bucket 1: skip arm 1 pull / reward 1.0, verify arm 4 pulls / reward 6.0; t = 5.
    # score_skip = 1.0 + b*sqrt(ln 5 / 1) = 1 + 1.268636 b ; score_verify = 1.5 + b*sqrt(ln 5 / 4) = 1.5 + 0.634318 b
    # equal at b = 0.5 / 0.634318 = 0.788248.
    # Bucket 0 holds the opposite preference; it must not be read.
    pulls = (1, 4, 1, 4)
    rewards = (6.0, 0.0, 1.0, 6.0)
    assert ucb_choose(pulls, rewards, 1, 5, 0.0) == 1  # means only: 1.0 vs 1.5
    assert ucb_choose(pulls, rewards, 1, 5, 0.78) == 1  # 1.98954 vs 1.99477
    assert ucb_choose(pulls, rewards, 1, 5, 0.80) == 0  # 2.01491 vs 2.00745
    assert ucb_choose(pulls, rewards, 1, 5, 1.0) == 0  # 2.26864 vs 2.13432
    assert ucb_choose(pulls, rewards, 0, 5, 1.0) == 0  # bucket 0: 6.0 + ... vs 0.0 + ...


def test_ucb_first_decision_has_no_exploration() -> None:
    # t = 1: ln 1 = 0, so only the means count, whatever beta is.
    assert ucb_choose((1, 1), (2.0, 1.0), 0, 1, 100.0) == 0
    assert ucb_choose((1, 1), (1.0, 2.0), 0, 1, 100.0) == 1


# ------------------------------------------------------------------------------------------------ state, observe


def test_initial_state() -> None:
    state = RouterState.initial(DecodeConfig(ucb_span_bins=3, ucb_progress_bins=2, ucb_entropy_bins=1))
    assert state.hysteresis_on is False
    assert state.num_decisions == 0
    assert state.ucb_pulls == (0,) * 12
    assert state.ucb_rewards == (0.0,) * 12
    assert state.last_choice is None


def test_observe_verified_reward_is_half_the_committed_tokens() -> None:
    state = RouterState.initial(DecodeConfig())  # 8 buckets, 16 entries
    state = RouterState(num_decisions=1, ucb_pulls=state.ucb_pulls, ucb_rewards=state.ucb_rewards, last_choice=(3, 1))
    after = observe(state, 3, verified=True)
    expected_pulls = [0] * 16
    expected_pulls[7] = 1
    expected_rewards = [0.0] * 16
    expected_rewards[7] = 1.5
    assert after.ucb_pulls == tuple(expected_pulls)
    assert after.ucb_rewards == tuple(expected_rewards)
    assert after.last_choice is None
    assert after.num_decisions == 1
    assert state.ucb_pulls == (0,) * 16 and state.last_choice == (3, 1)  # the old state is untouched


def test_observe_skipped_reward_is_the_committed_tokens() -> None:
    pulls = (0, 0, 0, 0, 2, 1, 0, 0)
    rewards = (0.0, 0.0, 0.0, 0.0, 5.0, 1.0, 0.0, 0.0)
    state = RouterState(num_decisions=4, ucb_pulls=pulls, ucb_rewards=rewards, last_choice=(2, 0))
    after = observe(state, 3, verified=False)
    assert after.ucb_pulls == (0, 0, 0, 0, 3, 1, 0, 0)
    assert after.ucb_rewards == (0.0, 0.0, 0.0, 0.0, 8.0, 1.0, 0.0, 0.0)
    assert after.last_choice is None


def test_observe_without_a_pending_choice_is_a_no_op() -> None:
    state = RouterState(hysteresis_on=True, num_decisions=2, ucb_pulls=(1, 2), ucb_rewards=(1.0, 2.0))
    assert observe(state, 4, verified=True) == state
    assert observe(state, 4, verified=False) == state


def test_router_state_is_frozen() -> None:
    state = RouterState()
    with pytest.raises(AttributeError):
        state.hysteresis_on = True  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ route, end to end


def _score_case(end: int = 6) -> tuple[BlockState, Span, Draft]:
    """Block of 6: offset 0 and 4 committed, masks at 1, 2, 3 (the span) and 5.

    Span rows (V = 4) have top-1 minus top-2 margins 0.85, 0.3 and 0.02, so hard_margin_threshold (0.05) gives
    alpha = [1, 1, 0] and E[K] = 1 + 1*1 + 1*1*0 = 2. Committed offsets carry high confidences that must not be
    counted in N_high.
    """
    probs = torch.tensor([
        [0.97, 0.01, 0.01, 0.01],  # committed
        [0.90, 0.05, 0.03, 0.02],  # margin 0.85 -> 1
        [0.60, 0.30, 0.05, 0.05],  # margin 0.30 -> 1
        [0.40, 0.38, 0.12, 0.10],  # margin 0.02 -> 0
        [0.97, 0.01, 0.01, 0.01],  # committed
        [0.95, 0.05, 0.00, 0.00],  # masked, outside the span
    ])
    draft = Draft.from_probs(probs, (0,) * 6, (0.99, 0.9, 0.6, 0.4, 0.99, 0.95))
    block = BlockState(start=8, size=6, tokens=(11, 9, 9, 9, 12, 9), masked=(False, True, True, True, False, True),
                       end=end, num_prompt=0)
    return block, Span(1, 4), draft


def _route(policy: str, block: BlockState, span: Span, draft: Draft, state: RouterState | None = None, **kw):
    cfg = DecodeConfig(block_size=6, policy=policy, estimator="hard_margin_threshold", **kw)
    return route(state or RouterState.initial(cfg), block, span, draft, cfg)


def test_case_is_consistent() -> None:
    block, span, _ = _score_case()
    assert block.span() == span
    assert block.masked_offsets() == [1, 2, 3, 5]


@pytest.mark.parametrize(
    ("penalty", "tau", "expected"),
    [(1.0, 1.0, True), (1.0, 1.0001, False), (1.0, 0.9999, True), (2.5, -0.5, True), (2.5, -0.49, False),
     (0.0, 2.0, True), (0.0, 2.01, False)],
)
def test_route_score_threshold_static(penalty: float, tau: float, expected: bool) -> None:
    # s = E[K] - c = 2 - c
    block, span, draft = _score_case()
    state = RouterState.initial(DecodeConfig())
    decision, after = _route("score_threshold", block, span, draft, state, score_type="difference_static",
                             penalty=penalty, tau=tau)
    assert decision is expected
    assert after == state


@pytest.mark.parametrize(
    ("threshold", "penalty", "tau", "expected"),
    [
        # N_high = masked offsets (1, 2, 3, 5) with confidence > threshold
        (0.85, 1.0, 0.0, True),  # N = 2 (0.9, 0.95): s = 2 - 2 = 0 >= 0
        (0.85, 1.0, 0.01, False),
        (0.5, 0.5, 0.5, True),  # N = 3 (0.9, 0.6, 0.95): s = 2 - 1.5 = 0.5
        (0.5, 0.5, 0.51, False),
        (0.9, 1.0, 1.0, True),  # N = 1: 0.9 is not > 0.9, only 0.95 counts: s = 1
        (0.9, 1.0, 1.01, False),
        (0.96, 1.0, 2.0, True),  # N = 0 (committed offsets at 0.99 are not counted): s = 2
        (0.3, 1.0, -2.0, True),  # N = 4: s = -2
        (0.3, 1.0, -1.99, False),
    ],
)
def test_route_score_threshold_dynamic(threshold: float, penalty: float, tau: float, expected: bool) -> None:
    block, span, draft = _score_case()
    decision, _ = _route("score_threshold", block, span, draft, score_type="difference_dynamic", threshold=threshold,
                         penalty=penalty, tau=tau)
    assert decision is expected


def test_route_dynamic_counts_only_masked_offsets_before_end() -> None:
    # With end = 5, offset 5 is not decodable: N_high at threshold 0.85 is 1 (offset 1), s = 2 - 1 = 1.
    block, span, draft = _score_case(end=5)
    assert block.masked_offsets() == [1, 2, 3]
    assert _route("score_threshold", block, span, draft, score_type="difference_dynamic", penalty=1.0,
                  tau=1.0)[0] is True
    assert _route("score_threshold", block, span, draft, score_type="difference_dynamic", penalty=1.0,
                  tau=1.01)[0] is False


def test_route_other_estimator_changes_expected_length() -> None:
    # soft_renyi_2_entropy on the span rows: alpha = sum p^2
    #   row 1: 0.81 + 0.0025 + 0.0009 + 0.0004 = 0.8138; row 2: 0.36 + 0.09 + 0.0025 + 0.0025 = 0.455;
    #   row 3: 0.16 + 0.1444 + 0.0144 + 0.01 = 0.3288
    #   E[K] = 0.8138 + 0.8138*0.455 + 0.8138*0.455*0.3288 = 0.8138 + 0.370279 + 0.121748 = 1.305827
    block, span, draft = _score_case()
    cfg = DecodeConfig(block_size=6, policy="score_threshold", estimator="soft_renyi_2_entropy",
                       score_type="difference_static", penalty=0.0, tau=1.3058)
    assert route(RouterState.initial(cfg), block, span, draft, cfg)[0] is True
    cfg = cfg.replace(tau=1.3059)
    assert route(RouterState.initial(cfg), block, span, draft, cfg)[0] is False


def test_route_mask_span_length() -> None:
    block, span, draft = _score_case()
    state = RouterState.initial(DecodeConfig())
    assert _route("mask_span_length", block, span, draft, state, min_span=3) == (True, state)
    assert _route("mask_span_length", block, span, draft, state, min_span=4) == (False, state)
    assert _route("mask_span_length", block, span, draft, state, min_span=1) == (True, state)


def test_route_score_hysteresis_switches_and_keeps_old_state() -> None:
    block, span, draft = _score_case()
    common = dict(score_type="difference_static", tau_on=1.5, tau_off=-1.0)
    s0 = RouterState.initial(DecodeConfig())
    # s = 2 - 0 = 2 > 1.5: off -> on
    d1, s1 = _route("score_hysteresis", block, span, draft, s0, penalty=0.0, **common)
    assert d1 is True and s1.hysteresis_on is True
    assert s0.hysteresis_on is False  # route returned a new state; the old one is unchanged
    # s = 2 - 3 = -1 >= -1: stays on (an OFF switch would not turn on at -1)
    d2, s2 = _route("score_hysteresis", block, span, draft, s1, penalty=3.0, **common)
    assert d2 is True and s2.hysteresis_on is True
    d2_off, s2_off = _route("score_hysteresis", block, span, draft, s0, penalty=3.0, **common)
    assert d2_off is False and s2_off.hysteresis_on is False
    # s = 2 - 3.5 = -1.5 < -1: turns off
    d3, s3 = _route("score_hysteresis", block, span, draft, s2, penalty=3.5, **common)
    assert d3 is False and s3.hysteresis_on is False
    # s = 2 - 0.5 = 1.5, not > 1.5: stays off
    d4, s4 = _route("score_hysteresis", block, span, draft, s3, penalty=0.5, **common)
    assert d4 is False and s4.hysteresis_on is False


def _ucb_case() -> tuple[BlockState, Span, Draft]:
    """Block of 8: offset 0 committed, span 1..3, offset 4 committed, masks at 5, 6; 7 committed.

    Normalised entropies: uniform rows 1, one-hot rows 0. Span rows (1, 2, 3) = uniform, uniform, one-hot:
    mean 2/3 -> entropy bin 1. Masked rows (1, 2, 3, 5, 6) add two one-hot rows: mean 2/5 -> bin 0.
    Span bin: (3 - 1) / 7 * 2 = 0.57 -> 0. Progress (8 - 0 - 5) / 8 = 0.375 -> 0.
    """
    uniform, one_hot = [0.25] * 4, [0.0, 0.0, 1.0, 0.0]
    probs = torch.tensor([one_hot, uniform, uniform, one_hot, uniform, one_hot, one_hot, uniform])
    draft = Draft.from_probs(probs, (2,) * 8, (1.0, 0.25, 0.25, 1.0, 0.25, 1.0, 1.0, 0.25))
    masked = (False, True, True, True, False, True, True, False)
    block = BlockState(start=0, size=8, tokens=(3,) * 8, masked=masked, end=8, num_prompt=0)
    return block, Span(1, 4), draft


def test_route_ucb_end_to_end() -> None:
    block, span, draft = _ucb_case()
    assert block.span() == span and block.progress == 0.375
    cfg = DecodeConfig(block_size=8, policy="contextual_bandit_ucb", ucb_beta=1.0)
    s0 = RouterState.initial(cfg)

    # decision 1: bucket (0*2 + 0)*2 + 1 = 1; both arms unpulled -> verify
    d1, s1 = route(s0, block, span, draft, cfg)
    assert d1 is True
    assert (s1.num_decisions, s1.last_choice) == (1, (1, 1))
    assert (s0.num_decisions, s0.last_choice) == (0, None)  # immutable
    s1 = observe(s1, 3, verified=True)  # reward 3 / 2
    assert s1.ucb_pulls[2:4] == (0, 1) and s1.ucb_rewards[2:4] == (0.0, 1.5)

    # decision 2: skip arm unpulled (+inf) -> skip
    d2, s2 = route(s1, block, span, draft, cfg)
    assert d2 is False
    assert (s2.num_decisions, s2.last_choice) == (2, (1, 0))
    s2 = observe(s2, 1, verified=False)  # reward 1 / 1
    assert s2.ucb_pulls[2:4] == (1, 1) and s2.ucb_rewards[2:4] == (1.0, 1.5)

    # decision 3, t = 3: skip 1.0 + sqrt(ln 3) = 2.0481, verify 1.5 + sqrt(ln 3) = 2.5481 -> verify
    d3, s3 = route(s2, block, span, draft, cfg)
    assert d3 is True and s3.last_choice == (1, 1) and s3.num_decisions == 3
    # every other bucket is untouched
    assert sum(s3.ucb_pulls) == 2 and s3.ucb_pulls[:2] == (0, 0) and s3.ucb_pulls[4:] == (0,) * 12


def test_route_ucb_entropy_source_masked_changes_the_bucket() -> None:
    block, span, draft = _ucb_case()
    cfg = DecodeConfig(block_size=8, policy="contextual_bandit_ucb", ucb_entropy_source="masked")
    _, state = route(RouterState.initial(cfg), block, span, draft, cfg)
    assert state.last_choice == (0, 1)  # entropy bin 0 over the masked rows


def test_route_ucb_progress_excludes_prompt_tokens() -> None:
    # 8 offsets, 3 prompt tokens, 1 decoded, 4 masked: progress (8 - 3 - 4) / 8 = 0.125 -> bin 0.
    # Counting the prompt would give 4 / 8 = 0.5 -> bin 1.
    uniform = [0.25] * 4
    probs = torch.tensor([uniform] * 8)
    draft = Draft.from_probs(probs, (0,) * 8, (0.25,) * 8)
    masked = (False, False, False, False, True, True, True, True)
    block = BlockState(start=0, size=8, tokens=(1,) * 8, masked=masked, end=8, num_prompt=3)
    cfg = DecodeConfig(block_size=8, policy="contextual_bandit_ucb")
    span = block.span()
    assert span == Span(4, 8)
    # span 4 over [1, 8] -> int(3/7*2) = 0; entropy 1.0 -> bin 1: bucket (0*2 + 0)*2 + 1 = 1
    _, state = route(RouterState.initial(cfg), block, span, draft, cfg)
    assert state.last_choice == (1, 1)


def test_skip_confident_gates_every_policy_on_the_span_confidences() -> None:
    block, span, draft = _score_case()  # span confidences 0.9, 0.6, 0.4
    for policy in ("mask_span_length", "score_threshold", "score_hysteresis", "contextual_bandit_ucb"):
        kw = dict(min_span=1, tau=-100.0, tau_on=-99.0, tau_off=-100.0, ucb_beta=1.0)
        verify, _ = _route(policy, block, span, draft, threshold=0.3, **kw)
        assert verify is True, policy  # without the gate these settings verify
        skipped, state = _route(policy, block, span, draft, threshold=0.3, skip_confident=True, **kw)
        assert skipped is False and state.last_choice is None, policy  # every draft > 0.3: dynamic commits the span
        kept, _ = _route(policy, block, span, draft, threshold=0.5, skip_confident=True, **kw)
        assert kept is True, policy  # 0.4 is below 0.5: the policy decides
    assert span_is_confident((0.0, 0.9, 0.6, 0.4), Span(1, 4), 0.39)
    assert not span_is_confident((0.0, 0.9, 0.6, 0.4), Span(1, 4), 0.4)  # strictly above, as the dynamic rule
