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

import numpy as np

from sim.robots.base import PhysicsState, Task

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
            except Exception as exc:  # the module was found and raised while it ran: its own error, named as such
                raise RobotPluginError(
                    f"robot module {name!r} could not be imported ({type(exc).__name__}: {exc}); it raised while importing: "
                    "fix it (its traceback is chained below this error)"
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
    task = _TASKS[name]()
    check_task(task)
    return task


class RobotDefinitionError(ValueError):
    """A registered robot's MJCF or Task methods do not fit the interface (sim/robots/base.py); the message says what."""


def check_task(task: Task) -> None:
    """Try ``task``'s model and methods once on two worlds at rest; :class:`RobotDefinitionError` naming the robot,
    the method and the fix where one does not fit (instead of a numpy error deep in a stepper or a Ray actor)."""
    name = getattr(task, "name", type(task).__name__)

    def bad(what: str) -> RobotDefinitionError:
        return RobotDefinitionError(f"robot {name!r} ({type(task).__module__}.{type(task).__qualname__}): {what} (docs/robots.md)")

    try:
        m = task.model
    except Exception as exc:  # a missing file, an MJCF error
        raise bad(f"its MJCF {getattr(task, 'mjcf', None)} does not compile: {exc}") from None
    unlimited = [m.actuator(i).name or str(i) for i in range(m.nu) if not m.actuator_ctrllimited[i] or m.actuator_ctrlrange[i, 0] >= m.actuator_ctrlrange[i, 1]]
    if unlimited:
        raise bad(f"actuator(s) {unlimited} have no ctrlrange; give each a ctrlrange in the MJCF (actions in [-1, 1] map onto it, so an actuator without one never moves)")
    if m.nu == 0:
        raise bad("the model has no actuators")
    try:
        m.body(task.payload_body)
    except AttributeError:
        raise bad("it sets no payload_body (the body a heavy-payload profile loads)") from None
    except KeyError:
        raise bad(f"payload_body {task.payload_body!r} is not a body of its MJCF; bodies: {[m.body(i).name for i in range(1, m.nbody)]}") from None
    if m.body_weldid[m.body(task.payload_body).id] == 0:  # the world, or a body fixed to it: a payload there changes nothing
        moving = [m.body(i).name for i in range(1, m.nbody) if m.body_weldid[i] != 0]
        raise bad(
            f"payload_body {task.payload_body!r} is {'the world' if m.body(task.payload_body).id == 0 else 'fixed to the world'}, so a "
            f"heavy-payload profile's mass there would change nothing; name the moving body that carries a load (the hand, the torso): one of {moving}"
        )
    rng = np.random.default_rng(0)
    try:
        qpos, qvel = task.initial_state(rng, 1.0, task.sample_goal(rng))
    except NotImplementedError:
        raise bad("initial_state is not implemented") from None
    if np.shape(qpos) != (m.nq,) or np.shape(qvel) != (m.nv,):
        raise bad(f"initial_state returned qpos {np.shape(qpos)} and qvel {np.shape(qvel)}; it must return (nq,) = ({m.nq},) and (nv,) = ({m.nv},)")
    for n in (2, 1):  # one world too: a .squeeze() passes with two
        _check_methods(task, PhysicsState(np.tile(qpos, (n, 1)), np.tile(qvel, (n, 1)), np.zeros((n, m.nsensordata))), bad)


def _check_methods(task: Task, state: PhysicsState, bad) -> None:
    """observe, reward_terms and terminated of ``task`` on ``state``'s N worlds: shapes and dtypes, or ``bad(...)``."""
    n, nu = len(state.qpos), task.model.nu
    for method, call, want in (
        ("observe", lambda: task.observe(state), "a float array (N, obs_dim)"),
        ("reward_terms", lambda: task.reward_terms(state, state, np.zeros((n, nu), np.float32)), "a non-empty dict of (N,) float arrays"),
        ("terminated", lambda: task.terminated(state), "an (N,) bool array"),
    ):
        try:
            out = call()
        except NotImplementedError:
            raise bad(f"{method} is not implemented: it must return {want}") from None
        if method == "observe":
            ok = isinstance(out, np.ndarray) and out.ndim == 2 and out.shape[0] == n and out.shape[1] >= 1 and np.issubdtype(out.dtype, np.floating)
        elif method == "reward_terms":
            ok = isinstance(out, dict) and bool(out) and all(isinstance(v, np.ndarray) and v.shape == (n,) and np.issubdtype(v.dtype, np.number) for v in out.values())
        else:
            ok = isinstance(out, np.ndarray) and out.shape == (n,)
        if not ok:
            seen = {k: _described(v) for k, v in out.items()} if isinstance(out, dict) else _described(out)
            raise bad(f"{method} on {n} world(s) returned {seen}; it must return {want} (N = {n} here)")


def _described(value) -> str:
    return f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__


def robot_names() -> list[str]:
    """Every robot: the built-in ones and those of robot plugins."""
    load_robot_plugins()
    return sorted(_TASKS)
