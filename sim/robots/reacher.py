"""Reacher: a 2-link planar arm (manipulator) that moves its fingertip to a goal."""

import functools

import mujoco
import numpy as np

from sim.robots.base import GYMNASIUM_ASSETS, PhysicsState, Task, sensor_slice
from sim.robots.registry import register


@register
class Reacher(Task):
    name = "reacher"
    mjcf = GYMNASIUM_ASSETS / "reacher.xml"
    frame_skip = 2
    max_steps = 50
    payload_body = "fingertip"
    goal_dim = 2
    sensors = (
        ("fingertip_pos", mujoco.mjtSensor.mjSENS_FRAMEPOS, mujoco.mjtObj.mjOBJ_BODY, "fingertip"),
        ("target_pos", mujoco.mjtSensor.mjSENS_FRAMEPOS, mujoco.mjtObj.mjOBJ_BODY, "target"),
    )
    goal_radius = 0.2

    def sample_goal(self, rng):
        while True:
            goal = rng.uniform(-self.goal_radius, self.goal_radius, size=2)
            if np.linalg.norm(goal) < self.goal_radius:
                return goal

    def initial_state(self, rng, noise_scale, goal):
        m = self.model
        qpos = m.qpos0 + noise_scale * rng.uniform(-0.1, 0.1, size=m.nq)
        qpos[2:4] = self.sample_goal(rng) if goal is None else goal
        qvel = noise_scale * rng.uniform(-0.005, 0.005, size=m.nv)
        qvel[2:4] = 0.0
        return qpos, qvel

    @functools.cached_property
    def _sensor_slices(self) -> tuple[slice, slice]:
        return sensor_slice(self.model, "fingertip_pos"), sensor_slice(self.model, "target_pos")

    def _fingertip_to_target(self, state: PhysicsState) -> np.ndarray:
        tip, target = self._sensor_slices
        return state.sensordata[:, tip] - state.sensordata[:, target]

    def observe(self, state):
        arm = state.qpos[:, :2]
        delta = self._fingertip_to_target(state)[:, :2]
        obs = [np.cos(arm), np.sin(arm), state.qpos[:, 2:4], state.qvel[:, :2], delta]
        return np.concatenate(obs, axis=1).astype(np.float32)

    def reward_terms(self, before, after, action):
        return {
            "distance": -np.linalg.norm(self._fingertip_to_target(after), axis=1),
            "control": -np.square(action).sum(axis=1),
        }
