"""Accuracy with decoding statistics on a task whose answers can be checked (``s2d2 eval``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from s2d2.api import Model
from s2d2.config import DEFAULT_BATCH_SIZE, DecodeConfig
from s2d2.core.stats import DecodeStats
from s2d2.errors import ConfigError
from s2d2.evaluation.distributed import DataParallel
from s2d2.evaluation.tasks import TASKS, task_module

__all__ = ["TASKS", "EvalResult", "evaluate"]


@dataclass
class EvalResult:
    """Accuracy over ``n`` problems, per difficulty level, and the decoding stats summed over them."""

    task: str
    n: int
    accuracy: float
    accuracy_by_level: dict[int, float]
    stats: DecodeStats
    # one record per problem: its index, level, reference answer, the generated text, whether it is correct, the
    # finish reason and the row's own counters (NFE, tokens, ...), which do not depend on the batch size
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "accuracy": self.accuracy, "n": self.n,
                "accuracy_by_level": {str(k): v for k, v in self.accuracy_by_level.items()},
                "stats": self.stats.to_dict()}


def evaluate(model: Model, cfg: DecodeConfig, task: str = "arith", n: int = 500, split: str = "test",
             batch_size: int | str = DEFAULT_BATCH_SIZE, dp: DataParallel | None = None,
             progress: bool = False) -> EvalResult:
    """Decode the first ``n`` problems of ``split`` with ``cfg`` (``batch_size`` at a time) and score the answers;
    with ``dp`` each rank of a data-parallel job decodes its shard and every rank gets the whole result.
    ``progress``: a bar of decoded problems on stderr."""
    dp = dp or DataParallel()
    module = task_module(task, split)
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}.")
    problems = module.generate(split, n, seed=0)
    outs = dp.generate(model, [p.prompt for p in problems], cfg, batch_size,
                       progress=f"{task} {split}" if progress else False)
    correct = [module.is_correct(p, o.text) for p, o in zip(problems, outs)]
    levels: dict[int, list[bool]] = {}
    for p, ok in zip(problems, correct):
        levels.setdefault(p.level, []).append(ok)
    stats = dp.summed_stats(model, outs)
    samples = [{"index": i, "level": p.level, "answer": p.answer, "text": o.text, "correct": ok,
                "finish_reason": o.finish_reason, **_row_counters(o.stats)}
               for i, (p, o, ok) in enumerate(zip(problems, outs, correct))]
    return EvalResult(task, n, sum(correct) / n, {k: sum(v) / len(v) for k, v in sorted(levels.items())}, stats,
                      samples)


def _row_counters(stats: DecodeStats) -> dict[str, Any]:
    """A row's exact counters (time figures left out: they are not a property of the row alone in a batch)."""
    return {k: v for k, v in stats.to_dict().items() if "time" not in k and k != "tokens_per_s"}
