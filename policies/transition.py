"""The record the trainer hands an algorithm after each vector step, and the algorithm interface."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch

from policies.networks import Policy
from sim.input_checks import check_finite, check_unit_actions


def world_rows(obs, obs_dim: int, num_worlds: int | None = None) -> np.ndarray:
    """The worlds' observations as float32 (N, obs_dim), as a learner's ``explore`` takes them; ValueError otherwise.

    Checked here, not only in :class:`VectorStep`: a NaN observation once became a NaN action the env was stepped
    with (the next VectorStep then blamed the env), and a Dict observation failed as a bare numpy TypeError.
    ``num_worlds``: the rows a learner built for a fixed number of worlds (PPO's rollout) needs, exactly."""
    try:
        rows = np.asarray(obs, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"observations of type {type(obs).__name__} are not numbers: a learner takes a float vector per world, (N, {obs_dim}) "
            "(flatten a Dict or Tuple space first: gymnasium.wrappers.FlattenObservation)"
        ) from exc
    if rows.ndim != 2 or rows.shape[1] != obs_dim:
        raise ValueError(f"observations of shape {rows.shape}: a learner acts for N worlds at once, (N, {obs_dim}) (one env: obs[None])")
    if num_worlds is not None:
        check_world_count("observations", len(rows), num_worlds)
    check_finite("explore", {"obs": rows}, "an env's observations must be finite: end the episode (and reset) where the env reads NaN")
    return rows


def check_world_count(what: str, rows: int, num_worlds: int) -> None:
    """ValueError naming both counts unless ``rows == num_worlds``: PPO's rollout has one row per world, and rows for
    fewer worlds were broadcast into every row (one world's data trained on N times, silently), more failed inside torch."""
    if rows != num_worlds:
        raise ValueError(
            f"{what} for {rows} worlds, this learner was built for num_worlds={num_worlds}: "
            f"pass one row per world ({num_worlds}), or build it with num_worlds={rows}"
        )


@dataclasses.dataclass(frozen=True)
class VectorStep:
    """One step of N worlds (numpy).

    obs (N, D): what the policy saw; action (N, A) in [-1, 1]; reward (N,) f32;
    next_obs (N, D): what the policy sees next (a finished world's reset observation);
    final_obs (N, D): the observation to bootstrap from (next_obs, or the finished episode's
    last observation where terminated | truncated); terminated, truncated (N,) bool.
    """

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    final_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray

    def __post_init__(self):
        """Checked and cast once, where a step enters a learner: float32 arrays (a float64 env's too), shapes that
        agree, finite values and actions in [-1, 1]; a ValueError naming the field otherwise (a NaN stored in the
        replay turns every weight NaN a few updates later, silently)."""
        for name in ("obs", "action", "reward", "next_obs", "final_obs"):
            try:
                object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float32))
            except (TypeError, ValueError) as exc:  # a Dict observation failed as a bare numpy TypeError
                raise ValueError(f"VectorStep {name} of type {type(getattr(self, name)).__name__} is not numbers: a learner takes a float "
                                 "vector per world (flatten a Dict or Tuple space first: gymnasium.wrappers.FlattenObservation)") from exc  # fmt: skip
        for name in ("terminated", "truncated"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=bool))
        if self.obs.ndim != 2 or self.action.ndim != 2 or self.reward.ndim != 1:
            raise ValueError(
                f"VectorStep: obs {self.obs.shape}, action {self.action.shape}, reward {self.reward.shape}: it takes N worlds' rows, "
                "obs (N, obs_dim), action (N, act_dim), reward (N,) (one env: N = 1, e.g. obs[None])"
            )
        n = len(self.reward)
        for name in ("obs", "action", "next_obs", "final_obs", "terminated", "truncated"):
            value = getattr(self, name)
            if len(value) != n or (name.endswith("obs") and value.shape != self.obs.shape):
                raise ValueError(f"VectorStep: {name} has shape {value.shape} beside reward {self.reward.shape} and obs {self.obs.shape}: one row per world in each, the obs fields shaped alike")
        floats = {name: getattr(self, name) for name in ("obs", "action", "reward", "next_obs", "final_obs")}
        check_finite("VectorStep", floats, "an env's observations, actions and rewards must be finite")
        check_unit_actions(
            "VectorStep", self.action,
            "learners act in [-1, 1]: store the policy's actions, and scale them to the env's bounds when stepping it (low + (a + 1) / 2 * (high - low))",
        )  # fmt: skip

    def check_widths(self, obs_dim: int, act_dim: int) -> None:
        """ValueError naming the field unless the rows are as wide as a learner's (obs_dim, act_dim): called where a step
        enters one (``observe``); a wrong width once failed deep in the replay buffer as a bare numpy broadcast."""
        for name, have, want in (("obs", self.obs.shape[1], obs_dim), ("action", self.action.shape[1], act_dim)):
            if have != want:
                raise ValueError(f"VectorStep: {name} rows of {have} values, this learner's {name.replace('action', 'act')}_dim is {want}: (N, {want}) for N worlds")


class Algorithm(Protocol):
    """What :class:`policies.trainer.Trainer` needs from an algorithm (SAC, PPO)."""

    name: str
    policy: Policy  # the exportable deterministic policy (normaliser + actor)

    def explore(self, obs: np.ndarray) -> np.ndarray:
        """Collection actions (N, A) in [-1, 1] for obs (N, D)."""

    def observe(self, step: VectorStep) -> None:
        """Take one vector step's data."""

    def ready(self) -> bool:
        """True when :meth:`update` should run now."""

    def update(self) -> dict[str, float]:
        """One update round; returns metrics with namespaced keys (``train/...``)."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything needed to resume: (tensors, JSON-able meta)."""

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        """Inverse of :meth:`state`."""
