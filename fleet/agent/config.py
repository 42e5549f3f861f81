"""Robot-side configuration (Hydra ``_target_`` dataclasses; no torch, no Ray)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
_WARNED_READABLE: set[str] = set()


def check_server_url(url: str, name: str, what: str = "the fleet server") -> None:
    """ValueError unless ``url`` is an http(s) URL with a host (a typo would otherwise surface only when uploading)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.strip("/"):
        raise ValueError(f"{name} {url!r} is not an http:// or https:// URL of {what} (e.g. http://127.0.0.1:8700)")


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """How a robot's agent spools and uploads.

    server_url: the fleet server. token_env / token_file: where the robot's bearer token is
    (never in the config: Hydra writes configs to disk). spool_dir: parent of the per-robot
    spool ``<spool_dir>/<robot_id>``. spool_max_bytes: spool bound; the oldest episodes are
    evicted beyond it, and an episode larger than it is dropped (counted, the robot goes on). backoff_*: retry delays after a failed upload (exponential, jittered).
    status_interval_s: how often the uploader logs the queue depth. max_attempts: an episode the
    server keeps failing on (5xx) while it accepts others is set aside after this many tries.
    compress_uploads: send uploads zstd-compressed once the server says it takes zstd (its
    answers' Accept-Encoding); the spool keeps them uncompressed.
    resumable_threshold_bytes: episodes larger than this (spooled, uncompressed bytes) go through the
    resumable protocol (POST /v1/uploads, PUT in chunks, complete; docs/protocol.md), as does any
    episode a plain upload got 413 ``body_too_large`` for.
    """

    server_url: str = "http://127.0.0.1:8700"
    token_env: str = "FLYWHEEL_ROBOT_TOKEN"
    token_file: str | None = None
    spool_dir: str = "runs/fleet/spool"
    spool_max_bytes: int = 1 << 30
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    request_timeout_s: float = 30.0
    status_interval_s: float = 10.0
    max_attempts: int = 8  # 5xx answers to one episode, while others are accepted, before it is set aside
    compress_uploads: bool = True  # zstd (Content-Encoding) once the server advertises it; docs/protocol.md
    resumable_threshold_bytes: int = 8 << 20  # larger episodes are sent in chunks, resumably

    def __post_init__(self):
        if self.spool_max_bytes < 1:
            raise ValueError(f"spool_max_bytes must be >= 1, got {self.spool_max_bytes}")
        if self.resumable_threshold_bytes < 0:
            raise ValueError(f"resumable_threshold_bytes must be >= 0, got {self.resumable_threshold_bytes}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError(f"need 0 < backoff_initial_s <= backoff_max_s, got {self.backoff_initial_s}, {self.backoff_max_s}")
        check_server_url(self.server_url, "server_url")

    def load_token(self) -> str:
        """The robot's bearer token from ``token_file`` or the ``token_env`` variable."""
        return read_token(
            self.token_file, self.token_env, "robot token", "fleet.agent.token_file",
            "create one with `python -m fleet.server.auth --tokens FILE add --role robot --robot-id ID`",
        )  # fmt: skip


def read_token(token_file: str | None, token_env: str, what: str, file_setting: str, issue: str) -> str:
    """A bearer token: the text of ``token_file`` where one is given, else of the ``token_env`` environment variable,
    stripped (and a leading byte order mark: Windows Notepad's "UTF-8 with BOM"). ValueError where there is none (a
    file missing, a folder, unreadable or empty; the variable unset or empty) or it holds what a bearer token cannot
    (non-ASCII, whitespace inside, control characters), naming ``what`` token, where it was looked for
    (``file_setting``: the setting that names a file) and how to get one (``issue``). The robot's agent and the
    operator's commands (``flywheel-registry rollback``) read theirs so."""
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8-sig").strip()
        except PermissionError:
            raise ValueError(f"{what} file {path} cannot be read (Permission denied): give {_this_user()}, the user this runs as, "
                             "read access to it (chmod/chown)") from None  # fmt: skip
        except OSError as exc:
            why = {FileNotFoundError: "does not exist", IsADirectoryError: "is a folder"}.get(type(exc))
            if why is None:
                raise ValueError(f"{what} file {path} cannot be read ({exc.strerror or exc})") from None
            raise ValueError(f"{what} file {path} {why}: write the token there ({issue})") from None
        except UnicodeDecodeError:  # UTF-16 from PowerShell 5's `echo tok > file`, say
            raise ValueError(f"{what} file {path} is not UTF-8 text: write the token there as plain UTF-8 text ({issue})") from None
        if not token:
            raise ValueError(f"{what} file {path} is empty: write the token there ({issue})")
        _check_token(token, f"{what} file {path}", "re-save it as plain text holding the token alone")
        warn_if_world_readable(path, f"{what} file")
        return token
    token = os.environ.get(token_env, "").lstrip("\ufeff").strip()
    if not token:
        raise ValueError(f"no {what}: set ${token_env} or {file_setting} ({issue})")
    _check_token(token, f"${token_env} ({what})", "set it to the token alone, as plain text")
    return token


def warn_if_world_readable(path: str | Path, what: str) -> None:
    """Log a warning, once per path, where the secret at ``path`` (a token, a private key) is readable by every user
    (mode o+r), as ssh does. Group-readable is a setup of its own (root:flywheel 0640, the service in the group): no
    warning. The robot's agent, the operator's commands and the registry's key loading check theirs so."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return
    if mode & 0o004 and str(path) not in _WARNED_READABLE:
        _WARNED_READABLE.add(str(path))
        log.warning("%s %s is readable by every user of this machine (mode %04o): `chmod 600` it (or 640, for a group the "
                    "service's user is in)", what, path, mode & 0o777)  # fmt: skip


def _check_token(token: str, where: str, fix: str) -> None:
    """ValueError naming ``where`` unless ``token`` is printable ASCII without spaces (what an Authorization header holds)."""
    bad = next((i for i, c in enumerate(token) if not "!" <= c <= "~"), None)
    if bad is not None:
        raise ValueError(f"{where} holds {token[bad]!r} at character {bad + 1}, which a bearer token cannot hold "
                         f"(only printable ASCII, no spaces): {fix}")  # fmt: skip


def _this_user() -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(os.geteuid()).pw_name}"
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


@dataclasses.dataclass(frozen=True)
class SimRobotConfig:
    """A simulated robot standing in for a real one: model, identity, hardware variation."""

    robot_id: str = "robot-0"
    model: str = "ant"
    source: str = "real"
    seed: int = 0
    max_steps: int = 200
    profile: dict = dataclasses.field(default_factory=dict)  # sim.variation.VariationProfile fields
    # record the physics state (qpos, qvel) in every episode as extras, as a robot logs its encoders' joint state:
    # calibration and scenarios then start from recorded states, not states rebuilt from observations (docs/robots.md)
    record_state: bool = False

    def __post_init__(self):
        check_robot_id(self.robot_id)  # before any folder is named after it (spool, policy state, logs)


def check_robot_id(robot_id: str) -> None:
    from sim.episode import ROBOT_ID, ROBOT_ID_RULE

    if not isinstance(robot_id, str) or not ROBOT_ID.fullmatch(robot_id):
        raise ValueError(f"robot id {str(robot_id)[:80]!r} is not allowed: {ROBOT_ID_RULE}")
