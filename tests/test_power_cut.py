"""Power cuts, counted: SIGKILL a robot in the middle of policy swaps 100 times, and the server in
the middle of policy publication 10 times. After every restart the robot has a loadable policy it
trusts, never a lower version than before; the server serves no half-published version and loses
no acknowledged one. Real processes (forked from a clean forkserver), real HTTP, real files."""

from __future__ import annotations

import base64
import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import torch

from fleet.agent.policy import builtin_policy
from fleet.registry.manifest import sha256_hex
from fleet.registry.pull import SignedPolicySource
from fleet.registry.signing import generate_keypair, load_private_key, load_public_key, verify
from fleet.registry.store import PolicyRegistry
from fleet.registry.trust import PolicyTrust
from fleet.server.auth import add_token
from fleet.server.config import ServerConfig
from fleet.server.runner import serve
from fleet.store import StoreConfig
from policies.export import export_policy
from policies.networks import Policy, PolicySpec
from policies.runtime import WEIGHTS_FILE, load_policy_bytes
from tests.conftest import registry_server

SPEC = {"robot_model": "pendulum", "obs_dim": 4, "act_dim": 1}
ROBOT_KILLS, SERVER_KILLS = 100, 10


def _weights(tmp_path: Path, count: int = 4) -> list[tuple[bytes, dict]]:
    """``count`` distinct small exported pendulum policies (weights, exporter manifest)."""
    out = []
    for i in range(count):
        torch.manual_seed(i)
        policy = Policy(PolicySpec(4, 1, (16,), "tanh", False))
        manifest = export_policy(policy, tmp_path / f"p{i}", robot_model="pendulum", policy_version=f"p{i}", algorithm="sac")
        out.append(((tmp_path / f"p{i}" / WEIGHTS_FILE).read_bytes(), manifest))
    return out


def _context():
    ctx = multiprocessing.get_context("forkserver")  # children fork from a clean, single-threaded server process
    ctx.set_forkserver_preload([__name__])
    return ctx


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)


# -- the robot ------------------------------------------------------------------------------
def _robot_polls_forever(url: str, token: str, public_key: str, state_dir: str, ready) -> None:
    trust = PolicyTrust(load_public_key(public_key), **SPEC, state_dir=Path(state_dir))
    source = SignedPolicySource(url, token, "robot-0", trust, builtin_policy("zero", 1).current(), poll_interval_s=0.0)
    ready.set()
    while True:
        source.poll()


def _restarted(public_key: Path, state_dir: Path) -> tuple[int, str]:
    """What a robot finds after a power cut: (trusted version, the version of the policy it runs)."""
    trust = PolicyTrust(load_public_key(public_key), **SPEC, state_dir=state_dir)
    if trust.manifest is None:
        return 0, "zero"
    load_policy_bytes(trust.manifest["policy"], trust.trusted_weights(), **SPEC)  # intact and loadable, or raises
    source = SignedPolicySource("http://127.0.0.1:9", "unused", "robot-0", trust, builtin_policy("zero", 1).current(), request_timeout_s=0.5)
    try:
        return trust.version, source.current().version  # its poll finds no server: it runs what it trusts
    finally:
        source.close()


def test_a_robot_killed_mid_swap_restarts_on_a_trusted_policy_never_lower(tmp_path):
    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    variants, stop = _weights(tmp_path), threading.Event()

    def publish_continuously():  # a new version every few ms: the robot is nearly always mid-swap
        i = 0
        while not stop.is_set():
            weights, manifest = variants[i % len(variants)]
            registry.publish(weights, policy=manifest, **SPEC)
            i += 1
            time.sleep(0.003)

    publisher = threading.Thread(target=publish_continuously, daemon=True)
    publisher.start()
    ctx, rng, state = _context(), random.Random(0), tmp_path / "robot"
    last, mid_write, versions = 0, 0, []
    try:
        for _ in range(ROBOT_KILLS):
            ready = ctx.Event()
            proc = ctx.Process(target=_robot_polls_forever, args=(server.url, token, str(tmp_path / "k.pub"), str(state), ready), daemon=True)
            proc.start()
            assert ready.wait(30), "the robot process did not start"
            time.sleep(rng.uniform(0.005, 0.04))
            _kill(proc)
            mid_write += any(state.glob("*.tmp")) or len(list(state.glob("weights*.safetensors"))) > 1
            version, running = _restarted(tmp_path / "k.pub", state)
            assert version >= last, f"restart found v{version} after v{last}: a lower version"
            assert running == (str(version) if version else "zero"), f"trusted v{version} but runs {running}"
            last = version
            versions.append(version)
    finally:
        stop.set()
        publisher.join(10)
        server.stop()
    assert len(set(versions)) >= ROBOT_KILLS // 4, f"too few swaps between kills to test anything: {versions}"
    print(f"robot: {ROBOT_KILLS} kills, {len(set(versions))} distinct trusted versions, {mid_write} caught a swap's files mid-write")


# -- the server -----------------------------------------------------------------------------
def _server_forever(root: str, token_file: str, key: str, urls) -> None:
    registry = PolicyRegistry(Path(root) / "registry", load_private_key(key))
    server = serve(ServerConfig(port=0, token_file=token_file), StoreConfig(path=str(Path(root) / "store")), policy_registry=registry)
    urls.put(server.url)
    while True:
        time.sleep(60)


def test_a_server_killed_mid_publication_serves_no_half_version_and_keeps_every_acknowledged_one(tmp_path):
    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    public = load_public_key(tmp_path / "k.pub")
    tokens = tmp_path / "tokens.json"
    publisher, robot = add_token(tokens, "publisher"), add_token(tokens, "robot", "robot-0")
    variants = _weights(tmp_path)
    ctx, rng = _context(), random.Random(1)
    acknowledged: dict[int, str] = {}  # version -> sha256 of its weights, for every 201 the publisher got
    for cycle in range(SERVER_KILLS + 1):
        urls = ctx.Queue()
        proc = ctx.Process(target=_server_forever, args=(str(tmp_path), str(tokens), str(tmp_path / "k.pem"), urls), daemon=True)
        proc.start()
        url = urls.get(timeout=60)
        with httpx.Client(base_url=url, timeout=10) as client:
            # after each restart: everything acknowledged is served, whole and correctly signed
            head = {"Authorization": f"Bearer {robot}"}
            for version, digest in acknowledged.items():
                weights = client.get(f"/v1/policies/{version}/weights", headers=head)
                assert weights.status_code == 200 and sha256_hex(weights.content) == digest, f"acknowledged v{version} lost or torn"
            latest = client.get("/v1/policies/latest", params={"robot_id": "robot-0"}, headers=head)
            if acknowledged:
                manifest = verify(latest.json(), public)
                assert manifest["version"] >= max(acknowledged)
                served = client.get(f"/v1/policies/{manifest['version']}/weights", headers=head)
                assert sha256_hex(served.content) == manifest["weights"]["sha256"]
            if cycle == SERVER_KILLS:
                _kill(proc)
                break
            killer = threading.Timer(rng.uniform(0.02, 0.25), _kill, args=(proc,))
            killer.start()
            for i in range(10_000):
                weights, manifest = variants[i % len(variants)]
                body = {"weights_b64": base64.b64encode(weights).decode(), "policy": manifest, **SPEC}
                try:
                    response = client.post("/v1/policies", json=body, headers={"Authorization": f"Bearer {publisher}"})
                except httpx.HTTPError:
                    break  # the power cut: this publication was never acknowledged
                assert response.status_code == 201, response.text
                manifest = verify(response.json(), public)
                acknowledged[manifest["version"]] = manifest["weights"]["sha256"]
            killer.join()
    assert len(acknowledged) > SERVER_KILLS, f"too few publications between kills: {len(acknowledged)}"
