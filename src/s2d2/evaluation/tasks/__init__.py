"""Seeded synthetic tasks for training and evaluating small block-diffusion models.

Each task module offers ``SPLITS``, ``generate(split, n, seed)`` (problems with ``prompt``, ``target``, ``answer``
and ``level``) and ``is_correct(problem, text)``: ``arith`` (20 templates, the bundled model's training task) and
``wordy`` (a compositional grammar with held-out productions and a ``generalisation`` split).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from s2d2.errors import ConfigError

TASKS = ("arith", "wordy")


def task_module(name: str, split: str | None = None) -> ModuleType:
    """The module of task ``name`` (one of :data:`TASKS`); with ``split``, also checks that the task has it."""
    if name not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}; got {name!r}.")
    module = importlib.import_module(f"s2d2.evaluation.tasks.{name}")
    if split is not None and split not in module.SPLITS:
        raise ConfigError(f"task {name} has the splits {', '.join(module.SPLITS)}; got {split!r}.")
    return module
