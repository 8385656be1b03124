"""Task registry: ``task.type`` in the config names the class that builds the model, the batches, the
loss and the evaluation (see ``tasks/base.py`` for the contract)."""
from __future__ import annotations

from typing import Callable, Dict, Type

from moe_sys.tasks.base import Task
from moe_sys.tasks.lm import LMTask


def _metric() -> Type[Task]:
    from moe_sys.tasks.metric import MetricTask  # vision and metric code load only when asked for

    return MetricTask


def _multitask() -> Type[Task]:
    from moe_sys.tasks.multitask import MultitaskTask

    return MultitaskTask


TASKS: Dict[str, Callable[[], Type[Task]]] = {"lm": lambda: LMTask, "metric": _metric, "multitask": _multitask}


def build_task(cfg) -> Task:
    return TASKS[cfg.task.type]()(cfg)


__all__ = ["TASKS", "Task", "build_task"]
