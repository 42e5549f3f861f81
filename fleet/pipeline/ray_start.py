"""Starting or joining Ray for a flywheel run: the address every Ray process binds and advertises
(loopback for the embedded local Ray), Ray's token authentication, and what to do when joining
a cluster fails (docs/scale.md, "Ray cluster")."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import ray
from omegaconf import DictConfig, OmegaConf
from ray.exceptions import AuthenticationError

from fleet.conf import CONF_DIR
from sim.robots.registry import MODULES_ENV

log = logging.getLogger(__name__)
AUTH_MODE_ENV, TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"  # Ray's own variables
AUTH_MODES = ("token", "disabled")  # RAY_AUTH_MODE's values
SINGLE_HOST_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's: 0 runs it as a single-host Ray (single_host_ray)
LOCAL_ONLY = ("num_cpus", "object_store_memory", "include_dashboard")  # ray.init's for a Ray of this run's own: a cluster's nodes have their own


def start_ray(cfg: DictConfig) -> bool:
    """Start (or join) Ray once per process; True if this call started it. This process's Ray (the local
    one's processes, or this driver on a cluster) binds and advertises ``cfg.node_ip_address``
    (:func:`single_host_ray`), with Ray's token authentication as ``cfg.auth`` says (:func:`use_token_auth`)."""
    if ray.is_initialized():
        return False
    check_ray_settings(cfg)
    use_token_auth(cfg.auth, cfg.auth_token_file)
    kwargs = {"include_dashboard": cfg.include_dashboard, "log_to_driver": False, "_node_ip_address": cfg.node_ip_address}
    if cfg.address:  # a cluster's workers were not started from here: tell them which robot modules to import
        if ignored := ignored_on_a_cluster(cfg):
            log.warning(
                "%s: not used when joining the Ray cluster at %s (they set up a Ray of this run's own; its nodes' `ray start` "
                "options set the cluster's): leave them out", ", ".join(ignored), cfg.address,
            )  # fmt: skip
        modules = os.environ.get(MODULES_ENV)
        try:
            with keep_sigterm_handler():
                ray.init(address=cfg.address, **kwargs, **({"runtime_env": {"env_vars": {MODULES_ENV: modules}}} if modules else {}))
        except (AuthenticationError, ConnectionError, RuntimeError) as exc:
            raise join_error(cfg, exc) from exc
        log.info("joined the Ray cluster at %s as %s", cfg.address, ray.util.get_node_ip_address())
    else:
        with single_host_ray(cfg.node_ip_address), keep_sigterm_handler(), ray_in_own_process_group():
            ray.init(num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory, **kwargs)
    return True


@contextlib.contextmanager
def ray_in_own_process_group() -> Iterator[None]:
    """The local Ray's processes (GCS, raylet, agents, and the workers the raylet starts) get a process group of
    their own; this process stays in its group. ``timeout`` (and any supervisor that signals a process group)
    sends SIGTERM to this process and to its whole group: Ray's processes, in it, died at once, and the driver,
    stopping as on Ctrl-C, then waited on the dead GCS until Ray ended it after 60 s (exit 1, no resume line,
    W&B unfinished). Now the driver stops its Ray itself. Ray's processes still end with this one (Ray ties
    each to its parent's death). A process that leads its group (started by a shell as a job of its own), or
    whose group is a terminal's foreground group (`make demo`: a Ctrl-C meant for it must reach it, and a
    background group's output can stop it under `stty tostop`), keeps Ray in its group, as before: Ray's
    processes block SIGINT, and `timeout` runs its command outside the foreground group. A supervisor that
    signals every process of a service (systemd's KillMode=control-group, Slurm's scancel) reaches Ray's too."""
    group = os.getpgrp()
    if group == os.getpid() or _terminal_foreground(group):
        yield
        return
    try:
        os.setpgid(0, 0)  # a new group led by this process: what it starts now is born in it
    except OSError as exc:  # a session leader cannot change its group
        log.debug("the local Ray stays in this process's group (%s)", exc)
        yield
        return
    try:
        yield
    finally:
        try:
            os.setpgid(0, group)  # back into the group it was started in (a terminal's Ctrl-C, timeout's signal reach it there)
        except OSError as exc:
            log.warning("could not return to process group %d after starting Ray (%s): a signal to that group no longer reaches this run", group, exc)


@contextlib.contextmanager
def keep_sigterm_handler() -> Iterator[None]:
    """``ray.init`` makes SIGTERM exit the driver (``sys.exit(15)``, set as it starts): the handler before it (the apps':
    SIGTERM as Ctrl-C, one line saying how to go on, exit 130) is put back after it, and a SIGTERM while it connects
    goes to that handler (a `flywheel` stopped by `timeout` or Slurm exited 15 without a word)."""
    handler = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or handler is None:  # only the main thread sets handlers
        yield
        return
    try:
        yield
    except SystemExit as exc:
        if exc.code == signal.SIGTERM and callable(handler):
            handler(signal.SIGTERM, None)
        raise
    finally:
        signal.signal(signal.SIGTERM, handler)


def _terminal_foreground(group: int) -> bool:
    """Whether ``group`` is the foreground process group of this process's controlling terminal (none: False)."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:  # no controlling terminal (a service, CI, nohup)
        return False
    try:
        return os.tcgetpgrp(fd) == group
    except OSError:
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def single_host_ray(node_ip_address: str | None) -> Iterator[None]:
    """A local Ray started in this block keeps a loopback ``node_ip_address`` (127.0.0.1, localhost, ::1).
    Ray 2.60 replaces one by the host's network address and then listens on every interface, as a node
    of a cluster must; it keeps loopback only where it runs as a single-host Ray (macOS, Windows:
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and then binds every process to it. A local Ray is one host:
    run it so, in this process and the Ray processes it starts (they read that variable)."""
    from ray._common.network_utils import is_localhost
    from ray._private import ray_constants

    if node_ip_address is None or not is_localhost(node_ip_address):
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(SINGLE_HOST_ENV)
    ray_constants.ENABLE_RAY_CLUSTER, os.environ[SINGLE_HOST_ENV] = False, "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved[0]
        if saved[1] is None:
            del os.environ[SINGLE_HOST_ENV]
        else:
            os.environ[SINGLE_HOST_ENV] = saved[1]


def use_token_auth(mode: str, token_file: str | None) -> None:
    """Ray's token authentication for this process and the Ray processes it starts, the way Ray documents
    it (docs.ray.io, ray-security/token-auth): ``RAY_AUTH_MODE=mode``, the same on every node; the token
    from ``token_file`` (``RAY_AUTH_TOKEN_PATH``), else ``RAY_AUTH_TOKEN``, else ``~/.ray/auth_token``
    (a local Ray creates it). The token itself is never read here, nor logged."""
    if mode not in AUTH_MODES:
        raise ValueError(f"ray.auth={mode!r}: use token (Ray's token authentication, as on every node of the cluster) or disabled")
    if os.environ.get(AUTH_MODE_ENV, mode) != mode:
        log.warning("RAY_AUTH_MODE=%s in the environment, ray.auth=%s in the config: the config's is used", os.environ[AUTH_MODE_ENV], mode)
    os.environ[AUTH_MODE_ENV] = mode
    if token_file:
        path = Path(token_file).expanduser().absolute()
        if not path.is_file() or not path.stat().st_size:
            raise FileNotFoundError(
                f"ray.auth_token_file={token_file}: no token there; write the cluster's token into that file (`ray get-auth-token` "
                "on a node of the cluster prints it), or leave ray.auth_token_file null and set RAY_AUTH_TOKEN"
            )
        os.environ[TOKEN_PATH_ENV] = str(path)
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")  # Ray reads RAY_AUTH_MODE once per process: read it again, as Ray's own token setup does
    AuthenticationTokenLoader.instance().reset_cache()


class RayJoinError(RuntimeError):
    """This process could not join the configured Ray cluster (or start its own); the message says what to check."""


class ClusterResourcesError(RayJoinError):
    """No node of the run's own local Ray has what a task of the run asks for: Ray would keep the task pending forever
    (nothing can join a local Ray), and says so only in a log this driver does not show (``log_to_driver=False``). A
    :class:`RayJoinError`: like a cluster that cannot be joined, the run cannot start on it; the message says which
    setting asked for what, and what the Ray has. On a cluster the same finding is a warning (:func:`check_feasible`)."""


def check_feasible(asked: dict[str, float], what: str, settings: dict[str, str], remedy: str, address: str | None) -> None:
    """Whether an alive node of the Ray this process started or joined has all of ``asked`` (Ray resource name ->
    amount, as one task asks for them on one node): ``what`` names the task, ``settings`` the setting that asks for each
    resource (``{"GPU": "ray.training.num_gpus=1"}``), ``remedy`` what to do besides starting a node that has them,
    ``address`` the ``ray.address`` setting. None has them: on the run's own local Ray (``address`` null), where nothing
    can ever join, :class:`ClusterResourcesError`, so the run stops with a reason instead of waiting forever; on a
    cluster one warning, and the task waits in Ray's queue until a node that has them joins (an autoscaler's, one
    replacing a lost node), as Ray itself would have it."""
    asked = {name: amount for name, amount in asked.items() if amount}
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(all(node.get(name, 0) >= amount for name, amount in asked.items()) for node in nodes):
        return
    most = {name: max((node.get(name, 0) for node in nodes), default=0) for name in asked}
    lacking = [name for name, amount in asked.items() if most[name] < amount] or list(asked)  # none alone: their sum on one node
    total = ray.cluster_resources()
    has = f"{_resources({name: total.get(name, 0) for name in asked})} in all, at most {_resources(most)} on one of its {len(nodes)} nodes"
    setting = ", ".join(settings.get(name, name) for name in lacking)
    if address:
        log.warning(
            "%s: %s asks Ray for %s on one node, but no alive node of the Ray cluster at %s has that now (%s): the task waits "
            "until a node that has it joins (an autoscaler's, or `ray start --num-cpus/--num-gpus/--resources`)", setting, what, _resources(asked), address, has,
        )  # fmt: skip
        return
    raise ClusterResourcesError(
        f"{setting}: {what} asks Ray for {_resources(asked)} on one node, but no node of the run's own local Ray has that (it has {has}), "
        f"and no node can join it: {remedy}, or join a cluster that has it (ray.address=HOST:PORT of its head)"
    )


def _resources(amounts: dict[str, float]) -> str:
    return ", ".join(f"{name} {amount:g}" for name, amount in amounts.items()) or "nothing"


MIN_OBJECT_STORE_BYTES = 75 * 1024 * 1024  # ray.init refuses less (its ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES)


def check_ray_settings(cfg: DictConfig) -> None:
    """What would make ``ray.init`` fail late or wait forever, refused at once (the apps call it before anything
    starts): a local Ray without CPUs or with less object store than Ray takes, an unknown ``auth``, an address this
    host does not have, a HOST:PORT head that nothing listens on (Ray retries that for minutes)."""
    if str(cfg.address or "").startswith("ray://"):
        raise RayJoinError(
            f"ray.address={cfg.address}: Ray Client is not supported: through it this process would stay outside the cluster, "
            "which the robots (Ray actors) and training workers reach back into; run on a host of the cluster's network with "
            "ray.address=HOST:PORT of the head (or auto on a node) and ray.node_ip_address=<this host's address there>"
        )
    if cfg.address == "auto":
        try:
            found = ray._private.services.canonicalize_bootstrap_address("auto")  # RAY_ADDRESS, or the cluster `ray start` left on this host
        except ConnectionError:
            raise RayJoinError(
                "ray.address=auto: no Ray cluster runs on this machine (auto joins the one `ray start` started here, or RAY_ADDRESS); "
                "start one (`ray start --head`), give HOST:PORT of a head, or leave ray.address empty for a Ray of this run's own"
            ) from None
        if found and (exc := _unanswered(found)) is not None:  # another run's own local Ray: it listens on loopback only, and Ray retried its address for minutes
            where = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "the last `ray start` on this host" if ray._private.utils.read_ray_address() else "a Ray running on this host"
            raise RayJoinError(
                f"ray.address=auto found {found} (from {where}), which does not answer ({exc.strerror or exc}): is it another run's private local Ray "
                "(a run without ray.address listens on loopback only)? start a cluster with `ray start --head` to join with auto, give HOST:PORT "
                "of a head, or leave ray.address empty for a Ray of this run's own"
            )
    if not cfg.address and cfg.num_cpus is not None and cfg.num_cpus < 1:
        raise RayJoinError(f"ray.num_cpus={cfg.num_cpus}: the local Ray needs at least 1 CPU for the robots and tasks (null: all of this machine's)")
    if not cfg.address and cfg.object_store_memory is not None and cfg.object_store_memory < MIN_OBJECT_STORE_BYTES:
        raise RayJoinError(f"ray.object_store_memory={cfg.object_store_memory}: Ray needs at least {MIN_OBJECT_STORE_BYTES} bytes (75 MiB); null: Ray's own choice")
    if cfg.auth not in AUTH_MODES:
        raise RayJoinError(f"ray.auth={cfg.auth!r}: use token (Ray's token authentication, as on every node of the cluster) or disabled")
    if cfg.node_ip_address:
        try:
            with socket.socket(socket.AF_INET6 if ":" in cfg.node_ip_address else socket.AF_INET) as probe:
                probe.bind((cfg.node_ip_address, 0))
        except OSError as exc:
            raise RayJoinError(f"ray.node_ip_address={cfg.node_ip_address} is not an address of this machine ({exc.strerror}): give one it has") from None
    host, _, port = str(cfg.address or "").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if host and port.isdigit() and (exc := _unanswered(cfg.address)) is not None:
        raise RayJoinError(
            f"could not join the Ray cluster at {cfg.address}: nothing answers there ({exc.strerror or exc}); is its head running "
            f"(`ray start --head --port {port}` on {host}; `ray status --address {cfg.address}`)?"
        )


def ignored_on_a_cluster(cfg: DictConfig) -> list[str]:
    """The local Ray's settings (:data:`LOCAL_ONLY`, as ``ray.KEY=VALUE``) given another value than the ``ray`` group's
    own, where ``ray.address`` joins a cluster, which ignores them: :func:`start_ray` says so (a warning, not a refusal:
    they do no harm there, and one command line may serve a local run and a cluster run)."""
    if not cfg.address:
        return []
    defaults = _ray_defaults()
    return [f"ray.{key}={cfg.get(key)}" for key in LOCAL_ONLY if cfg.get(key) != defaults.get(key)]


@functools.cache
def _ray_defaults() -> DictConfig:
    """The ``ray`` group's own values (fleet/conf/ray/local.yaml)."""
    return OmegaConf.load(Path(CONF_DIR) / "ray" / "local.yaml")


def _unanswered(address: str) -> OSError | None:
    """Why nothing takes a connection at HOST:PORT ``address``, or None: ``ray.init`` retries such an address for minutes."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        return exc
    return None


def join_error(cfg: DictConfig, exc: Exception) -> RayJoinError:
    """What to do when ``ray.init(address=...)`` failed; a refused token says how to give the cluster's.
    Ray's reason is in the exception's chain (its last connection error)."""
    chain, cause = [], exc
    while cause is not None:
        chain.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__ or cause.__context__
    text = "\n".join(chain)
    if any(mark in text for mark in ("AuthenticationError", "InvalidAuthToken", "UNAUTHENTICATED", "Unauthenticated")):
        return RayJoinError(
            f"the Ray cluster at {cfg.address} refused this process's token (Ray: token missing or incorrect). Join with "
            "ray.auth=token and the cluster's token: RAY_AUTH_TOKEN in the environment, or ray.auth_token_file=<a file holding it> "
            "(`ray get-auth-token` on one of its nodes prints it; every node runs with RAY_AUTH_MODE=token and that token: "
            'docs/scale.md, "Ray cluster")'
        )
    return RayJoinError(
        f"could not join the Ray cluster at {cfg.address} ({chain[0]}): is its head running there (`ray status --address "
        f"{cfg.address}`), and does a node of it run on this host at ray.node_ip_address={cfg.node_ip_address}? (Ray replaces "
        "127.0.0.1, localhost and ::1 by this host's network address: a cluster on loopback gives its nodes and this driver "
        "another loopback address, such as 127.0.0.2)"
    )
