"""Acceptance estimators: how likely the verifier is to accept each drafted span token, from the draft alone.

Each estimator maps the drafter's distributions over the span rows, as :class:`~s2d2.core.sampling.Choices` (the
drafted tokens' confidence, each row's normalised entropy, top-1/top-2 margin and collision probability, host
values computed once per forward for the whole batch), to per-token acceptance probabilities ``alpha`` in [0, 1].
Routing reads their expected accepted length ``E[K] = sum_k prod_{i<=k} alpha_i`` (reference §2.1). Entropies are
normalised by ln(V) of the full vocabulary, as in the reference, so ``soft_entropy_negexp`` stays in [1/e, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable

from s2d2.config import DecodeConfig
from s2d2.core.sampling import Choices


def _unit(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def hard_margin_threshold(rows: Choices, cfg: DecodeConfig) -> list[float]:
    """1 where the top-1 minus top-2 probability exceeds ``margin_threshold``, else 0."""
    return [float(m > cfg.margin_threshold) for m in rows.margin]


def soft_entropy_negexp(rows: Choices, cfg: DecodeConfig) -> list[float]:
    """exp(-entropy_temperature * H / ln V): the estimator the paper reports using."""
    return [math.exp(-cfg.entropy_temperature * h) for h in rows.entropy]


def soft_renyi_2_entropy(rows: Choices, cfg: DecodeConfig) -> list[float]:
    """sum_v p_v^2, the collision probability (exp of minus the Renyi-2 entropy)."""
    return [_unit(c) for c in rows.collision]


def hard_entropy_threshold(rows: Choices, cfg: DecodeConfig) -> list[float]:
    """1 where H / ln V is below ``entropy_threshold``, else 0."""
    return [float(h < cfg.entropy_threshold) for h in rows.entropy]


def soft_confidence_power(rows: Choices, cfg: DecodeConfig) -> list[float]:
    """confidence ** confidence_power, the drafted token's own probability sharpened or flattened."""
    return [_unit(c) ** cfg.confidence_power for c in rows.confidence]


def soft_clipped_linear_margin(rows: Choices, cfg: DecodeConfig) -> list[float]:
    """clip(margin_coef * (top-1 - top-2), 0, 1)."""
    return [_unit(cfg.margin_coef * m) for m in rows.margin]


Estimator = Callable[[Choices, DecodeConfig], list[float]]

ESTIMATORS: dict[str, Estimator] = {
    "hard_margin_threshold": hard_margin_threshold,
    "soft_entropy_negexp": soft_entropy_negexp,
    "soft_renyi_2_entropy": soft_renyi_2_entropy,
    "hard_entropy_threshold": hard_entropy_threshold,
    "soft_confidence_power": soft_confidence_power,
    "soft_clipped_linear_margin": soft_clipped_linear_margin,
}

# the distribution features (:data:`s2d2.core.sampling.FEATURES`) each estimator reads: the executor computes only
# those a step's rows read (a test runs every estimator on choices holding only its own)
READS: dict[str, frozenset[str]] = {
    "hard_margin_threshold": frozenset({"margin"}),
    "soft_entropy_negexp": frozenset({"entropy"}),
    "soft_renyi_2_entropy": frozenset({"collision"}),
    "hard_entropy_threshold": frozenset({"entropy"}),
    "soft_confidence_power": frozenset(),
    "soft_clipped_linear_margin": frozenset({"margin"}),
}


def expected_accepted_length(alpha: list[float]) -> float:
    """E[K] = sum_k prod_{i<=k} alpha_i for a left-to-right acceptance chain."""
    total, chain = 0.0, 1.0
    for a in alpha:
        chain *= _unit(a)
        total += chain
    return total
