"""How good is a dynamics model: open-loop k-step prediction error on held-out episodes, and
the linear least-squares baseline it must beat.

k-step error: from a recorded state obs_t, feed the model the recorded actions a_t..a_{t+k-1}
open loop (its own predictions as inputs) and compare its obs_{t+k} with the recorded one.
Per start the error is the RMS over observation dims of (pred - true) / std_dim, where
std_dim is the per-dimension standard deviation of the evaluated observations; the reported
number is the mean over starts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from sim.episode import Episode
from worldmodel.ensemble import DynamicsEnsemble
from worldmodel.transitions import Transitions, check_compatible

StepFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # obs (B, obs_dim), action (B, act_dim) -> next_obs (B, obs_dim)


@dataclasses.dataclass(frozen=True)
class LinearDynamics:
    """Baseline: obs_{t+1} - obs_t = [obs_t, a_t, 1] @ weight (ridge least squares on standardised inputs).

    weight: (obs_dim + act_dim + 1, obs_dim); mean/std: (obs_dim + act_dim,) input standardisation.
    """

    weight: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, data: Transitions, ridge: float = 1e-6) -> LinearDynamics:
        x = np.concatenate([data.obs, data.action], 1).astype(np.float64)
        mean, std = x.mean(0), np.maximum(x.std(0), 1e-6)
        feats = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], 1)
        target = (data.next_obs - data.obs).astype(np.float64)
        gram = feats.T @ feats + ridge * len(x) * np.eye(feats.shape[1])
        weight = np.linalg.solve(gram, feats.T @ target)
        return cls(weight=weight, mean=mean, std=std)

    def __call__(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        x = (np.concatenate([obs, action], 1) - self.mean) / self.std
        delta = np.concatenate([x, np.ones((len(x), 1))], 1) @ self.weight
        return (obs + delta).astype(np.float32)


def ensemble_step_fn(model: DynamicsEnsemble, context: np.ndarray | None = None) -> StepFn:
    """The ensemble's deterministic step (elite-mean) as a numpy StepFn; a conditioned model takes
    ``context`` (B, context_dim), one row per row of every call's obs, or a call's own third argument
    ``context`` (B, context_dim) (what :func:`k_step_errors` passes, whose starts it picks itself)."""
    fixed = None if context is None else torch.as_tensor(context, device=model.device)

    def step(obs: np.ndarray, action: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        o = torch.as_tensor(obs, device=model.device)
        a = torch.as_tensor(action, device=model.device)
        ctx = fixed if context is None else torch.as_tensor(context, device=model.device)
        return model.mean_step(o, a, ctx)[0].float().cpu().numpy()

    return step


def k_step_errors(
    step_fn: StepFn,
    episodes: Sequence[Episode],
    ks: Sequence[int] = (1, 5, 20),
    *,
    max_starts: int = 2000,
    seed: int = 0,
    scale: np.ndarray | None = None,
    contexts: np.ndarray | None = None,
) -> dict[int, float]:
    """Mean normalised k-step error for each k in ``ks`` (see the module docstring).

    Starts are the (episode, t) with t + max(ks) <= T, subsampled to ``max_starts`` (seeded).
    ``scale`` (obs_dim,) overrides the per-dimension std (pass the same one to compare models).
    ``contexts`` (len(episodes), context_dim): each episode's body features, for a body-conditioned
    model; ``step_fn`` is then called as ``step_fn(obs, action, context)`` with each start's row
    (:func:`ensemble_step_fn`'s steps take it): the starts are picked here, so a context fixed in
    advance could not match them.
    """
    check_compatible(episodes)
    if contexts is not None and (np.ndim(contexts) != 2 or len(contexts) != len(episodes)):
        raise ValueError(f"contexts must be (len(episodes), context_dim) = ({len(episodes)}, C), one row per episode; got {np.shape(contexts)}")
    horizon = max(ks)
    if min(ks) < 1:
        raise ValueError(f"k must be >= 1, got {list(ks)}")
    starts = [(i, t) for i, ep in enumerate(episodes) for t in range(ep.num_steps - horizon + 1)]
    if not starts:
        raise ValueError(f"no episode has {horizon} steps: give longer episodes or smaller k")
    rng = np.random.default_rng(seed)
    if len(starts) > max_starts:
        starts = [starts[j] for j in sorted(rng.choice(len(starts), max_starts, replace=False))]
    if scale is None:
        scale = observation_scale(episodes)
    obs = np.stack([episodes[i].observation[t] for i, t in starts])
    if contexts is not None:
        rows_context = np.asarray(contexts, np.float32)[[i for i, _ in starts]]
        step_fn = functools.partial(_with_context, step_fn, rows_context)
    errors = {}
    for step in range(1, horizon + 1):
        action = np.stack([episodes[i].action[t + step - 1] for i, t in starts])
        obs = step_fn(obs, action)
        if step in ks:
            true = np.stack([episodes[i].observation[t + step] for i, t in starts])
            per_start = np.sqrt(np.mean(((obs - true) / scale) ** 2, axis=1))
            per_start = np.where(np.isfinite(per_start), per_start, np.inf)
            errors[step] = float(np.mean(per_start))
    return errors


def _with_context(step_fn, context: np.ndarray, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
    return step_fn(obs, action, context)


def observation_scale(episodes: Sequence[Episode]) -> np.ndarray:
    """Per-dimension std (obs_dim,) of all observations in ``episodes`` (floored at 1e-6)."""
    return np.maximum(np.concatenate([ep.observation for ep in episodes]).std(0), 1e-6)


def open_loop_errors(step_fn: StepFn, obs: np.ndarray, action: np.ndarray, valid: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Median normalised open-loop error at every k = 1..H over recorded segments.

    obs (S, H+1, obs_dim) recorded observations, action (S, H, act_dim) recorded actions,
    valid (S, H) whether step k of a segment was recorded (a segment may end early), scale
    (obs_dim,). Returns (H,) errors (RMS over dims of (pred - true) / scale, median over the
    segments still valid at k; NaN where none is). The model sees only obs[:, 0] and the actions.
    """
    pred = obs[:, 0]
    horizon = action.shape[1]
    errors = np.full(horizon, np.nan)
    for k in range(horizon):
        live = valid[:, k]
        if not live.any():
            break
        pred = step_fn(pred, action[:, k])
        err = np.sqrt(np.mean(((pred - obs[:, k + 1]) / scale) ** 2, axis=1))
        errors[k] = float(np.median(np.where(np.isfinite(err), err, np.inf)[live]))
    return errors


def trusted_horizon(errors: np.ndarray, tolerance: float, max_horizon: int) -> int:
    """The largest k <= max_horizon whose error (and every shorter one's) is <= tolerance; at least 1."""
    k = 0
    while k < min(max_horizon, len(errors)) and np.isfinite(errors[k]) and errors[k] <= tolerance:
        k += 1
    return max(1, k)
