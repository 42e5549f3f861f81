"""HTTP face of the policy registry (DESIGN.md, Fleet HTTP API v1).

    GET  /v1/policies/latest?robot_id=   robot token (for itself): the signed manifest it should run
    GET  /v1/policies/{version}/weights  robot token: the safetensors weights a manifest names
    POST /v1/policies                    publisher token: publish (JSON body, weights base64)
"""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from fleet.registry.store import PolicyRegistry, RegistryError
from fleet.server.auth import TokenRegistry
from fleet.server.errors import ApiError
from sim.sensors import SensorCorrectionError, parse_offsets

MAX_PUBLISH_BYTES = 256 << 20


def policy_router(registry: PolicyRegistry, tokens: TokenRegistry) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/policies/latest")
    async def latest(request: Request, robot_id: str):
        principal = tokens.require(request.headers.get("authorization"), "robot")
        if principal.robot_id != robot_id:
            raise ApiError(403, "robot_id_mismatch", f"token is for robot {principal.robot_id!r}, asked for {robot_id!r}", "robot_id")
        envelope = await run_in_threadpool(registry.latest_for, robot_id)
        if envelope is None:
            raise ApiError(404, "no_policy", "no policy has been published for this robot yet", "robot_id")
        return JSONResponse(envelope)

    @router.get("/v1/policies/{version}/weights")
    async def weights(request: Request, version: int):
        tokens.require(request.headers.get("authorization"), "robot")
        try:
            path = registry.weights_path(version)
        except RegistryError as exc:
            raise ApiError(404, "no_such_version", str(exc), "version") from None
        return FileResponse(path, media_type="application/octet-stream")

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
        envelope = await run_in_threadpool(lambda: registry.publish(weights, cohort=body.get("cohort") or None, **fields, **extra))
        return JSONResponse(envelope, status_code=201)

    return router


def _check_sensor_offsets(offsets, obs_dim) -> None:
    """400 unless ``offsets`` is {robot_id: obs_dim numbers}: robots would refuse the version anyway."""
    try:
        parse_offsets(offsets, obs_dim)
    except SensorCorrectionError as exc:
        raise ApiError(400, "bad_publish", str(exc), "sensor_offsets") from None
