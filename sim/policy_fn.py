"""Adapting a policy to the batched call the stepper makes: actions (N, act_dim) from obs (N, obs_dim)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BatchedPolicy = Callable[[np.ndarray], np.ndarray]


def as_batched_policy(policy) -> BatchedPolicy:
    """Accept a numpy callable or a torch module (mapping (N, obs_dim) -> (N, act_dim)).

    torch is imported only when a module is given, so sim needs no torch otherwise.
    """
    if hasattr(policy, "parameters") and hasattr(policy, "forward"):
        import torch

        module = policy
        device = next(module.parameters(), torch.empty(0)).device

        def run(obs: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = module(torch.from_numpy(obs).to(device))
            return out.detach().to("cpu", torch.float32).numpy()

        return run
    if not callable(policy):
        raise TypeError(f"policy must be a callable or a torch module, got {type(policy).__name__}")
    return policy


def zero_policy(act_dim: int) -> BatchedPolicy:
    return lambda obs: np.zeros((obs.shape[0], act_dim), dtype=np.float32)


def random_policy(act_dim: int, seed: int = 0) -> BatchedPolicy:
    """Uniform actions in [-1, 1]; seeded, so runs repeat."""
    rng = np.random.default_rng(seed)
    return lambda obs: rng.uniform(-1.0, 1.0, size=(obs.shape[0], act_dim)).astype(np.float32)


def noisy_policy(policy, std: float, seed: int = 0) -> BatchedPolicy:
    """``policy``'s actions plus Gaussian exploration noise N(0, std^2), clipped to [-1, 1]; seeded."""
    act, rng = as_batched_policy(policy), np.random.default_rng(seed)

    def run(obs: np.ndarray) -> np.ndarray:
        action = np.asarray(act(obs), np.float32)
        return np.clip(action + rng.normal(0.0, std, size=action.shape), -1.0, 1.0).astype(np.float32)

    return run
