"""What one flywheel run stands on: local Ray (or a cluster), the fleet server on loopback with
the policy registry, tokens and keys, the episode store, the tracker. All state lives in the
run folder, so a rerun with the same folder resumes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import ray
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fleet.registry.store import open_registry, root_metadata
from fleet.server.auth import add_token
from fleet.server.config import ServerConfig
from fleet.server.runner import serve
from fleet.store import EpisodeStore, StoreConfig
from fleet.tracking import Tracker
from sim.episode import Episode
from sim.robots.registry import MODULES_ENV


def start_ray(cfg: DictConfig) -> bool:
    """Start (or join) Ray once per process; True if this call started it."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": cfg.include_dashboard, "log_to_driver": False}
    if cfg.address:  # a cluster's workers were not started from here: tell them which robot modules to import
        modules = os.environ.get(MODULES_ENV)
        ray.init(address=cfg.address, **kwargs, **({"runtime_env": {"env_vars": {MODULES_ENV: modules}}} if modules else {}))
    else:
        ray.init(num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory, **kwargs)
    return True


def dataset_artifact(robot_model: str) -> str:
    return f"dataset-{robot_model}"


def snapshot_alias(snapshot_id: str) -> str:
    return f"snapshot-{snapshot_id[:12]}"


def _ray_task(fn, job):
    return fn(job)


class Services(contextlib.AbstractContextManager):
    def __init__(self, cfg: DictConfig, run_dir: Path, robot_ids: list[str]):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_DIR", str(self.run_dir))
        self._stack = contextlib.ExitStack()
        self._started_ray = start_ray(cfg.ray)
        keys = self.run_dir / "keys"  # one machine: the root keys' ceremony happens here too (docs/security.md)
        self.registry = open_registry(
            self.run_dir / "registry", keys / "online.pem", root_keys=[keys / f"root-{i}.pem" for i in (1, 2, 3)], root_threshold=2
        )
        self.root_metadata = root_metadata(self.run_dir / "registry")  # what each robot is provisioned with
        token_file = self.run_dir / "tokens.json"
        token_file.unlink(missing_ok=True)  # fresh tokens each start: nothing secret outlives the process
        self.tokens = {r: add_token(token_file, "robot", r) for r in robot_ids}
        self.store_cfg = run_store(instantiate(cfg.fleet.store), self.run_dir)
        EpisodeStore.open_or_create(self.store_cfg)
        server_cfg = ServerConfig(host="127.0.0.1", port=0, token_file=str(token_file))
        self.server = serve(server_cfg, self.store_cfg, policy_registry=self.registry)
        self.url = self.server.url
        self.store = EpisodeStore.open(self.store_cfg)
        self.tracker = Tracker(
            self.run_dir, mode=cfg.wandb.mode, project=cfg.wandb.project, entity=cfg.wandb.entity,
            config=OmegaConf.to_container(cfg, resolve=True), name=self.run_dir.name,
        )
        self.tracker.config_update({"effective_store": dataclasses.asdict(self.store_cfg)})  # the run folder's store, not the YAML's path

    # -- data ---------------------------------------------------------------------------------
    def read_data(self, robot_model: str) -> tuple[str, list[Episode], list[Episode]]:
        """Pin the store's latest snapshot; its real and sim episodes of ``robot_model``."""
        self.store.refresh_index()
        snapshot = self.store.snapshot()
        real = snapshot.read_episodes(snapshot.episodes(robot_model=robot_model, source="real"))
        sim = snapshot.read_episodes(snapshot.episodes(robot_model=robot_model, source="sim"))
        return snapshot.snapshot_id, real, sim

    def store_synthetic(self, episodes: list[Episode]) -> int:
        """Write scenario and world-model episodes into the store (idempotent by episode id)."""
        if not episodes:
            return 0
        return self.store.append(episodes, message="synthetic episodes").created

    def ray_map(self, fn, jobs):
        remote = ray.remote(num_cpus=1)(_ray_task)
        return ray.get([remote.remote(fn, job) for job in jobs])

    # -- models ---------------------------------------------------------------------------------
    def load_world_model(self):
        from worldmodel.io import META_FILE, load

        path = self.run_dir / "worldmodel"
        return load(path, device=self.cfg.worldmodel.train.device) if (path / META_FILE).exists() else None

    def save_world_model(self, model) -> None:
        from worldmodel.io import save

        save(model, self.run_dir / "worldmodel")

    def export(self, policy, directory: Path, robot_model: str, snapshot_id: str) -> tuple[bytes, dict]:
        """Export a policy (safetensors + manifest); returns (weights bytes, the exporter's manifest)."""
        from policies.export import export_policy
        from policies.runtime import WEIGHTS_FILE

        manifest = export_policy(policy, directory, robot_model=robot_model, policy_version=directory.parent.name, algorithm="sac", data_snapshot=snapshot_id)
        return (directory / WEIGHTS_FILE).read_bytes(), manifest

    def mirror_policy(self, version: int, export_dir: Path, robot_model: str, snapshot_id: str) -> None:
        """W&B mirrors each released policy as a version of one Artifact per robot model (aliases
        ``release-<version>`` and ``stable``), made from the dataset snapshot it trained on; our registry serves it."""
        files = sorted(p for p in export_dir.iterdir() if p.is_file())
        dataset = f"{dataset_artifact(robot_model)}:{snapshot_alias(snapshot_id)}"
        self.tracker.artifact(
            f"policy-{robot_model}", "model", files, {"version": version, "data_snapshot": snapshot_id, "dataset_artifact": dataset},
            aliases=(f"release-{version}", "stable"), uses=(dataset,),
        )

    def mirror_dataset(self, snapshot_id: str, counts: dict[str, int], iteration: int, robot_model: str) -> None:
        """W&B mirrors the pinned dataset snapshot as a version of one Artifact per robot model
        (its id and counts; the data stays in the store), aliased by snapshot and iteration."""
        path = self.run_dir / "snapshots" / f"iter{iteration:03d}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"snapshot_id": snapshot_id, "store": str(self.store_cfg.path), "episodes": counts}, indent=1))
        aliases = (snapshot_alias(snapshot_id), f"iter-{iteration}")
        self.tracker.artifact(dataset_artifact(robot_model), "dataset", [path], {"snapshot_id": snapshot_id, **counts}, aliases=aliases)

    # -- lifetime -------------------------------------------------------------------------------
    def __exit__(self, *exc):
        try:
            self.tracker.finish()
            self.server.stop()
        finally:
            if self._started_ray:
                ray.shutdown()
        return False


def run_store(configured: StoreConfig, run_dir: Path) -> StoreConfig:
    """The run's own episode store: ``<run_dir>/store`` on disk, or, when ``fleet.store.path`` names
    object storage (``s3://bucket/prefix``), ``s3://bucket/prefix/<run folder name>`` (a resumed run
    finds its store again)."""
    path = str(configured.path)
    if path.startswith("s3://"):
        return dataclasses.replace(configured, path=f"{path.rstrip('/')}/{run_dir.name}")
    return dataclasses.replace(configured, path=str(run_dir / "store"))
