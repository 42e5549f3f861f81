"""The GPU paths, run where there is a CUDA device (tests/conftest.py skips them elsewhere): each
learner trains on the GPU and exports a policy a CPU robot runs; Ray Train gives its worker the GPU.

They import neither the fleet nor Hydra: a GPU machine with only torch, MuJoCo, gymnasium and Ray
runs them (docs/benchmarks.md, "GPU")."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from policies.export import export_policy
from policies.runtime import load_policy
from policies.trainer import Trainer, make_algorithm
from tests.test_policy_resume import CASES, PROFILES
from worldmodel.device import resolve_device

pytestmark = pytest.mark.requires_gpu


@pytest.mark.parametrize("algorithm", sorted(CASES))
def test_each_learner_trains_on_the_gpu_and_exports_for_a_cpu_robot(tmp_path, algorithm):
    config, algo_config, _ = CASES[algorithm]
    config = dataclasses.replace(config, device="auto")
    if algorithm == "mbpo":
        algo_config = dataclasses.replace(algo_config, model_train=dataclasses.replace(algo_config.model_train, device="auto"))
    learner = make_algorithm(config, algo_config)
    with Trainer(config, learner, profiles=PROFILES, checkpoint_dir=tmp_path / "ckpt", algo_config=algo_config) as trainer:
        result = trainer.train()
    assert result.updates > 0 and next(learner.policy.parameters()).device.type == "cuda"
    if algorithm == "mbpo":
        assert learner.model.device.type == "cuda"  # its world model beside it
    export_policy(learner.policy, tmp_path / "export", robot_model="pendulum", policy_version="gpu", algorithm=algorithm)
    runtime = load_policy(tmp_path / "export", robot_model="pendulum", obs_dim=4, act_dim=1)
    obs = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    with torch.no_grad():
        want = learner.policy.to("cpu")(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(runtime.act(obs), want, atol=1e-5)


def test_a_resumed_model_based_learner_keeps_its_world_model_on_the_gpu(tmp_path):
    config, algo_config, _ = CASES["mbpo"]
    config = dataclasses.replace(config, device="auto")
    algo_config = dataclasses.replace(algo_config, model_train=dataclasses.replace(algo_config.model_train, device="auto"))
    with Trainer(config, make_algorithm(config, algo_config), profiles=PROFILES, checkpoint_dir=tmp_path, algo_config=algo_config) as trainer:
        trainer.train()
    learner = make_algorithm(config, algo_config)
    with Trainer(config, learner, profiles=PROFILES, checkpoint_dir=tmp_path, algo_config=algo_config) as trainer:
        trainer.resume()
    assert learner.model is not None and learner.model.device.type == "cuda"  # its rollouts run beside the learner


def test_a_cuda_index_this_machine_lacks_is_refused_saying_what_to_do():
    with pytest.raises(ValueError, match=r"this machine has \d+ CUDA device\(s\): use device=auto"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_ray_train_puts_its_worker_on_the_gpu(local_ray, tmp_path):
    from policies.checkpoint import load_checkpoint
    from policies.distributed import fit
    from policies.export import policy_from_checkpoint
    from tests.test_ray_train import CONFIG, PPO

    result = fit(dataclasses.replace(CONFIG, device="auto"), PPO, num_workers=1, storage_path=tmp_path / "ray", name="gpu")
    assert result.error is None
    tensors, meta = load_checkpoint(result.checkpoint.path)
    assert meta["trainer_config"]["device"] == "cuda"
    policy, _ = policy_from_checkpoint(result.checkpoint.path)  # trained on the GPU, loads on a CPU
    assert all(t.device.type == "cpu" for t in tensors.values()) and next(policy.parameters()).device.type == "cpu"


def test_a_world_model_continued_on_the_gpu_refits_its_normalisers_and_learns_the_new_actions():
    """The loop's first data comes from the zero policy (an action normaliser of std 1e-6); a continued fit refits the
    normalisers and rescales the first and last layers in place, on the model's own device."""
    from sim.batched import BatchedStepper
    from sim.policy_fn import random_policy
    from sim.scenario import ScenarioSpec
    from worldmodel import EnsembleConfig, TrainConfig, train_ensemble
    from worldmodel.train import _refit_statistics
    from worldmodel.transitions import to_transitions

    def simulate(policy, seed):
        with BatchedStepper("pendulum", 32, nthread=1) as stepper:
            return stepper.simulate([ScenarioSpec("pendulum", seed=seed * 100 + i, max_steps=60) for i in range(24)], policy)

    still = simulate(lambda obs: np.zeros((len(obs), 1), np.float32), 0)
    moving = simulate(random_policy(1, 1), 1)
    ensemble, config = EnsembleConfig(ensemble_size=5, num_elites=3, hidden_size=128, num_hidden_layers=2), TrainConfig(max_steps=300, eval_every=100, seed=0, device="auto")
    model, _ = train_ensemble(still, ensemble=ensemble, config=config)
    assert model.device.type == "cuda" and float(model.input_norm.std[-1]) == pytest.approx(1e-6)
    obs = torch.as_tensor(still[0].observation[:-1], device="cuda")
    act = torch.as_tensor(still[0].action, device="cuda")
    with torch.no_grad():
        before = model.predict(obs, act)
        _refit_statistics(model, to_transitions(moving))
        after = model.predict(obs, act)
    torch.testing.assert_close(after.delta_mean, before.delta_mean, rtol=1e-4, atol=1e-4)  # the same function on the old data
    model, report = train_ensemble(moving, model=model, config=config)
    assert model.device.type == "cuda" and float(model.input_norm.std[-1]) > 0.3 and report.elite_val_mse < 1.0, report.val_mse
