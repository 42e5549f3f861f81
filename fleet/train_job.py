"""`flywheel-train`'s job: one policy trained on its own (no fleet, no server), evaluated and exported.

One process by default (``train.workers: 1``: the :class:`policies.trainer.Trainer` here, no Ray);
``train.workers: N`` trains N data-parallel Ray Train workers (:func:`policies.distributed.fit`,
DDP) on the local Ray this process starts or on the cluster ``ray.address`` joins, each with a GPU
of its own when ``policy.trainer.device`` is ``auto`` and the cluster has one per worker. Either
way the run folder holds a checkpoint that a rerun with the same ``run_dir`` continues from, and
ends with the policy evaluated on every body of ``train.conditions`` and exported for robots
(``export/``: safetensors weights + manifest, what ``policies.runtime.load_policy`` reads).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from fleet.pipeline.simfleet import condition_profiles
from fleet.run_folders import TRAIN_JOB, other_app_run, read_run_file
from policies.checkpoint import env_steps_of
from policies.evaluate import evaluate
from policies.export import export_checkpoint, policy_from_checkpoint
from policies.settings import checkpoint_settings_differ
from policies.trainer import Trainer, TrainerConfig, algo_config_class, check_budget, make_algorithm, steps_trained
from sim.durable import write_durably
from sim.variation import VariationProfile
from worldmodel.device import resolve_device

EVAL_SEED = 777  # fixed scenario seeds for the final evaluation: every run of a config is judged on the same episodes
CHECKPOINT = "checkpoint"  # the one-process learner's checkpoint folder in run_dir


class TrainSettingsError(ValueError):
    """What was asked for cannot run (the app prints it as one line)."""


class OtherSettingsError(TrainSettingsError):
    """run_dir holds a run of other settings."""


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """``train`` of train.yaml."""

    workers: int = 1  # 1: this process, no Ray; N > 1: N Ray Train workers (DDP), SAC or PPO
    max_failures: int = 0  # workers > 1: Ray Train restarts the workers from their last checkpoint this many times
    conditions: tuple[str, ...] = ("nominal",)  # bodies (fleet.pipeline.simfleet.CONDITIONS) the worlds cycle over; evaluated on each
    eval_episodes: int = 16  # deterministic episodes per body after training
    storage: str | None = None  # workers > 1: where Ray Train keeps checkpoints; null: <run_dir>/ray (one machine)

    def __post_init__(self):
        if self.workers < 1 or self.max_failures < 0 or self.eval_episodes < 1:
            raise TrainSettingsError(f"train.workers and train.eval_episodes must be >= 1 and train.max_failures >= 0, got {self.workers}, {self.eval_episodes}, {self.max_failures}")
        try:
            condition_profiles(self.conditions)
        except ValueError as exc:
            raise TrainSettingsError(f"train.conditions: {exc}") from None

    def profiles(self) -> list[VariationProfile]:
        return condition_profiles(self.conditions)

    def ray_storage(self, run_dir: Path) -> tuple[Path, str]:
        """(storage folder, Ray Train run name): the run folder's own, or a name of this run_dir's in a shared folder."""
        if self.storage is None:
            return (run_dir / "ray").resolve(), "policy"
        return Path(self.storage).resolve(), f"{run_dir.name}-{hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]}"

    def checkpoint_state(self, run_dir: Path) -> Path | None:
        """The state.json of the checkpoint a rerun continues from, if there is one."""
        if self.workers == 1:
            state = run_dir / CHECKPOINT / "state.json"
            return state if state.exists() else None
        storage, name = self.ray_storage(run_dir)
        latest = latest_checkpoint(storage / name)
        return None if latest is None else latest / "rank0" / "state.json"

    def checkpoint_steps(self, run_dir: Path) -> int | None:
        """The env steps (of every worker) of the checkpoint a rerun continues from, if there is one: what a stopped
        attempt logged past them is logged again."""
        state = self.checkpoint_state(run_dir)
        if state is None:
            return None
        return env_steps_of(json.loads(state.read_text()))


def preflight(job: TrainJob, trainer: TrainerConfig, algo_config, run_dir: Path) -> None:
    """Refuse what cannot run, before anything starts (a :class:`TrainSettingsError` that says what to do)."""
    if not isinstance(algo_config, kind := algo_config_class(trainer.algorithm)):
        raise TrainSettingsError(
            f"policy.trainer.algorithm={trainer.algorithm} needs a {kind.__name__} as policy.algorithm, got a {type(algo_config).__name__}: "
            "choose the learner with policy=sac, ppo or mbpo"
        )
    if job.workers > 1 and trainer.algorithm == "mbpo":
        raise TrainSettingsError(
            "the model-based learner trains in one process (its world model and rollouts are not data-parallel): "
            "use train.workers=1, or policy=sac / policy=ppo for Ray Train workers"
        )
    check_trainer_fields(dataclasses.asdict(trainer))
    try:  # a budget short of the first update would export the initial network as trained
        check_budget(trainer, algo_config, job.workers, prefix="policy.")
    except ValueError as exc:
        raise TrainSettingsError(str(exc)) from None
    offline = sorted(set(getattr(algo_config, "replay_ratios", {})) - {getattr(algo_config, "online_source", None)})
    if offline:
        raise TrainSettingsError(
            f"policy.algorithm.replay_ratios samples {', '.join(offline)} episodes, which only the flywheel loop gives a learner "
            "(policy=sac_fleet is its setting): flywheel-train learns from its own steps; use policy=sac, or replay_ratios={online: 1.0}"
        )
    if job.workers == 1:
        try:
            resolve_device(trainer.device)
        except ValueError as exc:
            raise TrainSettingsError(f"policy.trainer.device: {exc}") from None
    if (other := other_app_run(run_dir, "flywheel-train")) is not None:
        raise OtherSettingsError(other)
    saved = run_dir / TRAIN_JOB
    try:
        then = read_run_file(saved)
    except ValueError as exc:
        raise OtherSettingsError(str(exc)) from None
    if then is not None and then != (now := _job_record(job)):
        differ = ", ".join(f"train.{k}={then.get(k)}" for k in now if then.get(k) != now[k])
        raise OtherSettingsError(f"{run_dir} holds a run with {differ}: rerun with those settings to continue it, or set a new run_dir")
    if (state := job.checkpoint_state(run_dir)) is not None:
        check_resumable(state, trainer, algo_config)


def check_trainer_fields(fields) -> None:
    """Refuse the learner settings that belong to the flywheel loop (``policy.trainer`` as a mapping: the app checks it
    before the config is built, whose own checks would otherwise send the user the wrong way)."""
    if fields.get("keep_best") or fields.get("stop_at_max_return"):
        raise TrainSettingsError(
            "policy.trainer.keep_best and stop_at_max_return pick the flywheel loop's candidate of an iteration (policy=mbpo_fleet sets them); "
            "flywheel-train exports the learner's final policy: set policy.trainer.keep_best=false policy.trainer.stop_at_max_return=false"
        )


def train_policy(
    job: TrainJob, trainer: TrainerConfig, algo_config, run_dir: Path, log, start_ray=None, ray_address: str | None = None, on_device=lambda device: None,
) -> dict:  # fmt: skip
    """Train, evaluate and export; returns the summary (also written to ``run_dir/summary.json`` by the app).

    ``log(metrics, env_steps)`` gets the learner's metrics (from rank 0 of the workers under Ray Train);
    ``start_ray()`` starts or joins Ray (workers > 1 only); ``on_device(device)`` is told where the learner
    trains as soon as that is known (``device: auto`` resolved here, or for Ray Train's workers)."""
    preflight(job, trainer, algo_config, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_durably(run_dir / TRAIN_JOB, json.dumps(_job_record(job)).encode())
    start = time.perf_counter()
    if job.workers == 1:
        on_device(str(resolve_device(trainer.device)))
        checkpoint = _train_here(job, trainer, algo_config, run_dir, log)
    else:
        start_ray()
        checkpoint = _train_on_ray(job, trainer, algo_config, run_dir, log, local=ray_address is None, on_device=on_device)
    policy, meta = policy_from_checkpoint(checkpoint)
    result = evaluate(policy, trainer.robot, job.profiles(), job.eval_episodes, seed=EVAL_SEED)
    env_steps = env_steps_of(meta)
    version = f"{trainer.robot}-{trainer.algorithm}-seed{trainer.seed}-{env_steps}"
    manifest = export_checkpoint(checkpoint, run_dir / "export", policy_version=version, evaluation=result)
    returns = {c: {"mean": p.mean_return, "std": p.std_return, "failures": p.failures} for c, p in zip(job.conditions, result.profiles)}
    return {"policy_version": manifest["policy_version"], "env_steps": env_steps, "workers": job.workers, "returns": returns,
            "wall_s": round(time.perf_counter() - start, 1), "checkpoint": str(checkpoint), "export": str(run_dir / "export")}  # fmt: skip


def check_resumable(state_json: Path, trainer: TrainerConfig, algo_config) -> None:
    """Refuse to continue a checkpoint written with other settings (but those ``Trainer.resume`` lets change:
    the budget, logging, evaluation, device): its networks, replay and optimiser belong to them."""
    try:
        meta = json.loads(state_json.read_text())
        differ = checkpoint_settings_differ(trainer, algo_config, meta)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OtherSettingsError(f"{state_json.parent} holds an unreadable checkpoint ({exc!r}): set a new run_dir") from None
    if differ:
        held = "; ".join(f"policy.{key}: it holds {_setting(meta, key)!r}" for key in differ)
        raise OtherSettingsError(f"{state_json.parent} holds a checkpoint of other settings ({held}): rerun with its settings to continue it, or set a new run_dir")
    done, world_size = env_steps_of(meta), int(meta.get("world_size", 1))
    if done > steps_trained(trainer, world_size):  # it would train nothing, and record a budget the policy never had
        raise OtherSettingsError(
            f"{state_json.parent} holds a checkpoint of {done:,} env steps, more than policy.trainer.total_env_steps={trainer.total_env_steps:,}: "
            f"rerun with {done} (re-evaluate and re-export) or more (continue), or set a new run_dir"
        )


def _setting(meta: dict, key: str):
    """The value a checkpoint's ``meta`` recorded for ``trainer.KEY`` or ``algorithm.KEY`` (dotted further for nested ones)."""
    section, _, rest = key.partition(".")
    value = meta.get("trainer_config" if section == "trainer" else "algo_config") or {}
    for part in rest.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _job_record(job: TrainJob) -> dict:
    return {"workers": job.workers, "conditions": list(job.conditions), "storage": job.storage}


def _train_here(job: TrainJob, trainer: TrainerConfig, algo_config, run_dir: Path, log) -> Path:
    checkpoint = run_dir / CHECKPOINT
    algorithm = make_algorithm(trainer, algo_config)
    with Trainer(trainer, algorithm, profiles=job.profiles(), log=log, checkpoint_dir=checkpoint, algo_config=algo_config) as t:
        if job.checkpoint_state(run_dir) is not None:
            t.resume()  # a rerun with the same run_dir continues (a finished run only re-evaluates and re-exports)
        t.train()  # saves the checkpoint when it returns
    return checkpoint


def _train_on_ray(job: TrainJob, trainer: TrainerConfig, algo_config, run_dir: Path, log, local: bool, on_device=lambda device: None) -> Path:
    import ray

    from fleet.pipeline.remote_log import LogStream
    from policies.distributed import fit, worker_device

    resources = ray.cluster_resources()
    if local and resources.get("CPU", 0) < job.workers:  # a cluster may add nodes; a local Ray would wait forever
        raise TrainSettingsError(f"train.workers={job.workers} needs a CPU per worker; this machine's Ray has {resources.get('CPU', 0):g} (ray.num_cpus)")
    try:
        device = worker_device(trainer.device, job.workers, resources.get("GPU", 0))
    except ValueError as exc:
        raise TrainSettingsError(f"policy.trainer.device: {exc}") from None
    on_device(device)
    storage, name = job.ray_storage(run_dir)
    with LogStream(log) as remote_log:  # rank 0's curves reach the run's log (and W&B) while the workers train
        result = fit(
            trainer, algo_config, num_workers=job.workers, storage_path=storage, name=name, max_failures=job.max_failures,
            profiles=job.profiles(), log=remote_log, resume_from=latest_checkpoint(storage / name),
        )  # fmt: skip
    return Path(result.checkpoint.path)


def latest_checkpoint(experiment: Path) -> Path | None:
    """The newest complete checkpoint of an earlier Ray Train run in ``experiment`` (its rank 0 written), if any."""
    done = [c for c in experiment.glob("checkpoint_*") if (c / "rank0" / "state.json").exists()]
    return max(done, key=lambda c: c.stat().st_mtime_ns, default=None)
