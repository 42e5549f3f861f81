"""Robot agent: crash-safe bounded spool, step recorder, uploads that survive a server that is
down and a robot restart, permanent refusals set aside, and the flywheel-robot app end to end."""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from fleet.agent import AgentConfig, EpisodeRecorder, RobotAgent, Spool
from fleet.server import ServerConfig, add_token, serve
from fleet.store import EpisodeStore, StoreConfig
from sim.episode import Episode, EpisodeValidationError
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


def test_an_episode_larger_than_the_spool_is_dropped_and_the_robot_goes_on(tmp_path, caplog):
    """Spool.put's ValueError went out of RobotAgent.submit (only SpoolFullError was caught): flywheel-robot with
    fleet.agent.spool_max_bytes below one episode exited 1 at its first episode."""
    small, large = make(0, steps=2), make(1, steps=400)
    agent = RobotAgent(AgentConfig(server_url="http://127.0.0.1:9", spool_dir=str(tmp_path / "spool"), spool_max_bytes=2 * len(small.to_bytes())), "robot-a", token="t")
    assert agent.submit(small)
    with caplog.at_level(logging.WARNING, logger="fleet.agent.agent"):
        assert not agent.submit(large)
    status = agent.status()
    assert (status["dropped"], status["too_large"], status["evicted"], status["queue_depth"]) == (1, 1, 0, 1)  # nothing evicted for it
    assert "more than the whole spool" in status["last_error"] and "raise spool_max_bytes" in caplog.text and large.episode_id in caplog.text
    assert agent.submit(make(2, steps=2)) and agent.status()["queue_depth"] == 2  # and the next episode is spooled as before


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


def test_a_refused_episode_leaves_the_recorder_clear():
    """finish() raised on a NaN and kept the episode: every later step went into it, so every later finish() of a
    control loop that went on (the ROS 2 node's) failed the same way."""
    rec = EpisodeRecorder(robot_id="r", robot_model="arm")
    rec.reset(np.zeros(3), 0.0)
    rec.step(np.zeros(2), 0.0, np.full(3, np.nan), False, True, 0.1)
    with pytest.raises(EpisodeValidationError, match="observation"):
        rec.finish()
    assert rec.num_steps == 0 and not rec.done
    with pytest.raises(RuntimeError, match="call reset"):
        rec.step(np.zeros(2), 0.0, np.zeros(3), False, True, 0.2)
    rec.reset(np.zeros(3), 0.2)
    rec.step(np.zeros(2), 1.0, np.ones(3), False, True, 0.3)
    assert rec.finish().num_steps == 1


class SensorDropRobot:
    """A Robot (fleet.agent's protocol) whose step ``nan_at`` (1-based; 0: its reset) reads NaN on one joint."""

    robot_id, robot_model, source, obs_dim, act_dim = "r", "arm", "real", 2, 1

    def __init__(self, nan_at: int, fall_at: int = -1):
        self.nan_at, self.fall_at, self.k, self.sent = nan_at, fall_at, 0, []

    def hardware(self) -> dict:
        return {}

    def reading(self) -> np.ndarray:
        obs = np.full(2, 0.1 * self.k, np.float32)
        obs[1] = np.nan if self.k == self.nan_at else obs[1]
        return obs

    def reset(self, seed: int):
        self.k = 0
        return self.reading(), 0.0

    def step(self, action):
        self.sent.append(np.asarray(action).copy())
        self.k += 1
        return self.reading(), 1.0, self.k == self.fall_at, self.k == 10, 0.1 * self.k


def test_run_episode_never_sends_a_nan_command_and_ends_at_a_nan_reading():
    """run_episode passed a policy's NaN action to the robot and recorded a NaN reading, and finish() then raised: the
    robot was commanded NaN and the episode's good steps were lost. A reading that is not finite now ends the episode
    (truncated) at its last step; an action that is not finite is sent, and recorded, as zeros."""
    from fleet.agent import run_episode
    from fleet.agent.policy import Policy

    policy = Policy("v", lambda obs: np.where(obs[:, :1] > 0.15, np.nan, 0.5).astype(np.float32))  # NaN from the reading of step 2 on
    robot, rec = SensorDropRobot(nan_at=4), EpisodeRecorder(robot_id="r", robot_model="arm")
    ep = run_episode(robot, policy, rec, seed=0)
    assert np.isfinite(np.concatenate(robot.sent)).all() and len(robot.sent) == 4  # the fourth step read NaN: the episode ended there
    assert ep.num_steps == 3 and ep.truncated.tolist() == [False, False, True] and ep.action[:, 0].tolist() == [0.5, 0.5, 0.0]
    assert np.allclose(ep.timestamp, [0.0, 0.1, 0.2, 0.3])
    for nan_at in (0, 1):  # nothing finite to record: refused, and the recorder is clear for the next episode
        with pytest.raises(EpisodeValidationError, match="observation"):
            run_episode(SensorDropRobot(nan_at), policy, rec, seed=0)
        assert rec.num_steps == 0
    assert run_episode(SensorDropRobot(nan_at=-1), policy, rec, seed=0).num_steps == 10


def test_run_episode_keeps_a_termination_read_as_nan():
    """A robot that fell with its IMU reading NaN at the fall: the step was dropped and the episode ended truncated, so
    SignedPolicySource's first-episode check (an early termination) never saw the fall and the bad release stayed. The
    last recorded step now carries the termination."""
    from fleet.agent import run_episode
    from fleet.agent.policy import Policy

    policy, rec = Policy("v", lambda obs: np.full((len(obs), 1), 0.5, np.float32)), EpisodeRecorder(robot_id="r", robot_model="arm")
    ep = run_episode(SensorDropRobot(nan_at=4, fall_at=4), policy, rec, seed=0)
    assert ep.num_steps == 3 and ep.terminated.tolist() == [False, False, True] and not ep.truncated.any()
    ep = run_episode(SensorDropRobot(nan_at=4, fall_at=6), policy, rec, seed=0)  # NaN without a fall: cut, as before
    assert ep.terminated.tolist() == [False, False, False] and ep.truncated.tolist() == [False, False, True]


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens.json"
    return path, add_token(path, "robot", "robot-a")

class SteppedClockRobot(SensorDropRobot):
    """A robot stamping readings with its wall clock, which NTP steps back ``back_s`` at step ``back_at`` (None: it stops)."""

    def __init__(self, back_at: int, back_s: float | None = 2.0):
        super().__init__(nan_at=-1)
        self.back_at, self.back_s = back_at, back_s

    def step(self, action):
        obs, reward, terminated, truncated, t = super().step(action)
        if self.k >= self.back_at:
            t = 0.1 * (self.back_at - 1) if self.back_s is None else t - self.back_s
        return obs, reward, terminated, truncated, t


def test_run_episode_keeps_the_steps_before_the_robot_clock_stepped_back(caplog):
    """A robot stamping with its wall clock, stepped back by NTP mid-episode: finish() refused the whole episode (timestamps
    must increase) and the error reached the control loop. The episode now ends (truncated) at the last step before it."""
    from fleet.agent import run_episode
    from fleet.agent.policy import Policy

    policy, rec = Policy("v", lambda obs: np.zeros((len(obs), 1), np.float32)), EpisodeRecorder(robot_id="r", robot_model="arm")
    ep = run_episode(SteppedClockRobot(back_at=6), policy, rec, seed=0)
    assert ep.num_steps == 5 and ep.truncated.tolist() == [False] * 4 + [True] and np.allclose(ep.timestamp, 0.1 * np.arange(6))
    assert "clock stepped back" in caplog.text
    ep = run_episode(SteppedClockRobot(back_at=6, back_s=None), policy, rec, seed=0)  # the clock stood still: the same
    assert ep.num_steps == 5
    with pytest.raises(EpisodeValidationError, match="timestamp"):  # the first step already: no episode, the recorder clear
        run_episode(SteppedClockRobot(back_at=1), policy, rec, seed=0)
    assert rec.num_steps == 0 and run_episode(SteppedClockRobot(back_at=99), policy, rec, seed=0).num_steps == 10
    for stamp in (float("nan"), float("inf")):  # a clock that read no number: the same (+inf once lost the whole episode)
        robot = SteppedClockRobot(back_at=99)
        robot.step = lambda action, robot=robot, stamp=stamp: (*SensorDropRobot.step(robot, action)[:4], stamp if robot.k >= 4 else 0.1 * robot.k)
        assert run_episode(robot, policy, rec, seed=0).num_steps == 3
    robot = SteppedClockRobot(back_at=6)
    robot.fall_at = 6  # the step that fell is the one whose stamp went back: the episode still ends terminated
    ep = run_episode(robot, policy, rec, seed=0)
    assert ep.num_steps == 5 and ep.terminated[-1] and not ep.truncated.any()



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


class _FailsOn:
    """A loopback HTTP server that answers 500 to uploads whose bytes contain ``poison`` (all when
    None) and 201 to the rest, recording each episode id it accepted, in order."""

    def __init__(self, poison: bytes | None, status: int = 500, headers: dict | None = None):
        accepted = self.accepted = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                extra = {}
                if poison is None or poison in body:
                    code, reply, extra = status, b'{"error": "internal", "field": null, "reason": "boom"}', headers or {}
                else:
                    accepted.append(Episode.from_bytes(body).episode_id)
                    code, reply = 201, json.dumps({"episode_id": accepted[-1], "status": "created"}).encode()  # the server's acknowledgement
                self.send_response(code)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_an_episode_the_server_fails_on_does_not_block_the_ones_behind_it(tmp_path, tokens):
    """No head-of-line blocking: the oldest episode always gets a 500; the newer ones upload in order
    meanwhile, and after max_attempts (with others accepted since) it is set aside with the answer."""
    poison_ep, others = make(100), [make(i) for i in range(5)]
    server = _FailsOn(poison_ep.episode_id.encode())
    cfg = AgentConfig(server_url=server.url, spool_dir=str(tmp_path / "spool"), backoff_initial_s=0.01, backoff_max_s=0.05, max_attempts=4)
    agent = RobotAgent(cfg, "robot-a", token="t")
    agent.submit(poison_ep)  # oldest first in the queue
    for ep in others:
        agent.submit(ep)
    agent.start()
    try:
        assert agent.wait_drained(30), agent.status()
    finally:
        agent.stop()
        server.close()
    status = agent.status()
    assert server.accepted == [ep.episode_id for ep in others]  # all of them, oldest first, past the failing one
    assert status["created"] == 5 and status["set_aside"] == 1 and status["rejected"] == 0 and status["queue_depth"] == 0
    (aside,) = agent.spool.rejected()
    reason = json.loads(Path(f"{aside}.reason.json").read_text())
    attempts = int(reason["set_aside"].split()[1])  # "failed N times while other episodes were accepted"
    assert reason["status"] == 500 and attempts >= 4 and "other episodes were accepted" in reason["set_aside"] and poison_ep.episode_id in aside.name


def test_a_server_that_fails_everything_sets_nothing_aside(tmp_path, tokens):
    server = _FailsOn(None)
    cfg = AgentConfig(server_url=server.url, spool_dir=str(tmp_path / "spool"), backoff_initial_s=0.01, backoff_max_s=0.02, max_attempts=2)
    agent = RobotAgent(cfg, "robot-a", token="t")
    for i in range(3):
        agent.submit(make(i))
    agent.start()
    try:
        wait_for(lambda: agent.status()["failed_attempts"] >= 12)
    finally:
        agent.stop()
        server.close()
    status = agent.status()
    assert status["set_aside"] == 0 and status["queue_depth"] == 3 and "HTTP 500" in status["last_error"]  # down, not the episodes


def test_the_agent_waits_as_long_as_the_servers_retry_after(tmp_path):
    server = _FailsOn(None, status=429, headers={"Retry-After": "3"})
    agent = RobotAgent(AgentConfig(server_url=server.url, spool_dir=str(tmp_path / "spool"), backoff_initial_s=0.01, backoff_max_s=10.0), "robot-a", token="t")
    agent.submit(make(1))
    try:
        assert agent.uploader.upload_once() == "retry"
        assert agent.uploader.backoff_s() >= 3.0  # not its own 0.01 s backoff
    finally:
        agent.stop()
        server.close()
    assert agent.status()["queue_depth"] == 1 and agent.status()["set_aside"] == 0


def test_flywheel_robot_app_records_spools_and_uploads(tmp_path, tokens):
    token_file, token = tokens
    store_cfg = StoreConfig(path=str(tmp_path / "store"))
    handle = serve(ServerConfig(port=0, token_file=str(token_file)), store_cfg)
    overrides = [
        "robot.robot_id=robot-a",
        "robot.model=pendulum",
        "robot.max_steps=25",
        "robot.profile.mass_scale=1.1",  # typed: no "+" (fleet/conf/schema_fleet.py)
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


def test_flywheel_robot_pulls_from_a_static_registry_without_its_token_and_uploads_to_the_fleet_server(tmp_path):
    """docs/security.md, Static hosting: policy.server_url names the host serving the registry; the robot's token (which
    uploads its episodes) goes only to the fleet server. flywheel-robot once had one URL for both: it sent the token with
    every TUF request to the static host, and its uploads went there too (501)."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler

    from fleet.registry.trust import PolicyTrust
    from tests.conftest import registry_server
    from tests.test_policy_pull_http import SPEC, exported

    registry, token, server = registry_server(tmp_path, "robot", "robot-a")
    weights, manifest = exported(tmp_path, "v1")
    registry.publish(weights, policy=manifest, **SPEC)
    site = tmp_path / "site" / "v1"  # <registry>/tuf/ served as <base>/v1/tuf/
    site.mkdir(parents=True)
    (site / "tuf").symlink_to(registry.root / "tuf", target_is_directory=True)
    seen = []

    class Static(SimpleHTTPRequestHandler):  # Python's static file server, unchanged but for a request log
        def log_message(self, *args):
            seen.append((self.command, self.path, self.headers.get("authorization")))

    static = ThreadingHTTPServer(("127.0.0.1", 0), partial(Static, directory=str(tmp_path / "site")))
    threading.Thread(target=static.serve_forever, daemon=True).start()
    overrides = [
        "robot.robot_id=robot-a", "robot.model=pendulum", "robot.max_steps=25", "episodes=3",
        f"fleet.agent.server_url={server.url}", f"policy.server_url=http://127.0.0.1:{static.server_address[1]}",
        f"policy.root={registry.root / 'tuf' / 'metadata' / 'root.json'}", f"policy.state_dir={tmp_path / 'policy'}",
        f"fleet.agent.spool_dir={tmp_path / 'spool'}", f"hydra.run.dir={tmp_path / 'hydra'}",
    ]  # fmt: skip
    try:
        out = subprocess.run([sys.executable, "-m", "fleet.apps.robot", *overrides], cwd=REPO, env={**os.environ, "FLYWHEEL_ROBOT_TOKEN": token},
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        server.stop()
        static.shutdown()
        static.server_close()
    assert out.returncode == 0, out.stderr[-3000:]
    status = json.loads(out.stdout.strip().splitlines()[-1])
    assert status["created"] == 3 and status["drained"] and status["refusals"] == {} and status["pull_errors"] == 0  # uploads: the fleet server
    assert PolicyTrust(**SPEC, state_dir=tmp_path / "policy").version == 1  # installed from the static host
    assert any("weights.safetensors" in path for _, path, _ in seen) and {method for method, _, _ in seen} == {"GET"}
    assert all(auth is None for _, _, auth in seen)  # the token never went there


def test_robot_side_imports_no_torch_ray_or_store():
    code = "import sys, fleet.agent.agent, fleet.apps.robot; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'zarr', 'icechunk', 'fastapi'}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_robot_app_says_what_it_did_not_upload(tmp_path):
    """What it could not deliver is a non-zero exit with the reason (the episodes stay spooled)."""
    out = subprocess.run([*_robot_app(tmp_path), "episodes=1", f"fleet.agent.spool_dir={tmp_path / 'spool'}"], cwd=REPO, env=_robot_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "1 episode(s) not uploaded within drain_timeout_s=1 s" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_the_robot_app_drops_episodes_larger_than_its_spool_and_says_so(tmp_path):
    out = subprocess.run([*_robot_app(tmp_path), "episodes=2", "fleet.agent.spool_max_bytes=300", f"fleet.agent.spool_dir={tmp_path / 'spool'}"],
                         cwd=REPO, env=_robot_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    status = json.loads(out.stdout.strip().splitlines()[-1])
    assert (status["episodes"], status["dropped"], status["too_large"], status["queue_depth"]) == (2, 2, 2, 0)
    assert "raise spool_max_bytes" in status["last_error"]


@pytest.mark.parametrize(
    "override, reason",
    [
        ("fleet.agent.server_url=notaurl", "is not an http:// or https:// URL"),  # once: ran, spooled, failed only when draining
        ("robot.profile.payload_mass=abc", "full_key: robot.profile.payload_mass"),  # typed: Hydra names the key (once a TypeError at start)
        ("policy.root=/nowhere/root.json", "policy.root /nowhere/root.json does not exist"),  # once: a bare "[Errno 2] ..."
        ("robot.robot_id=../../etc", "robot: robot id '../../etc' is not allowed"),  # once: its spool and log folders made outside first
        ("drain_timeout_s=-5", "drain_timeout_s must be >= 0 seconds"),  # once: accepted
    ],
)
def test_the_robot_app_refuses_what_cannot_work_before_it_records_anything(tmp_path, override, reason):
    out = subprocess.run([*_robot_app(tmp_path), "episodes=1", override, f"fleet.agent.spool_dir={tmp_path / 'spool'}"], cwd=REPO, env=_robot_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr and (reason is None or reason in out.stderr), out.stderr
    assert not (tmp_path / "spool").exists() and not (Path(REPO) / "runs" / "etc").exists()  # nothing recorded, nothing made outside


def test_a_token_is_read_from_its_file_or_variable_and_its_absence_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """One reader for the robot's token and the operator's (flywheel-registry rollback): they had two copies of it."""
    (tmp_path / "ok.tok").write_text(" t0k\n")
    (tmp_path / "empty.tok").write_text("\n")
    (tmp_path / "utf16.tok").write_text("t0k\n", encoding="utf-16")  # PowerShell 5's `echo t0k > file`: once a bare UnicodeDecodeError
    monkeypatch.setenv("FLYWHEEL_ROBOT_TOKEN", "from-env")
    assert AgentConfig(token_file=str(tmp_path / "ok.tok")).load_token() == "t0k" and AgentConfig().load_token() == "from-env"
    for file, says in (("missing.tok", "does not exist"), ("", "is a folder"), ("empty.tok", "is empty"), ("utf16.tok", "is not UTF-8 text")):
        path = tmp_path / file
        with pytest.raises(ValueError, match=f"^robot token file {re.escape(str(path))} {says}: write the token there( as plain UTF-8 text)? \\(create one with"):
            AgentConfig(token_file=str(path)).load_token()
    monkeypatch.setenv("FLYWHEEL_ROBOT_TOKEN", " ")
    with pytest.raises(ValueError, match=r"^no robot token: set \$FLYWHEEL_ROBOT_TOKEN or fleet.agent.token_file \(create one with"):
        AgentConfig().load_token()


def test_a_token_saved_with_a_bom_works_and_one_a_bearer_token_cannot_hold_is_refused_naming_its_file(tmp_path, monkeypatch):
    """Windows Notepad's "UTF-8 with BOM" gave "'ascii' codec can't encode character '\\ufeff'", naming no file; an
    unreadable file said to "write the token there"."""
    (tmp_path / "bom.tok").write_bytes("\ufefft0k\r\n".encode())
    assert AgentConfig(token_file=str(tmp_path / "bom.tok")).load_token() == "t0k"
    monkeypatch.setenv("FLYWHEEL_ROBOT_TOKEN", "\ufeffenv-t0k")
    assert AgentConfig().load_token() == "env-t0k"
    for name, text in (("latin.tok", "t\u00f6k"), ("header.tok", "Bearer t0k"), ("nul.tok", "t0k\x00")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"^robot token file {re.escape(str(tmp_path / name))} holds .* re-save it as plain text"):
            AgentConfig(token_file=str(tmp_path / name)).load_token()
    monkeypatch.setenv("FLYWHEEL_ROBOT_TOKEN", "t\u00a0k")
    with pytest.raises(ValueError, match=r"^\$FLYWHEEL_ROBOT_TOKEN \(robot token\) holds '\\xa0' at character 2"):
        AgentConfig().load_token()
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(ValueError, match=r"cannot be read \(Permission denied\): give (user|uid) .*read access to it \(chmod/chown\)$"):
        AgentConfig(token_file=str(tmp_path / "bom.tok")).load_token()


def test_a_secret_readable_by_every_user_is_warned_about_once_and_a_group_readable_one_is_not(tmp_path, caplog):
    """A token file or private key copied 0644 (scp, config management) was used without a word."""
    from fleet.registry.signing import generate_keypair, load_signer

    token, key = tmp_path / "robot.tok", tmp_path / "online.pem"
    token.write_text("t0k\n")
    generate_keypair(key)
    for mode in (0o640, 0o644):
        token.chmod(mode)
        key.chmod(mode)
        for _ in range(2):
            AgentConfig(token_file=str(token)).load_token()
            load_signer(key)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"robot token file {token} is readable by every user of this machine (mode 0644): `chmod 600` it (or 640, for a group "
                      "the service's user is in)", f"private key {key} is readable by every user of this machine (mode 0644): `chmod 600` it "
                      "(or 640, for a group the service's user is in)"]  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["ctrl_c", "sigterm", "sighup"])
def test_the_robot_app_stops_cleanly_on_ctrl_c_and_sigterm(tmp_path, sig):
    """episodes=0 ends on Ctrl-C, a service manager's SIGTERM or SIGHUP (a unit's `ExecReload=kill -HUP`, a closed
    terminal: it killed the robot on the spot): the status and one line, exit 130, no traceback; SIGINT too where the
    app inherited it ignored, as a shell's background job does."""
    spool = tmp_path / "spool"
    def ignore_sigint() -> None:  # as a shell's background job starts; SIGHUP as a terminal's job has it (not nohup's, where it is ignored)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    running = subprocess.Popen([*_robot_app(tmp_path), "episodes=0", f"fleet.agent.spool_dir={spool}"], cwd=REPO, env=_robot_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ignore_sigint)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(spool.rglob("*.safetensors")) and time.monotonic() < deadline:  # episodes are being made
            time.sleep(0.1)
        running.send_signal(sig)
        stdout, stderr = running.communicate(timeout=60)
    finally:
        running.kill()  # never left running, whatever failed
    assert running.returncode == 130 and "flywheel-robot: interrupted after" in stderr and "Traceback" not in stderr, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["interrupted"] is True


def _robot_app(tmp_path) -> list[str]:
    """flywheel-robot against a server address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    return [sys.executable, "-m", "fleet.apps.robot", "robot.model=pendulum", "robot.max_steps=25", f"fleet.agent.server_url={url}",
            f"hydra.run.dir={tmp_path / 'hydra'}", "drain_timeout_s=1"]  # fmt: skip


def _robot_env() -> dict[str, str]:
    return {**os.environ, "FLYWHEEL_ROBOT_TOKEN": "t"}


def _server(tmp_path: Path, token_file: Path):
    """A real fleet server on loopback with its store in ``tmp_path``."""
    return serve(ServerConfig(port=0, token_file=str(token_file)), StoreConfig(path=str(tmp_path / "store")))


def _quick_agent(url: str, spool: Path, token: str, **cfg) -> RobotAgent:
    """Robot "robot-a" uploading to ``url``, retrying within a fraction of a second."""
    return RobotAgent(AgentConfig(server_url=url, spool_dir=str(spool), backoff_initial_s=0.02, backoff_max_s=0.2, **cfg), "robot-a", token=token)


def _three_spooled(tmp_path: Path, tokens) -> tuple:
    """A real server and a quick agent with three episodes spooled (not started)."""
    token_file, token = tokens
    handle = _server(tmp_path, token_file)
    agent = _quick_agent(handle.url, tmp_path / "spool", token)
    for seed in range(3):
        assert agent.submit(make(seed))
    return handle, agent


def _drain(agent: RobotAgent, seconds: float = 30) -> None:
    """Start the agent, wait until its spool is uploaded, stop it."""
    agent.start()
    try:
        assert agent.wait_drained(seconds), agent.status()
    finally:
        agent.stop()


def test_a_spooled_file_deleted_from_outside_is_counted_lost_and_the_rest_upload(tmp_path, tokens, caplog):
    """A spool file removed behind the agent's back (an operator freeing space, a cleaner, a second agent on the same
    folder) stayed listed: upload_once read it again and again (RecursionError on every attempt) and uploaded nothing more."""
    handle, agent = _three_spooled(tmp_path, tokens)
    vanished = agent.spool.entries()[0]
    vanished.path.unlink()
    try:
        with caplog.at_level(logging.ERROR, logger="fleet.agent.spool"):
            _drain(agent)
    finally:
        handle.stop()
    status = agent.status()
    assert (status["created"], status["lost"], status["queue_depth"], status["failed_attempts"]) == (2, 1, 0, 0), status
    assert f"{vanished.path.name} vanished before it was uploaded" in caplog.text and "own spool_dir" in caplog.text


def _read_only_spool(monkeypatch, spool: Path) -> None:
    """The spool's disk remounted read-only (ext4 errors=remount-ro on a failing card): mounting one needs root, so the
    spool's write boundary (``_write_durably``) and its deletes raise EROFS, as such a disk does; reads work."""
    import errno

    import fleet.agent.spool as spool_module

    def refuse(path, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path) + ".partial")

    real_unlink = Path.unlink

    def unlink(path, missing_ok=False):
        if spool in path.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(spool_module, "_write_durably", refuse)
    monkeypatch.setattr(Path, "unlink", unlink)


def _blocked_partial(monkeypatch, spool: Path) -> None:
    """A real write error with no root needed: a folder where the spool's next ``.partial`` file goes (EISDIR)."""
    import fleet.agent.spool as spool_module

    real_put = spool_module.Spool.put

    def put(self, data, episode_id):
        (self.directory / f"{self._seq:020d}-{episode_id}.safetensors.partial").mkdir()
        return real_put(self, data, episode_id)

    monkeypatch.setattr(spool_module.Spool, "put", put)


@pytest.mark.parametrize("fault, reason", [(_read_only_spool, "EROFS"), (_blocked_partial, "EISDIR")], ids=["read_only", "eisdir"])
def test_a_spool_disk_refusing_writes_drops_the_episode_and_the_spooled_ones_still_upload(tmp_path, tokens, caplog, monkeypatch, fault, reason):
    """Spool.put re-raised every write error but a full disk, and submit caught only that: a spool disk remounted read-only
    (EROFS; EIO, EACCES alike) ended flywheel-robot at its next episode, and recording stopped with it."""
    token_file, token = tokens
    spool = tmp_path / "spool"
    handle = _server(tmp_path, token_file)
    agent = _quick_agent(handle.url, spool, token)
    for seed in range(2):
        assert agent.submit(make(seed))
    with monkeypatch.context() as patched:
        fault(patched, spool)
        with caplog.at_level(logging.ERROR, logger="fleet.agent.agent"):
            assert not agent.submit(make(2)) and not agent.submit(make(3))  # dropped, the robot goes on
        _drain(agent)  # what was spooled before still uploads
    handle.stop()
    status = agent.status()
    assert (status["created"], status["dropped"], status["dropped_by_reason"], status["too_large"]) == (2, 2, {reason: 2}, 0), status
    assert f"{spool / 'robot-a'}" in caplog.text and f"({reason}, errno" in caplog.text and "spool_dir" in caplog.text


def test_a_full_spool_on_a_read_only_disk_drops_the_new_episode_and_keeps_its_queue(tmp_path, tokens, caplog, monkeypatch):
    """A full spool makes room by deleting its oldest episode: that episode left the queue before its delete, and on a
    disk remounted read-only the delete failed (EROFS), so it was counted nowhere and did not upload in this process;
    the log said the spool could not *write* the sidecar it was deleting."""
    token_file, token = tokens
    spool = tmp_path / "spool"
    handle = _server(tmp_path, token_file)
    size = len(make(0).to_bytes())
    agent = _quick_agent(handle.url, spool, token, spool_max_bytes=2 * size + 10)
    assert agent.submit(make(0)) and agent.submit(make(1))  # the spool is full
    queued = agent.spool.entries()
    with monkeypatch.context() as patched:
        _read_only_spool(patched, spool)
        with caplog.at_level(logging.ERROR, logger="fleet.agent.agent"):
            assert not agent.submit(make(2)) and not agent.submit(make(3))  # dropped: the robot goes on
        assert (agent.spool.entries(), agent.spool.evicted, agent.spool.lost, agent.dropped_by_reason) == (queued, 0, 0, {"EROFS": 2})
        assert f"could not delete the oldest episode {queued[0].path} to make room (EROFS" in caplog.text and "could not write" not in caplog.text
        _drain(agent)
    handle.stop()
    status = agent.status()
    assert (status["created"], status["evicted"], status["lost"], status["dropped"]) == (2, 0, 0, 2), status


def test_a_resumable_episode_on_a_read_only_disk_uploads_and_does_not_block_the_queue(tmp_path, tokens, caplog, monkeypatch):
    """An episode over resumable_threshold_bytes writes its upload sidecar first: on a disk remounted read-only that
    raised EROFS on every attempt, and the failed attempt did not move it behind the others: nothing uploaded."""
    token_file, token = tokens
    spool = tmp_path / "spool"
    handle = _server(tmp_path, token_file)
    big, small = make(0, steps=400), make(1)
    threshold = len(small.to_bytes()) + 1  # the big one goes resumable, the small one in one POST
    agent = _quick_agent(handle.url, spool, token, resumable_threshold_bytes=threshold)
    assert agent.submit(big) and agent.submit(small)
    with monkeypatch.context() as patched:
        _read_only_spool(patched, spool)
        with caplog.at_level(logging.WARNING, logger="fleet.agent.spool"):
            _drain(agent, 15)
    handle.stop()
    status = agent.status()
    assert (status["created"], status["failed_attempts"]) == (2, 0), status
    assert f"could not write the upload sidecar of episode {big.episode_id}" in caplog.text


def test_an_episode_whose_attempt_raises_goes_behind_the_others(tmp_path, tokens, monkeypatch):
    """An attempt that raised (a spooled file on a failing card: EIO on read) was counted as failed but not moved behind
    the others, as an answered failure is: the next attempt took the same episode, and nothing behind it uploaded."""
    import errno

    handle, agent = _three_spooled(tmp_path, tokens)
    unreadable = agent.spool.entries()[0]
    real_read = Spool.read

    def read(self, entry):
        if entry == unreadable:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(entry.path))
        return real_read(self, entry)

    monkeypatch.setattr(Spool, "read", read)
    try:
        agent.start()
        wait_for(lambda: agent.status()["created"] == 2, timeout=15)
    finally:
        agent.stop()
        handle.stop()
    status = agent.status()
    assert agent.spool.entries() == [unreadable] and "Input/output error" in status["last_error"], status
