"""Conditional and range requests for the registry's TUF files (RFC 9110 sections 8.8, 13 and 14).

Every TUF file is served with a strong ``ETag`` (the sha256 of its content, in quotes) and a
``Cache-Control`` chosen by what its name promises (docs/security.md, "What may be cached where"):

    <N>.snapshot.json, <N>.targets.json     IMMUTABLE: the timestamp/snapshot chain pins each version
    targets/<dir>/<sha256>.<name>           IMMUTABLE: the name is the content's hash
    timestamp.json, root.json, <N>.root.json REVALIDATE: timestamp.json changes at every publication
                                            and re-signing; root versions are probed by clients
    404 answers                             NOT_FOUND: "no 2.root.json yet" must never be cached

``If-None-Match`` matching the ETag answers 304 without a body. ``Range: bytes=a-b``, ``a-`` and
``-n`` answer 206 with ``Content-Range``, an unsatisfiable one 416 (``Content-Range: bytes */size``);
a malformed or multi-range ``Range`` is ignored (200, the whole body: RFC 9110 14.2 allows it), and
so is one whose ``If-Range`` is not the current ETag. HEAD answers the GET's headers without a body
and, as RFC 9110 14.2 requires for methods other than GET, ignores ``Range``.
"""

from __future__ import annotations

import hashlib
import re

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from fleet.server.errors import ApiError

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
NOT_FOUND = "no-store"
_VERSIONED_METADATA = re.compile(r"^\d{1,9}\.(?:snapshot|targets)\.json$")
_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})", re.IGNORECASE)  # range units are case-insensitive (RFC 9110 14.1)


class Unsatisfiable(Exception):
    """The Range asks for bytes past the end of the file: 416."""


def metadata_cache_control(name: str) -> str:
    """IMMUTABLE for versioned snapshot/targets metadata, REVALIDATE for the rest (timestamp, roots)."""
    return IMMUTABLE if _VERSIONED_METADATA.match(name) else REVALIDATE


def etag_of(data: bytes) -> str:
    return f'"{hashlib.sha256(data).hexdigest()}"'


def none_match(header: str | None, etag: str) -> bool:
    """True when ``If-None-Match`` names ``etag`` (weak comparison, RFC 9110 13.1.2) or is ``*``: answer 304."""
    if header is None:
        return False
    tags = [tag.strip() for tag in header.split(",")]
    return "*" in tags or any(tag.removeprefix("W/") == etag for tag in tags)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one range ``header`` asks for, as (start, end exclusive); None to send the whole body (no
    Range, a malformed one, several ranges, another unit). Raises Unsatisfiable (416)."""
    match = _RANGE.fullmatch(header.replace(" ", "")) if header else None
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # bytes=-n: the last n bytes
        start, end = max(0, size - int(last)), size
        if int(last) == 0:
            raise Unsatisfiable
    else:
        start, end = int(first), (int(last) + 1 if last else size)
        if last and int(last) < start:
            return None  # last < first: invalid, ignored
    if start >= size:
        raise Unsatisfiable
    return start, min(end, size)


def answer(request: Request, *, etag: str, cache_control: str, size: int, media_type: str, body) -> Response:
    """The response to a GET or HEAD of a file of ``size`` bytes. ``body(start, end)`` gives the bytes
    of [start, end) (bytes, or an iterator of bytes for a streamed file); it is called only when a
    body is sent."""
    headers = {"ETag": etag, "Cache-Control": cache_control, "Accept-Ranges": "bytes"}
    if none_match(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    status, start, end = 200, 0, size
    if request.method == "GET" and request.headers.get("if-range", etag) == etag:  # If-Range: strong comparison
        try:
            wanted = byte_range(request.headers.get("range"), size)
        except Unsatisfiable:
            reason = f"Range {request.headers.get('range')[:60]!r} asks for no byte of the {size}-byte file: ask for bytes below {size}, or send no Range"
            raise ApiError(416, "range_not_satisfiable", reason, "range", {**headers, "Content-Range": f"bytes */{size}"}) from None
        if wanted is not None:
            status, (start, end) = 206, wanted
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=media_type)
    content = body(start, end)
    if isinstance(content, bytes):
        return Response(content, status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(content, status_code=status, headers=headers, media_type=media_type)
