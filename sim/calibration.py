"""Calibration, real to sim: estimate a robot's physical VariationProfile from its telemetry.

Method. Telemetry episodes are cut into short windows (``window`` control steps). Each
window starts from the recorded state (the ``qpos``/``qvel`` extras when the episode has
them, otherwise a state reconstructed from the observation, see
:func:`state_from_observation`) and replays the recorded actions open loop in MuJoCo; the
loss of a candidate profile is the mean squared difference between the replayed and the
recorded observations, each dimension divided by its standard deviation in the telemetry.
Short windows keep chaotic divergence (contacts) from swamping the parameter signal.

Search: the cross-entropy method over the calibrated fields (scale fields in log space,
``payload_mass`` in kg). Every iteration evaluates the whole population on every window in
one batched ``mujoco.rollout`` call over a list of MjModels (one per candidate profile).

After CEM, a few Levenberg-Marquardt steps polish the estimate (CEM finds the basin, its
sampling noise limits precision).

Identifiability: the Gauss-Newton Hessian of the loss at the estimate says, per field, how
much it changes the observations, and how much of that the other fields cannot mimic. A
field with no measurable effect (friction on a robot without contacts) or an effect below
the noise of the fit (link masses next to a large joint armature, with sensor noise) keeps
its base value; a field only determined jointly with others (mass, motor strength and
damping of a robot without armature or springs) keeps its estimate but is flagged. All are
reported, not hidden.

numpy + mujoco only (this module lives in the sim floor).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence

import mujoco
import numpy as np
from mujoco import rollout as mj_rollout

from sim.divergence import diverged_steps
from sim.episode import Episode
from sim.robots import PhysicsState, Task, get_task
from sim.variation import VariationProfile

STATE_SPEC = mujoco.mjtState.mjSTATE_FULLPHYSICS
LOG_FIELDS = ("mass_scale", "friction_scale", "actuator_strength", "damping_scale")
LINEAR_FIELDS = ("payload_mass",)
# not a model parameter: the replay shifts the rebuilt start states and the replayed observations by it
SENSOR_FIELDS = ("obs_bias",)
CALIBRATABLE = LOG_FIELDS + LINEAR_FIELDS + SENSOR_FIELDS

# -- state from observation ---------------------------------------------------------------
StateFromObs = Callable[[Task, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _pendulum(task: Task, obs: np.ndarray):
    nq = task.model.nq
    return obs[:, :nq], obs[:, nq:]


def _half_cheetah(task: Task, obs: np.ndarray):  # rootx is not observed; the floor is flat, so x = 0
    nq = task.model.nq
    return np.concatenate([np.zeros((len(obs), 1)), obs[:, : nq - 1]], 1), obs[:, nq - 1 :]


def _ant(task: Task, obs: np.ndarray):  # x, y are not observed; the floor is flat, so x = y = 0
    nq = task.model.nq
    return np.concatenate([np.zeros((len(obs), 2)), obs[:, : nq - 2]], 1), obs[:, nq - 2 :]


def _reacher(task: Task, obs: np.ndarray):  # obs: cos(2), sin(2), target xy, arm qvel(2), tip - target(2)
    angles = np.arctan2(obs[:, 2:4], obs[:, 0:2])
    qpos = np.concatenate([angles, obs[:, 4:6]], 1)
    qvel = np.concatenate([obs[:, 6:8], np.zeros((len(obs), 2))], 1)  # the target never moves
    return qpos, qvel


_STATE_FROM_OBS: dict[str, StateFromObs] = {"pendulum": _pendulum, "half_cheetah": _half_cheetah, "ant": _ant, "reacher": _reacher}


def register_state_from_observation(robot: str, fn: StateFromObs) -> None:
    """Teach calibration how to rebuild (qpos (N, nq), qvel (N, nv)) from observations (N, obs_dim) of ``robot``."""
    _STATE_FROM_OBS[robot] = fn
    _CHECKED.pop(robot, None)


_CHECKED: dict[str, StateFromObs] = {}  # robot -> the map that passed _check_map

NO_STATE_MAP = (
    "record qpos/qvel extras in its telemetry (the flywheel's simulated robots do with loop.record_state=true, flywheel-robot's "
    "with robot.record_state=true, a real robot by passing its encoders' joint state to EpisodeRecorder), or register an "
    "observation->state map with sim.calibration.register_state_from_observation (docs/robots.md)"
)


def has_state_map(robot: str) -> bool:
    """Whether an observation->state map is registered for robot model ``robot`` (built in, or registered)."""
    return robot in _STATE_FROM_OBS


def check_state_map(task: Task) -> None:
    """ValueError unless ``task`` has an observation->state map that reproduces clean observations
    (:func:`_check_map`): what calibration and scenarios need from telemetry without qpos/qvel extras."""
    fn = _STATE_FROM_OBS.get(task.name)
    if fn is None:
        raise ValueError(f"robot {task.name!r} has no observation->state map: {NO_STATE_MAP}")
    if _CHECKED.get(task.name) is not fn:
        _check_map(task, fn)
        _CHECKED[task.name] = fn


def state_from_observation(task: Task, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A physics state (qpos (N, nq), qvel (N, nv)) whose observation is ``obs`` (N, obs_dim).

    Unobserved coordinates that the dynamics do not depend on (a walker's position on a flat
    floor) are set to 0. Telemetry is noisy and may be offset, and where an observation has
    derived entries (the reacher's cos/sin and fingertip offset) a noisy one matches no state
    exactly: the map gives the state it reads, and nothing here rejects a reading for its noise.
    The map itself is checked, once per robot, on clean observations of states drawn from the
    robot's own resets (:func:`_check_map`): a wrong map raises ValueError.
    """
    obs = np.asarray(obs, np.float64)
    if obs.ndim != 2 or obs.shape[1] != task.obs_dim:
        raise ValueError(f"observations must be (N, {task.obs_dim}) for robot {task.name!r}, got {obs.shape}")
    check_state_map(task)
    fn = _STATE_FROM_OBS[task.name]
    return tuple(np.ascontiguousarray(a, np.float64) for a in fn(task, obs))  # type: ignore[return-value]


def _check_map(task: Task, fn: StateFromObs, samples: int = 16, atol: float = 1e-4) -> None:
    """ValueError unless ``fn`` rebuilds, from the clean observations of ``samples`` reset states of
    ``task`` (noise scale 2, so that every coordinate moves), states with the same observations."""
    rng = np.random.default_rng(0)
    states = [task.initial_state(rng, 2.0, None) for _ in range(samples)]
    obs = observe_states(task, np.stack([q for q, _ in states]), np.stack([v for _, v in states]))
    check = observe_states(task, *(np.ascontiguousarray(a, np.float64) for a in fn(task, obs)))
    err = np.abs(check - obs) / (1.0 + np.abs(obs))
    if not err.max(initial=0.0) <= atol:
        row, dim = np.unravel_index(np.argmax(err), err.shape)
        raise ValueError(
            f"robot {task.name!r}: its observation->state map does not reproduce a clean observation (dim {dim}: "
            f"{check[row, dim]:.6g} vs {obs[row, dim]:.6g}); fix the map given to register_state_from_observation, "
            "or record qpos/qvel extras in the telemetry instead"
        )


def observe_states(task: Task, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
    """The task's observation (N, obs_dim) of states qpos (N, nq), qvel (N, nv) on the nominal model."""
    m = task.model
    d = mujoco.MjData(m)
    sensordata = np.zeros((len(qpos), m.nsensordata))
    if m.nsensordata:
        for i in range(len(qpos)):
            d.qpos[:], d.qvel[:] = qpos[i], qvel[i]
            mujoco.mj_forward(m, d)
            sensordata[i] = d.sensordata
    return task.observe(PhysicsState(qpos, qvel, sensordata)).astype(np.float64)


# -- open-loop replay ---------------------------------------------------------------------
class Replayer:
    """Batched open-loop replay of action sequences from given states, over many models at once.

    One ``mujoco.rollout`` call on a persistent thread pool per :meth:`replay`. Use as a
    context manager (or call :meth:`close`).
    """

    def __init__(self, task: Task, nthread: int | None = None):
        self.task = task
        m = task.model
        self.nthread = max(1, nthread or 1)
        self._pool = mj_rollout.Rollout(nthread=self.nthread)
        self._datas = [mujoco.MjData(m) for _ in range(self.nthread)]
        self._state0 = np.empty(mujoco.mj_stateSize(m, STATE_SPEC))
        mujoco.mj_getState(m, self._datas[0], self._state0, STATE_SPEC)
        low, high = m.actuator_ctrlrange[:, 0], m.actuator_ctrlrange[:, 1]
        self._mid, self._half = (high + low) / 2, (high - low) / 2

    def replay(self, models: Sequence[mujoco.MjModel], qpos: np.ndarray, qvel: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Observations (N, H, obs_dim) after each of H control steps (NaN from the step where a world diverged on:
        sim/divergence.py, where a blow-up once came back finite, as MuJoCo's reset to qpos0 or a state frozen by the rollout).

        models: N MjModels (same robot, any variation; :meth:`VariationProfile.apply`'s have MuJoCo's auto-reset off, as
        :func:`sim.divergence.diverged_steps` wants); qpos (N, nq), qvel (N, nv) start states;
        actions (N, H, act_dim) in [-1, 1] as applied to the actuators.
        """
        task, m = self.task, self.task.model
        n, h = actions.shape[:2]
        if not (len(models) == len(qpos) == len(qvel) == n):
            raise ValueError(f"replay: {len(models)} models, {len(qpos)} qpos, {len(qvel)} qvel and {n} action rows must agree")
        state = np.tile(self._state0, (n, 1))
        state[:, 1 : 1 + m.nq], state[:, 1 + m.nq : 1 + m.nq + m.nv] = qpos, qvel
        ctrl = self._mid + self._half * np.clip(actions, -1.0, 1.0)
        ctrl = np.repeat(ctrl, task.frame_skip, axis=1)
        states, sensors = self._pool.rollout(
            list(models), self._datas, state, ctrl, nstep=h * task.frame_skip, initial_warmstart=np.zeros((n, m.nv))
        )
        ends = np.arange(task.frame_skip - 1, h * task.frame_skip, task.frame_skip)
        st = states[:, ends].reshape(n * h, -1)
        se = sensors[:, ends].reshape(n * h, -1) if sensors is not None else np.zeros((n * h, 0))
        physics = PhysicsState(st[:, 1 : 1 + m.nq], st[:, 1 + m.nq : 1 + m.nq + m.nv], se)
        with np.errstate(invalid="ignore", over="ignore"):
            obs = task.observe(physics).astype(np.float64).reshape(n, h, -1)
        diverged = diverged_steps(states, m.nq, m.nv)[:, ends]  # (N, H): at each control step's end
        obs[diverged | ~np.isfinite(st).all(1).reshape(n, h)] = np.nan
        return obs

    def close(self) -> None:
        self._pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- calibration --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    params: tuple[str, ...] = LOG_FIELDS  # VariationProfile fields to estimate
    scale_bounds: tuple[float, float] = (0.25, 4.0)  # range of every *_scale / actuator_strength field
    payload_max: float = 5.0  # kg, upper bound of payload_mass
    bias_max: float = 0.2  # bound of |obs_bias| when it is fitted in the replay (a params entry)
    window: int = 8  # control steps per replay window
    windows_per_episode: int = 4
    max_windows: int = 200
    search_windows: int = 32  # CEM scores candidates on a seeded subset of this many windows; the polish and verdicts use all
    population: int = 64
    num_elites: int = 8
    iterations: int = 15
    init_std: float = 0.3  # CEM std at start: log units for scale fields (0.3 ~ 30 %)
    payload_init_std: float = 1.0  # kg
    bias_init_std: float = 0.02  # CEM std at start for obs_bias
    momentum: float = 0.5  # weight of the previous mean/std in each CEM update (higher: slower collapse)
    min_std: float = 0.002  # stop when every field's std is below this
    loss_tol: float = 1e-8  # or when the loss (normalised MSE) is below this: a fit to 1e-4 of each obs std
    patience: int = 4  # or when the best loss improved by < 1 % in this many iterations
    polish_steps: int = 8  # Levenberg-Marquardt steps from the CEM estimate (0: none)
    identifiability_tol: float = 1e-3  # least independence of an identifiable field, see identifiability()
    min_significance: float = 100.0  # least significance of an identifiable field, see identifiability()
    seed: int = 0
    nthread: int | None = None  # physics threads (None: 1)
    sensor_noise: bool = True  # also estimate obs_noise_std from the telemetry (estimate_sensor_noise)
    sensor_noise_floor: float = 0.01  # estimates below this are the dynamics, not noise: 0
    sensor_bias: bool = True  # also estimate obs_bias (a constant sensor offset) from kinematics (estimate_sensor_bias), unless params fits it
    sensor_bias_floor: float = 0.005  # smaller offsets (or ones within 3 standard errors of 0) are reported as 0

    def __post_init__(self):
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "scale_bounds", tuple(self.scale_bounds))
        unknown = [p for p in self.params if p not in CALIBRATABLE]
        if unknown or not self.params:
            raise ValueError(f"calibration: params {unknown or '()'} invalid; choose from {CALIBRATABLE}")
        if not 0 < self.scale_bounds[0] < 1 < self.scale_bounds[1]:
            raise ValueError(f"calibration: scale_bounds must bracket 1, got {self.scale_bounds}")
        if not 1 <= self.num_elites < self.population:
            raise ValueError(f"calibration: need 1 <= num_elites < population, got {self.num_elites}, {self.population}")
        for name in ("window", "windows_per_episode", "max_windows", "search_windows", "iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"calibration: {name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass
class CalibrationResult:
    robot: str
    profile: VariationProfile  # base profile with the estimated fields replaced
    estimates: dict[str, float]
    identifiable: dict[str, bool]
    diagnostics: Identifiability  # effect, independence, significance per field, and notes on the others
    loss: float  # at the estimate (normalised MSE per observation entry)
    base_loss: float  # of the base profile, for comparison
    history: list[float]  # best loss after each CEM iteration (on its search windows) and after the polish on all (when it ran)
    num_windows: int
    evaluations: int  # candidate profiles simulated
    fitted: dict[str, float] = dataclasses.field(default_factory=dict)  # the fit before the verdicts reset fields to the base

    @property
    def notes(self) -> dict[str, str]:
        """Why each non-identifiable field is not (see :func:`identifiability`)."""
        return self.diagnostics.notes

    def relative_errors(self, truth: VariationProfile) -> dict[str, float]:
        """|estimate - truth| / truth per estimated field (absolute error in kg for payload_mass when truth is 0)."""
        out = {}
        for name, value in self.estimates.items():
            true = float(getattr(truth, name))
            out[name] = abs(value - true) / abs(true) if true else abs(value - true)
        return out

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["profile"] = self.profile.to_dict()
        data["diagnostics"] = dataclasses.asdict(self.diagnostics)
        return data

    def to_json(self) -> str:
        """JSON for an Episode's ``calibration`` metadata or a fleet record."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CalibrationResult:
        data = json.loads(text)
        return cls(**{**data, "profile": VariationProfile.from_dict(data["profile"]), "diagnostics": Identifiability(**data["diagnostics"])})


def calibrate_job(job: dict) -> str:
    """One calibration as a fan-out job (a Ray task): {"robot", "episodes": [Episode bytes], "config": CalibrationConfig
    fields, "base": profile dict, "start": profile dict or None} -> CalibrationResult JSON. Plain bytes and JSON in and
    out, no pickled objects."""
    episodes = [Episode.from_bytes(blob) for blob in job["episodes"]]
    start = None if job.get("start") is None else VariationProfile.from_dict(job["start"])
    result = calibrate(job["robot"], episodes, CalibrationConfig(**job["config"]), VariationProfile.from_dict(job.get("base", {})), start)
    return result.to_json()


@dataclasses.dataclass(frozen=True)
class Windows:
    """M replay windows: start qpos (M, nq), qvel (M, nv), actions (M, W, act_dim), target obs (M, W, obs_dim);
    start_obs (M, obs_dim), the observations the start states were rebuilt from (None: recorded states)."""

    qpos: np.ndarray
    qvel: np.ndarray
    actions: np.ndarray
    target: np.ndarray
    start_obs: np.ndarray | None = None

    def subset(self, count: int, seed: int) -> Windows:
        """A seeded subset of ``count`` windows (all of them when there are no more)."""
        if count >= len(self.qpos):
            return self
        pick = np.sort(np.random.default_rng(seed).choice(len(self.qpos), count, replace=False))
        return Windows(*(None if a is None else a[pick] for a in (self.qpos, self.qvel, self.actions, self.target, self.start_obs)))


def make_windows(task: Task, episodes: Sequence[Episode], config: CalibrationConfig, latency: int = 0) -> Windows:
    """Cut seeded replay windows out of ``episodes`` (telemetry of one robot of model ``task``).

    With an action latency of L steps, the actuators at step t got action t - L, so windows
    start at t >= L and replay the actions as applied. Start states come from the qpos/qvel
    extras when every chosen window has them, else all are rebuilt from observations. Where no
    episode is ``config.window`` steps long (a robot that falls fast), the windows are as long as
    the longest episode allows.
    """
    rng = np.random.default_rng(config.seed)
    longest = max((ep.num_steps - latency for ep in episodes), default=0)
    if longest < 1:
        raise ValueError(f"no episode has more than {latency} steps (the action latency): calibration needs telemetry with at least {latency + 1}")
    w = min(config.window, longest)  # a robot whose episodes all end early (it falls fast) is still calibrated, on shorter windows
    chosen = []
    for ep in episodes:
        if ep.metadata["robot_model"] != task.name:
            raise ValueError(f"episode {ep.episode_id} is of robot model {ep.metadata['robot_model']!r}, not {task.name!r}")
        starts = np.arange(latency, ep.num_steps - w + 1)
        if len(starts):
            picks = rng.choice(starts, min(config.windows_per_episode, len(starts)), replace=False)
            chosen += [(ep, int(t)) for t in sorted(picks)]
    if len(chosen) > config.max_windows:
        chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), config.max_windows, replace=False))]
    have_state = all("qpos" in ep.extras and "qvel" in ep.extras for ep, _ in chosen)
    start_obs = None
    if have_state:
        qpos = np.stack([ep.extras["qpos"][t] for ep, t in chosen]).astype(np.float64)
        qvel = np.stack([ep.extras["qvel"][t] for ep, t in chosen]).astype(np.float64)
    else:
        start_obs = np.stack([ep.observation[t] for ep, t in chosen]).astype(np.float64)
        qpos, qvel = state_from_observation(task, start_obs)
    actions = np.stack([ep.action[t - latency : t - latency + w] for ep, t in chosen]).astype(np.float64)
    target = np.stack([ep.observation[t + 1 : t + 1 + w] for ep, t in chosen]).astype(np.float64)
    return Windows(qpos=qpos, qvel=qvel, actions=actions, target=target, start_obs=start_obs)


class _Objective:
    """Loss of candidate parameter vectors (P, D) on the windows: one batched replay per call."""

    def __init__(self, task: Task, windows: Windows, params: tuple[str, ...], base: VariationProfile, replayer: Replayer):
        self.task, self.windows, self.params, self.base, self.replayer = task, windows, params, base, replayer
        flat = windows.target.reshape(-1, windows.target.shape[-1])
        self.scale = np.maximum(flat.std(0), 1e-4)
        self.evaluations = 0

    def on(self, windows: Windows) -> _Objective:
        """The same loss (the same normalisation) on other windows."""
        other = _Objective(self.task, windows, self.params, self.base, self.replayer)
        other.scale = self.scale
        return other

    def profile(self, theta: np.ndarray) -> VariationProfile:
        changes = {}
        for name, value in zip(self.params, theta):
            changes[name] = float(np.exp(value)) if name in LOG_FIELDS else float(value)
        return self.base.replace(**changes)

    def residuals(self, thetas: np.ndarray) -> np.ndarray:
        """(P, R) normalised observation errors of each candidate over all windows, steps and dims.

        A candidate sensor offset b (obs_bias) is taken out of the observations a start state is
        rebuilt from and put back on the replayed ones: through the dynamics (a tilted pendulum
        falls) and the kinematics (positions integrate velocities) it shows even in short windows.
        """
        w = self.windows
        m, p = len(w.qpos), len(thetas)
        bias = thetas[:, self.params.index("obs_bias")] if "obs_bias" in self.params else np.zeros(p)
        models = [self.profile(t).apply(self.task.model, self.task.payload_body) for t in thetas]
        batch_models = [model for model in models for _ in range(m)]
        if w.start_obs is not None and bias.any():
            qpos, qvel = state_from_observation(self.task, (w.start_obs[None] - bias[:, None, None]).reshape(p * m, -1))
        else:
            qpos, qvel = np.tile(w.qpos, (p, 1)), np.tile(w.qvel, (p, 1))
        obs = self.replayer.replay(batch_models, qpos, qvel, np.tile(w.actions, (p, 1, 1)))
        obs = obs.reshape(p, m, *w.target.shape[1:]) + bias[:, None, None, None]
        self.evaluations += p
        return ((obs - w.target) / self.scale).reshape(p, -1)

    def __call__(self, thetas: np.ndarray) -> np.ndarray:
        """(P,) mean squared normalised error (inf where a candidate diverged)."""
        loss = np.mean(self.residuals(thetas) ** 2, axis=1)
        return np.where(np.isfinite(loss), loss, np.inf)


def calibrate(
    robot: str,
    episodes: Sequence[Episode],
    config: CalibrationConfig = CalibrationConfig(),
    base: VariationProfile = VariationProfile(),
    start: VariationProfile | None = None,
) -> CalibrationResult:
    """Estimate ``config.params`` of robot model ``robot`` from telemetry ``episodes`` (see the module docstring).

    ``base`` supplies every field not estimated (and the action latency used in replay), and the
    value of any field the data cannot identify. The CEM search starts at ``start``'s values (a
    warm start: the robot's previous calibration), else at ``base``'s; the start moves only where
    the search begins, so a robot whose body did not change stalls early and stops.
    """
    task = get_task(robot)
    if not episodes:
        raise ValueError("calibration needs telemetry episodes; got none")
    for name in config.params:
        if name in LOG_FIELDS and getattr(base, name) <= 0:
            raise ValueError(f"calibration: base {name}={getattr(base, name)} must be > 0 to be searched in log space")
    windows = make_windows(task, episodes, config, base.action_latency)
    space = _space(config)
    mean = np.clip(_theta(start or base, config.params), space.low, space.high)
    std = space.init_std.copy()
    rng = np.random.default_rng(config.seed)
    with Replayer(task, config.nthread) as replayer:
        objective = _Objective(task, windows, config.params, base, replayer)
        search = objective.on(windows.subset(config.search_windows, config.seed))
        base_loss = float(objective(mean[None])[0])
        best_theta, best_loss, history = mean.copy(), float(search(mean[None])[0]), []
        for _ in range(config.iterations):
            samples = np.clip(mean + std * rng.standard_normal((config.population - 2, len(mean))), space.low, space.high)
            thetas = np.concatenate([mean[None], best_theta[None], samples])
            losses = search(thetas)
            order = np.argsort(losses, kind="stable")
            if losses[order[0]] < best_loss:
                best_loss, best_theta = float(losses[order[0]]), thetas[order[0]].copy()
            elites = thetas[order[: config.num_elites]]
            mean = config.momentum * mean + (1 - config.momentum) * elites.mean(0)
            std = config.momentum * std + (1 - config.momentum) * elites.std(0)
            history.append(best_loss)
            if best_loss < config.loss_tol and search is not objective and objective(best_theta[None])[0] >= config.loss_tol:
                # the subset fits perfectly where all the windows do not (a payload that shows only in contacts the
                # subset never made): search on every window from here, instead of stopping on a blind subset
                search, best_loss = objective, float(objective(best_theta[None])[0])
                history[-1] = best_loss
                continue
            stalled = len(history) > config.patience and best_loss > 0.99 * history[-1 - config.patience]
            if (std < config.min_std).all() or best_loss < config.loss_tol or stalled:
                break
        best_loss = float(objective(best_theta[None])[0])
        best_theta, best_loss = polish(objective, best_theta, best_loss, space, config.polish_steps)
        if config.polish_steps:
            history.append(best_loss)
        ident = identifiability(objective, best_theta, best_loss, config)
    fitted_profile = objective.profile(best_theta)
    fitted = {p: float(getattr(fitted_profile, p)) for p in config.params}
    for i, name in enumerate(config.params):
        if ident.keep_base[name]:
            best_theta[i] = _theta(base, [name])[0]
    profile = objective.profile(best_theta)
    estimates, identifiable = {p: float(getattr(profile, p)) for p in config.params}, dict(ident.identifiable)
    if config.sensor_noise:
        profile = profile.replace(obs_noise_std=estimate_sensor_noise(episodes, config.sensor_noise_floor))
        estimates["obs_noise_std"], identifiable["obs_noise_std"] = profile.obs_noise_std, True
    if config.sensor_bias and "obs_bias" not in config.params:
        bias = estimate_sensor_bias(task, episodes, config.sensor_bias_floor)
        profile = profile.replace(obs_bias=0.0 if bias is None else bias)
        estimates["obs_bias"], identifiable["obs_bias"] = profile.obs_bias, bias is not None
    return CalibrationResult(
        robot=robot,
        profile=profile,
        estimates=estimates,
        identifiable=identifiable,
        diagnostics=ident,
        loss=best_loss,
        base_loss=base_loss,
        history=history,
        num_windows=len(windows.qpos),
        evaluations=objective.evaluations + search.evaluations,
        fitted=fitted,
    )


def estimate_sensor_noise(episodes: Sequence[Episode], floor: float = 0.01) -> float:
    """The std of white observation noise (``VariationProfile.obs_noise_std``) from telemetry alone.

    White noise of std s adds 6 s^2 to the variance of an observation's second difference
    o[t+1] - 2 o[t] + o[t-1], while a smooth signal adds only (acceleration * dt^2)^2. Per
    dimension a robust std of the second difference (1.4826 x MAD) / sqrt(6) bounds s from above;
    the smoothest dimension's bound is the estimate. Below ``floor`` it is the dynamics: 0.
    """
    diffs = [np.diff(ep.observation.astype(np.float64), n=2, axis=0) for ep in episodes if ep.observation.shape[0] >= 3]
    if not diffs:
        return 0.0
    d2 = np.concatenate(diffs)
    mad = np.median(np.abs(d2 - np.median(d2, axis=0)), axis=0)
    estimate = float(np.min(1.4826 * mad / math.sqrt(6.0)))
    return round(estimate, 6) if estimate >= floor else 0.0


def estimate_sensor_bias(task: Task, episodes: Sequence[Episode], floor: float = 0.005) -> float | None:
    """The constant sensor offset b (``VariationProfile.obs_bias``, the same on every observation
    entry) from telemetry alone; None where these observations cannot show it.

    With true states in the telemetry (qpos/qvel extras): the mean of observation minus the
    state's observation. Otherwise from kinematics: for each hinge or slide joint whose position
    and velocity are both observed as themselves (rebuilding the state from an observation shifted
    by d shifts both by d; a joint never observed, like a walker's x, is left out), positions
    integrate velocities, so over an episode of T steps
    b = (dt * sum_t (v[t] + v[t+1]) / 2 - (q[T] - q[0])) / (dt * T): the offset in the velocity
    accumulates, the one in the positions cancels, and white noise averages out. Estimates are
    pooled (over rows, or joints and episodes weighted by length); offsets below ``floor``, or
    within three standard errors of 0, are reported as 0.
    """
    episodes = [ep for ep in episodes if ep.num_steps >= 2]
    if not episodes:
        return None
    if all("qpos" in ep.extras and "qvel" in ep.extras for ep in episodes):
        gaps = [ep.observation[:-1] - observe_states(task, ep.extras["qpos"][: ep.num_steps], ep.extras["qvel"][: ep.num_steps]) for ep in episodes]
        values = np.concatenate(gaps).mean(1)
        weights = np.ones(len(values))
    else:
        try:
            values, weights = _bias_per_joint_episode(task, episodes)
        except ValueError:  # observations no state reproduces (derived entries, like the reacher's): not shown
            return None
        if not len(values):
            return None
    estimate = float(np.average(values, weights=weights))
    spread = math.sqrt(float(np.average((values - estimate) ** 2, weights=weights)))
    stderr = spread / math.sqrt(max(len(values) - 1, 1))
    return round(estimate, 6) if abs(estimate) >= max(floor, 3.0 * stderr) else 0.0


def _bias_per_joint_episode(task: Task, episodes: Sequence[Episode]) -> tuple[np.ndarray, np.ndarray]:
    """(values, weights): the kinematic offset estimate of each (observed joint, episode), weighted by length."""
    probe = np.concatenate([ep.observation[:1] for ep in episodes]).astype(np.float64)
    (q0, v0), (q1, v1) = state_from_observation(task, probe), state_from_observation(task, probe + 0.01)
    m, slide_or_hinge = task.model, (int(mujoco.mjtJoint.mjJNT_SLIDE), int(mujoco.mjtJoint.mjJNT_HINGE))
    joints = [
        (qa, da)
        for qa, da, kind in zip(m.jnt_qposadr.tolist(), m.jnt_dofadr.tolist(), m.jnt_type.tolist())
        if kind in slide_or_hinge and np.allclose(q1[:, qa] - q0[:, qa], 0.01, atol=1e-6) and np.allclose(v1[:, da] - v0[:, da], 0.01, atol=1e-6)
    ]
    values, weights, dt = [], [], task.control_dt
    for ep in episodes if joints else []:
        qpos, qvel = state_from_observation(task, ep.observation.astype(np.float64))
        for qa, da in joints:
            v = qvel[:, da]
            values.append((dt * 0.5 * (v[:-1] + v[1:]).sum() - (qpos[-1, qa] - qpos[0, qa])) / (dt * ep.num_steps))
            weights.append(float(ep.num_steps))
    return np.array(values), np.array(weights)


def _jacobian(objective: _Objective, theta: np.ndarray, space: _Space) -> tuple[np.ndarray, np.ndarray]:
    """Residuals r (R,) at ``theta`` and their finite-difference Jacobian J (R, D), from one batched replay.

    Central differences, clipped to [low, high]: at a bound (payload 0, say) the difference is one-sided.
    """
    d, h = len(theta), space.step
    plus = [np.minimum(theta + h[i] * np.eye(d)[i], space.high) for i in range(d)]
    minus = [np.maximum(theta - h[i] * np.eye(d)[i], space.low) for i in range(d)]
    res = objective.residuals(np.array([theta] + [p for pair in zip(plus, minus) for p in pair]))
    jac = np.stack([(res[1 + 2 * i] - res[2 + 2 * i]) / (plus[i][i] - minus[i][i]) for i in range(d)], axis=1)
    return res[0], jac


def polish(objective: _Objective, theta: np.ndarray, loss: float, space: _Space, steps: int) -> tuple[np.ndarray, float]:
    """Levenberg-Marquardt refinement of a CEM estimate; each step tries four dampings in one batch.

    CEM finds the basin; its sampling noise limits precision. Returns (theta, loss), never worse.
    A field at a bound that the gradient pushes further out is held there (projected steps), so
    one pinned field (damping at its lower bound, say) does not stall the others.
    """
    for _ in range(steps):
        res, jac = _jacobian(objective, theta, space)
        if not (np.isfinite(res).all() and np.isfinite(jac).all()):
            break
        a, g = jac.T @ jac, jac.T @ res
        pinned = ((theta <= space.low) & (g > 0)) | ((theta >= space.high) & (g < 0))
        a[pinned, :], a[:, pinned], g[pinned] = 0.0, 0.0, 0.0
        a[pinned, pinned] = 1.0
        scale = np.diag(a) + 1e-12 * max(np.trace(a), 1e-30)
        candidates = np.array([np.clip(theta - np.linalg.solve(a + lam * np.diag(scale), g), space.low, space.high) for lam in (1e-4, 1e-2, 1.0, 1e2)])
        losses = objective(candidates)
        best = int(np.argmin(losses))
        if not losses[best] < loss:
            break
        improvement = (loss - losses[best]) / max(loss, 1e-300)
        theta, loss = candidates[best], float(losses[best])
        if improvement < 1e-6:
            break
    return theta, loss


@dataclasses.dataclass(frozen=True)
class _Space:
    """Per calibrated field (config.params order): search bounds, CEM start std, finite-difference
    step, and the change identifiability() calls a field's effect (10 %, 0.1 kg, 0.01)."""

    low: np.ndarray
    high: np.ndarray
    init_std: np.ndarray
    step: np.ndarray
    delta: np.ndarray


def _space(config: CalibrationConfig) -> _Space:
    lo, hi = math.log(config.scale_bounds[0]), math.log(config.scale_bounds[1])
    table = {  # kind: (low, high, init_std, step, delta)
        "log": (lo, hi, config.init_std, 0.01, math.log(1.1)),
        "payload": (0.0, config.payload_max, config.payload_init_std, 0.01, 0.1),
        "bias": (-config.bias_max, config.bias_max, config.bias_init_std, 0.002, 0.01),
    }
    rows = np.array([table["log" if p in LOG_FIELDS else "bias" if p in SENSOR_FIELDS else "payload"] for p in config.params])
    return _Space(*rows.T)


def _theta(profile: VariationProfile, params: Sequence[str]) -> np.ndarray:
    """``profile``'s values of ``params`` in search coordinates (log for the scale fields)."""
    return np.array([math.log(getattr(profile, p)) if p in LOG_FIELDS else float(getattr(profile, p)) for p in params])


@dataclasses.dataclass(frozen=True)
class Identifiability:
    """Per field: effect (loss rise for a 10 % change alone), independence (share of that rise the
    other fields cannot undo, 0..1), significance (the rise that survives compensation, times
    the number of residuals, over the fit's noise level), and the verdicts."""

    effect: dict[str, float]
    independence: dict[str, float]
    significance: dict[str, float]
    stderr: dict[str, float]  # of the estimate (theta units: log for scale fields), robust to errors shared within a window
    identifiable: dict[str, bool]
    keep_base: dict[str, bool]  # the data say nothing about it: report the base value, not noise
    notes: dict[str, str]


def identifiability(objective: _Objective, theta: np.ndarray, loss: float, config: CalibrationConfig) -> Identifiability:
    """Which fields the telemetry determines, from the Gauss-Newton Hessian H = 2/R J^T J of the loss
    at ``theta`` (J: central-difference Jacobian of the R residuals).

    effect_i = 0.5 H_ii d^2 for d = log(1.1) (a 10 % change; 0.1 kg for payload_mass, 0.01 for obs_bias).
    independence_i = 1 / (H_ii (H^-1)_ii). significance_i = R effect_i independence_i / max(loss, 1e-12).
    A field has no effect when effect_i <= 1e-12 max_j effect_j (e.g. friction without contacts);
    it is only jointly determined when independence_i <= identifiability_tol (a compensating change
    of other fields fits as well); it is lost in the noise when significance_i <= min_significance.
    Identifiable means none of these. Fields with no effect or lost in the noise keep the base value.

    stderr: the sandwich (cluster-robust) standard error A^-1 B A^-1 with A = J^T J and B the
    outer products of each window's score J_w^T r_w. A window's residuals share the error of
    its start state (sensor noise), so they are not independent and J^T J alone is overconfident.
    A sensor offset (obs_bias) is a departure from a nominal sensor rather than a property to
    identify: it is kept when |b - base| >= max(sensor_bias_floor, 3 stderr), else the base value.
    """
    params, d = config.params, len(theta)
    space = _space(config)
    res, jac = _jacobian(objective, theta, space)
    if not (np.isfinite(res).all() and np.isfinite(jac).all()):
        raise ValueError("calibration: the replay diverges right around the estimate; narrow scale_bounds or shorten the window")
    hess = 2.0 / len(jac) * jac.T @ jac
    effect = 0.5 * np.diag(hess) * space.delta**2
    none = effect <= max(1e-12 * effect.max(), 1e-30)
    independence = np.zeros(d)
    live = np.flatnonzero(~none)
    if len(live):
        sub = hess[np.ix_(live, live)]
        inv = np.linalg.inv(sub + 1e-14 * np.trace(sub) / len(live) * np.eye(len(live)))  # ridge: exact degeneracy stays finite
        independence[live] = 1.0 / np.maximum(np.diag(sub) * np.diag(inv), 1.0)
    significance = len(res) * effect * independence / max(loss, 1e-12)
    a = jac.T @ jac
    a_inv = np.linalg.pinv(a + 1e-14 * max(np.trace(a), 1e-30) * np.eye(d))
    scores = (jac.reshape(len(objective.windows.qpos), -1, d) * res.reshape(len(objective.windows.qpos), -1, 1)).sum(1)
    stderr = np.sqrt(np.maximum(np.diag(a_inv @ (scores.T @ scores) @ a_inv), 0.0))
    sensor = np.array([p in SENSOR_FIELDS for p in params])
    offset = np.abs(theta - np.array([float(getattr(objective.base, p)) if p in SENSOR_FIELDS else 0.0 for p in params]))
    joint = ~none & ~sensor & (independence <= config.identifiability_tol)
    noisy = ~none & ~joint & np.where(sensor, offset < np.maximum(config.sensor_bias_floor, 3.0 * stderr), significance <= config.min_significance)
    notes = {}
    for i, name in enumerate(params):
        if none[i]:
            notes[name] = "no measurable effect on these observations (e.g. friction without contacts); base value kept"
        elif joint[i]:
            notes[name] = "only determined jointly with other fields (a compensating change fits as well); estimate kept, not trusted alone"
        elif noisy[i] and sensor[i]:
            notes[name] = f"{theta[i]:.4g} is within max(floor, 3 x stderr {stderr[i]:.2g}) of the base; base value kept"
        elif noisy[i]:
            notes[name] = f"its effect is below the noise of the fit (significance {significance[i]:.3g}); base value kept"
    as_dict = lambda values, cast=float: {p: cast(v) for p, v in zip(params, values)}  # noqa: E731
    return Identifiability(
        effect=as_dict(effect),
        independence=as_dict(independence),
        significance=as_dict(significance),
        stderr=as_dict(stderr),
        identifiable=as_dict(~(none | joint | noisy), bool),
        keep_base=as_dict(none | noisy, bool),
        notes=notes,
    )
