"""Where the learner and the world model run (``device: auto``), and where Ray Train's workers do.

These run everywhere; tests/test_gpu.py trains a few steps on CUDA where there is a GPU."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from fleet.pipeline.services import warn_if_gpus_are_elsewhere
from policies.distributed import worker_device
from policies.mbpo import MBPOConfig
from policies.ppo import PPOConfig
from policies.trainer import TrainerConfig, make_algorithm, model_beside_learner
from tests.test_policy_resume import CASES
from worldmodel.device import resolve_device
from worldmodel.train import TrainConfig

HERE = "cuda" if torch.cuda.is_available() else "cpu"


def test_auto_is_cuda_when_torch_sees_one_else_cpu():
    assert resolve_device("auto").type == HERE
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_says_what_to_do():
    config = TrainerConfig(device="cuda")  # a name is checked when made; whether it is there, when a learner is built
    with pytest.raises(ValueError, match="device 'cuda' asked for, but .*use device=auto .* or device=cpu"):
        make_algorithm(config, PPOConfig())


@pytest.mark.parametrize("name", ["gpu", "cuda:x", ""])
def test_a_name_torch_cannot_parse_is_refused_when_the_config_is_made(name):
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>'"):
        TrainerConfig(device=name)


@pytest.mark.parametrize("name", ["mps", "xpu", "meta"])
def test_a_device_type_other_than_cpu_or_cuda_is_refused_when_the_config_is_made(name):
    """``mps`` parsed, passed the config check and failed inside torch when the learner was built
    ("PyTorch is not linked with support for mps devices"); the learners run on cpu or CUDA only."""
    for make in (lambda: TrainerConfig(device=name), lambda: TrainConfig(device=name)):
        with pytest.raises(ValueError, match=rf"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got '{name}': .*cpu or CUDA only"):
            make()


def test_the_model_based_learners_world_model_sits_beside_the_learner():
    assert MBPOConfig().model_train.device == "auto"
    assert model_beside_learner(MBPOConfig(), torch.device("cuda")).model_train.device == "cuda"
    pinned = MBPOConfig(model_train=dataclasses.replace(MBPOConfig().model_train, device="cpu"))
    assert model_beside_learner(pinned, torch.device("cuda")).model_train.device == "cpu"  # a named device stays
    _, small, _ = CASES["mbpo"]
    small = dataclasses.replace(small, model_train=dataclasses.replace(small.model_train, device="auto"))
    learner = make_algorithm(TrainerConfig(algorithm="mbpo", device="auto"), small)
    assert learner.config.model_train.device == HERE and next(learner.policy.parameters()).device.type == HERE


@pytest.mark.parametrize(
    "device, workers, gpus, want",
    [("auto", 2, 0, "cpu"), ("auto", 2, 1, "cpu"), ("auto", 2, 2, "cuda"), ("cpu", 2, 8, "cpu"), ("cuda", 1, 1, "cuda")],
)
def test_ray_train_workers_get_gpus_by_what_the_cluster_reports(device, workers, gpus, want):
    assert worker_device(device, workers, gpus) == want


def test_ray_train_refuses_cuda_the_cluster_lacks_and_a_device_index():
    with pytest.raises(ValueError, match="asks Ray Train for 2 GPUs .* the Ray cluster has 1; use device=auto"):
        worker_device("cuda", 2, 1)
    with pytest.raises(ValueError, match="Ray gives each its own GPU"):
        worker_device("cuda:1", 1, 2)


def test_the_flywheel_says_when_the_clusters_gpus_are_not_where_it_trains(caplog):
    with caplog.at_level(logging.WARNING, logger="fleet.pipeline.services"):
        assert warn_if_gpus_are_elsewhere(2, "auto", "auto") is (HERE == "cpu")
        assert not warn_if_gpus_are_elsewhere(0, "auto", "auto") and not warn_if_gpus_are_elsewhere(2, "cpu", "cpu")
    assert HERE == "cuda" or "start flywheel on a GPU node" in caplog.text
