"""HTTP face of the policy registry (docs/protocol.md, API v1; docs/security.md).

    GET  /v1/tuf/metadata/{name}   robot token: TUF metadata (<N>.root.json, timestamp.json,
                                   <N>.snapshot.json, <N>.targets.json); online metadata past
                                   half its life is re-signed before timestamp.json is served
    GET  /v1/tuf/targets/{path}    robot token: a hash-prefixed target file
    POST /v1/policies              publisher token: publish (JSON body, weights base64; a cohort: a canary)
    GET  /v1/rollout               publisher token: stable, canary, cohort and the rollout's history
    POST /v1/rollout/widen         publisher token: the canary becomes stable for every robot
    POST /v1/rollout/rollback      publisher token: end the canary, {"reason"?, "version"?}: the stable weights republished;
                                   or {"to": N, "reason"?, "version"?}: version N's weights republished as the new
                                   stable version for every robot, the stable one (and any canary) withdrawn

Both GET routes answer HEAD too, and carry a strong ETag, Cache-Control per file kind,
If-None-Match (304) and Range / If-Range (206, 416): fleet/registry/http_cache.py. They read the
registry's files where it keeps them, a local directory or a bucket (fleet/registry/files.py);
targets are streamed in pieces either way, never whole in memory.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from fleet.registry import http_cache
from fleet.registry.store import CanaryChanged, NoCanary, PolicyRegistry, PublishRefused, RolloutRefused
from fleet.registry.tuf_repo import OnlineKeyRotated, RegistryCorrupted, ReleaseKeyMissing
from fleet.server.auth import TokenRegistry
from fleet.server.body import read_body
from fleet.server.errors import ApiError
from sim.body_context import BodyContextError, parse_contexts
from sim.episode import ROBOT_ID, ROBOT_ID_RULE, EpisodeValidationError, loads_bounded
from sim.sensor_filter import SensorFilterError, parse_filters
from sim.sensors import SensorCorrectionError, parse_offsets

log = logging.getLogger(__name__)
MAX_PUBLISH_BYTES = 256 << 20
MAX_DIM = 1 << 20  # obs_dim, act_dim
MAX_REASON = 1024  # characters of a rollback's reason (copied into every robot's manifest)
_NOT_FOUND = {"Cache-Control": http_cache.NOT_FOUND}  # "no 2.root.json yet" must not outlive a key rotation in a cache
_NEXT_ROOT = re.compile(r"[1-9][0-9]*\.root\.json")  # what a TUF client asks for at every refresh until a root rotation makes it


def policy_router(registry: PolicyRegistry, tokens: TokenRegistry, body_timeout_s: float = 60.0) -> APIRouter:
    """The registry's routes; ``body_timeout_s``: a publish body not fully arrived this long after its headers gets 408."""
    router = APIRouter()

    @router.get("/v1/tuf/metadata/{name}")
    @router.head("/v1/tuf/metadata/{name}")  # one route per method: each gets its own OpenAPI operation id
    async def metadata(request: Request, name: str):
        tokens.require(request.headers.get("authorization"), "robot")

        def load() -> bytes | None:
            if name == "timestamp.json":
                _refresh(registry)
            return registry.repo.read_metadata(name)  # read whole: timestamp.json may be replaced (re-signed) at any time; it is small

        data = await run_in_threadpool(load)
        if data is None:
            missing = ApiError(404, "no_such_metadata", f"no TUF metadata {name!r} (a client asks for the next root version until this)", "name", _NOT_FOUND)
            if _NEXT_ROOT.fullmatch(name):  # every robot's every poll asks for the next root: an answer, not a refusal to count
                return missing.response()
            raise missing
        return http_cache.answer(
            request, etag=http_cache.etag_of(data), cache_control=http_cache.metadata_cache_control(name), size=len(data), media_type="application/json",
            body=lambda start, end: data[start:end],
        )  # fmt: skip

    @router.get("/v1/tuf/targets/{path:path}")
    @router.head("/v1/tuf/targets/{path:path}")  # one route per method: each gets its own OpenAPI operation id
    async def target(request: Request, path: str):
        tokens.require(request.headers.get("authorization"), "robot")
        opened = await run_in_threadpool(registry.repo.open_target, path)
        if opened is None:
            raise ApiError(404, "no_such_target", f"no target file {path!r}", "path", _NOT_FOUND)
        etag = f'"{path.rpartition("/")[2][:64]}"'  # hash-prefixed name: <sha256>.<name>
        try:
            response = http_cache.answer(
                request, etag=etag, cache_control=http_cache.IMMUTABLE, size=opened.size, media_type="application/octet-stream",
                body=opened.chunks,
            )  # fmt: skip
        except ApiError:  # 416: nothing to send
            opened.close()
            raise
        if not isinstance(response, StreamingResponse):  # 304, 416, HEAD: the file is not read
            opened.close()
        return response

    @router.post("/v1/policies", status_code=201)
    async def publish(request: Request):
        tokens.require(request.headers.get("authorization"), "publisher")
        await _require_release(registry)  # before the body is read: no release is signed here
        raw = await read_body(request, MAX_PUBLISH_BYTES, body_timeout_s)  # 413 past the limit, 408 for a body that stalls
        try:
            body = await run_in_threadpool(loads_bounded, raw, "<body>")  # standard JSON: no NaN, no repeated keys
        except EpisodeValidationError as exc:
            raise ApiError(400, "bad_publish", f"the body is not JSON: {exc.reason}", None) from None
        weights, fields, extra, cohort = _parse_publish(body)
        spec_change = body.get("spec_change", False)
        if not isinstance(spec_change, bool):
            raise ApiError(400, "bad_publish", "spec_change: true (the whole fleet moves to this robot_model, obs_dim, act_dim) or false", "spec_change")
        _check_sensor_offsets(extra.get("sensor_offsets", {}), fields["obs_dim"])
        _check_body_contexts(extra.get("body_contexts", {}), extra.get("policy"))
        _check_sensor_filters(extra.get("sensor_filters", {}), fields["obs_dim"], fields["act_dim"])
        try:
            manifest = await run_in_threadpool(_signing, lambda: registry.publish(weights, cohort=cohort, spec_change=spec_change, **fields, **extra))
        except PublishRefused as exc:  # checked before anything is signed (a robot would load it): nothing was published
            field = "weights_b64" if exc.field == "weights" else exc.field  # the body's name for the weights
            raise ApiError(400, "bad_publish", f"{field}: {exc.reason}", field) from None
        return JSONResponse({"manifest": manifest}, status_code=201)

    @router.get("/v1/rollout")
    async def rollout(request: Request):
        tokens.require(request.headers.get("authorization"), "publisher")
        return JSONResponse(await run_in_threadpool(registry.rollout), headers={"Cache-Control": "no-store"})

    @router.post("/v1/rollout/widen")
    async def widen(request: Request):
        tokens.require(request.headers.get("authorization"), "publisher")
        await _require_release(registry)
        body = await _rollout_body(request, body_timeout_s, ("version",))
        version = await run_in_threadpool(_rollout_change, lambda: registry.widen(body.get("version")))
        return JSONResponse({"version": version, **await run_in_threadpool(registry.rollout)})

    @router.post("/v1/rollout/rollback")
    async def rollback(request: Request):
        tokens.require(request.headers.get("authorization"), "publisher")
        await _require_release(registry)
        body = await _rollout_body(request, body_timeout_s, ("reason", "version", "to"))
        reason = body.get("reason", "rolled back by a publisher")
        if not isinstance(reason, str) or len(reason) > MAX_REASON or any(not c.isprintable() for c in reason):
            raise ApiError(400, "bad_rollback", f"reason: printable text of at most {MAX_REASON} characters (it goes into every robot's manifest)", "reason")
        manifest = await run_in_threadpool(_rollout_change, lambda: registry.rollback(reason, body.get("version"), to=body.get("to")))
        return JSONResponse({"manifest": manifest, **await run_in_threadpool(registry.rollout)})

    return router


async def _require_release(registry: PolicyRegistry) -> None:
    """403 ``no_release_key`` or 503 ``online_key_rotated`` where this server cannot sign a release (:func:`_signing`),
    asked of the newest root before the body is read."""
    await run_in_threadpool(_signing, registry.require_release)


def _signing(change):
    """``change()``, which signs: 403 ``no_release_key`` where the root names a release key this server does not hold;
    503 ``online_key_rotated`` where a rotation replaced its online key while it ran (until restarted with the new one)."""
    try:
        return change()
    except ReleaseKeyMissing as exc:
        raise ApiError(403, "no_release_key", str(exc), None) from None
    except OnlineKeyRotated as exc:
        raise ApiError(503, "online_key_rotated", str(exc), None) from None


async def _rollout_body(request: Request, timeout_s: float, fields: tuple[str, ...]) -> dict:
    """A widen's or rollback's body: empty, or a JSON object of ``fields`` (``version``: the canary judged, or with ``to``
    the stable version judged; ``to``: the version a rollback returns the fleet to; each an integer >= 1)."""
    raw = await read_body(request, 1 << 12, timeout_s)
    try:
        body = await run_in_threadpool(loads_bounded, raw or b"{}", "<body>")
    except EpisodeValidationError as exc:
        raise ApiError(400, "bad_rollout", f"the body is not JSON: {exc.reason}", None) from None
    if not isinstance(body, dict) or set(body) - set(fields):
        raise ApiError(400, "bad_rollout", f"the body must be empty or a JSON object of {', '.join(fields)}", None)
    if "version" in body and (type(body["version"]) is not int or body["version"] < 1):
        raise ApiError(400, "bad_rollout", "version: the canary's version you judged, an integer >= 1", "version")
    if "to" in body and (type(body["to"]) is not int or body["to"] < 1):
        raise ApiError(400, "bad_rollout", "to: the version whose weights the whole fleet returns to, an integer >= 1", "to")
    return body


def _rollout_change(change):
    """``change()`` (widen, rollback): 409 ``no_canary`` without one, 409 ``canary_changed`` when another replaced the
    one judged; a :class:`RolloutRefused` as its code says, 400 for a version never published (``unknown_version``), else
    409; 403 or 503 when a key rotation took its signing off this server while it ran (:func:`_signing`)."""
    try:
        return _signing(change)
    except NoCanary as exc:
        raise ApiError(409, "no_canary", str(exc), None) from None
    except CanaryChanged as exc:
        raise ApiError(409, "canary_changed", str(exc), "version") from None
    except RolloutRefused as exc:
        raise ApiError(400 if exc.code == "unknown_version" else 409, exc.code, str(exc), exc.field) from None


def _parse_publish(body) -> tuple[bytes, dict, dict, list[str] | None]:
    """(weights, robot_model/obs_dim/act_dim, the optional fields, the canary cohort) of a publish body, each
    checked for what a robot needs of it; 400 ``bad_publish`` naming the field otherwise."""

    def refuse(field: str, reason: str) -> ApiError:
        return ApiError(400, "bad_publish", f"{field}: {reason}", field)

    if not isinstance(body, dict):
        raise refuse("<body>", "must be a JSON object with weights_b64, policy, robot_model, obs_dim, act_dim")
    for key in ("weights_b64", "policy", "robot_model", "obs_dim", "act_dim"):
        if key not in body:
            raise refuse(key, "missing (a publish needs weights_b64, policy, robot_model, obs_dim, act_dim)")
    try:
        weights = base64.b64decode(body["weights_b64"], validate=True) if isinstance(body["weights_b64"], str) else None
    except (ValueError, binascii.Error):
        weights = None
    if not weights:
        raise refuse("weights_b64", "must be the weights file, base64 (non-empty)")
    if not isinstance(body["robot_model"], str) or not ROBOT_ID.fullmatch(body["robot_model"]):
        raise refuse("robot_model", f"must be a robot model name: {ROBOT_ID_RULE}")
    for key in ("obs_dim", "act_dim"):
        if type(body[key]) is not int or not 1 <= body[key] <= MAX_DIM:
            raise refuse(key, f"must be an integer in 1..{MAX_DIM}")
    fields = {k: body[k] for k in ("robot_model", "obs_dim", "act_dim")}
    extra = {k: body[k] for k in ("policy", "data_snapshot", "gate", "note", "sensor_offsets", "body_contexts", "sensor_filters") if k in body}
    for key, kind in (("policy", dict), ("gate", dict), ("data_snapshot", str), ("note", str)):
        if key in extra and not isinstance(extra[key], kind):
            raise refuse(key, f"must be a JSON {'object' if kind is dict else 'string'}")
    if not extra["policy"]:
        raise refuse("policy", "must be the export's manifest.json (policies.export.export_policy), not empty")
    for key in ("data_snapshot", "note"):  # shown to operators and robots' logs as they are
        bad = next((c for c in extra.get(key, "") if not c.isprintable() and c not in "\n\t"), None)
        if bad is not None:
            raise refuse(key, f"holds control character {bad!r}; only printable text, newlines and tabs")
    cohort = body.get("cohort") or None
    if cohort is not None:
        if not isinstance(cohort, list) or not all(isinstance(r, str) and ROBOT_ID.fullmatch(r) for r in cohort):
            raise refuse("cohort", f"must be a list of robot ids ({ROBOT_ID_RULE}), or absent for a stable release")
        cohort = sorted(set(cohort))
    return weights, fields, extra, cohort


def _refresh(registry: PolicyRegistry) -> None:
    """Re-sign what is due before timestamp.json is served. Metadata the registry did not sign (its
    files changed by someone else), or that this server can no longer sign (a rotation replaced its
    online key: the repository says so, once an hour), is served as it is: robots check it and
    refuse it, and report a freeze once the last good timestamp expires."""
    try:
        registry.refresh()
    except RegistryCorrupted as exc:
        log.error("not re-signing: %s", exc)


def _check_body_contexts(contexts, policy) -> None:
    """400 unless ``contexts`` is {robot_id: one number in [-1, 1] per context feature of ``policy``}."""
    observation = policy.get("observation", {}) if isinstance(policy, dict) else {}
    context = observation.get("context", {}) if isinstance(observation, dict) else None
    if not isinstance(context, dict):
        raise ApiError(400, "bad_publish", "policy.observation.context: must be a JSON object ({\"dim\": C, ...}) or absent", "policy")
    dim = context.get("dim", 0)
    try:
        parse_contexts(contexts, dim if isinstance(dim, int) else 0)
    except BodyContextError as exc:
        raise ApiError(400, "bad_publish", f"body_contexts: {exc}", "body_contexts") from None


def _check_sensor_filters(filters, obs_dim, act_dim) -> None:
    """400 unless ``filters`` is {robot_id: a sensor filter for obs_dim observations and act_dim actions}."""
    try:
        parse_filters(filters, obs_dim, act_dim)
    except SensorFilterError as exc:
        raise ApiError(400, "bad_publish", f"sensor_filters: {exc}", "sensor_filters") from None


def _check_sensor_offsets(offsets, obs_dim) -> None:
    """400 unless ``offsets`` is {robot_id: obs_dim numbers}: robots would refuse the version anyway."""
    try:
        parse_offsets(offsets, obs_dim)
    except SensorCorrectionError as exc:
        raise ApiError(400, "bad_publish", str(exc), "sensor_offsets") from None

