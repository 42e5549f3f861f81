"""Batched stepping: N MuJoCo worlds of one robot, policy in the loop, episodes out.

Each control step computes every world's action in one batched policy call, then steps
all worlds' ``frame_skip`` physics substeps with one ``mujoco.rollout`` call on a
persistent thread pool (C, several threads). Finished worlds reset automatically from
their next :class:`~sim.scenario.ScenarioSpec`; finished episodes come out as schema-v1
:class:`~sim.episode.Episode` records (final observation kept, terminated and truncated
apart).

Determinism: a world's randomness (reset noise, sensor noise) comes only from its
scenario's seed and the physics has no shared state between worlds, so the same scenario
with a deterministic policy gives a bit-identical episode whatever batch it runs in.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import mujoco
import numpy as np
from mujoco import rollout

from sim.episode import SCHEMA_VERSION, Episode, validate_metadata
from sim.policy_fn import as_conditioned_policy
from sim.recorder import EpisodeRecorder
from sim.robots import PhysicsState, Task, get_task
from sim.scenario import ScenarioSpec
from sim.sensor_filter import FilterState, SensorFilter, seen_body
from sim.variation import CONTEXT_DIM, VariationProfile

STATE_SPEC = mujoco.mjtState.mjSTATE_FULLPHYSICS
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
        if num_worlds < 1:
            raise ValueError(f"num_worlds must be >= 1, got {num_worlds}")
        self.task = get_task(robot) if isinstance(robot, str) else robot
        self.num_worlds = num_worlds
        self.record = record
        self.robot_id, self.policy_version, self.source = robot_id, policy_version, source
        if record:  # recorded episodes skip Episode.validate, so their metadata is checked here, once
            validate_metadata(self._episode_metadata(ScenarioSpec(self.task.name, seed=0)))
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
        self._rngs: list[np.random.Generator] = [np.random.default_rng(0)] * n
        self.state = np.tile(self._state0, (n, 1))
        self.sensordata = np.zeros((n, m.nsensordata))
        self.obs = np.zeros((n, self.task.obs_dim), np.float32)
        self.t = np.zeros(n, np.int64)
        self.max_steps = np.full(n, self.task.max_steps, np.int64)
        self.active = np.zeros(n, bool)
        self._latency = np.zeros(n, np.int64)
        self._obs_noise, self._obs_bias = np.zeros(n, np.float32), np.zeros(n, np.float32)
        self.context = np.zeros((n, CONTEXT_DIM), np.float32)  # each world's body features, for a conditioned policy
        self._contexts: dict[VariationProfile, np.ndarray] = {}
        self._history = np.zeros((n, 1, self.task.act_dim), np.float32)
        self._out_state = np.empty((n, self.task.frame_skip, self._state0.size))
        self._out_sensor = np.empty((n, self.task.frame_skip, m.nsensordata))
        self._warmstart = np.zeros((n, m.nv))
        self._recorder: EpisodeRecorder | None = None
        self._finished: list[Episode] = []
        self._next_scenario: ScenarioSource = lambda world: None
        self.stats = {"episodes": 0, "steps": 0, "diverged": 0}
        self._sensor_filters = dict(sensor_filters or {})
        self._filtering: dict[int, FilterState] = {}  # world -> its filter's state this episode

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
        profiles = _per_world(profiles, self.num_worlds)
        counters = [0] * self.num_worlds

        def next_scenario(world: int) -> ScenarioSpec:
            counters[world] += 1
            return ScenarioSpec(robot=self.task.name, seed=derive_seed(seed, world, counters[world]), profile=profiles[world])

        self._start(next_scenario, range(self.num_worlds))
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
        reward, terminated, truncated, final_obs, terms = self._advance(idx, action[idx])
        n = self.num_worlds
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
        act = as_conditioned_policy(policy)
        for _ in range(num_steps):
            if not self.active.any():
                break
            idx = np.flatnonzero(self.active)
            self._advance(idx, np.asarray(act(self.obs[idx], self.context[idx]), np.float32))
        return self.pop_episodes()

    def simulate(self, scenarios: Iterable[ScenarioSpec], policy) -> list[Episode]:
        """One episode per scenario, returned in the scenarios' order (diverged ones are dropped and counted)."""
        queue = list(scenarios)
        for s in queue:
            if s.robot != self.task.name:
                raise ValueError(f"scenario for robot {s.robot!r} given to a {self.task.name!r} stepper")
        order = {id(s): i for i, s in enumerate(queue)}
        pending = iter(queue)
        self._start(lambda world: next(pending, None), range(min(self.num_worlds, len(queue))))
        act = as_conditioned_policy(policy)
        while self.active.any():
            idx = np.flatnonzero(self.active)
            self._advance(idx, np.asarray(act(self.obs[idx], self.context[idx]), np.float32))
        episodes = self.pop_episodes()
        by_spec = {e.metadata["scenario"]: e for e in episodes}
        return [by_spec[s.to_json()] for s in sorted(queue, key=lambda s: order[id(s)]) if s.to_json() in by_spec]

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
        """Restore a :meth:`get_state` capture; finished worlds then draw from ``then``. Returns obs (N, obs_dim)."""
        if len(meta["scenarios"]) != self.num_worlds:
            raise ValueError(f"state has {len(meta['scenarios'])} worlds, this stepper {self.num_worlds}: use the same num_worlds")
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

    def close(self) -> None:
        self._pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals ----------------------------------------------------------------------
    def _start(self, source: ScenarioSource, worlds: Iterable[int]) -> None:
        self._next_scenario = source
        self.active[:] = False
        self._finished = []
        self._reset_worlds(list(worlds))

    def _reset_worlds(self, worlds: Sequence[int]) -> None:
        """Start each of ``worlds`` (in order) on its next scenario, or stop it; one batched observation for all."""
        task = self.task
        started, qpos, qvel = [], [], []
        for w in worlds:
            scenario = self._next_scenario(w)
            if scenario is None:
                self.active[w] = False
                continue
            profile = scenario.profile
            model, scratch = self.model_for(profile)
            rng = np.random.default_rng(scenario.seed)
            if scenario.init_qpos is not None:
                q, v = np.asarray(scenario.init_qpos, float), np.asarray(scenario.init_qvel, float)
            else:
                goal = None if scenario.goal is None else np.asarray(scenario.goal, float)
                q, v = task.initial_state(rng, scenario.init_noise_scale, goal)
            state = self.state[w]
            state[:] = self._state0
            state[self._qpos], state[self._qvel] = q, v
            mujoco.mj_setState(model, scratch, state, STATE_SPEC)
            mujoco.mj_forward(model, scratch)
            self.sensordata[w] = scratch.sensordata
            self.world_models[w], self.scenarios[w], self._rngs[w] = model, scenario, rng
            self.max_steps[w] = scenario.max_steps or task.max_steps
            self._latency[w] = profile.action_latency
            self._obs_noise[w], self._obs_bias[w] = profile.obs_noise_std, profile.obs_bias
            self.context[w] = self._context_of(profile)
            started.append(w)
            qpos.append(q)
            qvel.append(v)
        if not started:
            return
        ws = np.asarray(started)
        qpos, qvel = np.stack(qpos), np.stack(qvel)
        obs = task.observe(PhysicsState(qpos, qvel, self.sensordata[ws].copy()))
        for i, w in enumerate(started):  # the sensor model, from each world's own stream
            if self._obs_noise[w] or self._obs_bias[w]:
                obs[i] = self.scenarios[w].profile.corrupt_observation(obs[i : i + 1], self._rngs[w])[0]
            if self._sensor_filters:  # a filtered sensor starts its filter at the first reading
                model = self._sensor_filters.get(self.scenarios[w].profile)
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

    def _context_of(self, profile: VariationProfile) -> np.ndarray:
        context = self._contexts.get(profile)
        if context is None:
            context = self._contexts[profile] = seen_body(profile, self._sensor_filters).context()
        return context

    def _ensure_recorder(self, max_steps: int) -> None:
        r = self._recorder
        if r is None:
            m = self.task.model
            self._recorder = EpisodeRecorder(self.num_worlds, max_steps, self.task.obs_dim, self.task.act_dim, m.nq, m.nv, self.task.control_dt)
        elif r.max_steps < max_steps:
            self._recorder = r.grown(max_steps)  # keeps the other worlds' episodes in progress

    def _advance(self, idx: np.ndarray, action: np.ndarray):
        """One control step of worlds ``idx`` with ``action`` (len(idx), act_dim)."""
        task = self.task
        everyone = len(idx) == self.num_worlds
        sel = slice(None) if everyone else idx  # views instead of copies in the common case
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
        before = PhysicsState(state[:, self._qpos].copy(), state[:, self._qvel].copy(), self.sensordata[sel].copy())
        models = self.world_models if everyone else [self.world_models[w] for w in idx]
        n = len(idx)
        states, sensors = self._out_state[:n], self._out_sensor[:n]
        self._pool.rollout(
            models,
            self._datas,
            np.ascontiguousarray(state),
            np.repeat(ctrl[:, None, :], task.frame_skip, axis=1),
            nstep=task.frame_skip,
            initial_warmstart=self._warmstart[:n],  # zero: a world's physics never depends on its batch
            state=states,
            sensordata=sensors,
            chunk_size=max(1, n // (self.nthread * 10)),
            skip_checks=True,  # shapes are fixed here; saves per-call Python checks
        )
        new_state, new_sensor = states[:, -1], sensors[:, -1]
        after = PhysicsState(new_state[:, self._qpos], new_state[:, self._qvel], new_sensor)
        terms = task.reward_terms(before, after, action)
        reward = sum(terms.values()).astype(np.float32)
        diverged = ~np.isfinite(new_state).all(axis=1)
        terminated = task.terminated(after) | diverged
        obs = task.observe(after)
        obs[diverged] = 0.0
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
            self._recorder.record(idx, steps, action, reward, obs, after.qpos, after.qvel)
        self.t[sel] = steps + 1
        truncated = (steps + 1 >= self.max_steps[sel]) & ~terminated
        self.obs[sel] = obs
        self.stats["steps"] += len(idx)
        final_obs = np.zeros_like(self.obs)
        ended = np.flatnonzero(terminated | truncated)
        if len(ended):
            final_obs[idx[ended]] = obs[ended]
            for i in ended:
                w = idx[i]
                if diverged[i]:
                    self.stats["diverged"] += 1
                elif self.record:
                    self._finished.append(self._finish_episode(w, bool(terminated[i])))
            self.stats["episodes"] += len(ended)
            self._reset_worlds(idx[ended].tolist())
        return reward, terminated, truncated, final_obs, terms

    def _finish_episode(self, w: int, terminated: bool) -> Episode:
        return self._recorder.finish(w, int(self.t[w]), terminated, self._episode_metadata(self.scenarios[w]))

    def _episode_metadata(self, scenario: ScenarioSpec) -> dict[str, str]:
        return {
            "schema_version": SCHEMA_VERSION,
            "robot_id": self.robot_id,
            "episode_id": scenario.episode_id(self.policy_version),
            "policy_version": self.policy_version,
            "source": self.source,
            "robot_model": self.task.name,
            "scenario": scenario.to_json(),
        }


def _per_world(profiles, n: int) -> list[VariationProfile]:
    if profiles is None:
        return [VariationProfile()] * n
    if isinstance(profiles, VariationProfile):
        return [profiles] * n
    profiles = list(profiles)
    if len(profiles) != n:
        raise ValueError(f"need one profile per world ({n}), got {len(profiles)}")
    return profiles
