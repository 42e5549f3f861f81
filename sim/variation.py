"""Per-robot physical variation: what makes robot 7 differ from robot 3 in a fleet.

A :class:`VariationProfile` is a small serialisable record. Its physical part
(payload, masses, friction, actuator strength, damping) is applied to a copy of the
MjModel; its sensing/acting part (observation noise and bias, action latency) is applied
by the stepper around the policy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import numbers

import mujoco
import numpy as np

from sim.divergence import without_autoreset

PHYSICAL_FIELDS = ("payload_mass", "mass_scale", "friction_scale", "actuator_strength", "damping_scale")
# the profile as a model/policy input (:meth:`VariationProfile.context`): one bounded feature per field
CONTEXT_FIELDS = (*PHYSICAL_FIELDS, "obs_noise_std", "obs_bias", "action_latency")
CONTEXT_DIM = len(CONTEXT_FIELDS)
# the sensor model adds its bias and noise to float32 observations (float32 tops out at 3.4e38): beyond this, a bias or
# a noise draw overflowed to Inf (obs_noise_std=1e300 gave Inf observations)
SENSOR_MAX = 1e30


@dataclasses.dataclass(frozen=True)
class VariationProfile:
    payload_mass: float = 0.0  # kg added to the task's payload body (inertia scaled with it)
    mass_scale: float = 1.0  # multiplies every body's mass and inertia
    friction_scale: float = 1.0  # multiplies every geom's sliding friction
    actuator_strength: float = 1.0  # multiplies the force every actuator produces, setpoints unchanged (weak motor < 1)
    damping_scale: float = 1.0  # multiplies every joint's damping
    obs_noise_std: float = 0.0  # std of Gaussian noise added to each observation entry
    obs_bias: float = 0.0  # constant added to each observation entry (sensor bias)
    action_latency: int = 0  # control steps between the policy's action and the actuators

    def __post_init__(self):
        for f in dataclasses.fields(self):  # numbers first: a text value would fail the range checks with a TypeError
            value, kind = getattr(self, f.name), numbers.Integral if f.name == "action_latency" else numbers.Real
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"variation profile: {f.name}={value!r} is not {'an integer' if kind is numbers.Integral else 'a number'}")
            object.__setattr__(self, f.name, int(value) if kind is numbers.Integral else float(value))  # numpy scalars as Python's: JSON writes them
        checks = {
            "payload_mass": self.payload_mass >= 0,
            "mass_scale": self.mass_scale > 0,
            "friction_scale": self.friction_scale > 0,
            "actuator_strength": self.actuator_strength > 0,
            "damping_scale": self.damping_scale >= 0,
            "obs_noise_std": 0 <= self.obs_noise_std <= SENSOR_MAX,
            "obs_bias": abs(self.obs_bias) <= SENSOR_MAX,  # NaN compares False; it once fed the policy NaN at every step
            "action_latency": self.action_latency >= 0,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not ok or not np.isfinite(value):
                raise ValueError(f"variation profile: {name}={value!r} is out of range (see sim/variation.py)")

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> VariationProfile:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"variation profile: unknown fields {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VariationProfile:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> VariationProfile:
        return dataclasses.replace(self, **changes)

    def context(self) -> np.ndarray:
        """(CONTEXT_DIM,) float32 features in (-1, 1), all 0 at the nominal profile: tanh of log1p(payload),
        of the log of each scale, of 10x the sensor noise and bias, and of half the latency. A world
        model (or policy) conditioned on them tells one body from another (``policies/mbpo.py``)."""
        log = lambda x: np.log(max(x, 1e-6))  # noqa: E731  (damping_scale may be 0)
        raw = [np.log1p(self.payload_mass), log(self.mass_scale), log(self.friction_scale), log(self.actuator_strength), log(self.damping_scale),
               10.0 * self.obs_noise_std, 10.0 * self.obs_bias, 0.5 * self.action_latency]  # fmt: skip
        return np.tanh(np.asarray(raw, np.float64)).astype(np.float32)

    # -- physics ------------------------------------------------------------------------
    def physical_key(self) -> tuple[float, ...]:
        """Profiles with equal keys share one MjModel."""
        return tuple(float(getattr(self, f)) for f in PHYSICAL_FIELDS)

    def apply(self, nominal: mujoco.MjModel, payload_body: str) -> mujoco.MjModel:
        """A new MjModel: ``nominal`` with this profile's physical variation applied, and MuJoCo's automatic reset
        on bad values off, so that a world this body cannot integrate stays diverged where the stepper and the
        calibration's replay see it (sim/divergence.py), instead of restarting from qpos0 as if nothing happened."""
        model = without_autoreset(copy.copy(nominal))
        model.body_mass[:] = nominal.body_mass * self.mass_scale
        model.body_inertia[:] = nominal.body_inertia * self.mass_scale
        if self.payload_mass:
            body = model.body(payload_body).id
            if model.body_weldid[body] == 0:
                raise ValueError(
                    f"variation profile: payload_mass={self.payload_mass} on {payload_body!r}, which is the world or fixed to it, changes "
                    "nothing; give the task a moving payload_body (docs/robots.md)"
                )
            base = model.body_mass[body]
            model.body_inertia[body] *= (base + self.payload_mass) / max(base, 1e-9)
            model.body_mass[body] = base + self.payload_mass
        model.geom_friction[:, 0] = nominal.geom_friction[:, 0] * self.friction_scale
        if self.actuator_strength != 1.0:
            _scale_actuator_force(model, nominal, self.actuator_strength)
        model.dof_damping[:] = nominal.dof_damping * self.damping_scale
        mujoco.mj_setConst(model, mujoco.MjData(model))
        return model

    def corrupt_observation(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sensor model: obs + bias + N(0, std^2) noise (obs: (..., obs_dim) float32)."""
        if self.obs_noise_std == 0.0 and self.obs_bias == 0.0:
            return obs
        noise = rng.standard_normal(obs.shape) * self.obs_noise_std if self.obs_noise_std else 0.0
        return (obs + self.obs_bias + noise).astype(np.float32)


NOMINAL = VariationProfile()

_FIXED_OR_AFFINE = (int(mujoco.mjtGain.mjGAIN_FIXED), int(mujoco.mjtGain.mjGAIN_AFFINE))
_NONE_OR_AFFINE = (int(mujoco.mjtBias.mjBIAS_NONE), int(mujoco.mjtBias.mjBIAS_AFFINE))


def _scale_actuator_force(model: mujoco.MjModel, nominal: mujoco.MjModel, strength: float) -> None:
    """Every actuator of ``model`` produces ``strength`` times the force of ``nominal``'s, at the same
    control, state and setpoint: the gain and the bias scale together (a ``<position kp>`` servo
    pushes with s * kp * (ctrl - q) and still settles at ctrl), and so does a force limit.

    The gear stays: it maps joint coordinates onto the actuator's length as well as force onto
    torque, so scaling it moved a servo's setpoint (q = ctrl / gear) and actuator length sensors.
    A muscle scales its peak force (``gainprm[2]``, or ``gainprm[3]`` where that force is derived
    from it). Gain or bias types whose force is not linear in their parameters are refused."""
    for i in range(nominal.nu):
        gain, bias = int(nominal.actuator_gaintype[i]), int(nominal.actuator_biastype[i])
        muscle = gain == int(mujoco.mjtGain.mjGAIN_MUSCLE) and bias in (*_NONE_OR_AFFINE, int(mujoco.mjtBias.mjBIAS_MUSCLE))
        if muscle:
            k = 2 if nominal.actuator_gainprm[i, 2] > 0 else 3  # force, or the scale it is derived from at run time
            model.actuator_gainprm[i, k] = nominal.actuator_gainprm[i, k] * strength
            if bias == int(mujoco.mjtBias.mjBIAS_MUSCLE):
                model.actuator_biasprm[i, k] = nominal.actuator_biasprm[i, k] * strength
            elif bias == int(mujoco.mjtBias.mjBIAS_AFFINE):
                model.actuator_biasprm[i, :3] = nominal.actuator_biasprm[i, :3] * strength
        elif gain in _FIXED_OR_AFFINE and bias in _NONE_OR_AFFINE:
            model.actuator_gainprm[i, :3] = nominal.actuator_gainprm[i, :3] * strength
            model.actuator_biasprm[i, :3] = nominal.actuator_biasprm[i, :3] * strength
        else:
            name = nominal.actuator(i).name or str(i)
            raise ValueError(
                f"variation profile: actuator_strength={strength} cannot weaken actuator {name!r} (gain type "
                f"{mujoco.mjtGain(gain).name}, bias type {mujoco.mjtBias(bias).name}): only fixed or affine gains and biases, and "
                "muscles, scale with it; model that actuator as <motor>, <position>, <velocity> or <general> with an affine gain"
            )
        if nominal.actuator_forcelimited[i]:
            model.actuator_forcerange[i] = nominal.actuator_forcerange[i] * strength


def contexts(profiles) -> np.ndarray:
    """(len(profiles), CONTEXT_DIM) float32: each profile's :meth:`VariationProfile.context`."""
    return np.stack([p.context() for p in profiles]).astype(np.float32).reshape(-1, CONTEXT_DIM)
