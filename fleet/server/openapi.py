"""``/openapi.json``: the protocol (docs/protocol.md) as OpenAPI 3.1, for client generators and fuzzers.

FastAPI's own document knows only what the route functions declare, and they read their bodies and headers
themselves: it had no request bodies, an empty 200 for every route, a 422 ``HTTPValidationError`` the server never
sends (parameter errors are 400 ``bad_query``, an upload id 400 ``bad_upload_id``) and no authentication. So the
operations are described here, in one table (:func:`_operations`), and :func:`install` lays it over the generated
document: each described operation gets its request body, its header parameters, every status it answers (refusals
in the one ``Error`` shape) and the token role it needs (the ``bearer`` scheme; OpenAPI 3.1 lets a scheme name
roles). Routes added through ``create_app(routes=...)`` that are not in the table keep what FastAPI says of them,
less the 422, with the ``Error`` shape as their default answer.
"""

from __future__ import annotations

import dataclasses
import typing

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter

from fleet.server.config import ServerConfig
from fleet.server.content_encoding import ACCEPTED
from fleet.store.catalog import EpisodeInfo

REF = "#/components/schemas/{model}"
ERROR = {"$ref": "#/components/schemas/Error"}
BINARY = {"type": "string", "format": "binary"}
JSON_OBJECT = {"type": "object"}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _header(description: str, schema: dict | None = None) -> dict:
    return {"description": description, "schema": schema or {"type": "string"}}


RETRY_AFTER = {"Retry-After": _header("seconds to wait before retrying", {"type": "integer"})}
ACCEPT_ENCODING = {"Accept-Encoding": _header(f"the request codings accepted: {', '.join(ACCEPTED)} (RFC 7694)")}
UPLOAD_PROGRESS = {
    "Upload-Offset": _header("bytes received so far", {"type": "integer"}),
    "Upload-Length": _header("the upload's declared size", {"type": "integer"}),
    "Upload-Max-Chunk-Bytes": _header("the largest chunk one PUT may carry", {"type": "integer"}),
}
CACHING = {
    "ETag": _header("strong: the sha256 of the content, quoted"),
    "Cache-Control": _header("by file kind (docs/security.md, 'What may be cached where')"),
}

# status -> what it means wherever it is answered; an operation's entry adds its error codes
STATUS = {
    400: "refused: a malformed request",
    401: "no or unknown bearer token (`unauthorized`)",
    403: "a token of another role (`forbidden`)",
    404: "not found",
    408: "the body had not arrived `body_timeout_s` after the headers (`body_timeout`)",
    409: "conflict",
    413: "too large",
    415: "a Content-Encoding not accepted (`unsupported_content_encoding`)",
    416: "a Range that holds no byte of the file (`range_not_satisfiable`); `Content-Range: bytes */<size>`",
    422: "the episode breaks its schema (docs/protocol.md, 'Episode schema 1')",
    429: "over this token's upload limits",
    500: "a fault of the server (`internal_error`), or the episode store's files are damaged (`store_corrupt`: restore it from backup, retrying will not help)",
    503: "unavailable for now, retry after Retry-After",
    507: "a full disk: nothing kept (`insufficient_storage`)",
}
RETRIED = (429, 503, 507)


def _refusals(codes: dict[int, str]) -> dict:
    """{status: response} in the Error shape; ``codes``: {status: the error codes, or '' for STATUS's words alone}."""
    out = {}
    for status, errors in codes.items():
        response = {"description": f"{STATUS[status]}: {errors}" if errors else STATUS[status], "content": _json(ERROR)}
        if status in RETRIED:
            response["headers"] = RETRY_AFTER
        out[str(status)] = response
    return out


EPISODE_REFUSALS = {
    400: "`not_safetensors`, `bad_header`, `size_mismatch`, `bad_zstd`, `body_incomplete`, `bad_content_length`",
    401: "",
    403: "`forbidden`, `robot_id_mismatch` (the episode's robot_id is not the token's)",
    409: "`episode_id_conflict`: the episode_id is stored with other content (ids are fleet-wide)",
    413: "`body_too_large`",
    415: "",
    422: "`missing_array`, `unknown_array`, `bad_shape`, `bad_dtype`, `non_finite`, `non_increasing_timestamp`, `bad_episode_end`, "
    "`unknown_schema_version`, `bad_camera_timestamp`, `missing_metadata`, `unknown_metadata`, `bad_metadata`",
    429: "`too_many_uploads`, `rate_limited`",
    503: "`store_unavailable`, `shutting_down`, `commit_slow`: the episode is not refused",
    507: "",
}
ACKNOWLEDGED = {
    "201": {"description": "stored (durable)", "content": _json(_ref("EpisodeAck"))},
    "200": {"description": "a duplicate: this episode_id is stored with the same content", "content": _json(_ref("EpisodeAck"))},
}
UPLOAD_ID = {404: "`no_such_upload`: never made, another robot's, aborted or expired"}
UPLOAD_ID_400 = "`bad_upload_id`"
ROBOT, OPERATOR, PUBLISHER = "robot", "operator", "publisher"


def _op(role: str | None, responses: dict, *, body: dict | None = None, headers: dict | None = None, summary: str = "") -> dict:
    """One operation's description: the token role it needs (None: none), its responses, request body and header parameters."""
    out: dict[str, typing.Any] = {"security": [{"bearer": [role]}] if role else [], "responses": responses}
    if body is not None:
        out["requestBody"] = body
    if headers:
        out["headers"] = headers
    if summary:
        out["summary"] = summary
    return out


def _headers(**params: tuple[bool, str, dict]) -> dict:
    """Header parameters by name: (required, description, schema)."""
    return {name.replace("_", "-"): (required, text, schema) for name, (required, text, schema) in params.items()}


TUF_HEADERS = _headers(
    If_None_Match=(False, "ETags the client holds: 304 without a body when one is current", {"type": "string"}),
    Range=(False, "one byte range, `bytes=a-b`, `a-` or `-n`: 206 (a malformed or multi-range one: the whole file, 200)", {"type": "string"}),
    If_Range=(False, "the ETag the Range is for: the whole file (200) when it is not current", {"type": "string"}),
)


def _tuf(media: str, missing: str, head: bool) -> dict:
    content = None if head else {media: {"schema": BINARY if media != "application/json" else JSON_OBJECT}}
    ok = {"description": "the file", "headers": CACHING | {"Content-Length": _header("its size", {"type": "integer"})}}
    partial = {"description": "the one byte range asked for", "headers": CACHING | {"Content-Range": _header("bytes a-b/size")}}
    if content:
        ok["content"], partial["content"] = content, {media: {"schema": BINARY}}
    return _op(
        ROBOT,
        {"200": ok, "206": partial, "304": {"description": "If-None-Match named the current ETag", "headers": CACHING}}
        | _refusals({401: "", 403: "", 404: missing, 416: "", 503: "`registry_unavailable`"}),
        headers=TUF_HEADERS,
    )


# what the server takes of a path or query parameter (any other value is refused: 400 bad_upload_id, bad_episode_id, bad_query)
PARAMETERS = {
    "upload_id": {"pattern": "^[A-Za-z0-9_-]{32}$", "description": "as POST /v1/uploads answered it"},
    "episode_id": {"format": "uuid", "description": "canonical lowercase 8-4-4-4-12"},
    "name": {"pattern": r"^(?:[0-9]{1,9}\.(?:root|snapshot|targets)|root|timestamp)\.json$"},
    "limit": {"minimum": 1},
    "offset": {"minimum": 0},
}


def _operations() -> dict[tuple[str, str], dict]:
    episode_body = {
        "required": True,
        "description": "one safetensors episode (docs/protocol.md, 'Episode schema 1', 'Episode schema 1.1'), "
        "as it is or as one zstd frame with `Content-Encoding: zstd`; the Content-Type is not read",
        "content": {"application/octet-stream": {"schema": BINARY}},
    }
    content_encoding = _headers(Content_Encoding=(False, "`zstd` (one frame) or `identity`, in any case; anything else: 415", {"type": "string", "enum": list(ACCEPTED)}))
    create_body = {
        "required": True,
        "content": _json(
            {
                "type": "object",
                "required": ["size", "sha256"],
                "additionalProperties": False,
                "properties": {
                    "size": {"type": "integer", "minimum": 1, "description": "the bytes to send (at most max_episode_bytes)"},
                    "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$", "description": "their SHA-256"},
                    "content_encoding": {"type": "string", "enum": list(ACCEPTED), "description": "what the bytes are: identity (default) or zstd"},
                },
            }
        ),
    }
    chunk_body = {"required": True, "description": "the next at most max_chunk_bytes bytes, from Upload-Offset", "content": {"application/octet-stream": {"schema": BINARY}}}
    upload_offset = _headers(Upload_Offset=(True, "the byte offset this chunk starts at (the upload's offset)", {"type": "string", "pattern": "^[0-9]{1,20}$"}))
    progress = {"description": "where the upload stands", "headers": UPLOAD_PROGRESS | {"Cache-Control": _header("no-store")}}
    created = {"description": "", "headers": {"Location": _header("uploads/{upload_id}, relative to the request URL: /v1/uploads/{upload_id}")}, "content": _json(_ref("UploadCreated"))}
    publish_body = {
        "required": True,
        "description": "docs/protocol.md, `POST /v1/policies`; standard JSON (no NaN, Infinity or repeated keys), at most 256 MiB",
        "content": _json(
            {
                "type": "object",
                "required": ["weights_b64", "policy", "robot_model", "obs_dim", "act_dim"],
                "properties": {
                    "weights_b64": {"type": "string", "contentEncoding": "base64", "description": "the weights file (safetensors), base64"},
                    "policy": {"type": "object", "description": "the exporter's manifest (docs/policies.md)"},
                    "robot_model": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
                    "obs_dim": {"type": "integer", "minimum": 1, "maximum": 1 << 20},
                    "act_dim": {"type": "integer", "minimum": 1, "maximum": 1 << 20},
                    "data_snapshot": {"type": "string"},
                    "gate": {"type": "object"},
                    "note": {"type": "string"},
                    "cohort": {"type": "array", "items": {"type": "string"}, "description": "robot ids: a canary; absent or empty: a stable release"},
                    "sensor_offsets": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "number"}}},
                    "body_contexts": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "number"}}},
                    "sensor_filters": {"type": "object", "additionalProperties": {"type": "object"}},
                },
            }
        ),
    }
    version = {"type": "integer", "minimum": 1, "description": "the canary you judged"}
    rollout_change = {409: "`no_canary`, `canary_changed`", 401: "", 403: "`forbidden`, `no_release_key`", 503: "`online_key_rotated`, `registry_unavailable`"}
    health = {"200": {"description": "ok", "content": _json(_ref("Health"))}, "503": {"description": "degraded", "headers": RETRY_AFTER, "content": _json(_ref("Health"))}}
    health_head = {"200": {"description": "ok"}, "503": {"description": "degraded", "headers": RETRY_AFTER}}
    return {
        ("post", "/v1/episodes"): _op(
            ROBOT, {k: v | {"headers": v.get("headers", {}) | ACCEPT_ENCODING} for k, v in (ACKNOWLEDGED | _refusals(EPISODE_REFUSALS | {408: ""})).items()},
            body=episode_body, headers=content_encoding, summary="upload one episode",
        ),
        ("get", "/v1/episodes"): _op(
            OPERATOR, {"200": {"description": "one page, in commit order", "content": _json(_ref("EpisodeList"))}}
            | _refusals({400: "`bad_query` (field: the parameter)", 401: "", 403: "", 503: "`store_unavailable`"}),
            summary="list stored episodes",
        ),
        ("get", "/v1/episodes/{episode_id}"): _op(
            OPERATOR,
            {"200": {"description": "the episode's canonical safetensors bytes", "headers": {"X-Flywheel-Snapshot": _header("the snapshot read")},
                     "content": {"application/octet-stream": {"schema": BINARY}}}}
            | _refusals({400: "`bad_episode_id`", 401: "", 403: "", 404: "`not_found`", 500: "`store_corrupt`", 503: "`store_unavailable`"}),
            summary="fetch one episode",
        ),  # fmt: skip
        ("post", "/v1/uploads"): _op(
            ROBOT, {"201": {**created, "description": "a new upload"}, "200": {**created, "description": "this robot's open upload of the same bytes"}}
            | _refusals({400: "`bad_upload`", 401: "", 403: "", 408: "", 413: "`episode_too_large`, `body_too_large`", 415: "",
                         429: "`too_many_uploads`, `rate_limited`, `too_many_open_uploads`", 507: ""}),
            body=create_body, summary="start a resumable upload",
        ),  # fmt: skip
        ("put", "/v1/uploads/{upload_id}"): _op(
            ROBOT, {"200": {"description": "the chunk is on disk", "headers": {"Upload-Offset": UPLOAD_PROGRESS["Upload-Offset"]}, "content": _json(_ref("UploadOffset"))}}
            | _refusals({400: f"{UPLOAD_ID_400}, `bad_upload_offset`, `chunk_past_size`, `chunk_incomplete`", 401: "", 403: "", **UPLOAD_ID, 408: "",
                         409: "`offset_mismatch` (the body's `offset` says where to go on from)", 413: "`chunk_too_large`", 415: "",
                         429: "`too_many_uploads`, `rate_limited`", 507: ""}),
            body=chunk_body, headers=upload_offset, summary="send the next chunk",
        ),  # fmt: skip
        ("head", "/v1/uploads/{upload_id}"): _op(ROBOT, {"200": progress} | _refusals({400: UPLOAD_ID_400, 401: "", 403: "", **UPLOAD_ID})),
        ("get", "/v1/uploads/{upload_id}"): _op(
            ROBOT, {"200": {**progress, "content": _json(_ref("UploadStatus"))}} | _refusals({400: UPLOAD_ID_400, 401: "", 403: "", **UPLOAD_ID})
        ),
        ("delete", "/v1/uploads/{upload_id}"): _op(
            ROBOT, {"204": {"description": "aborted, its bytes deleted"}} | _refusals({400: UPLOAD_ID_400, 401: "", 403: "", **UPLOAD_ID})
        ),
        ("post", "/v1/uploads/{upload_id}/complete"): _op(
            ROBOT, ACKNOWLEDGED | _refusals({**EPISODE_REFUSALS, 400: f"{UPLOAD_ID_400}, `digest_mismatch` (reset to offset 0), and those of POST /v1/episodes",
                                             **UPLOAD_ID, 409: "`upload_incomplete` (its `offset`), `episode_id_conflict`",
                                             503: f"{EPISODE_REFUSALS[503]}; `decoding_busy`, `completing_busy`: the upload is kept, complete it again"}),
            summary="check and store the uploaded episode, as POST /v1/episodes does",
        ),  # fmt: skip
        ("get", "/healthz"): _op(None, health, summary="liveness"),
        ("head", "/healthz"): _op(None, health_head, summary="liveness"),
        ("get", "/metrics"): _op(
            OPERATOR, {"200": {"description": "Prometheus text exposition 0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}}} | _refusals({401: "", 403: ""})
        ),
        ("get", "/v1/tuf/metadata/{name}"): _tuf("application/json", "`no_such_metadata`", head=False),
        ("head", "/v1/tuf/metadata/{name}"): _tuf("application/json", "`no_such_metadata`", head=True),
        ("get", "/v1/tuf/targets/{path}"): _tuf("application/octet-stream", "`no_such_target`", head=False),
        ("head", "/v1/tuf/targets/{path}"): _tuf("application/octet-stream", "`no_such_target`", head=True),
        ("post", "/v1/policies"): _op(
            PUBLISHER, {"201": {"description": "published (its timestamp written)", "content": _json({"type": "object", "required": ["manifest"], "properties": {"manifest": JSON_OBJECT}})}}
            | _refusals({400: "`bad_publish` (field: the one to fix)", 401: "", 403: "`forbidden`, `no_release_key`", 408: "", 413: "`body_too_large`", 415: "",
                         503: "`online_key_rotated`, `registry_unavailable`"}),
            body=publish_body, summary="publish a policy version",
        ),  # fmt: skip
        ("get", "/v1/rollout"): _op(PUBLISHER, {"200": {"description": "the rollout", "content": _json(_ref("Rollout"))}} | _refusals({401: "", 403: "", 503: "`registry_unavailable`"})),
        ("post", "/v1/rollout/widen"): _op(
            PUBLISHER, {"200": {"description": "the canary is stable for every robot", "content": _json(_ref("Rollout"))}} | _refusals({400: "`bad_rollout`", **rollout_change}),
            body={"required": False, "content": _json({"type": "object", "additionalProperties": False, "properties": {"version": version}})},
        ),  # fmt: skip
        ("post", "/v1/rollout/rollback"): _op(
            PUBLISHER, {"200": {"description": "the stable weights republished under a new version", "content": _json(_ref("Rollout"))}}
            | _refusals({400: "`bad_rollout`, `bad_rollback`", **rollout_change}),
            body={"required": False, "content": _json({"type": "object", "additionalProperties": False, "properties": {
                "reason": {"type": "string", "maxLength": 1024, "description": "printable text"}, "version": version}})},
        ),  # fmt: skip
    }


def _schemas() -> dict:
    info = TypeAdapter(EpisodeInfo).json_schema(mode="serialization", ref_template=REF)
    info["required"] = [f.name for f in dataclasses.fields(EpisodeInfo)]  # the API sends every field, null where absent
    info["description"] = "one stored episode (docs/protocol.md, 'EpisodeInfo')"
    for field in info["properties"].values():
        field.pop("default", None)
    status = {"type": "string", "enum": ["created", "duplicate"]}
    return {
        "Error": {
            "type": "object",
            "description": "every refusal (docs/protocol.md, 'Refusals')",
            "required": ["error", "field", "reason"],
            "properties": {
                "error": {"type": "string", "description": "the error code"},
                "field": {"type": ["string", "null"], "description": "the field, header or parameter at fault"},
                "reason": {"type": "string", "description": "what is wrong and what to do"},
                "offset": {"type": "integer", "description": "resumable uploads' offset refusals: where to go on from"},
            },
        },
        "EpisodeAck": {"type": "object", "required": ["episode_id", "status"], "properties": {"episode_id": {"type": "string", "format": "uuid"}, "status": status}},
        "EpisodeInfo": info,
        "EpisodeList": {
            "type": "object",
            "required": ["snapshot_id", "total", "episodes"],
            "properties": {"snapshot_id": {"type": "string"}, "total": {"type": "integer"}, "episodes": {"type": "array", "items": _ref("EpisodeInfo")}},
        },
        "UploadCreated": {
            "type": "object",
            "required": ["upload_id", "offset", "max_chunk_bytes"],
            "properties": {"upload_id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{32}$"}, "offset": {"type": "integer"}, "max_chunk_bytes": {"type": "integer"}},
        },
        "UploadOffset": {"type": "object", "required": ["offset"], "properties": {"offset": {"type": "integer"}}},
        "UploadStatus": {
            "type": "object",
            "required": ["upload_id", "offset", "size", "content_encoding", "max_chunk_bytes", "completed", "episode_id"],
            "properties": {
                "upload_id": {"type": "string"}, "offset": {"type": "integer"}, "size": {"type": "integer"},
                "content_encoding": {"type": "string", "enum": list(ACCEPTED)}, "max_chunk_bytes": {"type": "integer"},
                "completed": {"type": "boolean"}, "episode_id": {"type": ["string", "null"], "description": "set once completed"},
            },
        },  # fmt: skip
        "Health": {
            "type": "object",
            "required": ["status", "pending_uploads"],
            "properties": {"status": {"type": "string", "enum": ["ok", "degraded"]}, "pending_uploads": {"type": "integer"}, "reason": {"type": "string"},
                           "since": {"type": "number"}, "last": {"type": "number"}},
        },  # fmt: skip
        "Rollout": {
            "type": "object",
            "description": "`{stable, canary, cohort, history}`; widen adds `version`, rollback `manifest`",
            "properties": {"stable": {"type": ["integer", "null"]}, "canary": {"type": ["integer", "null"]}, "cohort": {"type": "array", "items": {"type": "string"}},
                           "history": {"type": "array", "items": JSON_OBJECT}, "version": {"type": "integer"}, "manifest": JSON_OBJECT},
        },  # fmt: skip
    }


def describe(schema: dict, config: ServerConfig) -> dict:
    """Lay :func:`_operations` over FastAPI's generated ``schema`` (changed in place, and returned)."""
    operations = _operations()
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            described = operations.get((method, path))
            if described is None:  # a route added through create_app(routes=...): what FastAPI says, less the 422 never sent
                operation.get("responses", {}).pop("422", None)
                operation.setdefault("responses", {})["default"] = {"description": "a refusal", "content": _json(ERROR)}
                continue
            described = dict(described)
            headers = described.pop("headers", {})
            parameters = operation.get("parameters", [])
            parameters += [{"name": name, "in": "header", "required": required, "description": text, "schema": s} for name, (required, text, s) in headers.items()]
            for parameter in parameters:
                parameter["schema"] |= PARAMETERS.get(parameter["name"], {})
                if (path, parameter["name"]) == ("/v1/episodes", "limit"):
                    parameter["schema"] |= {"maximum": config.list_limit}
            if parameters:
                operation["parameters"] = parameters
            operation.update(described)
            responses = {**described["responses"], "default": {"description": "any other refusal (docs/protocol.md, 'Refusals')", "content": _json(ERROR)}}
            if method == "head":  # the GET's status and headers, never a body
                responses = {status: {k: v for k, v in response.items() if k != "content"} for status, response in responses.items()}
            operation["responses"] = responses
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(_schemas())
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "`Authorization: Bearer <token>`; each operation names the token role it needs: robot, operator or publisher (docs/protocol.md, 'Authentication')",
        }
    }
    schema["security"] = [{"bearer": []}]
    return schema


def install(app: FastAPI, config: ServerConfig) -> None:
    """Serve :func:`describe`'s document at ``/openapi.json`` (built once, on first request, over every route then added)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            base = get_openapi(title=app.title, version=app.version, description="the protocol of docs/protocol.md", routes=app.routes)
            app.openapi_schema = describe(base, config)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
