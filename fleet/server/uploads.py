"""Resumable uploads: an episode of any size (up to ``max_episode_bytes``) sent in chunks, resumed
from the last acknowledged byte after a dropped connection, a server restart or a robot restart.

In the spirit of tus (tus.io) and Google Cloud Storage resumable uploads (docs/protocol.md,
"Resumable uploads"); robot token on every call, each upload visible only to the robot that made it:

    POST   /v1/uploads                JSON {"size", "sha256", "content_encoding"?} -> 201 {"upload_id", "offset": 0,
                                      "max_chunk_bytes"} + Location (200 and its offset when this robot already has
                                      an open upload of the same bytes)
    PUT    /v1/uploads/{id}           header Upload-Offset: N, body: the next chunk -> 200 {"offset"}, once on disk
    HEAD   /v1/uploads/{id}           headers Upload-Offset, Upload-Length, Upload-Max-Chunk-Bytes
    GET    /v1/uploads/{id}           the same as JSON
    POST   /v1/uploads/{id}/complete  size and sha256 checked, then the episode goes the way of POST /v1/episodes
    DELETE /v1/uploads/{id}           abort -> 204

Staging (:class:`Staging`): ``<dir>/<robot_id>/<id>.json`` says what the upload will hold (written once,
atomically: the upload exists iff it exists) and ``<id>.part`` holds the bytes received, so its length is
the offset. A chunk is read whole (at most ``max_chunk_bytes``), appended and fsynced before it is
acknowledged, under an exclusive ``flock`` that also orders PUTs of one upload across processes: a
half-received chunk leaves nothing, and an acknowledged offset survives a SIGKILL or a power cut. A
completed upload leaves a tombstone (its ``.json`` with the episode id, the bytes deleted) for
``upload_ttl_s``, so a robot whose answer to complete was lost gets 200 "duplicate" again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from fleet.server.auth import TokenRegistry
from fleet.server.body import read_body
from fleet.server.config import ServerConfig
from fleet.server.content_encoding import ACCEPT_ENCODING, ACCEPTED
from fleet.server.errors import ApiError
from fleet.server.limits import UploadLimits
from fleet.server.metrics import Metrics
from fleet.store.location import Location
from sim.durable import folder_lock, write_durably
from sim.episode import EpisodeValidationError, loads_bounded

log = logging.getLogger(__name__)
UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{32}")  # secrets.token_urlsafe(24): 192 random bits
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
CREATE_FIELDS = ("size", "sha256", "content_encoding")
MAX_CREATE_BYTES = 4096  # the JSON of POST /v1/uploads
NO_STORE = {"Cache-Control": "no-store"}
SWEEP_EVERY_S = 60.0  # at most this often, a create also removes expired uploads (besides at startup)

# Reads one episode body, decodes it (coding, at most limit bytes), validates and commits it for robot_id:
# (201 | 200, {"episode_id", "status"}); ApiError otherwise (fleet.server.app.create_app's ``ingest``).
Ingest = Callable[[Callable[[], Awaitable[bytes]], str, str, int, int], Awaitable[tuple[int, dict]]]


@dataclasses.dataclass(frozen=True)
class Upload:
    """One staged upload: what its robot declared, and the stored episode once completed."""

    upload_id: str
    robot_id: str
    size: int
    sha256: str
    content_encoding: str
    episode_id: str | None = None  # set when completed (the tombstone that answers a second complete)

    @property
    def completed(self) -> bool:
        return self.episode_id is not None


class OffsetRefusal(ApiError):
    """A refusal that says where the upload stands: ``offset`` in the JSON body and in ``Upload-Offset``."""

    def __init__(self, status: int, error: str, reason: str, offset: int, field: str | None = "upload-offset"):
        super().__init__(status, error, reason, field, {"Upload-Offset": str(offset), **NO_STORE})
        self.offset = offset

    def response(self) -> JSONResponse:
        body = {"error": self.error, "field": self.field, "reason": self.reason, "offset": self.offset}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def no_such_upload(upload_id: str) -> ApiError:
    return ApiError(
        404,
        "no_such_upload",
        f"this robot has no upload {upload_id} (it expired, was aborted, or was staged on another replica); start a new one with POST /v1/uploads",
        "upload_id",
        NO_STORE,
    )


def staging_dir(config: ServerConfig, store_path: str) -> Path:
    """``upload_dir``, else ``<store path>.uploads`` beside a local store, else ``uploads/`` beside the token file."""
    if config.upload_dir:
        return Path(config.upload_dir)
    if not Location.parse(store_path).is_local:
        return Path(config.token_file).parent / "uploads"
    return Path(store_path.rstrip("/") + ".uploads")


def _last_touched(*paths: Path) -> float:
    """The latest modification time of those of ``paths`` that exist (0 if none does)."""
    times = [0.0]
    for path in paths:
        with contextlib.suppress(FileNotFoundError):  # deleted meanwhile (completed, aborted)
            times.append(path.stat().st_mtime)
    return max(times)


class Staging:
    """Uploads on local disk, one folder per robot (module docstring). Every method blocks on file I/O."""

    def __init__(self, root: str | Path, *, ttl_s: float, max_open: int):
        self.root, self.ttl_s, self.max_open = Path(root), ttl_s, max_open
        self.root.mkdir(parents=True, exist_ok=True)
        self._last_sweep = 0.0
        self._sweep_lock = threading.Lock()
        self.sweep()

    # -- paths ---------------------------------------------------------------------------
    def _paths(self, robot_id: str, upload_id: str) -> tuple[Path, Path]:
        """(``.json``, ``.part``) of an upload; ``upload_id`` is checked before it touches a path."""
        if not UPLOAD_ID.fullmatch(upload_id):
            raise ApiError(
                400, "bad_upload_id", f"{upload_id[:80]!r} is not an upload id (32 characters of A-Z a-z 0-9 _ -, as POST /v1/uploads answers)", "upload_id"
            )
        folder = self.root / robot_id  # robot ids are a safe character set (sim.episode.ROBOT_ID), checked at token load
        return folder / f"{upload_id}.json", folder / f"{upload_id}.part"

    @contextlib.contextmanager
    def _robot_lock(self, robot_id: str) -> Iterator[Path]:
        """The robot's folder, locked (flock) against concurrent creates in this and other processes."""
        folder = self.root / robot_id
        folder.mkdir(exist_ok=True)
        with folder_lock(folder):
            yield folder

    # -- reading -------------------------------------------------------------------------
    def get(self, robot_id: str, upload_id: str) -> Upload:
        """The robot's upload ``upload_id``; 404 if it has none of that id (another robot's included), 400 for a malformed id."""
        meta, part = self._paths(robot_id, upload_id)
        try:
            upload = Upload(**json.loads(meta.read_bytes()))
        except FileNotFoundError:
            raise no_such_upload(upload_id) from None
        if self._expired(meta, part):
            self._remove(meta, part)
            raise no_such_upload(upload_id)
        return upload

    def offset(self, upload: Upload) -> int:
        """Bytes received so far (the size once completed)."""
        if upload.completed:
            return upload.size
        try:
            return self._paths(upload.robot_id, upload.upload_id)[1].stat().st_size
        except FileNotFoundError:
            raise no_such_upload(upload.upload_id) from None

    def _expired(self, meta: Path, part: Path) -> bool:
        return time.time() - _last_touched(meta, part) > self.ttl_s

    # -- changes -------------------------------------------------------------------------
    def create(self, robot_id: str, size: int, sha256: str, coding: str) -> tuple[Upload, int, bool]:
        """(upload, its offset, whether it is new): an open upload of this robot with the same size, digest
        and coding is resumed rather than duplicated (a robot whose answer to create was lost retries it)."""
        self.sweep_if_due()
        with self._robot_lock(robot_id) as folder:
            open_uploads = [u for u in self._uploads(folder) if not u.completed]
            for upload in open_uploads:
                if (upload.size, upload.sha256, upload.content_encoding) == (size, sha256, coding):
                    return upload, self.offset(upload), False
            if len(open_uploads) >= self.max_open:
                raise ApiError(
                    429,
                    "too_many_open_uploads",
                    f"robot {robot_id} has {len(open_uploads)} open uploads, the most allowed; complete or DELETE one, "
                    f"or retry once one expires ({self.ttl_s:g} s after its last chunk)",
                    None,
                    {"Retry-After": "60"},
                )
            upload = Upload(secrets.token_urlsafe(24), robot_id, size, sha256, coding)
            meta, part = self._paths(robot_id, upload.upload_id)
            part.touch(exist_ok=False)
            write_durably(meta, json.dumps(dataclasses.asdict(upload)).encode())  # the upload exists from here
        return upload, 0, True

    @contextlib.contextmanager
    def _locked_part(self, upload: Upload) -> Iterator:
        """The upload's bytes, open for reading and writing under an exclusive ``flock`` (one writer per
        upload, across processes too); 404 ``no_such_upload`` when they are gone."""
        try:
            f = open(self._paths(upload.robot_id, upload.upload_id)[1], "r+b")
        except FileNotFoundError:
            raise no_such_upload(upload.upload_id) from None
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield f

    def append(self, upload: Upload, offset: int, chunk: bytes) -> int:
        """Write ``chunk`` at ``offset``, which must be the upload's offset, and fsync: the new offset."""
        if upload.completed:
            check_chunk(upload, upload.size, offset, len(chunk))
            return upload.size
        with self._locked_part(upload) as f:
            current = os.fstat(f.fileno()).st_size
            check_chunk(upload, current, offset, len(chunk))
            if chunk:
                f.seek(current)
                try:
                    f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:  # a full disk: a chunk is whole or not there
                    f.truncate(current)
                    raise
            return current + len(chunk)

    def read_whole(self, upload: Upload) -> bytes:
        """All the upload's bytes, once they are all there and hash to the declared sha256: 409 ``upload_incomplete``
        before; 400 ``digest_mismatch`` (and the upload reset to offset 0, for the robot to send again) otherwise."""
        with self._locked_part(upload) as f:
            data = f.read()
            if len(data) != upload.size:
                raise OffsetRefusal(
                    409, "upload_incomplete", f"{len(data)} of the declared {upload.size} bytes have arrived; PUT the rest from offset {len(data)}", len(data)
                )
            got = hashlib.sha256(data).hexdigest()
            if got != upload.sha256:
                f.truncate(0)
                os.fsync(f.fileno())
                reason = f"the {upload.size} bytes received hash to sha256 {got}, not the declared {upload.sha256}; the upload was reset: send it again from offset 0"
                raise OffsetRefusal(400, "digest_mismatch", reason, 0, "sha256")
        return data

    def finish(self, upload: Upload, episode_id: str) -> None:
        """Leave the tombstone of a completed upload (for a repeated complete) and delete its bytes."""
        meta, part = self._paths(upload.robot_id, upload.upload_id)
        write_durably(meta, json.dumps(dataclasses.asdict(dataclasses.replace(upload, episode_id=episode_id))).encode())
        part.unlink(missing_ok=True)

    def remove(self, upload: Upload) -> None:
        self._remove(*self._paths(upload.robot_id, upload.upload_id))

    @staticmethod
    def _remove(meta: Path, part: Path) -> None:
        meta.unlink(missing_ok=True)  # first: without its .json the upload is gone, whatever is left
        part.unlink(missing_ok=True)

    # -- expiry --------------------------------------------------------------------------
    def sweep_if_due(self) -> None:
        if time.time() - self._last_sweep >= min(SWEEP_EVERY_S, self.ttl_s):
            self.sweep()

    def sweep(self) -> int:
        """Remove uploads (and stray files: leftovers of a crash) untouched for ``ttl_s``; how many were removed."""
        with self._sweep_lock:
            self._last_sweep = now = time.time()
            removed = 0
            for path in list(self.root.glob("*/*")):
                if path.suffix == ".part" and path.with_suffix(".json").exists():
                    continue  # judged with its .json
                part = path.with_suffix(".part")  # (the path itself for a stray .part)
                touched = _last_touched(path, part)
                if touched and now - touched > self.ttl_s:
                    self._remove(path, part)
                    removed += 1
            if removed:
                log.info("upload staging %s: removed %d upload(s) untouched for %g s", self.root, removed, self.ttl_s)
            return removed

    def _uploads(self, folder: Path) -> list[Upload]:
        """The robot's uploads, expired ones removed."""
        found = []
        for meta in folder.glob("*.json"):
            part = meta.with_suffix(".part")
            if self._expired(meta, part):
                self._remove(meta, part)
            else:
                with contextlib.suppress(FileNotFoundError):  # completed or aborted meanwhile
                    found.append(Upload(**json.loads(meta.read_bytes())))
        return found


def check_chunk(upload: Upload, current: int, offset: int, length: int) -> None:
    """A chunk of ``length`` bytes at ``offset`` fits an upload holding ``current`` bytes, or ApiError."""
    if offset != current:
        reason = f"Upload-Offset is {offset} but the upload holds {current} bytes; send from offset {current} (HEAD tells it after a dropped connection)"
        raise OffsetRefusal(409, "offset_mismatch", reason, current)
    if current + length > upload.size:
        raise OffsetRefusal(
            400, "chunk_past_size", f"a {length}-byte chunk at offset {offset} passes the declared size {upload.size}; {upload.size - current} bytes remain", current, "body"
        )


def parse_create(raw: bytes, max_episode_bytes: int) -> tuple[int, str, str]:
    """(size, sha256, content_encoding) of a POST /v1/uploads body; ApiError naming the field otherwise."""
    try:
        fields = loads_bounded(raw, "body")  # standard JSON, each key once
    except EpisodeValidationError as exc:
        raise ApiError(400, "bad_upload", f'the body must be a JSON object {{"size", "sha256", "content_encoding"?}}: {exc.reason}', "body") from None
    if not isinstance(fields, dict):
        raise ApiError(400, "bad_upload", 'the body must be a JSON object {"size", "sha256", "content_encoding"?}', "body")
    for key in fields:
        if key not in CREATE_FIELDS:
            raise ApiError(400, "bad_upload", f"unknown field {str(key)[:60]!r}; the fields are {', '.join(CREATE_FIELDS)}", str(key)[:60])
    size, digest, coding = fields.get("size"), fields.get("sha256"), fields.get("content_encoding", "identity")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ApiError(400, "bad_upload", f"size must be the body's length in bytes, an integer >= 1 (got {str(size)[:40]!r})", "size")
    if size > max_episode_bytes:
        raise ApiError(413, "episode_too_large", f"an upload of {size} bytes is over the {max_episode_bytes}-byte limit (the server's max_episode_bytes): "
                       "record shorter episodes (a shift as episodes of minutes), or have the server's operator raise the limit", "size")
    if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest.lower()):
        raise ApiError(400, "bad_upload", "sha256 must be the whole body's SHA-256 as 64 hex digits", "sha256")
    if not isinstance(coding, str) or coding.lower() not in ACCEPTED:
        reason = f"content_encoding {str(coding)[:40]!r} is not accepted; send one of {', '.join(ACCEPTED)}"
        raise ApiError(415, "unsupported_content_encoding", reason, "content_encoding", ACCEPT_ENCODING)
    return size, digest.lower(), coding.lower()


def parse_upload_offset(header: str | None) -> int:
    if header is None:
        raise ApiError(400, "bad_upload_offset", "the Upload-Offset header is missing: send the byte offset this chunk starts at (HEAD the upload for it)", "upload-offset")
    if not (header.isascii() and header.isdigit() and len(header) <= 20):
        raise ApiError(400, "bad_upload_offset", f"Upload-Offset must be a byte count (got {header[:40]!r}); HEAD the upload for its offset", "upload-offset")
    return int(header)


async def read_chunk(request: Request, config: ServerConfig) -> bytes:
    """One PUT's body, at most ``max_chunk_bytes``, with read_body's limits and timeout."""
    try:
        return await read_body(request, config.max_chunk_bytes, config.body_timeout_s)
    except ClientDisconnect:
        raise ApiError(400, "chunk_incomplete", "the connection closed before the whole chunk arrived; nothing of it was kept", "body") from None
    except ApiError as exc:
        if exc.error != "body_too_large":
            raise
        raise ApiError(413, "chunk_too_large", f"a chunk is at most {config.max_chunk_bytes} bytes (max_chunk_bytes); send smaller PUTs", exc.field) from None


def progress_headers(upload: Upload, offset: int, config: ServerConfig) -> dict:
    return {"Upload-Offset": str(offset), "Upload-Length": str(upload.size), "Upload-Max-Chunk-Bytes": str(config.max_chunk_bytes), **NO_STORE}


def refused_for_good(exc: ApiError) -> bool:
    """Whether a refusal at complete is about the episode (its upload is then removed), not about the transfer
    (incomplete, digest) or the server's load (429, 503), after which the robot completes or resends it."""
    return exc.status in (400, 403, 409, 413, 415, 422) and exc.error not in ("digest_mismatch", "upload_incomplete")


def upload_router(config: ServerConfig, tokens: TokenRegistry, limits: UploadLimits, ingest: Ingest, staging: Staging, metrics: Metrics) -> APIRouter:
    """The resumable upload routes (module docstring) over ``staging``; ``ingest`` validates and commits a completed body
    (and counts it); a complete answered from a completed upload's tombstone counts as a duplicate in ``metrics``."""
    router = APIRouter()

    def robot(request: Request) -> str:
        return tokens.require(request.headers.get("authorization"), "robot").robot_id

    async def find(request: Request, upload_id: str) -> Upload:
        return await run_in_threadpool(staging.get, robot(request), upload_id)

    @router.post("/v1/uploads", status_code=201)
    async def create_upload(request: Request):
        robot_id = robot(request)
        with limits.admit(robot_id):
            size, digest, coding = parse_create(await read_body(request, MAX_CREATE_BYTES, config.body_timeout_s), config.max_episode_bytes)
        upload, offset, new = await run_in_threadpool(staging.create, robot_id, size, digest, coding)
        answer = {"upload_id": upload.upload_id, "offset": offset, "max_chunk_bytes": config.max_chunk_bytes}
        return JSONResponse(answer, status_code=201 if new else 200, headers={"Location": f"uploads/{upload.upload_id}", **NO_STORE})

    @router.put("/v1/uploads/{upload_id}")
    async def put_chunk(request: Request, upload_id: str):
        upload = await find(request, upload_id)
        offset = parse_upload_offset(request.headers.get("upload-offset"))
        with limits.admit(upload.robot_id):
            chunk = await read_chunk(request, config)
            new_offset = await run_in_threadpool(staging.append, upload, offset, chunk)
        return JSONResponse({"offset": new_offset}, headers={"Upload-Offset": str(new_offset), **NO_STORE})

    @router.get("/v1/uploads/{upload_id}")
    @router.head("/v1/uploads/{upload_id}")
    async def upload_progress(request: Request, upload_id: str):
        upload = await find(request, upload_id)
        offset = await run_in_threadpool(staging.offset, upload)
        answer = {"upload_id": upload.upload_id, "offset": offset, "size": upload.size, "content_encoding": upload.content_encoding}
        answer |= {"max_chunk_bytes": config.max_chunk_bytes, "completed": upload.completed, "episode_id": upload.episode_id}
        return JSONResponse(answer, headers=progress_headers(upload, offset, config))

    @router.delete("/v1/uploads/{upload_id}", status_code=204)
    async def abort_upload(request: Request, upload_id: str):
        await run_in_threadpool(staging.remove, await find(request, upload_id))
        return Response(status_code=204)

    @router.post("/v1/uploads/{upload_id}/complete")
    async def complete_upload(request: Request, upload_id: str):
        upload = await find(request, upload_id)
        if upload.completed:  # the answer to the first complete was lost: answer as a repeated POST /v1/episodes would
            metrics.uploaded("duplicate", 0, 0)
            return JSONResponse({"episode_id": upload.episode_id, "status": "duplicate"}, headers=NO_STORE)
        read = functools.partial(run_in_threadpool, staging.read_whole, upload)
        try:
            code, answer = await ingest(read, upload.content_encoding, upload.robot_id, config.max_episode_bytes, upload.size)
        except ApiError as exc:
            if exc.error == "no_such_upload":  # another replica completed it between our reads of its record and its bytes
                again = await find(request, upload_id)  # 404 if it is gone for good
                if again.completed:
                    metrics.uploaded("duplicate", 0, 0)
                    return JSONResponse({"episode_id": again.episode_id, "status": "duplicate"}, headers=NO_STORE)
            if refused_for_good(exc):
                await run_in_threadpool(staging.remove, upload)
            raise
        await run_in_threadpool(staging.finish, upload, answer["episode_id"])
        return JSONResponse(answer, status_code=code, headers=NO_STORE)

    return router
