"""Adapting a policy to the batched call the stepper makes: actions (N, act_dim) from obs (N, obs_dim).

A *body-conditioned* policy (``context_dim`` > 0, an attribute of the torch ``Policy``, of the
numpy ``RuntimePolicy`` and of the wrappers here) reads (N, obs_dim + context_dim): the observation,
then each robot's body features (``sim.variation.VariationProfile.context``). The stepper hands
each world's features to it through :func:`as_conditioned_policy`; a robot appends its own
calibrated ones, delivered with the release (``fleet.registry.pull``).
"""

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


def context_dim_of(policy) -> int:
    """How many body features ``policy`` reads after the observation (0: an unconditioned policy)."""
    return int(getattr(policy, "context_dim", 0) or 0)


def obs_dim_of(policy) -> int | None:
    """How many observation values ``policy`` says it reads (a torch ``Policy``'s spec, a ``RuntimePolicy``), before any
    body features; None for one that does not say (a plain callable)."""
    dim = getattr(policy, "obs_dim", None)
    if dim is None:
        dim = getattr(getattr(policy, "spec", None), "obs_dim", None)
    return None if dim is None else int(dim)


def as_conditioned_policy(policy) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``policy`` as ``act(obs (N, obs_dim), context (N, CONTEXT_DIM))``: a conditioned policy reads
    both, side by side; any other ignores the context."""
    act, dim = as_batched_policy(policy), context_dim_of(policy)
    if not dim:
        return lambda obs, context: act(obs)
    from sim.variation import CONTEXT_DIM  # here: a robot imports this module without MuJoCo

    if dim != CONTEXT_DIM:
        raise ValueError(f"the policy reads {dim} body features; this build encodes {CONTEXT_DIM} (sim.variation.CONTEXT_FIELDS)")
    return lambda obs, context: act(np.concatenate([obs, context], axis=1, dtype=np.float32))


def with_context(policy, context: np.ndarray) -> BatchedPolicy:
    """A conditioned ``policy`` bound to one body's features ``context`` (context_dim,): a plain
    policy of the observation alone, as the robot of that body runs it."""
    act, context = as_batched_policy(policy), np.asarray(context, np.float32)
    if context.shape != (context_dim_of(policy),):
        raise ValueError(f"this policy reads {context_dim_of(policy)} body features, got {context.shape}")

    def run(obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, np.float32)
        return act(np.concatenate([obs, np.broadcast_to(context, (*obs.shape[:-1], len(context)))], axis=-1))

    return run


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

    run.context_dim = context_dim_of(policy)  # noise does not change what the policy reads
    return run


def actuator_command(action: np.ndarray, clip: bool = True) -> tuple[np.ndarray, bool]:
    """What a robot's actuators get for ``action`` (..., act_dim): a row with a NaN or infinite value becomes zeros (the
    zero policy's command: np.clip keeps NaN, and a NaN must never reach a motor), clipped to [-1, 1] with ``clip``; and
    whether a row was zeroed. The one rule fleet.agent.loop.run_episode, the ROS 2 node's EpisodeLoop and
    sim.sensor_filter.filtered_act (predicting what the actuators got) apply."""
    action = np.asarray(action, np.float32)
    if np.isfinite(action).all():  # the common case: no masking
        return (np.clip(action, -1.0, 1.0) if clip else action), False
    finite = np.isfinite(action).all(axis=-1, keepdims=True)
    return np.where(finite, np.clip(action, -1.0, 1.0) if clip else action, np.float32(0.0)).astype(np.float32), True
