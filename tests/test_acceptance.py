"""Acceptance estimators (s2d2.core.acceptance) on hand-built probability rows, and the expected accepted length.

Reference §2.1: entropies are normalised by ln V of the full vocabulary; E[K] = sum_k prod_{i<=k} alpha_i with alpha
clipped to [0, 1].
"""

from __future__ import annotations

import math

import pytest
import torch

from s2d2.config import DecodeConfig
from s2d2.core.acceptance import ESTIMATORS, READS, expected_accepted_length
from s2d2.core.sampling import FEATURES, Choices, describe, normalized_entropy

V = 4
ONE_HOT = [0.0, 0.0, 1.0, 0.0]
UNIFORM = [0.25] * V
HALF = [0.5, 0.5, 0.0, 0.0]  # entropy ln 2, normalised ln 2 / ln 4 = 0.5; contains zeros


def _alpha(name: str, rows: list[list[float]], confidence: list[float], **cfg_fields) -> torch.Tensor:
    """The estimator on hand-built rows, through the same host values decoding gives it (sampling.describe)."""
    probs = torch.tensor(rows)
    choices = describe(probs, probs.argmax(dim=-1), torch.tensor(confidence))
    return torch.tensor(ESTIMATORS[name](choices, DecodeConfig(**cfg_fields)))


def test_registry_matches_the_config_choices() -> None:
    from s2d2.config import ESTIMATORS as CONFIG_ESTIMATORS

    assert set(ESTIMATORS) == set(CONFIG_ESTIMATORS)
    assert len(ESTIMATORS) == 6


def _only(choices: Choices, features: frozenset[str]) -> Choices:
    return Choices(choices.tokens, choices.confidence, *(getattr(choices, f) if f in features else None
                                                         for f in FEATURES))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_each_estimator_reads_only_the_features_it_declares(name) -> None:
    """The executor computes only the features the step's rows read (READS, through routing.reads_features): an
    estimator given choices that hold only its declared features gives what it gives with all of them (reading an
    undeclared one fails on its None), and each declared feature is read (a declared one nobody reads would cost a
    pass over the vocabulary for nothing)."""
    probs = torch.softmax(torch.randn(6, 9, generator=torch.Generator().manual_seed(0)) * 2, dim=-1)
    full = describe(probs, probs.argmax(dim=-1))
    cfg = DecodeConfig()
    assert ESTIMATORS[name](_only(full, READS[name]), cfg) == ESTIMATORS[name](full, cfg)
    lean = describe(probs, probs.argmax(dim=-1), features=READS[name])
    assert lean == _only(full, READS[name]) and [f for f in FEATURES if getattr(lean, f) is not None] == sorted(
        READS[name], key=FEATURES.index)
    for feature in READS[name]:
        with pytest.raises(TypeError):
            ESTIMATORS[name](_only(full, READS[name] - {feature}), cfg)


# ------------------------------------------------------------------------------------------ normalized entropy


def test_normalized_entropy_one_hot_uniform_half() -> None:
    h = normalized_entropy(torch.tensor([ONE_HOT, UNIFORM, HALF]))
    assert h.shape == (3,)
    assert h[0].item() == 0.0
    assert h[1].item() == pytest.approx(1.0, abs=1e-6)
    assert h[2].item() == pytest.approx(0.5, abs=1e-6)


def test_normalized_entropy_uses_the_row_length_as_vocabulary() -> None:
    # uniform over 2 of 8 tokens: ln 2 / ln 8 = 1/3
    row = torch.tensor([[0.5, 0.5, 0, 0, 0, 0, 0, 0]])
    assert normalized_entropy(row).item() == pytest.approx(1 / 3, abs=1e-6)


# -------------------------------------------------------------------------------------------- one-hot rows


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_one_hot_rows_are_certain(name: str) -> None:
    # entropy 0, margin 1, collision probability 1, drafted-token confidence 1 -> alpha 1 for every estimator
    alpha = _alpha(name, [ONE_HOT, ONE_HOT], [1.0, 1.0])
    assert alpha.shape == (2,)
    assert alpha.tolist() == [1.0, 1.0]


# -------------------------------------------------------------------------------------------- uniform rows


@pytest.mark.parametrize(
    ("name", "fields", "expected"),
    [
        ("soft_entropy_negexp", {}, math.exp(-1.0)),  # normalised entropy 1, temperature 1
        ("soft_entropy_negexp", {"entropy_temperature": 2.0}, math.exp(-2.0)),
        ("soft_entropy_negexp", {"entropy_temperature": 0.0}, 1.0),
        ("soft_renyi_2_entropy", {}, 0.25),  # 1 / V
        ("hard_margin_threshold", {}, 0.0),  # margin 0
        ("hard_margin_threshold", {"margin_threshold": 0.0}, 0.0),  # 0 is not > 0
        ("soft_clipped_linear_margin", {"margin_coef": 100.0}, 0.0),
        ("hard_entropy_threshold", {}, 0.0),  # 1 is not < 0.5
        ("soft_confidence_power", {}, 0.25),  # confidence 1/4, power 1
        ("soft_confidence_power", {"confidence_power": 0.5}, 0.5),
    ],
)
def test_uniform_rows(name: str, fields: dict, expected: float) -> None:
    alpha = _alpha(name, [UNIFORM, UNIFORM, UNIFORM], [0.25, 0.25, 0.25], **fields)
    assert alpha.tolist() == pytest.approx([expected] * 3, abs=1e-6)


# ------------------------------------------------------------------------------------------ rows with zeros


@pytest.mark.parametrize(
    ("name", "fields", "expected"),
    [
        ("soft_entropy_negexp", {}, math.exp(-0.5)),
        ("soft_entropy_negexp", {"entropy_temperature": 3.0}, math.exp(-1.5)),
        ("soft_renyi_2_entropy", {}, 0.5),
        ("hard_margin_threshold", {}, 0.0),
        ("soft_clipped_linear_margin", {}, 0.0),
        ("hard_entropy_threshold", {"entropy_threshold": 0.6}, 1.0),
        ("hard_entropy_threshold", {"entropy_threshold": 0.4}, 0.0),
        ("soft_confidence_power", {}, 0.5),
    ],
)
def test_row_with_zeros_has_no_nan(name: str, fields: dict, expected: float) -> None:
    alpha = _alpha(name, [HALF], [0.5], **fields)
    assert not torch.isnan(alpha).any()
    assert alpha.item() == pytest.approx(expected, abs=1e-6)


def test_rows_are_independent() -> None:
    alpha = _alpha("soft_renyi_2_entropy", [ONE_HOT, UNIFORM, HALF], [1.0, 0.25, 0.5])
    assert alpha.tolist() == pytest.approx([1.0, 0.25, 0.5], abs=1e-6)
    alpha = _alpha("soft_entropy_negexp", [ONE_HOT, UNIFORM, HALF], [1.0, 0.25, 0.5])
    assert alpha.tolist() == pytest.approx([1.0, math.exp(-1.0), math.exp(-0.5)], abs=1e-6)


# --------------------------------------------------------------------------------------------- margin estimators

SKEWED = [0.7, 0.2, 0.1, 0.0]  # margin 0.5


@pytest.mark.parametrize(("threshold", "expected"), [(0.05, 1.0), (0.49, 1.0), (0.51, 0.0), (0.9, 0.0)])
def test_hard_margin_threshold(threshold: float, expected: float) -> None:
    assert _alpha("hard_margin_threshold", [SKEWED], [0.7], margin_threshold=threshold).item() == expected


@pytest.mark.parametrize(("coef", "expected"), [(1.0, 0.5), (0.5, 0.25), (1.8, 0.9), (2.0, 1.0), (3.0, 1.0), (0.0, 0.0)])
def test_clipped_linear_margin(coef: float, expected: float) -> None:
    alpha = _alpha("soft_clipped_linear_margin", [SKEWED], [0.7], margin_coef=coef)
    assert alpha.item() == pytest.approx(expected, abs=1e-6)


def test_margin_uses_top_two_wherever_they_are() -> None:
    # top-1 0.6 at index 3, top-2 0.3 at index 0: margin 0.3
    alpha = _alpha("soft_clipped_linear_margin", [[0.3, 0.05, 0.05, 0.6]], [0.6])
    assert alpha.item() == pytest.approx(0.3, abs=1e-6)


# ------------------------------------------------------------------------------------------- confidence power


@pytest.mark.parametrize(
    ("confidence", "power", "expected"),
    [
        (0.5, 1.0, 0.5),
        (0.5, 2.0, 0.25),
        (0.25, 0.5, 0.5),
        (0.5, 0.8, 2 ** -0.8),  # 0.574349...
        (0.81, 0.5, 0.9),
        (1.0, 3.0, 1.0),
        (0.0, 0.8, 0.0),
        (1.2, 1.0, 1.0),  # out-of-range confidence is clipped to [0, 1] first
        (-0.1, 1.0, 0.0),
    ],
)
def test_confidence_power(confidence: float, power: float, expected: float) -> None:
    # probs are irrelevant to this estimator: give it a uniform row that would mislead any entropy-based one
    alpha = _alpha("soft_confidence_power", [UNIFORM], [confidence], confidence_power=power)
    assert alpha.item() == pytest.approx(expected, abs=1e-6)


def test_soft_entropy_negexp_lies_in_its_range() -> None:
    # alpha in [1/e, 1] at temperature 1 for any distribution
    rows = torch.softmax(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    alpha = _alpha("soft_entropy_negexp", rows.tolist(), rows.max(dim=-1).values.tolist())
    assert float(alpha.min()) >= math.exp(-1.0) - 1e-6
    assert float(alpha.max()) <= 1.0


# ----------------------------------------------------------------------------------- expected accepted length


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        ([1.0, 1.0, 1.0], 3.0),
        ([0.5, 0.5], 0.75),  # 0.5 + 0.25
        ([1.0, 0.0, 1.0], 1.0),  # the chain stops at the first zero
        ([0.0, 1.0, 1.0], 0.0),
        ([0.9, 0.8], 1.62),  # 0.9 + 0.72
        ([0.5, 1.0, 0.5], 1.25),  # 0.5 + 0.5 + 0.25
        ([1.0], 1.0),
        ([], 0.0),
        ([1.5, 2.0], 2.0),  # clipped to [1, 1]
        ([-0.5, 1.0], 0.0),  # clipped to [0, 1]
        ([0.5, 1.2, 0.5], 1.25),  # clipped to [0.5, 1, 0.5]
        ([1.0, -3.0, 1.0], 1.0),
    ],
)
def test_expected_accepted_length(alpha: list[float], expected: float) -> None:
    result = expected_accepted_length(alpha)
    assert isinstance(result, float)
    assert result == pytest.approx(expected, abs=1e-6)
