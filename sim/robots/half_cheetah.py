"""HalfCheetah: a planar two-legged runner (legged), the standard locomotion benchmark."""

import numpy as np

from sim.robots.base import GYMNASIUM_ASSETS, Task
from sim.robots.registry import register


@register
class HalfCheetah(Task):
    name = "half_cheetah"
    mjcf = GYMNASIUM_ASSETS / "half_cheetah.xml"
    frame_skip = 5
    max_steps = 1000
    payload_body = "torso"

    def observe(self, state):
        return np.concatenate([state.qpos[:, 1:], state.qvel], axis=1).astype(np.float32)

    def reward_terms(self, before, after, action):
        return {
            "forward": (after.qpos[:, 0] - before.qpos[:, 0]) / self.control_dt,
            "control": -0.1 * np.square(action).sum(axis=1),
        }
