"""What one flywheel run stands on: local Ray (or a cluster), the fleet server on this driver's Ray
address (loopback by default) with the policy registry, tokens and keys, the episode store, the
tracker. All state lives in the run folder (the store and the registry under the run's own prefix,
its run id, where ``fleet.store.path`` or ``fleet.registry.dir`` name object storage), so a rerun
with the same folder resumes."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import json
import logging
import os
import re
from pathlib import Path

import ray
from hydra.utils import instantiate
from omegaconf import DictConfig
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fleet.pipeline.loop_config import ROOT_KEYS, LoopFleet
from fleet.pipeline.ray_start import check_feasible, start_ray
from fleet.registry.files import open_files
from fleet.registry.store import open_registry, root_metadata
from fleet.run_folders import new_run_id, record_run_id, recorded_run_id
from fleet.server.auth import add_token
from fleet.server.runner import serve
from fleet.store import EpisodeStore, StoreConfig
from fleet.store.location import Location
from fleet.store.maintenance import SpentPinName
from fleet.tracking import Tracker, exit_status, recorded_config
from sim.episode import Episode
from worldmodel.device import AUTO, resolve_device

log = logging.getLogger(__name__)
MAP_TASK = {"CPU": 1}  # what each task of Services.ray_map asks Ray for
PIN_RENEWALS = 100  # names a loop's pin may take, where an operator unpinned the ones before (Services._pin)


def dataset_artifact(robot_model: str) -> str:
    return f"dataset-{robot_model}"


def snapshot_alias(snapshot_id: str) -> str:
    return f"snapshot-{snapshot_id[:12]}"


def _ray_task(fn, job):
    return ray.get_runtime_context().get_node_id(), fn(job)


class Services(contextlib.AbstractContextManager):
    def __init__(
        self, cfg: DictConfig, run_dir: Path, robot_ids: list[str], redo_from: int | None = None, fleet: LoopFleet | None = None, run_id: str | None = None,
    ):  # fmt: skip
        """``fleet``: the fleet group as the loop built it (None: built here from ``cfg``); ``run_id``: the run's id, its
        key on object storage (None: the run folder's, made and recorded here for a fresh run, see :func:`run_id_of`)."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        fleet = fleet or LoopFleet.from_cfg(cfg)
        self.run_id = run_id or run_id_of(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record_run_id(self.run_dir, self.run_id)
        os.environ.setdefault("WANDB_DIR", str(self.run_dir))
        self._stack = contextlib.ExitStack()
        self._started_ray = start_ray(cfg.ray)
        check_feasible(
            MAP_TASK, "each calibration and scenario task (ray_map)", {"CPU": f"ray.num_cpus={cfg.ray.num_cpus}"}, "give the local Ray a CPU", cfg.ray.address,
        )  # fmt: skip
        self.task_nodes = collections.Counter()  # Ray node id -> the tasks of ray_map it ran
        self._robot_group = None  # the robots' placement group (robot_options)
        self._last_read = None  # read_data's last snapshot, its catalog loaded: the next reads only the catalog rows written since
        if cfg.ray.training.placement == "driver":  # a training task on the cluster gets the GPUs it asks for (fleet/pipeline/training.py)
            warn_if_gpus_are_elsewhere(ray.cluster_resources().get("GPU", 0), cfg.policy.trainer.device, cfg.worldmodel.train.device)
        self.store_cfg = run_store(instantiate(cfg.fleet.store), self.run_dir, self.run_id)
        self.registry_dir = run_location(cfg.fleet.registry.dir, self.run_dir, "registry", self.run_id)
        keys = self.run_dir / "keys"  # one machine: the root keys' ceremony happens here too (docs/security.md)
        release = keys / "release.pem"  # the loop releases: a replica given only keys/online.pem serves and cannot (docs/security.md, "The release key")
        made_before = open_files(self.registry_dir).exists("tuf/metadata/1.root.json") and not release.exists()  # a run of a build before release keys
        self.registry = open_registry(
            self.registry_dir, keys / "online.pem", release_key=None if made_before else release, root_keys=[keys / f"root-{i}.pem" for i in range(1, ROOT_KEYS + 1)],
            root_threshold=fleet.root_threshold, expiry_s=fleet.expiry_s,
        )  # fmt: skip
        self.root_metadata = root_metadata(self.registry_dir)  # what each robot is provisioned with
        token_file = self.run_dir / "tokens.json"
        token_file.unlink(missing_ok=True)  # fresh tokens each start: nothing secret outlives the process
        self.tokens = {r: add_token(token_file, "robot", r) for r in robot_ids}
        EpisodeStore.open_or_create(self.store_cfg)
        # on this driver's Ray address: the robots, Ray actors on any node, reach it there
        server_cfg = dataclasses.replace(fleet.server, host=ray.util.get_node_ip_address(), port=0, token_file=str(token_file))  # loop_config.LOOP_SETS
        self.server = serve(server_cfg, run_writer(self.store_cfg, "ingest"), policy_registry=self.registry)
        self.url = self.server.url
        self.store = EpisodeStore.open(run_writer(self.store_cfg, "synthetic"))  # scenario and world-model episodes
        self.tracker = Tracker(
            self.run_dir, mode=cfg.wandb.mode, project=cfg.wandb.project, entity=cfg.wandb.entity,
            config=recorded_config(cfg, self.run_dir), redo_from=redo_from, job_type="loop",
        )
        # the run's own store and registry, not the YAML's paths
        self.tracker.config_update({"effective_store": dataclasses.asdict(self.store_cfg), "effective_registry": self.registry_dir})

    @classmethod
    def of_store(cls, store: EpisodeStore) -> Services:
        """Services on ``store`` alone (no Ray, no server, no tracker): its data and pins, as the loop reads and keeps
        them (tests, benchmarks/data_window.py)."""
        services = cls.__new__(cls)
        services.store, services._last_read = store, None
        return services

    # -- data ---------------------------------------------------------------------------------
    def read_data(
        self, robot_model: str, sim_snapshot: str | None = None, real_window: int | None = None, sim_window: int | None = None,
        layout: dict[str, int] | None = None,
    ) -> tuple[str, list[Episode], list[Episode], dict]:
        """Pin the store's latest snapshot; its real episodes of ``robot_model``, and its sim episodes as of
        ``sim_snapshot`` where given (the iteration's start: a redone iteration does not train on the scenarios its
        interrupted attempt stored), robot by robot (:func:`in_robot_order`), so that what trains on them does not
        depend on how uploads interleaved. Of each, only the newest ``real_window`` (``sim_window``) steps
        (:func:`newest_within`; None: all), so that an iteration's memory and time stay bounded however long the
        fleet has run. Withdrawn episodes (the tip's rules, docs/store.md) are left out of both, and counted: counts'
        ``withdrawn`` (per source) and ``withdrawals`` (rule id -> the robots it names) are there while a rule is. With
        ``layout`` (array name -> the task's width: observation, action, and qpos, qvel where an episode has them),
        episodes of another layout (a robot whose firmware changed its observation, under the same robot_model) are
        left out, not read, and not counted as stored: counts' ``other_layout`` says whose (robot -> {"episodes",
        "layouts"}). Returns (snapshot id, real, sim, counts: episodes read, and stored, per source)."""
        self.store.refresh_index()
        start = None if sim_snapshot is None else self.store.snapshot(sim_snapshot, base=self._last_read)
        if start is not None:
            start.catalog()  # read on from the last read's catalog, and the tip's on from this one's (both only what is new)
        snapshot = self.store.snapshot(base=self._last_read if start is None else start)
        self._pin(snapshot.snapshot_id, f"data.{snapshot.snapshot_id}")  # a release names it (lineage): kept through maintenance
        other: dict[str, dict] = {}
        rules = snapshot.withdrawals()  # the tip's rules, for the sim episodes as of the iteration's start too
        every_real = snapshot.episodes(robot_model=robot_model, source="real", include_withdrawn=True)
        gone = snapshot.withdrawn(rules) if rules else frozenset()
        kept_real = _kept(every_real, gone)
        stored_real = _of_layout(snapshot, kept_real, layout, other)
        real = snapshot.read_episodes(newest_within(stored_real, real_window))
        before = snapshot if start is None else start
        every_sim = before.episodes(robot_model=robot_model, source="sim", include_withdrawn=True)
        kept_sim = _kept(every_sim, gone if before is snapshot else before.withdrawn(rules) if rules else frozenset())
        stored_sim = _of_layout(before, kept_sim, layout, other)
        sim = before.read_episodes(newest_within(stored_sim, sim_window))
        counts = {"real": len(real), "sim": len(sim), "real_in_store": len(stored_real), "sim_in_store": len(stored_sim)}
        if other:
            counts["other_layout"] = other
        if rules:  # docs/store.md, "Withdrawing episodes": what they left out, and the robots each rule names
            counts["withdrawn"] = {"real": len(every_real) - len(kept_real), "sim": len(every_sim) - len(kept_sim)}
            ours = {e.robot_id for e in every_real} | {e.episode_id for e in (*every_real, *every_sim)}  # this model's robots and episodes
            mine = [r for r in rules if r.robot_id in ours or any(e in ours for e in r.episode_ids)]  # another model's rule resets nothing here
            if mine:
                counts["withdrawals"] = withdrawal_robots(snapshot, mine)
        self._last_read = snapshot
        return snapshot.snapshot_id, real, sim, counts

    def pinned_tip(self) -> str:
        """The store's newest snapshot id, pinned: an iteration's start, read again by a redo hours later (docs/store.md, Maintenance)."""
        tip = self.store.latest_snapshot_id()
        self.pin_start(tip)
        return tip

    def pin_start(self, snapshot_id: str) -> None:
        self._pin(snapshot_id, f"start.{snapshot_id}")

    def release_start(self, snapshot_id: str) -> None:
        """A finished iteration's start: no redo reads it any more, maintenance may expire it."""
        ours = re.compile(re.escape(f"start.{snapshot_id}") + r"(\.\d+)?")  # and a renewed one (_pin), not an operator's own
        for name in self.store.pin_names():
            if ours.fullmatch(name):
                with contextlib.suppress(LookupError):  # let go already (a replica's run, at the same time)
                    self.store.unpin(name)

    def _pin(self, snapshot_id: str, name: str) -> None:
        """Pin ``snapshot_id`` as ``name``, or, where an operator unpinned that name (Icechunk never takes a name twice:
        a resumed run that pinned its start again failed), as ``name.2``, ``name.3``, ...: the first that takes it."""
        for n in range(1, PIN_RENEWALS + 1):
            try:
                return self.store.pin(snapshot_id, name if n == 1 else f"{name}.{n}")
            except SpentPinName:
                continue
        raise SpentPinName(f"pins {name!r} to {name}.{PIN_RENEWALS} were all unpinned before: set a new run_dir")

    def store_synthetic(self, episodes: list[Episode]) -> int:
        """Write scenario and world-model episodes into the store (idempotent by episode id)."""
        if not episodes:
            return 0
        return self.store.append(episodes, message="synthetic episodes").created

    def ray_map(self, fn, jobs) -> list:
        """``fn`` over ``jobs`` as Ray tasks spread over the cluster's nodes, each retried up to
        ``ray.max_retries`` times when its worker or node dies; the results in order. Counts the tasks
        each node ran in ``task_nodes`` (node id -> tasks)."""
        remote = ray.remote(num_cpus=MAP_TASK["CPU"], max_retries=self.cfg.ray.max_retries, scheduling_strategy="SPREAD")(_ray_task)
        placed = ray.get([remote.remote(fn, job) for job in jobs])
        self.task_nodes.update(node for node, _ in placed)
        return [result for _, result in placed]

    def robot_options(self, count: int) -> list[dict]:
        """Ray options of ``count`` robot actors: spread over the cluster's nodes (a placement group, one
        bundle a robot, strategy SPREAD: Ray moves a dead node's bundles to live nodes), each restarted
        after its process or node dies, ``ray.max_retries`` times, and its calls retried for as long as
        it is restarted (each call resumes: its state is on disk, simfleet.py)."""
        self._robot_group = placement_group([{"memory": 1}] * count, strategy="SPREAD")  # a token amount: robots take no CPU
        ray.get(self._robot_group.ready(), timeout=120)
        return [
            {"scheduling_strategy": PlacementGroupSchedulingStrategy(self._robot_group, placement_group_bundle_index=i),
             "max_restarts": self.cfg.ray.max_retries, "max_task_retries": -1}
            for i in range(count)
        ]  # fmt: skip

    # -- models ---------------------------------------------------------------------------------
    def export(self, policy, directory: Path, robot_model: str, snapshot_id: str, algorithm: str) -> tuple[bytes, dict]:
        """Export a policy (safetensors + manifest; ``algorithm``: the learner that trained it); returns (weights bytes, the exporter's manifest)."""
        from policies.export import export_policy
        from policies.runtime import WEIGHTS_FILE

        manifest = export_policy(policy, directory, robot_model=robot_model, policy_version=directory.parent.name, algorithm=algorithm, data_snapshot=snapshot_id)
        return (directory / WEIGHTS_FILE).read_bytes(), manifest

    def mirror_policy(self, version: int, export_dir: Path, robot_model: str, snapshot_id: str, lineage: dict | None = None) -> None:
        """W&B mirrors each released policy as a version of one Artifact per robot model (aliases
        ``release-<version>`` and ``stable``), made from the dataset snapshot it trained on; our registry serves it.
        ``lineage``: what else it came from (iteration, learner seed, the release it continued, the world model, the
        synthetic episodes, the gate's numbers), recorded in its metadata."""
        files = sorted(p for p in export_dir.iterdir() if p.is_file())
        dataset = f"{dataset_artifact(robot_model)}:{snapshot_alias(snapshot_id)}"
        self.tracker.artifact(
            f"policy-{robot_model}", "model", files, {"version": version, "data_snapshot": snapshot_id, "dataset_artifact": dataset, **(lineage or {})},
            aliases=(f"release-{version}", "stable"), uses=(dataset,),
        )

    def mirror_dataset(self, snapshot_id: str, counts: dict[str, int], iteration: int, robot_model: str, windows: dict[str, int | None]) -> None:
        """W&B mirrors the pinned dataset snapshot as a version of one Artifact per robot model
        (its id, counts and the data windows read; the data stays in the store), aliased by snapshot and iteration."""
        path = self.run_dir / "snapshots" / f"iter{iteration:03d}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"snapshot_id": snapshot_id, "store": str(self.store_cfg.path), "episodes": counts, "windows": windows}, indent=1))
        aliases = (snapshot_alias(snapshot_id), f"iter-{iteration}")
        self.tracker.artifact(dataset_artifact(robot_model), "dataset", [path], {"snapshot_id": snapshot_id, **counts, **windows}, aliases=aliases)

    # -- lifetime -------------------------------------------------------------------------------
    def __exit__(self, *exc):
        try:
            self.tracker.finish(*exit_status(exc[1]))  # an interrupted or failed run is not recorded as finished
            self.server.stop()
        finally:
            if self._robot_group is not None and ray.is_initialized():
                remove_placement_group(self._robot_group)
            if self._started_ray:
                ray.shutdown()
        return False


def run_store(configured: StoreConfig, run_dir: Path, run_id: str) -> StoreConfig:
    """The run's own episode store: ``fleet.store`` at :func:`run_location` ``(fleet.store.path, run_dir, "store", run_id)``."""
    return dataclasses.replace(configured, path=run_location(configured.path, run_dir, "store", run_id))


def run_writer(store: StoreConfig, role: str) -> StoreConfig:
    """The run's writer ``role`` (``ingest``: its fleet server; ``synthetic``: this driver). On object storage
    with no ``fleet.store.writer_id``, the role is the writer id, so a resumed run appends to the same
    catalog partitions and streams instead of adding a generated writer's per start (docs/store.md, "Writers")."""
    if store.writer_id or Location.parse(store.path).is_local:
        return store
    return dataclasses.replace(store, writer_id=role)


def run_location(configured: str | os.PathLike, run_dir: Path, folder: str, run_id: str) -> str:
    """Where a run keeps what ``configured`` locates (``fleet.store.path``, ``fleet.registry.dir``):
    ``<run_dir>/<folder>`` for a local path, or ``s3://bucket/prefix/<run_id>`` when it names object
    storage (``s3://bucket/prefix``). The run id is recorded in the run folder at its first start
    (fleet/run_folders.py), so a resumed run finds its own again, and a run whose folder merely has
    the same name as another's (two sweeps' job ``0``) does not find that one's."""
    location = Location.parse(str(configured))
    if location.is_local:
        return str(run_dir / folder)
    return f"s3://{location.bucket}/{'/'.join(p for p in (location.prefix, run_id) if p)}"


def run_id_of(run_dir: Path) -> str:
    """The run's id: the one ``run_dir`` records (a resume), or a new one for a fresh run, whose random part keeps it
    off every other run's store and registry on object storage. Not recorded here: the run records it as it starts."""
    if (recorded := recorded_run_id(run_dir)) is not None:
        return recorded
    return new_run_id(run_dir)


def warn_if_gpus_are_elsewhere(cluster_gpus: float, *devices: str) -> bool:
    """The learner and the world model train in this process (the Ray driver), on ``device: auto``'s
    GPU when this machine has one: say so (and return True) when one of ``devices`` is auto and this
    machine has no GPU, but the Ray cluster has ``cluster_gpus``."""
    if cluster_gpus and AUTO in devices and resolve_device(AUTO).type == "cpu":
        log.warning(
            "the Ray cluster has %g GPUs, but this process sees none: the learner and the world model train here, on CPU; "
            "start flywheel on a GPU node (ray.address=auto joins the cluster), or train there with ray.training.placement=cluster ray.training.num_gpus=1", cluster_gpus,
        )
        return True
    return False


def in_robot_order(infos: list) -> list:
    """Catalog entries (``EpisodeInfo``) ordered by robot id, each robot's in the order it uploaded them.
    The catalog is in commit order, which depends on how concurrent robots' uploads met the group
    commit; this order does not, so one seed gives one run."""
    return sorted(infos, key=lambda info: info.robot_id)  # stable: a robot's own order is kept


def _kept(infos: list, withdrawn: frozenset[str]) -> list:
    return [info for info in infos if info.episode_id not in withdrawn] if withdrawn else infos


def withdrawal_robots(snapshot, rules) -> dict[str, list[str]]:
    """Rule id -> the robots it names: its robot, or the robots of the episodes it names (``snapshot``'s catalog)."""
    owners = {e.episode_id: e.robot_id for e in snapshot.catalog()} if any(r.episode_ids for r in rules) else {}
    return {r.id: [r.robot_id] if r.robot_id is not None else sorted({owners[e] for e in r.episode_ids if e in owners}) for r in rules}


def _of_layout(snapshot, infos: list, layout: dict[str, int] | None, other: dict[str, dict]) -> list:
    """``infos`` of ``layout`` (all with None): observation and action of its widths, and any other array it names
    (qpos, qvel) of its width where an episode has it; the others counted into ``other`` by robot, with the layouts
    they have. Judged once per stream (a stream holds one layout)."""
    if layout is None:
        return infos
    verdicts: dict[str, str | None] = {}  # stream -> None (the task's layout) or what it holds instead
    kept = []
    for info in infos:
        if info.stream not in verdicts:
            widths = {a.name: a.tail for a in snapshot.signature(info.stream).arrays if a.name in layout}
            fits = all(n in widths for n in ("observation", "action")) and all(tail == (layout[n],) for n, tail in widths.items())
            verdicts[info.stream] = None if fits else ", ".join(f"{n} {'x'.join(map(str, t))}" for n, t in sorted(widths.items()))
        if verdicts[info.stream] is None:
            kept.append(info)
            continue
        seen = other.setdefault(info.robot_id, {"episodes": 0, "layouts": []})
        seen["episodes"] += 1
        if verdicts[info.stream] not in seen["layouts"]:
            seen["layouts"].append(verdicts[info.stream])
    return kept


def newest_within(infos: list, max_steps: int | None) -> list:
    """In :func:`in_robot_order`, each robot's newest catalog entries (``EpisodeInfo``) whose steps sum to at most
    ``max_steps`` in all (None: every entry), whole episodes only. The budget is shared evenly between robots, and what
    a robot with less data leaves goes to the others; then what no robot could use of its share (its next episode is
    longer than what is left of it) goes episode by episode to the robot that holds the fewest steps so far, its next
    older episode if it fits (a robot that records one long episode a shift got nothing before, its share under that
    episode's steps). Each robot's cut depends only on the robots' own uploads, never on how they interleaved, so one
    seed still gives one run. A robot left with nothing is named in a warning. Episodes past the window stay in the
    store."""
    if max_steps is None:
        return in_robot_order(infos)
    robots: dict[str, list] = collections.defaultdict(list)
    for info in infos:
        robots[info.robot_id].append(info)
    held = {r: sum(i.num_steps for i in eps) for r, eps in robots.items()}
    share, left = {}, max_steps
    for n, r in enumerate(sorted(robots, key=lambda r: (held[r], r))):  # the smallest first: the rest is split among the others
        share[r] = min(held[r], left // (len(robots) - n))
        left -= share[r]
    taken, steps = {}, {}  # robot -> how many of its newest episodes, and their steps
    for r, eps in robots.items():
        taken[r] = steps[r] = 0
        for info in reversed(eps):
            if steps[r] + info.num_steps > share[r]:
                break
            taken[r], steps[r] = taken[r] + 1, steps[r] + info.num_steps
    left = max_steps - sum(steps.values())
    waiting = [(steps[r], eps[-taken[r] - 1].num_steps, r) for r, eps in robots.items() if taken[r] < len(eps)]
    heapq.heapify(waiting)  # the robot holding the fewest steps first (then the shorter next episode, then its id)
    while waiting:
        _, need, r = heapq.heappop(waiting)
        if need > left:  # it never fits: what is left only shrinks
            continue
        left -= need
        taken[r], steps[r] = taken[r] + 1, steps[r] + need
        if taken[r] < len(robots[r]):
            heapq.heappush(waiting, (steps[r], robots[r][-taken[r] - 1].num_steps, r))
    if empty := sorted(r for r in robots if not taken[r]):
        log.warning("the data window (%d steps) holds no episode of robot(s) %s: the newest is %s steps; raise loop.real_window_steps "
                    "(loop.sim_window_steps for sim episodes) or record shorter episodes", max_steps, ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else ""),
                    ", ".join(f"{robots[r][-1].num_steps:,}" for r in empty[:5]))  # fmt: skip
    return [info for r in sorted(robots) for info in robots[r][len(robots[r]) - taken[r] :]]


