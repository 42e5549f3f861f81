"""Sensor correction: a robot's calibrated sensor offset, taken out on the robot before its policy.

A robot whose sensors read ``obs + b`` (``VariationProfile.obs_bias``) gives one policy for the
whole fleet two worlds to tell apart without a cue: a pendulum read 0.02 rad off is balanced
off-centre and drifts. Calibration finds ``b`` from the robot's telemetry
(``sim/calibration.py``); the registry delivers it, signed, with the policy
(``sensor_offsets`` in the manifest, docs/protocol.md), and the robot subtracts it from every
observation before the policy sees it. What the policy sees is then the robot's *corrected
view*: its calibrated body with an unbiased sensor. The pipeline trains and gates in that view
(:func:`corrected_view`), while the telemetry stays raw, so the next calibration still measures
the sensor as it is; :func:`track_offsets` pools each round's fit into the offset a robot gets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: a robot imports this module without MuJoCo (sim.calibration, sim.variation)
    from sim.calibration import CalibrationResult
    from sim.episode import Episode
    from sim.variation import VariationProfile

MAX_ABS_OFFSET = 1e3  # a larger offset is a fault, not a sensor
KEEP_Z = 1.0  # standard errors from 0 an offset already delivered needs to stay delivered (OffsetBelief.offset)


class SensorCorrectionError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class OffsetBelief:
    """What a robot's calibrations so far say about its sensor offset: the precision-weighted mean of
    their fits, its precision (1 / variance) and how many of the robot's episodes they covered."""

    estimate: float = 0.0
    precision: float = 0.0
    episodes: int = 0
    delivered: bool = False  # whether the last round delivered its offset (:meth:`offset`'s hysteresis)

    def update(self, fit: float, stderr: float, episodes: int, used: int, z: float) -> OffsetBelief:
        """Pool one more calibration: its fit (before any verdict) and standard error, on the robot's
        ``used`` most recent of ``episodes`` episodes. Only the share of them that is new adds
        precision (rounds overlap). A fit more than ``z`` combined standard errors from the belief
        means the sensor changed: the belief restarts from this fit."""
        new = min(1.0, max(0, episodes - self.episodes) / max(used, 1))
        weight = new / max(stderr, 1e-9) ** 2
        if self.precision and abs(fit - self.estimate) > z * np.sqrt(stderr**2 + 1.0 / self.precision):
            return OffsetBelief(fit, 1.0 / max(stderr, 1e-9) ** 2, episodes)  # a new sensor: its offset must prove itself again
        precision = self.precision + weight
        estimate = (self.precision * self.estimate + weight * fit) / precision if precision else fit
        return OffsetBelief(float(estimate), float(precision), episodes, self.delivered)

    def offset(self, floor: float, z: float) -> float:
        """The offset to deliver: the estimate once it is at least ``floor`` and ``z`` standard errors
        from 0, else 0. An offset already delivered stays while it is at least ``floor`` and
        ``KEEP_Z`` standard errors from 0 (hysteresis): a pooled estimate that drifts from 3 to 2.7
        standard errors as rounds add data is still the best one there is, and dropping it hands the
        robot its whole offset back (demo run m2, docs/benchmarks.md: 0.015 +- 0.0055 for a true 0.02
        was dropped, and the noisy robot fell from near 1,000 in the gate to 137 of 200)."""
        needed = KEEP_Z if self.delivered else z
        significant = self.precision > 0 and abs(self.estimate) >= max(floor, needed / np.sqrt(self.precision))
        return self.estimate if significant else 0.0


def track_offsets(
    beliefs: Mapping[str, OffsetBelief], calibrations: Mapping[str, CalibrationResult], episodes: Mapping[str, int], used: Mapping[str, int], floor: float, z: float = 3.0
) -> tuple[dict[str, OffsetBelief], dict[str, float]]:
    """Each robot's updated :class:`OffsetBelief` and the offsets to deliver (robots with none left out).

    One calibration keeps an offset at 3 standard errors, so the offsets it keeps are the large
    draws (winner's curse: on the demo's noisy pendulum, true 0.02, fits of 8 episodes spread
    0.013-0.025 and the kept ones were 0.019-0.037). Pooling every round's unthresholded fit
    narrows the error instead. Robots whose calibration does not fit ``obs_bias`` in the replay
    keep what it reported."""
    beliefs, offsets = dict(beliefs), {}
    for robot_id, result in sorted(calibrations.items()):
        fit, stderr = result.fitted.get("obs_bias"), result.diagnostics.stderr.get("obs_bias")
        if fit is None or stderr is None or not np.isfinite(stderr):
            offset = float(result.profile.obs_bias)
        else:
            belief = beliefs.get(robot_id, OffsetBelief()).update(fit, stderr, episodes[robot_id], used[robot_id], z)
            offset = belief.offset(floor, z)
            beliefs[robot_id] = dataclasses.replace(belief, delivered=bool(offset))
        if offset:
            offsets[robot_id] = offset
    return beliefs, offsets


def offset_vectors(offsets: Mapping[str, float], obs_dim: int) -> dict[str, list[float]]:
    """The manifest's ``sensor_offsets``: robot id -> one offset per observation entry (the scalar
    sensor model of ``VariationProfile.obs_bias`` on every entry)."""
    return {r: [float(b)] * obs_dim for r, b in sorted(offsets.items())}


def parse_offset(value, obs_dim: int) -> np.ndarray:
    """``value`` (a manifest's ``sensor_offsets[robot_id]``) as an (obs_dim,) float32 array; raises
    :class:`SensorCorrectionError` unless it is ``obs_dim`` finite numbers within ±MAX_ABS_OFFSET."""
    if not isinstance(value, list) or len(value) != obs_dim or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise SensorCorrectionError(f"sensor offset must be a list of {obs_dim} numbers (one per observation entry)")
    offset = np.asarray(value, np.float64)
    if not np.isfinite(offset).all() or np.abs(offset).max(initial=0.0) > MAX_ABS_OFFSET:
        raise SensorCorrectionError(f"sensor offset entries must be finite and within ±{MAX_ABS_OFFSET:g}")
    return offset.astype(np.float32)


def _offsets_object(sensor_offsets) -> dict:
    if not isinstance(sensor_offsets, dict):
        raise SensorCorrectionError("sensor_offsets must be an object {robot_id: [one offset per observation entry]}")
    return sensor_offsets


def parse_offsets(sensor_offsets, obs_dim: int) -> dict[str, np.ndarray]:
    """Every entry of a manifest's ``sensor_offsets``, parsed (what a publisher must send);
    :class:`SensorCorrectionError` when the field or any entry is malformed."""
    return {robot_id: parse_offset(entry, obs_dim) for robot_id, entry in _offsets_object(sensor_offsets).items()}


def robot_offset(sensor_offsets, robot_id: str, obs_dim: int) -> np.ndarray | None:
    """This robot's entry of a manifest's ``sensor_offsets`` (parsed), or None when it has none;
    :class:`SensorCorrectionError` when the field or the entry is malformed."""
    entry = _offsets_object(sensor_offsets).get(robot_id)
    return None if entry is None else parse_offset(entry, obs_dim)


def corrected_act(act, offset: np.ndarray | None):
    """``act`` (obs (N, obs_dim) -> actions) seeing ``obs - offset``; ``act`` itself when there is no offset."""
    if offset is None or not offset.any():
        return act
    return lambda obs: act(np.asarray(obs, np.float32) - offset)


def corrected_episode(episode: Episode, offset: float | None) -> Episode:
    """``episode`` as its robot's corrected policy saw it: every observation minus ``offset``."""
    if not offset:
        return episode
    return dataclasses.replace(episode, observation=(episode.observation - np.float32(offset)).astype(np.float32))


def corrected_view(
    episodes: Sequence[Episode], profiles: Mapping[str, VariationProfile], offsets: Mapping[str, float]
) -> tuple[list[Episode], dict[str, VariationProfile]]:
    """Episodes and calibrated profiles as the policy of each robot in ``offsets`` sees them once the
    robot subtracts its offset: observations shifted, and the sensor unbiased (the delivered offset
    is the best estimate of the bias, :func:`track_offsets`). Other robots are left as they are."""
    return (
        [corrected_episode(ep, offsets.get(ep.robot_id)) for ep in episodes],
        {r: p.replace(obs_bias=0.0) if offsets.get(r) else p for r, p in profiles.items()},
    )
