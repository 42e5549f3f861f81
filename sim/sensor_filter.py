"""Sensor filtering: a Kalman filter for a robot whose calibrated sensor is noisy, run on the robot.

A pendulum read through a sensor with std 0.05 rad of white noise is a hard body to learn for
and to balance: a policy that keeps the nominal pendulum up for 1,000 steps drops the noisy one
after 150-880 (docs/policies.md, "Sensor filtering"). Calibration measures the noise
(``obs_noise_std``, sim/calibration.py); this module turns that measurement into an estimator:

1. :func:`fit_sensor_filter` simulates the robot's calibrated body (its corrected view, noise-free)
   under the fleet's current policy plus exploration noise, fits a linear model of one control
   step ``obs' = A obs + B action + c`` by least squares, and takes its residual covariance as the
   process noise ``Q`` and ``obs_noise_std^2 I`` as the measurement noise ``R``. The fit is trimmed:
   steps the linear model cannot explain (the pendulum's cart striking the end of its rail, 0.3 % of
   the steps under a balancing policy) are left out of ``A, B, c`` and ``Q``. Counted in, they made
   ``Q`` on the velocities 5-8x the ordinary step's error, and the filter passed most of the sensor's
   noise on the velocities through (docs/policies.md, Sensor filtering 6);
2. it validates the filter on held-out episodes of the same body with the noise added, against the
   true observations, and keeps it only if it cuts the error (``FilterFit.keep``);
3. the release carries it (``sensor_filters`` in the signed manifest, docs/protocol.md) and the robot
   runs it on every observation after the offset correction, before its policy (:func:`filtered_act`);
   the robot's simulated twin runs it too, in training and in the gate (``BatchedStepper(sensor_filters=...)``).

The filter is a time-varying Kalman filter started at the first observation with covariance ``R``
(a steady-state gain alone trusts its prediction from the first step and carries the first
reading's error for ~1/gain steps). A reading the model cannot have predicted (its innovation
beyond :data:`JUMP_SIGMAS` standard deviations of its chi-square: a strike, a push) restarts the
filter at that reading, as at an episode's first one, instead of being averaged into a prediction
that is wrong. An entry with a NaN or infinite value (a sensor dropout, an unmeasured joint's velocity)
is not read: the update takes the reading's finite entries alone (a reading with none keeps the
prediction), so the filter stays corrected, and its jump test armed, under a NaN that persists (docs/policies.md, "Sensor
filtering"). The robot needs numpy only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from sim.policy_fn import actuator_command

if TYPE_CHECKING:
    from sim.episode import Episode

MAX_ABS_ENTRY = 1e6  # a model or covariance entry beyond this is a fault, not a sensor
TRIM_MADS = 6.0  # a fitted step whose residual is beyond this many robust deviations (MAD) on any entry is not linear dynamics
TRIM_ROUNDS = 3
UNREAD_PRIOR = 1e4  # an entry not read at the start: variance max(1, this x the noisiest sensor's), i.e. unknown
JUMP_SIGMAS = 8.0  # innovation^T S^-1 innovation above d + JUMP_SIGMAS * sqrt(2 d) restarts the filter at the reading


class SensorFilterError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class SensorFilter:
    """``obs' = A obs + B action + c`` with process noise ``Q`` and measurement noise ``R`` (float64)."""

    A: np.ndarray  # (d, d)
    B: np.ndarray  # (d, m)
    c: np.ndarray  # (d,)
    Q: np.ndarray  # (d, d) symmetric positive semi-definite
    R: np.ndarray  # (d, d) symmetric positive definite

    def to_dict(self) -> dict:
        return {k: np.asarray(getattr(self, k)).tolist() for k in ("A", "B", "c", "Q", "R")}

    @classmethod
    def from_dict(cls, value, obs_dim: int, act_dim: int) -> SensorFilter:
        """Parse a manifest's ``sensor_filters[robot_id]``; :class:`SensorFilterError` unless it is
        the five arrays of the right shapes, finite and bounded, with covariances that are ones."""
        shapes = {"A": (obs_dim, obs_dim), "B": (obs_dim, act_dim), "c": (obs_dim,), "Q": (obs_dim, obs_dim), "R": (obs_dim, obs_dim)}
        if not isinstance(value, dict) or set(value) != set(shapes):
            raise SensorFilterError(f"a sensor filter must be an object with exactly the keys {sorted(shapes)}")
        arrays = {}
        for key, shape in shapes.items():
            try:
                arr = np.asarray(value[key], np.float64)
            except (TypeError, ValueError):
                raise SensorFilterError(f"sensor filter {key}: must be numbers of shape {shape}") from None
            if arr.shape != shape or not np.isfinite(arr).all() or np.abs(arr).max(initial=0.0) > MAX_ABS_ENTRY:
                raise SensorFilterError(f"sensor filter {key}: must be finite numbers within ±{MAX_ABS_ENTRY:g} of shape {shape}")
            arrays[key] = arr
        for key in ("Q", "R"):
            cov = arrays[key]
            if not np.allclose(cov, cov.T) or np.linalg.eigvalsh(cov).min() < (1e-12 if key == "R" else -1e-12):
                raise SensorFilterError(f"sensor filter {key}: must be a symmetric positive {'definite' if key == 'R' else 'semi-definite'} covariance")
        return cls(**arrays)

    def start(self) -> FilterState:
        return FilterState(self)

    def run(self, observations: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """The filtered observations of one episode (T+1, d) given its raw ones and its actions (T, m)."""
        state, out = self.start(), np.empty(observations.shape, np.float32)
        out[0] = state.update(observations[0][None])[0]
        for t in range(len(actions)):
            state.predict(actions[t][None])
            out[t + 1] = state.update(observations[t + 1][None])[0]
        return out


class FilterState:
    """One episode (of one robot, or of several in rows): the estimates and their shared covariance
    (a reading that restarts one row restarts them all)."""

    def __init__(self, model: SensorFilter):
        self.model, self.x, self.P = model, None, None

    def predict(self, action: np.ndarray) -> None:
        if self.x is None:  # no reading yet: nothing to predict from
            return
        m = self.model
        self.x = self.x @ m.A.T + np.asarray(action, np.float64) @ m.B.T + m.c
        self.P = m.A @ self.P @ m.A.T + m.Q
        self.P = 0.5 * (self.P + self.P.T)  # exactly symmetric: update() relies on it

    def update(self, obs: np.ndarray) -> np.ndarray:
        """The estimates after the readings ``obs`` (rows, d). An entry with a NaN or infinite value is not read (a sensor
        dropout, an unmeasured joint's velocity): a row is updated from its finite entries alone (the measurement is
        those rows of the identity), and its unread entries move only as their correlation with the read ones says. A
        row with no finite entry keeps the prediction. The shared covariance is updated when every row read the same
        entries; else it keeps its predicted spread (rows that read different entries step after step leave it growing:
        one robot per filter state, as the stepper and the robot run it, never does)."""
        obs = np.asarray(obs, np.float64)
        finite = np.isfinite(obs)
        if self.x is None:  # the first reading: the estimate is the reading, as uncertain as the sensor
            if not finite.any(axis=1).all():  # a row that read nothing: nothing to start from yet
                return obs.astype(np.float32)
            # an entry never read yet (a joint whose velocity is not measured, from the start) begins at 0, as uncertain
            # as UNREAD_PRIOR says, and is found from the read entries the model couples it to
            unread = np.full(obs.shape[1], max(1.0, UNREAD_PRIOR * float(self.model.R.diagonal().max())))
            self.x, self.P = np.where(finite, obs, 0.0), self._reset_covariance(finite, unread)
            return self.x.astype(np.float32)
        if finite.all():  # every entry read: the plain update (the common case, and the per-step cost of the stepper)
            return self._update(obs - self.x, self.P + self.model.R, self.P, None, obs, finite)
        patterns = np.unique(finite, axis=0)
        patterns = patterns[patterns.any(axis=1)]
        if not len(patterns):  # nothing read: the estimate is the prediction
            return self.x.astype(np.float32)
        if len(patterns) == 1 and (finite == patterns[0]).all():
            idx = np.flatnonzero(patterns[0])  # every row read the same entries: one partial update, covariance included
            return self._update(obs[:, idx] - self.x[:, idx], self.P[np.ix_(idx, idx)] + self.model.R[np.ix_(idx, idx)], self.P[idx], idx, obs, finite)
        gains = []  # rows read different entries: each by its own, the shared covariance as predicted
        for pattern in patterns:
            idx, rows = np.flatnonzero(pattern), (finite == pattern).all(axis=1)
            innovation = obs[np.ix_(rows, idx)] - self.x[np.ix_(rows, idx)]
            solved = np.linalg.solve(self.P[np.ix_(idx, idx)] + self.model.R[np.ix_(idx, idx)], np.concatenate([innovation.T, self.P[idx]], axis=1))
            if self._jumped(innovation, solved[:, : len(innovation)], len(idx)):
                return self._restart(obs, finite)
            gains.append((rows, innovation @ solved[:, len(innovation) :]))
        x = self.x.copy()
        for rows, step in gains:
            x[rows] += step
        self.x = x
        return self.x.astype(np.float32)

    def _update(self, innovation, spread, cross, idx, obs, finite) -> np.ndarray:
        """Update every row with ``innovation`` (rows, k) of the entries ``idx`` (None: all), ``spread`` their (P + R)
        block and ``cross`` = P[idx] (k, d)."""
        rows = len(innovation)
        # one solve for both: (P + R)^-1 [innovation^T | P] (P and R symmetric)
        solved = np.linalg.solve(spread, np.concatenate([innovation.T, cross], axis=1))
        if self._jumped(innovation, solved[:, :rows], len(spread)):
            return self._restart(obs, finite)
        gain = solved[:, rows:].T  # P H^T (H P H^T + R)^-1
        self.x = self.x + innovation @ gain.T
        if idx is None:
            self.P = (np.eye(len(self.P)) - gain) @ self.P
        else:
            self.P = self.P - gain @ cross
        self.P = 0.5 * (self.P + self.P.T)
        return self.x.astype(np.float32)

    @staticmethod
    def _jumped(innovation: np.ndarray, solved: np.ndarray, d: int) -> bool:
        """Whether a row's innovation is beyond what the model can explain (its chi-square with ``d`` entries read)."""
        return bool((innovation * solved.T).sum(axis=1).max() > d + JUMP_SIGMAS * np.sqrt(2 * d))

    def _restart(self, obs: np.ndarray, finite: np.ndarray) -> np.ndarray:
        """The model cannot explain a reading: start again from it (an entry some row did not read keeps its predicted
        variance, not the sensor's: it was not measured)."""
        self.x, self.P = np.where(finite, obs, self.x), self._reset_covariance(finite, self.P.diagonal().copy())
        return self.x.astype(np.float32)

    def _reset_covariance(self, finite: np.ndarray, unread_variance: np.ndarray) -> np.ndarray:
        """R for the entries every row read; an entry some row did not read gets ``unread_variance``, uncorrelated."""
        P = self.model.R.copy()
        unread = ~finite.all(axis=0)
        if unread.any():
            P[unread, :], P[:, unread] = 0.0, 0.0
            P[unread, unread] = unread_variance[unread]
        return P


def filtered_act(act: Callable[[np.ndarray], np.ndarray], model: SensorFilter) -> Callable[[], Callable[[np.ndarray], np.ndarray]]:
    """For each new episode, ``act`` seeing the filtered observations: a factory of stateful
    per-episode policies (each call of the factory starts a fresh filter)."""

    def episode():
        state, last = None, None

        def run(obs: np.ndarray) -> np.ndarray:
            nonlocal state, last
            obs = np.asarray(obs, np.float32)
            if state is None:
                state = model.start()
            else:
                state.predict(last)
            action = np.asarray(act(state.update(obs)), np.float32)
            last = actuator_command(action)[0]  # what the actuators get: zeros for an action with a NaN (run_episode), clipped (the stepper clips too)
            return action

        return run

    return episode


@dataclasses.dataclass(frozen=True)
class FilterFit:
    """A fitted filter and its held-out error per observation entry (RMS vs the true observation)."""

    filter: SensorFilter
    raw_rms: np.ndarray  # the sensor's own error
    filtered_rms: np.ndarray
    keep_ratio: float

    @property
    def keep(self) -> bool:
        """Whether the filter cuts the sensor's error, summed over entries, to ``keep_ratio`` or less, without making
        its worst entry worse than the raw sensor's worst (``view_noise``, what the policy trains under, would rise:
        a filter that smooths positions but lags a free joint's quaternion is not kept)."""
        return bool(self.filtered_rms.sum() <= self.keep_ratio * self.raw_rms.sum() and self.filtered_rms.max() <= self.raw_rms.max())

    @property
    def view_noise(self) -> float:
        """The noise the policy sees through the filter, as one white-noise std (the largest entry's
        error): what the corrected view simulates for this robot's sensor (``VariationProfile.obs_noise_std``)."""
        return float(self.filtered_rms.max())

    def to_dict(self) -> dict:
        rounded = lambda a: np.asarray(a, np.float64).round(5).tolist()  # noqa: E731
        return {
            "kept": self.keep, "raw_rms": rounded(self.raw_rms), "filtered_rms": rounded(self.filtered_rms), "view_noise": round(self.view_noise, 5),
            "filter_sha256": filter_digest(self.filter.to_dict()),  # matches the manifest's entry when this filter is released
        }  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """How a robot's filter is fitted: ``episodes`` simulated episodes of ``max_steps`` steps (half to fit,
    half to validate), the policy's actions plus N(0, ``exploration_std``^2); kept when its held-out
    error is at most ``keep_ratio`` of the sensor's (summed over entries) and its worst entry no worse than the
    sensor's worst (:attr:`FilterFit.keep`)."""

    episodes: int = 16
    max_steps: int = 300
    exploration_std: float = 0.3
    keep_ratio: float = 0.7
    seed: int = 0

    def __post_init__(self):
        if self.episodes < 2 or self.max_steps < 2 or self.exploration_std < 0 or not 0 < self.keep_ratio <= 1:
            raise ValueError(f"FilterConfig needs episodes >= 2, max_steps >= 2, exploration_std >= 0, 0 < keep_ratio <= 1: {self}")


def fit_sensor_filter(robot: str, profile, noise_std: float, policy, config: FilterConfig = FilterConfig()) -> FilterFit:
    """Fit and validate a filter for ``profile``'s body (its sensor noise-free; ``VariationProfile``)
    read through a sensor with white noise ``noise_std`` (see the module docstring)."""
    from sim.batched import BatchedStepper  # here: a robot imports this module without MuJoCo
    from sim.policy_fn import noisy_policy
    from sim.scenario import ScenarioSpec

    if noise_std <= 0:
        raise ValueError(f"a sensor filter needs the sensor's noise (> 0), got {noise_std}")
    clean = profile.replace(obs_noise_std=0.0, obs_bias=0.0)
    specs = [ScenarioSpec(robot, seed=config.seed * 10_000 + s, profile=clean, max_steps=config.max_steps) for s in range(config.episodes)]
    with BatchedStepper(robot, min(config.episodes, 8), nthread=1) as stepper:
        episodes = stepper.simulate(specs, noisy_policy(policy, config.exploration_std, config.seed))
    fit_eps, val_eps = episodes[::2], episodes[1::2]
    if not fit_eps or not val_eps:
        raise ValueError(f"no episode of {robot} on {profile} survived simulation; cannot fit its sensor filter")
    model = _fit_linear(fit_eps, noise_std)
    rng = np.random.default_rng(config.seed)
    raw_err, filt_err = [], []
    for ep in val_eps:
        noisy = ep.observation + rng.standard_normal(ep.observation.shape) * noise_std
        raw_err.append(noisy - ep.observation)
        filt_err.append(model.run(noisy, ep.action) - ep.observation)
    rms = lambda errs: np.sqrt(np.mean(np.concatenate(errs).astype(np.float64) ** 2, axis=0))  # noqa: E731
    return FilterFit(model, rms(raw_err), rms(filt_err), config.keep_ratio)


def _fit_linear(episodes: Sequence[Episode], noise_std: float) -> SensorFilter:
    inputs = np.concatenate([np.hstack([ep.observation[:-1], ep.action, np.ones((ep.num_steps, 1))]) for ep in episodes]).astype(np.float64)
    targets = np.concatenate([ep.observation[1:] for ep in episodes]).astype(np.float64)
    linear = np.ones(len(inputs), bool)  # the steps the model is fitted on: trimmed of those it cannot explain
    for _ in range(TRIM_ROUNDS):
        weights, *_ = np.linalg.lstsq(inputs[linear], targets[linear], rcond=None)
        residual = targets - inputs @ weights
        mad = 1.4826 * np.median(np.abs(residual[linear]), axis=0)
        within = (np.abs(residual) <= TRIM_MADS * mad + 1e-9).all(axis=1)
        if within.mean() < 0.5:  # not a few strikes but a model that fits nothing well: keep every step
            break
        linear = within
    weights, *_ = np.linalg.lstsq(inputs[linear], targets[linear], rcond=None)
    d = targets.shape[1]
    residual = (targets - inputs @ weights)[linear]
    q = np.atleast_2d(np.cov(residual.T)) + 1e-10 * np.eye(d)
    return SensorFilter(A=weights[:d].T, B=weights[d:-1].T, c=weights[-1], Q=0.5 * (q + q.T), R=noise_std**2 * np.eye(d))


def seen_body(profile, sensor_filters):
    """The body a robot's policy is told it drives (the features of ``VariationProfile.context``):
    ``profile`` itself, or, where ``sensor_filters`` ({profile: SensorFilter}) has a filter for it,
    the same body with a clean sensor. The filter's job is to make the sensor one: told apart as a
    noisy body, the filtered robot got a behaviour of its own learned from its quarter of the data;
    told it is clean, its experience pools with the clean bodies'. Its training world still
    simulates the real sensor and runs the filter, so the policy learns to act on what the filter
    leaves (docs/policies.md, Sensor filtering)."""
    return profile.replace(obs_noise_std=0.0) if sensor_filters and profile in sensor_filters else profile


def filter_digest(entry: dict) -> str:
    """sha256 of a filter's manifest entry (``SensorFilter.to_dict()``), as canonical JSON."""
    return hashlib.sha256(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def filter_vectors(fits: dict[str, FilterFit]) -> dict[str, dict]:
    """The manifest's ``sensor_filters``: robot id -> its kept filter."""
    return {r: f.filter.to_dict() for r, f in sorted(fits.items()) if f.keep}


def robot_filter(sensor_filters, robot_id: str, obs_dim: int, act_dim: int) -> SensorFilter | None:
    """This robot's entry of a manifest's ``sensor_filters`` (parsed), or None when it has none;
    :class:`SensorFilterError` when the field or the entry is malformed."""
    entry = _filters_object(sensor_filters).get(robot_id)
    return None if entry is None else SensorFilter.from_dict(entry, obs_dim, act_dim)


def parse_filters(sensor_filters, obs_dim: int, act_dim: int) -> dict[str, SensorFilter]:
    """Every entry of a manifest's ``sensor_filters``, parsed (what a publisher must send)."""
    return {r: SensorFilter.from_dict(v, obs_dim, act_dim) for r, v in _filters_object(sensor_filters).items()}


def _filters_object(sensor_filters) -> dict:
    if not isinstance(sensor_filters, dict):
        raise SensorFilterError("sensor_filters must be an object {robot_id: {A, B, c, Q, R}}")
    return sensor_filters


def filtered_episodes(episodes: Sequence[Episode], fits: dict[str, FilterFit]) -> list[Episode]:
    """Episodes as the policy of each robot with a kept filter sees them: their observations filtered
    (with their own actions). Other robots' episodes are left as they are."""
    kept = {r: f for r, f in fits.items() if f.keep}
    return [dataclasses.replace(ep, observation=kept[ep.robot_id].filter.run(ep.observation, ep.action)) if ep.robot_id in kept else ep for ep in episodes]
