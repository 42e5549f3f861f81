"""Robot agent: crash-safe bounded spool, step recorder, uploads that survive a server that is
down and a robot restart, permanent refusals set aside, and the flywheel-robot app end to end."""

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from fleet.agent import AgentConfig, EpisodeRecorder, RobotAgent, Spool
from fleet.server import ServerConfig, add_token, serve
from fleet.store import EpisodeStore, StoreConfig
from sim.episode import Episode
from tests.conftest import make_episode_arrays

REPO = str(Path(__file__).resolve().parents[1])


def make(seed: int, robot_id: str = "robot-a", steps: int = 8) -> Episode:
    return Episode.create(**make_episode_arrays(num_steps=steps, seed=seed), robot_id=robot_id, robot_model="toy", source="real")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_spool_is_fifo_crash_safe_and_bounded(tmp_path, caplog):
    eps = [make(i) for i in range(5)]
    size = len(eps[0].to_bytes())
    spool = Spool(tmp_path / "spool", max_bytes=3 * size)
    for ep in eps[:3]:
        spool.put(ep.to_bytes(), ep.episode_id)
    (tmp_path / "spool" / "00000000000000000099-x.safetensors.partial").write_bytes(b"half a file")  # crash mid-write
    spool = Spool(tmp_path / "spool", max_bytes=3 * size)  # robot restart
    assert spool.discarded_partials == 1 and spool.depth == 3
    assert [e.episode_id for e in spool.entries()] == [ep.episode_id for ep in eps[:3]]
    assert Episode.from_bytes(spool.read(spool.oldest())).equals(eps[0])
    with caplog.at_level(logging.WARNING, logger="fleet.agent.spool"):
        for ep in eps[3:]:
            spool.put(ep.to_bytes(), ep.episode_id)
    assert spool.evicted == 2 and "evicted episode" in caplog.text
    assert [e.episode_id for e in spool.entries()] == [ep.episode_id for ep in eps[2:]]  # oldest went first
    assert spool.nbytes <= 3 * size and not list((tmp_path / "spool").glob("*.partial"))
    with pytest.raises(ValueError, match="more than the whole spool"):
        spool.put(b"\0" * (4 * size), str(uuid.uuid4()))


def test_recorder_builds_a_valid_episode():
    rec = EpisodeRecorder(robot_id="r", robot_model="arm", source="real", hardware={"gripper": "g2"})
    rec.reset(np.zeros(3), 10.0, extras={"qpos": np.zeros(2)})
    for t in range(4):
        assert not rec.done
        rec.step(np.ones(2) * t, 0.5, np.full(3, t), False, t == 3, 10.1 + 0.1 * t, extras={"qpos": np.ones(2), "actuator_force": np.ones(2)})
    assert rec.done
    ep = rec.finish(policy_version="v7")
    assert ep.num_steps == 4 and ep.truncated[-1] and not ep.terminated.any()
    assert ep.extras["qpos"].shape == (5, 2) and ep.extras["actuator_force"].shape == (4, 2)
    assert ep.metadata["policy_version"] == "v7" and ep.json_metadata("hardware") == {"gripper": "g2"}
    assert Episode.from_bytes(ep.to_bytes()).equals(ep)
    with pytest.raises(RuntimeError, match="no steps recorded"):
        rec.finish()


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens.json"
    return path, add_token(path, "robot", "robot-a")


def test_server_down_then_robot_restart_then_server_back_nothing_lost(tmp_path, tokens):
    token_file, token = tokens
    port = free_port()
    cfg = AgentConfig(server_url=f"http://127.0.0.1:{port}", spool_dir=str(tmp_path / "spool"), backoff_initial_s=0.02, backoff_max_s=0.2)
    eps = [make(i) for i in range(6)]
    first = RobotAgent(cfg, "robot-a", token=token).start()
    for ep in eps[:3]:
        first.submit(ep)
    wait_for(lambda: first.status()["failed_attempts"] >= 3)  # no server: it keeps the episodes and retries
    status = first.status()
    assert status["queue_depth"] == 3 and status["created"] == 0 and "ConnectError" in status["last_error"]
    first.stop()  # the robot restarts; its spool is on disk
    second = RobotAgent(cfg, "robot-a", token=token).start()
    for ep in eps[3:]:
        second.submit(ep)
    assert second.status()["queue_depth"] == 6
    store_cfg = StoreConfig(path=str(tmp_path / "store"))
    handle = serve(ServerConfig(port=port, token_file=str(token_file)), store_cfg)
    try:
        assert second.wait_drained(60), second.status()
    finally:
        second.stop()
        handle.stop()
    assert second.status()["created"] == 6 and second.status()["queue_depth"] == 0
    snap = EpisodeStore.open(store_cfg).snapshot()
    assert sorted(e.episode_id for e in snap.catalog()) == sorted(ep.episode_id for ep in eps)
    for ep in eps:
        assert snap.read_episode(ep.episode_id).equals(ep)


def test_permanently_refused_episode_is_set_aside_and_the_queue_moves_on(tmp_path, tokens):
    token_file, token = tokens
    store_cfg = StoreConfig(path=str(tmp_path / "store"))
    handle = serve(ServerConfig(port=0, token_file=str(token_file)), store_cfg)
    cfg = AgentConfig(server_url=handle.url, spool_dir=str(tmp_path / "spool"), backoff_initial_s=0.02, backoff_max_s=0.2)
    agent = RobotAgent(cfg, "robot-a", token=token)
    agent.spool.put(b"definitely not an episode", str(uuid.uuid4()))
    good = make(1)
    agent.submit(good)
    with pytest.raises(ValueError, match="not this agent's robot"):
        agent.submit(make(2, robot_id="robot-b"))
    agent.start()
    try:
        assert agent.wait_drained(30)
    finally:
        agent.stop()
        handle.stop()
    assert agent.status()["rejected"] == 1 and agent.status()["created"] == 1
    (rejected,) = agent.spool.rejected()
    reason = json.loads(Path(f"{rejected}.reason.json").read_text())
    assert reason["status"] == 400 and reason["error"] == "not_safetensors"
    assert good.episode_id in EpisodeStore.open(store_cfg).snapshot()


def test_flywheel_robot_app_records_spools_and_uploads(tmp_path, tokens):
    token_file, token = tokens
    store_cfg = StoreConfig(path=str(tmp_path / "store"))
    handle = serve(ServerConfig(port=0, token_file=str(token_file)), store_cfg)
    overrides = [
        "robot.robot_id=robot-a",
        "robot.model=pendulum",
        "robot.max_steps=25",
        "+robot.profile.mass_scale=1.1",
        "episodes=2",
        f"fleet.agent.server_url={handle.url}",
        f"fleet.agent.spool_dir={tmp_path / 'spool'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "fleet.apps.robot", *overrides],
            cwd=REPO,
            env={**os.environ, "FLYWHEEL_ROBOT_TOKEN": token},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        handle.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    status = json.loads(out.stdout.strip().splitlines()[-1])
    assert status["drained"] and status["created"] == 2 and status["queue_depth"] == 0
    snap = EpisodeStore.open(store_cfg).snapshot()
    (info, _) = snap.episodes(robot_id="robot-a")
    prov = snap.provenance(info.episode_id)
    assert prov["source"] == "real" and prov["policy_version"] == "random" and prov["hardware"]["profile"]["mass_scale"] == 1.1
    assert 1 <= info.num_steps <= 25


def test_robot_side_imports_no_torch_ray_or_store():
    code = "import sys, fleet.agent.agent, fleet.apps.robot; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'zarr', 'icechunk', 'fastapi'}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
