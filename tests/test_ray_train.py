"""The learner under Ray Train: TorchTrainer, 2 CPU workers, DDP (gloo); its checkpoint loads as a policy."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from policies.checkpoint import load_checkpoint  # noqa: E402
from policies.distributed import fit  # noqa: E402
from policies.export import export_checkpoint, policy_from_checkpoint  # noqa: E402
from policies.ppo import PPOConfig  # noqa: E402
from policies.runtime import load_policy  # noqa: E402
from policies.trainer import TrainerConfig  # noqa: E402

CONFIG = TrainerConfig(robot="pendulum", algorithm="ppo", num_worlds=4, total_env_steps=2 * 4 * 16 * 4, seed=0, checkpoint_every=2)
PPO = PPOConfig(hidden_sizes=(16, 16), n_steps=16, epochs=2, minibatch_size=32)


def test_two_ddp_workers_train_and_the_checkpoint_loads(local_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # Ray Train's controller polls its workers every 2 s by default
    result = fit(CONFIG, PPO, num_workers=2, storage_path=tmp_path / "ray", name="run")
    assert result.error is None
    assert result.metrics["train/updates"] == 4 and result.metrics["train/env_steps"] == CONFIG.total_env_steps

    path = result.checkpoint.path
    assert sorted(os.listdir(path)) == ["rank0", "rank1"]
    rank0, meta0 = policy_from_checkpoint(path)  # a distributed checkpoint reads rank 0's
    rank1, meta1 = policy_from_checkpoint(os.path.join(path, "rank1"))
    assert meta0["rank"] == 0 and meta1["rank"] == 1 and meta0["world_size"] == 2
    for (name, a), (_, b) in zip(rank0.state_dict().items(), rank1.state_dict().items()):
        assert torch.equal(a, b), f"DDP replicas differ in {name}"
    tensors, _ = load_checkpoint(path)
    assert tensors["policy.normalizer.count"].item() == CONFIG.total_env_steps  # statistics all-reduced over both ranks
    assert not torch.equal(tensors["stepper.obs"], load_checkpoint(os.path.join(path, "rank1"))[0]["stepper.obs"])  # own worlds

    manifest = export_checkpoint(path, tmp_path / "export", policy_version="ray-1")
    assert manifest["training"]["env_steps"] == CONFIG.total_env_steps
    runtime = load_policy(tmp_path / "export", robot_model="pendulum", obs_dim=4, act_dim=1)
    obs = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(runtime.act(obs), rank0(torch.from_numpy(obs)).numpy(), atol=1e-5)


def test_fit_refuses_to_start_ray_itself(tmp_path):  # after the test above: local_ray is shut down by then
    if ray.is_initialized():
        pytest.skip("Ray is running in this process")
    with pytest.raises(RuntimeError, match="ray.init"):
        fit(CONFIG, PPO, storage_path=tmp_path)
