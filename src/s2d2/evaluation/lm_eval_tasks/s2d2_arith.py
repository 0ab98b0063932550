"""Data of the s2d2 lm-eval tasks (``s2d2_arith``, ``s2d2_arith_mc``, ``s2d2_wordy``,
``s2d2_wordy_generalisation``): splits of the package's word-problem tasks, generated (no download, no files)."""

from __future__ import annotations

from typing import Any


def load(num_problems: int = 500, task: str = "arith", split: str = "test", **_: Any) -> Any:  # -> DatasetDict
    """The first ``num_problems`` problems (seed 0) of ``split`` of ``s2d2.evaluation.tasks.<task>`` as the DatasetDict's
    ``test`` split (what lm-eval scores; ``s2d2 eval --task <task> --split <split>`` decodes the same problems in the
    same order) and of the task's validation split as ``validation`` (``s2d2 tune --task lm-eval:NAME``); the task's
    yaml sets ``task`` and ``split`` in its metadata, which lm-eval passes here with its other fields (ignored)."""
    import datasets

    from s2d2.evaluation.tasks import task_module

    module = task_module(task, split)

    def rows(name: str) -> list[dict[str, Any]]:
        return [{"prompt": p.prompt, "target": p.target, "answer": str(p.answer), "level": p.level,
                 "template": p.template} for p in module.generate(name, int(num_problems), seed=0)]

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows(split)),
                                 "validation": datasets.Dataset.from_list(rows("validation"))})


def load_choices(num_problems: int = 500, num_choices: int = 4, **_: Any) -> Any:  # -> datasets.DatasetDict
    """The same test problems as multiple choice: the worked solution with its true final answer among solutions
    whose final answer is off (by +1, -1, +10, ...), in a seeded order; ``label`` is the true one's index."""
    import random

    import datasets

    from s2d2.evaluation.tasks import arith

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
