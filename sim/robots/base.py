"""The robot task interface: what a robot observes, is rewarded for, and when its episode ends.

A task is stateless and vectorised: every method takes a batch of N worlds' physics state
and returns arrays with N on axis 0, so the batched stepper and the single gymnasium env
share one implementation. A user adds a robot with an MJCF path plus one small Task
subclass registered with :func:`sim.robots.registry.register`; nothing else changes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import mujoco
import numpy as np

GYMNASIUM_ASSETS = Path(__import__("gymnasium").__file__).parent / "envs" / "mujoco" / "assets"


@dataclasses.dataclass(frozen=True)
class PhysicsState:
    """A batch of N worlds' state after a control step.

    qpos: (N, nq), qvel: (N, nv), sensordata: (N, nsensordata).
    """

    qpos: np.ndarray
    qvel: np.ndarray
    sensordata: np.ndarray


class Task:
    """Base class of a robot task. Subclasses set the class attributes and the four methods.

    Actions given to a task's robot are normalised to [-1, 1] per actuator; the stepper maps
    them onto each actuator's ctrlrange.
    """

    name: ClassVar[str]
    mjcf: ClassVar[Path]
    frame_skip: ClassVar[int]  # physics substeps per control step
    max_steps: ClassVar[int]  # time limit in control steps (truncation)
    payload_body: ClassVar[str]  # body that carries a variation profile's payload
    goal_dim: ClassVar[int] = 0  # length of a scenario goal (0: the task has none)
    max_step_reward: ClassVar[float | None] = None  # an upper bound on one step's reward, where the task has one
    # sensors added to the MJCF: (name, mjtSensor, mjtObj, object name)
    sensors: ClassVar[tuple[tuple[str, int, int, str], ...]] = ()

    # -- model --------------------------------------------------------------------------
    def build_spec(self) -> mujoco.MjSpec:
        spec = mujoco.MjSpec.from_file(str(self.mjcf))
        for name, sensor_type, obj_type, obj_name in self.sensors:
            spec.add_sensor(name=name, type=sensor_type, objtype=obj_type, objname=obj_name)
        return spec

    @functools.cached_property
    def model(self) -> mujoco.MjModel:
        """The nominal compiled model (treat as read-only; variations copy it)."""
        spec = self.build_spec()
        total_mass = spec.compiler.settotalmass  # deprecated compiler attribute (half_cheetah.xml uses it)
        spec.compiler.settotalmass = -1
        model = spec.compile()
        if total_mass > 0:  # what MuJoCo advises instead: rescale the compiled model
            mujoco.mj_setTotalmass(model, total_mass)
            mujoco.mj_setConst(model, mujoco.MjData(model))
        return model

    @property
    def control_dt(self) -> float:
        return float(self.model.opt.timestep * self.frame_skip)

    @property
    def act_dim(self) -> int:
        return int(self.model.nu)

    @functools.cached_property
    def obs_dim(self) -> int:
        m = self.model
        state = PhysicsState(m.qpos0[None].copy(), np.zeros((1, m.nv)), np.zeros((1, m.nsensordata)))
        return int(self.observe(state).shape[1])

    # -- behaviour (vectorised over N worlds) ---------------------------------------------
    reset_qpos_noise: ClassVar[float] = 0.1  # default reset: qpos0 + U(-a, a), qvel = b * N(0, 1)
    reset_qvel_noise: ClassVar[float] = 0.1

    def initial_state(self, rng: np.random.Generator, noise_scale: float, goal: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Sample one world's (qpos (nq,), qvel (nv,)) at reset; ``goal`` (goal_dim,) when given.

        Default: the rest pose plus uniform position noise and Gaussian velocity noise (gymnasium's
        locomotion resets), scaled by the scenario's ``noise_scale``.
        """
        m = self.model
        qpos = m.qpos0 + noise_scale * rng.uniform(-self.reset_qpos_noise, self.reset_qpos_noise, size=m.nq)
        qvel = noise_scale * self.reset_qvel_noise * rng.standard_normal(m.nv)
        return qpos, qvel

    def initial_states(
        self, rngs: Sequence[np.random.Generator], noise_scales: Sequence[float], goals: Sequence[np.ndarray | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`initial_state` of n worlds at once, world i drawing from ``rngs[i]``: (qpos (n, nq), qvel (n, nv)).
        The batched stepper's resets call this; a task may override it with a vectorised one that draws the same
        numbers in the same order from each world's generator, so that its episodes stay the same."""
        m = self.model
        qpos, qvel = np.empty((len(rngs), m.nq)), np.empty((len(rngs), m.nv))
        for i, (rng, scale, goal) in enumerate(zip(rngs, noise_scales, goals, strict=True)):
            qpos[i], qvel[i] = self.initial_state(rng, scale, goal)
        return qpos, qvel

    def sample_goal(self, rng: np.random.Generator) -> np.ndarray | None:
        """A random goal (goal_dim,), or None for tasks without one."""
        return None

    def observe(self, state: PhysicsState) -> np.ndarray:
        """Observation (N, obs_dim) float32."""
        raise NotImplementedError

    def reward_terms(self, before: PhysicsState, after: PhysicsState, action: np.ndarray) -> dict[str, np.ndarray]:
        """Named reward terms, each (N,); the reward is their sum. ``action``: (N, act_dim) in [-1, 1]."""
        raise NotImplementedError

    def terminated(self, state: PhysicsState) -> np.ndarray:
        """(N,) bool: the task truly ended (fell, reached an unrecoverable state)."""
        return np.zeros(state.qpos.shape[0], dtype=bool)


def sensor_slice(model: mujoco.MjModel, name: str) -> slice:
    """The slice of ``sensordata`` that holds sensor ``name``."""
    sensor = model.sensor(name)
    return slice(int(sensor.adr[0]), int(sensor.adr[0] + sensor.dim[0]))
