"""The HTTP/1.1 protocol the server runs: uvicorn's h11 protocol, except that its own refusals of
malformed requests (a Content-Length that is not a byte count, conflicting Content-Lengths, a
broken request line or header) answer in the API's JSON error shape, like every other refusal."""

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
    def send_400_response(self, msg: str) -> None:
        body = json.dumps(BAD_HTTP).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
