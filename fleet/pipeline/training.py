"""Where the world model and the policy learner train each iteration (``ray.training``; docs/scale.md).

``placement: driver`` (the default): in this process, as ``fleet.pipeline.steps`` does it.
``placement: cluster``: each in a Ray task on any node with ``num_cpus``, ``num_gpus`` and the custom
``resources`` asked for (a GPU node's: ``device: auto`` then trains on the GPU Ray gives the task, and
on the CPU in a task that asked for none, although Ray 2.60 leaves the node's GPUs visible to it),
spread over the nodes and retried up to ``ray.max_retries`` times when its worker or node dies. A task
gets plain values only: episodes as their canonical bytes, configs and profiles as frozen dataclasses,
the previous model's or learner's files as bytes; it returns the new files the same way, with the
candidate policy as safetensors bytes. No node needs the driver's disk: the driver
writes the files into the run folder (each durably, the JSON that names the tensors' hash last), loads
the model from there; the learner's log reaches the tracker while the task trains
(:class:`fleet.pipeline.remote_log.LogStream`).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import ray
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fleet.pipeline import steps
from fleet.pipeline.ray_start import check_feasible
from fleet.pipeline.remote_log import LogStream
from sim.durable import write_durably
from sim.episode import Episode
from worldmodel.device import AUTO

PLACEMENTS = ("driver", "cluster")
TASKS = {  # a training task's function -> what it is called, and what sets its CPUs where ray.training.num_cpus is null
    "_world_model_task": ("the world model's training task", "worldmodel.train.num_threads"),
    "_policy_task": ("the policy learner's training task", "policy.trainer.torch_threads"),
}


def world_model_cpus(train_cfg) -> float:
    """The CPUs the world model's training task asks for where ``ray.training.num_cpus`` is null."""
    return train_cfg.num_threads or 1


def policy_cpus(trainer_cfg) -> float:
    """The CPUs the policy learner's training task asks for where ``ray.training.num_cpus`` is null."""
    return trainer_cfg.torch_threads


@dataclasses.dataclass(frozen=True)
class TrainingPlacement:
    """``ray.training``: where training runs and what a training task asks Ray for."""

    placement: str = "driver"
    num_cpus: float | None = None  # null: the learner's torch_threads, the world model's num_threads (or 1)
    num_gpus: float = 0.0
    resources: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"ray.training.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.num_gpus < 0 or (self.num_cpus is not None and self.num_cpus < 0):
            raise ValueError(f"ray.training.num_cpus and num_gpus must be >= 0, got {self.num_cpus} and {self.num_gpus}")


class Training:
    """Runs :func:`steps.update_world_model` and :func:`steps.train_policy` where ``placement`` says;
    ``nodes`` records the Ray node of each training task (``{"world_model": id, "policy": id}``)."""

    def __init__(self, placement: TrainingPlacement, max_retries: int, address: str | None = None):
        """``address``: ``ray.address`` (null: the run's own local Ray, where a task no node holds is refused)."""
        self.placement, self.max_retries, self.address = placement, max_retries, address
        self.nodes: dict[str, str] = {}

    @property
    def on_cluster(self) -> bool:
        return self.placement.placement == "cluster"

    def task_options(self, cpus: float) -> dict:
        """Ray options of a training task (``cpus``: when ``num_cpus`` is null): spread, retried."""
        p = self.placement
        return {
            "num_cpus": p.num_cpus if p.num_cpus is not None else cpus, "num_gpus": p.num_gpus, "resources": dict(p.resources) or None,
            "max_retries": self.max_retries, "scheduling_strategy": "SPREAD",
        }  # fmt: skip

    def check_cluster(self, world_model_cpus: float, policy_cpus: float) -> None:
        """Refuse (:class:`~fleet.pipeline.ray_start.ClusterResourcesError`) training tasks that no node of the run's own
        local Ray can hold, or warn of them on a cluster, where a node that holds them may join (``*_cpus``: each task's
        CPUs where ``num_cpus`` is null; :func:`~fleet.pipeline.ray_start.check_feasible`). The loop calls it as the run
        starts, so a local run asking for a GPU this machine lacks stops at once, not after its robots' first round."""
        if self.on_cluster:
            self._check(world_model_cpus, *TASKS["_world_model_task"])
            self._check(policy_cpus, *TASKS["_policy_task"])

    def _check(self, cpus: float, what: str, cpu_setting: str) -> None:
        p, options = self.placement, self.task_options(cpus)
        asked = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **(options["resources"] or {})}
        settings = {
            "CPU": f"ray.training.num_cpus={p.num_cpus:g}" if p.num_cpus is not None else f"{cpu_setting}={cpus:g} (ray.training.num_cpus is null)",
            "GPU": f"ray.training.num_gpus={p.num_gpus:g}", **{name: f"ray.training.resources.{name}={amount:g}" for name, amount in p.resources.items()},
        }  # fmt: skip
        check_feasible(asked, what, settings, "ask for less, or train in this process with ray.training.placement=driver", self.address)

    def _remote(self, fn, cpus: float):
        # not checked again before each task (check_cluster was, at the start): a node lost since may be replaced, and Ray
        # holds the task until one that has what it asks for joins, as it retries a task whose node dies while it runs;
        # options given to ray.remote, not .options(): then a task with GPUs gets a fresh worker each time
        # (max_calls=1: no CUDA context or cached GPU memory left in a reused worker; ray#29624)
        return ray.remote(**self.task_options(cpus))(fn)

    def world_model(self, real, sim, previous_dir: Path | None, model_dir: Path, ensemble_cfg, train_cfg, device: str):
        """Continue the model saved in ``previous_dir`` (None or empty: start one) on ``real`` + ``sim``; the new
        model is saved in ``model_dir`` (another folder: an iteration redone after a crash starts from the same
        model as its first attempt did). Returns (model, report, version), the model loaded on ``device`` here."""
        from worldmodel.io import META_FILE, load, save

        exists = previous_dir is not None and (previous_dir / META_FILE).exists()
        if not self.on_cluster:
            previous = load(previous_dir, device=device) if exists else None
            model, report, version = steps.update_world_model(real, sim, previous, ensemble_cfg, train_cfg, None)
            save(model, model_dir)
            return model, report, version
        job = {
            "episodes": [ep.to_bytes() for ep in [*real, *sim]], "n_real": len(real), "previous": read_folder(previous_dir) if exists else None,
            "ensemble": ensemble_cfg, "train": train_cfg,
        }  # fmt: skip
        out = ray.get(self._remote(_world_model_task, world_model_cpus(train_cfg)).remote(job))
        self.nodes["world_model"] = out["node"]
        write_folder(out["files"], model_dir)
        model = load(model_dir, device=AUTO)  # ``device`` said where the task trains; this driver may have no GPU
        return model, out["report"], out["version"]

    def policy(self, trainer_cfg, algo_cfg, data, profiles, warm_start: Path | None, out_dir: Path, log, worlds=None, sensor_filters=None):
        """:func:`steps.train_policy`, here or in a task; the checkpoint is written to ``out_dir`` either way."""
        if not self.on_cluster:
            return steps.train_policy(trainer_cfg, algo_cfg, data, profiles, warm_start, out_dir, log, worlds=worlds, sensor_filters=sensor_filters)
        job = {
            "trainer": trainer_cfg, "algo": algo_cfg, "data": {k: [ep.to_bytes() for ep in v] for k, v in data.items()}, "profiles": profiles,
            "warm": read_folder(warm_start) if warm_start is not None else None, "worlds": worlds, "sensor_filters": sensor_filters,
        }  # fmt: skip
        with LogStream(log) as remote_log:
            out = ray.get(self._remote(_policy_task, policy_cpus(trainer_cfg)).remote(job | {"log": remote_log}))
        self.nodes["policy"] = out["node"]
        checkpoint = write_folder(out["checkpoint"], out_dir)
        return steps.TrainedPolicy(policy_from_bytes(out["policy"]), checkpoint, out["env_steps"], out["metrics"])


def _world_model_task(job: dict) -> dict:
    from worldmodel.io import load, save

    episodes = [Episode.from_bytes(b) for b in job["episodes"]]
    real, sim = episodes[: job["n_real"]], episodes[job["n_real"] :]
    train = on_the_tasks_device(job["train"])
    with tempfile.TemporaryDirectory() as tmp:
        previous = load(write_folder(job["previous"], Path(tmp) / "previous"), device=train.device) if job["previous"] else None
        model, report, version = steps.update_world_model(real, sim, previous, job["ensemble"], train, None)
        save(model, Path(tmp) / "model")
        return {"node": ray.get_runtime_context().get_node_id(), "files": read_folder(Path(tmp) / "model"), "report": report, "version": version}


def _policy_task(job: dict) -> dict:
    data = {k: [Episode.from_bytes(b) for b in v] for k, v in job["data"].items()}
    with tempfile.TemporaryDirectory() as tmp:
        warm = write_folder(job["warm"], Path(tmp) / "warm") if job["warm"] is not None else None
        trained = steps.train_policy(
            on_the_tasks_device(job["trainer"]), job["algo"], data, job["profiles"], warm, Path(tmp) / "out", job["log"],
            worlds=job["worlds"], sensor_filters=job["sensor_filters"],
        )  # fmt: skip
        return {
            "node": ray.get_runtime_context().get_node_id(), "checkpoint": read_folder(trained.checkpoint), "policy": policy_to_bytes(trained.policy),
            "env_steps": trained.env_steps, "metrics": trained.metrics,
        }  # fmt: skip


def on_the_tasks_device(config):
    """``config`` (a TrainConfig or TrainerConfig) with ``device: auto`` meaning the GPUs Ray gave this task:
    the CPU where it asked for none. Ray 2.60 no longer hides a node's GPUs from such a task (it leaves
    ``CUDA_VISIBLE_DEVICES`` alone), so ``auto`` would take a GPU that no task reserved. The model-based
    learner's world model follows its learner (``model_train.device: auto``)."""
    if config.device == AUTO and not ray.get_gpu_ids():
        return dataclasses.replace(config, device="cpu")
    return config


def policy_to_bytes(policy) -> dict:
    """A torch ``Policy`` as plain values: its spec (JSON) and its state dict (safetensors bytes)."""
    spec = dataclasses.asdict(policy.spec) | {"state_dependent_std": bool(policy.actor.state_dependent_std)}
    return {"spec": json.dumps(spec), "tensors": save_tensors({k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()})}


def policy_from_bytes(packed: dict):
    """Inverse of :func:`policy_to_bytes` (on CPU)."""
    from policies.export import build_policy

    spec = json.loads(packed["spec"])
    state_dependent_std = spec.pop("state_dependent_std")
    return build_policy(spec, load_tensors(packed["tensors"]), state_dependent_std=state_dependent_std)


def read_folder(folder: Path) -> dict[str, bytes]:
    """The files directly in ``folder`` (a checkpoint's or a model's), name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file() and not p.name.startswith(".")}


def write_folder(files: dict[str, bytes], folder: Path) -> Path:
    """Write ``files`` into ``folder`` (created), each durably, the JSON files last: a checkpoint's or a
    model's JSON names its tensors' hash, so a crash between two files leaves a mismatch its loader refuses."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda n: (n.endswith(".json"), n)):
        write_durably(folder / name, files[name])
    return folder
