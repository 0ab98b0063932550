"""The ``slow`` marker and how a parametrized sweep is split by cost.

``make check`` (the fast set) runs every test not marked slow; ``make test`` (CI) runs everything. A sweep over a
cross product (families x settings) keeps a covering subset in the fast set, every family and every setting at
least once, and marks the rest slow: a developer's quick run still touches each kind of case, CI runs them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

SLOW = pytest.mark.slow


def cover(cases: Sequence[Any], ids: Sequence[str], *keys: Callable[[Any], Any]) -> list[Any]:
    """``cases`` as ``pytest.param``s named ``ids``, all marked slow except a few that together show every value
    of every key (e.g. the family, the setting) at least once. Cases that bring a new value on every key are taken
    first, so the fast subset stays near the larger key's number of values."""
    seen: list[set[Any]] = [set() for _ in keys]
    fast: set[int] = set()
    for need in (len(keys), 1):
        for k, case in enumerate(cases):
            values = [key(case) for key in keys]
            if k not in fast and sum(v not in s for v, s in zip(values, seen)) >= need:
                fast.add(k)
                for v, s in zip(values, seen):
                    s.add(v)
    return [pytest.param(*(case if isinstance(case, tuple) else (case,)), id=i, marks=() if k in fast else SLOW)
            for k, (case, i) in enumerate(zip(cases, ids))]
