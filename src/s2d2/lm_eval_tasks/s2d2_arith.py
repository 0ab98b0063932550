"""Data of the ``s2d2_arith`` lm-eval task: the arith test split, generated (no download, no files)."""

from __future__ import annotations

from typing import Any


def load(num_problems: int = 500, **_: Any) -> Any:  # -> datasets.DatasetDict
    """The first ``num_problems`` test and validation problems of ``s2d2.tasks.arith`` (seed 0) as a DatasetDict
    (lm-eval scores the test split; ``s2d2 tune --lm-eval-task`` the validation one); extra keyword arguments (lm-eval
    passes the task's metadata) are ignored."""
    import datasets

    from s2d2.tasks import arith

    def rows(split: str) -> list[dict[str, Any]]:
        return [{"prompt": p.prompt, "target": p.target, "answer": str(p.answer), "level": p.level,
                 "template": p.template} for p in arith.generate(split, int(num_problems), seed=0)]

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows(split)) for split in ("test", "validation")})


def load_choices(num_problems: int = 500, num_choices: int = 4, **_: Any) -> Any:  # -> datasets.DatasetDict
    """The same test problems as multiple choice: the worked solution with its true final answer among solutions
    whose final answer is off (by +1, -1, +10, ...), in a seeded order; ``label`` is the true one's index."""
    import random

    import datasets

    from s2d2.tasks import arith

    rng = random.Random(0)
    rows = []
    for p in arith.generate("test", int(num_problems), seed=0):
        work = p.target[: p.target.rindex("####")]
        wrong = [p.answer + d for d in (1, -1, 10, -10, 2, -2) if p.answer + d >= 0][: int(num_choices) - 1]
        answers = [p.answer, *wrong]
        rng.shuffle(answers)
        rows.append({"prompt": p.prompt, "choices": [f"{work}#### {a}" for a in answers],
                     "label": answers.index(p.answer), "level": p.level})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
