"""Reading a request body under a byte limit and a deadline (the upload routes' first line of defence)."""

from __future__ import annotations

import asyncio

from fastapi import Request

from fleet.server.errors import ApiError


async def read_body(request: Request, limit: int, timeout_s: float = 60.0) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes, and
    with 408 when it has not fully arrived ``timeout_s`` after the headers (a slow-loris client).

    A declared Content-Length over the limit is refused before any body byte is read; a
    chunked or lying body is cut off when the bytes received pass the limit.
    """
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
