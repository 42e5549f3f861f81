"""Batched stepping: N MuJoCo worlds of one robot, policy in the loop, episodes out.

Each control step computes every world's action in one batched policy call (one per lane,
below), then steps all worlds' ``frame_skip`` physics substeps with one ``mujoco.rollout``
call on a persistent thread pool (C, several threads). Finished worlds reset automatically
from their next :class:`~sim.scenario.ScenarioSpec`; finished episodes come out as schema-v1
:class:`~sim.episode.Episode` records (final observation kept, terminated and truncated
apart; their metadata is built when first read, :class:`~sim.recorder.RecordedEpisode`).
With the policy in the loop (``run``, ``simulate``) a stepper of many worlds steps them in
two lanes half a step apart, so that one lane's physics runs while this thread finishes the
other lane's step and computes its actions (:meth:`BatchedStepper._drive`).

Determinism: a world's randomness (reset noise, sensor noise) comes only from its
scenario's seed and the physics has no shared state between worlds, so the same scenario
with a deterministic policy gives a bit-identical episode whatever batch it runs in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

import mujoco
import numpy as np
from mujoco import rollout

from sim.divergence import bad_steps
from sim.episode import SCHEMA_VERSION, Episode, validate_metadata
from sim.policy_fn import as_conditioned_policy, obs_dim_of
from sim.recorder import EpisodeRecorder
from sim.robots import PhysicsState, Task, get_task
from sim.scenario import ScenarioSpec
from sim.seeding import new_generator, reseed
from sim.sensor_filter import FilterState, SensorFilter, seen_body
from sim.variation import CONTEXT_DIM, VariationProfile

STATE_SPEC = mujoco.mjtState.mjSTATE_FULLPHYSICS
LANE_MIN_WORLDS = 32  # a stepper of fewer worlds than twice this steps them in one lane
CHUNKS_PER_THREAD = 10  # jobs per physics thread in one rollout call (MuJoCo's default split)
ScenarioSource = Callable[[int], ScenarioSpec | None]  # world index -> its next scenario (None: world stops)


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from parts (independent of Python's hash randomisation)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") >> 1


class BatchedStepper:
    """N worlds of one robot, stepped together.

    Two ways to drive it:
      * ``reset(seed, profiles)`` then ``step(actions)``: a vector env with same-step
        autoreset (``info["final_observation"]`` holds the last observation of a finished
        world); ``run(policy, num_steps)`` loops it and returns finished episodes.
      * ``simulate(scenarios, policy)``: exactly one episode per scenario, in order.
    """

    def __init__(
        self,
        robot: str | Task,
        num_worlds: int,
        *,
        nthread: int | None = None,
        record: bool = True,
        robot_id: str = "sim",
        policy_version: str = "none",
        source: str = "sim",
        sensor_filters: Mapping[VariationProfile, SensorFilter] | None = None,
    ):
        """``sensor_filters``: a world whose scenario has one of these profiles reads its sensor through
        that Kalman filter, as the robot of that body does (sim/sensor_filter.py): its observations,
        recorded ones included, are the filter's estimates."""
        if isinstance(num_worlds, bool) or not isinstance(num_worlds, numbers.Integral) or num_worlds < 1:
            raise ValueError(f"num_worlds must be a whole number >= 1, got {num_worlds!r}")
        num_worlds = int(num_worlds)
        self.task = get_task(robot) if isinstance(robot, str) else robot
        self.num_worlds = num_worlds
        self.record = record
        self.robot_id, self.policy_version, self.source = robot_id, policy_version, source
        if record:  # recorded episodes skip Episode.validate, so their metadata is checked here, once
            validate_metadata(episode_metadata(ScenarioSpec(self.task.name, seed=0), robot_id, policy_version, source, self.task.name))
        m = self.task.model
        self.nthread = max(1, min(nthread or os.cpu_count() or 1, num_worlds))
        self._pool = rollout.Rollout(nthread=self.nthread)
        self._datas = [mujoco.MjData(m) for _ in range(self.nthread)]
        self._qpos = slice(1, 1 + m.nq)  # FULLPHYSICS layout: time, qpos, qvel, act, ...
        self._qvel = slice(1 + m.nq, 1 + m.nq + m.nv)
        low, high = m.actuator_ctrlrange[:, 0], m.actuator_ctrlrange[:, 1]
        self._ctrl_mid, self._ctrl_half = (high + low) / 2, (high - low) / 2
        self._models: dict[tuple, tuple[mujoco.MjModel, mujoco.MjData]] = {}
        template = mujoco.MjData(m)
        self._state0 = np.empty(mujoco.mj_stateSize(m, STATE_SPEC))
        mujoco.mj_getState(m, template, self._state0, STATE_SPEC)

        n = num_worlds
        self.world_models: list[mujoco.MjModel] = [m] * n
        self.scenarios: list[ScenarioSpec | None] = [None] * n
        self._rngs = [new_generator() for _ in range(n)]  # each world's stream, reseeded from its scenario's seed
        self.state = np.tile(self._state0, (n, 1))
        self.sensordata = np.zeros((n, m.nsensordata))
        self.obs = np.zeros((n, self.task.obs_dim), np.float32)
        self.t = np.zeros(n, np.int64)
        self.max_steps = np.full(n, self.task.max_steps, np.int64)
        self.active = np.zeros(n, bool)
        self._latency = np.zeros(n, np.int64)
        self._obs_noise, self._obs_bias = np.zeros(n, np.float32), np.zeros(n, np.float32)
        self.context = np.zeros((n, CONTEXT_DIM), np.float32)  # each world's body features, for a conditioned policy
        self._bodies: dict[VariationProfile, _Body] = {}
        self._history = np.zeros((n, 1, self.task.act_dim), np.float32)
        self._out_state = np.empty((n, self.task.frame_skip, self._state0.size))
        self._out_sensor = np.empty((n, self.task.frame_skip, m.nsensordata))
        self._warmstart = np.zeros((n, m.nv))
        self._recorder: EpisodeRecorder | None = None
        self._finished: list[Episode] = []
        self._next_scenario: ScenarioSource | _FreeRunning = lambda world: None
        self.stats = {"episodes": 0, "steps": 0, "diverged": 0}
        self._sensor_filters = dict(sensor_filters or {})
        self._filtering: dict[int, FilterState] = {}  # world -> its filter's state this episode
        # run/simulate drive many worlds in two lanes, half a step apart (_drive); the physics thread runs one lane's
        half = n // 2 if n >= 2 * LANE_MIN_WORLDS else n
        self._lanes = [slice(0, half), slice(half, n)] if half < n else [slice(0, n)]
        self._physics: ThreadPoolExecutor | None = None

    # -- models -------------------------------------------------------------------------
    def model_for(self, profile: VariationProfile) -> tuple[mujoco.MjModel, mujoco.MjData]:
        """The (cached) varied model for ``profile`` and a scratch MjData for it."""
        key = profile.physical_key()
        if key not in self._models:
            model = profile.apply(self.task.model, self.task.payload_body)
            self._models[key] = (model, mujoco.MjData(model))
        return self._models[key]

    # -- driving ------------------------------------------------------------------------
    def reset(self, seed: int = 0, profiles: VariationProfile | Sequence[VariationProfile] | None = None) -> np.ndarray:
        """Free-running mode: world w's k-th episode uses seed derive_seed(seed, w, k). Returns obs (N, obs_dim)."""
        source = _FreeRunning(self.task.name, seed, _per_world(profiles, self.num_worlds))
        for scenario in source.first:
            self._check_scenario(scenario)
        self._start(source, range(self.num_worlds))
        return self.obs.copy()

    def reset_to(self, scenarios: Sequence[ScenarioSpec], then: ScenarioSource | None = None) -> np.ndarray:
        """Reset world w to ``scenarios[w]`` exactly; afterwards worlds draw from ``then`` (default: they stop)."""
        if len(scenarios) != self.num_worlds:
            raise ValueError(f"need one scenario per world ({self.num_worlds}), got {len(scenarios)}")
        first = list(scenarios)
        later = then or (lambda world: None)

        def source(world: int) -> ScenarioSpec | None:
            spec, first[world] = first[world], None
            return spec if spec is not None else later(world)

        self._start(source, range(self.num_worlds))
        return self.obs.copy()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Step every active world with ``action`` (N, act_dim) in [-1, 1].

        Returns obs (N, obs_dim), reward (N,), terminated (N,), truncated (N,), info; a world
        that finished is reset in the same call, its last observation in
        ``info["final_observation"]`` where ``info["_final_observation"]`` is True.
        """
        idx = np.flatnonzero(self.active)
        if not len(idx):  # MuJoCo's rollout of zero worlds crashes the process
            raise RuntimeError("every world of this stepper has finished its scenarios and stopped; reset it (reset, reset_to) before stepping again")
        action = np.asarray(action, np.float32)
        if action.shape != (self.num_worlds, self.task.act_dim):
            raise ValueError(f"action must have shape {(self.num_worlds, self.task.act_dim)}, got {action.shape}")
        reward, terminated, truncated, (ended, last_obs), terms = self._advance(idx, action[idx])
        n = self.num_worlds
        final_obs = np.zeros_like(self.obs)
        final_obs[ended] = last_obs
        full = {k: np.zeros(n) for k in terms}
        for k, v in terms.items():
            full[k][idx] = v
        out_r, out_term, out_trunc = np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, bool)
        out_r[idx], out_term[idx], out_trunc[idx] = reward, terminated, truncated
        done = out_term | out_trunc
        info = {"reward_terms": full, "final_observation": final_obs, "_final_observation": done}
        return self.obs.copy(), out_r, out_term, out_trunc, info

    def run(self, policy, num_steps: int) -> list[Episode]:
        """Step ``num_steps`` control steps with ``policy`` in the loop; return episodes finished meanwhile."""
        self._drive(self._acting(policy), num_steps)
        return self.pop_episodes()

    def simulate(self, scenarios: Iterable[ScenarioSpec], policy) -> list[Episode]:
        """One episode per scenario, returned in the scenarios' order (diverged ones are dropped and counted)."""
        queue = list(scenarios)
        for s in queue:  # all before any runs (each is checked again as it starts)
            self._check_scenario(s)
        order = {id(s): i for i, s in enumerate(queue)}
        act = self._acting(policy)
        pending = iter(queue)
        self._start(lambda world: next(pending, None), range(min(self.num_worlds, len(queue))))
        self._drive(act, None)
        episodes = self.pop_episodes()
        by_spec = {e.metadata["scenario"]: e for e in episodes}
        return [by_spec[s.to_json()] for s in sorted(queue, key=lambda s: order[id(s)]) if s.to_json() in by_spec]

    def _acting(self, policy):
        """``policy`` as the stepper calls it (:func:`sim.policy_fn.as_conditioned_policy`), refused at once where it says
        it reads another number of observation values than this robot gives (once a matmul error in its first layer)."""
        dim = obs_dim_of(policy)
        if dim is not None and dim != self.task.obs_dim:
            raise ValueError(f"the policy reads observations of {dim} values; robot {self.task.name!r} gives {self.task.obs_dim} (a policy of another robot?)")
        return as_conditioned_policy(policy)

    def physics_state(self) -> tuple[np.ndarray, np.ndarray]:
        """Every world's physics state now: copies of qpos (N, nq) and qvel (N, nv). A world that finished and
        stopped (``reset_to`` without ``then``) keeps its last state; one reset in ``step`` shows its new start."""
        return self.state[:, self._qpos].copy(), self.state[:, self._qvel].copy()

    def pop_episodes(self) -> list[Episode]:
        out, self._finished = self._finished, []
        return out

    _STATE_ARRAYS = ("state", "sensordata", "obs", "t", "max_steps", "active")

    def get_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Every world's mid-episode state as (arrays, JSON-able meta), for checkpoints.

        Only for steppers with ``record=False`` (the episode buffers are not captured).
        """
        if self.record:
            raise ValueError("get_state() does not capture the episode recorder: build the stepper with record=False")
        if not self.active.all():
            raise ValueError("get_state() needs every world active (a free-running stepper)")
        arrays = {k: getattr(self, k).copy() for k in self._STATE_ARRAYS}
        arrays["history"] = self._history.copy()
        meta = {
            "scenarios": [s.to_json() for s in self.scenarios],
            "world_rngs": [rng.bit_generator.state for rng in self._rngs],
            "stats": dict(self.stats),
            "filtered_worlds": sorted(self._filtering),
        }
        for w, state in self._filtering.items():
            arrays[f"filter_x_{w}"], arrays[f"filter_P_{w}"] = state.x.copy(), state.P.copy()
        return arrays, meta

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict, then: ScenarioSource | None = None) -> np.ndarray:
        """Restore a :meth:`get_state` capture; finished worlds then draw from ``then``. Returns obs (N, obs_dim).

        Only for steppers with ``record=False``, as :meth:`get_state`: a recording stepper would start its episodes at
        step 0 and fill the restored steps with zeros, a fabricated episode that looks valid."""
        if self.record:
            raise ValueError("set_state() cannot restore the episode recorder (get_state() does not capture it): build the stepper with record=False")
        if len(meta["scenarios"]) != self.num_worlds:
            raise ValueError(f"state has {len(meta['scenarios'])} worlds, this stepper {self.num_worlds}: use the same num_worlds")
        self._check_state_arrays(arrays)
        self.reset_to([ScenarioSpec.from_json(s) for s in meta["scenarios"]], then=then)
        for k in self._STATE_ARRAYS:
            getattr(self, k)[...] = arrays[k]
        self._history = np.array(arrays["history"], np.float32)
        for w in meta.get("filtered_worlds", []):
            if w not in self._filtering:
                raise ValueError(f"the state filters world {w}'s sensor; build the stepper with the same sensor_filters")
            self._filtering[w].x, self._filtering[w].P = np.array(arrays[f"filter_x_{w}"]), np.array(arrays[f"filter_P_{w}"])
        for rng, state in zip(self._rngs, meta["world_rngs"]):
            rng.bit_generator.state = state
        self.stats.update(meta["stats"])
        return self.obs.copy()

    def _check_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """ValueError naming the first of a :meth:`get_state` capture's arrays that is missing or not of this stepper's
        shape (one of shape (1,) once filled every world's observation silently)."""
        n = self.num_worlds
        for k in self._STATE_ARRAYS:
            if k not in arrays:
                raise ValueError(f"state has no {k!r} array: pass the arrays get_state() returned")
            if np.shape(arrays[k]) != getattr(self, k).shape:
                raise ValueError(f"state array {k!r} has shape {np.shape(arrays[k])}, this stepper's {getattr(self, k).shape}: a capture of another robot or num_worlds?")
        history = np.shape(arrays.get("history"))
        if len(history) != 3 or history[0] != n or history[1] < 1 or history[2] != self.task.act_dim:
            raise ValueError(f"state array 'history' has shape {history}, expected ({n}, latency + 1, {self.task.act_dim})")

    def close(self) -> None:
        if self._physics is not None:
            self._physics.shutdown()
        self._pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals ----------------------------------------------------------------------
    def _start(self, source: ScenarioSource | _FreeRunning, worlds: Iterable[int]) -> None:
        self._next_scenario = source
        self.active[:] = False
        self._finished = []
        self._reset_worlds(list(worlds))

    def _reset_worlds(self, worlds: Sequence[int]) -> None:
        """Start each of ``worlds`` (in order) on its next scenario, or stop it; the per-world work is
        only the scenario, its seeded generator and the task's reset draw, the rest is batched."""
        task, m = self.task, self.task.model
        if isinstance(self._next_scenario, _FreeRunning):  # reset()'s: checked once, as it began
            started = list(worlds)
            scenarios = self._next_scenario.next(started)
        else:
            started, scenarios = [], []
            for w in worlds:
                scenario = self._next_scenario(w)
                if scenario is None:
                    self.active[w] = False
                else:
                    self._check_scenario(scenario)
                    started.append(w)
                    scenarios.append(scenario)
        if not started:
            return
        n, ws = len(started), np.asarray(started)
        bodies, body = [], None
        for s in scenarios:  # consecutive worlds mostly share a profile object: look it up once
            body = body if body is not None and s.profile is body.profile else self._body(s.profile)
            bodies.append(body)
        rngs = [self._rngs[w] for w in started]
        reseed(rngs, [s.seed for s in scenarios])  # each as np.random.default_rng(seed) starts, in one batch
        qpos, qvel = np.empty((n, m.nq)), np.empty((n, m.nv))
        drawn = []  # the worlds whose start the task draws (in one call); the others start where their scenario says
        for i, s in enumerate(scenarios):
            if s.init_qpos is None:
                drawn.append(i)
            else:
                qpos[i], qvel[i] = s.init_qpos, s.init_qvel
        if drawn:
            goals = [None if scenarios[i].goal is None else np.asarray(scenarios[i].goal, float) for i in drawn]
            qpos[drawn], qvel[drawn] = task.initial_states([rngs[i] for i in drawn], [scenarios[i].init_noise_scale for i in drawn], goals)
        state = np.tile(self._state0, (n, 1))
        state[:, self._qpos], state[:, self._qvel] = qpos, qvel
        self.state[ws] = state
        if m.nsensordata:  # the sensors at the start state (a task without sensors needs no forward pass)
            for i, body in enumerate(bodies):
                mujoco.mj_setState(body.model, body.scratch, state[i], STATE_SPEC)
                mujoco.mj_forward(body.model, body.scratch)
                self.sensordata[started[i]] = body.scratch.sensordata
        for w, scenario, body in zip(started, scenarios, bodies):
            self.world_models[w], self.scenarios[w] = body.model, scenario
        self.max_steps[ws] = [s.max_steps or task.max_steps for s in scenarios]
        self._latency[ws] = [b.profile.action_latency for b in bodies]
        self._obs_noise[ws] = [b.profile.obs_noise_std for b in bodies]
        self._obs_bias[ws] = [b.profile.obs_bias for b in bodies]
        self.context[ws] = np.stack([b.context for b in bodies])
        obs = task.observe(PhysicsState(qpos, qvel, self.sensordata[ws]))
        for i in np.flatnonzero((self._obs_noise[ws] != 0) | (self._obs_bias[ws] != 0)):  # the sensor model, from each world's own stream
            obs[i] = scenarios[i].profile.corrupt_observation(obs[i : i + 1], rngs[i])[0]
        if self._sensor_filters:  # a filtered sensor starts its filter at the first reading
            for i, w in enumerate(started):
                model = self._sensor_filters.get(scenarios[i].profile)
                self._filtering.pop(w, None)
                if model is not None:
                    self._filtering[w] = model.start()
                    obs[i] = self._filtering[w].update(obs[i : i + 1])[0]
        self.obs[ws], self.t[ws], self.active[ws] = obs, 0, True
        latency = int(self._latency[ws].max())
        if self._history.shape[1] <= latency:
            grown = np.zeros((self.num_worlds, latency + 1, task.act_dim), np.float32)
            grown[:, : self._history.shape[1]] = self._history
            self._history = grown
        self._history[ws] = 0.0
        if self.record:
            self._ensure_recorder(int(self.max_steps[ws].max()))
            self._recorder.begin(ws, obs, qpos, qvel)

    def _check_scenario(self, scenario: ScenarioSpec) -> None:
        """ValueError unless ``scenario`` is this robot's, its start state (if any) of the model's nq and nv values and its
        goal (if any) of the task's goal_dim: every scenario enters here (``reset_to``, ``simulate``, a ``then`` source),
        where a length-1 ``init_qpos`` once filled every qpos entry, a free joint's quaternion included, a length-1 goal
        every goal entry, a goal for a task without one was ignored, and another robot's scenario started without a word."""
        task = self.task
        if scenario.robot != task.name:
            raise ValueError(f"scenario for robot {scenario.robot!r} given to a {task.name!r} stepper")
        m = task.model
        if scenario.init_qpos is not None and (len(scenario.init_qpos), len(scenario.init_qvel)) != (m.nq, m.nv):
            raise ValueError(
                f"scenario init_qpos has {len(scenario.init_qpos)} values and init_qvel {len(scenario.init_qvel)}; "
                f"robot {task.name!r} has nq={m.nq} and nv={m.nv}"
            )
        if scenario.goal is not None and len(scenario.goal) != task.goal_dim:
            raise ValueError(
                f"scenario goal has {len(scenario.goal)} values; robot {task.name!r} "
                + (f"takes a goal of goal_dim={task.goal_dim}" if task.goal_dim else "has no goal (goal_dim=0): leave goal=None")
            )

    def _body(self, profile: VariationProfile) -> _Body:
        """What a world of ``profile`` runs with (cached per profile)."""
        body = self._bodies.get(profile)
        if body is None:
            model, scratch = self.model_for(profile)
            context = seen_body(profile, self._sensor_filters).context()
            body = self._bodies[profile] = _Body(profile, model, scratch, context)
        return body

    def _ensure_recorder(self, max_steps: int) -> None:
        r = self._recorder
        if r is None:
            m = self.task.model
            self._recorder = EpisodeRecorder(self.num_worlds, max_steps, self.task.obs_dim, self.task.act_dim, m.nq, m.nv, self.task.control_dt)
        elif r.max_steps < max_steps:
            self._recorder = r.grown(max_steps)  # keeps the other worlds' episodes in progress

    def _advance(self, idx: np.ndarray, action: np.ndarray):
        """One control step of worlds ``idx`` with ``action`` (len(idx), act_dim), physics on this thread."""
        return self._land(self._launch(idx, action))

    def _launch(self, idx: np.ndarray, action: np.ndarray, background: bool = False) -> _Flight:
        """Start the physics of one control step of worlds ``idx`` (increasing) with ``action``; in the
        ``background`` it runs on the physics thread while this one goes on (:meth:`_land` waits for it)."""
        task = self.task
        n, lo = len(idx), int(idx[0])
        sel = slice(lo, lo + n) if int(idx[-1]) == lo + n - 1 else idx  # views instead of copies for a run of worlds
        action = np.clip(action, -1.0, 1.0)
        if not np.isfinite(action).all():
            raise ValueError("policy returned NaN or Inf actions")
        # action latency: the actuators get the action commanded `latency` steps ago
        hist = self._history
        if hist.shape[1] > 1:
            hist[sel, 1:] = hist[sel, :-1].copy()
        hist[sel, 0] = action
        applied = hist[idx, self._latency[sel]] if hist.shape[1] > 1 else action
        ctrl = self._ctrl_mid + self._ctrl_half * applied
        state = self.state[sel]
        models = self.world_models[sel] if isinstance(sel, slice) else [self.world_models[w] for w in idx]
        rows = slice(lo, lo + n)  # output rows: a lane's flight never overlaps another lane's
        states, sensors = self._out_state[rows], self._out_sensor[rows]
        physics = functools.partial(
            self._pool.rollout,
            models,
            self._datas,
            np.ascontiguousarray(state),
            np.repeat(ctrl[:, None, :], task.frame_skip, axis=1),
            nstep=task.frame_skip,
            initial_warmstart=self._warmstart[:n],  # zero: a world's physics never depends on its batch
            state=states,
            sensordata=sensors,
            chunk_size=max(1, n // (self.nthread * CHUNKS_PER_THREAD)),
            skip_checks=True,  # shapes are fixed here; saves per-call Python checks
        )
        if background:
            done = self._physics_thread().submit(physics)
        else:
            physics()
            done = None
        return _Flight(idx, sel, action, states, sensors, done)

    def _land(self, flight: _Flight):
        """Finish a launched control step: wait for its physics, then observations, rewards, the
        record, and the finished worlds' episodes and resets."""
        if flight.done is not None:
            flight.done.result()
        task, idx, sel, action = self.task, flight.idx, flight.sel, flight.action
        new_state, new_sensor = flight.states[:, -1], flight.sensors[:, -1]
        state = self.state[sel]  # still the step's start: only the lane's own landing writes its rows
        before = PhysicsState(state[:, self._qpos], state[:, self._qvel], self.sensordata[sel])
        after = PhysicsState(new_state[:, self._qpos], new_state[:, self._qvel], new_sensor)
        diverged = bad_steps(flight.states, task.model.nq, task.model.nv).any(axis=1)  # MuJoCo's blow-ups (its auto-reset is off)
        any_diverged = bool(diverged.any())
        with _overflow_quiet(any_diverged):
            terms = task.reward_terms(before, after, action)
            reward = sum(terms.values()).astype(np.float32)
            terminated = task.terminated(after) | diverged
            obs = task.observe(after)
        if not (np.isfinite(obs).all() and np.isfinite(reward).all()):  # a diverged world's are dropped; any other's: the task's fault
            refuse_non_finite(task, obs, terms, diverged)
        obs[diverged] = 0.0
        reward[diverged] = 0.0  # its episode is dropped; a NaN here would reach the learner
        obs += self._obs_bias[idx, None]
        for i in np.flatnonzero(self._obs_noise[idx]):  # per-world streams keep episodes batch-independent
            w = idx[i]
            obs[i] += (self._rngs[w].standard_normal(obs.shape[1]) * self._obs_noise[w]).astype(np.float32)
        if self._filtering:  # filtered sensors: predict with the commanded action, correct with the reading
            for i in np.flatnonzero(np.isin(idx, list(self._filtering))):
                state = self._filtering[idx[i]]
                state.predict(action[i : i + 1])
                obs[i] = state.update(obs[i : i + 1])[0]
        self.state[sel], self.sensordata[sel] = new_state, new_sensor
        steps = self.t[sel].copy()
        if self.record:
            with _overflow_quiet(any_diverged):
                self._recorder.record(idx, steps, action, reward, obs, after.qpos, after.qvel)
        self.t[sel] = steps + 1
        truncated = (steps + 1 >= self.max_steps[sel]) & ~terminated
        self.obs[sel] = obs
        self.stats["steps"] += len(idx)
        ended = np.flatnonzero(terminated | truncated)
        final_obs = obs[ended]
        if len(ended):
            kept = ended[~diverged[ended]]  # a diverged world's episode is dropped (and counted)
            self.stats["diverged"] += len(ended) - len(kept)
            if self.record and len(kept):
                self._finished.extend(self._finish_episodes(idx[kept], terminated[kept]))
            self.stats["episodes"] += len(ended)
            self._reset_worlds(idx[ended].tolist())
        return reward, terminated, truncated, (idx[ended], final_obs), terms

    def _physics_thread(self) -> ThreadPoolExecutor:
        if self._physics is None:
            self._physics = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepper-physics")
        return self._physics

    def _drive(self, act, num_steps: int | None) -> None:
        """Step every active world with ``act`` in the loop, ``num_steps`` control steps (None: until all stop).

        A stepper of many worlds drives them in two lanes (the lower and upper half of the worlds),
        half a step apart: while one lane's physics runs on MuJoCo's threads, this thread finishes
        the other lane's last step and computes its next actions. The policy is called on each
        lane's worlds in turn, lower lane first, and finished worlds reset in world order within a
        step, as one call over all the worlds would; only a policy whose rows depend on the batch
        they come in (float rounding of a batched matmul) sees other batches.
        """
        lanes = self._lanes
        flights: list[tuple[int, _Flight]] = []  # (lane, launched step not landed yet), oldest first
        steps = [0] * len(lanes)
        try:
            launched = True
            while launched:
                launched = False
                for j, lane in enumerate(lanes):
                    while any(k == j for k, _ in flights):  # the lane's next actions need its last step landed
                        self._land(flights.pop(0)[1])
                    idx = lane.start + np.flatnonzero(self.active[lane])
                    if not len(idx) or (num_steps is not None and steps[j] >= num_steps):
                        continue
                    action = checked_actions(act(self.obs[idx], self.context[idx]), len(idx), self.task.act_dim)
                    # in the background while another lane has a step to finish meanwhile
                    flights.append((j, self._launch(idx, action, background=bool(flights))))
                    steps[j] += 1
                    launched = True
        finally:
            wait([f.done for _, f in flights if f.done is not None])  # MuJoCo's pool is free again, even on an error
            while flights:  # every world ends at the end of a step
                self._land(flights.pop(0)[1])

    def _finish_episodes(self, worlds: np.ndarray, terminated: np.ndarray) -> list[Episode]:
        metadata_of = functools.partial(episode_metadata, robot_id=self.robot_id, policy_version=self.policy_version, source=self.source, robot_model=self.task.name)
        return self._recorder.finish(worlds, self.t[worlds], terminated, metadata_of, [self.scenarios[w] for w in worlds.tolist()])


class _FreeRunning:
    """``reset``'s scenario source: world w's k-th scenario is ``first[w]`` with seed derive_seed(seed, w, k). The stepper
    checks ``first`` once; the scenarios are its copies with another seed (:meth:`ScenarioSpec.with_seed`)."""

    def __init__(self, robot: str, seed: int, profiles: Sequence[VariationProfile]):
        self.seed = seed
        self.first = [ScenarioSpec(robot, seed=0, profile=p) for p in profiles]
        self._episodes = [0] * len(profiles)  # per world, how many scenarios it had

    def next(self, worlds: Iterable[int]) -> list[ScenarioSpec]:
        """The next scenario of each of ``worlds``."""
        out = []
        for w in worlds:
            self._episodes[w] += 1
            out.append(self.first[w].with_seed(derive_seed(self.seed, w, self._episodes[w])))
        return out


@dataclasses.dataclass(frozen=True)
class _Flight:
    """One launched control step of worlds ``idx``: what :meth:`BatchedStepper._land` needs to finish it."""

    idx: np.ndarray
    sel: slice | np.ndarray  # idx as a slice where the worlds are consecutive
    action: np.ndarray  # (len(idx), act_dim) clipped
    states: np.ndarray  # (len(idx), frame_skip, nstate): the physics' output
    sensors: np.ndarray
    done: Future | None  # the physics in the background, or None when it ran already


@dataclasses.dataclass(frozen=True)
class _Body:
    """A variation profile as the stepper runs it: its (cached) model, a scratch MjData, the policy's context."""

    profile: VariationProfile
    model: mujoco.MjModel
    scratch: mujoco.MjData
    context: np.ndarray  # (CONTEXT_DIM,) float32: the body features the policy is given (sim.sensor_filter.seen_body)


def episode_metadata(scenario: ScenarioSpec, robot_id: str, policy_version: str, source: str, robot_model: str) -> dict[str, str]:
    """A simulated episode's metadata: the scenario's JSON and its deterministic id (idempotent upload)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "robot_id": robot_id,
        "episode_id": scenario.episode_id(policy_version),
        "policy_version": policy_version,
        "source": source,
        "robot_model": robot_model,
        "scenario": scenario.to_json(),
    }


def checked_actions(out, rows: int, act_dim: int) -> np.ndarray:
    """A policy's output for ``rows`` observations as float32 (rows, act_dim) (no copy where it is one already); a
    ValueError naming what it returned otherwise: an (N, 1) output once drove every actuator, and None read as NaN."""
    action = np.asarray(out, np.float32)
    if action.shape != (rows, act_dim):
        raise ValueError(
            f"the policy returned {type(out).__name__} of shape {action.shape} for {rows} observations; "
            f"expected actions of shape (N, act_dim) = {(rows, act_dim)}"
        )
    return action


def _per_world(profiles, n: int) -> list[VariationProfile]:
    if profiles is None:
        return [VariationProfile()] * n
    if isinstance(profiles, VariationProfile):
        return [profiles] * n
    profiles = list(profiles)
    if len(profiles) != n:
        raise ValueError(f"need one profile per world ({n}), got {len(profiles)}")
    return profiles


def _overflow_quiet(any_diverged: bool):
    """numpy's overflow and invalid-value warnings off while a step holds a diverged world, whose values (beyond
    float32's range) are dropped with its episode; a step of valid worlds keeps them."""
    return np.errstate(over="ignore", invalid="ignore") if any_diverged else contextlib.nullcontext()


def refuse_non_finite(task, obs: np.ndarray, terms: dict, diverged: np.ndarray) -> None:
    """ValueError naming the task method that gave NaN or Inf for a world whose physics state is finite."""
    for what, values in (("observe", obs), *((f"reward_terms()[{k!r}]", np.asarray(v)) for k, v in terms.items())):
        bad = ~np.isfinite(values)
        bad = (bad.reshape(len(bad), -1).any(axis=1) if bad.ndim > 1 else bad) & ~diverged
        if bad.any():
            world = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"robot {task.name!r}: {type(task).__name__}.{what} gave NaN or Inf in {int(bad.sum())} world(s) whose physics is finite "
                f"(the first: row {world} of this step); its observations and rewards must be finite wherever MuJoCo's state is"
            )
