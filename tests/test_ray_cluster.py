"""The flywheel on a real two-node Ray cluster on loopback: a head (`ray start --head`) and a second node
(`ray start --address`), every node and the driver on 127.0.0.2, Ray's token authentication on (the token
in a file: RAY_AUTH_TOKEN_PATH on the nodes, ``ray.auth_token_file`` for the driver), the episode store
and the policy registry on moto's S3 server. Robot actors and Ray tasks land on both nodes; the second
node is SIGKILLed while one of its robots has an upload in flight, mid-iteration; the run completes,
every episode a robot ran stored exactly once. The nodes are started and stopped here, by their own pids.

Why 127.0.0.2: Ray 2.60 replaces a node address of 127.0.0.1 (or localhost, ::1) by the host's network
address on a node of a cluster (`ray start --node-ip-address`, and a driver's ``_node_ip_address``); any
other loopback address it keeps. Its gRPC servers (GCS, raylets, workers) then listen on every interface
all the same: only a single-host Ray on 127.0.0.1 binds loopback alone (the local Ray test below)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import ray

from fleet.pipeline import loop as loop_module
from fleet.pipeline.loop import Flywheel
from fleet.pipeline.ray_start import start_ray
from fleet.pipeline.simfleet import LEDGER
from fleet.store import EpisodeStore, StoreConfig
from tests.test_flywheel_e2e import config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RAY_CLI = Path(sys.executable).parent / "ray"
LOOPBACK = "127.0.0.2"  # the cluster's address (the module docstring says why not 127.0.0.1)
SECOND = "second_node"  # a custom resource only the second node has: how the test tells the nodes apart
FAST_DEATH = {  # the head notices a dead node within ~1 s (default: 5 missed checks, 3 s apart)
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "300",
    "RAY_health_check_timeout_ms": "300",
    "RAY_health_check_failure_threshold": "2",
}
SMALL = [  # on top of test_flywheel_e2e's TINY: the smallest loop that still runs every step
    "loop.episodes_per_robot=2",
    "loop.episode_steps=100",
    "loop.train_env_steps=200",
    "policy.algorithm.model_train.max_steps=100",
    "policy.algorithm.retrain_steps=50",
    "loop.wm_rollouts=16",
    "worldmodel.train.max_steps=50",
    "scenarios.fanout.chunk_size=2",  # 8 scenarios: 4 tasks, spread over both nodes
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class RayNode:
    """One `ray start --block` on loopback (its own temp folder and ports); stopped or killed by the pids
    of that process and its descendants, never by name."""

    def __init__(self, args: list[str], folder: Path, env: dict):
        folder.mkdir(parents=True)
        self.log_path = folder / "ray-start.log"
        ports = [f"--{name}={free_port()}" for name in ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                                                      "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(RAY_CLI), "start", "--block", f"--node-ip-address={LOOPBACK}", "--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats",
                 f"--temp-dir={folder / 'ray'}", *ports, *args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[1],
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start {args} did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)

    def pids(self) -> list[int]:
        """`ray start` and every process under it (GCS, raylet, agents, workers)."""
        return descendants(self.proc.pid)

    def kill(self) -> list[int]:
        """SIGKILL this node: every one of :meth:`pids`, until none is left; returns them."""
        killed = []
        while alive := [p for p in self.pids() if running(p)]:
            for pid in alive:
                signal_pid(pid, signal.SIGKILL)
            killed += alive
            wait_gone(alive, 10)
        self.proc.wait(10)
        return killed

    def stop(self) -> None:
        """SIGTERM `ray start` (it stops its processes), then SIGKILL whatever of them is left."""
        pids = self.pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        for pid in pids:
            signal_pid(pid, signal.SIGKILL)
        wait_gone(pids, 10)
        self.proc.poll()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def listening(pids) -> set[str]:
    """The addresses processes ``pids`` listen on (TCP over IPv4 and IPv6), read from /proc."""
    sockets = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        sockets |= {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}
    out = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in sockets:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                address = socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
                out.add(address.removeprefix("::ffff:"))  # an IPv4 address on a dual-stack socket
    return out


@pytest.fixture(scope="module", autouse=True)
def ray_process_state(s3_server):
    """start_ray sets Ray's authentication variables in this process, and Ray caches the token it read:
    after this module, both as they were, so a later test's local Ray starts with its own token. (The S3
    server, which the session's later tests share, starts first: its variables are among those kept.)"""
    saved = dict(os.environ)
    yield
    if ray.is_initialized():
        ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node on loopback with token authentication (the token in a file every node names),
    health checks fast enough to notice a dead node in about a second. Yields (address, head, second, token file);
    the module's last test kills the second node."""
    folder = Path(tempfile.mkdtemp(prefix="rc-"))  # short (not under pytest's tmp_path): Ray's socket paths live in it, <= 107 bytes
    token = folder / "token"
    token.write_text(uuid.uuid4().hex)
    token.chmod(0o600)
    nodes_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "AUTOSCALER_METRIC_PORT": str(free_port()), **FAST_DEATH}
    nodes = []
    with pytest.MonkeyPatch.context() as mp:
        for k, v in nodes_env.items():
            mp.setenv(k, v)  # the nodes' environment, and this process's (start_ray sets the first two again); restored after
        for k in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
            mp.delenv(k, raising=False)
        try:
            port = free_port()
            nodes.append(RayNode(["--head", f"--port={port}", "--include-dashboard=false"], folder / "head", dict(os.environ)))
            nodes.append(RayNode([f"--address={LOOPBACK}:{port}", f"--resources={json.dumps({SECOND: 1})}"], folder / "second", dict(os.environ)))
            yield f"{LOOPBACK}:{port}", nodes[0], nodes[1], token
        finally:
            if ray.is_initialized():
                ray.shutdown()
            for node in reversed(nodes):
                node.stop()
            shutil.rmtree(folder, ignore_errors=True)


@ray.remote(num_cpus=0)
def node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
def node_address() -> str:
    return ray.util.get_node_ip_address()


def test_the_local_ray_binds_and_advertises_loopback_only(tmp_path, monkeypatch):
    """`make demo`'s Ray: ray.node_ip_address defaults to 127.0.0.1, and every process of the local Ray uses it."""
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # start_ray sets it: restored after
    import signal

    def as_ctrl_c(signum, frame):  # the apps' (fleet.apps.errors.stop_on_signals)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, as_ctrl_c)
    try:
        assert start_ray(config(tmp_path / "run", "ray.num_cpus=1").ray)
        assert signal.getsignal(signal.SIGTERM) is as_ctrl_c  # ray.init's sys.exit(15) made a SIGTERM'd flywheel exit 15 without a word
    finally:
        signal.signal(signal.SIGTERM, before)
    try:
        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"] and ray.util.get_node_ip_address() == "127.0.0.1"
        assert ray.get(node_address.remote()) == "127.0.0.1"  # a worker too
        assert listening(descendants(os.getpid())) == {"127.0.0.1"}  # GCS, raylet, agents, workers: nothing beyond loopback
    finally:
        ray.shutdown()


def test_a_driver_without_the_cluster_token_is_refused_with_what_to_do(cluster, tmp_path, monkeypatch):
    address, *_ = cluster
    monkeypatch.setenv("RAY_gcs_server_port_wait_time_s", "2")  # how long Ray's ray.init tries (default ~20 s)
    wrong = tmp_path / "wrong-token"
    wrong.write_text(uuid.uuid4().hex)
    cfg = config(tmp_path / "run", f"ray.address={address}", f"ray.node_ip_address={LOOPBACK}", f"ray.auth_token_file={wrong}")
    with pytest.raises(RuntimeError, match="refused this process's token") as info:
        start_ray(cfg.ray)
    assert "RAY_AUTH_TOKEN" in str(info.value) and wrong.read_text() not in str(info.value)  # what to do; never the token


def test_the_local_rays_settings_a_cluster_ignores_are_named_once_as_it_joins(cluster, tmp_path, caplog):
    """ray.num_cpus, object_store_memory and include_dashboard set up a Ray of the run's own: joining a cluster they
    were ignored without a word (TINY's ray.num_cpus=2 here, as a command line copied from a local run)."""
    if ray.is_initialized():
        ray.shutdown()  # an earlier test's join: this one's start_ray must join
    address, _, _, token = cluster
    cfg = config(tmp_path / "run", f"ray.address={address}", f"ray.node_ip_address={LOOPBACK}", f"ray.auth_token_file={token}", "ray.include_dashboard=true")
    with caplog.at_level(logging.WARNING, logger="fleet"):
        assert start_ray(cfg.ray) and not start_ray(cfg.ray)  # joined once
    said = [r.getMessage() for r in caplog.records if r.name == "fleet.pipeline.ray_start"]
    assert said == [
        f"ray.num_cpus=2, ray.include_dashboard=True: not used when joining the Ray cluster at {address} (they set up a Ray of "
        "this run's own; its nodes' `ray start` options set the cluster's): leave them out"
    ]


def test_flywheel_train_refused_by_the_clusters_token_leaves_no_run_folder(cluster, tmp_path):
    """It said why in one line, but left runs/<time>/ holding train_job.json, an empty metrics.jsonl, .lock and a W&B
    run: the cluster is joined before the run folder is taken now, as a start refused for its settings leaves none."""
    address, *_ = cluster
    wrong, work = tmp_path / "wrong-token", tmp_path / "work"
    wrong.write_text(uuid.uuid4().hex)
    work.mkdir()
    refused = subprocess.run(
        [sys.executable, "-m", "fleet.apps.train", "train.workers=2", f"ray.address={address}", f"ray.node_ip_address={LOOPBACK}", f"ray.auth_token_file={wrong}"],
        cwd=work, env={**os.environ, "RAY_gcs_server_port_wait_time_s": "2"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 1 and "flywheel-train: " in refused.stderr and "refused this process's token" in refused.stderr, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert sorted(work.rglob("*")) == [], sorted(str(p) for p in work.rglob("*"))


def test_the_world_model_trains_on_the_node_with_the_asked_resources(cluster, tmp_path):
    """``ray.training``: a training task runs on a node with the resources asked for (here only the second node has
    them), gets the previous model as bytes and sends the new one back into the driver's folder."""
    from hydra.utils import instantiate

    from fleet.pipeline.training import Training, TrainingPlacement
    from sim.batched import BatchedStepper
    from sim.policy_fn import random_policy
    from sim.scenario import ScenarioSpec

    address, _, _, token = cluster
    cfg = config(tmp_path / "run", f"ray.address={address}", f"ray.node_ip_address={LOOPBACK}", f"ray.auth_token_file={token}", "worldmodel.train.max_steps=20")
    start_ray(cfg.ray)
    second_id = ray.get(node_id.options(resources={SECOND: 0.01}).remote(), timeout=60)
    with BatchedStepper("pendulum", 2, source="real", robot_id="robot-0") as stepper:
        real = stepper.simulate([ScenarioSpec("pendulum", seed=s, max_steps=40) for s in range(4)], random_policy(1, 0))
    training = Training(TrainingPlacement("cluster", num_cpus=1, resources={SECOND: 0.01}), max_retries=0)
    versions = []
    for i, episodes in enumerate((real[:2], real)):  # the second continues the first, sent to the node as bytes
        _, report, version = training.world_model(
            episodes, [], tmp_path / "worldmodel" if i else None, tmp_path / "worldmodel", instantiate(cfg.worldmodel.ensemble), instantiate(cfg.worldmodel.train), "cpu"
        )
        versions.append(version)
        assert training.nodes == {"world_model": second_id} and report.train_episodes + report.val_episodes == len(episodes)
    from worldmodel.io import load, model_version

    assert model_version(load(tmp_path / "worldmodel", device="cpu")) == versions[1] != versions[0]  # the new model, in the driver's folder


def test_the_learners_log_sink_lives_on_the_drivers_node(cluster, tmp_path):
    """The sink took any node: on the node lost mid-training, it took the run with it (its learner's log call raised)."""
    from fleet.pipeline.remote_log import LogStream

    address, _, _, token = cluster
    start_ray(config(tmp_path / "run", f"ray.address={address}", f"ray.node_ip_address={LOOPBACK}", f"ray.auth_token_file={token}").ray)
    here, nodes = ray.get_runtime_context().get_node_id(), []
    for _ in range(6):
        with LogStream(lambda m, n: None) as remote_log:
            nodes.append(ray.get(remote_log.sink.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60))
    assert nodes == [here] * 6


def test_the_loop_survives_losing_a_node_mid_iteration(cluster, s3_server, tmp_path, monkeypatch):
    address, head, second, token = cluster
    run, top = tmp_path / "run", f"cluster-{uuid.uuid4().hex[:8]}"
    cfg = config(
        run, *SMALL, f"ray.address={address}", f"ray.node_ip_address={LOOPBACK}", f"ray.auth_token_file={token}", f"fleet.store.path=s3://fleet/{top}/store",
        f"fleet.registry.dir=s3://fleet/{top}/registry", "ray.training.placement=cluster",
    )  # fmt: skip
    start_ray(cfg.ray)  # as the flywheel joins it; here first, to wait for both nodes before the robots start
    second_id = ray.get(node_id.options(resources={SECOND: 0.01}).remote(), timeout=60)  # this node's scheduler sees the second
    nodes = [n for n in ray.nodes() if n["Alive"]]
    (head_id,) = [n["NodeID"] for n in nodes if n["NodeID"] != second_id]
    assert {n["NodeManagerAddress"] for n in nodes} == {LOOPBACK} and ray.util.get_node_ip_address() == LOOPBACK  # advertised

    flywheel = Flywheel(cfg, run)
    seen = {}  # what the cluster looked like when the node died

    def robots_node() -> dict[str, str]:
        return {r: json.loads((run / "robots" / r / LEDGER).read_text())["nodes"][-1] for r in flywheel.specs}

    real_scenarios = loop_module.steps.generate_scenarios

    def scenarios_then_arm(*args, **kwargs):
        out = real_scenarios(*args, **kwargs)
        if not seen:  # iteration 0's tasks are done: placement so far, and the robot to kill under
            seen["robots"], seen["tasks"] = robots_node(), dict(flywheel.svc.task_nodes)
        return out

    real_append = EpisodeStore.append

    def append_then_kill(store, episodes, **kwargs):
        result = real_append(store, episodes, **kwargs)  # durable, not yet acknowledged to the robot
        if "robots" in seen and "killed" not in seen:
            victims = [r for r, node in seen["robots"].items() if node == second_id]
            if any(e.source == "real" and e.robot_id in victims for e in episodes):
                seen["iteration"], seen["killed"] = flywheel.state["next_iteration"], second.kill()
        return result

    monkeypatch.setattr(loop_module.steps, "generate_scenarios", scenarios_then_arm)
    monkeypatch.setattr(EpisodeStore, "append", append_then_kill)
    summary = flywheel.run()
    assert flywheel.svc.url.startswith(f"http://{LOOPBACK}:")  # the fleet server, on the driver's Ray address

    # placed on both nodes before the kill: one robot each, calibration and scenario tasks on both
    assert sorted(seen["robots"].values()) == sorted([head_id, second_id])
    assert set(seen["tasks"]) == {head_id, second_id}
    # the second node died with one of its robots' uploads stored but unacknowledged, in an iteration (its canary or telemetry)
    assert seen["killed"] and not any(running(p) for p in seen["killed"]) and seen["iteration"] in (0, 1)
    assert [h["iteration"] for h in summary["iterations"]] == [0, 1] and summary["final"]  # the run completed
    robots = {s["robot_id"]: s for s in summary["robots"]}
    (victim,) = [r for r, node in seen["robots"].items() if node == second_id]
    # the world model and the learner trained in Ray tasks on the cluster's nodes; after the kill, on the head (a kill in
    # iteration 1 may come after its training: in its canary)
    first, second_iteration = (set(h["training_nodes"].values()) for h in summary["iterations"])
    assert first <= {head_id, second_id} and second_iteration <= {head_id, second_id} and (seen["iteration"] == 1 or second_iteration == {head_id})
    assert robots[victim]["nodes"] == [second_id, head_id]  # restarted once, on the surviving node
    assert robots[victim]["duplicate"] >= 1  # it uploaded its unacknowledged episode again: stored already, not twice
    assert all(s["nodes"] == [head_id] for r, s in robots.items() if r != victim)

    store = EpisodeStore.open(StoreConfig(path=f"s3://fleet/{top}/store/{flywheel.run_id}"))  # the run id, made at its start: <run folder name>-<random>
    assert flywheel.run_id.startswith("run-") and flywheel.svc.store_cfg.path == store.config.path
    real = store.snapshot().episodes(source="real")
    ids = [e.episode_id for e in real]
    assert len(ids) == len(set(ids))  # nothing stored twice
    writers = {e.stream.rsplit(".", 1)[1] for e in store.snapshot().catalog()}
    assert writers == {"ingest", "synthetic"} and {e.stream.rsplit(".", 1)[1] for e in real} == {"ingest"}  # the run's two stable writers
    for robot_id, status in robots.items():  # every episode a robot ran is stored, none lost, none extra
        assert sum(e.robot_id == robot_id for e in real) == status["episodes_run"] > 0
