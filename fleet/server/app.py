"""The FastAPI app of flywheel-server: episode upload, listing, fetch, health, metrics.

API (docs/protocol.md):
    POST /v1/episodes            robot token; body: one safetensors episode (Content-Encoding: zstd accepted)
                                 201 created | 200 duplicate | 409 conflict | 4xx refused | 503 retry
    GET  /v1/episodes            operator token; ?robot_id=&source=&robot_model=&since=&until=&limit=&offset=
    GET  /v1/episodes/{id}       operator token; the episode as canonical safetensors
    /v1/uploads...               robot token; resumable uploads of large episodes (fleet/server/uploads.py)
    GET  /healthz                anyone
    GET  /metrics                operator token; Prometheus text
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import hashlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from icechunk import IcechunkError
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Match

from fleet.registry.s3 import S3Error
from fleet.registry.tuf_repo import RegistryBusy, RegistryCorrupted, RepositoryNotInitialised
from fleet.server import openapi
from fleet.server.auth import TokenRegistry
from fleet.server.committer import GroupCommitter, ShuttingDown
from fleet.server.config import ServerConfig
from fleet.server.body import read_body
from fleet.server.content_encoding import ACCEPT_ENCODING, MemoryBudget, content_coding, decode_body, refuse_undeclared_zstd
from fleet.server.errors import ApiError, from_validation
from fleet.server.limits import UploadLimits
from fleet.server.maintainer import Maintainer
from fleet.server.metrics import HTTP_METHODS, Metrics
from fleet.server.uploads import Staging, staging_dir, upload_router
from fleet.store.backend import StoreBusyError, StoreUnreachableError, short_reason
from fleet.store.reader import StoreCorruptionError, StoreSnapshot
from fleet.store.writer import EpisodeStore
from sim.durable import disk_full
from sim.episode import EPISODE_ID_RULE, Episode, EpisodeValidationError, check_new_episode_id, encode_safetensors

log = logging.getLogger(__name__)
COMPLETE_COPIES = 3  # what a complete holds of its episode at the peak: the body read whole, the parsed arrays, their canonical encoding
SAFETENSORS = "application/octet-stream"
# the storage under the store and the registry did not answer: 503 + Retry-After for reads and registry calls, as for uploads
STORAGE_FAULTS = (IcechunkError, StoreUnreachableError, StoreBusyError, S3Error, RepositoryNotInitialised, RegistryBusy, RegistryCorrupted)
STORAGE_RETRY_AFTER_S = 5
FULL_DISK_RETRY_AFTER_S = 30  # space comes back when an operator frees it, not within a second
# the server's own disk refused a write for a reason an operator fixes (a read-only remount after disk errors, permissions, a
# failing disk): 503 + Retry-After, as for a store that does not answer; a full disk or quota (ENOSPC, EDQUOT) is a 507
UNWRITABLE_DISK = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})
DEGRADED_FOR_S = 30.0  # /healthz answers 503 this long after a failed group commit
STALLED_S = 10.0  # ... and while a group commit has run longer than this (commits take milliseconds, ~1 s on object storage)


def insufficient_storage(reason: str) -> ApiError:
    """507: nothing of the request kept; robots keep the episode, never blame it, and retry after Retry-After."""
    return ApiError(507, "insufficient_storage", f"{reason}; nothing of this request was kept: retry later", None, {"Retry-After": str(FULL_DISK_RETRY_AFTER_S)})


def parse_episode(body: bytes) -> tuple[Episode, bytes, int]:
    """(episode, sha256 of its canonical bytes, canonical size); ApiError naming the fault otherwise."""
    try:
        episode = Episode.from_bytes(body)
        check_new_episode_id(episode.episode_id)  # the nil id of a robot whose id is unset would conflict with itself for good
    except EpisodeValidationError as exc:
        raise from_validation(exc) from None
    canonical = encode_safetensors(episode.arrays(), episode.metadata)
    return episode, hashlib.sha256(canonical).digest(), len(canonical)


def conflict_reason(episode_id: str, stored_by: str | None, robot_id: str) -> str:
    """The reason of a 409 ``episode_id_conflict`` to ``robot_id``; ``stored_by``: the robot_id of the episode stored under
    ``episode_id`` (None: unknown). Where another robot stored it, the reason says so, never naming that robot: ids are
    fleet-wide, so a robot token that can predict a robot's ids (a uuid5 in a namespace made of public names, as this
    documentation once advised) can take them first, and the victim was told it had reused its own id."""
    if stored_by is None or stored_by == robot_id:
        return f"episode {episode_id} is stored with different content; unless this is a changed copy of an episode sent before, the id was reused: {EPISODE_ID_RULE}"
    return (
        f"episode id {episode_id} is taken by another robot's episode (stored first, with other content): this is no reuse by this robot. "
        "Keep this episode: give it a new random uuid4 episode_id and send it again (the project's robot agent keeps it in its spool's rejected/), "
        "and make ids with uuid4 from now on (one another robot could predict can be taken first); an operator should look into the token "
        f"that stored it, which may be stolen (GET /v1/episodes/{episode_id} with an operator token names the robot)"
    )


class _Snapshots:
    """The latest store snapshot, reused until the store's tip moves."""

    def __init__(self, store: EpisodeStore):
        self.store = store
        self._lock = threading.Lock()
        self._snap: StoreSnapshot | None = None

    def latest(self) -> StoreSnapshot:
        tip = self.store.latest_snapshot_id()
        with self._lock:
            if self._snap is None or self._snap.snapshot_id != tip:
                self._snap = self.store.snapshot(tip, base=self._snap)
            return self._snap


RoutesFactory = Callable[[TokenRegistry], Iterable[APIRouter]]


class _RefuseAmbiguousFraming:
    """RFC 9112 6.3: a request with both Transfer-Encoding and Content-Length (or several differing
    Content-Lengths) is an error: behind a proxy that reads it the other way it smuggles a request.
    (h11 answers differing Content-Lengths itself, and merges identical ones, as RFC 9112 allows.)
    So is one with two Authorization headers (RFC 9110 5.3: not a list): which one a proxy or
    another server would check is anyone's guess."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            lengths = headers.getlist("content-length")
            if len(lengths) > 1 or (lengths and "transfer-encoding" in headers):
                self.metrics.rejected("ambiguous_framing")
                reason = "send either one Content-Length or Transfer-Encoding: chunked, not both (RFC 9112 6.3)"
                await ApiError(400, "ambiguous_framing", reason, "content-length", {"Connection": "close"}).response()(scope, receive, send)
                return
            if len(headers.getlist("authorization")) > 1:
                self.metrics.rejected("ambiguous_authorization")
                reason = "send one Authorization header (Bearer <token>), not several"
                await ApiError(400, "ambiguous_authorization", reason, "authorization", {"Connection": "close"}).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _CountRequests:
    """Per-route request counts and latencies (the route's template, never the raw path; the method from a fixed set), counted
    when the response starts (its status known), or as 500 when the app raised before it did."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        counted = False

        def count(status: int) -> None:
            nonlocal counted
            if not counted:
                counted = True
                route = scope.get("route")
                self.metrics.request(scope["method"], getattr(route, "path", None), status, time.perf_counter() - start)

        async def send_counted(message):
            if message["type"] == "http.response.start":
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            count(500)


LIST_PARAMETERS = frozenset({"robot_id", "source", "robot_model", "since", "until", "limit", "offset"})  # GET /v1/episodes


def allowed_methods(app: FastAPI, scope) -> list[str]:
    """The methods some route takes on ``scope``'s path, sorted (each method asked of every route: FastAPI
    keeps an included router's routes behind one entry)."""
    return [m for m in HTTP_METHODS if any(route.matches({**scope, "method": m})[0] == Match.FULL for route in app.router.routes)]


def create_app(
    config: ServerConfig, store: EpisodeStore, tokens: TokenRegistry, *, on_ready=None, on_stop=None, routes: RoutesFactory | None = None
) -> FastAPI:
    """The app over an opened store; the group-commit thread lives as long as the app's lifespan.

    on_ready / on_stop: called once it serves, and at a clean shutdown once the queued uploads are committed.

    routes: more endpoints on the same server and tokens (e.g. the policy registry's
    ``lambda tokens: [policy_router(registry, tokens)]``).
    """
    metrics = Metrics()
    committer = GroupCommitter(
        store, metrics, wait_s=config.commit_wait_ms / 1000, rejoin_s=config.commit_rejoin_ms / 1000,
        max_bytes=config.commit_max_bytes, max_episodes=config.commit_max_episodes,
    )  # fmt: skip
    maintainer = Maintainer(store, metrics, config.maintenance_every_s)
    snapshots = _Snapshots(store)
    limits = UploadLimits(config.max_concurrent_uploads, config.upload_rate_per_s, config.upload_burst)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        committer.start()
        maintainer.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await run_in_threadpool(maintainer.close)  # waits up to CLOSE_WAIT_S for a run in progress
            await run_in_threadpool(committer.close)
            if on_stop is not None:
                on_stop()

    # /openapi.json describes the protocol for clients (fleet/server/openapi.py); no Swagger or ReDoc pages (they load scripts
    # from a CDN); redirect_slashes off: "/v1/episodes/" is a 404 in JSON, not a 307 to whatever Host the client named
    app = FastAPI(title="flywheel-server", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False)
    openapi.install(app, config)
    app.state.metrics, app.state.committer, app.state.store, app.state.maintainer = metrics, committer, store, maintainer

    for router in routes(tokens) if routes is not None else ():
        app.include_router(router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        metrics.rejected(exc.error)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def framework_refusal(request: Request, exc: StarletteHTTPException):  # an unknown path or method: our shape too
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        reason = {404: f"no route {request.url.path!r} (docs/protocol.md lists them)", 405: f"{request.method} is not allowed on {request.url.path!r}"}
        headers = dict(exc.headers or {}) | ({"Cache-Control": "no-store"} if exc.status_code == 404 else {})  # a cache must not keep "no such file"
        if exc.status_code == 405:  # every method some route takes on this path (Starlette names only the first route's)
            headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
        return await api_error(request, ApiError(exc.status_code, code, reason.get(exc.status_code, str(exc.detail)), None, headers))

    async def storage_fault(request: Request, exc: Exception):  # the store or the registry's storage did not answer
        reason = short_reason(exc)
        log.warning("%s %s: storage unavailable (%s: %s)", request.method, request.url.path, exc.__class__.__name__, reason)
        code = "store_unavailable" if request.url.path.startswith(("/v1/episodes", "/v1/uploads")) else "registry_unavailable"
        what = "the episode store" if code == "store_unavailable" else "the policy registry"
        return await api_error(request, ApiError(503, code, f"{what} did not answer ({reason}); retry later", None, {"Retry-After": str(STORAGE_RETRY_AFTER_S)}))

    for fault in STORAGE_FAULTS:
        app.add_exception_handler(fault, storage_fault)

    @app.exception_handler(StoreCorruptionError)
    async def store_damaged(request: Request, exc: StoreCorruptionError):  # damage stays: a 500 that says so, never a "retry later"
        log.error("%s %s: %s", request.method, request.url.path, exc)
        reason = "the episode store's files are damaged, and retrying will not help: restore the store from backup (the server's log names the file)"
        return await api_error(request, ApiError(500, "store_corrupt", reason))

    @app.exception_handler(OSError)
    async def disk_fault(request: Request, exc: OSError):  # the server's own disk (staged uploads, a local store)
        if disk_full(exc):
            log.warning("%s %s: disk full (%s)", request.method, request.url.path, exc)
            return await api_error(request, insufficient_storage(f"the server's disk is full ({exc.strerror or exc})"))
        if exc.errno not in UNWRITABLE_DISK:
            log.error("%s %s: failed", request.method, request.url.path, exc_info=exc)  # handled here, so no one else logs it
            return await server_fault(request, exc)
        where = f"{os.strerror(exc.errno)}: {exc.filename}" if exc.filename else os.strerror(exc.errno)
        log.error("%s %s: the server's disk refused a write (%s)", request.method, request.url.path, where)
        reason = f"the server's disk refused a write ({where}); retry later (an operator must make it writable again)"
        return await api_error(request, ApiError(503, "store_unavailable", reason, None, {"Retry-After": str(STORAGE_RETRY_AFTER_S)}))

    @app.exception_handler(Exception)
    async def server_fault(request: Request, exc: Exception):  # a bug: its traceback logged by uvicorn (Starlette re-raises it after this answer)
        return ApiError(500, "internal_error", f"the server failed on this request ({exc.__class__.__name__}); it is logged: retry, and report it if it stays").response()

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError):  # the framework's checks answer in our shape too
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return await api_error(request, ApiError(400, "bad_query", f"{field}: {first.get('msg', 'invalid')} (got {str(first.get('input'))[:100]!r})", field))

    # Plain ASGI middleware, not @app.middleware("http") (Starlette's BaseHTTPMiddleware): that one runs
    # the app in a task group and passes every body chunk through memory streams, per request.
    # The later one added is the outer one: count_requests sees every request, refusals included.
    app.add_middleware(_RefuseAmbiguousFraming, metrics=metrics)
    app.add_middleware(_CountRequests, metrics=metrics)

    decode_budget = MemoryBudget(config.max_episode_bytes)  # the resumable route's decodes, all robots together
    # the resumable route's completes, all robots together: what one complete of the largest episode holds (N robots
    # completing 4 GiB episodes at once held N x 12 GiB); reserved before the read, grown to the decoded size after it,
    # and held until the episode's commit settles (a commit_slow answer leaves it queued, in memory)
    complete_budget = MemoryBudget(COMPLETE_COPIES * config.max_episode_bytes, "completing_busy", "the server is completing other large uploads; complete this one again shortly")

    def stored_robot_id(episode_id: str) -> str | None:
        """The robot_id of the episode stored under ``episode_id``, for a 409's reason; None where it cannot be read (the
        409 stands: the reason then says less)."""
        try:
            return snapshots.latest().get(episode_id).robot_id
        except Exception as exc:  # a store that cannot answer now must not turn a 409 into a retry
            log.warning("episode %s: a 409 without the stored episode's robot (%s: %s)", episode_id, exc.__class__.__name__, exc)
            return None

    async def ingest(read: Callable[[], Awaitable[bytes]], coding: str, robot_id: str, limit: int, staged: int = 0) -> tuple[int, dict]:
        """Read one episode body (``read``) under ``robot_id``'s upload admission, decode it (``coding``, at most
        ``limit`` bytes), validate and commit it: (201, created) or (200, duplicate) once durable, ApiError
        otherwise. POST /v1/episodes and POST /v1/uploads/{id}/complete (fleet/server/uploads.py, ``staged``: the
        upload's size) both end here."""
        resumable = limit > config.max_body_bytes
        with contextlib.ExitStack() as admitted:  # the slot is held until the commit settles: a robot that gives up on a stalled
            admitted.enter_context(limits.admit(robot_id))  # store and sends again holds at most max_concurrent_uploads episodes here
            if resumable:
                admitted.enter_context(complete_budget.hold(COMPLETE_COPIES * staged))
            with committer.receiving():
                body = await read()
                if coding != "identity":  # decoded under the same limit as the body itself
                    body = await run_in_threadpool(decode_body, body, coding, limit, decode_budget if resumable else None)
                    if resumable and len(body) > staged:  # a zstd upload: what it holds from here is its decoded size
                        admitted.enter_context(complete_budget.hold(COMPLETE_COPIES * (len(body) - staged)))
                else:
                    refuse_undeclared_zstd(body)
                episode, digest, nbytes = await run_in_threadpool(parse_episode, body)
                if episode.robot_id != robot_id:
                    raise ApiError(403, "robot_id_mismatch", f"token is for robot {robot_id!r}, episode says {episode.robot_id!r}", "robot_id")
                try:
                    future = committer.submit(episode, digest, nbytes)
                except ShuttingDown as exc:
                    raise ApiError(503, "shutting_down", str(exc), None, {"Retry-After": "1"}) from None
            settled = asyncio.wrap_future(future)
            if not (await asyncio.wait({settled}, timeout=config.commit_timeout_s))[0]:  # a slow store: answered before the robot's
                slot = admitted.pop_all()  # own timeout; the upload stays queued, holding its slot until its commit settles

                def settled_late(done: Future) -> None:
                    slot.close()
                    if done.exception() is None and done.result() == "created":  # stored: counted, its retry is a duplicate
                        metrics.uploaded("created", nbytes, episode.num_steps)

                future.add_done_callback(settled_late)
                settled.add_done_callback(lambda f: f.cancelled() or f.exception())  # its outcome is the retry's to read
                raise ApiError(
                    503, "commit_slow", f"the store has not committed this upload within {config.commit_timeout_s:g} s (slow or unreachable); "
                    "it stays queued: retry it with the same bytes, and once its commit settles the retry answers 200 duplicate if this "
                    f"episode was stored, 409 episode_id_conflict if other content under episode_id {episode.episode_id} was stored first, "
                    "or 201 once stored if the commit failed", None, {"Retry-After": "5"},
                )  # fmt: skip
            try:
                status = settled.result()
            except Exception as exc:  # the commit failed: nothing stored, the robot keeps the episode and retries
                if disk_full(exc):
                    raise insufficient_storage(f"the episode store's disk is full ({short_reason(exc)})") from None
                raise ApiError(503, "store_unavailable", f"commit failed ({exc.__class__.__name__}: {short_reason(exc)}); retry", None, {"Retry-After": "1"}) from None
        if status == "conflict":
            stored_by = await run_in_threadpool(stored_robot_id, episode.episode_id)
            raise ApiError(409, "episode_id_conflict", conflict_reason(episode.episode_id, stored_by, robot_id), "episode_id")  # never which robot stored it
        metrics.uploaded(status, nbytes, episode.num_steps)
        return (201 if status == "created" else 200), {"episode_id": episode.episode_id, "status": status}

    @app.post("/v1/episodes")
    async def upload(request: Request):
        start = time.perf_counter()
        try:
            principal = tokens.require(request.headers.get("authorization"), "robot")
            coding = content_coding(", ".join(request.headers.getlist("content-encoding")) or None)  # two header lines are a list too
            read = functools.partial(read_body, request, config.max_body_bytes, config.body_timeout_s, coded=True)
            try:
                code, answer = await ingest(read, coding, principal.robot_id, config.max_body_bytes)
            except ClientDisconnect:  # the robot went away mid-body: nothing stored, nobody to answer
                raise ApiError(400, "body_incomplete", "the connection closed before the whole body arrived; nothing was stored", "body") from None
            return JSONResponse(answer, status_code=code, headers=ACCEPT_ENCODING)
        except ApiError as exc:  # every answer tells the robot which codings it may send (RFC 7694)
            exc.headers = {**ACCEPT_ENCODING, **(exc.headers or {})}
            raise
        finally:
            metrics.observe_latency(time.perf_counter() - start)

    staging = Staging(staging_dir(config, store.config.path), ttl_s=config.upload_ttl_s, max_open=config.max_open_uploads)
    app.include_router(upload_router(config, tokens, limits, ingest, staging, metrics))

    @app.get("/v1/episodes")
    async def list_episodes(
        request: Request,
        robot_id: str | None = None,
        source: str | None = None,
        robot_model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ):
        tokens.require(request.headers.get("authorization"), "operator")
        unknown = sorted(set(request.query_params) - LIST_PARAMETERS)
        if unknown:  # a misspelt filter would list the whole fleet
            raise ApiError(400, "bad_query", f"unknown parameter {unknown[0][:40]!r}; this route takes {', '.join(sorted(LIST_PARAMETERS))}", unknown[0][:40])
        for name in set(request.query_params):  # one value each: a repeated parameter means what each reader decides
            if len(request.query_params.getlist(name)) > 1:
                raise ApiError(400, "bad_query", f"{name[:40]!r} is given more than once; give it once", name[:40])
        if not 0 < limit <= config.list_limit:
            raise ApiError(400, "bad_query", f"limit must be in 1..{config.list_limit}", "limit")
        if offset < 0:
            raise ApiError(400, "bad_query", "offset must be >= 0", "offset")
        for name, value in (("since", since), ("until", until)):
            if value is not None and not math.isfinite(value):
                raise ApiError(400, "bad_query", f"{name} must be a finite time (seconds since the epoch)", name)
        if since is not None and until is not None and since > until:
            raise ApiError(400, "bad_query", f"since ({since:g}) is after until ({until:g}): nothing could match; swap them", "since")

        def query():
            snap = snapshots.latest()
            found = snap.episodes(robot_id=robot_id, source=source, robot_model=robot_model, since=since, until=until, include_withdrawn=True)  # the operator's audit: every stored episode
            page = [dataclasses.asdict(e) for e in found[offset : offset + limit]]
            return {"snapshot_id": snap.snapshot_id, "total": len(found), "episodes": page}

        return JSONResponse(await run_in_threadpool(query))

    @app.get("/v1/episodes/{episode_id}")
    async def get_episode(request: Request, episode_id: str):
        tokens.require(request.headers.get("authorization"), "operator")
        try:
            canonical = str(uuid.UUID(episode_id))
        except ValueError:
            raise ApiError(400, "bad_episode_id", f"{episode_id[:80]!r} is not a UUID", "episode_id") from None
        if episode_id != canonical:  # stored under one spelling (uploads are refused in any other)
            raise ApiError(400, "bad_episode_id", f"{episode_id[:80]!r} is not in the canonical form: ask for {canonical!r} (lowercase, 8-4-4-4-12)", "episode_id")

        def fetch():
            snap = snapshots.latest()
            if episode_id not in snap:
                raise ApiError(404, "not_found", f"episode {episode_id} is not in snapshot {snap.snapshot_id}", "episode_id")
            try:
                return snap.snapshot_id, snap.read_bytes(episode_id)
            except StoreCorruptionError as exc:  # damage stays: never a "retry later"
                log.error("GET /v1/episodes/%s: %s", episode_id, exc)
                reason = (
                    f"episode {episode_id} in snapshot {snap.snapshot_id} cannot be read back: its data in the episode store is damaged, "
                    "and retrying will not help; restore the store from backup (the server's log names the file)"
                )
                raise ApiError(500, "store_corrupt", reason, "episode_id") from None

        snapshot_id, data = await run_in_threadpool(fetch)
        return Response(data, media_type=SAFETENSORS, headers={"X-Flywheel-Snapshot": snapshot_id})

    @app.get("/healthz")
    @app.head("/healthz")  # load balancers' probes
    async def healthz():
        """200 ok; 503 degraded while group commits fail (a load balancer sends the fleet elsewhere), with since when and
        why. Degraded lasts ``DEGRADED_FOR_S`` after the last failure: then uploads are let in again to find out whether
        the store is back (a replica no traffic reaches would otherwise never be seen to recover); and while a commit has run
        over ``STALLED_S`` (stuck in the store's retries, it fails only after ~30 s)."""
        why = None
        if committer.failing is not None and time.time() - committer.failing["last"] < DEGRADED_FOR_S:
            why = committer.failing
        elif (running := committer.running_s) > STALLED_S:
            why = {"reason": f"a group commit has run {running:.0f} s: the store is slow or unreachable"}
        if why is not None:
            return JSONResponse({"status": "degraded", "pending_uploads": committer.pending, **why}, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ok", "pending_uploads": committer.pending}

    @app.get("/metrics")
    async def metrics_text(request: Request):
        tokens.require(request.headers.get("authorization"), "operator")
        return PlainTextResponse(metrics.render(committer.pending, store.known_episodes, committer.running_s), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    return app
