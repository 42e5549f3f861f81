"""Physics check: replay world-model rollouts in MuJoCo and keep only those physics agrees with.

For each world-model Episode, MuJoCo starts from the same physical state (the ``init_qpos``
/``init_qvel`` its scenario recorded from the source episode, else a state rebuilt from its
first observation, see :func:`sim.calibration.state_from_observation`), with the profile
its scenario names (else the robot's calibrated profile from ``profiles``, else nominal),
and is driven open loop by the same actions. Per step the error is the RMS over observation
dimensions of (model - MuJoCo) / scale_dim. Reported: the mean error at k = 1, 5, 20 steps
over the rollouts that long; rollouts whose error ever exceeds ``tolerance`` left the
envelope and are dropped.

Action latency of a profile is not replayed (the actions before the branch point are not in
the rollout); sensor noise is not added to the MuJoCo side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from sim.calibration import Replayer, state_from_observation
from sim.episode import Episode
from sim.robots import get_task
from sim.variation import VariationProfile


@dataclasses.dataclass(frozen=True)
class PhysicsCheckConfig:
    ks: tuple[int, ...] = (1, 5, 20)
    tolerance: float = 1.0  # largest per-step normalised error a kept rollout may have
    nthread: int | None = None  # physics threads

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        if not self.ks or min(self.ks) < 1 or not self.tolerance > 0:
            raise ValueError(f"physics check: ks must be >= 1 and tolerance > 0, got {self.ks}, {self.tolerance}")


@dataclasses.dataclass
class PhysicsCheckReport:
    k_step_error: dict[int, float]  # mean over rollouts with >= k steps (NaN when none)
    k_step_count: dict[int, int]
    kept: list[Episode]
    dropped: dict[str, str]  # episode_id -> why
    step_errors: dict[str, np.ndarray]  # episode_id -> (T,) per-step error


def physics_check(
    episodes: Sequence[Episode],
    scale: np.ndarray,
    config: PhysicsCheckConfig = PhysicsCheckConfig(),
    profiles: Mapping[str, VariationProfile] | None = None,
) -> PhysicsCheckReport:
    """Check world-model ``episodes`` against MuJoCo (see the module docstring).

    scale: (obs_dim,) per-dimension observation scale (e.g. evaluate.observation_scale of the
    training episodes). profiles: robot_id -> calibrated profile, used when a rollout's
    scenario names none.
    """
    step_errors, dropped = {}, {}
    by_robot: dict[str, list[Episode]] = {}
    for ep in episodes:
        if ep.source != "worldmodel":
            raise ValueError(f"episode {ep.episode_id} has source {ep.source!r}; the physics check takes world-model rollouts")
        by_robot.setdefault(ep.metadata["robot_model"], []).append(ep)
    for robot, group in by_robot.items():
        errors = _replay_errors(robot, group, np.asarray(scale, np.float64), profiles or {}, config.nthread)
        step_errors.update(zip((ep.episode_id for ep in group), errors))
    kept = []
    for ep in episodes:
        err = step_errors[ep.episode_id]
        worst = float(np.max(err)) if np.isfinite(err).all() else float("inf")
        if worst > config.tolerance:
            dropped[ep.episode_id] = f"left the envelope: error {worst:.3g} > tolerance {config.tolerance} at step {int(np.argmax(~(err <= config.tolerance)))}"
        else:
            kept.append(ep)
    k_err, k_count = {}, {}
    for k in config.ks:
        vals = [e[k - 1] for e in step_errors.values() if len(e) >= k]
        k_count[k] = len(vals)
        k_err[k] = float(np.mean(vals)) if vals else float("nan")
    return PhysicsCheckReport(k_step_error=k_err, k_step_count=k_count, kept=kept, dropped=dropped, step_errors=step_errors)


def _replay_errors(robot: str, group: list[Episode], scale: np.ndarray, profiles, nthread) -> list[np.ndarray]:
    task = get_task(robot)
    if scale.shape != (task.obs_dim,):
        raise ValueError(f"scale must be ({task.obs_dim},) for robot {robot!r}, got {scale.shape}")
    horizon = max(ep.num_steps for ep in group)
    qpos, qvel, models, actions = [], [], [], np.zeros((len(group), horizon, task.act_dim))
    cache: dict[tuple, object] = {}
    for i, ep in enumerate(group):
        spec = ep.json_metadata("scenario")
        if "init_qpos" in spec and "init_qvel" in spec:
            qpos.append(np.asarray(spec["init_qpos"], np.float64))
            qvel.append(np.asarray(spec["init_qvel"], np.float64))
        else:
            q, v = state_from_observation(task, ep.observation[:1])
            qpos.append(q[0])
            qvel.append(v[0])
        if "profile" in spec:
            profile = VariationProfile.from_dict(spec["profile"])
        else:
            profile = profiles.get(ep.robot_id, VariationProfile())
        key = profile.physical_key()
        if key not in cache:
            cache[key] = profile.apply(task.model, task.payload_body)
        models.append(cache[key])
        actions[i, : ep.num_steps] = ep.action
    with Replayer(task, nthread) as replayer:
        sim_obs = replayer.replay(models, np.stack(qpos), np.stack(qvel), actions)
    out = []
    for i, ep in enumerate(group):
        diff = (ep.observation[1:].astype(np.float64) - sim_obs[i, : ep.num_steps]) / scale
        err = np.sqrt(np.mean(diff**2, axis=1))
        out.append(np.where(np.isfinite(err), err, np.inf))
    return out
