"""Group commit: uploads that arrive together are stored in one transaction, then all acknowledged.

An upload is acknowledged (201/200) only after the commit holding it is durable. While a
commit runs, new uploads queue; the next commit takes all of them and waits for more
(a) up to ``commit_wait_ms`` while other uploads are still being received, and (b) up to
``commit_rejoin_ms`` when its oldest upload was queued while the previous commit ran, for
the robots of that commit that came straight back last time (acknowledgement to next upload
within ``commit_rejoin_ms``) and are not back yet. (b) is "rejoin": robots that upload back
to back get into the next commit instead of splitting into two cohorts that take turns, one
committing while the other uploads; robots that pause between uploads are never waited for.
So the store sees large chunk-sized writes without a lone robot ever waiting for company:
its upload comes after its own acknowledgement, so (b) never holds for it.

Idempotency: an episode_id already in the store, or already queued, is not queued again;
its upload resolves to "duplicate" (same bytes) or "conflict" (different bytes) once the
first one is settled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

from fleet.server.metrics import Metrics
from fleet.store.backend import short_reason
from fleet.store.writer import EpisodeStore
from sim.episode import Episode

log = logging.getLogger(__name__)


class ShuttingDown(RuntimeError):
    """The committer was closed; the upload was not queued."""


@dataclasses.dataclass
class _Item:
    episode: Episode
    digest: bytes
    nbytes: int
    received: float
    future: Future
    settled: int  # commits settled when it was queued (GroupCommitter._settled)


class GroupCommitter:
    """One background thread that owns all writes of a server process to its store."""

    def __init__(self, store: EpisodeStore, metrics: Metrics, *, wait_s: float, max_bytes: int, max_episodes: int, rejoin_s: float = 0.0):
        self.store, self.metrics = store, metrics
        self.wait_s, self.rejoin_s, self.max_bytes, self.max_episodes = wait_s, rejoin_s, max_bytes, max_episodes
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._pending: dict[str, tuple[bytes, Future]] = {}
        self._lock = threading.Lock()
        self._incoming = 0
        self._closed = False
        self._settled = 0  # commits settled so far
        self.failing: dict | None = None  # {"since", "last", "reason"} while group commits fail (cleared by the next that stores)
        self._committing_since: float | None = None  # monotonic start of the commit running now
        self._last_robots: set[str] = set()  # robot_ids of the last one
        self._acked_at: dict[str, float] = {}  # robot_id -> when its last commit was acknowledged (the last rejoin_s)
        self._quick: set[str] = set()  # robots whose last upload came within rejoin_s of their acknowledgement
        self._thread = threading.Thread(target=self._loop, name="flywheel-group-commit", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def running_s(self) -> float:
        """How long the commit running now has taken (0 when none): a store that hangs or retries shows here
        before any commit fails."""
        since = self._committing_since
        return 0.0 if since is None else time.monotonic() - since

    @contextlib.contextmanager
    def receiving(self) -> Iterator[None]:
        """Mark an upload as being received/parsed, so a commit about to start may wait for it."""
        with self._lock:
            self._incoming += 1
        try:
            yield
        finally:
            with self._lock:
                self._incoming -= 1

    def submit(self, episode: Episode, digest: bytes, nbytes: int) -> Future:
        """Queue an episode; the future resolves to "created", "duplicate" or "conflict" once durable."""
        eid = episode.episode_id
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down; retry against the restarted server")
            acked = self._acked_at.pop(episode.robot_id, None)  # None: rejoin off, or not acknowledged lately
            if acked is not None and time.monotonic() - acked <= self.rejoin_s:  # came straight back
                self._quick.add(episode.robot_id)
            elif acked is not None:
                self._quick.discard(episode.robot_id)
            known = self.store.lookup(eid)
            if known is not None:
                return _done("duplicate" if known == digest else "conflict")
            if eid in self._pending:
                return self._follow(eid, digest, self._pending[eid][1])
            future: Future = Future()
            self._pending[eid] = (digest, future)
            self._queue.put(_Item(episode, digest, nbytes, time.time(), future, self._settled))
            return future

    def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        with self._lock:
            self._closed = True
        self._queue.put(None)
        self._thread.join()

    # -- internals ---------------------------------------------------------------------
    def _follow(self, eid: str, digest: bytes, first: Future) -> Future:
        """A second upload of a queued episode_id: settle it against whatever the first one left stored."""
        follower: Future = Future()

        def relay(done: Future) -> None:
            if done.exception() is not None:
                follower.set_exception(done.exception())
                return
            stored = self.store.lookup(eid)
            follower.set_result("duplicate" if stored == digest else "conflict")

        first.add_done_callback(relay)
        return follower

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            batch, size = [item], item.nbytes
            start = time.monotonic()
            with self._lock:  # rejoin: an upload that waited through the last commit waits for its quick robots
                awaited = (self._last_robots & self._quick) - {item.episode.robot_id} if item.settled < self._settled else set()
            while len(batch) < self.max_episodes and size < self.max_bytes:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    now = time.monotonic()
                    rejoin, receiving = start + self.rejoin_s - now, start + self.wait_s - now
                    if not ((awaited and rejoin > 0) or (self._incoming and receiving > 0)):
                        break
                    try:  # awaited robots: block until an upload is queued; else poll the uploads being received
                        nxt = self._queue.get(timeout=rejoin if awaited and rejoin > 0 else min(0.001, receiving))
                    except queue.Empty:
                        continue
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
                size += nxt.nbytes
                awaited.discard(nxt.episode.robot_id)
            self._commit(batch)

    def _commit(self, batch: list[_Item]) -> None:
        start, races = time.perf_counter(), (self.store.commit_rebases, self.store.commit_retries)
        self._committing_since = time.monotonic()
        try:
            result = self.store.append(
                [i.episode for i in batch],
                digests=[i.digest for i in batch],
                upload_times=[i.received for i in batch],
                message=f"ingest {len(batch)} uploads",
            )
        except Exception as exc:  # reported to every waiting upload as 503 or 507; nothing was acknowledged
            self.metrics.raced(self.store.commit_rebases - races[0], self.store.commit_retries - races[1])
            reason = f"{exc.__class__.__name__}: {short_reason(exc)}"
            self.failing = {"since": (self.failing or {}).get("since", time.time()), "last": time.time(), "reason": reason}
            log.error("group commit of %d uploads failed (%s); none acknowledged, clients will retry", len(batch), reason)
            log.debug("the failed commit's traceback", exc_info=True)  # Icechunk's context runs to ~40 lines a commit
            self.metrics.committed(time.perf_counter() - start, len(batch), ok=False)
            self._settle(batch, error=exc)
            return
        finally:
            self._committing_since = None
        self.metrics.raced(self.store.commit_rebases - races[0], self.store.commit_retries - races[1])
        self.failing = None
        self.metrics.committed(time.perf_counter() - start, result.created, ok=True)
        self._settle(batch, statuses=result.statuses)

    def _settle(self, batch: list[_Item], statuses=None, error: Exception | None = None) -> None:
        with self._lock:  # forget them first: a new upload of the same id then sees the store
            self._settled += 1
            self._last_robots = {item.episode.robot_id for item in batch} if error is None else set()  # failed: they retry later
            if self.rejoin_s:  # who came straight back is tracked only where rejoin is on
                now = time.monotonic()
                for robot, at in list(self._acked_at.items()):  # not back within rejoin_s: not quick (any more)
                    if now - at > self.rejoin_s:
                        del self._acked_at[robot]
                        self._quick.discard(robot)
                self._acked_at.update(dict.fromkeys(self._last_robots, now))
            for item in batch:
                eid = item.episode.episode_id
                if eid in self._pending and self._pending[eid][1] is item.future:
                    del self._pending[eid]
        for k, item in enumerate(batch):
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(statuses[k])


def _done(status: str) -> Future:
    future: Future = Future()
    future.set_result(status)
    return future
