"""Crash-safe, bounded on-disk queue of episodes waiting for upload.

A spool file is complete or absent: it is written as ``NAME.partial``, fsynced, renamed
to ``NAME`` and the directory fsynced; leftovers of a crash mid-write (``*.partial``) are
deleted on open. Names start with a 20-digit sequence number, so the queue is FIFO across
restarts. Over ``max_bytes`` the oldest episodes are evicted first (counted and logged; an episode evicted
while its upload was in flight and then acknowledged by the server is no loss and is not counted).
An episode larger than ``max_bytes`` on its own is refused (:class:`EpisodeTooLarge`); nothing is evicted for it.
A disk that refuses to delete the oldest episode (read-only) refuses the new one (:class:`EvictionRefused`); the queue stays.
Episodes the server refuses for good are moved to ``rejected/`` with the server's reason; it holds at
most ``max_bytes`` of them too, the oldest deleted first (``rejected_evicted``): a server or proxy that
refuses everything cannot fill the robot's disk.

An episode being sent through the resumable protocol has a sidecar ``NAME.upload.json`` (the server's
upload id and what it was declared as; fleet/agent/resumable.py), written the same crash-safe way, so a
restarted robot resumes the upload instead of starting over. It goes when its episode goes. A disk that refuses to
write or delete one (read-only) only costs that: the upload goes on, not resumable after a restart.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from pathlib import Path

from sim.durable import disk_full, write_durably

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"
SIDECAR = ".upload.json"  # NAME.upload.json beside NAME: the episode's resumable upload
MAX_EVICTED_IDS = 1024  # evicted entries remembered, for an acknowledgement of one whose upload was in flight


@dataclasses.dataclass(frozen=True)
class SpoolEntry:
    path: Path
    episode_id: str
    nbytes: int


class SpoolFullError(OSError):
    """The spool's disk is full and no spooled episode is left to evict."""


class EvictionRefused(OSError):
    """The spool's disk refused to delete the oldest episode to make room (a disk remounted read-only): it stays queued."""


class EpisodeTooLarge(ValueError):
    """An episode larger than the whole spool (``max_bytes``): it cannot be spooled, whatever is evicted."""


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``path`` as ``path.partial`` (the names :meth:`Spool.open` clears), durably: whole or absent after a crash."""
    write_durably(path, data, path.with_name(path.name + ".partial"))


def _sidecar(entry: SpoolEntry) -> Path:
    return entry.path.with_name(entry.path.name + SIDECAR)


class Spool:
    """FIFO of episode files in ``directory`` holding at most ``max_bytes``."""

    def __init__(self, directory: str | Path, max_bytes: int):
        self.directory = Path(directory)
        self.rejected_dir = self.directory / "rejected"
        self.max_bytes = max_bytes
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        self.changed = threading.Event()  # set whenever an episode is added
        self._lock = threading.Lock()
        self.evicted = 0
        self._evicted_ids: dict[str, None] = {}  # names of the evicted entries a later acknowledgement takes back out of ``evicted``
        self.rejected_evicted = 0
        self.lost = 0  # spooled episodes whose file vanished behind the spool's back (:meth:`forget`)
        self.discarded_partials = 0
        for partial in self.directory.glob("*.partial"):
            partial.unlink()
            self.discarded_partials += 1
        if self.discarded_partials:
            log.warning("spool %s: deleted %d partial file(s) left by a crash mid-write", self.directory, self.discarded_partials)
        self._entries: dict[str, SpoolEntry] = {}
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            self._entries[path.name] = SpoolEntry(path, path.name[21 : -len(SUFFIX)], path.stat().st_size)
        self._seq = max((int(name[:20]) for name in self._entries), default=0) + 1
        for sidecar in self.directory.glob(f"*{SUFFIX}{SIDECAR}"):  # its episode went, the crash came before the sidecar did
            if sidecar.name.removesuffix(SIDECAR) not in self._entries:
                sidecar.unlink()

    # -- queue state -------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Episodes waiting for upload."""
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def oldest(self) -> SpoolEntry | None:
        with self._lock:
            return self._entries[min(self._entries)] if self._entries else None

    def entries(self) -> list[SpoolEntry]:
        with self._lock:
            return [self._entries[k] for k in sorted(self._entries)]

    # -- mutations ---------------------------------------------------------------------
    def put(self, data: bytes, episode_id: str) -> SpoolEntry:
        """Durably add one episode's bytes, evicting the oldest entries if the spool would overflow."""
        if len(data) > self.max_bytes:
            raise EpisodeTooLarge(f"episode {episode_id} is {len(data)} bytes, more than the whole spool ({self.max_bytes}); raise spool_max_bytes")
        with self._lock:
            total = sum(e.nbytes for e in self._entries.values())
            while self._entries and total + len(data) > self.max_bytes:
                total -= self._evict_oldest("full")
            name = f"{self._seq:020d}-{episode_id}{SUFFIX}"
            self._seq += 1
            final = self.directory / name
            while True:
                try:
                    _write_durably(final, data)
                    break
                except OSError as exc:
                    if not disk_full(exc):
                        raise
                    if not self._entries:  # nothing left to make room with
                        raise SpoolFullError(f"the spool's disk ({self.directory}) is full and holds no episode to evict: free space on it, "
                                             f"or give spool_max_bytes below its free space ({len(data)} bytes needed)") from exc  # fmt: skip
                    self._evict_oldest("disk full")  # the disk is smaller than spool_max_bytes: make room as the limit would
            entry = SpoolEntry(final, episode_id, len(data))
            self._entries[name] = entry
        self.changed.set()
        return entry

    def _evict_oldest(self, why: str) -> int:
        """Delete the oldest episode, then take it out of the queue and count it. A disk that refuses the delete (one
        remounted read-only) raises :class:`EvictionRefused` and leaves the queue as it was: the episode once left the
        queue before its delete failed, counted nowhere, and did not upload in this process."""
        name = min(self._entries)
        victim = self._entries[name]
        try:
            victim.path.unlink(missing_ok=True)
        except OSError as exc:
            raise EvictionRefused(exc.errno, exc.strerror, exc.filename) from exc
        del self._entries[name]
        try:  # the episode is gone: a sidecar left behind is deleted at the next start (it names no episode)
            _sidecar(victim).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("spool %s: could not delete the upload sidecar of evicted episode %s (%s)", self.directory, victim.episode_id, exc)
        self.evicted += 1
        self._evicted_ids[victim.path.name] = None
        while len(self._evicted_ids) > MAX_EVICTED_IDS:  # only the latest can still be in flight
            del self._evicted_ids[next(iter(self._evicted_ids))]
        log.warning("spool %s %s: evicted episode %s (%d bytes; %d evicted so far)", self.directory, why, victim.episode_id, victim.nbytes, self.evicted)
        return victim.nbytes

    def read(self, entry: SpoolEntry) -> bytes | None:
        """The entry's bytes, or None if its file is gone (evicted meanwhile, or deleted from outside: :meth:`forget`)."""
        try:
            return entry.path.read_bytes()
        except FileNotFoundError:
            return None

    def forget(self, entry: SpoolEntry) -> None:
        """Drop an entry whose file :meth:`read` found gone. Eviction deletes the file and takes its entry out under the
        spool's lock, so an entry still listed here was removed by something other than this spool (an operator freeing
        space, a tmp cleaner, a second agent on the same folder): counted in ``lost`` and logged, so the uploader goes on
        with the next one (it once read the same vanished entry again and again, and uploaded nothing more)."""
        with self._lock:
            if self._entries.pop(entry.path.name, None) is None:
                return  # evicted meanwhile: counted there
            _sidecar(entry).unlink(missing_ok=True)
            self.lost += 1
        log.error("spool %s: episode file %s vanished before it was uploaded (deleted by something other than this agent: "
                  "give each agent its own spool_dir, and free space with spool_max_bytes); %d lost so far", self.directory, entry.path.name, self.lost)  # fmt: skip

    def remove(self, entry: SpoolEntry) -> None:
        """Forget an entry the server acknowledged. One evicted while its upload was in flight is no loss after all:
        it leaves the ``evicted`` count (which once counted it as both evicted and delivered)."""
        with self._lock:
            if self._entries.pop(entry.path.name, None) is None and entry.path.name in self._evicted_ids:
                del self._evicted_ids[entry.path.name]
                self.evicted -= 1
                log.info("spool %s: episode %s, evicted while its upload was in flight, was acknowledged: not lost", self.directory, entry.episode_id)
            try:
                _sidecar(entry).unlink(missing_ok=True)
                entry.path.unlink(missing_ok=True)
            except OSError as exc:  # a disk remounted read-only still reads: what was spooled uploads, the files stay
                log.warning("spool %s: could not delete acknowledged episode %s (%s); the next start sends it again and the server "
                            "answers duplicate", self.directory, entry.path.name, exc)  # fmt: skip

    def reject(self, entry: SpoolEntry, reason: dict) -> Path | None:
        """Move an entry the server refused for good to ``rejected/``, with the reason beside it; None when it had been
        evicted meanwhile (counted as evicted, not as refused)."""
        with self._lock:
            self._entries.pop(entry.path.name, None)
            _sidecar(entry).unlink(missing_ok=True)
            target = self.rejected_dir / entry.path.name
            try:
                os.replace(entry.path, target)
            except FileNotFoundError:
                log.warning("spool %s: rejected episode %s had already been evicted", self.directory, entry.episode_id)
                return None
            (self.rejected_dir / f"{entry.path.name}.reason.json").write_text(json.dumps(reason, indent=1))
            self._trim_rejected()
            return target

    def _trim_rejected(self) -> None:
        """Delete the oldest refused episodes (and reasons) while ``rejected/`` holds over ``max_bytes``."""
        kept = sorted(self.rejected_dir.glob(f"*{SUFFIX}"))
        sizes = {p: p.stat().st_size for p in kept}
        total = sum(sizes.values())
        for path in kept[:-1]:  # the newest stays: an operator must see at least the latest refusal
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".reason.json").unlink(missing_ok=True)
            total -= sizes[path]
            self.rejected_evicted += 1
            log.warning("spool %s: rejected/ over %d bytes: deleted the oldest refused episode %s", self.directory, self.max_bytes, path.name)

    # -- resumable uploads (sidecars) ----------------------------------------------------
    def remember_upload(self, entry: SpoolEntry, upload: dict) -> None:
        """Durably note the resumable upload ``entry`` is being sent in (JSON-able), for a restarted robot. A disk that
        refuses the write (read-only, full) is logged, not raised: the upload goes on, only not resumable after a restart
        (a raise once failed every attempt at the episode, and the episodes behind it waited)."""
        try:
            _write_durably(_sidecar(entry), json.dumps(upload).encode())
        except OSError as exc:
            log.warning("spool %s: could not write the upload sidecar of episode %s (%s); uploading it without resuming after a restart",
                        self.directory, entry.episode_id, exc)  # fmt: skip

    def recall_upload(self, entry: SpoolEntry) -> dict | None:
        """The upload :meth:`remember_upload` noted for ``entry``, or None."""
        try:
            upload = json.loads(_sidecar(entry).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:  # cannot happen to a sidecar written whole; start a new upload rather than stall
            log.warning("spool %s: unreadable upload sidecar of episode %s; starting a new upload", self.directory, entry.episode_id)
            return None
        return upload if isinstance(upload, dict) else None

    def forget_upload(self, entry: SpoolEntry) -> None:
        """Delete ``entry``'s sidecar; a disk that refuses (read-only) is logged: a stale sidecar costs a new upload, no more."""
        try:
            _sidecar(entry).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("spool %s: could not delete the upload sidecar of episode %s (%s)", self.directory, entry.episode_id, exc)

    def rejected(self) -> list[Path]:
        return sorted(self.rejected_dir.glob(f"*{SUFFIX}"))
