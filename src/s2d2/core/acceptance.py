"""Acceptance estimators: how likely the verifier is to accept each drafted span token, from the draft alone.

Each estimator maps the drafter's distribution over the span rows (``probs``, ``[n, V]``) and the confidence of the
drafted tokens (``confidence``, ``[n]``) to per-token acceptance probabilities ``alpha`` in [0, 1]. Routing reads
their expected accepted length ``E[K] = sum_k prod_{i<=k} alpha_i`` (reference §2.1). Entropies are normalised by
ln(V) of the full vocabulary, as in the reference, so ``soft_entropy_negexp`` stays in [1/e, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from s2d2.config import DecodeConfig


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of each row divided by ln(V); ``[n, V] -> [n]``."""
    entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)
    return entropy / math.log(probs.shape[-1])


def _margin(probs: torch.Tensor) -> torch.Tensor:
    top2 = torch.topk(probs, 2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def hard_margin_threshold(probs: torch.Tensor, confidence: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    """1 where the top-1 minus top-2 probability exceeds ``margin_threshold``, else 0."""
    return (_margin(probs) > cfg.margin_threshold).float()


def soft_entropy_negexp(probs: torch.Tensor, confidence: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    """exp(-entropy_temperature * H / ln V): the estimator the paper reports using."""
    return torch.exp(-cfg.entropy_temperature * normalized_entropy(probs))


def soft_renyi_2_entropy(probs: torch.Tensor, confidence: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    """sum_v p_v^2, the collision probability (exp of minus the Renyi-2 entropy)."""
    return probs.square().sum(dim=-1).clamp(0.0, 1.0)


def hard_entropy_threshold(probs: torch.Tensor, confidence: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    """1 where H / ln V is below ``entropy_threshold``, else 0."""
    return (normalized_entropy(probs) < cfg.entropy_threshold).float()


def soft_confidence_power(probs: torch.Tensor, confidence: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    """confidence ** confidence_power, the drafted token's own probability sharpened or flattened."""
    return confidence.clamp(0.0, 1.0).pow(cfg.confidence_power)


def soft_clipped_linear_margin(probs: torch.Tensor, confidence: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    """clip(margin_coef * (top-1 - top-2), 0, 1)."""
    return (cfg.margin_coef * _margin(probs)).clamp(0.0, 1.0)


Estimator = Callable[[torch.Tensor, torch.Tensor, DecodeConfig], torch.Tensor]

ESTIMATORS: dict[str, Estimator] = {
    "hard_margin_threshold": hard_margin_threshold,
    "soft_entropy_negexp": soft_entropy_negexp,
    "soft_renyi_2_entropy": soft_renyi_2_entropy,
    "hard_entropy_threshold": hard_entropy_threshold,
    "soft_confidence_power": soft_confidence_power,
    "soft_clipped_linear_margin": soft_clipped_linear_margin,
}


def expected_accepted_length(alpha: torch.Tensor) -> float:
    """E[K] = sum_k prod_{i<=k} alpha_i for a left-to-right acceptance chain; ``alpha``: ``[n]``."""
    return float(alpha.clamp(0.0, 1.0).cumprod(dim=0).sum())
