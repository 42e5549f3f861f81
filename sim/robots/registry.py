"""The robot registry: name -> Task. Built-in robots register themselves on import of sim.robots."""

from __future__ import annotations

import functools

from sim.robots.base import Task

_TASKS: dict[str, type[Task]] = {}


def register(task_cls: type[Task]) -> type[Task]:
    """Class decorator: make ``task_cls`` available as ``get_task(task_cls.name)``."""
    if task_cls.name in _TASKS and _TASKS[task_cls.name] is not task_cls:
        raise ValueError(f"robot {task_cls.name!r} is already registered by {_TASKS[task_cls.name].__qualname__}")
    _TASKS[task_cls.name] = task_cls
    return task_cls


@functools.cache
def get_task(name: str) -> Task:
    """The (shared, stateless) task instance of robot ``name``."""
    if name not in _TASKS:
        raise KeyError(f"unknown robot {name!r}; registered robots: {sorted(_TASKS)} (add one with sim.robots.register)")
    return _TASKS[name]()


def robot_names() -> list[str]:
    return sorted(_TASKS)
