"""Bearer tokens: stored hashed, one role each (robot, operator, publisher).

Token file (JSON, or YAML if it ends in .yaml/.yml)::

    {"<sha256 hex of the token>": {"role": "robot", "robot_id": "ant-07"},
     "<sha256 hex>": {"role": "operator"}}

A robot token may upload only episodes whose robot_id is its own. Create tokens with::

    python -m fleet.server.auth --tokens runs/fleet/tokens.json add --role robot --robot-id ant-07

which prints the token once (only its hash is stored); ``list`` shows the tokens (hash prefix, role,
robot) and ``revoke`` removes them (``--robot-id``, ``--token`` or ``--hash``). The server re-reads the
file when it changes, so adding or revoking a token needs no restart.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import secrets
import stat
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


def _a(role: str) -> str:
    """``role`` with its indefinite article: "a robot", "an operator"."""
    return f"{'an' if role[:1] in 'aeiou' else 'a'} {role}"


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
    """Hashed tokens from a file, re-read when it changes (checked at most every ``reload_every_s``: inode, size,
    mtime and ctime, so a copy that keeps the mtime is seen too). Revoking fails closed: a deleted file revokes
    every token; a file that cannot be read or parsed (half-written by an editor, a typo) keeps the robot
    tokens read before in force, so uploads go on, and refuses operator and publisher tokens until it is fixed,
    with an error in the log."""

    def __init__(self, path: str | Path, reload_every_s: float = 1.0):
        self.path, self.reload_every_s = Path(path), reload_every_s
        if not self.path.is_file():
            raise FileNotFoundError(
                f"token file {self.path} does not exist; create tokens with "
                f"`python -m fleet.server.auth --tokens {self.path} add --role operator`"
            )
        self._lock = threading.Lock()
        self._seen: tuple | None = _identity(self.path)
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
            raise ApiError(403, "forbidden", f"this call needs {_a(role)} token, got {_a(principal.role)} token", "authorization")
        return principal

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_every_s:
            return
        with self._lock:
            self._checked = now
            try:
                seen = _identity(self.path)
            except FileNotFoundError:
                seen = "missing"
            except OSError as exc:
                seen = f"unreadable: {exc}"
            if seen == self._seen:
                return
            self._seen = seen
            if seen == "missing":
                self._tokens = {}
                log.error("token file %s was deleted: every token is revoked until it is back", self.path)
                return
            try:
                self._tokens = _parse(self.path)
            except (OSError, ValueError, yaml.YAMLError) as exc:  # half-edited: uploads go on, privileged calls wait for the fix
                self._tokens = {h: p for h, p in self._tokens.items() if p.role == "robot"}
                log.error("token file %s unreadable (%s); robot tokens read before stay in force, operator and publisher tokens are "
                          "refused until the file is fixed", self.path, str(exc)[:200])  # fmt: skip


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _write_tokens(path: Path, entries: dict) -> None:
    """Replace the token file atomically. A new file is 0600 from its creation; a file that exists keeps its mode
    and (where permitted, e.g. as root) its owner and group, so an admin's `add` on a root:flywheel 0640 file
    leaves the server (running as flywheel) able to read it. ``path`` is already resolved: a symlink stays one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    if old is not None:
        os.fchmod(fd, stat.S_IMODE(old.st_mode))
        if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
            try:
                os.fchown(fd, old.st_uid, old.st_gid)
            except PermissionError:  # not root: the group at least, where this user is in it (then a 0640 file stays readable to it)
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, -1, old.st_gid)
                now = os.fstat(fd)
                log.warning("token file %s was owned by uid %d gid %d; this user may not keep that, so it is now owned by uid %d gid %d: "
                            "check the server's user can still read it (or edit it as root)", path, old.st_uid, old.st_gid, now.st_uid, now.st_gid)  # fmt: skip
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(entries, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _editing(path: Path):
    """The token file's entries, read and written back under an exclusive lock (two `add`s never lose one)."""
    if path.suffix in (".yaml", ".yml"):
        raise ValueError(f"the token CLI writes JSON token files; give a .json path, not {path}")
    path = path.resolve()  # a symlinked token file (config management, a mounted secret): edit its target, keep the link
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            try:
                entries = json.loads(path.read_text() or "{}")
            except ValueError as exc:
                raise ValueError(f"token file {path} is not valid JSON ({exc}); fix it by hand before changing tokens") from None
        else:
            entries = {}
        yield entries
        _write_tokens(path, entries)


def add_token(path: str | Path, role: str, robot_id: str | None = None) -> str:
    """Create a token, store its hash in ``path`` (created if missing), return the token itself."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if role == "robot" and not robot_id:
        raise ValueError("a robot token needs robot_id")
    if robot_id is not None and not ROBOT_ID.fullmatch(robot_id):
        raise ValueError(f"robot id {robot_id[:80]!r} is not allowed: {ROBOT_ID_RULE}")
    token = secrets.token_urlsafe(32)
    with _editing(Path(path)) as entries:
        entries[hash_token(token)] = {"role": role, **({"robot_id": robot_id} if robot_id else {})}
    return token


def revoke_tokens(path: str | Path, *, robot_id: str | None = None, token: str | None = None, hash_prefix: str | None = None) -> list[str]:
    """Remove the tokens of ``robot_id``, the token ``token``, or the one whose hash starts with ``hash_prefix``
    (at least 8 hex digits, naming one token); returns the removed hashes. A running server stops accepting
    them at its next reload check (within a second)."""
    if sum(x is not None for x in (robot_id, token, hash_prefix)) != 1:
        raise ValueError("say which tokens to revoke: exactly one of robot_id, token, hash_prefix")
    if hash_prefix is not None and (len(hash_prefix) < 8 or any(c not in "0123456789abcdef" for c in hash_prefix)):
        raise ValueError(f"hash prefix {hash_prefix[:80]!r}: give at least 8 lowercase hex digits of the hash `list` shows")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} does not exist")
    with _editing(path) as entries:
        if robot_id is not None:
            gone = [h for h, e in entries.items() if isinstance(e, dict) and e.get("robot_id") == robot_id]
        elif token is not None:
            gone = [h for h in entries if h == hash_token(token)]
        else:
            gone = [h for h in entries if h.startswith(hash_prefix)]
            if len(gone) > 1:
                raise ValueError(f"hash prefix {hash_prefix} names {len(gone)} tokens; give more digits")
        if not gone:
            raise ValueError(f"no token in {path} matches; `list` shows them")
        for h in gone:
            del entries[h]
    return gone


def list_tokens(path: str | Path) -> list[dict]:
    """The tokens of ``path``: hash prefix (12 hex digits), role, robot id."""
    return [{"hash": h[:12], "role": p.role, "robot_id": p.robot_id} for h, p in sorted(_parse(Path(path)).items(), key=lambda kv: (kv[1].role, kv[1].robot_id or "", kv[0]))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fleet.server.auth", description="Manage flywheel-server bearer tokens.")
    parser.add_argument("--tokens", required=True, help="token file (JSON)")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="create a token; prints it once")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--robot-id", default=None)
    revoke = sub.add_parser("revoke", help="remove tokens; a running server refuses them within a second")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--robot-id", help="every token of this robot")
    which.add_argument("--token", help="this token; write --token=TOKEN (a token may start with '-')")
    which.add_argument("--hash", dest="hash_prefix", help="the token whose hash starts so (from `list`)")
    sub.add_parser("list", help="hash prefix, role and robot of each token (never the tokens)")
    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            print(add_token(args.tokens, args.role, args.robot_id))
        elif args.command == "revoke":
            gone = revoke_tokens(args.tokens, robot_id=args.robot_id, token=args.token, hash_prefix=args.hash_prefix)
            print(f"revoked {len(gone)} token(s): {', '.join(h[:12] for h in gone)}")
        else:
            for row in list_tokens(args.tokens):
                print(f"{row['hash']}  {row['role']:<9}  {row['robot_id'] or ''}")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"python -m fleet.server.auth: {exc}") from None


if __name__ == "__main__":
    main()
