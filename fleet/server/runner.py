"""Starting the server: blocking (the Hydra app), in-process (tests, benchmarks), or as a child process.

* :func:`run` - open the store, load the episode-id index, serve until SIGINT/SIGTERM.
* :func:`serve` - the same on a background thread; returns a :class:`ServerHandle` (``.url``, ``.stop()``).
* :class:`ServerProcess` - ``flywheel-server`` in its own process (``.kill()`` sends SIGKILL).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from fleet.server.app import RoutesFactory, create_app
from fleet.server.auth import TokenRegistry
from fleet.server.config import ServerConfig
from fleet.server.protocol import protocol_class
from fleet.store.config import StoreConfig
from fleet.store.writer import EpisodeStore

log = logging.getLogger(__name__)


def bind_socket(config: ServerConfig) -> socket.socket:
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every response waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {config.host}:{config.port} ({exc.strerror}); set fleet.server.port (or fleet.server.host) to a free port of an address this machine has") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _with_registry(routes: RoutesFactory | None, policy_registry, server: ServerConfig) -> RoutesFactory | None:
    """Add the policy registry's endpoints (fleet.registry) to ``routes`` when a registry is given."""
    if policy_registry is None:
        return routes
    from fleet.registry.routes import policy_router

    return lambda tokens: [*(routes(tokens) if routes is not None else ()), policy_router(policy_registry, tokens, server.body_timeout_s)]


def _build(server: ServerConfig, store_cfg: StoreConfig, on_ready=None, routes: RoutesFactory | None = None) -> uvicorn.Server:
    """The server over the opened store; its ``ready_file``, where set, is removed at a clean shutdown."""
    store = EpisodeStore.open_or_create(store_cfg)
    if store.created_here:  # a mistyped fleet.store.path would split the fleet's data over two stores: say so at every first start
        where = store.location.path.absolute() if store.location.is_local else store.location  # a relative path: relative to what, in a journal?
        log.warning("created a new, empty episode store at %s (fleet.store.path): if the fleet's store is elsewhere, stop and fix the path", where)
    if not store_cfg.writer_id and not store.location.is_local:
        log.warning(
            "fleet.store.writer_id is not set: this replica writes to the store as %s, a new id each start, so each restart adds a "
            "catalog partition and streams; give each long-lived replica a stable id (its pod or host name: fleet.store.writer_id=replica-3)",
            store.writer_id,
        )
    store.refresh_index()  # idempotency across restarts: every stored episode_id is known before the first upload
    tokens = TokenRegistry(server.token_file)
    on_stop = (lambda: _remove_ready(server.ready_file)) if server.ready_file else None
    app = create_app(server, store, tokens, on_ready=on_ready, on_stop=on_stop, routes=routes)
    config = uvicorn.Config(app, log_level=server.log_level, access_log=False, lifespan="on", timeout_keep_alive=30, http=protocol_class(server.head_timeout_s, app.state.metrics.rejected))
    return uvicorn.Server(config)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


def check_ready_file(path: str | None) -> None:
    """ValueError, at the start with the other settings, where ``fleet.server.ready_file`` cannot be written (once
    the server printed "listening", then failed with a traceback): its folder, or the nearest one there to make it
    in, must be a folder this process can write in."""
    if not path:
        return
    ready = Path(path)
    if ready.is_dir():
        raise ValueError(f"fleet.server.ready_file {ready} is a folder: give a file path (e.g. {ready / 'server.json'})")
    folder = next(p for p in (ready.absolute().parent, *ready.absolute().parents) if p.exists() or p == p.parent)
    try:
        if not folder.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.TemporaryFile(dir=folder):  # the real test: modes, ACLs, a read-only mount (leaves nothing behind)
            pass
    except OSError as exc:
        raise ValueError(f"fleet.server.ready_file {ready}: cannot write in {folder} ({exc.strerror or exc}); give a path in a folder this "
                         "server's user can write, or leave it unset") from None  # fmt: skip


def _remove_ready(path: str) -> None:
    """Remove the ready file at a clean shutdown, where it still holds this process's pid (not a newer server's)."""
    try:
        if json.loads(Path(path).read_text()).get("pid") == os.getpid():
            Path(path).unlink()
    except (OSError, ValueError, AttributeError):  # gone, or not ours to remove
        pass


def _write_ready(path: str, url: str) -> None:
    ready = Path(path)
    ready.parent.mkdir(parents=True, exist_ok=True)
    tmp = ready.with_name(f".{ready.name}.tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    os.replace(tmp, ready)


def run(server: ServerConfig, store_cfg: StoreConfig, routes: RoutesFactory | None = None, policy_registry=None, sock: socket.socket | None = None) -> None:
    """Serve in the foreground until SIGINT/SIGTERM; queued uploads are committed before exit.

    routes: extra endpoints sharing the server's tokens (see :func:`fleet.server.app.create_app`);
    policy_registry: a ``fleet.registry.store.PolicyRegistry`` whose endpoints to serve too;
    sock: the listening socket, if the caller bound it already (:func:`bind_socket`).
    """
    routes = _with_registry(routes, policy_registry, server)
    check_ready_file(server.ready_file)
    sock = sock if sock is not None else bind_socket(server)
    url = url_of(sock)

    def ready():
        print(f"flywheel-server listening on {url} (store {store_cfg.path})", flush=True)
        if server.ready_file:
            _write_ready(server.ready_file, url)

    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # a unit's ExecReload=kill -HUP, a closed terminal (not nohup):
        signal.signal(signal.SIGHUP, lambda *_: signal.raise_signal(signal.SIGTERM))  # a clean stop, not SIGHUP's default kill
    _build(server, store_cfg, on_ready=ready, routes=routes).run(sockets=[sock])


def _sighup_default() -> None:
    """A child server's SIGHUP as a service's is (it stops cleanly), also where this process ignores it (``nohup``)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@dataclasses.dataclass
class ServerHandle:
    """A server running on a background thread of this process."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def app(self):
        return self.server.config.app

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"server {self.url} did not stop within {timeout}s")


def serve(
    server: ServerConfig, store_cfg: StoreConfig, timeout: float = 30.0, routes: RoutesFactory | None = None, policy_registry=None
) -> ServerHandle:
    """Start a server on a background thread; returns once it accepts connections, with ``server.ready_file`` written
    where set, as :func:`run` writes it (``routes``, ``policy_registry``: see :func:`run`)."""
    check_ready_file(server.ready_file)
    sock = bind_socket(server)
    uv = _build(server, store_cfg, routes=_with_registry(routes, policy_registry, server))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="flywheel-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            uv.should_exit = True
            raise RuntimeError(f"server on {url_of(sock)} failed to start within {timeout}s (see the log above)")
        time.sleep(0.01)
    if server.ready_file:
        _write_ready(server.ready_file, url_of(sock))
    return ServerHandle(url_of(sock), uv, thread)


class ServerProcess:
    """``flywheel-server`` (the Hydra app) as a child process, for crash tests and benchmarks."""

    def __init__(self, store_cfg: StoreConfig, server: ServerConfig, workdir: str | Path, extra_overrides: Sequence[str] = ()):
        self.store_cfg, self.server = store_cfg, server
        self.workdir = Path(workdir)
        self.ready_file = self.workdir / "server.ready.json"
        self.extra = list(extra_overrides)
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def overrides(self) -> list[str]:
        s, st = self.server, self.store_cfg
        return [
            f"fleet.server.host={s.host}",
            f"fleet.server.port={s.port}",
            f"fleet.server.token_file={s.token_file}",
            f"fleet.server.max_body_bytes={s.max_body_bytes}",
            f"fleet.server.commit_wait_ms={s.commit_wait_ms}",
            f"fleet.server.commit_rejoin_ms={s.commit_rejoin_ms}",
            f"fleet.server.commit_timeout_s={s.commit_timeout_s}",
            f"fleet.server.body_timeout_s={s.body_timeout_s}",
            f"fleet.server.max_concurrent_uploads={s.max_concurrent_uploads}",
            f"fleet.server.upload_rate_per_s={s.upload_rate_per_s}",
            f"fleet.server.upload_burst={s.upload_burst}",
            f"fleet.server.ready_file={self.ready_file}",
            f"fleet.store.path={st.path}",
            f"fleet.store.chunk_rows={st.chunk_rows}",
            f"fleet.store.index_rows={st.index_rows}",
            f"fleet.store.compression={st.compression}",
            f"fleet.store.fsync={str(st.fsync).lower()}",
            *([f"fleet.store.writer_id={st.writer_id}"] if st.writer_id else []),  # a replica's stable id: a restart reuses its partition
            f"hydra.run.dir={self.workdir / 'hydra'}",
            "hydra.output_subdir=null",
            *self.extra,
        ]

    def start(self, timeout: float = 60.0) -> str:
        """Launch and wait until the server accepts connections; returns its URL."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        log = open(self.workdir / "server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "fleet.apps.server", *self.overrides()], stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=_sighup_default)  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                tail = (self.workdir / "server.log").read_text()[-3000:]
                raise RuntimeError(f"flywheel-server exited with {self.proc.returncode} before it was ready:\n{tail}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"flywheel-server not ready within {timeout}s; log: {self.workdir / 'server.log'}")
            time.sleep(0.02)
        self.url = json.loads(self.ready_file.read_text())["url"]
        return self.url

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (what a power cut or OOM kill looks like to the store)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30.0, sig: signal.Signals = signal.SIGTERM) -> int:
        """SIGTERM (graceful: queued uploads are committed; SIGHUP too), then wait."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise TimeoutError(f"flywheel-server did not stop within {timeout}s of SIGTERM; killed it") from None
        return self.proc.returncode
