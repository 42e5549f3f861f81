"""A consistent copy of a local episode store, taken while servers write it (``flywheel store backup``).

A store's folder holds write-once objects (snapshots, manifests, transaction logs, chunks) and the refs
that name each branch's newest snapshot and the pins. A plain ``cp -a`` or ``tar`` of a store being
written copies ``snapshots/`` before ``refs/`` (the directory's order), so a commit in between leaves
the copied ref naming a snapshot the copy lacks, and the copy does not open ("damaged"). Here no
maintenance runs while the copy does (it holds the maintenance lock, waiting for a run under way;
a server's scheduled run meanwhile is skipped), the refs are copied before any object, then the
objects: every object the copied refs reach was written before them, and none is deleted. The copy
is checked (it opens, and its tip's every manifest reads; chunks are not read) in
``<to>.partial`` and renamed into place last, so a half-taken backup is never taken for one. One backup
to a ``to`` at a time: each holds a lock on ``<to>.partial.lock`` throughout (a concurrency probe: two at once,
a cron job's and an operator's, removed each other's ``.partial`` and in 15 of 20 tries both failed). The
source is only read: an older store's schema is copied as it is, not migrated.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from fleet.store import backend
from fleet.store.layout import BRANCH, REPO_DIR
from fleet.store.location import Location
from fleet.store.maintenance import no_maintenance

REFS_FIRST = ("refs", "config.yaml")  # what names the objects: copied before them
OBJECTS = ("snapshots", "manifests", "transactions", "chunks")
PARTIAL_MARK = ".flywheel-backup-partial"  # in <to>.partial: this command's own, to remove when a killed run left it


def backup(store: str, to: str) -> dict:
    """Copy the local store at ``store`` to the new folder ``to``; returns its tip snapshot, files and bytes copied.
    ValueError (nothing written) for a store on object storage, a ``to`` that exists or lies inside the store;
    StoreCorruptionError where the copy does not read back (then nothing is left at ``to``)."""
    location = Location.parse(store)
    if not backend.repo_exists(location):
        raise FileNotFoundError(f"no flywheel episode store at {store}; pass --store with the folder of one")
    if not location.is_local:
        raise ValueError(
            f"{store} is on object storage: back it up with the bucket's own tools (object versioning, or replication to another "
            "bucket), docs/store.md \"Backups\""
        )
    source = location.path.resolve()
    target = Path(os.path.abspath(to))
    partial = target.with_name(target.name + ".partial")
    if target.exists():
        raise ValueError(f"{to} exists: back up into a new folder (a backup is never written over)")
    if target.resolve().is_relative_to(source):
        raise ValueError(f"{to} is inside the store {store}: back up into a folder outside it")
    with _only_backup(target, to):  # from here on no other backup to ``to`` writes, removes or renames <to>.partial
        if target.exists():  # one that finished while this run waited for the lock's file
            raise ValueError(f"{to} exists: back up into a new folder (a backup is never written over)")
        if partial.exists():
            if not (partial / PARTIAL_MARK).is_file():
                raise ValueError(f"{partial} exists and is not a backup this command left: move it, or back up to another --to")
            shutil.rmtree(partial)  # a killed backup's leftovers (its lock went with its process)
        try:
            with no_maintenance(location):
                files, copied = _copy(source / REPO_DIR, partial)
        except PermissionError as exc:  # a store this user may only read: the maintenance lock cannot be taken
            shutil.rmtree(partial, ignore_errors=True)
            raise ValueError(f"cannot keep maintenance off {store} while copying it ({exc.strerror}: {exc.filename}): back it up as a user who may write it, or stop its servers and copy the folder") from None
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        tip = _check(partial, store)
        (partial / PARTIAL_MARK).unlink()
        backend.sync_filesystem(partial)
        os.rename(partial, target)
    return {"store": store, "to": to, "snapshot_id": tip, "files": files, "bytes": copied}


@contextlib.contextmanager
def _only_backup(target: Path, to: str) -> Iterator[None]:
    """While the block runs, no other backup to ``target`` runs: ValueError at once for one that finds this one there.
    The lock's file, ``<to>.partial.lock`` (the holder's pid in it), goes when the block ends; a run that locked it as it
    went opens the new one (or, once the backup is in place, finds ``to`` exists)."""
    lock = target.with_name(target.name + ".partial.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise ValueError(f"another backup to {to} is running{f' (pid {pid})' if pid else ''}: wait for it, or choose another --to") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the file its holder removed as it finished: lock the one now there
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: a run that opened it meanwhile opens a new one (above)
        os.close(fd)


def _copy(source: Path, partial: Path) -> tuple[int, int]:
    """The refs first, then the objects, into ``partial`` (marked as this command's); returns (files, bytes)."""
    target = partial / REPO_DIR
    target.mkdir(parents=True)
    (partial / PARTIAL_MARK).touch()
    files = total = 0
    for name in (*REFS_FIRST, *OBJECTS):
        for src in _files(source / name):
            dst = target / src.relative_to(source)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            files, total = files + 1, total + dst.stat().st_size
    return files, total


def _check(partial: Path, store: str) -> str:
    """The copy's tip snapshot id, once the copy opens and every manifest of its tip reads; else StoreCorruptionError
    (and the copy removed)."""
    where = Location(path=partial)
    try:
        repo = backend.open_repo(where)
        tip = repo.lookup_branch(BRANCH)
        found = backend.run(backend.first_damage(repo.readonly_session(snapshot_id=tip).store))
    except Exception as exc:  # noqa: BLE001  (Icechunk's own error for a copy that does not open)
        found = ("the repository", backend.short_reason(exc))
    if found is not None:
        shutil.rmtree(partial, ignore_errors=True)
        raise backend.corrupted(where, *found, f": the copy of {store} is incomplete, run the backup again")
    return tip


def _files(path: Path):
    """Every file under ``path`` (``path`` itself for a file), listed as the walk goes, but an object still being written
    (Icechunk writes ``<id>#<n>`` and renames it: one of a commit after the refs were copied, which they do not name)."""
    if path.is_file():
        yield path
        return
    for folder, _, names in os.walk(path):
        for name in sorted(names):
            if "#" not in name:
                yield Path(folder) / name
