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
from sim.input_checks import check_finite, check_unit_actions


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

    def __post_init__(self):
        """Cast and checked once, where transitions are made: the dtypes above, M rows in each, finite values and
        actions in [-1, 1] (what the model is rolled out with); a ValueError naming the field otherwise (one NaN
        row once trained a model of NaN that saved, loaded and rolled out nothing, silently)."""
        floats = ("obs", "action", "next_obs", "reward") + (("context",) if self.context is not None else ())
        for name in floats:
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float32))
        object.__setattr__(self, "terminated", np.asarray(self.terminated, dtype=bool))
        for name in ("episode", "step"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        wanted = {"obs": 2, "action": 2, "next_obs": 2, "reward": 1, "terminated": 1, "episode": 1, "step": 1, "context": 2}
        m = len(self.obs) if self.obs.ndim else -1
        for name, ndim in wanted.items():
            value = getattr(self, name)
            if value is not None and (value.ndim != ndim or len(value) != m):
                raise ValueError(f"Transitions: {name} has shape {value.shape}; it must be ({m}{', n' if ndim == 2 else ''}): one row per transition, as obs {self.obs.shape}")
        if self.next_obs.shape != self.obs.shape:
            raise ValueError(f"Transitions: next_obs has shape {self.next_obs.shape}, obs {self.obs.shape}: they must agree")
        check_finite("Transitions", {name: getattr(self, name) for name in floats}, "drop those transitions (a world model trained on them predicts NaN)")
        check_unit_actions(
            "Transitions", self.action, "the world model takes actions in [-1, 1] (what policies emit and rollouts feed it): scale them, 2 (a - low) / (high - low) - 1"
        )

    @classmethod
    def unchecked(cls, **fields) -> Transitions:
        """Transitions of arrays already checked where they came in (a learner's log, a slice of checked transitions):
        the checks of a whole buffer are not paid again at every use."""
        out = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            object.__setattr__(out, f.name, fields.get(f.name))
        return out

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
        return Transitions.unchecked(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index] for f in dataclasses.fields(self)})

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
                "train one world model per robot model and layout (a robot whose observation or action changed under the same model: leave it out)"
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
        parts["action"].append(np.clip(ep.action, -1.0, 1.0))  # what the actuators applied (sim.batched clips; an import may not)
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
