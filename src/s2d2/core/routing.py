"""Routing policies: per step, is verifying the drafted span worth one more forward?

Every decision is computed from the draft alone (no extra forward). Policies are small pure functions; the only
state, the hysteresis switch and the UCB tables, lives in an immutable :class:`RouterState` that :func:`route` and
:func:`observe` return anew. State lives for one prompt, as in the reference (§1.2): nothing carries across
prompts, so a prompt's output never depends on which prompts came before it.

Scores (reference §2.2): ``difference_static``: ``s = E[K] - c``; ``difference_dynamic``: ``s = E[K] - c * N_high``,
with N_high the number of masked positions of the block whose draft confidence exceeds ``threshold`` (what a
cheap diffusion step would commit anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from s2d2.config import DecodeConfig
from s2d2.core.acceptance import ESTIMATORS, READS, expected_accepted_length
from s2d2.core.sampling import FEATURES
from s2d2.core.state import BlockState, Draft, Span


@dataclass(frozen=True)
class RouterState:
    """Per-prompt policy state. UCB tables are flat tuples indexed ``bucket * 2 + arm`` (arm 1 = verify)."""

    hysteresis_on: bool = False
    num_decisions: int = 0
    ucb_pulls: tuple[int, ...] = ()
    ucb_rewards: tuple[float, ...] = ()
    last_choice: tuple[int, int] | None = None  # (bucket, arm) of the last UCB decision, awaiting its reward

    @classmethod
    def initial(cls, cfg: DecodeConfig) -> RouterState:
        """OFF switch and empty tables."""
        buckets = cfg.ucb_span_bins * cfg.ucb_progress_bins * cfg.ucb_entropy_bins
        return cls(ucb_pulls=(0,) * (2 * buckets), ucb_rewards=(0.0,) * (2 * buckets))


# ----------------------------------------------------------------------------------------------- pure policies
def mask_span_length(span_len: int, min_span: int) -> bool:
    """Verify iff the span has at least ``min_span`` masks (min_span = 1: always verify)."""
    return span_len >= min_span


def span_is_confident(confidence: tuple[float, ...], span: Span, threshold: float) -> bool:
    """Whether every draft of the span has confidence above ``threshold`` (the dynamic rule's test)."""
    return all(confidence[i] > threshold for i in span.offsets())


def score_threshold(score: float, tau: float) -> bool:
    """Verify iff ``score >= tau``."""
    return score >= tau


def score_hysteresis(is_on: bool, score: float, tau_on: float, tau_off: float) -> bool:
    """Two-state switch: when off, turn on iff ``score > tau_on``; when on, stay on iff ``score >= tau_off``."""
    return score >= tau_off if is_on else score > tau_on


def verification_score(expected_len: float, num_high: int, cfg: DecodeConfig) -> float:
    """``E[K] - c`` (difference_static) or ``E[K] - c * N_high`` (difference_dynamic)."""
    if cfg.score_type == "difference_static":
        return expected_len - cfg.penalty
    return expected_len - cfg.penalty * num_high


def linear_bin(value: float, low: float, high: float, num_bins: int) -> int:
    """Index of ``value`` among ``num_bins`` equal bins over [low, high]; values outside go to the end bins."""
    if high <= low:
        return 0
    return min(num_bins - 1, max(0, int((value - low) / (high - low) * num_bins)))


def ucb_bucket(span_len: int, progress: float, entropy: float, block_size: int, cfg: DecodeConfig) -> int:
    """Context bucket ``(span_bin * P + progress_bin) * E + entropy_bin`` (reference §2.3)."""
    s = linear_bin(span_len, 1, block_size, cfg.ucb_span_bins)
    p = linear_bin(progress, 0.0, 1.0, cfg.ucb_progress_bins)
    e = linear_bin(entropy, 0.0, 1.0, cfg.ucb_entropy_bins)
    return (s * cfg.ucb_progress_bins + p) * cfg.ucb_entropy_bins + e


def ucb_choose(pulls: tuple[int, ...], rewards: tuple[float, ...], bucket: int, t: int, beta: float) -> int:
    """UCB1 over arms (0 = skip, 1 = verify) in one bucket; an unpulled arm scores +inf; ties go to verify."""
    scores = []
    for arm in (0, 1):
        n = pulls[2 * bucket + arm]
        scores.append(math.inf if n == 0 else rewards[2 * bucket + arm] / n + beta * math.sqrt(math.log(t) / n))
    return 1 if scores[1] >= scores[0] else 0


# ------------------------------------------------------------------------------------------------- dispatch
def reads_features(cfg: DecodeConfig, traced: bool = False) -> frozenset[str]:
    """The drafts' distribution features (of :data:`~s2d2.core.sampling.FEATURES`) routing reads beyond their
    confidence: the score policies' estimator's, the UCB policy's entropy, every one for a trace's explanation; so
    the executor computes a feature only for batches that hold a greedy row reading it, and a sampled row only
    for its own drafts when it reads it."""
    if cfg.method != "s2d2":
        return frozenset()
    if traced:
        return frozenset(FEATURES)
    if cfg.policy == "mask_span_length":
        return frozenset()
    if cfg.policy == "contextual_bandit_ucb":
        return frozenset({"entropy"})
    return READS[cfg.estimator]


def route(state: RouterState, block: BlockState, span: Span, draft: Draft, cfg: DecodeConfig) -> tuple[bool, RouterState]:
    """Decide whether to verify ``span`` this step; returns the decision and the next state."""
    if cfg.skip_confident and span_is_confident(draft.confidence, span, cfg.threshold):
        return False, state  # no policy decision was made (UCB learns nothing from this step)
    if cfg.policy == "mask_span_length":
        return mask_span_length(span.length, cfg.min_span), state
    if cfg.policy == "contextual_bandit_ucb":
        rows = range(span.start, span.end) if cfg.ucb_entropy_source == "span" else block.masked_offsets()
        entropies = [draft.choices.entropy[i] for i in rows]
        entropy = sum(entropies) / len(entropies)
        bucket = ucb_bucket(span.length, block.progress, entropy, block.size, cfg)
        t = state.num_decisions + 1
        arm = ucb_choose(state.ucb_pulls, state.ucb_rewards, bucket, t, cfg.ucb_beta)
        return arm == 1, replace(state, num_decisions=t, last_choice=(bucket, arm))
    _, _, score = score_parts(block, span, draft, cfg)
    if cfg.policy == "score_threshold":
        return score_threshold(score, cfg.tau), state
    decision = score_hysteresis(state.hysteresis_on, score, cfg.tau_on, cfg.tau_off)
    return decision, replace(state, hysteresis_on=decision)


def score_parts(block: BlockState, span: Span, draft: Draft, cfg: DecodeConfig) -> tuple[list[float], int, float]:
    """The score policies' inputs and output: per-token acceptance estimates of the span, N_high, the score."""
    alpha = ESTIMATORS[cfg.estimator](draft.choices.rows(span.start, span.end), cfg)
    num_high = 0
    if cfg.score_type == "difference_dynamic":
        num_high = sum(1 for i in block.masked_offsets() if draft.confidence[i] > cfg.threshold)
    return alpha, num_high, verification_score(expected_accepted_length(alpha), num_high, cfg)


def explain(state: RouterState, block: BlockState, span: Span, draft: Draft, cfg: DecodeConfig) -> dict[str, Any]:
    """What a decision was based on, for traces (``state`` is the state :func:`route` returned): the policy, the
    estimator's per-token values, E[K], N_high and the score; the UCB bucket and arm; the skip_confident gate."""
    why: dict[str, Any] = {"policy": cfg.policy, "span_confident": span_is_confident(draft.confidence, span,
                                                                                     cfg.threshold)}
    alpha, num_high, score = score_parts(block, span, draft, cfg)
    why.update(estimator=cfg.estimator, alphas=[round(a, 6) for a in alpha],
               expected_accepted=round(expected_accepted_length(alpha), 6), n_high=num_high, score=round(score, 6))
    if cfg.policy == "contextual_bandit_ucb" and state.last_choice is not None:
        why.update(ucb_bucket=state.last_choice[0], ucb_arm=state.last_choice[1])
    return why


def observe(state: RouterState, num_committed: int, verified: bool) -> RouterState:
    """Credit the last UCB decision with reward = tokens committed / cost (2 forwards if verified, else 1)."""
    if state.last_choice is None:
        return state
    bucket, arm = state.last_choice
    assert arm == int(verified), "the step's verification must follow the UCB decision"
    i = 2 * bucket + arm
    pulls, rewards = list(state.ucb_pulls), list(state.ucb_rewards)
    pulls[i] += 1
    rewards[i] += num_committed / (2.0 if verified else 1.0)
    return replace(state, ucb_pulls=tuple(pulls), ucb_rewards=tuple(rewards), last_choice=None)
