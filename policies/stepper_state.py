"""Free-running scenario streams for the batched stepper, and capture/restore of its state.

The trainer drives :class:`sim.batched.BatchedStepper` with a :class:`FreeRunning` source
(world w's k-th episode: seed ``derive_seed(seed, w, k)``, the scheme of
``BatchedStepper.reset``) whose counters are plain data, so a checkpoint can carry them.

:func:`capture` / :func:`restore` save and rebuild the stepper mid-episode: physics state,
sensors, observations, step counters, the action-latency history and each world's noise
RNG, through the stepper's public ``get_state`` / ``set_state``; the scenario counters are
saved beside them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from sim.batched import BatchedStepper, derive_seed
from sim.scenario import ScenarioSpec
from sim.variation import VariationProfile


class FreeRunning:
    """Scenario source: world w's k-th episode (k = 1, 2, ...) gets seed derive_seed(seed, w, k)."""

    def __init__(self, robot: str, seed: int, profiles: Sequence[VariationProfile], counters: Sequence[int] | None = None):
        self.robot, self.seed, self.profiles = robot, int(seed), list(profiles)
        self.counters = [0] * len(self.profiles) if counters is None else [int(c) for c in counters]

    def __call__(self, world: int) -> ScenarioSpec:
        self.counters[world] += 1
        return ScenarioSpec(robot=self.robot, seed=derive_seed(self.seed, world, self.counters[world]), profile=self.profiles[world])

    def start(self, stepper: BatchedStepper) -> np.ndarray:
        """Reset every world to its next scenario; returns obs (N, obs_dim)."""
        return stepper.reset_to([self(w) for w in range(stepper.num_worlds)], then=self)


def capture(stepper: BatchedStepper, source: FreeRunning) -> tuple[dict[str, torch.Tensor], dict]:
    """The stepper's mid-episode state as (tensors, JSON-able meta)."""
    arrays, meta = stepper.get_state()
    tensors = {f"stepper.{k}": torch.from_numpy(v) for k, v in arrays.items()}
    return tensors, {**meta, "counters": list(source.counters)}


def restore(stepper: BatchedStepper, source: FreeRunning, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
    """Put ``stepper`` back into the captured state; ``source`` continues from the saved counters."""
    arrays = {k.removeprefix("stepper."): v.numpy() for k, v in tensors.items() if k.startswith("stepper.")}
    stepper.set_state(arrays, dict(meta), then=source)
    source.counters = [int(c) for c in meta["counters"]]
