"""Checkpoint, "crash", resume: bit-identical to an uninterrupted run on CPU with the same seed."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from policies.checkpoint import CheckpointError, load_checkpoint
from policies.export import policy_from_checkpoint
from policies.mbpo import MBPOConfig
from policies.ppo import PPOConfig
from policies.sac import SACConfig
from policies.trainer import Trainer, TrainerConfig, make_algorithm
from sim.variation import VariationProfile
from worldmodel.ensemble import EnsembleConfig
from worldmodel.train import TrainConfig

PROFILES = [VariationProfile(), VariationProfile(payload_mass=0.5, obs_noise_std=0.01, action_latency=1)]
CASES = {
    "ppo": (
        TrainerConfig(robot="pendulum", algorithm="ppo", num_worlds=4, total_env_steps=4 * 16 * 5, seed=3),
        PPOConfig(hidden_sizes=(16, 16), n_steps=16, epochs=2, minibatch_size=32),
        2,
    ),
    "sac": (
        TrainerConfig(robot="pendulum", algorithm="sac", num_worlds=4, total_env_steps=160, seed=3),
        SACConfig(hidden_sizes=(16, 16), batch_size=32, learning_starts=48, normalize_obs=True),
        12,
    ),
    "mbpo": (
        TrainerConfig(robot="pendulum", algorithm="mbpo", num_worlds=4, total_env_steps=240, seed=3),
        MBPOConfig(
            sac=SACConfig(hidden_sizes=(16, 16), batch_size=32, learning_starts=48, utd_ratio=2.0),
            ensemble=EnsembleConfig(ensemble_size=3, num_elites=2, hidden_size=16, num_hidden_layers=2),
            model_train=TrainConfig(max_steps=40, eval_every=10, device="cpu"),
            retrain_steps=10, model_train_every=64, rollout_every=16, rollouts_per_step=4, model_retain=3, max_horizon=5,
        ),  # fmt: skip
        12,
    ),
}


def _run(config, algo_config, checkpoint_dir=None, max_updates=None, resume=False):
    with Trainer(config, make_algorithm(config, algo_config), profiles=PROFILES, checkpoint_dir=checkpoint_dir, algo_config=algo_config) as trainer:
        if resume:
            trainer.resume()
        result = trainer.train(max_updates=max_updates)
        tensors, meta = trainer.state()
    return result, tensors, meta


@pytest.mark.parametrize("algorithm", sorted(CASES))
def test_resume_after_crash_is_bit_identical(tmp_path, algorithm):
    config, algo_config, crash_after = CASES[algorithm]
    straight, want, want_meta = _run(config, algo_config)
    crashed, _, _ = _run(config, algo_config, checkpoint_dir=tmp_path, max_updates=crash_after)
    assert crashed.updates == crash_after and crashed.env_steps < straight.env_steps
    resumed, got, got_meta = _run(config, algo_config, checkpoint_dir=tmp_path, resume=True)
    assert resumed.env_steps == straight.env_steps and resumed.updates == straight.updates
    assert resumed.curve == straight.curve
    assert want.keys() == got.keys()
    differing = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differing, f"tensors differ after resume: {differing}"
    assert json.dumps(want_meta, sort_keys=True) == json.dumps(got_meta, sort_keys=True)


def test_checkpoint_loads_as_a_policy_and_refuses_corruption_and_other_runs(tmp_path):
    config, algo_config, _ = CASES["ppo"]
    result, tensors, _ = _run(config, algo_config, checkpoint_dir=tmp_path / "ckpt", max_updates=1)
    policy, meta = policy_from_checkpoint(result.checkpoint)
    assert meta["algorithm"] == "ppo" and torch.equal(policy.actor.mean.weight, tensors["policy.actor.mean.weight"])

    other = TrainerConfig(**{**config.__dict__, "seed": 4})
    with Trainer(other, make_algorithm(other, algo_config), checkpoint_dir=tmp_path / "ckpt") as trainer:
        with pytest.raises(ValueError, match="another run"):
            trainer.resume()

    other_algo = dataclasses.replace(algo_config, epochs=3)  # the same trainer, another learner: refused too
    with Trainer(config, make_algorithm(config, other_algo), checkpoint_dir=tmp_path / "ckpt", algo_config=other_algo) as trainer:
        with pytest.raises(ValueError, match=r"another run: differs in algorithm\.epochs;"):
            trainer.resume()

    blob = (tmp_path / "ckpt" / "state.safetensors").read_bytes()
    (tmp_path / "ckpt" / "state.safetensors").write_bytes(blob[:-10])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("algorithm", sorted(CASES))
def test_each_learners_checkpoint_loads_as_the_policy_it_trained(tmp_path, algorithm):
    config, algo_config, crash_after = CASES[algorithm]
    learner = make_algorithm(config, algo_config)
    with Trainer(config, learner, profiles=PROFILES, checkpoint_dir=tmp_path, algo_config=algo_config) as trainer:
        trainer.train(max_updates=crash_after)
        trainer.save()
    policy, meta = policy_from_checkpoint(tmp_path)  # the model-based learner's too: its actor is SAC's
    obs = torch.randn(8, 4)
    assert meta["algorithm"] == algorithm and torch.equal(policy(obs), learner.policy.to("cpu")(obs))


@pytest.mark.parametrize("algorithm", sorted(CASES))
def test_every_logged_metric_is_documented(algorithm):
    import re
    from pathlib import Path

    config, algo_config, _ = CASES[algorithm]
    config = TrainerConfig(**{**config.__dict__, "eval_every": 2, "eval_episodes": 1, "log_every": 1, "keep_best": True})
    logged: list[tuple[dict, int]] = []
    with Trainer(config, make_algorithm(config, algo_config), profiles=PROFILES, log=lambda m, s: logged.append((m, s))) as trainer:
        trainer.train()
    keys = {re.sub(r"profile\d+", "profile<i>", k) for m, _ in logged for k in m}
    assert {"train/env_steps", "train/episode_return", "eval/mean_return", "eval/profile<i>/failures"} <= keys
    doc = (Path(__file__).resolve().parents[1] / "docs" / "policies.md").read_text()
    undocumented = sorted(k for k in keys if f"`{k}`" not in doc and f"`{k.rsplit('/', 1)[0]}/return`" not in doc)
    assert not undocumented, f"metrics missing from docs/policies.md: {undocumented}"
    steps = [s for _, s in logged]
    assert steps == sorted(steps) and steps[-1] <= config.total_env_steps


def test_a_sac_checkpoint_resumes_under_another_precision_only(tmp_path):
    """``precision`` is how SAC computes, not what it learns (policies.settings.ARITHMETIC); its width is what it learns."""
    config, algo_config, crash_after = CASES["sac"]
    _run(config, algo_config, checkpoint_dir=tmp_path, max_updates=crash_after)
    other = dataclasses.replace(algo_config, precision="float32" if algo_config.precision != "float32" else "bfloat16")
    resumed, _, _ = _run(config, other, checkpoint_dir=tmp_path, resume=True)
    assert resumed.env_steps == config.total_env_steps
    wider = dataclasses.replace(algo_config, hidden_sizes=(32, 32))
    with pytest.raises(ValueError, match=r"algorithm\.hidden_sizes"):
        _run(config, wider, checkpoint_dir=tmp_path, resume=True)
