"""How a robot reads the server's answers: bounded, raw, and only what the protocol says.

The answers to uploads are small JSON documents (an acknowledgement, a refusal, an offset). A robot
reads each one raw (no content decoding: a few KB of gzip cannot become gigabytes), at most
``MAX_ANSWER_BYTES`` (a proxy's endless page is cut), and within ``deadline_s`` of its headers (an
answer trickled a byte at a time ends as a timeout, not as a robot waiting for hours).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx

MAX_ANSWER_BYTES = 64 << 10


class AnswerCappedClient(httpx.Client):
    """An ``httpx.Client`` whose answers are read as the module docstring says (``deadline_s``: the client's read
    timeout); ``stream=True`` requests are left to the caller."""

    def send(self, request: httpx.Request, *, stream: bool = False, **kwargs) -> httpx.Response:
        response = super().send(request, stream=True, **kwargs)
        if stream:
            return response
        try:
            content = read_capped(response, MAX_ANSWER_BYTES, self.timeout.read or 30.0)
        finally:
            response.close()
        kept = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        return httpx.Response(response.status_code, headers=kept, content=content, request=request)


def read_capped(response: httpx.Response, limit: int, deadline_s: float) -> bytes:
    """At most ``limit`` raw bytes of ``response``'s body (the rest is not read), within ``deadline_s`` (:func:`timed`)."""
    parts, size = [], 0
    for chunk in timed(response.iter_raw(), deadline_s, response.request):
        parts.append(chunk[: limit - size])
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(parts)


def timed(chunks: Iterator[bytes], deadline_s: float, request: httpx.Request) -> Iterator[bytes]:
    """``chunks`` of a body as they arrive; httpx.ReadTimeout once it has not ended ``deadline_s`` after reading began
    (each read has the client's own timeout: this bounds a body trickled a byte at a time)."""
    start = time.monotonic()
    for chunk in chunks:
        yield chunk
        if time.monotonic() - start > deadline_s:
            raise httpx.ReadTimeout(f"not finished {deadline_s:g} s after its headers", request=request)


def error_code(response: httpx.Response) -> str | None:
    """The ``error`` code of the server's JSON refusal, else None (a proxy's page, another service's answer)."""
    body = json_body(response)
    return body.get("error") if isinstance(body.get("error"), str) else None


def json_body(response: httpx.Response) -> dict:
    """The answer's JSON object; {} for anything else."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
