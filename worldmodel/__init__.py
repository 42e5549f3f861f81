"""World-model floor: a probabilistic dynamics ensemble learned from fleet telemetry, its
training, batched synthetic rollouts, the physics check against MuJoCo, and scenario
proposals fanned out over any map function. Imports sim and torch only (never fleet, never
starts Ray). See docs/worldmodel.md."""

from worldmodel.ensemble import DynamicsEnsemble, EnsembleConfig, ModelSpec
from worldmodel.io import load, model_version, save
from worldmodel.rollout import RolloutConfig, branch_rollouts, model_rollout
from worldmodel.train import TrainConfig, train_ensemble

__all__ = [
    "DynamicsEnsemble",
    "EnsembleConfig",
    "ModelSpec",
    "RolloutConfig",
    "TrainConfig",
    "branch_rollouts",
    "load",
    "model_rollout",
    "model_version",
    "save",
    "train_ensemble",
]
