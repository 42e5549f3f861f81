"""The HTTP/1.1 protocol the server runs: uvicorn's h11 protocol, except that its own refusals of
malformed requests (a Content-Length that is not a byte count, conflicting Content-Lengths, a
broken request line or header) answer in the API's JSON error shape, like every other refusal, and
that a request's line and headers must arrive within ``head_timeout_s`` (uvicorn times out neither a
fresh connection that sends nothing nor one that stops mid-header: each would hold a socket forever),
and that a request answered before its body was read (a refusal: 401, 403, 413...) must finish sending
that body within ``head_timeout_s`` of the answer (uvicorn discards such a body for as long as bytes
keep coming, and each byte restarts its keep-alive timer: a client trickling one would hold the socket
forever); then the connection is closed."""

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


class _Connection(h11.Connection):
    """h11's connection, keeping the reason of the malformed request it refused (uvicorn drops it)."""

    protocol_error: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.protocol_error = exc
            raise


class _Deadline:
    """Closes ``protocol``'s connection if the client is still in ``state`` ``seconds`` after :meth:`arm` (armed once:
    bytes trickled meanwhile do not extend it)."""

    def __init__(self, protocol: JsonErrorsH11Protocol, state: type[h11.IDLE] | type[h11.SEND_BODY]):
        self.protocol, self.state, self.handle = protocol, state, None

    def arm(self) -> None:
        if self.handle is None:
            self.handle = self.protocol.loop.call_later(self.protocol.head_timeout_s, self._fire)

    def disarm(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _fire(self) -> None:
        self.handle = None
        transport = self.protocol.transport
        if not transport.is_closing() and self.protocol.conn.their_state is self.state:
            transport.close()


class JsonErrorsH11Protocol(H11Protocol):
    head_timeout_s = 10.0  # protocol_class (below) gives each server its own
    on_refusal = None  # called with the error code of each malformed request refused here (the server's metrics)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER, self.conn._max_incomplete_event_size)
        self._head = _Deadline(self, h11.IDLE)  # a request line and headers still incomplete
        self._drain = _Deadline(self, h11.SEND_BODY)  # the body of a request answered before it was read

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head.arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # a request head still incomplete
            self._head.arm()
        else:
            self._head.disarm()
        if self.conn.their_state is not h11.SEND_BODY:  # the unread body ended: the connection goes on
            self._drain.disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self._drain.arm()

    def connection_lost(self, exc) -> None:
        self._head.disarm()
        self._drain.disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        detail = str(self.conn.protocol_error or "")[:200] if isinstance(self.conn, _Connection) else ""
        body = json.dumps({**BAD_HTTP, "reason": f"{BAD_HTTP['reason']} ({detail})" if detail else BAD_HTTP["reason"]}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
        if self.on_refusal is not None:
            self.on_refusal(BAD_HTTP["error"])


def protocol_class(head_timeout_s: float, on_refusal=None) -> type[JsonErrorsH11Protocol]:
    """The protocol with this server's ``head_timeout_s`` and ``on_refusal(error_code)`` (uvicorn builds one instance
    per connection from a class)."""
    attributes = {"head_timeout_s": float(head_timeout_s), "on_refusal": staticmethod(on_refusal) if on_refusal else None}
    return type("JsonErrorsH11Protocol", (JsonErrorsH11Protocol,), attributes)
