"""The learner under Ray Train: TorchTrainer, ScalingConfig(num_workers, use_gpu), DDP.

``TrainerConfig.device`` says where the workers learn, read against the Ray cluster rather than
this process (:func:`worker_device`): ``"auto"`` puts each worker on a GPU of its own when the
cluster has one for every worker (``use_gpu``, nccl), else on CPU (gloo); ``"cuda"`` insists.

Each Ray Train worker is a Ray actor that owns a batched MuJoCo stepper (its rollout
worker: ``num_worlds`` worlds, its own seeds) and one replica of the algorithm; gradients
are averaged across workers by DistributedDataParallel (gloo on CPU) and the observation
statistics by an all-reduce, so every replica holds the same policy. Every
``checkpoint_every`` updates each worker writes its :mod:`policies.checkpoint` directory
(``rank<r>/state.safetensors`` + ``state.json``; safetensors + JSON, never pickle) into the
Ray Train checkpoint; after a crash (``max_failures`` > 0) or with ``resume_from``, workers
continue from the latest one.

This module never starts Ray: the caller (the fleet, a test) calls ``ray.init`` first.
:func:`policies.export.policy_from_checkpoint` loads ``result.checkpoint.path``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence

import torch

from policies.trainer import LogFn, TrainerConfig
from worldmodel.device import AUTO, check_device_name

OfflineFn = Callable[[], Mapping[str, Sequence]]  # runs in each worker: source name -> list[Episode]


def train_loop_per_worker(config: dict) -> None:
    """What every Ray Train worker runs (``config`` is the ``train_loop_config`` built by :func:`fit`)."""
    import ray.train
    import ray.train.torch

    from policies.parallel import TorchDistComm
    from policies.trainer import Trainer, make_algorithm
    from sim.variation import VariationProfile

    comm = TorchDistComm()
    trainer_config = TrainerConfig(**config["trainer"])
    algo_config = _algo_config(trainer_config.algorithm, config["algorithm"])
    offline = config["offline_fn"]() if config.get("offline_fn") else None
    profiles = [VariationProfile.from_dict(p) for p in config["profiles"]] if config.get("profiles") else None
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")  # the GPU Ray gave this worker
    algorithm = make_algorithm(trainer_config, algo_config, comm=comm, offline=offline, device=device)
    reported_at = [-1]  # env steps of the last reported checkpoint (the same on every rank)

    def report(trainer: Trainer, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            trainer.save(tmp)  # writes tmp/rank<r>/...
            ray.train.report(_scalars(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp))
        reported_at[0] = trainer.env_steps

    with Trainer(trainer_config, algorithm, profiles=profiles, log=config.get("log"), comm=comm, algo_config=algo_config, checkpointer=report) as trainer:
        checkpoint = ray.train.get_checkpoint()  # set when Ray restarts the workers after a failure
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                trainer.resume(directory)
        elif config.get("resume_from"):
            trainer.resume(config["resume_from"])
        result = trainer.train(max_updates=config.get("stop_after_updates"))
        if reported_at[0] != trainer.env_steps:
            report(trainer, result.metrics)  # the final state is always the result's checkpoint


def fit(
    trainer_config: TrainerConfig,
    algo_config,
    *,
    num_workers: int = 2,
    storage_path: str | os.PathLike,
    name: str = "policy",
    max_failures: int = 0,
    profiles: Sequence | None = None,
    offline_fn: OfflineFn | None = None,
    log: LogFn | None = None,
    resume_from: str | os.PathLike | None = None,
    stop_after_updates: int | None = None,
):
    """Train with ``num_workers`` DDP replicas under Ray Train; returns the ``ray.train.Result``.

    ``trainer_config.total_env_steps`` counts all workers together; ``num_worlds`` is per
    worker; its ``device`` says whether each worker gets a GPU (:func:`worker_device`).
    ``offline_fn`` (SAC) loads each worker's offline episodes (e.g. from the pinned store
    snapshot) inside the worker. ``resume_from``: a checkpoint directory of an earlier run.
    ``stop_after_updates``: stop early (tests; simulates a crash).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call ray.init(...) first (policies never start Ray; the fleet connects it)")
    device = worker_device(trainer_config.device, num_workers, ray.cluster_resources().get("GPU", 0))
    use_gpu = device == "cuda"
    config = {
        "use_gpu": use_gpu,
        "trainer": dataclasses.asdict(dataclasses.replace(trainer_config, device=device)),  # resolved once, here
        "algorithm": dataclasses.asdict(algo_config),
        "profiles": [p.to_dict() for p in profiles] if profiles else None,
        "offline_fn": offline_fn,
        "log": log,
        "stop_after_updates": stop_after_updates,
        "resume_from": str(resume_from) if resume_from is not None else None,  # a path every worker can read
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def worker_device(device: str, num_workers: int, cluster_gpus: float) -> str:
    """Where Ray Train's workers learn for ``TrainerConfig.device``, given the GPUs the Ray cluster
    reports (``ray.cluster_resources()["GPU"]``): ``"cuda"`` (one GPU per worker) or ``"cpu"``.
    ``"auto"``: cuda when the cluster has a GPU for every worker, else cpu; ``"cuda"``: an error
    when it has not (Ray would wait for GPUs that never come)."""
    check_device_name(device)
    if device == AUTO:
        return "cuda" if cluster_gpus >= num_workers else "cpu"
    kind = torch.device(device)
    if kind.type == "cpu":
        return "cpu"
    if kind.type != "cuda" or kind.index is not None:
        raise ValueError(f"device {device!r}: Ray Train's workers learn on 'cuda' (Ray gives each its own GPU), 'cpu' or 'auto'")
    if cluster_gpus < num_workers:
        raise ValueError(
            f"device 'cuda' asks Ray Train for {num_workers} GPUs (one per worker), but the Ray cluster has {cluster_gpus:g}; "
            "use device=auto (GPUs when the cluster has them, else CPU) or cpu, fewer workers, or a cluster with GPU nodes"
        )
    return "cuda"


def _algo_config(algorithm: str, values: dict):
    from policies.ppo import PPOConfig
    from policies.sac import SACConfig

    return (PPOConfig if algorithm == "ppo" else SACConfig)(**values)


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}
