"""Bearer tokens: stored hashed, one role each (robot, operator, publisher).

Token file (JSON, or YAML if it ends in .yaml/.yml)::

    {"<sha256 hex of the token>": {"role": "robot", "robot_id": "ant-07"},
     "<sha256 hex>": {"role": "operator"}}

A robot token may upload only episodes whose robot_id is its own. Create tokens with::

    python -m fleet.server.auth --tokens runs/fleet/tokens.json add --role robot --robot-id ant-07

which prints the token once (only its hash is stored). The server re-reads the file when
it changes, so adding a robot needs no restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path

import yaml

from fleet.server.errors import ApiError
from sim.episode import ROBOT_ID, ROBOT_ID_RULE

ROLES = ("robot", "operator", "publisher")
log = logging.getLogger(__name__)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a request is: role and, for robots, the robot_id it may upload as."""

    role: str
    robot_id: str | None = None


def _parse(path: Path) -> dict[str, Principal]:
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text or "{}")
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"token file {path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} ({str(exc).splitlines()[0]}); fix it, or recreate it with `python -m fleet.server.auth --tokens {path} add ...`") from None
    if not isinstance(raw, dict):
        raise ValueError(f"token file {path} must map sha256(token) -> {{role, robot_id}}")
    out = {}
    for digest, entry in (raw or {}).items():
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ValueError(f"token file {path}: key {digest!r} is not a sha256 hex digest (store hashes, never tokens)")
        if not isinstance(entry, dict) or entry.get("role") not in ROLES:
            raise ValueError(f"token file {path}: entry {digest[:12]}... needs role in {ROLES}")
        if entry["role"] == "robot" and not entry.get("robot_id"):
            raise ValueError(f"token file {path}: robot token {digest[:12]}... needs a robot_id")
        if entry.get("robot_id") is not None and not (isinstance(entry["robot_id"], str) and ROBOT_ID.fullmatch(entry["robot_id"])):
            raise ValueError(f"token file {path}: robot id {str(entry['robot_id'])[:80]!r} of token {digest[:12]}... is not allowed ({ROBOT_ID_RULE}); issue that robot a new token")
        out[digest] = Principal(entry["role"], entry.get("robot_id"))
    return out


class TokenRegistry:
    """Hashed tokens from a file, re-read when the file changes (checked at most every ``reload_every_s``). A file
    that cannot be read or parsed then (half-written by an editor, deleted) leaves the last good tokens in
    force, with an error in the log, until it is fixed."""

    def __init__(self, path: str | Path, reload_every_s: float = 1.0):
        self.path, self.reload_every_s = Path(path), reload_every_s
        if not self.path.is_file():
            raise FileNotFoundError(
                f"token file {self.path} does not exist; create tokens with "
                f"`python -m fleet.server.auth --tokens {self.path} add --role operator`"
            )
        self._lock = threading.Lock()
        self._mtime = self.path.stat().st_mtime_ns
        self._tokens = _parse(self.path)
        self._checked = time.monotonic()

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an ``Authorization: Bearer <token>`` header; ApiError 401 otherwise."""
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():  # the scheme is case-insensitive (RFC 9110 11.1)
            raise ApiError(401, "unauthorized", "send 'Authorization: Bearer <token>'", "authorization", {"WWW-Authenticate": "Bearer"})
        self._maybe_reload()
        principal = self._tokens.get(hash_token(credentials.strip()))
        if principal is None:
            raise ApiError(401, "unauthorized", "unknown token", "authorization", {"WWW-Authenticate": "Bearer"})
        return principal

    def require(self, authorization: str | None, role: str) -> Principal:
        principal = self.authenticate(authorization)
        if principal.role != role:
            raise ApiError(403, "forbidden", f"this call needs a {role} token, got a {principal.role} token", "authorization")
        return principal

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_every_s:
            return
        with self._lock:
            self._checked = now
            try:
                mtime = self.path.stat().st_mtime_ns
                if mtime != self._mtime:
                    self._tokens, self._mtime = _parse(self.path), mtime
            except (OSError, ValueError, yaml.YAMLError) as exc:  # a half-edited or missing file: keep serving the last good tokens
                if self._mtime is not None:  # said once per bad state; requests are never failed for it
                    log.error("token file %s unreadable (%s); still using the tokens read before: fix the file to change them", self.path, str(exc)[:200])
                self._mtime = None


def add_token(path: str | Path, role: str, robot_id: str | None = None) -> str:
    """Create a token, store its hash in ``path`` (created if missing), return the token itself."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if role == "robot" and not robot_id:
        raise ValueError("a robot token needs robot_id")
    if robot_id is not None and not ROBOT_ID.fullmatch(robot_id):
        raise ValueError(f"robot id {robot_id[:80]!r} is not allowed: {ROBOT_ID_RULE}")
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        raise ValueError(f"add_token writes JSON token files; give a .json path, not {path}")
    entries = json.loads(path.read_text() or "{}") if path.is_file() else {}
    token = secrets.token_urlsafe(32)
    entries[hash_token(token)] = {"role": role, **({"robot_id": robot_id} if robot_id else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return token


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fleet.server.auth", description="Manage flywheel-server bearer tokens.")
    parser.add_argument("--tokens", required=True, help="token file (JSON)")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="create a token; prints it once")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--robot-id", default=None)
    args = parser.parse_args(argv)
    print(add_token(args.tokens, args.role, args.robot_id))


if __name__ == "__main__":
    main()
