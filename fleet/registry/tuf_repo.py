"""The policy registry's TUF repository (python-tuf): the metadata robots verify before they install.

Roles (The Update Framework; docs/security.md):

    root       names every role's keys and thresholds; signed by a threshold of *offline* root
               keys (default 2 of 3), never by the server. A new root version is signed by the
               old threshold and the new one, so a robot can walk from the root it was
               provisioned with to the newest (key rotation).
    targets    online key: every target file (policy manifests, weights, the rollout) by path,
               length and sha256.
    snapshot   online key: the version of the targets metadata (no mix-and-match of metadata).
    timestamp  online key, short-lived (default 1 day): the version of the snapshot. The server
               re-signs it long before it expires, so a robot that is handed an expired one
               knows its registry is frozen (an attacker replaying old metadata, or a dead
               server) and says so.

Layout under ``<dir>``, every file written whole (write, fsync, rename)::

    metadata/<N>.root.json      every root version; metadata/root.json is the newest (provision robots with it)
    metadata/timestamp.json
    metadata/<N>.snapshot.json  consistent snapshots: a robot that read timestamp N reads exactly
    metadata/<N>.targets.json   the snapshot and targets it names (the last KEEP versions stay)
    targets/<dir>/<sha256>.<name>

The timestamp is written last: a change is published when its timestamp is on disk, and a
server killed before that serves the previous state (tests/test_power_cut.py).
"""

from __future__ import annotations

import copy
import re
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from securesystemslib.signer import Key, Signer
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer
from tuf.repository import Repository

from fleet.registry.trust import atomic_write

ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
EXPIRY_S = {Root.type: 365 * 86400.0, Targets.type: 7 * 86400.0, Snapshot.type: 7 * 86400.0, Timestamp.type: 86400.0}
KEEP = 16  # snapshot and targets metadata versions kept on disk (robots mid-refresh still find theirs)
_METADATA_NAME = re.compile(r"^(?:(\d{1,9})\.(root|snapshot|targets)|root|timestamp)\.json$")
_TARGET_PATH = re.compile(r"^(?:[A-Za-z0-9_-]+/)*[0-9a-f]{64}\.[A-Za-z0-9_.-]+$")


class RepositoryNotInitialised(RuntimeError):
    """No root metadata: run the key ceremony first (``flywheel-registry init``)."""


class TufRepository(Repository):
    """A TUF repository on disk. ``signers``: role -> the signers this process holds for it (the
    server: the online key for targets, snapshot and timestamp; a key ceremony: root keys too).
    Nothing is written that a client would refuse: each new version must meet its role's threshold."""

    def __init__(self, directory: str | Path, signers: Mapping[str, Sequence[Signer]], *, expiry_s: Mapping[str, float] | None = None, clock=time.time):
        self.dir = Path(directory)
        self.metadata_dir, self.targets_dir = self.dir / "metadata", self.dir / "targets"
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        self.signers = {role: list(s) for role, s in signers.items()}
        self.expiry_s = {**EXPIRY_S, **(expiry_s or {})}
        self.clock = clock
        self.lock = threading.RLock()  # one change at a time (publish, refresh, key rotation)
        self._md: dict[str, Metadata] = self._load_published()

    # -- python-tuf Repository ------------------------------------------------------------
    def open(self, role: str) -> Metadata:
        if role in self._md:
            return copy.deepcopy(self._md[role])
        md = Metadata({Root.type: Root, Targets.type: Targets, Snapshot.type: Snapshot, Timestamp.type: Timestamp}[role]())
        md.signed.version = 0  # close() makes it 1
        return md

    def close(self, role: str, md: Metadata) -> None:
        md.signed.version += 1
        md.signed.expires = datetime.fromtimestamp(int(self.clock() + self.expiry_s[role]), timezone.utc)
        md.signatures.clear()
        for signer in self.signers.get(role, []):
            md.sign(signer, append=True)
        self._check_signed(role, md)
        data = md.to_bytes(JSONSerializer(compact=True))
        if role == Timestamp.type:
            atomic_write(self.metadata_dir / "timestamp.json", data)
            self._prune()
        else:
            atomic_write(self.metadata_dir / f"{md.signed.version}.{role}.json", data)
            if role == Root.type:
                atomic_write(self.metadata_dir / "root.json", data)
        self._md[role] = md

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        return {"targets.json": MetaFile(version=self._md[Targets.type].signed.version)}

    @property
    def snapshot_info(self) -> MetaFile:
        return MetaFile(version=self._md[Snapshot.type].signed.version)

    # -- what the server does ----------------------------------------------------------------
    @property
    def initialised(self) -> bool:
        return Root.type in self._md

    def require_root(self) -> Root:
        if not self.initialised:
            raise RepositoryNotInitialised(
                f"{self.metadata_dir} has no root metadata: create it with the offline root keys first "
                "(`flywheel-registry init`, docs/security.md)"
            )
        return self._md[Root.type].signed

    def store_target(self, path: str, data: bytes) -> TargetFile:
        """Write a target file under its hash-prefixed name; returns its TargetFile (not yet listed)."""
        info = TargetFile.from_data(path, data, ["sha256"])
        destination = self._stored(path, info.hashes["sha256"])
        destination.parent.mkdir(parents=True, exist_ok=True)
        if not destination.exists():
            atomic_write(destination, data)
        return info

    def publish_targets(self, add: Mapping[str, TargetFile], remove: Sequence[str] = ()) -> None:
        """List ``add`` (and drop ``remove``) in a new targets version, then snapshot, then timestamp."""
        with self.lock:
            self.require_root()
            with self.edit_targets() as targets:
                for path in remove:
                    targets.targets.pop(path, None)
                targets.targets.update(add)
            self.do_snapshot(force=True)
            self.do_timestamp(force=True)

    def refresh_online(self, *, check_keys: bool = False) -> list[str]:
        """Re-sign what is past half its lifetime (targets, snapshot, timestamp); with
        ``check_keys`` also what does not verify under the current root (signed by a rotated-out
        key: a server starting after a key rotation). Returns the roles re-signed, in order."""
        with self.lock:
            root = self.require_root()
            if Timestamp.type not in self._md:  # a new repository: its first targets, snapshot, timestamp
                self.publish_targets({})
                return list(ONLINE_ROLES)
            stale = {role: self._stale(role, root, check_keys) for role in ONLINE_ROLES}
            done = []
            if stale[Targets.type]:
                with self.edit_targets():
                    pass
                done.append(Targets.type)
            if done or stale[Snapshot.type]:
                self.do_snapshot(force=True)
                done.append(Snapshot.type)
            if done or stale[Timestamp.type]:
                self.do_timestamp(force=True)
                done.append(Timestamp.type)
            return done

    def target_listing(self) -> dict[str, TargetFile]:
        """The published targets by path."""
        return dict(self._md[Targets.type].signed.targets) if Targets.type in self._md else {}

    def listed_bytes(self, path: str) -> bytes | None:
        """A published target's content (None if ``path`` is not listed)."""
        info = self.target_listing().get(path)
        return None if info is None else self._stored(path, info.hashes["sha256"]).read_bytes()

    def metadata_path(self, name: str) -> Path | None:
        """The file behind a metadata URL name (``timestamp.json``, ``3.snapshot.json``...), None if no such name."""
        if not _METADATA_NAME.match(name):
            return None
        path = self.metadata_dir / name
        return path if path.is_file() else None

    def target_path(self, url_path: str) -> Path | None:
        """The file behind a hash-prefixed target URL path, None if not a stored target."""
        if not _TARGET_PATH.match(url_path) or ".." in url_path:
            return None
        path = self.targets_dir / url_path
        return path if path.is_file() else None

    # -- internals ----------------------------------------------------------------------------
    def _stored(self, path: str, sha256: str) -> Path:
        folder, _, name = path.rpartition("/")
        return self.targets_dir / folder / f"{sha256}.{name}"

    def _stale(self, role: str, root: Root, check_keys: bool) -> bool:
        md = self._md[role]
        if md.signed.expires.timestamp() - self.clock() < self.expiry_s[role] / 2:
            return True
        return check_keys and not _verifies(root, role, md)

    def _check_signed(self, role: str, md: Metadata) -> None:
        """Raise unless ``md`` meets the threshold of the root that governs it (for a new root: the
        previous one's and its own)."""
        if role == Root.type:
            previous = self._md.get(Root.type)
            if previous is not None:
                previous.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
            md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        else:
            self.require_root().verify_delegate(role, md.signed_bytes, md.signatures)

    def _load_published(self) -> dict[str, Metadata]:
        """What robots are served now: the newest root, then timestamp -> snapshot -> targets."""
        md: dict[str, Metadata] = {}
        roots = sorted(int(p.name.split(".")[0]) for p in self.metadata_dir.glob("*.root.json"))
        if not roots:
            return md
        md[Root.type] = Metadata.from_bytes((self.metadata_dir / f"{roots[-1]}.root.json").read_bytes())
        timestamp = self.metadata_dir / "timestamp.json"
        if timestamp.exists():
            md[Timestamp.type] = Metadata.from_bytes(timestamp.read_bytes())
            snapshot_version = md[Timestamp.type].signed.snapshot_meta.version
            md[Snapshot.type] = Metadata.from_bytes((self.metadata_dir / f"{snapshot_version}.snapshot.json").read_bytes())
            targets_version = md[Snapshot.type].signed.meta["targets.json"].version
            md[Targets.type] = Metadata.from_bytes((self.metadata_dir / f"{targets_version}.targets.json").read_bytes())
        return md

    def _prune(self) -> None:
        for role in (Snapshot.type, Targets.type):
            current = self._md[role].signed.version if role in self._md else 0
            for path in self.metadata_dir.glob(f"*.{role}.json"):
                if int(path.name.split(".")[0]) <= current - KEEP:
                    path.unlink(missing_ok=True)


def _verifies(root: Root, role: str, md: Metadata) -> bool:
    try:
        root.verify_delegate(role, md.signed_bytes, md.signatures)
        return True
    except Exception:  # noqa: BLE001 - any verification failure means: re-sign
        return False


# -- key ceremonies (offline: they need root keys) -------------------------------------------------
def init_root(directory: str | Path, root_signers: Sequence[Signer], threshold: int, online_key: Key, *, expiry_s: Mapping[str, float] | None = None) -> Root:
    """Create root v1: ``root_signers``' keys with ``threshold`` for root, ``online_key`` for the
    online roles. The server signs targets, snapshot and timestamp when it first opens the registry."""
    if not 1 <= threshold <= len(root_signers):
        raise ValueError(f"root threshold {threshold} needs 1..{len(root_signers)} root keys")
    repo = TufRepository(directory, {Root.type: root_signers}, expiry_s=expiry_s)
    if repo.initialised:
        raise ValueError(f"{repo.metadata_dir} already has root metadata (v{repo.require_root().version}); rotate keys instead")
    with repo.edit_root() as root:
        for signer in root_signers:
            root.add_key(signer.public_key, Root.type)
        root.roles[Root.type].threshold = threshold
        for role in ONLINE_ROLES:
            root.add_key(online_key, role)
    return repo.require_root()


def rotate_keys(
    directory: str | Path,
    root_signers: Sequence[Signer],
    *,
    online_key: Key | None = None,
    new_root_signers: Sequence[Signer] = (),
    threshold: int | None = None,
    expiry_s: Mapping[str, float] | None = None,
) -> Root:
    """A new root version: the online roles' key replaced by ``online_key`` and/or the root keys by
    ``new_root_signers`` (with ``threshold``). ``root_signers``: at least the current root
    threshold of current root keys. The new root is signed by old and new root keys, as clients
    require. Returns the new root; the server re-signs the online roles with the new key when it
    opens the registry with it (robots then forget the old timestamp and snapshot: fast-forward
    recovery)."""
    repo = TufRepository(directory, {Root.type: [*root_signers, *new_root_signers]}, expiry_s=expiry_s)
    repo.require_root()
    with repo.edit_root() as root:
        if online_key is not None:
            for role in ONLINE_ROLES:
                for keyid in list(root.roles[role].keyids):
                    root.revoke_key(keyid, role)
                root.add_key(online_key, role)
        if new_root_signers:
            for keyid in list(root.roles[Root.type].keyids):
                root.revoke_key(keyid, Root.type)
            for signer in new_root_signers:
                root.add_key(signer.public_key, Root.type)
        if threshold is not None:
            if not 1 <= threshold <= len(root.roles[Root.type].keyids):
                raise ValueError(f"root threshold {threshold} needs 1..{len(root.roles[Root.type].keyids)} root keys")
            root.roles[Root.type].threshold = threshold
    return repo.require_root()
