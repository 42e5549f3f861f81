"""Reading a request body under a byte limit and a deadline (the upload routes' first line of defence)."""

from __future__ import annotations

import asyncio

from fastapi import Request

from fleet.server.errors import ApiError


async def read_body(request: Request, limit: int, timeout_s: float = 60.0, *, coded: bool = False) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes, and
    with 408 when it has not fully arrived ``timeout_s`` after the headers (a slow-loris client).

    A declared Content-Length over the limit is refused before any body byte is read; a
    chunked or lying body is cut off when the bytes received pass the limit. A Content-Encoding
    other than identity is refused (415) unless the route decodes it (``coded``): stored or parsed
    as it came, a compressed body would be taken for its plain bytes.
    """
    if not coded:
        refuse_content_coding(request)
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(request, limit)
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the body did not arrive within {timeout_s:g} s", "body", {"Connection": "close"}) from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_content_length", f"Content-Length {declared!r} is not a byte count", "content-length")
        if int(declared) > limit:
            raise ApiError(413, "body_too_large", f"body of {declared} bytes exceeds the {limit}-byte limit", "content-length")
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"body exceeds the {limit}-byte limit", "body")
        parts.append(chunk)
    return b"".join(parts)


def refuse_content_coding(request: Request) -> None:
    """415 ``unsupported_content_encoding`` for a request body sent with a Content-Encoding other than identity."""
    codings = [c.strip().lower() for c in ", ".join(request.headers.getlist("content-encoding")).split(",") if c.strip()]
    if any(c != "identity" for c in codings):
        raise ApiError(
            415, "unsupported_content_encoding",
            f"Content-Encoding {', '.join(codings)[:60]!r} is not taken on {request.method} {request.url.path}: send the body as it is "
            "(only POST /v1/episodes decodes zstd; a resumable upload declares its coding in POST /v1/uploads, its chunks are sent as they are)",
            "content-encoding",
        )  # fmt: skip
