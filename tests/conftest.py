"""Shared fixtures. Tests use real MuJoCo, real files, real servers; nothing here mocks them."""

import os
import time

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering (set before mujoco is imported)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_sessionstart(session):
    """Register the Hydra config schemas (the YAML's defaults name them) before any test composes
    conf/: here, after the environment above is set, since the schemas import mujoco, torch and Ray.
    A machine without Hydra runs only the tests that need no config: a bare GPU machine runs
    tests/test_gpu.py with the few packages it carries (docs/benchmarks.md, "GPU")."""
    try:
        import hydra  # noqa: F401
    except ImportError:
        return
    import fleet.conf.schema_flywheel  # noqa: F401


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="requires a CUDA GPU (none on this machine)")
    for item in items:
        if "requires_gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def no_ca_bundle(tmp_path_factory):
    """Every test speaks plain HTTP on loopback, yet each httpx client loads a CA bundle (~55 ms; the power-cut
    test alone makes ~200 clients). An empty CA folder loads nothing; the robots, servers and Ray workers the
    tests start inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SSL_CERT_FILE", raising=False)  # httpx reads it before SSL_CERT_DIR
        mp.setenv("SSL_CERT_DIR", str(tmp_path_factory.mktemp("no-ca")))
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """2 shared cores: one intra-op torch thread avoids OpenMP spin-waits when other work runs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def local_ray():
    """Local Ray on both cores (the ``ray`` module). Consecutive tests that use it share one start (~3-5 s);
    it is shut down after the last of them (pytest_runtest_teardown below), so no other test runs beside it."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    return ray


def pytest_runtest_teardown(item, nextitem):
    if "local_ray" in item.fixturenames and (nextitem is None or "local_ray" not in nextitem.fixturenames):
        import ray

        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server (moto's standalone mode, a registry package) on loopback, started
    here and stopped by its pid, with a bucket ``fleet``; the AWS_* variables point every client
    (the store's Icechunk, and the servers and robots the tests start) at it. Yields its URL."""
    with open(tmp_path_factory.mktemp("s3") / "moto.log", "wb") as log:  # closed however the start ends
        proc, url = start_moto(log)
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "flywheel-test", "AWS_SECRET_ACCESS_KEY": "flywheel-test", "AWS_REGION": "us-east-1"}
        try:
            with pytest.MonkeyPatch.context() as mp:
                for k, v in env.items():
                    mp.setenv(k, v)
                mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
                yield url
        finally:
            stop_moto(proc)


def start_moto(log) -> tuple:
    """moto's S3 server on a free loopback port, answering, with a bucket ``fleet``: (its process, its URL). A start
    that fails (moto not answering, the bucket refused) stops the process before it raises."""
    import socket
    import subprocess
    import sys

    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(proc, port, url)
        boto3.client("s3", endpoint_url=url, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1").create_bucket(Bucket="fleet")
    except BaseException:
        stop_moto(proc)
        raise
    return proc, url


def wait_until_answering(proc, port: int, url: str, timeout_s: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"moto's S3 server did not start on {url}: see moto.log") from None
            time.sleep(0.1)


def stop_moto(proc) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def tampered_bytes(ep, arrays=None, meta=None, drop=()) -> bytes:
    """Wire bytes of ``ep`` with arrays/metadata replaced or dropped, not validated (the encoder does not
    validate): what a faulty or hostile client could send."""
    from sim.episode import encode_safetensors

    a = {**ep.arrays(), **(arrays or {})}
    m = {**ep.metadata, **(meta or {})}
    for key in drop:
        a.pop(key, None)
        m.pop(key, None)
    return encode_safetensors(a, m)


def make_episode_arrays(num_steps: int = 5, obs_dim: int = 3, act_dim: int = 2, seed: int = 0) -> dict:
    """Valid schema-v1 arrays of a small random episode (terminated at its last step)."""
    r = np.random.default_rng(seed)
    terminated = np.zeros(num_steps, bool)
    terminated[-1] = True
    return {
        "observation": r.standard_normal((num_steps + 1, obs_dim)).astype(np.float32),
        "action": r.uniform(-1, 1, (num_steps, act_dim)).astype(np.float32),
        "reward": r.standard_normal(num_steps).astype(np.float32),
        "terminated": terminated,
        "truncated": np.zeros(num_steps, bool),
        "timestamp": np.arange(num_steps + 1, dtype=np.float64) * 0.05,
    }


def forward_get(handler, upstream):
    """``upstream``'s answer (an httpx client on the flywheel server) to the GET a test's HTTP proxy ``handler`` received,
    sent on with the robot's token and its conditional and range headers."""
    kept = ("authorization", "range", "if-range", "if-none-match")
    return upstream.get(handler.path, headers={k: v for k, v in handler.headers.items() if k.lower() in kept})


def registry_server(tmp_path, role: str, robot_id: str | None = None, **registry_kwargs):
    """A TUF policy registry (root keys ``tmp_path/keys/root-{1,2,3}.pem``, threshold 2, online key
    ``keys/online.pem``) and the fleet server serving it on loopback, with one token of ``role``:
    (registry, token, server handle). Robots trust ``registry.root / "tuf/metadata/root.json"``."""
    from fleet.registry.store import open_registry
    from fleet.server.auth import add_token
    from fleet.server.config import ServerConfig
    from fleet.server.runner import serve
    from fleet.store import StoreConfig

    keys = tmp_path / "keys"
    registry = open_registry(tmp_path / "registry", keys / "online.pem", root_keys=[keys / f"root-{i}.pem" for i in (1, 2, 3)], **registry_kwargs)
    tokens = tmp_path / "tokens.json"
    token = add_token(tokens, role, robot_id)
    server = serve(ServerConfig(port=0, token_file=str(tokens)), StoreConfig(path=str(tmp_path / "store")), policy_registry=registry)
    return registry, token, server
