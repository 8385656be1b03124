"""Task registry: ``task.type`` in the config names the class that builds the model, the batches, the
loss and the evaluation (see ``tasks/base.py`` for the contract)."""
from __future__ import annotations

from typing import Dict, Type

from moe_sys.tasks.base import Task
from moe_sys.tasks.lm import LMTask

TASKS: Dict[str, Type[Task]] = {"lm": LMTask}


def build_task(cfg) -> Task:
    return TASKS[cfg.task.type](cfg)


__all__ = ["TASKS", "Task", "build_task"]
