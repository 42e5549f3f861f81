"""Keeping a long-running store's size bounded: pins and maintenance (docs/store.md, "Maintenance").

Every commit writes a new snapshot, a transaction log, the new chunks of each array it touches and a new
version of each of those arrays' manifest pieces; the versions it replaces stay for the snapshots that
use them. A store that commits one small episode at a time grows by ~150 KiB a commit that way (a soak:
7 robots, 27 minutes, 1.1 GB for 7,600 episodes of 1.7 KB; 25 MB once collected). Maintenance expires the
history older than ``StoreConfig.keep_history_s`` (Icechunk's ``expire_snapshots``) and deletes what no
branch or tag reaches any more (``garbage_collect``), sparing every object written in the last
``StoreConfig.gc_grace_s`` (a commit in flight has written its chunks but not yet moved the branch).

A snapshot someone must read later (the data a policy was trained on, an iteration's start, an export)
is *pinned*: an Icechunk tag ``pin.<name>`` keeps it, and everything it reads, through any maintenance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import os
import re
import time
from collections.abc import Iterator

import icechunk

from fleet.store import backend
from fleet.store.layout import BRANCH, MAINTENANCE_LOCK_FILE
from fleet.store.location import Location

PIN_PREFIX = "pin."
PIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")


@dataclasses.dataclass(frozen=True)
class MaintenanceReport:
    """What one maintenance run did: snapshots expired from the history, objects and bytes deleted."""

    expired_snapshots: int
    deleted_objects: int
    deleted_bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SpentPinName(ValueError):
    """A pin name that was unpinned once: Icechunk keeps deleted tag names, so it cannot pin again."""


def pin(repo: icechunk.Repository, location: Location, snapshot_id: str, name: str) -> None:
    """Pin ``snapshot_id`` as ``name``: maintenance keeps it readable. Pinning the same snapshot under the same
    name again does nothing; a name already pinning another snapshot, or a snapshot not in the store, is a ValueError.
    A name once unpinned cannot pin again (Icechunk keeps deleted tag names): :class:`SpentPinName`."""
    if not PIN_NAME.fullmatch(name):
        raise ValueError(f"pin name {name!r}: use 1 to 200 letters, digits, '_', '-' or '.'")
    with backend.answering(location):  # storage that did not answer: StoreUnreachableError, as any call
        try:
            repo.create_tag(PIN_PREFIX + name, snapshot_id)
            return
        except icechunk.IcechunkError as exc:
            refused = exc
        held = pins(repo, location).get(name)
    if held == snapshot_id:
        return  # pinned already (a redone iteration pins its start again)
    if held is not None:
        raise ValueError(f"pin {name!r} already holds snapshot {held}, not {snapshot_id}: pick another name")
    if backend.UNANSWERED_MARKER in str(refused) and "not found" not in str(refused):
        with backend.answering(location):
            raise refused
    if "already exists" in str(refused) and _in_store(repo, location, snapshot_id):  # no pin holds the name, Icechunk has it: unpinned
        raise SpentPinName(
            f"pin name {name!r} was unpinned before, and a name pins once in the store at {location} (Icechunk keeps "
            "deleted tag names): pin under another name"
        )
    raise ValueError(f"cannot pin snapshot {snapshot_id} of the store at {location}: {backend.short_reason(refused)}")


def _in_store(repo: icechunk.Repository, location: Location, snapshot_id: str) -> bool:
    with backend.answering(location):
        try:
            repo.lookup_snapshot(snapshot_id)
        except icechunk.IcechunkError as exc:
            if backend.UNANSWERED_MARKER in str(exc) and "not found" not in str(exc):
                raise
            return False
    return True


def unpin(repo: icechunk.Repository, location: Location, name: str) -> None:
    """Let maintenance expire what pin ``name`` kept (LookupError: no such pin)."""
    with backend.answering(location):
        if PIN_PREFIX + name not in repo.list_tags():
            raise LookupError(f"no pin {name!r} in the store at {location} (`flywheel store pins` lists them)")
        repo.delete_tag(PIN_PREFIX + name)


def pin_names(repo: icechunk.Repository, location: Location) -> list[str]:
    """The pins' names, sorted: one listing (``pins`` reads each one's snapshot id too)."""
    with backend.answering(location):
        return sorted(tag[len(PIN_PREFIX) :] for tag in repo.list_tags() if tag.startswith(PIN_PREFIX))


def pins(repo: icechunk.Repository, location: Location) -> dict[str, str]:
    """Pin name -> snapshot id. ``repo``: the store's open repository (a tag is a ref: any handle reads and writes it)."""
    names = pin_names(repo, location)
    with backend.answering(location):
        return {name: repo.lookup_tag(PIN_PREFIX + name) for name in names}


class MaintenanceBusy(RuntimeError):
    """Another process is maintaining this (local) store: this run did nothing, the other does the work."""


def maintain(location: Location, keep_history_s: float, gc_grace_s: float) -> MaintenanceReport:
    """Expire the history older than ``keep_history_s`` and delete what nothing reaches any more, except objects
    younger than ``gc_grace_s``. Safe beside writers and readers of the branch's recent snapshots and of pinned
    ones (Icechunk's own rule for running both beside a live repository); a reader of an unpinned snapshot older
    than ``keep_history_s`` may find it gone. On a local store one run at a time (:class:`MaintenanceBusy` for the
    others: replicas on one host overlapped, each deleting what the other had, and Icechunk logged an ERROR line for
    every file already gone, ~15,000 a minute); on object storage a delete of what is gone succeeds."""
    with _only_run(location):
        return _maintain(location, keep_history_s, gc_grace_s)


@contextlib.contextmanager
def _only_run(location: Location, wait: bool = False) -> Iterator[None]:
    """While the block runs, no other process maintains the local store at ``location`` (:class:`MaintenanceBusy` where
    one does already, or with ``wait`` once it is done: a backup's copy, fleet/store/backup.py, holds it too)."""
    if not location.is_local:
        yield
        return
    fd = os.open(location.path / MAINTENANCE_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MaintenanceBusy(f"another process is maintaining (or backing up) the store at {location}; this run is skipped") from None
        yield
    finally:
        os.close(fd)  # lets the lock go


no_maintenance = functools.partial(_only_run, wait=True)  # for a block that must see no object deleted (a backup's copy)


def _maintain(location: Location, keep_history_s: float, gc_grace_s: float) -> MaintenanceReport:
    start = time.monotonic()
    now = datetime.datetime.now(datetime.timezone.utc)
    repo = backend.open_repo(location)  # caches of its own: the writers' hold snapshots as they were before the edit
    with backend.answering(location):
        expired = repo.expire_snapshots(kept_since(repo, now - datetime.timedelta(seconds=keep_history_s)))
        summary = repo.garbage_collect(now - datetime.timedelta(seconds=gc_grace_s))
    deleted = summary.chunks_deleted + summary.manifests_deleted + summary.snapshots_deleted + summary.attributes_deleted + summary.transaction_logs_deleted
    return MaintenanceReport(len(expired), deleted, summary.bytes_deleted, round(time.monotonic() - start, 3))


def kept_since(repo: icechunk.Repository, cutoff: datetime.datetime) -> datetime.datetime:
    """What to expire before: the time of the branch's snapshot that was its newest at ``cutoff``, so that a snapshot
    stays ``keep_history_s`` after it stopped being the newest, not after it was written (a quiet store's tip, written
    hours ago, was read at once by a reader that a commit a second later would have left without it; a rebase walks
    back to the tip it started from)."""
    for info in repo.ancestry(branch=BRANCH):
        if info.written_at <= cutoff:
            return info.written_at  # expire_snapshots keeps this one: it is not older than itself
    return cutoff
