"""Base (non-verifying) unmasking strategies: which masked offsets a diffusion step commits.

Pure functions over host-side lists. ``static`` commits exactly the step quota, most confident first;
``dynamic`` commits every candidate above the confidence threshold when there are at least ``k`` of them,
otherwise the ``k`` most confident (reference §3, ``low_confidence_static`` / ``low_confidence_dynamic``).
Candidates are only masked offsets, so a committed token is never overwritten (the reference baseline's bug 7.5).
"""

from __future__ import annotations


def step_quotas(block_size: int, steps: int) -> list[int]:
    """Minimum tokens per step: ``block_size // steps`` each, one more for the first ``block_size % steps``."""
    base, extra = divmod(block_size, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


def most_confident(candidates: list[int], confidence: tuple[float, ...], k: int) -> list[int]:
    """The ``k`` candidates of highest confidence (ties: the left-most first)."""
    return sorted(candidates, key=lambda i: -confidence[i])[:k]


def select_static(candidates: list[int], confidence: tuple[float, ...], k: int) -> list[int]:
    """Exactly ``min(k, len(candidates))`` offsets, most confident first."""
    return most_confident(candidates, confidence, k)


def select_dynamic(candidates: list[int], confidence: tuple[float, ...], k: int, threshold: float) -> list[int]:
    """Every candidate with confidence > ``threshold`` if at least ``k`` qualify, else the ``k`` most confident."""
    confident = [i for i in candidates if confidence[i] > threshold]
    return confident if len(confident) >= min(k, len(candidates)) else most_confident(candidates, confidence, k)


def select(strategy: str, candidates: list[int], confidence: tuple[float, ...], k: int, threshold: float) -> list[int]:
    """Dispatch on the strategy name (``"static"`` or ``"dynamic"``)."""
    if strategy == "dynamic":
        return select_dynamic(candidates, confidence, k, threshold)
    return select_static(candidates, confidence, k)
