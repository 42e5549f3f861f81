"""`flywheel-train`, run as a user runs it: a policy trained on its own, in one process or on two Ray
Train workers, logged to W&B offline and the run folder, exported for robots, continued on a rerun."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fleet.train_job import OtherSettingsError, TrainJob, TrainSettingsError, check_resumable, preflight, train_policy
from fleet.wandb_offline import offline_run
from policies.export import policy_from_checkpoint
from policies.runtime import load_policy
from policies.sac import SACConfig
from policies.trainer import TrainerConfig
from worldmodel.device import resolve_device

APP = str(Path(sys.executable).parent / "flywheel-train")
SMALL = ["policy=sac", "policy.trainer.num_worlds=4", "policy.algorithm.hidden_sizes=[16,16]", "policy.algorithm.batch_size=32",
         "policy.algorithm.learning_starts=64", "policy.trainer.log_every=4", "train.eval_episodes=2"]  # fmt: skip


def _train(run: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([APP, *SMALL, *overrides, f"run_dir={run}"], capture_output=True, text=True, timeout=240, cwd=run.parent)


def _exported_policy_acts_as_trained(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    policy, _ = policy_from_checkpoint(summary["checkpoint"])
    robot = load_policy(run / "export", robot_model="pendulum", obs_dim=4, act_dim=1)
    obs = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(robot.act(obs), policy(torch.from_numpy(obs)).numpy(), atol=1e-5)


def test_train_in_one_process_then_continue_the_run(tmp_path):
    run = tmp_path / "run"
    first = _train(run, "policy.trainer.total_env_steps=200", "train.conditions=[nominal,weak_motor]")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_steps"] == 200 and summary["workers"] == 1 and set(summary["returns"]) == {"nominal", "weak_motor"}
    assert json.loads((run / "export" / "manifest.json").read_text())["evaluation"]["robot"] == "pendulum"
    _exported_policy_acts_as_trained(run)
    wandb = offline_run(run / "wandb")  # what W&B shows after `wandb sync`: curves against the learner's steps, the policy artifact
    assert wandb["metrics"]["policy/*"] == "policy/env_steps" and wandb["metrics"]["eval/*"] == "policy/env_steps"
    assert [(a["name"], a["type"]) for a in wandb["artifacts"]] == [("trained-policy-pendulum", "model")]  # apart from the loop's policy-<robot>
    assert wandb["exit_code"] == 0 and "stopped" not in wandb["summary"]
    code = summary["code"]  # started outside the checkout (cwd: tmp_path), where W&B's own git lookup found no commit
    assert code["git_commit"] and code["package"] and wandb["config"]["code"] == code
    assert wandb["config"]["policy"]["trainer"]["device"] == "auto" and wandb["config"]["effective_trainer"]["device"] == str(resolve_device())  # what auto was
    metadata = wandb["artifacts"][0]["metadata"]  # what made the policy, not only what it is
    assert {k: metadata[k] for k in ("seed", "robot", "algorithm", "code")} == {"seed": 0, "robot": "pendulum", "algorithm": "sac", "code": code}

    more = _train(run, "policy.trainer.total_env_steps=320", "train.conditions=[nominal,weak_motor]")  # the same run, a larger budget
    assert more.returncode == 0, more.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["env_steps"] == 320
    steps = [row["policy/env_steps"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "policy/env_steps" in row]
    assert steps == sorted(steps) and steps[-1] == 320  # continued from 200, not started again
    smaller = _train(run, "policy.trainer.total_env_steps=200", "train.conditions=[nominal,weak_motor]")  # was re-exported as trained for 200
    assert smaller.returncode == 1 and "holds a checkpoint of 320 env steps, more than policy.trainer.total_env_steps=200" in smaller.stderr, smaller.stderr

    record = (run / ".hydra" / "overrides.yaml").read_text()
    other = _train(run, "policy.trainer.total_env_steps=400", "policy.algorithm.hidden_sizes=[32,32]", "train.conditions=[nominal,weak_motor]")
    assert other.returncode == 1 and "other settings (policy.algorithm.hidden_sizes: it holds [" in other.stderr and "Traceback" not in other.stderr, other.stderr
    assert (run / ".hydra" / "overrides.yaml").read_text() == record  # a refused rerun once replaced the run's record with its own
    on_ray = _train(run, "policy.trainer.total_env_steps=400", "train.workers=2", "train.conditions=[nominal,weak_motor]")  # would start over
    assert on_ray.returncode == 1 and "holds a run with train.workers=1" in on_ray.stderr, on_ray.stderr


def test_a_rerun_logs_each_step_once(tmp_path):
    """A run continued after Ctrl-C kept the rows its stopped attempt had logged past the last checkpoint (its curve went
    back on itself in metrics.jsonl), and a rerun that only re-evaluates added a second evaluation row at the same step."""
    run = tmp_path / "run"

    def rows() -> list[dict]:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    def stopped_attempt() -> None:  # rows of an attempt to go on from the checkpoint at 128, stopped before its next checkpoint
        with open(run / "metrics.jsonl", "a") as f:
            f.writelines(json.dumps({"step": n, "policy/env_steps": n, "policy/actor_loss": 99.0}) + "\n" for n in (144, 160))

    first = _train(run, "policy.trainer.total_env_steps=128", "wandb.mode=disabled")
    assert first.returncode == 0, first.stderr[-3000:]
    logged = rows()
    shutil.rmtree(run / "checkpoint")  # as an attempt stopped before its first checkpoint leaves it: its rows, no checkpoint
    anew = _train(run, "policy.trainer.total_env_steps=128", "wandb.mode=disabled")  # starts from 0: its rows replace the attempt's
    assert anew.returncode == 0, anew.stderr[-3000:]
    assert [r["step"] for r in rows()] == [r["step"] for r in logged]  # once logged each step twice
    logged = rows()
    assert [r["step"] for r in logged if "eval/nominal/mean_return" in r] == [128] and any(r["step"] == 128 and "policy/env_steps" in r for r in logged)
    stopped_attempt()
    again = _train(run, "policy.trainer.total_env_steps=128", "wandb.mode=disabled")  # the same budget: re-evaluates and re-exports
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r for r in rows() if "eval/nominal/mean_return" not in r] == [r for r in logged if "eval/nominal/mean_return" not in r]  # the row at 128 kept
    assert [r["step"] for r in rows() if "eval/nominal/mean_return" in r] == [128]
    stopped_attempt()
    more = _train(run, "policy.trainer.total_env_steps=192", "wandb.mode=disabled")  # continues from the checkpoint at 128
    assert more.returncode == 0, more.stderr[-3000:]
    steps = [r["step"] for r in rows() if "policy/env_steps" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 192 and not any(r.get("policy/actor_loss") == 99.0 for r in rows())
    assert [r["step"] for r in rows() if "eval/nominal/mean_return" in r] == [128, 192]


def test_a_run_folder_in_use_is_refused_and_sigterm_stops_a_run_as_ctrl_c_does(tmp_path):
    """Two processes on one run folder (a resume started twice, or two runs of one second) mixed their checkpoints and
    metrics; SIGTERM (timeout, Slurm, Kubernetes) killed flywheel-train with no message and an unfinished W&B run."""
    import signal
    import time

    run = tmp_path / "run"
    first = subprocess.Popen([APP, *SMALL, "policy.trainer.total_env_steps=100000", f"run_dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not ((run / ".lock").exists() and (run / ".lock").read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.2)
        second = _train(run, "policy.trainer.total_env_steps=100000")
        assert second.returncode == 1 and f"run_dir {run} is in use by another process (pid {first.pid})" in second.stderr, second.stderr
        time.sleep(2)  # into training
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130 and f"interrupted; rerun with run_dir={run}" in err and "Traceback" not in err, err[-2000:]
    wandb = offline_run(run / "wandb")  # recorded as stopped (W&B showed it finished: exit 0)
    assert wandb["exit_code"] == 130 and wandb["summary"]["stopped"] == "interrupted (SIGTERM)", wandb["summary"]


def test_train_on_two_ray_train_workers_then_continue(local_ray, tmp_path, monkeypatch):
    """The app's Ray path in this process (the local Ray of the other Ray tests): two DDP workers, their log
    brought back to the driver, the checkpoint in the run folder, and a rerun continuing from it."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    run, logged = tmp_path / "run", []
    trainer = TrainerConfig(robot="pendulum", algorithm="sac", num_worlds=4, total_env_steps=256, log_every=4)
    algo = SACConfig(hidden_sizes=(16, 16), batch_size=32, learning_starts=64)
    job = TrainJob(workers=2, eval_episodes=2)
    summary = train_policy(job, trainer, algo, run, lambda m, n: logged.append(n), start_ray=lambda: None)
    assert summary["workers"] == 2 and summary["env_steps"] == 256
    assert Path(summary["checkpoint"]).parent.parent == (run / "ray").resolve()
    assert logged and logged == sorted(logged)  # rank 0's log, through the driver's sink
    (run / "summary.json").write_text(json.dumps(summary))
    _exported_policy_acts_as_trained(run)

    before = len(logged)
    more = train_policy(job, dataclasses.replace(trainer, total_env_steps=384), algo, run, lambda m, n: logged.append(n), start_ray=lambda: None)
    assert more["env_steps"] == 384 and min(logged[before:]) > 256  # continued from the first run's checkpoint
    with pytest.raises(OtherSettingsError, match="hidden_sizes"):
        train_policy(job, trainer, dataclasses.replace(algo, hidden_sizes=(8, 8)), run, print, start_ray=lambda: None)


def test_a_checkpoint_continues_under_another_precision_and_from_a_build_without_the_key(tmp_path):
    """SACConfig.precision is how the learner computes, not what it learns (policies.settings.ARITHMETIC)."""
    trainer, algo = TrainerConfig(robot="pendulum", algorithm="sac"), SACConfig(hidden_sizes=(16, 16))
    state = tmp_path / "state.json"
    record = {"trainer_config": dataclasses.asdict(trainer), "algo_config": json.loads(json.dumps(dataclasses.asdict(algo)))}
    state.write_text(json.dumps(record))
    check_resumable(state, trainer, dataclasses.replace(algo, precision="bfloat16"))
    del record["algo_config"]["precision"]
    state.write_text(json.dumps(record))
    check_resumable(state, trainer, algo)
    with pytest.raises(OtherSettingsError, match=r"policy.algorithm.hidden_sizes: it holds \[16, 16\]\)"):
        check_resumable(state, trainer, dataclasses.replace(algo, hidden_sizes=(8, 8)))
    four = dataclasses.replace(trainer, num_worlds=4)
    state.write_text(json.dumps({**record, "trainer_config": dataclasses.asdict(four), "env_steps": 204, "world_size": 1}))  # a budget of 202 ran to 204
    check_resumable(state, dataclasses.replace(four, total_env_steps=202), algo)  # its own settings: a rerun is fine
    with pytest.raises(OtherSettingsError, match="holds a checkpoint of 204 env steps, more than policy.trainer.total_env_steps=200"):
        check_resumable(state, dataclasses.replace(four, total_env_steps=200), algo)


def test_what_cannot_run_stops_with_the_reason_and_no_traceback(tmp_path):
    (tmp_path / "new").mkdir()
    result = subprocess.run([APP, "train.workers=2", "policy=mbpo", f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1 and "flywheel-train: the model-based learner trains in one process" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for args, reason in (  # once: a traceback at the first network or buffer, or a run nested in runs/x/runs/x
        (["policy.algorithm.activation=foo"], "activation 'foo' is not one of"),
        (["policy.trainer.torch_threads=0"], "torch_threads=0 (must be >= 1)"),
        (["train.workers=2", "ray.address=ray://nohost.invalid:10001"], "Ray Client is not supported"),
        (["wandb.mode=foo"], "wandb.mode must be offline, online or disabled"),
        (["hydra.job.chdir=true"], "hydra.job.chdir=true is not supported"),
    ):
        result = subprocess.run([APP, *args, "run_dir=runs/x"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 1 and reason in result.stderr and "Traceback" not in result.stderr, (args, result.stderr[-2000:])
    for args in (  # once each left an empty runs/<time>/ (with .hydra/; with a chdir's log; a sweep's multirun.yaml and 0/.hydra/)
        ["policy.trainer.torch_threads=0"], ["hydra.job.chdir=true"], ["--multirun", "policy.trainer.seed=0,1", f"run_dir={tmp_path / 'fixed'}"],
    ):
        refused = subprocess.run([APP, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path / "new")
        left = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "new" / "runs").rglob("*"))
        assert refused.returncode == 1 and not left, (args, left, refused.stderr[-500:])
    with pytest.raises(TrainSettingsError, match="train.conditions: unknown robot conditions"):
        TrainJob(conditions=("wet",))
    trainer, algo = TrainerConfig(robot="pendulum", algorithm="sac"), SACConfig()
    for job, asked, reason in (
        (TrainJob(), dict(keep_best=True, eval_every=10), "keep_best"),  # the loop's, not this app's
        (TrainJob(), dict(device="cuda:7"), "policy.trainer.device"),  # no such GPU here
    ):
        with pytest.raises(TrainSettingsError, match=reason):
            preflight(job, dataclasses.replace(trainer, **asked), algo, tmp_path / "run")
    for job, asked, reason in (  # once: 0 updates, the initial network exported, evaluated and logged as trained
        (TrainJob(), dict(total_env_steps=500), r"policy.trainer.total_env_steps=500 ends before .* \(policy.algorithm.learning_starts=1000, .*to 1008 or more"),
        (TrainJob(workers=2), dict(total_env_steps=1500), r"needs 1001 env steps per rank \(2 ranks\) .* to 2016 or more"),
    ):
        with pytest.raises(TrainSettingsError, match=reason):
            preflight(job, dataclasses.replace(trainer, **asked), algo, tmp_path / "run")
    mixed = dataclasses.replace(algo, replay_ratios={"online": 0.4, "real": 0.3, "sim": 0.3})  # policy=sac_fleet's: the loop's data
    with pytest.raises(TrainSettingsError, match="samples real, sim episodes, which only the flywheel loop gives"):
        preflight(TrainJob(), trainer, mixed, tmp_path / "run")


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (["policy=sac_fleet"], "policy.algorithm.replay_ratios samples real, sim, worldmodel episodes"),  # once a traceback from inside training
        (["policy.trainer.keep_best=true"], "set policy.trainer.keep_best=false policy.trainer.stop_at_max_return=false"),  # once: "set eval_every > 0 too"
        (["policy=mbpo_fleet"], "set policy.trainer.keep_best=false policy.trainer.stop_at_max_return=false"),  # once two refusals, one after the other
    ],
)
def test_the_loops_learner_settings_are_refused_in_one_line_that_names_every_key_to_change(tmp_path, overrides, reason):
    result = subprocess.run([APP, *overrides, f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1 and reason in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_learner_config_of_another_kind_is_refused_before_training(tmp_path):
    """A learner config of another algorithm (once `policy=base_sac`, a schema --help listed beside the learners) failed inside training with a TypeError."""
    with pytest.raises(TrainSettingsError, match="needs a PPOConfig as policy.algorithm, got a SACConfig"):
        preflight(TrainJob(), TrainerConfig(robot="pendulum", algorithm="ppo"), SACConfig(), tmp_path / "run")


def test_w_and_b_online_without_a_key_says_what_to_do(tmp_path):
    """wandb.init's own error was a traceback; in a fresh process (W&B keeps per-process state)."""
    code = "from fleet.tracking import Tracker, TrackerError\ntry:\n    Tracker(__import__('pathlib').Path('run'), mode='online')\nexcept TrackerError as exc:\n    print(exc)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert "wandb.mode=online: W&B refused to start" in out.stdout and "wandb.mode=offline" in out.stdout, out.stdout + out.stderr
