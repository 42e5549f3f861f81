"""Transition arrays from Episode records, and the train/validation split by episode.

A transition is (obs_t, action_t, next_obs_t = obs_{t+1}, reward_t, terminated_t). The last
transition of a truncated episode keeps its final observation (schema v1 stores it), so no
time-limit cut is ever mistaken for a termination.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sim.episode import Episode


@dataclasses.dataclass(frozen=True)
class Transitions:
    """M transitions, flat over episodes.

    obs (M, obs_dim) f32, action (M, act_dim) f32, next_obs (M, obs_dim) f32, reward (M,) f32,
    terminated (M,) bool, episode (M,) int64 index into the source list, step (M,) int64;
    context (M, C) f32 features of each transition's body (a conditioned model's extra input), or None.
    """

    obs: np.ndarray
    action: np.ndarray
    next_obs: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    episode: np.ndarray
    step: np.ndarray
    context: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.obs.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.action.shape[1])

    @property
    def context_dim(self) -> int:
        return 0 if self.context is None else int(self.context.shape[1])

    def rows(self, index) -> Transitions:
        """The transitions at ``index`` (a slice, mask or index array)."""
        return Transitions(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    def model_inputs(self) -> np.ndarray:
        """(M, obs_dim + act_dim + context_dim): what a world model reads."""
        return np.concatenate([self.obs, self.action] + ([] if self.context is None else [self.context]), 1)


def check_compatible(episodes: Sequence[Episode]) -> tuple[str, int, int]:
    """(robot_model, obs_dim, act_dim) shared by every episode; raises ValueError naming the odd one out."""
    if not episodes:
        raise ValueError("no episodes given: the world model needs at least one episode of a robot")
    first = episodes[0]
    robot, obs_dim, act_dim = first.metadata["robot_model"], first.observation.shape[1], first.action.shape[1]
    for ep in episodes:
        got = (ep.metadata["robot_model"], ep.observation.shape[1], ep.action.shape[1])
        if got != (robot, obs_dim, act_dim):
            raise ValueError(
                f"episode {ep.episode_id} is (robot, obs_dim, act_dim)={got}, but the first is {(robot, obs_dim, act_dim)}: "
                "train one world model per robot model"
            )
    return robot, int(obs_dim), int(act_dim)


def to_transitions(episodes: Sequence[Episode]) -> Transitions:
    """Flatten ``episodes`` (all of one robot model) into :class:`Transitions`."""
    check_compatible(episodes)
    parts = {k: [] for k in ("obs", "action", "next_obs", "reward", "terminated", "episode", "step")}
    for i, ep in enumerate(episodes):
        t = ep.num_steps
        parts["obs"].append(ep.observation[:-1])
        parts["next_obs"].append(ep.observation[1:])
        parts["action"].append(ep.action)
        parts["reward"].append(ep.reward)
        parts["terminated"].append(ep.terminated)
        parts["episode"].append(np.full(t, i, np.int64))
        parts["step"].append(np.arange(t, dtype=np.int64))
    return Transitions(**{k: np.concatenate(v) for k, v in parts.items()})


def split_by_episode(
    episodes: Sequence[Episode], val_fraction: float, seed: int
) -> tuple[list[Episode], list[Episode]]:
    """Shuffle episodes (seeded) and hold out ``val_fraction`` of them (at least one) for validation.

    Never splits inside an episode: neighbouring steps are nearly equal, so a step-level split
    would leak the validation set into training.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(episodes) < 2:
        raise ValueError(f"need at least 2 episodes to hold one out for validation, got {len(episodes)}")
    order = np.random.default_rng(seed).permutation(len(episodes))
    num_val = min(len(episodes) - 1, max(1, int(round(val_fraction * len(episodes)))))
    val = [episodes[i] for i in sorted(order[:num_val])]
    train = [episodes[i] for i in sorted(order[num_val:])]
    return train, val


def split_transitions(episodes: Sequence[Episode], val_fraction: float, seed: int) -> tuple[Transitions, Transitions, tuple[int, int]]:
    """Training and validation transitions of ``episodes``, and how many episodes each came from.

    Two or more episodes: :func:`split_by_episode`. A lone episode (a fleet of one robot that has
    sent one): its last ``val_fraction`` of steps (at least one) are held out, the rest train; only
    the steps at the cut are neighbours across the split.
    """
    if len(episodes) != 1:
        train, val = split_by_episode(episodes, val_fraction, seed)
        return to_transitions(train), to_transitions(val), (len(train), len(val))
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    t = to_transitions(episodes)
    if len(t) < 2:
        raise ValueError(f"need at least 2 transitions to hold one out for validation; the only episode has {len(t)}")
    cut = len(t) - min(len(t) - 1, max(1, int(round(val_fraction * len(t)))))
    return t.rows(slice(0, cut)), t.rows(slice(cut, None)), (1, 1)
