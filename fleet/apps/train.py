"""`flywheel-train`: the Hydra app that trains one policy on its own (fleet/train_job.py), in this
process or on Ray Train workers, logs its curves to W&B (offline by default) and the run folder,
and exports it for robots.

    flywheel-train policy=sac policy.trainer.robot=half_cheetah policy.trainer.total_env_steps=100000
    flywheel-train policy=ppo train.workers=4 ray.address=auto train.storage=/mnt/shared/ray   # 4 DDP workers on a cluster
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

import fleet.apps.gl_backend  # noqa: F401  (first of the project's modules: MUJOCO_GL before anything imports mujoco)
from fleet.apps.config_path import CONF_DIR
from fleet.apps.errors import accept_run_folder, check_run_dir_argument, one_line_errors, start_app


def main() -> None:
    import fleet.conf.schema_flywheel  # noqa: F401  (registers the config's schema, which train.yaml names)

    check_run_dir_argument("flywheel-train", sys.argv[1:])
    run_train()


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def run_train(cfg: DictConfig) -> None:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from fleet.pipeline.ray_start import RayJoinError, start_ray
    from fleet.code_version import code_version
    from fleet.tracking import POLICY_STEPS, Tracker, TrackerError, exit_status, recorded_config, run_files_line
    from fleet.train_job import TrainJob, TrainSettingsError, check_trainer_fields, preflight, train_policy
    from policies.checkpoint import CheckpointError
    from sim.durable import write_durably
    from sim.robots import get_task

    start_app("flywheel-train", cfg, uses_ray=cfg.train.workers > 1)
    run_dir = Path(cfg.run_dir)
    with one_line_errors("flywheel-train", (TrainSettingsError,)):  # the settings, checked before anything runs: what is wrong, no traceback
        job = TrainJob(**OmegaConf.to_container(cfg.train))
        check_trainer_fields(cfg.policy.trainer)
        try:
            trainer, algo_config = instantiate(cfg.policy.trainer), instantiate(cfg.policy.algorithm)
        except InstantiationException as exc:  # a value the learner's own config refuses
            raise TrainSettingsError(f"{exc.__cause__ or exc}") from None
        get_task(trainer.robot)
        preflight(job, trainer, algo_config, run_dir)
    if job.workers > 1 and cfg.ray.address:  # a cluster may refuse this process (its token, its address): before the run folder is taken, so a refused start leaves none
        with one_line_errors("flywheel-train", (RayJoinError,)):
            start_ray(cfg.ray)
    accept_run_folder("flywheel-train", run_dir)
    w = cfg.wandb
    done = job.checkpoint_steps(run_dir)  # a rerun goes on from its checkpoint: the rows a stopped attempt logged past it go;
    redo_from = 0 if done is None else done + 1  # with none (stopped before its first), it starts at 0: all of them (a fresh run has none)
    with one_line_errors("flywheel-train", (TrackerError,)):
        tracker = Tracker(run_dir, mode=w.mode, project=w.project, entity=w.entity, config=recorded_config(cfg, run_dir), step_metric=POLICY_STEPS, job_type="train", redo_from=redo_from)
    interrupted = f"rerun with run_dir={run_dir} to continue from its last checkpoint"
    try:
        with one_line_errors("flywheel-train", (RayJoinError, TrainSettingsError, CheckpointError), on_interrupt=interrupted):  # the cluster, what it cannot give, a damaged checkpoint
            summary = train_policy(
                job, trainer, algo_config, run_dir, tracker.learner_log(), start_ray=lambda: start_ray(cfg.ray), ray_address=cfg.ray.address,
                on_device=lambda device: tracker.config_update({"effective_trainer": {**dataclasses.asdict(trainer), "device": device}}),  # auto: what it was
            )  # fmt: skip
        tracker.log({f"eval/{c}/mean_return": r["mean"] for c, r in summary["returns"].items()}, summary["env_steps"], replace=True)  # a re-evaluation: one row
        export = Path(summary["export"])
        summary["code"] = code_version()
        tracker.artifact(
            f"trained-policy-{trainer.robot}", "model", [export / "weights.safetensors", export / "manifest.json"],  # not the loop's policy-<robot>
            _policy_metadata(summary, trainer), aliases=("latest",),
        )  # fmt: skip
        summary["wandb_dir"] = tracker.wandb_dir
    except BaseException as exc:  # stopped (exit 130) or failed (1): W&B records it so, not as finished
        tracker.finish(*exit_status(exc))
        raise
    tracker.finish()
    write_durably(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    Console().print(_table(summary, trainer.robot, trainer.algorithm))
    print(f"policy for robots: {export}  (weights.safetensors + manifest.json; policies.runtime.load_policy reads it)")
    kept = "checkpoint" if job.workers == 1 else "ray/: Ray Train's checkpoints"
    print(f"run folder: {run_dir}  (metrics.jsonl, summary.json, {kept}; rerun with run_dir={run_dir} to continue)")
    if line := run_files_line(w.mode, summary["wandb_dir"]):
        print(line)


def _policy_metadata(summary: dict, trainer) -> dict:
    """The trained-policy artifact's metadata: what it is (version, steps, returns) and what made it (seed, robot,
    algorithm, the code), so a policy found in W&B names its run's settings without the run."""
    keys = ("policy_version", "env_steps", "returns", "code")
    return {**{k: summary[k] for k in keys}, "seed": trainer.seed, "robot": trainer.robot, "algorithm": trainer.algorithm}


def _table(summary: dict, robot: str, algorithm: str) -> Table:
    title = f"{robot}, {algorithm}: {summary['env_steps']:,} env steps, {summary['workers']} worker(s), {summary['wall_s']:.0f} s"
    table = Table(title=title, min_width=len(title))  # as wide as its title: a narrow table wrapped it mid-phrase
    for column in ("body", "mean return", "std", "failures"):
        table.add_column(column, justify="left" if column == "body" else "right")
    for body, r in summary["returns"].items():
        table.add_row(body, f"{r['mean']:.1f}", f"{r['std']:.1f}", str(r["failures"]))
    return table


if __name__ == "__main__":
    main()
