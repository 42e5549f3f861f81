"""Ant: a four-legged walker (legged) rewarded for forward speed while staying upright."""

import numpy as np

from sim.robots.base import GYMNASIUM_ASSETS, Task
from sim.robots.registry import register


@register
class Ant(Task):
    name = "ant"
    mjcf = GYMNASIUM_ASSETS / "ant.xml"
    frame_skip = 5
    max_steps = 1000
    payload_body = "torso"
    healthy_z = (0.2, 1.0)

    def observe(self, state):
        return np.concatenate([state.qpos[:, 2:], state.qvel], axis=1).astype(np.float32)

    def reward_terms(self, before, after, action):
        return {
            "forward": (after.qpos[:, 0] - before.qpos[:, 0]) / self.control_dt,
            "healthy": np.ones(action.shape[0]),
            "control": -0.5 * np.square(action).sum(axis=1),
        }

    def terminated(self, state):
        z = state.qpos[:, 2]
        finite = np.isfinite(state.qpos).all(axis=1) & np.isfinite(state.qvel).all(axis=1)
        return ~finite | (z < self.healthy_z[0]) | (z > self.healthy_z[1])
