"""Where a robot's policy comes from.

The agent asks a :class:`PolicySource` for the current policy at each episode start and
records its version in the episode. The sources here are fixed; ``fleet.registry.pull``'s
source updates policies from the registry with TUF's client workflow under the same protocol.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import numpy as np

from sim.policy_fn import random_policy, zero_policy

BatchedPolicy = Callable[[np.ndarray], np.ndarray]  # obs (N, obs_dim) -> actions (N, act_dim) in [-1, 1]


@dataclasses.dataclass(frozen=True)
class Policy:
    """``act`` maps observations to actions without memory. A policy that remembers within an
    episode (a robot's sensor filter, sim/sensor_filter.py) also has ``episode``: a factory of a
    fresh per-episode ``act``; the agent calls it at each episode start (:meth:`for_episode`)."""

    version: str
    act: BatchedPolicy
    episode: Callable[[], BatchedPolicy] | None = None

    def for_episode(self) -> BatchedPolicy:
        return self.act if self.episode is None else self.episode()


class PolicySource(Protocol):
    def current(self) -> Policy:
        """The policy to run for the next episode."""
        ...


@dataclasses.dataclass
class FixedPolicy:
    """Always the same policy."""

    policy: Policy

    def current(self) -> Policy:
        return self.policy


def builtin_policy(name: str, act_dim: int, seed: int = 0) -> FixedPolicy:
    """``random`` (uniform in [-1, 1], seeded) or ``zero``."""
    if name == "random":
        return FixedPolicy(Policy("random", random_policy(act_dim, seed)))
    if name == "zero":
        return FixedPolicy(Policy("zero", zero_policy(act_dim)))
    raise ValueError(f"unknown builtin policy {name!r}; use 'random' or 'zero' (signed policy pull comes with issue 6)")
