"""The policy registry's TUF repository (python-tuf): the metadata robots verify before they install.

Roles (The Update Framework; docs/security.md):

    root       names every role's keys and thresholds; signed by a threshold of *offline* root
               keys (default 2 of 3), never by the server. A new root version is signed by the
               old threshold and the new one, so a robot can walk from the root it was
               provisioned with to the newest (key rotation).
    targets    every target file (policy manifests, weights, the rollout) by path, length and
               sha256: signed by the release key where root names one (kept where releases are
               made, off the serving replicas), else by the online key.
    snapshot   online key: the version of the targets metadata (no mix-and-match of metadata).
    timestamp  online key, short-lived (default 1 day): the version of the snapshot. The server
               re-signs it long before it expires, so a robot that is handed an expired one
               knows its registry is frozen (an attacker replaying old metadata, or a dead
               server) and says so.

Layout under ``<dir>`` (a local directory or ``s3://bucket/prefix``: fleet/registry/files.py),
every file written whole::

    metadata/<N>.root.json      every root version; metadata/root.json is the newest (provision robots with it)
    metadata/timestamp.json
    metadata/<N>.snapshot.json  consistent snapshots: a robot that read timestamp N reads exactly
    metadata/<N>.targets.json   the snapshot and targets it names (the last KEEP versions stay)
    targets/<dir>/<sha256>.<name>
    expiry_s.json               the role lifetimes every signer signs with (robots never read it):
                                recorded by a signer given a setting (:meth:`TufRepository.record_expiry`)

The commit: target files, then ``<N>.targets.json``, then ``<M>.snapshot.json``, then
``timestamp.json`` last. A change is published when its timestamp is written; a writer killed
before that leaves the previous state served (tests/test_power_cut.py), so a reader never sees a
timestamp that names metadata not yet written. Several writers (server replicas on several hosts,
one storage): versioned names are written once (create-only), and the timestamp is replaced only
if it is still the one the change started from (compare-and-swap). A writer that loses either race
catches up with the published state and makes its change again (:meth:`TufRepository.change`); a
versioned name that is taken but never published (by a loser, or a writer that died) is skipped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer
from tuf.repository import Repository

from fleet.registry.files import Opened, RegistryFiles, WriteConflict, open_files
from fleet.registry.http_cache import IMMUTABLE, REVALIDATE, metadata_cache_control
from fleet.registry.s3 import S3Error

log = logging.getLogger(__name__)
T = TypeVar("T")
ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
EXPIRY_S = {Root.type: 365 * 86400.0, Targets.type: 7 * 86400.0, Snapshot.type: 7 * 86400.0, Timestamp.type: 86400.0}
EXPIRY_SLACK_S = 60.0  # how far past its configured life metadata may expire before it is re-signed (clocks of replicas differ)
MIN_EXPIRY_S = 5 * EXPIRY_SLACK_S  # a role's shortest life: re-signed at half of it, up to EXPIRY_SLACK_S late
MAX_EXPIRY_S = 10 * 365 * 86400.0  # a role's longest life: 10 years (a datetime overflows long before 1e300 s)
EXPIRY_FILE = "expiry_s.json"  # beside metadata/: the lifetimes of the roles, the same for every signer of the repository
KEEP = 16  # snapshot and targets metadata versions kept on disk (robots mid-refresh still find theirs)
COMMIT_ATTEMPTS = 12  # changes redone after losing a race to another writer before RegistryBusy
SKIP_TAKEN = 16  # taken snapshot or targets version numbers skipped in one change
TIMESTAMP = "metadata/timestamp.json"
# a root field (ignored by TUF clients): the sha256 of the timestamp, snapshot and targets metadata published when that
# root was made. Signed by a key the root rotated out, only those exact files are built on (until re-signed): anything
# else such a key signs (its thief's) is refused, however many rotations back the key was trusted
ROTATION_PINS = "x-flywheel-published-at-rotation"
JUMP_HEADROOM = 10**6  # versions a restore's jump leaves free below MAX_METADATA_VERSION (years of signings)
MAX_METADATA_VERSION = 10**9 - 1  # versioned metadata names carry at most 9 digits (_METADATA_NAME: the server serves no other)
_METADATA_NAME = re.compile(r"^(?:(\d{1,9})\.(root|snapshot|targets)|root|timestamp)\.json$")
_VERSIONED = re.compile(r"^(\d{1,9})\.(root|snapshot|targets)\.json$")
_TARGET_PATH = re.compile(r"^(?:[A-Za-z0-9_-]+/)*[0-9a-f]{64}\.[A-Za-z0-9_.-]+$")


class RepositoryNotInitialised(RuntimeError):
    """No root metadata: run the key ceremony first (``flywheel-registry init``)."""


class RegistryCorrupted(RuntimeError):
    """The published metadata is not what a registry key signed (changed by someone else), or went back."""


class RegistryBusy(RuntimeError):
    """Other writers committed first COMMIT_ATTEMPTS times in a row."""


class ReleaseKeyMissing(ValueError):
    """The root names a release key for targets, and this process does not hold it: it serves, it does not release."""


class OnlineKeyRotated(RuntimeError):
    """The root names another online key (snapshot, timestamp) than this process holds: a rotation made while it ran.
    Every change ends in a snapshot and a timestamp, so it signs nothing until restarted with the key the root names."""


def online_key_advice(root: Root, held: Sequence[Signer]) -> str:
    """What to do where the online key ``held`` is not the one ``root`` names (the text of :class:`OnlineKeyRotated`)."""
    keyid = held[0].public_key.keyid[:16] if held else "(none)"
    return (
        f"the online key (keyid {keyid}...) is not the key root v{root.version} names for snapshot and timestamp "
        f"(keyid {root.roles[Timestamp.type].keyids[0][:16]}...): a rotation (`flywheel-registry rotate --online-key`) replaced it while "
        "this server ran, so it signs nothing (no release; timestamp.json is served as it is until it expires): restart the "
        "server with the online key the root names (docs/security.md, Key ceremonies)"
    )


def check_expiry_s(expiry_s: Mapping, name: str = "expiry_s") -> dict[str, float]:
    """``expiry_s`` (role -> seconds) as floats; ValueError naming ``name`` and the role unless each key is a role
    (root, targets, snapshot, timestamp) and each life a number of seconds from MIN_EXPIRY_S (5 minutes: metadata is
    re-signed at half its life, up to a minute late) to MAX_EXPIRY_S (10 years)."""
    checked = {}
    for role, seconds in expiry_s.items():
        if role not in EXPIRY_S:
            raise ValueError(f"{name}: {role!r} is no role; the roles are {', '.join(EXPIRY_S)}")
        try:
            life = float(seconds) if not isinstance(seconds, bool) else math.nan
        except (TypeError, ValueError):
            life = math.nan
        if not (math.isfinite(life) and MIN_EXPIRY_S <= life <= MAX_EXPIRY_S):
            raise ValueError(
                f"{name} {role}={seconds!r}: a role's life is a number of seconds from {MIN_EXPIRY_S:g} (metadata is re-signed at half "
                f"its life, up to {EXPIRY_SLACK_S:g} s late) to {MAX_EXPIRY_S:g} (10 years)"
            )
        checked[role] = life
    return checked


class TufRepository(Repository):
    """A TUF repository in a directory or a bucket (``where``: fleet/registry/files.py).
    ``signers``: role -> the signers this process holds for it (the server: the online key for
    targets, snapshot and timestamp; a key ceremony: root keys too). Nothing is written that a
    client would refuse: each new version must meet its role's threshold.

    ``expiry_s``: this process's setting of the roles' lifetimes (roles it does not name: ``EXPIRY_S`` until
    :meth:`record_expiry`, which makes it the repository's for the roles it names, in ``expiry_s.json``, and reads
    the others from there). Without one, this process signs
    with the lifetimes recorded there (the defaults where none are), and so does every other signer:
    two signers never re-sign each other's metadata for lives of their own.

    What this object holds in memory is the published state as of its last :meth:`reload`; reads
    (``open``, ``target_listing``) catch up first, at the cost of one read of timestamp.json."""

    def __init__(self, where: str | Path | RegistryFiles, signers: Mapping[str, Sequence[Signer]], *, expiry_s: Mapping[str, float] | None = None, clock=time.time, lenient_expiry: bool | None = None):
        self.files = open_files(where)
        self.dir = self.files.local_dir  # the directory on this host, None on object storage (for tools that look at the files)
        self.metadata_dir = self.targets_dir = None
        if self.dir is not None:  # made by the first write (LocalFiles.write): a read (`flywheel-registry show`) makes nothing
            self.metadata_dir, self.targets_dir = self.dir / "metadata", self.dir / "targets"
        self.signers = {role: list(s) for role, s in signers.items()}
        # a corrupt expiry_s.json is warned about and read as the defaults (never blocks a key ceremony: show, rotate);
        # by default where this process holds no online key (it signs only roots)
        self.lenient_expiry = not any(self.signers.get(role) for role in ONLINE_ROLES) if lenient_expiry is None else lenient_expiry
        self.configured_expiry = check_expiry_s(expiry_s or {})
        self.expiry_s = {**EXPIRY_S, **self.configured_expiry} if self.configured_expiry else {**EXPIRY_S, **(self._expiry_record() or {})}
        self.clock = clock
        self.lock = threading.RLock()  # one change at a time in this process (other writers: conditional writes)
        self._md: dict[str, Metadata] = {}
        self._timestamp_tag: str | None = None  # the version of timestamp.json that _md was read from
        self._editing = False  # inside change(): _md is the change's own state
        self._dirty = True  # _md may hold what was never committed (a change failed): reload whole
        self.commit_retries = 0  # changes redone because another writer committed first
        self._stale_warned_at: dict[str, float] = {}  # why this process cannot re-sign what is due -> when it was last said
        self._published: dict[str, int] = {}  # snapshot and targets versions as last read published or committed (never a lost change's)
        self.reload()

    # -- python-tuf Repository ------------------------------------------------------------
    def open(self, role: str) -> Metadata:
        with self.lock:  # not while another thread's change is half written
            self.reload()
            if role in self._md:
                return copy.deepcopy(self._md[role])
        md = Metadata({Root.type: Root, Targets.type: Targets, Snapshot.type: Snapshot, Timestamp.type: Timestamp}[role]())
        md.signed.version = 0  # close() makes it 1
        return md

    def can_sign(self, role: str) -> bool:
        """Whether this process holds a key the root names for ``role``."""
        root = self.require_root()
        return any(s.public_key.keyid in root.roles[role].keyids for s in self.signers.get(role, []))

    def require_online(self) -> None:
        """:class:`OnlineKeyRotated` unless this process holds the online key the root names: asked before a change
        writes anything (targets signed and then no snapshot would be left behind, never published)."""
        if not (self.can_sign(Snapshot.type) and self.can_sign(Timestamp.type)):
            raise OnlineKeyRotated(online_key_advice(self.require_root(), self.signers.get(Timestamp.type, [])))

    def close(self, role: str, md: Metadata) -> None:
        md.signed.version += 1
        if md.signed.version > MAX_METADATA_VERSION:  # its file name would not be served: robots would never see it
            raise RegistryCorrupted(f"{role} metadata would reach version {md.signed.version}, past the {MAX_METADATA_VERSION} its file names can carry; nothing was signed")
        for _ in range(SKIP_TAKEN):
            try:
                self._write(role, md)
                break
            except WriteConflict:
                if role not in (Snapshot.type, Targets.type):
                    raise
                md.signed.version += 1  # taken by a change that lost its race or died before its timestamp: never published
        else:
            raise WriteConflict(f"{SKIP_TAKEN} {role} versions in a row are taken in {self.files.location}: another writer is ahead")
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

    def release_key_advice(self, root: Root | None = None) -> str:
        """What to do where the targets key is not held (the text of :class:`ReleaseKeyMissing`), naming this registry's
        location as ``flywheel-registry --dir`` takes it (``root``: the root in force; None: the trusted one)."""
        root = root or self.require_root()
        keyid = root.roles[Targets.type].keyids[0][:16]
        registry = self.files.location.removesuffix("/tuf")
        return (
            f"only the release key (keyid {keyid}..., named by root v{root.version} for targets) signs releases, and this process "
            "does not hold it: release where it is kept (the loop's <run>/keys/release.pem; flywheel-server fleet.registry.release_key=FILE), "
            f"or re-sign where both keys are with `flywheel-registry refresh --dir {registry} --online-key ONLINE.pem --release-key RELEASE.pem` "
            "(docs/security.md, The release key)"
        )

    def require_root(self) -> Root:
        if not self.initialised:
            raise RepositoryNotInitialised(
                f"{self.files.location}/metadata has no root metadata: create it with the offline root keys first "
                "(`flywheel-registry init`, docs/security.md)"
            )
        return self._md[Root.type].signed

    def reload(self) -> bool:
        """Catch up with the published state (another writer may have published since): one read of
        timestamp.json when nothing changed. True if something did. Inside a change, a no-op."""
        with self.lock:
            if self._editing:
                return False
            timestamp = self.files.read_tagged(TIMESTAMP)
            if timestamp is not None and timestamp[1] == self._timestamp_tag and not self._dirty:
                return False
            self._md = self._load_published(timestamp)
            self._timestamp_tag, self._dirty = (timestamp[1] if timestamp else None), False
            self._note_published()
            return True

    def reload_all(self) -> None:
        """Read the whole published state again, roots too (``reload`` reads more only when timestamp.json changed): a
        key rotation made while this process ran is seen before it signs a release."""
        with self.lock:
            if not self._editing:
                self._dirty = True
                self.reload()

    def change(self, edit: Callable[[], T]) -> T:
        """Run ``edit``, which publishes through ``close``, on the newest published state. When
        another writer committed first (a versioned name or the timestamp got there before ours),
        catch up and run ``edit`` again; RegistryBusy after COMMIT_ATTEMPTS such races. Inside
        another change, ``edit`` just runs: the outer change commits and retries."""
        with self.lock:
            if self._editing:
                return edit()
            for attempt in range(COMMIT_ATTEMPTS):
                self.reload()
                self._editing = self._dirty = True  # until edit returns, _md may hold what is not committed
                try:
                    result = edit()
                except WriteConflict as exc:
                    self.commit_retries += 1
                    log.info("lost a race to another writer of %s (%s); catching up, attempt %d", self.files.location, exc, attempt + 1)
                    time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))
                    continue
                finally:
                    self._editing = False
                self._dirty = False
                self._note_published()
                return result
            raise RegistryBusy(
                f"{COMMIT_ATTEMPTS} changes in a row to {self.files.location} lost to other writers: "
                "several replicas publishing without pause? try again, or publish from one"
            )

    def store_target(self, path: str, data: bytes) -> TargetFile:
        """Write a target file under its hash-prefixed name; returns its TargetFile (not yet listed)."""
        info = TargetFile.from_data(path, data, ["sha256"])
        name = self._stored(path, info.hashes["sha256"])
        if not self.files.exists(name):  # the same name is the same content, whoever wrote it
            self.files.write(name, data, cache_control=IMMUTABLE)
        return info

    def publish_targets(self, add: Mapping[str, TargetFile], remove: Sequence[str] = ()) -> None:
        """List ``add`` (and drop ``remove``) in a new targets version, then snapshot, then timestamp."""

        def edit() -> None:
            self._require_newest_root()
            self.require_online()
            if not self.can_sign(Targets.type):
                raise ReleaseKeyMissing(self.release_key_advice())
            self._follow_expiry()
            with self.edit_targets() as targets:
                for path in remove:
                    targets.targets.pop(path, None)
                targets.targets.update(add)
            self.do_snapshot(force=True)
            self.do_timestamp(force=True)

        self.change(edit)

    def jump_versions(self, margin: int) -> dict[str, int]:
        """Re-sign targets, snapshot and timestamp at their published versions plus ``margin``, committed as a publication
        is (targets, snapshot, then timestamp): after a restore from a backup, past every version signed since the backup,
        which robots trust (a TUF client refuses a version lower than the one it trusts, and takes any jump forward).
        Needs the online key and the targets key; ValueError where a version would pass ``MAX_METADATA_VERSION``. Returns
        the new versions by role."""

        def edit() -> dict[str, int]:
            self._require_newest_root()
            self.require_online()
            if not self.can_sign(Targets.type):
                raise ReleaseKeyMissing(self.release_key_advice())
            if Timestamp.type not in self._md:
                raise RepositoryNotInitialised(f"{self.files.location} has published nothing yet: there is no version to jump past")
            self.check_jump(margin)
            self._follow_expiry()
            with self.edit_targets() as targets:
                targets.version += margin - 1  # close() adds the last one
            with self.edit_snapshot() as snapshot:
                snapshot.version += margin - 1
                snapshot.meta["targets.json"] = self.targets_infos["targets.json"]
            with self.edit_timestamp() as timestamp:
                timestamp.version += margin - 1
                timestamp.snapshot_meta = self.snapshot_info
            return {role: self._md[role].signed.version for role in ONLINE_ROLES}

        return self.change(edit)

    def check_jump(self, margin: int) -> None:
        """ValueError unless :meth:`jump_versions` by ``margin`` (an integer >= 1) leaves JUMP_HEADROOM versions below
        ``MAX_METADATA_VERSION`` for the signings after it (a jump to the last version left the next release a 10-digit
        name the server does not serve: robots stuck), saying the largest margin that fits."""
        newest = max((self._md[role].signed.version for role in ONLINE_ROLES if role in self._md), default=0)
        largest = MAX_METADATA_VERSION - JUMP_HEADROOM - newest
        if isinstance(margin, bool) or not isinstance(margin, int) or not 1 <= margin <= largest:
            fits = f"an integer from 1 to {largest}" if largest >= 1 else "none fits"
            raise ValueError(
                f"metadata margin {margin!r}: {fits} (the newest metadata version here is {newest}; metadata names carry at most 9 digits, "
                f"and {JUMP_HEADROOM:,} versions stay free for the signings after the jump)"
            )

    def refresh_online(self, *, check_keys: bool = False) -> list[str]:
        """Re-sign what is past half its lifetime (targets, snapshot, timestamp); with
        ``check_keys`` also what does not verify under the current root (signed by a rotated-out
        key: a server starting after a key rotation). Returns the roles re-signed, in order. Where a
        rotation took this process's online key out while it ran, nothing is signed: said at most
        once an hour (:class:`OnlineKeyRotated`'s advice), and the published files stay served."""
        return self.change(lambda: self._refresh_online(check_keys))

    def _refresh_online(self, check_keys: bool) -> list[str]:
        root = self.require_root()
        if Timestamp.type not in self._md:  # a new repository: its first targets, snapshot, timestamp
            if not self.can_sign(Targets.type):
                raise ReleaseKeyMissing(f"{self.files.location} has no targets metadata yet: {self.release_key_advice(root)}")
            self.publish_targets({})
            return list(ONLINE_ROLES)
        self._warn_root_expiry(root)
        stale = {role: self._stale(role, root, check_keys) for role in ONLINE_ROLES}
        # what is due is judged by the lifetimes recorded now: read where this process can sign a role that is due (a replica
        # without the release key, with targets past half its life, would read the record at every timestamp request)
        if any(stale[role] and self.can_sign(role) for role in ONLINE_ROLES) and self._follow_expiry():
            stale = {role: self._stale(role, root, check_keys) for role in ONLINE_ROLES}
        if not any(stale.values()):
            return []
        self._require_newest_root()
        try:
            self.require_online()
        except OnlineKeyRotated as exc:
            self._warn_stale(next(role for role in ONLINE_ROLES if stale[role]), str(exc))
            return []
        done = []
        if stale[Targets.type] and not self.can_sign(Targets.type):  # held where releases are made
            self._warn_stale(Targets.type, self.release_key_advice(root))
        elif stale[Targets.type]:
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

    def record_expiry(self) -> None:
        """Make this process's ``expiry_s`` setting the repository's lifetimes for the roles it names (``expiry_s.json``),
        which every signer of it signs with from its next signature on; the roles it does not name keep what was recorded
        for them (the defaults where nothing is). Said where that changes what was recorded. Nothing without a setting
        (the process signs with the recorded lifetimes)."""
        if not self.configured_expiry:
            return
        try:
            recorded = self._expiry_record(lenient=False)
        except RegistryCorrupted as exc:
            if set(self.configured_expiry) != set(EXPIRY_S):  # what the record held for the roles not named is lost
                raise RegistryCorrupted(f"{exc} (this process's expiry_s names {', '.join(self.configured_expiry)} only)") from None
            log.warning("%s: overwritten with this process's expiry_s, which names every role", exc)
            recorded = None
        merged = {**(recorded or {}), **self.configured_expiry}
        if merged != recorded:
            if recorded is not None:
                log.warning(
                    "%s: the registry's role lifetimes change from %s to %s (this process's expiry_s: %s): every signer of it signs "
                    "with these from now on; give every signer the same setting for a role, or set it on one and none on the others",
                    self.files.location, _lives({**EXPIRY_S, **recorded}), _lives({**EXPIRY_S, **merged}), _lives(self.configured_expiry),
                )  # fmt: skip
            self.files.write(EXPIRY_FILE, json.dumps(merged, sort_keys=True).encode(), cache_control=REVALIDATE)
        self.expiry_s = {**EXPIRY_S, **merged}

    def target_listing(self) -> dict[str, TargetFile]:
        """The published targets by path."""
        with self.lock:
            self.reload()
            return dict(self._md[Targets.type].signed.targets) if Targets.type in self._md else {}

    def listed_bytes(self, path: str) -> bytes | None:
        """A published target's content (None if ``path`` is not listed), checked as a robot checks it: a file of
        another length or sha256 than listed (changed where it is stored) is :class:`RegistryCorrupted`, never built on
        (a rollback would sign it anew)."""
        info = self.target_listing().get(path)
        if info is None:
            return None
        name = self._stored(path, info.hashes["sha256"])
        data = self._read(name)
        if len(data) != info.length or hashlib.sha256(data).hexdigest() != info.hashes["sha256"]:
            raise RegistryCorrupted(f"{self.files.location}/{name} is not the file the targets metadata lists (its length or sha256 differ): restore the file the registry wrote")
        return data

    def read_metadata(self, name: str) -> bytes | None:
        """The file behind a metadata URL name (``timestamp.json``, ``3.snapshot.json``...), None if there is none."""
        return self.files.read(f"metadata/{name}") if _METADATA_NAME.match(name) else None

    def open_target(self, url_path: str) -> Opened | None:
        """The file behind a hash-prefixed target URL path, opened to be served; None if not a stored target."""
        if not _TARGET_PATH.match(url_path) or ".." in url_path:
            return None
        return self.files.open(f"targets/{url_path}")

    # -- internals ----------------------------------------------------------------------------
    def _expiry_record(self, *, lenient: bool | None = None) -> dict[str, float] | None:
        """The role lifetimes recorded for the repository (None: none are, the defaults hold). A corrupt record:
        RegistryCorrupted, or where ``lenient`` (default: ``self.lenient_expiry``) a warning and None."""
        data = self.files.read(EXPIRY_FILE)
        if data is None:
            return None
        try:
            record = json.loads(data)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            return check_expiry_s(record, EXPIRY_FILE)
        except ValueError as exc:  # JSON's and Unicode's errors too
            message = (
                f"{self.files.location}/{EXPIRY_FILE} is not the registry's role lifetimes ({exc}): record them again with a setting that "
                f"names every role ({', '.join(EXPIRY_S)}), which overwrites it (a signer started with fleet.registry.expiry_s naming all "
                "four, or `flywheel-registry refresh --expiry-s root=S --expiry-s targets=S --expiry-s snapshot=S --expiry-s timestamp=S`), "
                "or delete it (the defaults hold, and a setting naming fewer roles may be recorded again)"
            )
            if not (self.lenient_expiry if lenient is None else lenient):
                raise RegistryCorrupted(message) from None
            log.warning("%s; reading it as the defaults", message)
            return None

    def _follow_expiry(self) -> bool:
        """Sign with the lifetimes recorded for the repository from now on (another signer may have recorded its setting
        since this process read them); True if they changed. Where they are not this process's own setting, said."""
        recorded = {**EXPIRY_S, **(self._expiry_record() or {})}
        if recorded == self.expiry_s:
            return False
        if any(recorded[role] != life for role, life in self.configured_expiry.items()):
            log.warning(
                "%s: the registry's role lifetimes are %s (recorded by another signer since this process started), not this "
                "process's expiry_s %s: signing with the registry's, as every signer does. Give every signer the same setting, "
                "or set it on one and none on the others (docs/security.md, Roles and keys)",
                self.files.location, _lives(recorded), _lives(self.configured_expiry),
            )  # fmt: skip
        self.expiry_s = recorded
        return True

    def _warn_stale(self, role: str, advice: str) -> None:
        """``role``'s metadata past half its life (or signed by a key rotated out) that this process cannot
        re-sign (``advice``: why, and what to do): said at most once an hour for each reason. Robots refuse it
        once expired (a freeze, which they report), and keep the policy they run."""
        now = self.clock()
        if now - self._stale_warned_at.get(advice, float("-inf")) < 3600.0:
            return
        self._stale_warned_at[advice] = now
        expires = self._md[role].signed.expires.isoformat()
        log.warning("the %s metadata of %s (expires %s) needs re-signing, and %s", role, self.files.location, expires, advice)

    def _warn_root_expiry(self, root: Root) -> None:
        """The root past half its life (or expired): said at most once an hour, naming the expiry and the ceremony that
        renews it. No server holds the root keys, so nothing here can re-sign it; once it has expired every robot refuses
        the registry (``freeze: Final root.json is expired``) until it is renewed, and nothing said so before."""
        left = root.expires.timestamp() - self.clock()
        if left >= self.expiry_s[Root.type] / 2:
            return
        now = self.clock()
        if now - self._stale_warned_at.get(Root.type, float("-inf")) < 3600.0:
            return
        self._stale_warned_at[Root.type] = now
        when = f"in {left / 86400:.1f} days" if left > 0 else "already: every robot refuses this registry (freeze: Final root.json is expired)"
        log.warning(
            "the root metadata of %s (root v%d) expires %s (%s) and only the offline root keys can renew it: run, where they are, "
            "`flywheel-registry rotate --dir REG --root-key ROOT_KEY ... --threshold %d` (a threshold of the root keys root v%d names; "
            "docs/security.md, Key ceremonies), then copy tuf/metadata/ to the server; robots follow at their next poll",
            self.files.location, root.version, root.expires.isoformat(), when, root.roles[Root.type].threshold, root.version,
        )  # fmt: skip

    def _require_newest_root(self) -> None:
        """:class:`WriteConflict` where a key ceremony wrote a root newer than the one this change read (one look,
        before anything is signed): :meth:`change` then reads the whole state again, roots too. A key the rotation
        took out signs nothing over the files that root pinned (a server restarted with the new key would refuse them)."""
        newer = f"metadata/{self.require_root().version + 1}.root.json"
        if self.files.exists(newer):
            raise WriteConflict(f"a key ceremony wrote {newer} since this process read the roots")

    def _stored(self, path: str, sha256: str) -> str:
        folder, _, name = path.rpartition("/")
        return "/".join(part for part in ("targets", folder, f"{sha256}.{name}") if part)

    def _read(self, name: str) -> bytes:
        data = self.files.read(name)
        if data is None:
            raise FileNotFoundError(f"{self.files.location}/{name} is named by the published metadata but missing: restore it (nothing may delete it)")
        return data

    def _write(self, role: str, md: Metadata) -> None:
        """Sign ``md`` and write it: a versioned name once (create-only); the timestamp only over
        the one this change started from (the commit); then old versions pruned."""
        data = self._signed(role, md)
        if role == Timestamp.type:
            tag = self._timestamp_tag
            self._timestamp_tag = self.files.write(TIMESTAMP, data, if_absent=tag is None, if_match=tag, cache_control=REVALIDATE)
            self._prune()
            return
        name = f"{md.signed.version}.{role}.json"
        self.files.write(f"metadata/{name}", data, if_absent=True, cache_control=metadata_cache_control(name))
        if role == Root.type:
            self.files.write("metadata/root.json", data, cache_control=REVALIDATE)

    def _signed(self, role: str, md: Metadata) -> bytes:
        md.signed.expires = datetime.fromtimestamp(int(self.clock() + self.expiry_s[role]), timezone.utc)
        md.signatures.clear()
        for signer in self.signers.get(role, []):
            md.sign(signer, append=True)
        self._check_signed(role, md)
        return md.to_bytes(JSONSerializer(compact=True))

    def _stale(self, role: str, root: Root, check_keys: bool) -> bool:
        """Due for re-signing: past half its life; or expiring later than the life this process signs it for (a shorter
        ``expiry_s`` since it was signed: robots would trust it, and a replay of it, that much longer), where this process
        signs ``role``; with ``check_keys`` also not signed under ``root``."""
        md = self._md[role]
        left = md.signed.expires.timestamp() - self.clock()
        if left < self.expiry_s[role] / 2 or (left > self.expiry_s[role] + EXPIRY_SLACK_S and self.can_sign(role)):
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

    def _load_published(self, timestamp: tuple[bytes, str] | None) -> dict[str, Metadata]:
        """What robots are served now: the newest root, then timestamp -> snapshot -> targets, each
        checked before this writer builds on it (RegistryCorrupted if not)."""
        md: dict[str, Metadata] = {}
        roots = sorted(int(m.group(1)) for m in map(_VERSIONED.match, self.files.list("metadata")) if m and m.group(2) == Root.type)
        if not roots:
            return md
        md[Root.type] = self._root_chain(roots)
        if timestamp is None:
            return md
        root, older = md[Root.type].signed, roots[:-1]
        md[Timestamp.type] = self._verified(root, older, Timestamp.type, TIMESTAMP, timestamp[0])
        before = self._md.get(Timestamp.type)
        if before is not None and md[Timestamp.type].signed.version < before.signed.version:
            raise RegistryCorrupted(
                f"{self.files.location}/{TIMESTAMP} went back from v{before.signed.version} to v{md[Timestamp.type].signed.version}: "
                "restored from an old backup, or replayed by someone who can write there; robots refuse it (rollback). Put the newest back"
            )
        name = f"metadata/{md[Timestamp.type].signed.snapshot_meta.version}.snapshot.json"
        md[Snapshot.type] = self._verified(root, older, Snapshot.type, name, self._read(name))
        name = f"metadata/{md[Snapshot.type].signed.meta['targets.json'].version}.targets.json"
        md[Targets.type] = self._verified(root, older, Targets.type, name, self._read(name))
        if md[Targets.type].signed.version != md[Snapshot.type].signed.meta["targets.json"].version:
            raise RegistryCorrupted(f"{self.files.location}/{name} holds targets v{md[Targets.type].signed.version}, not the version its name and the snapshot give")
        for role in (Snapshot.type, Targets.type):  # a snapshot pointed back (the online key can sign one) is no newer state to build on
            seen = self._published.get(role)
            if seen is not None and md[role].signed.version < seen:
                raise RegistryCorrupted(
                    f"{self.files.location}: the published {role} went back from v{seen} to v{md[role].signed.version} "
                    "(a snapshot signed to point at older targets: whoever holds the online key can sign one); robots refuse it "
                    "(rollback). Restore the newest"
                )
        return md

    def _note_published(self) -> None:
        self._published = {role: self._md[role].signed.version for role in (Snapshot.type, Targets.type) if role in self._md}

    def _root_chain(self, versions: list[int]) -> Metadata:
        """The newest root, each version checked as a client checks it: signed by a threshold of the previous
        version's root keys and of its own (a root planted with too few signatures is corruption, never built on)."""
        trusted = self._parsed(Root.type, f"metadata/{versions[0]}.root.json")
        for v in versions[1:]:
            new = self._parsed(Root.type, f"metadata/{v}.root.json")
            try:
                trusted.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
                new.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
            except Exception as exc:  # noqa: BLE001 - any verification failure: not a root of this registry
                raise RegistryCorrupted(
                    f"{self.files.location}/metadata/{v}.root.json is not signed by a threshold of root v{trusted.signed.version}'s keys "
                    f"and its own ({exc}): someone other than a key ceremony wrote it (robots refuse it); remove it"
                ) from None
            trusted = new
        return trusted

    def _parsed(self, role: str, name: str, data: bytes | None = None) -> Metadata:
        try:
            md = Metadata.from_bytes(self._read(name) if data is None else data)
        except DeserializationError as exc:
            raise RegistryCorrupted(f"{self.files.location}/{name} is not TUF metadata ({exc.__cause__ or exc}): restore the file the registry wrote") from None
        if md.signed.type != role:
            raise RegistryCorrupted(f"{self.files.location}/{name} holds {md.signed.type} metadata, not {role}: restore the file the registry wrote")
        return md

    def _verified(self, root: Root, older: list[int], role: str, name: str, data: bytes) -> Metadata:
        """``data``, the file ``name``, if a threshold of the keys that ``root`` (else one of the
        ``older`` root versions: before the server re-signs after a key rotation) names for ``role``
        signed it. A writer never builds on, nor re-signs, what no registry key signed."""
        md = self._parsed(role, name, data)
        if _verifies(root, role, md):
            return md
        if any(_verifies(self._parsed(Root.type, f"metadata/{v}.root.json").signed, role, md) for v in reversed(older)):
            pins = root.unrecognized_fields.get(ROTATION_PINS)
            if pins is None or hashlib.sha256(data).hexdigest() == pins.get(role):  # (None: a root made by an earlier build, unpinned)
                return md
            raise RegistryCorrupted(
                f"{self.files.location}/{name} is signed by a {role} key that root v{root.version} rotated out, and is not the file "
                "that was published when it was rotated: whoever holds the old key wrote it. Restore the file the registry wrote "
                "(or the one published at the rotation); nothing is built on it or re-signed"
            )
        raise RegistryCorrupted(
            f"{self.files.location}/{name} is not signed by the {role} keys of any root version: someone other than the registry "
            "wrote it (robots refuse it); restore the file the registry wrote"
        )

    def _prune(self) -> None:
        """Delete snapshot and targets versions KEEP or more behind the published ones. After the
        commit, so a failure here is logged and left to the next one."""
        try:
            for name in self.files.list("metadata"):
                match = _VERSIONED.match(name)
                if match and match.group(2) != Root.type and int(match.group(1)) <= self._md[match.group(2)].signed.version - KEEP:
                    self.files.delete(f"metadata/{name}")
        except (OSError, S3Error) as exc:
            log.warning("pruning old metadata of %s failed (%s); the next publication tries again", self.files.location, exc)


def _published_hashes(repo: TufRepository) -> dict[str, str]:
    """sha256 of the timestamp, snapshot and targets metadata ``repo`` publishes now (role -> hex), as loaded and checked."""
    pins = {}
    for role in (Timestamp.type, Snapshot.type, Targets.type):
        if role in repo._md:
            name = TIMESTAMP if role == Timestamp.type else f"metadata/{repo._md[role].signed.version}.{role}.json"
            pins[role] = hashlib.sha256(repo._read(name)).hexdigest()
    return pins


def _lives(expiry_s: Mapping[str, float]) -> str:
    """Role lifetimes for a message: ``timestamp 3600 s, snapshot 604800 s, ...``."""
    return ", ".join(f"{role} {expiry_s[role]:g} s" for role in EXPIRY_S if role in expiry_s)


def _verifies(root: Root, role: str, md: Metadata) -> bool:
    try:
        root.verify_delegate(role, md.signed_bytes, md.signatures)
        return True
    except Exception:  # noqa: BLE001 - any verification failure means: re-sign
        return False


# -- key ceremonies (offline: they need root keys) -------------------------------------------------
def check_key_set(root_keys: Sequence[Key], threshold: int, online_key: Key, release_key: Key | None = None) -> None:
    """ValueError unless the root keys are distinct, ``threshold`` is 1..their number, and the online key is none of
    them: a server holds the online key, and a stolen server must not bring one of the offline root keys with it.
    A ``release_key`` (targets) is none of the root keys either, and not the online key (whose targets it would take)."""
    if release_key is not None and release_key.keyid == online_key.keyid:
        raise ValueError(
            f"the release key (keyid {release_key.keyid[:16]}...) is the online key: a release key is kept off the servers, so give it "
            "its own key file (or leave it out, and the online key signs releases)"
        )
    if release_key is not None and release_key.keyid in [k.keyid for k in root_keys]:
        raise ValueError(f"the release key (keyid {release_key.keyid[:16]}...) is also a root key: give the release key its own key file")
    ids = [k.keyid for k in root_keys]
    if len(set(ids)) < len(ids):
        raise ValueError(f"the same root key is given twice (keyid {next(i for i in ids if ids.count(i) > 1)[:16]}...): give {len(ids)} different keys, or fewer")
    _check_threshold(threshold, len(ids))
    if online_key.keyid in ids:
        raise ValueError(
            f"the online key (keyid {online_key.keyid[:16]}...) is also a root key: the server holds the online key, so a stolen server "
            "would bring a root key with it; give the online key its own key file"
        )


def _check_threshold(threshold: int, root_keys: int) -> None:
    """ValueError unless a root of ``root_keys`` keys can meet ``threshold`` (and needs at least one)."""
    if not 1 <= threshold <= root_keys:
        raise ValueError(f"root threshold {threshold}: it must be 1..{root_keys}, the number of root keys the new root names")


def check_uninitialised(repo: TufRepository) -> None:
    """ValueError where ``repo`` has root metadata already: root v1 is made once, keys change by rotation."""
    if repo.initialised:
        raise ValueError(f"{repo.files.location}/metadata already has root metadata (v{repo.require_root().version}); rotate keys instead")


def check_rotation(current: Root, root_signers: Sequence[Signer], *, new_root_keys: int = 0, threshold: int | None = None) -> None:
    """What a rotation of ``current`` is refused for whatever new keys it names: ``root_signers`` that are not its root
    keys, or fewer than its threshold of them; a ``threshold`` (else the current one) outside 1..the root keys the new
    root names (``new_root_keys``, else the current ones). Asked before any new key file is made: a refused ceremony
    leaves no private key that no root names (:func:`rotate_keys` asks again, with the keys themselves)."""
    trusted, needed = current.roles[Root.type].keyids, current.roles[Root.type].threshold
    foreign = [s for s in root_signers if s.public_key.keyid not in trusted]
    if foreign:  # python-tuf would only say "signed by 0/2": say which key is not the root's
        raise ValueError(
            f"{len(foreign)} of the {len(root_signers)} root keys given (keyid {foreign[0].public_key.keyid[:16]}...) are not keys of "
            f"root v{current.version}, which names {len(trusted)} and needs {needed} of them: sign with the root keys robots trust"
        )
    given = len({s.public_key.keyid for s in root_signers})
    if given < needed:
        raise UnsignedMetadataError(
            f"root v{current.version + 1} would be signed by {given}/{needed} of root v{current.version}'s keys: give {needed} of the "
            f"{len(trusted)} root keys it names (--root-key)"
        )
    _check_threshold(threshold if threshold is not None else needed, new_root_keys or len(trusted))


def init_root(
    directory: str | Path, root_signers: Sequence[Signer], threshold: int, online_key: Key, *, release_key: Key | None = None,
    expiry_s: Mapping[str, float] | None = None,
) -> Root:  # fmt: skip
    """Create root v1: ``root_signers``' keys with ``threshold`` for root, ``online_key`` for snapshot and
    timestamp, and for targets ``release_key`` where given (else the online key). Whoever holds the targets
    key signs the first targets, snapshot and timestamp when it first opens the registry."""
    check_key_set([s.public_key for s in root_signers], threshold, online_key, release_key)  # before any file is made
    repo = TufRepository(directory, {Root.type: root_signers}, expiry_s=expiry_s)
    check_uninitialised(repo)
    with repo.edit_root() as root:
        root.unrecognized_fields[ROTATION_PINS] = {}  # nothing published before it
        for signer in root_signers:
            root.add_key(signer.public_key, Root.type)
        root.roles[Root.type].threshold = threshold
        for role in ONLINE_ROLES:
            root.add_key(release_key if role == Targets.type and release_key is not None else online_key, role)
    return repo.require_root()


def rotate_keys(
    directory: str | Path,
    root_signers: Sequence[Signer],
    *,
    online_key: Key | None = None,
    release_key: Key | None = None,
    new_root_signers: Sequence[Signer] = (),
    threshold: int | None = None,
    expiry_s: Mapping[str, float] | None = None,
) -> Root:
    """A new root version: the online key (snapshot, timestamp, and targets where no release key is named)
    replaced by ``online_key``; the targets key by ``release_key`` (which takes releases off the online key);
    and/or the root keys by ``new_root_signers`` (with ``threshold``). ``root_signers``: at least the current root
    threshold of current root keys. The new root is signed by old and new root keys, as clients
    require. Returns the new root; the server re-signs the online roles with the new key when it
    opens the registry with it (robots then forget the old timestamp and snapshot: fast-forward
    recovery), as :func:`resign_rotated` does right after the ceremony where it holds the new key."""
    repo = TufRepository(directory, {Root.type: [*root_signers, *new_root_signers]}, expiry_s=expiry_s)
    current = repo.require_root()
    check_rotation(current, root_signers, new_root_keys=len(new_root_signers), threshold=threshold)
    root_keys = [s.public_key for s in new_root_signers] or [current.get_key(k) for k in current.roles[Root.type].keyids]
    old_online = current.get_key(current.roles[Timestamp.type].keyids[0])
    old_release = current.get_key(current.roles[Targets.type].keyids[0])
    split = old_release.keyid != old_online.keyid  # targets has a release key of its own
    online = online_key if online_key is not None else old_online
    release = release_key if release_key is not None else (old_release if split else None)
    check_key_set(root_keys, threshold if threshold is not None else current.roles[Root.type].threshold, online, release)  # the threshold stays unless given
    pins = _published_hashes(repo)  # what the new root lets the rotated-out keys' signatures stand for
    with repo.edit_root() as root:
        root.unrecognized_fields[ROTATION_PINS] = pins
        for role in ONLINE_ROLES if online_key is not None or release_key is not None else ():
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            root.add_key(release if role == Targets.type and release is not None else online, role)
        if new_root_signers:
            for keyid in list(root.roles[Root.type].keyids):
                root.revoke_key(keyid, Root.type)
            for signer in new_root_signers:
                root.add_key(signer.public_key, Root.type)
        if threshold is not None:
            root.roles[Root.type].threshold = threshold
    return repo.require_root()


def resign_rotated(directory: str | Path, online: Signer, release: Signer | None = None) -> list[str]:
    """Right after a rotation to the online key ``online`` (and ``release``, where the same ceremony rotated in the
    release key): re-sign, with them, what the newest root no longer verifies, as a server restarted with them would
    (snapshot and timestamp; targets where ``online`` or ``release`` signs them, never what neither key signs), and what
    is due. Robots then find nothing signed by a key the newest root took out (they counted a ``signature`` refusal at
    each poll until a server restarted or ``refresh`` ran), and a server still running the old key serves these files.
    Nothing before the first publication (the releaser makes it). Returns the roles re-signed, in order."""
    targets = [s for s in (release, online) if s is not None]
    repo = TufRepository(directory, {Targets.type: targets, Snapshot.type: [online], Timestamp.type: [online]}, lenient_expiry=True)
    if Timestamp.type not in repo._md:
        return []
    return repo.refresh_online(check_keys=True)
