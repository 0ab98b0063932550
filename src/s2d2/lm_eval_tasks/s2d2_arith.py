"""Data of the ``s2d2_arith`` lm-eval task: the arith test split, generated (no download, no files)."""

from __future__ import annotations

from typing import Any


def load(num_problems: int = 500, **_: Any) -> Any:  # -> datasets.DatasetDict
    """The first ``num_problems`` test problems of ``s2d2.tasks.arith`` (seed 0) as a DatasetDict with a test
    split; extra keyword arguments (lm-eval passes the task's metadata) are ignored."""
    import datasets

    from s2d2.tasks import arith

    rows = [{"prompt": p.prompt, "target": p.target, "answer": str(p.answer), "level": p.level,
             "template": p.template} for p in arith.generate("test", int(num_problems), seed=0)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
