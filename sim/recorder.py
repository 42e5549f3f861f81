"""Per-world episode buffers for the batched stepper: vectorised writes, one copy per finished episode."""

from __future__ import annotations

import numpy as np

from sim.episode import Episode


class EpisodeRecorder:
    """Time-major buffers of N worlds' current episodes.

    Writes are vectorised over worlds (one numpy call per step, not one per world); an
    episode is copied out only when it finishes. Memory: N * (max_steps + 1) * (obs_dim +
    act_dim + nq + nv + 2) * 4 bytes.
    """

    def __init__(self, num_worlds: int, max_steps: int, obs_dim: int, act_dim: int, nq: int, nv: int, dt: float):
        n, t = num_worlds, max_steps
        self.max_steps, self.dt = max_steps, dt
        self.obs = np.zeros((n, t + 1, obs_dim), np.float32)
        self.qpos = np.zeros((n, t + 1, nq), np.float32)
        self.qvel = np.zeros((n, t + 1, nv), np.float32)
        self.action = np.zeros((n, t, act_dim), np.float32)
        self.reward = np.zeros((n, t), np.float32)
        self._timestamp = np.arange(t + 1, dtype=np.float64) * dt

    def grown(self, max_steps: int) -> EpisodeRecorder:
        """A recorder for episodes of up to ``max_steps`` steps holding this one's episodes in progress."""
        n, t1, obs_dim = self.obs.shape
        bigger = EpisodeRecorder(n, max_steps, obs_dim, self.action.shape[2], self.qpos.shape[2], self.qvel.shape[2], self.dt)
        for name in ("obs", "qpos", "qvel", "action", "reward"):
            old = getattr(self, name)
            getattr(bigger, name)[:, : old.shape[1]] = old
        return bigger

    def begin(self, worlds, obs: np.ndarray, qpos: np.ndarray, qvel: np.ndarray) -> None:
        """Worlds ``worlds`` start new episodes at ``obs`` (one row per world)."""
        self.obs[worlds, 0], self.qpos[worlds, 0], self.qvel[worlds, 0] = obs, qpos, qvel

    def record(self, worlds, steps, action, reward, next_obs, qpos, qvel) -> None:
        """Step ``steps[i]`` of world ``worlds[i]`` took ``action[i]`` and led to ``next_obs[i]``."""
        self.action[worlds, steps] = action
        self.reward[worlds, steps] = reward
        self.obs[worlds, steps + 1] = next_obs
        self.qpos[worlds, steps + 1] = qpos
        self.qvel[worlds, steps + 1] = qvel

    def finish(self, world: int, num_steps: int, terminated: bool, metadata: dict[str, str]) -> Episode:
        """Copy world ``world``'s finished episode of ``num_steps`` steps out as an Episode.

        The arrays are built here with their schema dtypes and shapes from finite physics, and
        ``metadata`` is complete, so the record skips :meth:`Episode.validate` (a trusted
        producer, as the store's reader is; the server validates everything it receives).
        """
        t = num_steps
        term, trunc = np.zeros(t, bool), np.zeros(t, bool)
        (term if terminated else trunc)[-1] = True
        return Episode(
            observation=self.obs[world, : t + 1].copy(),
            action=self.action[world, :t].copy(),
            reward=self.reward[world, :t].copy(),
            terminated=term,
            truncated=trunc,
            timestamp=self._timestamp[: t + 1].copy(),
            metadata=metadata,
            extras={"qpos": self.qpos[world, : t + 1].copy(), "qvel": self.qvel[world, : t + 1].copy()},
        )
