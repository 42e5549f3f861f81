"""The record the trainer hands an algorithm after each vector step, and the algorithm interface."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch

from policies.networks import Policy


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
