"""A consistent copy of a local episode store, taken while servers write it (``flywheel store backup``).

A store's folder holds write-once objects (snapshots, manifests, transaction logs, chunks) and the refs
that name each branch's newest snapshot and the pins. A plain ``cp -a`` or ``tar`` of a store being
written copies ``snapshots/`` before ``refs/`` (the directory's order), so a commit in between leaves
the copied ref naming a snapshot the copy lacks, and the copy does not open ("damaged"). Here the
tip is pinned first (maintenance cannot expire it while a long copy runs), the refs are copied
before any object, then the objects: every object the copied refs reach was written before them.
Objects deleted while they are copied (maintenance's garbage) are skipped. The copy is checked (it
opens, and its tip's every manifest reads) in ``<to>.partial`` and renamed into place last, so a
half-taken backup is never taken for one. The copy lets go of the backup's pin; the store does too.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from fleet.store import backend
from fleet.store.config import StoreConfig
from fleet.store.layout import REPO_DIR
from fleet.store.writer import EpisodeStore

REFS_FIRST = ("refs", "config.yaml")  # what names the objects: copied before them
OBJECTS = ("snapshots", "manifests", "transactions", "chunks")


def backup(store: str, to: str) -> dict:
    """Copy the local store at ``store`` to the new folder ``to``; returns what was copied (its tip snapshot, episodes,
    bytes). ValueError for a store on object storage or a ``to`` that exists; StoreCorruptionError where the copy
    does not read back (then nothing is left at ``to``)."""
    source = EpisodeStore.open(StoreConfig(path=store))
    if not source.location.is_local:
        raise ValueError(
            f"{store} is on object storage: back it up with the bucket's own tools (object versioning, or replication to another "
            "bucket), docs/store.md \"Backups\""
        )
    target, partial = Path(to), Path(f"{to}.partial")
    if target.exists():
        raise ValueError(f"{to} exists: back up into a new folder (a backup is never written over)")
    shutil.rmtree(partial, ignore_errors=True)  # a killed backup's leftovers: this command's own name
    tip = source.snapshot().snapshot_id
    pin = f"backup.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.{uuid.uuid4().hex[:8]}"
    source.pin(tip, pin)
    try:
        copied = _copy(source.location.path / REPO_DIR, partial / REPO_DIR)
    finally:
        source.unpin(pin)
    copy = EpisodeStore.open(StoreConfig(path=str(partial)))
    copy.unpin(pin)
    newest = copy.snapshot()  # the copied branch's tip: the pinned one, or one committed before the refs were copied
    found = backend.run(backend.first_damage(copy._repo.readonly_session(snapshot_id=newest.snapshot_id).store))
    if found is not None:
        shutil.rmtree(partial, ignore_errors=True)
        raise backend.corrupted(copy.location, *found, f": the copy of {store} is incomplete, run the backup again")
    episodes = len(newest)
    backend.sync_filesystem(partial)
    os.rename(partial, target)
    return {"store": store, "to": to, "snapshot_id": newest.snapshot_id, "episodes": episodes, "bytes": copied}


def _copy(source: Path, target: Path) -> int:
    """The refs first, then the objects; returns the bytes copied. An object gone by the time it is copied (maintenance
    deleted it: nothing the copied refs reach) is skipped."""
    target.mkdir(parents=True)
    total = 0
    for name in (*REFS_FIRST, *OBJECTS):
        for src in _files(source / name):
            dst = target / src.relative_to(source)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(src, dst)
            except FileNotFoundError:
                continue
            total += dst.stat().st_size
    return total


def _files(path: Path):
    """Every file under ``path`` (``path`` itself for a file; none where it is gone), listed as the walk goes."""
    if path.is_file():
        yield path
        return
    for folder, _, names in os.walk(path):
        for name in names:
            yield Path(folder) / name
