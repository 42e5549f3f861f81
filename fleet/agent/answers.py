"""How a robot reads the server's answers: bounded, raw, and only what the protocol says.

The answers to uploads are small JSON documents (an acknowledgement, a refusal, an offset). A robot
reads each one raw (no content decoding: a few KB of gzip cannot become gigabytes), at most
``MAX_ANSWER_BYTES`` (a proxy's endless page is cut), and within ``deadline_s`` of its headers (an
answer trickled a byte at a time ends as a timeout, not as a robot waiting for hours).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx

MAX_ANSWER_BYTES = 64 << 10


def send_bounded(client: httpx.Client, request: httpx.Request, deadline_s: float, send=None, **kwargs) -> httpx.Response:
    """``client.send(request, stream=True)`` (or ``send(request, **kwargs)``) whose response *headers* must arrive
    within ``deadline_s`` of the request being sent: each read has the client's own timeout, so headers trickled a
    byte at a time (up to h11's 16 KiB: ~4.5 h at a byte a second) once held a robot's upload or policy poll that
    long. Past the deadline the client's connections are closed (the client stays usable) and httpx.ReadTimeout is
    raised. For clients one thread uses at a time, as the robot's uploader and policy poller are."""
    fired, timer = threading.Event(), []

    def cut() -> None:
        fired.set()
        client._transport.close()

    def trace(event: str, info: dict) -> None:
        if event == "http11.receive_response_headers.started":
            timer.append(threading.Timer(deadline_s, cut))
            timer[0].daemon = True
            timer[0].start()
        elif event == "http11.receive_response_headers.complete" and timer:
            timer[0].cancel()

    request.extensions["trace"] = trace
    try:
        return (send or (lambda r, **k: client.send(r, stream=True, **k)))(request, **kwargs)
    except httpx.TransportError as exc:
        if fired.is_set():
            raise httpx.ReadTimeout(f"response headers not finished {deadline_s:g} s after the request", request=request) from exc
        raise
    finally:
        if timer:
            timer[0].cancel()


CODED_ANSWER = "x-flywheel-answer-coding"  # the Content-Encoding of an answer kept raw (a proxy that compresses though asked not to)


class AnswerCappedClient(httpx.Client):
    """An ``httpx.Client`` whose answers are read as the module docstring says (``deadline_s``: the client's read
    timeout, for the headers and again for the body); ``stream=True`` requests are left to the caller."""

    def send(self, request: httpx.Request, *, stream: bool = False, **kwargs) -> httpx.Response:
        response = send_bounded(self, request, self.timeout.read or 30.0, lambda r, **k: super(AnswerCappedClient, self).send(r, stream=True, **k), **kwargs)
        if stream:
            return response
        try:
            content = read_capped(response, MAX_ANSWER_BYTES, self.timeout.read or 30.0)
        finally:
            response.close()
        kept = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        coding = response.headers.get("content-encoding", "").strip()
        if coding and coding.lower() != "identity":  # read raw, so unreadable: said where the answer is read (CODED_ANSWER)
            kept.append((CODED_ANSWER, coding))
        return httpx.Response(response.status_code, headers=kept, content=content, request=request)


def coded_note(response: httpx.Response) -> str | None:
    """Why an answer kept raw cannot be read, where it came in a content coding (CODED_ANSWER); else None."""
    coding = response.headers.get(CODED_ANSWER)
    if not coding:
        return None
    return (f"HTTP {response.status_code} in Content-Encoding: {coding}, though the robot asked for identity: its body is not read "
            "(a proxy on the way compresses answers); serve the fleet server's answers uncompressed")  # fmt: skip


def refuse_coded(response: httpx.Response) -> httpx.Response:
    """``response``, unless it is a 2xx (whose JSON a protocol reads) in a content coding: ValueError saying so
    (:func:`coded_note`). Another status goes on to be read as it is (its error code, if any, unread)."""
    note = coded_note(response) if 200 <= response.status_code < 300 else None
    if note is not None:
        raise ValueError(note)
    return response


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
