"""HTTP face of the policy registry (DESIGN.md, Fleet HTTP API v1; docs/protocol.md, docs/security.md).

    GET  /v1/tuf/metadata/{name}   robot token: TUF metadata (<N>.root.json, timestamp.json,
                                   <N>.snapshot.json, <N>.targets.json); online metadata past
                                   half its life is re-signed before timestamp.json is served
    GET  /v1/tuf/targets/{path}    robot token: a hash-prefixed target file
    POST /v1/policies              publisher token: publish (JSON body, weights base64)
"""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from fleet.registry.store import PolicyRegistry
from fleet.server.auth import TokenRegistry
from fleet.server.errors import ApiError
from sim.sensors import SensorCorrectionError, parse_offsets

MAX_PUBLISH_BYTES = 256 << 20


def policy_router(registry: PolicyRegistry, tokens: TokenRegistry) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/tuf/metadata/{name}")
    async def metadata(request: Request, name: str):
        tokens.require(request.headers.get("authorization"), "robot")
        if name == "timestamp.json":
            await run_in_threadpool(registry.refresh)
        path = registry.repo.metadata_path(name)
        try:  # read whole, then sent: timestamp.json may be replaced (re-signed) between a stat and a read
            data = await run_in_threadpool(path.read_bytes) if path is not None else None
        except OSError:  # pruned in between
            data = None
        if data is None:
            raise ApiError(404, "no_such_metadata", f"no TUF metadata {name!r} (a client asks for the next root version until this)", "name")
        return Response(data, media_type="application/json")

    @router.get("/v1/tuf/targets/{path:path}")
    async def target(request: Request, path: str):
        tokens.require(request.headers.get("authorization"), "robot")
        found = registry.repo.target_path(path)
        if found is None:
            raise ApiError(404, "no_such_target", f"no target file {path!r}", "path")
        return FileResponse(found, media_type="application/octet-stream")

    @router.post("/v1/policies", status_code=201)
    async def publish(request: Request):
        tokens.require(request.headers.get("authorization"), "publisher")
        declared = int(request.headers.get("content-length") or 0)
        if declared > MAX_PUBLISH_BYTES:
            raise ApiError(413, "too_large", f"publish body of {declared} bytes exceeds {MAX_PUBLISH_BYTES}", None)
        try:
            body = await request.json()
            weights = base64.b64decode(body.pop("weights_b64"), validate=True)
            fields = {k: body[k] for k in ("robot_model", "obs_dim", "act_dim")}
        except (ValueError, KeyError, TypeError, binascii.Error, AttributeError) as exc:
            raise ApiError(400, "bad_publish", f"need JSON with weights_b64, robot_model, obs_dim, act_dim ({exc.__class__.__name__}: {exc})", None) from None
        extra = {k: body[k] for k in ("policy", "data_snapshot", "gate", "note", "sensor_offsets") if k in body}
        _check_sensor_offsets(extra.get("sensor_offsets", {}), fields["obs_dim"])
        manifest = await run_in_threadpool(lambda: registry.publish(weights, cohort=body.get("cohort") or None, **fields, **extra))
        return JSONResponse({"manifest": manifest}, status_code=201)

    return router


def _check_sensor_offsets(offsets, obs_dim) -> None:
    """400 unless ``offsets`` is {robot_id: obs_dim numbers}: robots would refuse the version anyway."""
    try:
        parse_offsets(offsets, obs_dim)
    except SensorCorrectionError as exc:
        raise ApiError(400, "bad_publish", str(exc), "sensor_offsets") from None
