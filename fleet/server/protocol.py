"""The HTTP/1.1 protocol the server runs: uvicorn's h11 protocol, except that its own refusals of
malformed requests (a Content-Length that is not a byte count, conflicting Content-Lengths, a
broken request line or header) answer in the API's JSON error shape, like every other refusal, and
that a request's line and headers must arrive within ``head_timeout_s`` (uvicorn times out neither a
fresh connection that sends nothing nor one that stops mid-header: each would hold a socket forever)."""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

BAD_HTTP = {
    "error": "bad_http_request",
    "field": None,
    "reason": "malformed HTTP/1.1 request (request line, a header, or the framing: one Content-Length with a decimal byte count, "
    "or Transfer-Encoding: chunked); nothing was read",
}


class JsonErrorsH11Protocol(H11Protocol):
    head_timeout_s = 10.0  # protocol_class (below) gives each server its own

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline = None
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # a request head still incomplete
            self._arm_head_deadline()
        else:
            self._disarm_head_deadline()

    def connection_lost(self, exc) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None:  # armed once per request head: trickled bytes do not extend it
            self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(BAD_HTTP).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def protocol_class(head_timeout_s: float) -> type[JsonErrorsH11Protocol]:
    """The protocol with this server's ``head_timeout_s`` (uvicorn builds one instance per connection from a class)."""
    return type("JsonErrorsH11Protocol", (JsonErrorsH11Protocol,), {"head_timeout_s": float(head_timeout_s)})
