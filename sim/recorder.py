"""Per-world episode buffers for the batched stepper: vectorised writes, one gather per array for the episodes that finish together."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sim.episode import Episode


class RecordedEpisode(Episode):
    """An :class:`Episode` out of the stepper whose metadata is built when it is first read.

    For short episodes the scenario's JSON and the deterministic episode id cost more than the
    arrays' copies, and many runs read only the arrays (returns, training data). Read, the metadata
    is the dict an eager build gives (same keys, same order, the values fixed when the episode
    finished) and from then on an ordinary attribute: it may be replaced, ``dataclasses.replace``
    copies it, and it is in the record's ``__dict__`` (before the first read it is not).
    """

    __slots__ = ("_metadata_of", "_key")  # not in __dict__, which holds the Episode's fields only

    @classmethod
    def lazy(cls, metadata_of: Callable[[Any], dict[str, str]], key, **fields) -> RecordedEpisode:
        """An episode of ``fields`` (every Episode field but ``metadata``) whose metadata is ``metadata_of(key)``
        (one function shared by many episodes, each its own key: no object per episode for it to collect)."""
        episode = cls.__new__(cls)
        episode.__dict__.update(fields)
        episode._metadata_of, episode._key = metadata_of, key
        return episode

    @functools.cached_property
    def metadata(self) -> dict[str, str]:
        return self._metadata_of(self._key)


class EpisodeRecorder:
    """Time-major buffers of N worlds' current episodes.

    Writes are vectorised over worlds (one numpy call per step, not one per world); episodes
    are copied out only when they finish, all those finishing together in one gather per array. Memory: N * (max_steps + 1) * (obs_dim +
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

    def finish(
        self, worlds: np.ndarray, num_steps: np.ndarray, terminated: np.ndarray, metadata_of: Callable[[Any], dict[str, str]], keys: Sequence
    ) -> list[RecordedEpisode]:
        """Copy the finished episodes of ``worlds`` (``num_steps[i]`` steps each, ``terminated[i]`` or
        truncated) out as Episodes, with one gather per array for all of them; ``metadata_of(keys[i])``
        gives episode i's metadata when it is first read.

        Each episode's arrays are consecutive rows of those gathers (views, contiguous), built here
        with their schema dtypes and shapes from finite physics, and its metadata is complete, so the
        record skips :meth:`Episode.validate` (a trusted producer, as the store's reader is; the
        server validates everything it receives).
        """
        lengths = np.asarray(num_steps, np.int64)
        ends = np.cumsum(lengths + 1)  # rows of the (T+1)-long arrays
        starts = ends - lengths - 1
        world = np.repeat(worlds, lengths + 1)
        t = np.arange(ends[-1]) - np.repeat(starts, lengths + 1)
        acted = t < np.repeat(lengths, lengths + 1)  # rows of the T-long arrays
        obs, qpos, qvel = self.obs[world, t], self.qpos[world, t], self.qvel[world, t]
        action, reward = self.action[world[acted], t[acted]], self.reward[world[acted], t[acted]]
        timestamp = self._timestamp[t]
        term, trunc = np.zeros(len(reward), bool), np.zeros(len(reward), bool)
        last = np.cumsum(lengths) - 1
        term[last[terminated]], trunc[last[~terminated]] = True, True
        episodes = []
        for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
            c, d = a - i, b - i - 1  # the T-long rows: one fewer per episode before this one
            episodes.append(
                RecordedEpisode.lazy(
                    metadata_of,
                    keys[i],
                    observation=obs[a:b],
                    action=action[c:d],
                    reward=reward[c:d],
                    terminated=term[c:d],
                    truncated=trunc[c:d],
                    timestamp=timestamp[a:b],
                    extras={"qpos": qpos[a:b], "qvel": qvel[a:b]},
                )
            )
        return episodes
