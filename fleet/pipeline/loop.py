"""The flywheel loop: robots -> server -> store -> world model -> scenarios -> policy -> gate
-> signed publish -> canary -> widen or roll back -> robots.

Everything lives in the run folder, so a crashed run resumes from its last finished
iteration (``state.json``): the store, the registry, the robots' spools and trusted
policies, the world model (one folder per iteration: a redo starts from the model its first
attempt started from) and the policy checkpoints. Synthetic episodes have deterministic
ids, so a repeated iteration stores nothing twice. A release the interrupted iteration left
in the registry (``release.json``) is settled before the redo (``Flywheel._settle_release``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import ray
from omegaconf import DictConfig, OmegaConf

from fleet.code_version import code_version
from fleet.conf.schema_tools import instantiated
from fleet.pipeline import steps
from fleet.pipeline.canary import judge_canary
from fleet.pipeline.fleet_release import fleet_current, loop_iteration, release_note
from fleet.pipeline.gate import check_gate_settings, gate
from fleet.pipeline.loop_config import LoopFleet
from fleet.pipeline.progress import Progress
from fleet.pipeline.services import Services, run_id_of
from fleet.pipeline.simfleet import SimulatedRobot, fleet_specs, robot_order
from fleet.pipeline.training import Training, TrainingPlacement, policy_cpus, world_model_cpus
from fleet.registry.store import CanaryChanged, NoCanary, RolloutRefused
from fleet.run_folders import flywheel_run_settings, read_run_file, record_run_id, record_run_settings
from policies.checkpoint import discard_checkpoint
from policies.trainer import first_update, steps_trained
from sim.calibration import check_state_map, has_state_map
from sim.durable import write_durably
from sim.policy_fn import noisy_policy, zero_policy
from sim.robots import get_task
from sim.body_context import context_vectors
from sim.sensor_filter import filter_vectors, filtered_episodes
from sim.sensors import corrected_view, offset_vectors
from worldmodel.device import resolve_device

log = logging.getLogger(__name__)
RELEASE_FILE = "release.json"  # an iteration's release in progress (the iteration, its export): what a resume settles
# a calibration's normalised error (per observation entry, in units of its spread) above which the robot's physics explains its
# telemetry worse than the telemetry's own mean would: healthy robots ~1e-15, the demo's noisy sensor 0.78, bad data 2.6-47
UNEXPLAINED_LOSS = 1.0
ITERATION_FILE = "iteration.json"  # the iteration in progress and the store's snapshot as it began: a redo reads its sim data there
ROLLOUT_STAGES = {  # an iteration's rollout stage (its record's "stage") as the metric rollout/stage (docs/metrics.md)
    "not promoted": 0.0, "fleet moved": 0.0, "rolled back": 1.0, "canary kept": 1.0, "settled by operator": 1.0, "widened": 2.0, "released": 2.0,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """The loop's knobs, derived once from the Hydra config (conf/flywheel.yaml ``loop``)."""

    robot_model: str
    iterations: int
    num_robots: int
    conditions: tuple[str, ...]
    episodes_per_robot: int
    episode_steps: int
    canary_fraction: float
    canary_episodes: int
    eval_episodes: int
    calibration_episodes: int
    wm_rollouts: int
    real_window_steps: int | None  # null: every stored episode (see from_cfg)
    sim_window_steps: int | None
    train_env_steps: int
    synthetic_action_noise: float
    robust_to_sensor_noise: bool
    noise_free_training_worlds: bool
    sensor_correction: bool
    sensor_filter: bool
    body_context: bool
    record_state: bool | None  # null in the config; from_cfg resolves it (see there)
    gate: dict
    seed: int

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> LoopSettings:
        loop = OmegaConf.to_container(cfg.loop, resolve=True)
        loop["conditions"] = tuple(loop["conditions"])
        at_least = {"iterations": 1, "num_robots": 1, "episodes_per_robot": 1, "episode_steps": 1, "canary_episodes": 1,
                    "eval_episodes": 2, "calibration_episodes": 1, "wm_rollouts": 1, "train_env_steps": 1}  # fmt: skip
        for key, low in at_least.items():
            if loop[key] < low:
                raise ValueError(f"loop.{key} must be >= {low}, got {loop[key]}" + (" (the gate compares paired episodes)" if key == "eval_episodes" else ""))
        if not 0.0 <= loop["canary_fraction"] <= 1.0 or loop["synthetic_action_noise"] < 0:
            raise ValueError(f"loop.canary_fraction must be in [0, 1] and loop.synthetic_action_noise >= 0, got {loop['canary_fraction']} and {loop['synthetic_action_noise']}")
        check_gate_settings(**loop["gate"])
        calibrated = loop["num_robots"] * loop["calibration_episodes"] * min(loop["episode_steps"], get_task(loop["robot_model"]).max_steps)
        for key, low in (("real_window_steps", calibrated), ("sim_window_steps", 0)):
            if loop[key] is not None and loop[key] < low:
                raise ValueError(
                    f"loop.{key} must be null (no window) or >= {low}, got {loop[key]}"
                    + (" (num_robots x calibration_episodes x episode_steps: each robot's calibration reads its newest episodes)" if low else "")
                )
        limit = get_task(loop["robot_model"]).max_steps  # the task's time limit, which the gate's evaluation episodes run to
        if loop["episode_steps"] > limit:
            log.warning(
                "loop.episode_steps=%d is past %s's time limit of %d control steps: the robots run %d-step episodes, "
                "as the gate evaluates them", loop["episode_steps"], loop["robot_model"], limit, limit,
            )  # fmt: skip
            loop["episode_steps"] = limit
        if loop["body_context"] and loop["noise_free_training_worlds"]:
            raise ValueError(
                "loop.body_context with loop.noise_free_training_worlds: the training worlds' noise-free sensors would tell the policy "
                "another body than the robots' calibrated one; set one of them false"
            )
        loop["record_state"] = robots_record_state(loop["robot_model"], loop["record_state"])
        if cfg.policy.trainer.algorithm not in ("sac", "mbpo"):
            raise ValueError(
                f"the flywheel trains off-policy on the fleet's data: use policy=mbpo_fleet, mbpo, sac_fleet or sac, not {cfg.policy.trainer.algorithm!r}"
            )
        return cls(**loop, seed=int(cfg.seed))

    @property
    def num_canaries(self) -> int:
        """Robots that run a new version first: at least one of a fleet of several, unless canary_fraction is 0 (a release
        goes to every robot at once); none for a lone robot (its telemetry is the gate's)."""
        if self.num_robots < 2 or self.canary_fraction == 0:
            return 0
        return max(1, int(round(self.canary_fraction * self.num_robots)))


def robots_record_state(robot_model: str, record_state: bool | None) -> bool:
    """Whether the simulated robots record their physics state (qpos/qvel extras) in their telemetry, checked before
    anything runs. Calibration and scenarios start from recorded states, or from states rebuilt from observations by
    the robot's observation->state map (sim/calibration.py). ``None`` (the default): record them exactly where the robot
    has no map (a derived observation: a tilt instead of a quaternion, sensors), as a real robot logs its encoders'
    joint state; the built-in robots' telemetry stays observations and actions. ``False`` with no map, or a map that
    does not reproduce the robot's own observations, is refused here, not in a Ray task after the robots have acted."""
    if record_state is None:
        record_state = not has_state_map(robot_model)
    if not record_state:
        try:
            check_state_map(get_task(robot_model))
        except ValueError as exc:
            raise ValueError(f"loop.record_state=false: {exc}; or set loop.record_state=true (or leave it null)") from None
    return bool(record_state)


def check_run_budget(settings: LoopSettings, trainer, algo_config, seen: int = 0, done: int = 0) -> None:
    """ValueError unless the run's learner reaches its first update (policies.trainer.first_update). It carries over
    between iterations, so one iteration may end in its warm-up; the iterations left after ``done`` must reach it,
    ``loop.train_env_steps`` each, past the ``seen`` env steps of a resumed run's learner. Short of it, every
    candidate is the initial network; the Trainer's own check once refused iteration 0 mid-run instead."""
    left = settings.iterations - done
    if left < 1:  # only the closing round is left: nothing trains
        return
    config = dataclasses.replace(trainer, total_env_steps=settings.train_env_steps)
    need, why = first_update(config, algo_config, seen, prefix="policy.")
    if left * steps_trained(config, 1) < need:
        per_iteration = -(-need // left)
        least = config.num_worlds * -(-per_iteration // config.num_worlds)  # a whole number of vector steps
        iterations = f"loop.iterations={settings.iterations}" + (f" ({left} left after {done} done)" if done else "")
        raise ValueError(
            f"{iterations} x loop.train_env_steps={settings.train_env_steps} ends before the learner's first update, which needs {need} env steps "
            f"({why}): set loop.train_env_steps to {least} or more, raise loop.iterations, or lower those settings"
        )


@dataclasses.dataclass(frozen=True)
class _Built:
    """The configs the loop instantiates from the Hydra config, once (a bad value stops it before anything runs)."""

    ensemble: object
    wm_train: object
    rollout: object
    proposals: object
    calibration: object
    trainer: object
    algorithm: object

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> _Built:
        nodes = {
            "ensemble": "worldmodel.ensemble", "wm_train": "worldmodel.train", "rollout": "worldmodel.rollout", "proposals": "scenarios.proposals",
            "calibration": "scenarios.calibration", "trainer": "policy.trainer", "algorithm": "policy.algorithm",
        }  # fmt: skip
        return cls(**{name: instantiated(OmegaConf.select(cfg, key), key) for name, key in nodes.items()})  # a refused value named by its key



def unexplained_telemetry(losses: dict[str, float]) -> str | None:
    """What to tell the operator of the robots whose calibration's normalised error (``losses``) is above
    :data:`UNEXPLAINED_LOSS`; None where there is none."""
    poor = {r: loss for r, loss in losses.items() if loss > UNEXPLAINED_LOSS}
    if not poor:
        return None
    return (
        "the robot's physics cannot explain the telemetry of " + ", ".join(f"{r} (normalised error {loss:.3g})" for r, loss in sorted(poor.items()))
        + ": a failed or scaled sensor, actions other than those executed, or another body; check it, and keep its episodes out of "
        "training with `flywheel store withdraw --robot-id ...` (docs/robots.md, A robot sent bad data)"
    )

class Flywheel:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.settings = LoopSettings.from_cfg(cfg)
        self.sim_snapshot: str | None = None  # the store as the iteration in progress began (_iteration_start)
        self.fleet_stable: int | None = None  # the fleet's stable version as the iteration in progress began (_follow_fleet)
        self.fleet = LoopFleet.from_cfg(cfg)  # refuses a key the loop sets itself (loop_config.LOOP_SETS) given another value
        self.task = get_task(self.settings.robot_model)
        self.state_path = self.run_dir / "state.json"
        self.state = self._located(read_run_file(self.state_path) or {"next_iteration": 0, "current": None, "learner": None, "history": []})
        self.state.setdefault("learner", None)
        self.state.setdefault("real_steps", {})
        self.state.setdefault("calibrated_profiles", {})  # robot id -> its last calibrated profile (dict)
        self.state.setdefault("sensor_beliefs", {})  # robot id -> what its calibrations say of its sensor offset (sim/sensors.py)
        self.progress = Progress()
        self.specs = {spec.robot_id: spec for spec in fleet_specs(self.settings.num_robots, list(self.settings.conditions))}
        gone = robot_order(set(self.state["real_steps"]) - set(self.specs))
        if gone:  # their telemetry is in the store: calibration and the gate would look for robots no longer there
            raise ValueError(
                f"run_dir {self.run_dir} holds a run of {len(self.state['real_steps'])} robots; loop.num_robots={self.settings.num_robots} "
                f"would drop {', '.join(gone)}: resume with loop.num_robots >= {len(self.state['real_steps'])} (it may grow, not shrink), or set a new run_dir"
            )
        done = self.state["next_iteration"]
        if self.state.get("final") is None and done > self.settings.iterations:  # stopped in its closing round: one after fewer
            raise ValueError(  # iterations would be logged at a step of the iterations done
                f"run_dir {self.run_dir} holds a run of {done} finished iterations: resume it with loop.iterations >= {done} "
                f"(not {self.settings.iterations}), or set a new run_dir"
            )
        self.training = Training(TrainingPlacement(**OmegaConf.to_container(cfg.ray.training, resolve=True)), int(cfg.ray.max_retries), cfg.ray.address)
        self.built = _Built.from_cfg(cfg)  # every config the iterations use, built (and so checked) before anything runs
        check_run_budget(self.settings, self.built.trainer, self.built.algorithm, self.state.get("learner_env_steps", 0), done)
        self.run_settings = flywheel_run_settings(cfg, self.run_dir)  # refuses another app's run_dir, or a run of other settings
        self.run_id = run_id_of(self.run_dir)  # its store's and registry's key on object storage

    # -- the run --------------------------------------------------------------------------
    def nothing_to_do(self) -> str | None:
        """Why this start has nothing to do (``run_dir`` holds a finished run of ``loop.iterations`` or more), or None.
        The app says so and starts nothing: a rerun once started Ray, the server, the robots and an empty W&B run, and
        pointed summary.json at it. A run stopped before its summary was written is not finished."""
        s, done = self.settings, self.state["next_iteration"]
        if self.state.get("final") is None or done < s.iterations or not (self.run_dir / "summary.json").exists():
            return None
        fewer = f" (loop.iterations={s.iterations} is fewer)" if s.iterations < done else ""
        return f"run_dir {self.run_dir} holds a finished run of {done} iterations{fewer}: nothing to do (its results: summary.json, metrics.jsonl, report.png); raise loop.iterations to continue it"

    def run(self) -> dict:
        """Run (or resume) the loop; returns the summary. A finished run (:meth:`nothing_to_do`) starts nothing: its summary."""
        s = self.settings
        if self.nothing_to_do() is not None:
            return read_run_file(self.run_dir / "summary.json")
        record_run_id(self.run_dir, self.run_id)  # first: a run folder with settings and no id is a run of an earlier build (run_folders.py)
        record_run_settings(self.run_dir, self.run_settings)  # kept if there (a run of an earlier build: recorded at its first resume)
        done, redo_from = self.state["next_iteration"], None
        if self.state.get("final") is None or done < s.iterations:  # a resumed run logs again from the iteration it redoes,
            redo_from = done  # the first one too (an attempt stopped in iteration 0 left its rows); a fresh run has none
        with Services(self.cfg, self.run_dir, robot_order(self.specs), redo_from=redo_from, fleet=self.fleet, run_id=self.run_id) as svc:
            self.svc = svc
            self.training.check_cluster(world_model_cpus(self.built.wm_train), policy_cpus(self.built.trainer))  # before the robots: a task no node holds waits forever
            self.robots = self._start_robots(svc)
            try:
                if self.state["next_iteration"]:
                    self.progress.note(f"resuming {self.run_dir} after iteration {self.state['next_iteration'] - 1}")
                self._settle_release()
                for k in range(self.state["next_iteration"], s.iterations):
                    self._follow_fleet(k)
                    self.sim_snapshot = self._iteration_start(k)
                    record = self._iteration(k)
                    self.state["history"].append(record)
                    self.state["next_iteration"], self.state["final"] = k + 1, None
                    self._save_state()
                    (self.run_dir / RELEASE_FILE).unlink(missing_ok=True)
                if (last := read_run_file(self.run_dir / ITERATION_FILE)) is not None:  # no iteration left to redo: its start goes
                    self.svc.release_start(last["snapshot"])  # (a run given more iterations later pins its next start anew)
                if self.state.get("final") is None:  # the fleet runs the last release: what the loop delivered
                    with self.progress.task("closing round: robots act and upload on the last release", total=None):
                        self.state["final"] = self._telemetry(s.iterations, f"closing round after iteration {s.iterations - 1}")
                    self._save_state()
                return self._finish()
            finally:
                ray.get([r.stop.remote() for r in self.robots.values()])

    def _start_robots(self, svc: Services) -> dict[str, ray.actor.ActorHandle]:
        s = self.settings
        options = svc.robot_options(len(self.specs))
        return {
            robot_id: SimulatedRobot.options(**options[i]).remote(
                spec, s.robot_model, s.episode_steps, svc.url, svc.tokens[robot_id], svc.root_metadata, str(self.run_dir / "robots"), s.seed * 101 + i,
                self.fleet.agent, record_state=s.record_state,
            )
            for i, (robot_id, spec) in enumerate((r, self.specs[r]) for r in robot_order(self.specs))
        }

    def _save_state(self) -> None:
        write_durably(self.state_path, json.dumps(self._paths(self.state, self._relative), indent=1, sort_keys=True).encode())
        kept = self.state.get("worldmodel")
        for old in (self.run_dir / "worldmodel").glob("iter*") if kept else ():  # an older iteration's model, or an abandoned attempt's
            if old.resolve() != Path(kept).resolve():
                shutil.rmtree(old, ignore_errors=True)
        # the learner's checkpoints the state names (training goes on from one, the fleet's policy may be another) stay; an
        # older iteration's goes (~110 MB each after 24 iterations: it holds the replay), its export (a release's files) stays
        named = {Path(self.state[key]["checkpoint"]).resolve() for key in ("learner", "current") if (self.state.get(key) or {}).get("checkpoint")}
        for old in (self.run_dir / "policies").glob("iter*"):
            if old.is_dir() and old.resolve() not in named:
                discard_checkpoint(old)

    # the state's paths are kept relative to the run folder, so a folder moved or copied resumes from its own files
    # (absolute, a copy once warm-started from the original's checkpoint, and a moved one failed with a traceback)
    PATHS = (("current", "export"), ("current", "checkpoint"), ("learner", "export"), ("learner", "checkpoint"), ("worldmodel",))

    def _paths(self, state: dict, convert) -> dict:
        out = json.loads(json.dumps(state))
        for keys in self.PATHS:
            holder = out
            for key in keys[:-1]:
                holder = holder.get(key) if isinstance(holder, dict) else None
            if isinstance(holder, dict) and isinstance(holder.get(keys[-1]), str):
                holder[keys[-1]] = convert(holder[keys[-1]])
        return out

    def _relative(self, path: str) -> str:
        resolved, root = Path(path).resolve(), self.run_dir.resolve()
        return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else path

    def _absolute(self, path: str) -> str:
        """A state path as a path on this host: relative to the run folder; one an earlier build wrote absolute, moved
        with the folder when it no longer exists where it was (its part from policies/ or worldmodel/ on)."""
        p = Path(path)
        if not p.is_absolute():
            return str(self.run_dir / p)
        if not p.exists():
            for i, part in enumerate(p.parts):
                if part in ("policies", "worldmodel") and (self.run_dir / Path(*p.parts[i:])).exists():
                    return str(self.run_dir / Path(*p.parts[i:]))
        return path

    def _located(self, state: dict) -> dict:
        return self._paths(state, self._absolute)

    def _settle_release(self) -> None:
        """After a crash between an iteration's release and its saved state, make the registry and the state agree
        before the iteration is redone: a canary it left is rolled back; a release it widened (the fleet runs it) becomes
        the state's current policy, its export kept apart from the redo's."""
        marker = read_run_file(self.run_dir / RELEASE_FILE)
        if marker is None:  # none in progress; or a run of a build before the marker: its canary is still recognised by its note
            marker = {"iteration": self.state["next_iteration"], "export": None}
        registry, k = self.svc.registry, int(marker["iteration"])
        rollout = registry.rollout()
        current = (self.state["current"] or {}).get("version")
        ours = {v for v in (rollout["stable"], rollout["canary"]) if v is not None and loop_iteration(registry.manifest(v)) == k}
        if rollout["canary"] in ours and rollout["stable"] is None:
            log.warning(  # the registry refuses to roll back a first release (its cohort would keep running it, unsaid)
                "iteration %d's canary v%d was left by an interrupted run; there is no stable version to return its cohort to, so it "
                "stays on %s until the redone iteration's release replaces it", k, rollout["canary"], ", ".join(rollout["cohort"]),
            )  # fmt: skip
        elif rollout["canary"] in ours:
            registry.rollback(f"the run stopped during iteration {k}'s canary; the iteration is redone")
            log.warning("iteration %d's canary v%d was left by an interrupted run: rolled back; redoing the iteration", k, rollout["canary"])
        elif rollout["stable"] not in (None, current) and rollout["stable"] in ours and marker["export"] is None:
            log.warning(
                "the fleet runs v%d, which iteration %d released before the run stopped (a run of an earlier build, which kept no record "
                "of its export): the redone iteration gates against v%s", rollout["stable"], k, current,
            )  # fmt: skip
        elif rollout["stable"] not in (None, current) and rollout["stable"] in ours:
            kept = self.run_dir / "policies" / f"iter{k:03d}-released"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(self._absolute(marker["export"]), kept)
            self.state["current"] = {"version": rollout["stable"], "checkpoint": None, "export": str(kept)}
            self._save_state()
            log.warning("iteration %d's release v%d was widened before the run stopped: the fleet runs it, the redone iteration gates against it", k, rollout["stable"])
        (self.run_dir / RELEASE_FILE).unlink(missing_ok=True)

    def _follow_fleet(self, k: int) -> None:
        """Before iteration ``k``: where the fleet's stable release is not the state's current policy and the loop did not
        make it (an operator rolled the fleet back, or another publisher released), it becomes the current policy, the
        gate's baseline and the next release's parent, and the run says so (fleet/pipeline/fleet_release.py). The stable
        version is kept (``fleet_stable``): the iteration releases only while the fleet still runs it (:meth:`_fleet_moved`)."""
        spec = {"robot_model": self.settings.robot_model, "obs_dim": self.task.obs_dim, "act_dim": self.task.act_dim}
        self.fleet_stable = self.svc.registry.rollout()["stable"]
        adopted = fleet_current(self.svc.registry, self.fleet_stable, self.state["current"], self.run_dir, spec)
        if adopted is None:
            return
        if adopted["export"] != (self.state["current"] or {}).get("export"):
            self.progress.note(f"iteration {k}: the fleet runs v{adopted['version']}, released outside this run (an operator's rollback?): the current policy from now on (was v{(self.state['current'] or {}).get('version')})")
        self.state["current"] = adopted
        self._save_state()

    def _iteration_start(self, k: int) -> str:
        """The store's snapshot as iteration ``k`` began, recorded at its first attempt (a redo reads it back): the sim
        episodes it trains on stop there, so a redone iteration trains on what an uninterrupted one would have."""
        start = read_run_file(self.run_dir / ITERATION_FILE)
        if start is None or start.get("iteration") != k:
            previous, start = start, {"iteration": k, "snapshot": self.svc.pinned_tip()}
            write_durably(self.run_dir / ITERATION_FILE, json.dumps(start).encode())
            if previous and previous.get("snapshot") not in (None, start["snapshot"]):
                self.svc.release_start(previous["snapshot"])
        else:
            self.svc.pin_start(start["snapshot"])  # a redo reads it again (a run folder of an earlier build did not pin it)
        return start["snapshot"]

    def _world_model_dir(self) -> Path | None:
        """The model the last finished iteration left (a run of an earlier build kept it in worldmodel/ itself)."""
        if "worldmodel" in self.state:  # None: none yet, or dropped with the data it learned from (_after_withdrawals)
            return Path(self.state["worldmodel"]) if self.state["worldmodel"] else None
        legacy = self.run_dir / "worldmodel"
        return legacy if legacy.is_dir() else None

    def _act(self, robot_ids: list[str], episodes: int, call: str) -> list[dict]:
        """``call`` names the round (unique in the run): a robot restarted mid-round resumes it (simfleet.py). Every
        round's steps count as real steps used, telemetry and canary rounds alike (the canary's were left out once)."""
        summaries = [x for batch in ray.get([self.robots[r].run.remote(episodes, call) for r in robot_ids]) for x in batch]
        drained = ray.get([self.robots[r].drain.remote(120.0) for r in robot_ids])
        if not all(drained):
            raise RuntimeError(f"robots {[r for r, d in zip(robot_ids, drained) if not d]} could not upload within 120 s: is the server up?")
        real_steps = self.state["real_steps"]
        for t in summaries:
            real_steps[t["robot_id"]] = real_steps.get(t["robot_id"], 0) + int(t["steps"])
        return summaries

    # -- one iteration ----------------------------------------------------------------------
    def _telemetry(self, k: int, call: str | None = None) -> dict:
        """Every robot runs what it holds for ``episodes_per_robot`` episodes and uploads them: the
        iteration's record of returns, the versions run and the real steps used so far (logged at step ``k``).
        ``call``: the round's name (default: iteration k's); the closing round has its own, so that a run resumed
        with more iterations runs iteration k afresh rather than replaying the closing round's episodes."""
        s = self.settings
        telemetry = self._act(robot_order(self.robots), s.episodes_per_robot, call or f"iteration {k}: telemetry")
        fleet_returns = steps.mean_returns(telemetry)
        real_steps = self.state["real_steps"]  # counted by _act, this round and every canary round before it
        self.svc.tracker.log(
            {f"fleet/return/{r}": v for r, v in fleet_returns.items()}
            | {f"fleet/real_steps/{r}": float(n) for r, n in real_steps.items()}
            | {"fleet/return_mean": float(np.mean(list(fleet_returns.values()))), "fleet/real_steps_total": float(sum(real_steps.values()))},
            k,
        )
        return {"iteration": k, "fleet_returns": fleet_returns, "policy_versions": sorted({t["policy_version"] for t in telemetry}), "real_steps": dict(real_steps)}

    def _iteration(self, k: int) -> dict:
        s, svc, cfg = self.settings, self.svc, self.cfg
        step = k
        ids = robot_order(self.robots)
        with self.progress.task(f"iteration {k}: robots act and upload", total=None):
            record = self._telemetry(k)
        fleet_returns = record["fleet_returns"]

        with self.progress.task(f"iteration {k}: snapshot + calibrate robots"):
            snapshot_id, real, sim, profiles, offsets = self._calibrated_data(k, record)
        filters = {}
        if s.sensor_filter:  # robots with a noisy calibrated sensor: a filter on board; training worlds and the gate run it too
            with self.progress.task(f"iteration {k}: sensor filters"):
                filters = steps.fit_sensor_filters(s.robot_model, profiles, self._policy_factory(self.state["current"])(), s.seed + k)
                real = filtered_episodes(real, filters)  # what each filtered robot's policy saw
            record["sensor_filters"] = {r: f.to_dict() for r, f in filters.items()}
            if filters:
                svc.tracker.log({f"calibration/{r}/sensor_filter_error": float(f.filtered_rms.sum() / f.raw_rms.sum()) if f.keep else 1.0 for r, f in filters.items()}, k)
        on_board = {profiles[r]: f.filter for r, f in filters.items() if f.keep}  # the simulated robots read their sensors as the real ones
        seen = steps.seen_bodies(profiles, on_board)  # the bodies the policy is told it drives: a filtered sensor as a clean one

        with self.progress.task(f"iteration {k}: world model"):
            model_dir = self.run_dir / "worldmodel" / f"iter{k:03d}"  # the last finished iteration's model stays as it was
            model, wm_report, wm_version = self.training.world_model(
                real, sim, self._world_model_dir(), model_dir, self.built.ensemble, self.built.wm_train, cfg.worldmodel.train.device
            )
            self.state["worldmodel"] = str(model_dir)
            record["world_model"] = {
                "version": wm_version, "val_mse": wm_report.elite_val_mse, "steps": wm_report.steps, "train_transitions": wm_report.train_transitions
            }
        svc.tracker.log({f"worldmodel/{k2}": v for k2, v in record["world_model"].items() if isinstance(v, float)}, step)

        current, learner = self.state["current"], self.state["learner"]
        factory = self._policy_factory(current)
        # synthetic data is on-policy: the policy in training (the latest candidate) plus exploration noise
        explorer, explorer_version = self._explorer_factory(learner, k), (f"candidate-{learner['iteration']}" if learner else "none")
        with self.progress.task(f"iteration {k}: scenarios (MuJoCo on Ray) + world-model rollouts"):
            scen_eps, counts = steps.generate_scenarios(
                real, profiles, model, explorer, self.built.proposals, map_fn=svc.ray_map,
                chunk_size=int(cfg.scenarios.fanout.chunk_size), policy_version=explorer_version,
            )
            wm_eps = steps.model_rollouts(model, real, explorer(), s.wm_rollouts, self.built.rollout, explorer_version, seen)
            stored = svc.store_synthetic(scen_eps + wm_eps)
        record["scenarios"] = {"proposed": counts, "sim_episodes": len(scen_eps), "worldmodel_episodes": len(wm_eps), "stored": stored}
        svc.tracker.log({"data/scenario_episodes": len(scen_eps), "data/worldmodel_episodes": len(wm_eps)} | {f"scenarios/{t}": float(n) for t, n in counts.items()}, step)

        with self.progress.task(f"iteration {k}: train policy ({cfg.policy.trainer.algorithm})"):
            trainer_cfg = dataclasses.replace(self.built.trainer, total_env_steps=s.train_env_steps, seed=s.seed + k)
            steps_before = self.state.get("learner_env_steps", 0)  # the learner carries over: its steps count on
            algo_cfg = self.built.algorithm
            if s.body_context:  # one policy for every body, told apart by each robot's calibrated body features
                algo_cfg = steps.body_conditioned(algo_cfg)
            worlds = profiles
            if s.robust_to_sensor_noise:  # the actor trains under the fleet's sensor noise, but for the filtered sensors' (their worlds run the filter)
                residuals = {r: f.view_noise for r, f in filters.items() if f.keep}  # a filtered sensor: the noise its filter leaves
                algo_cfg = steps.robust_to_fleet_sensors(algo_cfg, profiles if s.noise_free_training_worlds else steps.filter_residuals(seen, residuals))
                worlds = steps.clean_sensor_worlds(profiles) if s.noise_free_training_worlds else profiles
            trained = self.training.policy(
                trainer_cfg, algo_cfg, {"real": real, "sim": sim + scen_eps, "worldmodel": wm_eps},
                profiles, Path(learner["checkpoint"]) if learner else None, self.run_dir / "policies" / f"iter{k:03d}",
                svc.tracker.learner_log(steps_before, step),
                worlds=worlds, sensor_filters=on_board,
            )
            export_dir = self.run_dir / "policies" / f"iter{k:03d}" / "export"
            weights, policy_manifest = svc.export(trained.policy, export_dir, s.robot_model, snapshot_id, self.built.trainer.algorithm)
            # training continues from this candidate next iteration, promoted or not
            self.state["learner"] = {"iteration": k, "checkpoint": str(trained.checkpoint), "export": str(export_dir)}
            self.state["learner_env_steps"] = steps_before + trained.env_steps
            ran_on = {} if self.training.on_cluster else {"device": str(resolve_device(trainer_cfg.device))}  # auto: what it was here (a node's own there)
            svc.tracker.config_update({"effective_trainer": {**dataclasses.asdict(trainer_cfg), **ran_on}, "effective_algorithm": dataclasses.asdict(algo_cfg)})

        if self.training.on_cluster:  # the Ray node each training task ran on
            record["training_nodes"] = dict(self.training.nodes)
        release_filters = filters
        if filters:  # a release carries filters fitted under the policy it carries (this iteration's were fitted under the current one)
            with self.progress.task(f"iteration {k}: sensor filters under the candidate"):
                release_filters = self._filters_under(export_dir, filters, profiles, s.seed + k)
            record["release_sensor_filters"] = {r: f.to_dict() for r, f in release_filters.items()}
        release_on_board = {profiles[r]: f.filter for r, f in release_filters.items() if f.keep}
        with self.progress.task(f"iteration {k}: gate on every robot's profile"):
            cand = steps.evaluate_on_profiles(trained.policy, s.robot_model, profiles, s.eval_episodes, s.seed, release_on_board)
            cur = steps.evaluate_on_profiles(factory(), s.robot_model, profiles, s.eval_episodes, s.seed, on_board)
            decision = gate(cand, cur, **s.gate)
        self.progress.note(f"iteration {k}: gate: {decision.reason}")  # why promoted or not, where the run is watched
        record["gate"] = decision.to_dict()
        svc.tracker.log(
            {"gate/promote": float(decision.promote), "gate/fleet_current": decision.fleet_current, "gate/fleet_candidate": decision.fleet_candidate,
             "gate/fleet_difference": decision.fleet_difference, "gate/fleet_ci_low": decision.fleet_ci[0], "gate/fleet_ci_high": decision.fleet_ci[1],
             "gate/episode_steps": float(self.task.max_steps)}  # the gate's horizon: the task's limit, not telemetry's episode_steps
            | {f"gate/{r}/{key}": float(v[key]) for r, v in decision.per_robot.items() for key in ("difference", "ci_low", "ci_high")},
            step,
        )  # fmt: skip

        on_robot = {  # the manifest fields each robot applies around the policy
            "sensor_offsets": offset_vectors(offsets, self.task.obs_dim), "sensor_filters": filter_vectors(release_filters),
            "body_contexts": context_vectors(seen) if trained.policy.context_dim else None,
        }  # fmt: skip
        lineage = {  # what W&B's policy artifact records beside its dataset: where else the policy came from
            "iteration": k, "learner_seed": s.seed + k, "parent_release": (self.state.get("current") or {}).get("version"),
            "world_model": (record.get("world_model") or {}).get("version"), "synthetic_episodes": record.get("scenarios"),
            "gate": {key: record["gate"].get(key) for key in ("fleet_current", "fleet_candidate", "fleet_difference", "fleet_ci")},
        }  # fmt: skip
        released = self._release(k, trained, (weights, policy_manifest, export_dir), decision, profiles, on_robot, snapshot_id, fleet_returns, lineage) if decision.promote else None
        record["rollout"] = released or {"stage": "not promoted", "reason": decision.reason}
        if released and released.get("canary_reason"):
            self.progress.note(f"iteration {k}: canary v{released['version']} {released['stage']}: {released['canary_reason']}")
        svc.tracker.log({"rollout/stage": ROLLOUT_STAGES.get(record["rollout"]["stage"], -1.0)}, step)
        horizon = f"{self.task.max_steps}_steps"  # telemetry's return is over episode_steps, the gate's evaluations over the task's limit
        svc.tracker.table("fleet/robots", ["iteration", "robot", "condition", f"return_{s.episode_steps}_steps", f"candidate_eval_{horizon}", f"current_eval_{horizon}"], [
            [k, r, self.specs[r].condition, fleet_returns.get(r), decision.per_robot.get(r, {}).get("candidate"), decision.per_robot.get(r, {}).get("current")] for r in ids
        ], step)
        return record

    def _calibrated_data(self, k: int, record: dict):
        """The store snapshot, each robot calibrated from its telemetry, and the sensor offsets the
        robots get with the next release. Returns (snapshot id, real episodes, sim episodes, profiles,
        offsets), the real episodes and profiles in the robots' corrected view: each robot with an
        offset takes it out on board, so from here on models, scenarios, training and the gate see
        what its policy will see (sim/sensors.py)."""
        s, svc = self.settings, self.svc
        model = self.task.model
        layout = {"observation": self.task.obs_dim, "action": self.task.act_dim, "qpos": model.nq, "qvel": model.nv}
        snapshot_id, raw_real, sim, counts = svc.read_data(s.robot_model, self.sim_snapshot, s.real_window_steps, s.sim_window_steps, layout)
        record["snapshot"], record["data"] = snapshot_id, counts
        self._after_withdrawals(k, record, counts.get("withdrawals", {}))
        if other := counts.get("other_layout"):  # one robot's firmware change stopped every iteration of the fleet's training
            said = [f"{r} {o['episodes']} ({'; '.join(o['layouts'])})" for r, o in sorted(other.items())]
            self.progress.note(
                f"iteration {k}: left out episodes of {s.robot_model} whose layout is not the task's (observation {layout['observation']}, "
                f"action {layout['action']}, qpos {layout['qpos']}, qvel {layout['qvel']}): " + ", ".join(said[:5])
                + (f" and {len(said) - 5} more robots" if len(said) > 5 else "")
                + "; they stay in the store. A robot whose observation or action changed sends its own robot_model (docs/robots.md)"
            )
        svc.mirror_dataset(snapshot_id, counts, k, s.robot_model, {"real_window_steps": s.real_window_steps, "sim_window_steps": s.sim_window_steps})
        cal_cfg = self.built.calibration
        starts = self.state["calibrated_profiles"]  # each robot's search begins at its previous calibration
        calibrations = steps.calibrate_fleet(s.robot_model, raw_real, cal_cfg, s.calibration_episodes, map_fn=svc.ray_map, starts=starts)
        self.state["calibrated_profiles"] = {r: c.profile.to_dict() for r, c in calibrations.items()}
        record["calibration"] = {r: {**c.estimates, "loss": c.loss} for r, c in calibrations.items()}
        if said := unexplained_telemetry({r: c.loss for r, c in calibrations.items()}):  # a failed sensor went unremarked
            self.progress.note(f"iteration {k}: {said}")
        offsets = {}
        if s.sensor_correction:
            self.state["sensor_beliefs"], offsets = steps.track_sensor_offsets(self.state["sensor_beliefs"], calibrations, raw_real, cal_cfg, s.calibration_episodes)
        record["sensor_offsets"] = offsets
        real, profiles = corrected_view(raw_real, {r: c.profile for r, c in calibrations.items()}, offsets)
        truth_error = self._calibration_error(calibrations)
        svc.tracker.log(
            {f"calibration/{r}/{p}_rel_error": e for r, errs in truth_error.items() for p, e in errs.items()}
            | {f"calibration/{r}/sensor_offset": float(offsets.get(r, 0.0)) for r in calibrations}
            | {f"calibration/{r}/loss": float(c.loss) for r, c in calibrations.items()}
            | {f"data/{source}_episodes": float(counts[source]) for source in ("real", "sim")}
            | {f"data/{source}_episodes_in_store": float(counts[f"{source}_in_store"]) for source in ("real", "sim")},
            k,
        )
        return snapshot_id, real, sim, profiles, offsets

    def _after_withdrawals(self, k: int, record: dict, rules: dict[str, list[str]]) -> None:
        """Where the store's withdrawal rules (``rules``: rule id -> the robots it names, as read_data counts them) are not
        those this run last trained under (state.json's ``withdrawals``), what was learned from the episodes they withdrew
        or gave back is dropped: the learner's carried state (its replay holds their transitions) and the world model
        start afresh, and the robots they name calibrate from scratch, their sensor beliefs forgotten. The run's
        ``learner_env_steps`` keep counting toward its budget. Noted on the console and in the iteration's record; the
        state is saved with the iteration, so a run stopped before that resets again when it redoes it."""
        seen = self.state.get("withdrawals") or {}
        if set(rules) == set(seen):
            return
        added, lifted = sorted(set(rules) - set(seen)), sorted(set(seen) - set(rules))
        robots = robot_order({r for i in added for r in rules[i]} | {r for i in lifted for r in seen[i]})
        reset = [key for key in ("learner", "worldmodel") if self.state.get(key)]
        self.state["learner"], self.state["worldmodel"] = None, None
        for key in ("calibrated_profiles", "sensor_beliefs"):
            for r in robots:
                self.state[key].pop(r, None)
        self.state["withdrawals"] = rules
        record["withdrawals"] = {"added": added, "lifted": lifted, "robots": robots, "reset": reset}
        said = "; ".join(part for part in (f"withdrawn by {', '.join(added)}" if added else "", f"lifted: {', '.join(lifted)}" if lifted else "") if part)
        self.progress.note(
            f"iteration {k}: the store's withdrawal rules changed ({said}; robots {', '.join(robots) or 'none'}): "
            + (f"the {' and the '.join(reset)} start afresh, " if reset else "")
            + "those robots calibrate from scratch (docs/store.md, Withdrawing episodes)"
        )

    def _release(self, k: int, trained, exported: tuple[bytes, dict, Path], decision, profiles, on_robot: dict, snapshot_id: str, fleet_returns: dict[str, float], lineage: dict) -> dict:
        """Sign and publish the exported candidate (weights, manifest, folder) with what each robot applies
        around it (``on_robot``: manifest fields sensor_offsets, sensor_filters, body_contexts) to the
        canaries; widen or roll back from their telemetry. Neither is done once the fleet moved on without the loop (an
        operator's rollback while the iteration ran: :meth:`_fleet_moved`, :meth:`_settled_outside`)."""
        s, svc = self.settings, self.svc
        weights, policy_manifest, export_dir = exported
        evaluated = [r for r in robot_order(self.robots) if r in getattr(decision, "per_robot", {})]  # a robot whose telemetry is all withdrawn was not
        canaries = (evaluated or robot_order(self.robots))[: s.num_canaries]  # evaluated by the gate: it is not the one to try the release on
        moved = self._fleet_moved(k)
        if moved is not None:  # the gate measured the candidate against a policy the fleet no longer runs
            self.progress.note(f"iteration {k}: not released: {moved}")
            return {"stage": "fleet moved", "reason": moved}
        write_durably(self.run_dir / RELEASE_FILE, json.dumps({"iteration": k, "export": self._relative(str(export_dir))}).encode())  # _settle_release's clue
        manifest = svc.registry.publish(
            weights, robot_model=s.robot_model, obs_dim=self.task.obs_dim, act_dim=self.task.act_dim, cohort=canaries or None,
            policy=policy_manifest, data_snapshot=snapshot_id, gate=decision.to_dict(), **on_robot, note=release_note(k),
        )
        version = manifest["version"]
        stage = "widened"
        if canaries:
            with self.progress.task(f"iteration {k}: canary v{version} on {canaries}"):
                after = self._act(canaries, s.canary_episodes, f"iteration {k}: canary v{version}")
            verdict = judge_canary(
                {r: [fleet_returns[r]] for r in canaries},
                {r: [t["return"] for t in after if t["robot_id"] == r and t["policy_version"] == str(version)] for r in canaries},
                min_episodes=1,
                rel_tolerance=s.gate["rel_tolerance"] * 2,
                abs_tolerance=s.gate["abs_tolerance"],
            )
            svc.tracker.log({f"canary/{r}/{side}": v[side] for r, v in verdict.per_robot.items() for side in ("before", "after")}, k)
            judged = {"canary_returns": verdict.per_robot, "canary_reason": verdict.reason}  # what widened or rolled back, and on what
            if verdict.action != "widen":  # regressed, or never reported on the new version
                reason = verdict.reason if verdict.action == "rollback" else f"canaries did not report on v{version}: {verdict.reason}"
                try:
                    outside = _settled_elsewhere(lambda: svc.registry.rollback(reason, canary=version))  # this iteration's canary, not one published meanwhile
                except RolloutRefused as exc:
                    if exc.code != "no_stable":
                        raise
                    # a first release: no stable version to return the canaries to, so they keep it (and the registry says so)
                    log.warning("iteration %d: canary v%d %s, but there is no stable version to return %s to: they keep it until a release replaces it", k, version, verdict.reason, canaries)
                    return {"stage": "canary kept", "version": version, "reason": f"{verdict.reason}; no stable version to return to", "canaries": canaries, **judged}
                if outside is None:
                    return {"stage": "rolled back", "version": version, "reason": verdict.reason, "canaries": canaries, **judged}
            elif (moved := self._fleet_moved(k)) is not None:  # re-checked before widening
                outside = _settled_elsewhere(lambda: svc.registry.rollback(f"not widened: {moved}", canary=version))
                if outside is None:  # the fleet moved between the look before publishing and the publish: the canary ran on
                    self.progress.note(f"iteration {k}: canary v{version} rolled back, not widened: {moved}")
                    return {"stage": "fleet moved", "version": version, "reason": moved, "canaries": canaries, **judged}
            else:
                outside = _settled_elsewhere(lambda: svc.registry.widen(version))
            if outside is not None:  # an operator (or another publisher) settled the canary while it ran
                settled = self._settled_outside(k, version, outside, {"canaries": canaries, **judged})
                if settled is not None:
                    return settled
        else:
            stage, judged = "released", {}  # no canary stage (loop.num_canaries=0): to every robot at once
        self.state["current"] = {"version": version, "checkpoint": str(trained.checkpoint), "export": str(export_dir)}
        svc.mirror_policy(version, export_dir, s.robot_model, snapshot_id, lineage)
        self._video(k, version, trained.policy, profiles)
        return {"stage": stage, "version": version, "canaries": canaries, **judged}

    def _fleet_moved(self, k: int) -> str | None:
        """Why iteration ``k`` may no longer release (publish or widen): the fleet's stable version is not the one the
        iteration began from (``fleet_stable``), so the gate measured its candidate against a policy the fleet no longer
        runs (an operator rolled the fleet back, or another publisher released, while it ran); None while it is."""
        stable = self.svc.registry.rollout()["stable"]
        if stable == self.fleet_stable:
            return None
        now, then = (f"v{v}" if v is not None else "no stable version" for v in (stable, self.fleet_stable))
        return (
            f"the fleet runs {now}, not {then} as when iteration {k} began (an operator rolled it back, or another "
            "publisher released, meanwhile): the candidate was measured against a policy the fleet no longer runs; the next "
            "iteration starts from the fleet's release"
        )

    def _settled_outside(self, k: int, version: int, why: str, judged: dict) -> dict | None:
        """Iteration ``k``'s canary ``version`` once widened, rolled back or replaced outside the run while it ran (``why``:
        what the registry said). None where the fleet runs it (an operator widened it): the loop goes on as if it had;
        else the iteration's rollout record (``judged``: the canaries and their verdict), the current policy left as it
        is: the next iteration starts from the fleet's release (:meth:`_follow_fleet`)."""
        stable = self.svc.registry.rollout()["stable"]
        if stable == version:
            self.progress.note(f"iteration {k}: canary v{version} was widened outside the run while it ran ({why}): the fleet runs it")
            return None
        now = f"v{stable}" if stable is not None else "no stable version"
        reason = f"canary v{version} was settled outside the run while it ran ({why}); the fleet runs {now}: the next iteration starts from it"
        self.progress.note(f"iteration {k}: {reason}")
        return {"stage": "settled by operator", "version": version, **judged, "reason": reason}

    def _video(self, k: int, version: int, policy, profiles: dict) -> None:
        """One evaluation video of the released policy on the first robot's calibrated profile."""
        from fleet.pipeline.video import render_episode

        robot_id = sorted(profiles)[0]
        frames = render_episode(policy, self.settings.robot_model, profiles[robot_id], seed=self.settings.seed)
        if frames is not None:
            self.svc.tracker.video(f"eval/video_v{version}_{robot_id}", frames, fps=int(round(1 / self.task.control_dt)), step=k)

    # -- helpers ------------------------------------------------------------------------------
    def _filters_under(self, export_dir: Path, filters: dict, profiles: dict, seed: int) -> dict:
        """Each filtered robot's filter refitted under the policy exported at ``export_dir``, where the policy
        drives the body: the refit where it is kept, else the one the policy trained with (``filters``).
        Under a balancing policy the fitted model covers the states it visits, and the filter leaves less
        noise than one fitted under the previous policy (docs/benchmarks.md, "At equal data")."""
        refits = steps.fit_sensor_filters(self.settings.robot_model, {r: profiles[r] for r in filters}, self._policy_factory({"export": str(export_dir)})(), seed)
        return {r: refits[r] if r in refits and refits[r].keep else f for r, f in filters.items()}

    def _policy_factory(self, current: dict | None):
        """A picklable-by-reference factory of the current policy (numpy runtime), for Ray tasks too."""
        if current is None:
            return functools.partial(zero_policy, self.task.act_dim)
        from policies.runtime import load_policy

        return functools.partial(load_policy, current["export"], robot_model=self.settings.robot_model, obs_dim=self.task.obs_dim, act_dim=self.task.act_dim)

    def _explorer_factory(self, learner: dict | None, k: int):
        """The latest candidate with exploration noise (picklable, for Ray tasks), or the zero policy before any."""
        if learner is None:
            return functools.partial(zero_policy, self.task.act_dim)
        return functools.partial(_with_noise, self._policy_factory(learner), self.settings.synthetic_action_noise, self.settings.seed * 1_000_003 + k)

    def _calibration_error(self, calibrations: dict) -> dict[str, dict[str, float]]:
        """Relative error of each identifiable estimate vs the robot's hidden true profile: the loop's simulated robots only
        (a robot of the store's that the loop does not simulate, one that uploaded through flywheel-server, has no known truth)."""
        out = {}
        for robot_id, result in calibrations.items():
            if robot_id not in self.specs:
                continue
            truth = self.specs[robot_id].profile
            out[robot_id] = {
                p: abs(v - getattr(truth, p)) / max(abs(getattr(truth, p)), 1e-6)
                for p, v in result.estimates.items()
                if result.identifiable.get(p, False) and getattr(truth, p) != 0
            }
        return out

    def _finish(self) -> dict:
        history, final = self.state["history"], self.state["final"]
        statuses = ray.get([self.robots[r].status.remote() for r in robot_order(self.robots)])
        summary = {
            "iterations": history, "final": final, "robots": statuses, "run_dir": str(self.run_dir), "wandb_dir": self.svc.tracker.wandb_dir,
            "ray_task_nodes": dict(self.svc.task_nodes),  # Ray node id -> this process's calibration and scenario tasks it ran
            "code": code_version(),  # the code that finished it (not a setting: a resumed run may have run newer code, flywheel_run.json)
        }
        write_durably(self.run_dir / "summary.json", json.dumps(summary, indent=1, sort_keys=True, default=str).encode())
        from fleet.pipeline.report import write_report

        write_report([*history, final], self.specs, self.run_dir / "report.png")
        return summary



def _settled_elsewhere(change) -> str | None:
    """``change()`` (the loop's widen or rollback of its own canary); the registry's text where the canary was no longer
    there to change (widened, rolled back or replaced outside the run), else None."""
    try:
        change()
    except (NoCanary, CanaryChanged) as exc:
        return str(exc)
    return None


def _with_noise(factory, std: float, seed: int):
    return noisy_policy(factory(), std, seed)
