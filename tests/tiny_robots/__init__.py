"""Tiny robots of a user's own, defined as a ``robot_modules`` module would define them (docs/robots.md), their MJCF in
this file. Importing it registers nothing: a test uses them inside ``with registered():``, which takes them out
again (the registry is global, and other test files list every registered robot: golden trajectories, the
registry smoke tests).

* ``tiny_tilt``: a pendulum that observes cos(angle) (a tilt) and its rate, so no state has one
  observation: no observation->state map can exist, as for a robot whose observation is derived.
* ``tiny_touch``: the same pendulum with a touch sensor on its tip that never touches anything, so one
  observation is constant in all its data (as a planar arm's fingertip z is).
"""

import contextlib

import mujoco
import numpy as np

from sim.robots import Task
from sim.robots.registry import _TASKS, get_task

PENDULUM = """<mujoco><option timestep="0.01"/><worldbody>
<body name="pole"><joint name="hinge" type="hinge" axis="0 1 0" damping="0.1"/>
<geom type="capsule" fromto="0 0 0 0 0 0.3" size="0.02" mass="0.2"/></body></worldbody>
<actuator><motor name="m" joint="hinge" gear="1" ctrlrange="-1 1"/></actuator></mujoco>"""

TOUCH = PENDULUM.replace('mass="0.2"/>', 'mass="0.2"/><site name="tip" pos="0 0 0.3" size="0.03"/>').replace(
    "</mujoco>", '<sensor><touch name="tip" site="tip"/></sensor></mujoco>'
)


class _FromString(Task):
    xml = ""
    mjcf = "<in tests/tiny_robots.py>"

    def build_spec(self) -> mujoco.MjSpec:
        return mujoco.MjSpec.from_string(self.xml)


class TinyTilt(_FromString):
    name, xml, frame_skip, max_steps, payload_body = "tiny_tilt", PENDULUM, 2, 20, "pole"

    def observe(self, state):
        return np.concatenate([np.cos(state.qpos), state.qvel], 1).astype(np.float32)

    def reward_terms(self, before, after, action):
        return {"upright": np.cos(after.qpos[:, 0]), "ctrl": -0.01 * np.square(action).sum(1)}


class TinyTouch(TinyTilt):
    name, xml = "tiny_touch", TOUCH

    def observe(self, state):
        return np.concatenate([state.qpos, state.qvel, state.sensordata], 1).astype(np.float32)


ROBOTS = (TinyTilt, TinyTouch)


@contextlib.contextmanager
def registered():
    """The tiny robots registered for the block, unregistered after it."""
    for cls in ROBOTS:
        _TASKS[cls.name] = cls
    get_task.cache_clear()
    try:
        yield
    finally:
        for cls in ROBOTS:
            _TASKS.pop(cls.name, None)
        get_task.cache_clear()
