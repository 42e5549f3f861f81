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
import json
import time
from pathlib import Path

from policies.evaluate import evaluate
from policies.export import export_policy, policy_from_checkpoint
from policies.trainer import Trainer, TrainerConfig, make_algorithm
from sim.variation import VariationProfile

EVAL_SEED = 777  # fixed scenario seeds for the final evaluation: every run of a config is judged on the same episodes


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """``train`` of train.yaml."""

    workers: int = 1  # 1: this process, no Ray; N > 1: N Ray Train workers (DDP), SAC or PPO
    max_failures: int = 0  # workers > 1: Ray Train restarts the workers from their last checkpoint this many times
    conditions: tuple[str, ...] = ("nominal",)  # bodies (fleet.pipeline.simfleet.CONDITIONS) the worlds cycle over; evaluated on each
    eval_episodes: int = 16  # deterministic episodes per body after training

    def __post_init__(self):
        from fleet.pipeline.simfleet import CONDITIONS

        if self.workers < 1 or self.max_failures < 0 or self.eval_episodes < 1:
            raise ValueError(f"train.workers and train.eval_episodes must be >= 1 and train.max_failures >= 0, got {self.workers}, {self.eval_episodes}, {self.max_failures}")
        if not self.conditions or any(c not in CONDITIONS for c in self.conditions):
            raise ValueError(f"train.conditions must name one or more of {sorted(CONDITIONS)}, got {list(self.conditions)}")

    def profiles(self) -> list[VariationProfile]:
        from fleet.pipeline.simfleet import CONDITIONS

        return [VariationProfile(**CONDITIONS[c]) for c in self.conditions]


def check_job(job: TrainJob, trainer: TrainerConfig) -> None:
    """Refuse what cannot run, before anything starts."""
    if job.workers > 1 and trainer.algorithm == "mbpo":
        raise ValueError(
            "the model-based learner trains in one process (its world model and rollouts are not data-parallel): "
            "use train.workers=1, or policy=sac / policy=ppo for Ray Train workers"
        )


def train_policy(job: TrainJob, trainer: TrainerConfig, algo_config, run_dir: Path, log, start_ray=None) -> dict:
    """Train, evaluate and export; returns the summary (also written to ``run_dir/summary.json`` by the app).

    ``log(metrics, env_steps)`` gets the learner's metrics (from the workers' reports under Ray Train);
    ``start_ray()`` starts or joins Ray (workers > 1 only)."""
    check_job(job, trainer)
    start = time.perf_counter()
    if job.workers == 1:
        checkpoint = _train_here(job, trainer, algo_config, run_dir, log)
    else:
        start_ray()
        checkpoint = _train_on_ray(job, trainer, algo_config, run_dir, log)
    policy, meta = policy_from_checkpoint(checkpoint)
    env_steps = int(meta["env_steps"]) * int(meta["world_size"])
    result = evaluate(policy, trainer.robot, job.profiles(), job.eval_episodes, seed=EVAL_SEED)
    version = f"{trainer.robot}-{trainer.algorithm}-seed{trainer.seed}-{env_steps}"
    manifest = export_policy(
        policy, run_dir / "export", robot_model=trainer.robot, policy_version=version, algorithm=trainer.algorithm,
        env_steps=env_steps, seed=trainer.seed, training_config={"trainer": meta["trainer_config"], "algorithm": meta["algo_config"]}, evaluation=result,
    )  # fmt: skip
    returns = {c: {"mean": p.mean_return, "std": p.std_return, "failures": p.failures} for c, p in zip(job.conditions, result.profiles)}
    return {"policy_version": manifest["policy_version"], "env_steps": env_steps, "workers": job.workers, "returns": returns,
            "wall_s": round(time.perf_counter() - start, 1), "checkpoint": str(checkpoint), "export": str(run_dir / "export")}  # fmt: skip


class OtherSettingsError(ValueError):
    """run_dir holds a checkpoint written with other settings."""


RESUMABLE = {"total_env_steps", "checkpoint_every", "log_every", "eval_every", "eval_episodes", "keep_best", "stop_at_max_return", "torch_threads", "nthread", "device"}


def check_resumable(state_json: Path, trainer: TrainerConfig, algo_config) -> None:
    """Refuse to continue a checkpoint written with other settings (but the budget, logging and threads):
    its networks, replay and optimiser belong to them."""
    meta = json.loads(state_json.read_text())
    differ = [f"trainer.{k}" for k in _differ(_plain(trainer), meta["trainer_config"]) if k not in RESUMABLE]
    differ += [f"algorithm.{k}" for k in _differ(_plain(algo_config), meta["algo_config"])]
    if differ:
        raise OtherSettingsError(f"{state_json.parent} holds a checkpoint of other settings (policy.{', policy.'.join(differ)}): rerun with its settings to continue it, or set a new run_dir")


def _differ(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _plain(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _train_here(job: TrainJob, trainer: TrainerConfig, algo_config, run_dir: Path, log) -> Path:
    checkpoint = run_dir / "checkpoint"
    algorithm = make_algorithm(trainer, algo_config)
    with Trainer(trainer, algorithm, profiles=job.profiles(), log=log, checkpoint_dir=checkpoint, algo_config=algo_config) as t:
        if (checkpoint / "state.json").exists():
            check_resumable(checkpoint / "state.json", trainer, algo_config)
            t.resume()  # a rerun with the same run_dir continues (a finished run only re-evaluates and re-exports)
        t.train()  # saves the checkpoint when it returns
    return checkpoint


def _train_on_ray(job: TrainJob, trainer: TrainerConfig, algo_config, run_dir: Path, log) -> Path:
    import ray

    from policies.distributed import fit

    storage = (run_dir / "ray").resolve()
    resume_from = latest_checkpoint(storage / "policy")
    if resume_from is not None:
        check_resumable(resume_from / "rank0" / "state.json", trainer, algo_config)
    sink = _log_sink()
    result = fit(
        trainer, algo_config, num_workers=job.workers, storage_path=storage, name="policy", max_failures=job.max_failures,
        profiles=job.profiles(), log=_RemoteLog(sink), resume_from=resume_from,
    )  # fmt: skip
    for metrics, env_steps in ray.get(sink.take.remote()):
        log(metrics, env_steps)
    if result.error is not None:
        raise RuntimeError(f"Ray Train stopped: {result.error}")
    return Path(result.checkpoint.path)


def latest_checkpoint(experiment: Path) -> Path | None:
    """The newest complete checkpoint of an earlier Ray Train run in ``experiment`` (its rank 0 written), if any."""
    done = [c for c in experiment.glob("checkpoint_*") if (c / "rank0" / "state.json").exists()]
    return max(done, key=lambda c: c.stat().st_mtime_ns, default=None)


class _RemoteLog:
    """The learner's ``log`` inside a Ray Train worker (rank 0 calls it): to the driver's :class:`LogSink`."""

    def __init__(self, sink):
        self.sink = sink

    def __call__(self, metrics: dict, env_steps: int) -> None:
        self.sink.add.remote({k: float(v) for k, v in metrics.items()}, int(env_steps))


def _log_sink():
    """A Ray actor that keeps what the workers' rank 0 logs until the driver takes it (workers may run on other nodes)."""
    import ray

    @ray.remote(num_cpus=0)
    class LogSink:
        def __init__(self):
            self.records: list = []

        def add(self, metrics: dict, env_steps: int) -> None:
            self.records.append((metrics, env_steps))

        def take(self) -> list:
            records, self.records = self.records, []
            return records

    return LogSink.remote()
