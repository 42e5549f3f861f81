"""The robot registry: name -> Task. Built-in robots register themselves on import of sim.robots.

Robots defined outside this project register the same way (``@register`` on a Task class) in a
module of their own package, which every process that meets the robot's name must import: the
driver, each Ray worker that simulates it, the robot agent, the benchmarks. The registry does it
itself, the first time a name is not found, from two places (docs/robots.md):

* the entry-point group ``flywheel.robots`` of installed distributions
  (``[project.entry-points."flywheel.robots"] my_arm = "my_pkg.robots"``): nothing to configure;
* the environment variable ``FLYWHEEL_ROBOT_MODULES`` (comma-separated module names), which the
  Hydra apps set from ``robot_modules`` and which Ray workers inherit (:func:`use_robot_modules`).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Iterable
from importlib.metadata import entry_points

from sim.robots.base import Task

ENTRY_POINT_GROUP = "flywheel.robots"
MODULES_ENV = "FLYWHEEL_ROBOT_MODULES"

_TASKS: dict[str, type[Task]] = {}
_IMPORTED: set[str] = set()


class RobotPluginError(ImportError):
    pass


class UnknownRobotError(KeyError):
    """No registered robot has this name (the message lists those that are)."""

    def __str__(self) -> str:  # the message itself, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


def register(task_cls: type[Task]) -> type[Task]:
    """Class decorator: make ``task_cls`` available as ``get_task(task_cls.name)``."""
    if task_cls.name in _TASKS and _TASKS[task_cls.name] is not task_cls:
        raise ValueError(f"robot {task_cls.name!r} is already registered by {_TASKS[task_cls.name].__qualname__}")
    _TASKS[task_cls.name] = task_cls
    return task_cls


def _env_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(MODULES_ENV, "").split(",") if m.strip()]


def load_robot_plugins(modules: Iterable[str] = ()) -> None:
    """Import ``modules``, those named in ``FLYWHEEL_ROBOT_MODULES`` and every ``flywheel.robots``
    entry point (once each), so the robots they register are known."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if f"ep:{ep.value}" not in _IMPORTED:
            try:
                ep.load()
            except Exception as exc:
                raise RobotPluginError(f"robot entry point {ep.name} = {ep.value!r} ({ENTRY_POINT_GROUP}) failed to load: {exc}") from exc
            _IMPORTED.add(f"ep:{ep.value}")
    for name in [*modules, *_env_modules()]:
        if name not in _IMPORTED:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise RobotPluginError(
                    f"robot module {name!r} could not be imported ({exc}); install its package or put it on PYTHONPATH "
                    f"(Ray workers on other machines need it too)"
                ) from exc
            _IMPORTED.add(name)


def use_robot_modules(modules: Iterable[str]) -> None:
    """Import ``modules`` here and name them in ``FLYWHEEL_ROBOT_MODULES`` for every process started
    from this one (local Ray workers inherit it; the services pass it to a remote cluster's)."""
    modules = [m for m in modules if m]
    load_robot_plugins(modules)
    merged = list(dict.fromkeys([*_env_modules(), *modules]))
    if merged:
        os.environ[MODULES_ENV] = ",".join(merged)


@functools.cache
def get_task(name: str) -> Task:
    """The (shared, stateless) task instance of robot ``name``."""
    if name not in _TASKS:
        load_robot_plugins()
    if name not in _TASKS:
        raise UnknownRobotError(
            f"unknown robot {name!r}; registered robots: {sorted(_TASKS)}. Register yours with @sim.robots.register in a module "
            f"named by the {ENTRY_POINT_GROUP!r} entry-point group or by {MODULES_ENV} / robot_modules (docs/robots.md)"
        )
    return _TASKS[name]()


def robot_names() -> list[str]:
    """Every robot: the built-in ones and those of robot plugins."""
    load_robot_plugins()
    return sorted(_TASKS)
