"""Power cuts, counted: SIGKILL a robot in the middle of policy swaps 100 times, and the server in
the middle of policy publication 10 times. After every restart the robot has a loadable policy it
trusts, never a lower version than before; the server serves no half-published version (TUF's
client verifies what it serves) and loses no acknowledged one. Real processes (forked from a
clean forkserver), real HTTP, real files."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx

from fleet.agent.policy import builtin_policy
from fleet.registry.manifest import ROLLOUT_TARGET, manifest_target, weights_target
from fleet.registry.pull import SignedPolicySource
from fleet.registry.store import open_registry, root_metadata
from fleet.registry.trust import PolicyTrust
from fleet.server.auth import add_token
from fleet.server.config import ServerConfig
from fleet.server.runner import serve
from fleet.store import StoreConfig
from policies.runtime import WEIGHTS_FILE, load_policy_bytes
from tests.conftest import registry_server

SPEC = {"robot_model": "pendulum", "obs_dim": 4, "act_dim": 1}
ROBOT_KILLS, SERVER_KILLS = 100, 10


def _weights(tmp_path: Path, count: int = 4) -> list[tuple[bytes, dict]]:
    """``count`` distinct small exported pendulum policies (weights, exporter manifest)."""
    import torch  # only here: the forkserver preloads this module, and the robots it forks load no torch (nor do real ones)

    from policies.export import export_policy
    from policies.networks import Policy, PolicySpec

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
def _robot(url: str, token: str, root: Path, state_dir: Path, **kwargs) -> SignedPolicySource:
    trust = PolicyTrust(**SPEC, state_dir=state_dir)
    return SignedPolicySource(url, token, "robot-0", trust, builtin_policy("zero", 1).current(), root=root.read_bytes(), **kwargs)


def _robot_polls_forever(url: str, token: str, root: str, state_dir: str, ready) -> None:
    source = _robot(url, token, Path(root), Path(state_dir))
    ready.set()
    while True:
        source.poll()


def _restarted(root: Path, state_dir: Path) -> tuple[int, str]:
    """What a robot finds after a power cut: (trusted version, the version of the policy it runs)."""
    trust = PolicyTrust(**SPEC, state_dir=state_dir)
    if trust.manifest is None:
        return 0, "zero"
    load_policy_bytes(trust.manifest["policy"], trust.trusted_weights(), **SPEC)  # intact and loadable, or raises
    source = _robot("http://127.0.0.1:9", "unused", root, state_dir, request_timeout_s=0.5)
    try:
        return trust.version, source.current().version  # its poll finds no server: it runs what it trusts
    finally:
        source.close()


def test_a_robot_killed_mid_swap_restarts_on_a_trusted_policy_never_lower(tmp_path):
    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    root = tmp_path / "root.json"
    root.write_bytes(root_metadata(tmp_path / "registry"))
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
            proc = ctx.Process(target=_robot_polls_forever, args=(server.url, token, str(root), str(state), ready), daemon=True)
            proc.start()
            assert ready.wait(30), "the robot process did not start"
            time.sleep(rng.uniform(0.02, 0.2))  # a TUF update takes 60-120 ms here: kills land in every phase of it
            _kill(proc)
            mid_write += any(state.glob("*.tmp")) or len(list(state.glob("weights*.safetensors"))) > 1
            version, running = _restarted(root, state)
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
def _server_forever(root: str, token_file: str, urls) -> None:
    keys = Path(root) / "keys"
    registry = open_registry(Path(root) / "registry", keys / "online.pem", root_keys=[keys / f"root-{i}.pem" for i in (1, 2, 3)])
    server = serve(ServerConfig(port=0, token_file=token_file), StoreConfig(path=str(Path(root) / "store")), policy_registry=registry)
    urls.put(server.url)
    while True:
        time.sleep(60)


def _served(url: str, token: str, root: Path, metadata_dir: Path) -> tuple[int | None, dict[int, str]]:
    """What a robot's TUF client gets from the server: (stable version, {listed version: weights sha256}),
    every listed manifest and weights file downloaded and verified (raises if anything is torn)."""
    from tuf.ngclient import Updater

    from fleet.registry.pull import TokenFetcher

    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
        updater = Updater(str(metadata_dir), f"{url}/v1/tuf/metadata/", str(metadata_dir / "t"), f"{url}/v1/tuf/targets/", TokenFetcher(client), bootstrap=root.read_bytes())
        updater.refresh()
        rollout_info = updater.get_targetinfo(ROLLOUT_TARGET)
        if rollout_info is None:
            return None, {}
        rollout = json.loads(Path(updater.download_target(rollout_info)).read_bytes())
        listed = {}
        for path in updater._trusted_set.targets.targets:  # every listed version, whole
            if path.endswith("/manifest.json"):
                version = int(path.split("/")[1])
                manifest = json.loads(Path(updater.download_target(updater.get_targetinfo(manifest_target(version)))).read_bytes())
                weights = updater.get_targetinfo(weights_target(version))
                updater.download_target(weights)  # length and sha256 checked
                assert weights.hashes["sha256"] == manifest["weights"]["sha256"], f"v{version}'s manifest and weights differ"
                listed[version] = manifest["weights"]["sha256"]
        return rollout["stable"], listed


def test_a_server_killed_mid_publication_serves_no_half_version_and_keeps_every_acknowledged_one(tmp_path):
    tokens = tmp_path / "tokens.json"
    publisher, robot = add_token(tokens, "publisher"), add_token(tokens, "robot", "robot-0")
    variants = _weights(tmp_path)
    ctx, rng = _context(), random.Random(1)
    acknowledged: dict[int, str] = {}  # version -> sha256 of its weights, for every 201 the publisher got
    root = tmp_path / "registry" / "tuf" / "metadata" / "1.root.json"
    for cycle in range(SERVER_KILLS + 1):
        urls = ctx.Queue()
        proc = ctx.Process(target=_server_forever, args=(str(tmp_path), str(tokens), urls), daemon=True)
        proc.start()
        url = urls.get(timeout=60)
        # after each restart a robot's TUF client gets everything acknowledged: the newest as stable,
        # each still listed one whole (older ones leave the listing by design, KEEP_VERSIONS)
        stable, listed = _served(url, robot, root, tmp_path / f"client-{cycle}")
        if acknowledged:
            assert stable is not None and stable >= max(acknowledged), f"acknowledged v{max(acknowledged)} lost: stable is v{stable}"
            for version, digest in listed.items():
                assert acknowledged.get(version, digest) == digest, f"v{version} served with other weights than acknowledged"
            assert max(acknowledged) in listed or stable > max(acknowledged)
        with httpx.Client(base_url=url, timeout=10) as client:
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
                acknowledged[response.json()["manifest"]["version"]] = response.json()["manifest"]["weights"]["sha256"]
            killer.join()
    assert len(acknowledged) > SERVER_KILLS, f"too few publications between kills: {len(acknowledged)}"
