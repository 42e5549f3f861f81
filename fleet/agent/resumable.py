"""Robot side of resumable uploads (docs/protocol.md, "Resumable uploads"): one spooled episode sent in
chunks, so that an episode of any length arrives and a dropped connection costs at most one chunk.

One attempt (:meth:`ResumableSender.send`): the body (zstd-compressed when asked) and its sha256; a
remembered upload is asked for its offset (HEAD), else a new one is created (POST /v1/uploads) and
remembered beside the spooled episode (``Spool.remember_upload``: a sidecar written atomically); then
chunks are PUT from the server's offset, and the upload completed. A dropped connection, a 5xx or a
stop ends the attempt with nothing lost: the next attempt (the uploader's backoff; or a restarted
robot, through the sidecar) resumes from the offset the server acknowledged, never from byte 0. A
remembered id the server no longer knows (404: expired, aborted, or staged on another replica) starts
a new upload. The server's final answer is the uploader's to act on, as for ``POST /v1/episodes``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading

import httpx
import zstandard

from fleet.agent.answers import error_code, refuse_coded
from fleet.agent.spool import Spool, SpoolEntry

log = logging.getLogger(__name__)
MAX_ROUNDS = 2  # transfers per attempt: a complete answered upload_incomplete or digest_mismatch sends (the rest) once more
MAX_OFFSET_MISMATCHES = 8  # per attempt: 409 offset_mismatch answers followed before the attempt gives up
MAX_STALLS = 3  # per attempt: chunks acknowledged (200) without the offset moving on before the attempt gives up
MIN_CHUNK = 64 << 10  # the smallest chunk tried after a proxy refused one as too large (413 not in the server's JSON) or one timed out (408)
# refusals about a transfer's state, not about the episode: the upload is mended or started again, never the episode refused
TRANSFER_ERRORS = ("offset_mismatch", "chunk_too_large", "chunk_past_size", "bad_upload_offset", "chunk_incomplete", "upload_incomplete", "digest_mismatch")


@dataclasses.dataclass
class Outcome:
    """How one attempt ended: the server's answer for the uploader (None: not settled, try again later, ``error``
    says why), the request body bytes sent, whether the body went zstd-compressed, and whether the server
    acknowledged any new byte (progress, which resets the uploader's backoff)."""

    response: httpx.Response | None = None
    error: str | None = None
    sent_bytes: int = 0
    compressed: bool = False
    progressed: bool = False
    timed_out: bool = False  # a chunk of this attempt was answered 408

    def settled(self, response: httpx.Response) -> Outcome:
        self.response = response
        return self


class ResumableSender:
    """Sends spooled episodes through POST /v1/uploads, PUT chunks, complete (module docstring)."""

    def __init__(self, client: httpx.Client, server_url: str, spool: Spool, compressor: zstandard.ZstdCompressor, stop: threading.Event):
        self.client, self.server_url, self.spool, self.compressor, self.stop = client, server_url, spool, compressor, stop
        self.chunk_cap: int | None = None  # set when something on the way refused the server's chunk size (a proxy's 413: kept)
        self.slow_cap: int | None = None  # set when a chunk timed out on the way (408); doubled back by each upload without one

    def send(self, entry: SpoolEntry, data: bytes, compress: bool) -> Outcome:
        """One attempt at ``entry`` (its bytes ``data``); ``compress``: zstd for a new upload (a remembered one keeps its coding)."""
        remembered = _usable(self.spool.recall_upload(entry))
        coding = remembered["content_encoding"] if remembered else ("zstd" if compress else "identity")
        body = self.compressor.compress(data) if coding == "zstd" else data
        declared = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest(), "content_encoding": coding}
        outcome = Outcome(compressed=coding == "zstd")
        try:
            return self._transfer(entry, body, declared, remembered, outcome)
        except httpx.HTTPError as exc:  # the connection dropped: the next attempt resumes from the server's offset
            outcome.error = f"{exc.__class__.__name__}: {exc}"
        except (KeyError, ValueError, TypeError, OverflowError, AttributeError) as exc:  # an answer without the protocol's fields or values
            outcome.error = f"the server's answer is not the resumable upload protocol's ({exc.__class__.__name__}: {exc})"
        return outcome

    def _transfer(self, entry: SpoolEntry, body: bytes, declared: dict, remembered: dict | None, outcome: Outcome) -> Outcome:
        if remembered is not None and {k: remembered.get(k) for k in declared} != declared:  # e.g. another zstd build: other bytes
            self._abort(remembered["upload_id"])
            self.spool.forget_upload(entry)
            remembered = None
        started = self._resume(entry, remembered) if remembered is not None else None
        if started is None:
            started = self._create(entry, declared)
        if isinstance(started, httpx.Response):
            return outcome.settled(started)
        upload_id, offset, max_chunk = started
        offset = _offset(offset, len(body))
        if max_chunk < 1:
            raise ValueError(f"max_chunk_bytes {max_chunk} is not a byte count")
        for _ in range(MAX_ROUNDS):
            if not self._put_from(entry, upload_id, body, offset, max_chunk, outcome):
                return outcome
            answer = self._ask("post", self._url(upload_id, "/complete"))
            if error_code(answer) not in ("upload_incomplete", "digest_mismatch"):
                break
            offset = _offset(answer.json()["offset"], len(body))  # the server's offset: the rest (or, after a digest mismatch, all) again
            log.warning("upload %s of episode %s: %s; sending again from offset %d", upload_id, entry.episode_id, answer.json()["reason"], offset)
        if self.slow_cap is not None and not outcome.timed_out:  # a whole upload without a timeout: the link may be faster again
            self.slow_cap = None if 2 * self.slow_cap >= max_chunk else 2 * self.slow_cap
        return outcome.settled(answer)

    def _resume(self, entry: SpoolEntry, remembered: dict) -> tuple[str, int, int] | httpx.Response | None:
        """(upload id, offset, max chunk bytes) of the remembered upload; None if the server forgot it; an answer to act on."""
        upload_id = remembered["upload_id"]
        answer = self._ask("head", self._url(upload_id))
        if answer.status_code == 404:
            log.warning("upload %s of episode %s is gone from the server; starting a new one", upload_id, entry.episode_id)
            self.spool.forget_upload(entry)
            return None
        if answer.status_code != 200:
            return answer
        return upload_id, int(answer.headers["upload-offset"]), int(answer.headers["upload-max-chunk-bytes"])  # checked by _transfer

    def _create(self, entry: SpoolEntry, declared: dict) -> tuple[str, int, int] | httpx.Response:
        answer = self._ask("post", f"{self.server_url}/v1/uploads", content=json.dumps(declared), headers={"Content-Type": "application/json"})
        if answer.status_code not in (200, 201):
            return answer
        started = answer.json()
        self.spool.remember_upload(entry, {"upload_id": started["upload_id"], **declared})
        return started["upload_id"], int(started["offset"]), int(started["max_chunk_bytes"])

    def _put_from(self, entry: SpoolEntry, upload_id: str, body: bytes, offset: int, max_chunk: int, outcome: Outcome) -> bool:
        """PUT the chunks from ``offset`` to the end: True once the server holds them all; False when the attempt
        ends here (``outcome`` says how)."""
        view, mismatches, stalls = memoryview(body), 0, 0
        while offset < len(body):
            if self.stop.is_set():
                outcome.error = "stopped"
                return False
            chunk = view[offset : offset + min(max_chunk, self.chunk_cap or max_chunk, self.slow_cap or max_chunk)]
            answer = self._ask("put", self._url(upload_id), content=bytes(chunk), headers={"Upload-Offset": str(offset)})
            outcome.sent_bytes += len(chunk)
            code = error_code(answer)
            if answer.status_code == 200:
                acknowledged = _offset(answer.json()["offset"], len(body))
                stalls = stalls + 1 if acknowledged <= offset else 0
                offset, outcome.progressed = acknowledged, outcome.progressed or stalls == 0
                if stalls >= MAX_STALLS:
                    outcome.error = f"upload {upload_id}: {stalls} chunks acknowledged without progress (offset {offset}); trying again later"
                    return False
            elif code == "offset_mismatch" and mismatches < MAX_OFFSET_MISMATCHES:
                offset, mismatches = _offset(answer.json()["offset"], len(body)), mismatches + 1
            elif answer.status_code == 404:
                self.spool.forget_upload(entry)
                outcome.error = f"upload {upload_id} is gone from the server; the next attempt starts a new one"
                return False
            elif answer.status_code == 408 and len(chunk) > MIN_CHUNK:  # the chunk took longer than the server (or a proxy) waits
                self.slow_cap, outcome.timed_out = max(MIN_CHUNK, len(chunk) // 2), True  # a slow uplink: smaller chunks, each in time, from the same offset
                log.info("upload %s: a %d-byte chunk timed out on the way (408); sending %d-byte chunks", upload_id, len(chunk), self.slow_cap)
            elif answer.status_code in (400, 409, 413):  # the transfer went wrong, not the episode: a new upload next time
                if answer.status_code == 413 and code is None:  # a proxy's body limit under the server's chunk size
                    self.chunk_cap = max(MIN_CHUNK, min(max_chunk, self.chunk_cap or max_chunk) // 2)
                self._abort(upload_id)
                self.spool.forget_upload(entry)
                outcome.error = f"upload {upload_id}: a chunk was refused ({answer.status_code} {code or 'not the server'}'s answer); the next attempt starts a new upload"
                return False
            else:
                outcome.settled(answer)
                return False
        return True

    def _ask(self, method: str, url: str, **kwargs) -> httpx.Response:
        """One request of the protocol; an answer in a content coding (a proxy that compresses, though asked not to) is
        refused here, naming the coding (answers.refuse_coded): its JSON cannot be read."""
        return refuse_coded(getattr(self.client, method)(url, **kwargs))

    def _abort(self, upload_id: str) -> None:
        """DELETE an upload this robot will not finish (best effort: the server expires it anyway)."""
        try:
            self.client.delete(self._url(upload_id))
        except httpx.HTTPError as exc:
            log.info("could not abort upload %s (%s); the server expires it", upload_id, exc)

    def _url(self, upload_id: str, tail: str = "") -> str:
        return f"{self.server_url}/v1/uploads/{upload_id}{tail}"


def _usable(remembered: dict | None) -> dict | None:
    """A sidecar's upload, if it names one (it is written whole; this guards against a hand-edited one)."""
    if remembered is None or not isinstance(remembered.get("upload_id"), str) or remembered.get("content_encoding") not in ("identity", "zstd"):
        return None
    return remembered


def _offset(value, size: int) -> int:
    """A server's offset into a body of ``size`` bytes; ValueError for anything else (negative, past the end, not an integer)."""
    if isinstance(value, bool) or not isinstance(value, int | str) or not 0 <= int(value) <= size:
        raise ValueError(f"offset {value!r} is not a byte offset into {size} bytes")
    return int(value)
