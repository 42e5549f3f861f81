"""Background upload of spooled episodes: oldest first, retries with jittered exponential backoff.

Per server answer (docs/protocol.md):
    201 created, 200 duplicate         acknowledged, when the answer is the server's JSON naming this episode
                                       ({"episode_id", "status"}): the spool file is deleted. Any other 2xx (a
                                       captive portal's page, another service) is not: kept, retried
    400, 409, 413, 422                 refused for good, when the answer is the server's JSON refusal of the
                                       episode (409: episode_id_conflict): moved to spool/rejected/ with the reason
    413 not in the server's JSON       a proxy's body limit: the episode goes resumable, in chunks
    408                                the body took longer than the server or a proxy waits (a slow uplink): the
                                       episode goes resumable, and a chunk that times out is sent again halved
    401, 403, 404, other 4xx           configuration problem (token, URL, a proxy's page): kept, retried slowly;
                                       except the (status, error code) answers in ``refused_for_good``, refused
                                       for good as above (`flywheel import --server`: 403 robot_id_mismatch, an
                                       episode of another robot than the token's)
    429, 502, 503, 504                 kept; the next attempt waits at least Retry-After (gateway errors are the
                                       path's, not the episode's)
    other 5xx, timeouts, connections   kept, retried with backoff (server down, restarting, busy)

An answer is read raw (no content decoding), at most ``MAX_ANSWER_BYTES``, and must end within
``request_timeout_s`` of its headers; an attempt that fails in any other way (an answer without the
protocol's fields, a full disk) is a failed attempt too, with ``last_error`` saying why: the upload
thread never dies.

Compression (``compress=True``): once a server answer carries ``Accept-Encoding`` naming zstd
(RFC 7694; flywheel-server sends it on every answer to an upload), uploads are sent zstd-compressed
with ``Content-Encoding: zstd``; until then, and to servers that do not name it, uncompressed. A 415
to a compressed upload turns compression off for this uploader. The spool keeps the uncompressed
canonical bytes either way.

Large episodes (over ``resumable_threshold_bytes``) and any a POST got 413 ``body_too_large`` for are
sent through the resumable protocol instead (fleet/agent/resumable.py): created, PUT in chunks,
completed; a dropped connection, a 5xx or a restart of either side resumes from the offset the
server acknowledged (the upload id is remembered beside the spooled episode). The answers of that
protocol go through the same table; progress (a chunk acknowledged) resets the backoff.

No head-of-line blocking: an episode the server answers 5xx waits out its own backoff while
newer episodes go ahead. Once other uploads have been acknowledged since its first failure (so
the server works, and it is this episode it fails on), an episode that has failed
``max_attempts`` times is set aside in spool/rejected/ with its last answer and counted
(``set_aside``). A server that fails everything sets nothing aside: it is down, not the episode.
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Collection

import httpx
import zstandard

from fleet.agent.answers import AnswerCappedClient, coded_note, error_code, json_body
from fleet.agent.resumable import TRANSFER_ERRORS, ResumableSender
from fleet.agent.spool import Spool, SpoolEntry

log = logging.getLogger(__name__)
PERMANENT = (400, 409, 413, 422)  # the server's refusals of an episode, in its JSON shape (error_code)
ACKNOWLEDGED = ("created", "duplicate")
ZSTD_LEVEL = 3  # zstd's default: fast on a robot's CPU, most of the gain on float telemetry


NOT_THE_EPISODES = (502, 503, 504, 507)  # a gateway, a busy or stopping server, a full disk: never blamed on the episode


class Uploader:
    """Drains a :class:`Spool` to ``POST {server_url}/v1/episodes`` on a background thread."""

    def __init__(
        self,
        spool: Spool,
        server_url: str,
        token: str,
        *,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        request_timeout_s: float = 30.0,
        status_interval_s: float = 10.0,
        max_attempts: int = 8,
        refused_for_good: Collection[tuple[int, str]] = (),
        compress: bool = True,
        resumable_threshold_bytes: int = 8 << 20,
        on_ack: Callable[[str, str], None] | None = None,
        seed: int | None = None,
    ):
        self.spool = spool
        self.server_url = server_url.rstrip("/")
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.status_interval_s = status_interval_s
        self.on_ack = on_ack  # called with (episode_id, "created" | "duplicate") after each acknowledgement
        self._client = AnswerCappedClient(
            timeout=request_timeout_s,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream", "Accept-Encoding": "identity"},
        )
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0  # consecutive failed attempts
        self._last_failed: str | None = None  # the episode of the last failed attempt: tried after the others
        self.max_attempts = max_attempts
        self.refused_for_good = frozenset(refused_for_good)  # (status, error code): refusals of the episode besides PERMANENT's
        self._blame: dict[str, _Blame] = {}  # episodes the server failed on (5xx), by id
        self._acks = 0
        self._retry_after = 0.0  # the server's last Retry-After (s)
        self.compress = compress
        self._zstd = False  # whether the server named zstd in an Accept-Encoding answer
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)  # one thread uploads; reused
        self.resumable_threshold_bytes = resumable_threshold_bytes
        self._resumable = ResumableSender(self._client, self.server_url, spool, self._compressor, self._stop)
        self._too_large: set[str] = set()  # episodes a POST got 413 body_too_large or 408 for: sent resumable from then on
        self.stats = {"created": 0, "duplicate": 0, "rejected": 0, "set_aside": 0, "failed_attempts": 0, "compressed": 0, "sent_bytes": 0}
        self.last_error: str | None = None
        self.last_entry: SpoolEntry | None = None  # the entry the last upload_once tried (its outcome is that call's answer)

    # -- one attempt ------------------------------------------------------------------
    def _next(self) -> SpoolEntry | None | str:
        """The oldest spooled episode the server has not failed on, else the oldest of those it failed on (5xx) that
        has waited out its own backoff; "waiting" if all are waiting. Episodes the server fails on go behind the others:
        two of them at the head of the queue once kept every good episode behind them from being tried. The episode whose
        attempt failed last goes after the others too (a server whose staging disk is full refuses only its large ones)."""
        entries, now, suspect, last = self.spool.entries(), time.monotonic(), None, None
        for entry in entries:
            blame = self._blame.get(entry.episode_id)
            if blame is None:
                if entry.episode_id != self._last_failed:
                    return entry
                last = entry  # the one that just failed: after the others (a full staging disk refuses only large ones)
            elif suspect is None and blame.not_before <= now:
                suspect = entry
        return last or suspect or ("waiting" if entries else None)

    def upload_once(self) -> str:
        """Try the oldest eligible spooled episode once: "empty", "acked", "rejected", "set_aside" or "retry"."""
        self.last_entry = None  # set once an entry is picked: an attempt that raises is blamed on it, not on the one before
        while True:
            entry = self._next()
            if entry is None:
                return "empty"
            if entry == "waiting":
                return "retry"
            self.last_entry = entry
            data = self.spool.read(entry)
            if data is not None:
                break
            # evicted between listing and read(), or deleted from outside: out of the spool's list (a vanished file
            # still listed was once read again by each attempt, forever), then the next one
            self._blame.pop(entry.episode_id, None)
            self.spool.forget(entry)
        self._retry_after = 0.0
        if self._goes_resumable(entry):
            return self._send_resumable(entry, data)
        compressed = self.compress and self._zstd
        body, headers = (self._compressor.compress(data), {"Content-Encoding": "zstd"}) if compressed else (data, {})
        try:
            response = self._client.post(f"{self.server_url}/v1/episodes", content=body, headers=headers)
        except httpx.HTTPError as exc:
            return self._failed(entry, f"{exc.__class__.__name__}: {exc}")
        self.stats["sent_bytes"] += len(body)
        self._zstd = self._zstd or _accepts_zstd(response)
        too_large = response.status_code == 413 and error_code(response) in ("body_too_large", None)  # over the server's (or a proxy's) body limit
        if too_large or response.status_code == 408:  # 408: the body took longer than the server (or a proxy) waits, a slow uplink
            why = "is over the server's body limit" if too_large else "timed out on the way (408)"
            log.info("episode %s (%d bytes) %s; sending it as a resumable upload, in chunks", entry.episode_id, entry.nbytes, why)
            self._too_large.add(entry.episode_id)
            return self._send_resumable(entry, data)
        return self._answered(entry, response, compressed)

    def _goes_resumable(self, entry: SpoolEntry) -> bool:
        """Large episodes, those the server found too large for one POST, and those already on their way in chunks."""
        return entry.nbytes > self.resumable_threshold_bytes or entry.episode_id in self._too_large or self.spool.recall_upload(entry) is not None

    def _send_resumable(self, entry: SpoolEntry, data: bytes) -> str:
        outcome = self._resumable.send(entry, data, compress=self.compress)
        self.stats["sent_bytes"] += outcome.sent_bytes
        if outcome.progressed:  # chunks got through: the link works, so the next try starts from a short backoff
            self._failures = 0
        if outcome.response is not None:
            return self._answered(entry, outcome.response, outcome.compressed)
        if self._stop.is_set():
            return "retry"
        return self._failed(entry, outcome.error or "resumable upload not finished")

    def _answered(self, entry: SpoolEntry, response: httpx.Response, compressed: bool) -> str:
        """Act on the server's answer to an upload of ``entry`` (the table in the module docstring)."""
        if compressed and response.status_code == 415:  # something on the way refuses zstd: send plain from now on
            self.compress = False
            log.warning("a zstd upload was refused with 415; uploading uncompressed from now on")
            return self._failed(entry, f"HTTP 415: {_json_or_text(response)}")
        body = _json_or_text(response)
        if 200 <= response.status_code < 300:
            status = body.get("status") if body.get("episode_id") == entry.episode_id else None
            if status not in ACKNOWLEDGED:  # not the server's acknowledgement of this episode (or one a proxy compressed): keep it
                return self._failed(entry, coded_note(response) or f"HTTP {response.status_code} that does not acknowledge episode {entry.episode_id} ({str(body)[:200]}): is {self.server_url} the fleet server?")
            self.stats["compressed"] += int(compressed)
            self.spool.remove(entry)
            self._blame.pop(entry.episode_id, None)
            self._too_large.discard(entry.episode_id)
            self.stats[status] += 1
            self._failures, self._acks, self.last_error = 0, self._acks + 1, None
            if self.on_ack is not None:
                try:
                    self.on_ack(entry.episode_id, status)
                except Exception:  # the caller's hook: the acknowledgement stands
                    log.exception("on_ack for episode %s raised", entry.episode_id)
            return "acked"
        if _refuses_episode(response) or (response.status_code, error_code(response)) in self.refused_for_good:
            if self.spool.reject(entry, {"status": response.status_code, **body}) is not None:  # None: evicted meanwhile, counted there
                self.stats["rejected"] += 1
            self._blame.pop(entry.episode_id, None)
            self._too_large.discard(entry.episode_id)
            log.error("server refused episode %s for good (%d %s); moved to %s", entry.episode_id, response.status_code, body, self.spool.rejected_dir)
            return "rejected"
        self._retry_after = _retry_after_s(response)
        if response.status_code >= 500 and response.status_code not in NOT_THE_EPISODES:  # the server failed on this episode: blame it
            return self._blamed(entry, response.status_code, body)
        return self._failed(entry, f"HTTP {response.status_code}: {body}")

    def _blamed(self, entry: SpoolEntry, status: int, body: dict) -> str:
        blame = self._blame.setdefault(entry.episode_id, _Blame(acks_at_first=self._acks))
        blame.failures += 1
        if blame.failures >= self.max_attempts and self._acks > blame.acks_at_first:  # others got through: it is this episode
            set_aside = self.spool.reject(entry, {"status": status, **body, "set_aside": f"failed {blame.failures} times while other episodes were accepted"})
            del self._blame[entry.episode_id]
            self.stats["set_aside"] += int(set_aside is not None)
            self.stats["failed_attempts"] += 1
            log.error("episode %s set aside after %d failed uploads (%d %s); moved to %s", entry.episode_id, blame.failures, status, body, self.spool.rejected_dir)
            return "set_aside"
        blame.not_before = time.monotonic() + self._backoff(blame.failures)
        return self._failed(entry, f"HTTP {status}: {body}")

    def _failed(self, entry: SpoolEntry, message: str) -> str:
        self._count_failure(entry, message)
        log.warning("upload of %s failed (%s); %d episodes queued, retrying", entry.episode_id, message, self.spool.depth)
        return "retry"

    def _count_failure(self, entry: SpoolEntry | None, message: str) -> None:
        """A failed attempt: backoff grows, the episode it was on (if any) goes behind the others, the reason is kept."""
        self._failures += 1
        if entry is not None:
            self._last_failed = entry.episode_id
        self.stats["failed_attempts"] += 1
        self.last_error = message

    def backoff_s(self) -> float:
        """Delay before the next attempt after ``self._failures`` consecutive failures (at least the
        server's Retry-After, at most backoff_max_s; a wait for one episode's own backoff: short)."""
        if self._failures == 0:
            return min(self.backoff_initial_s, 0.1) if self._blame else 0.0
        return max(self._backoff(self._failures), min(self._retry_after, self.backoff_max_s))

    def _backoff(self, failures: int) -> float:
        """Jittered exponential backoff after ``failures`` failures: initial * 2^(failures-1), capped, times U[0.5, 1]."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(failures - 1, 30)) * self._rng.uniform(0.5, 1.0)

    # -- background thread ------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("uploader already started")
        self._thread = threading.Thread(target=self._run, name="flywheel-uploader", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the upload thread runs (False before start and after stop)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.spool.changed.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._client.close()

    def _run(self) -> None:
        next_status = time.monotonic() + self.status_interval_s
        while not self._stop.is_set():
            try:
                outcome = self.upload_once()
            except Exception as exc:  # anything unforeseen (an answer of another shape, a full disk): a failed attempt, never a dead thread
                log.exception("upload attempt failed")
                self._count_failure(self.last_entry, f"{exc.__class__.__name__}: {exc}")  # behind the others: one that raises each time once blocked the queue
                outcome = "retry"
            if time.monotonic() >= next_status:
                log.info("upload queue: %d episodes (%d bytes), stats %s", self.spool.depth, self.spool.nbytes, self.stats)
                next_status = time.monotonic() + self.status_interval_s
            if outcome == "empty":
                self.spool.changed.wait(timeout=min(1.0, self.status_interval_s))
                self.spool.changed.clear()
            elif outcome == "retry":
                self._stop.wait(self.backoff_s())


@dataclasses.dataclass
class _Blame:
    """An episode the server answered 5xx: how often, the acknowledgements counted at its first
    failure (others accepted since prove the server works), and when it may be tried again."""

    acks_at_first: int
    failures: int = 0
    not_before: float = 0.0  # time.monotonic()


def _accepts_zstd(response: httpx.Response) -> bool:
    """Whether an answer's Accept-Encoding (RFC 7694: request codings the server takes) names zstd."""
    codings = (c.split(";")[0].strip().lower() for c in response.headers.get("accept-encoding", "").split(","))
    return "zstd" in codings


def _refuses_episode(response: httpx.Response) -> bool:
    """Whether an answer is the server's refusal of the episode itself (its JSON shape), not a proxy's page or a
    transfer's state (a resumable upload's offsets and chunks are the uploader's to mend)."""
    code = error_code(response)
    if response.status_code not in PERMANENT or code is None or code in TRANSFER_ERRORS:
        return False
    return response.status_code != 409 or code == "episode_id_conflict"


def _retry_after_s(response: httpx.Response) -> float:
    """The Retry-After header in seconds: delta-seconds or an HTTP-date (RFC 9110 10.2.3); 0 when absent or unreadable."""
    value = response.headers.get("retry-after", "0").strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return 0.0
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


def _json_or_text(response: httpx.Response) -> dict:
    """The answer's JSON object, else its text (for the reason kept and logged)."""
    return json_body(response) or {"body": response.text[:500]}
