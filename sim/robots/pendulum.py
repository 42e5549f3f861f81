"""Pendulum: a cart balancing an inverted pole; the fast task for learning tests."""

import numpy as np

from sim.robots.base import GYMNASIUM_ASSETS, Task
from sim.robots.registry import register


@register
class Pendulum(Task):
    name = "pendulum"
    mjcf = GYMNASIUM_ASSETS / "inverted_pendulum.xml"
    frame_skip = 2
    max_steps = 1000
    payload_body = "pole"
    max_angle = 0.2
    max_step_reward = 1.0  # the alive bonus: a return of max_steps cannot be beaten

    def initial_state(self, rng, noise_scale, goal):
        qpos, qvel = self._draw([rng], [noise_scale])
        return qpos[0], qvel[0]

    def initial_states(self, rngs, noise_scales, goals):
        if type(self).initial_state is not Pendulum.initial_state:  # a subclass's own start (a plugin robot): world by world
            return super().initial_states(rngs, noise_scales, goals)
        return self._draw(rngs, noise_scales)

    def _draw(self, rngs, noise_scales):
        """qpos0 + s * U(-0.01, 0.01) and qvel = s * U(-0.01, 0.01) for each world: one draw of nq + nv numbers from
        each generator (the same numbers as a draw of nq, then one of nv), the arithmetic batched."""
        m = self.model
        noise = np.array([rng.uniform(-0.01, 0.01, size=m.nq + m.nv) for rng in rngs]) * np.asarray(noise_scales, float)[:, None]
        return m.qpos0 + noise[:, : m.nq], noise[:, m.nq :]

    def observe(self, state):
        return np.concatenate([state.qpos, state.qvel], axis=1).astype(np.float32)

    def reward_terms(self, before, after, action):
        return {"alive": (~self.terminated(after)).astype(np.float64)}

    def terminated(self, state):
        finite = np.isfinite(state.qpos).all(axis=1) & np.isfinite(state.qvel).all(axis=1)
        return ~finite | (np.abs(state.qpos[:, 1]) > self.max_angle)
