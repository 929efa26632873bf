"""Name -> method registry: the ``task`` key of a config picks the module that builds the run."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from medssl.errors import one_of

if TYPE_CHECKING:
    from medssl.run.harness import Task

# Imported on demand, so a script pays only for the method it runs.
TASKS: dict[str, str] = {
    "dino": "medssl.run.dino",
    "mae": "medssl.run.mae",
    "classification": "medssl.run.classification",
    "segmentation": "medssl.run.segmentation",
}


def get_task(name: str) -> Task:
    """The ``TASK`` object of the method ``name`` (one of ``TASKS``)."""
    return importlib.import_module(one_of("task", name, TASKS)).TASK


def import_tasks() -> None:
    """Import every task module (each registers its config schema)."""
    for module in TASKS.values():
        importlib.import_module(module)
