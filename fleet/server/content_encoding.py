"""Request content codings of POST /v1/episodes: identity and zstd (RFC 8878), decoded under a hard bound.

A zstd body is one frame. A frame that declares a content size over the bound is refused before
decoding; otherwise it is fed to the decoder in slices small enough that one slice adds at most
``_SLACK`` bytes beyond the bound (a zstd block is at most 128 KiB of output and takes at least
4 bytes of input), so a zip bomb costs at most ``limit + _SLACK`` bytes of output before its 413.
The decoder's window (its own buffer) is capped at the larger of ``limit`` and 8 MiB. Refusals
(docs/protocol.md):

    415 unsupported_content_encoding   a coding other than identity or zstd (the answer's Accept-Encoding lists them)
    413 body_too_large                 the decoded body would exceed ``limit``
    400 bad_zstd                       not a zstd frame, corrupt (checksum included), truncated, bytes after
                                       the frame, or a window over the cap
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import zstandard

from fleet.server.errors import ApiError

ACCEPTED = ("zstd", "identity")
ACCEPT_ENCODING = {"Accept-Encoding": ", ".join(ACCEPTED)}  # RFC 7694: a response tells the client which request codings work
_MAX_RATIO = (128 << 10) // 4  # output bytes per input byte of the densest zstd block (4-byte RLE block -> 128 KiB)
_SLACK = 8 << 20  # the most one slice may overshoot the bound
_MIN_SLICE = _SLACK // _MAX_RATIO  # 256 bytes
_MAX_WINDOW = 8 << 20  # zstd level 19's window; a frame needing more than this and the limit is refused (400)
_ZSTD_WINDOW_CAP = 1 << zstandard.WINDOWLOG_MAX  # the largest window zstd accepts (2 GiB on 64-bit): limits above it (max_episode_bytes) clamp


def content_coding(header: str | None) -> str:
    """``"zstd"`` or ``"identity"`` from a Content-Encoding header; ApiError 415 for anything else."""
    coding = (header or "identity").strip().lower()
    if coding not in ACCEPTED:
        raise ApiError(
            415,
            "unsupported_content_encoding",
            f"Content-Encoding {header[:60]!r} is not accepted; send one of {', '.join(ACCEPTED)} (one coding, not a list)",
            "content-encoding",
            ACCEPT_ENCODING,
        )
    return coding


class MemoryBudget:
    """Bytes that one kind of work may hold at once, over the whole server; a reservation that does not fit beside
    others is answered 503 ``error`` (``reason``, Retry-After 1) and its robot retries later, and one alone always
    fits: memory stays bounded however many robots try. Decoding (the resumable route's decodes: their bound,
    ``max_episode_bytes``, is far above ``max_body_bytes``, and a few KiB of zstd can claim all of it) reserves what
    a frame declares, or its whole bound when the frame does not say; completes (fleet/server/app.py) reserve what
    they hold of their episode."""

    def __init__(self, total: int, error: str = "decoding_busy", reason: str = "the server is decompressing other large uploads; retry shortly"):
        self.total, self.held, self.error, self.reason = total, 0, error, reason
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        with self._lock:
            if self.held and self.held + nbytes > self.total:
                raise ApiError(503, self.error, self.reason, None, {"Retry-After": "1"})
            self.held += nbytes
        try:
            yield
        finally:
            with self._lock:
                self.held -= nbytes


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd frame's first bytes (no safetensors file under any size limit starts so)


def refuse_undeclared_zstd(body: bytes) -> None:
    """400 for a zstd frame sent as a plain body (no Content-Encoding), with what to send instead."""
    if body[:4] == ZSTD_MAGIC:
        raise ApiError(400, "not_safetensors", "the body is a zstd frame but was not declared as one: send Content-Encoding: zstd with it (a resumable upload: create it with \"content_encoding\": \"zstd\")", "content-encoding")


def decode_body(body: bytes, coding: str, limit: int, budget: MemoryBudget | None = None) -> bytes:
    """The body as sent before its content coding, at most ``limit`` bytes; ApiError 413/400 otherwise
    (503 when ``budget`` cannot hold what it may decode to)."""
    if coding == "identity":
        return body
    if len(body) >= 4 and body[1:4] == b"\x2a\x4d\x18" and body[0] & 0xF0 == 0x50:  # magic 0x184D2A5?: RFC 8878 3.1.2
        raise ApiError(400, "bad_zstd", "the body starts with a zstd skippable frame: send exactly one zstd data frame, nothing before or after it", "body")
    try:
        declared = zstandard.frame_content_size(body)  # -1 when the frame does not say
    except zstandard.ZstdError:
        declared = -1  # not a frame header: the decoder names the fault
    if declared > limit:
        raise ApiError(413, "body_too_large", f"zstd frame declares {declared} bytes, over the {limit}-byte limit", "content-encoding")
    with budget.hold(declared if declared >= 0 else limit) if budget is not None else contextlib.nullcontext():
        return _unzstd(body, limit, declared)


def _unzstd(body: bytes, limit: int, declared: int) -> bytes:
    window = min(max(limit, _MAX_WINDOW), _ZSTD_WINDOW_CAP)
    decoder = zstandard.ZstdDecompressor(max_window_size=window).decompressobj()
    parts, size, pos = [], 0, 0
    view = memoryview(body)
    try:
        while pos < len(body) and not decoder.eof:
            step = max(_MIN_SLICE, (limit - size) // _MAX_RATIO)
            out = decoder.decompress(view[pos : pos + step])
            pos += step
            size += len(out)
            if 0 <= declared < size:  # a frame may not outgrow its declared size (what a budget reserved)
                raise ApiError(400, "bad_zstd", f"the zstd frame decodes to more than the {declared} bytes it declares", "body")
            if size > limit:
                raise ApiError(413, "body_too_large", f"zstd body decompresses to more than the {limit}-byte limit", "content-encoding")
            parts.append(out)
    except zstandard.ZstdError as exc:
        hint = f"; frames here may use a window of at most {window} bytes (zstd levels <= 19 without --long stay within 8 MiB)" if "memory" in str(exc) else ""
        raise ApiError(400, "bad_zstd", f"not a valid zstd stream ({exc}){hint}", "body") from None
    if not decoder.eof:
        raise ApiError(400, "bad_zstd", f"zstd stream truncated: {len(body)} bytes end inside the frame", "body")
    extra = len(decoder.unused_data) + max(0, len(body) - pos)
    if extra:
        raise ApiError(400, "bad_zstd", f"{extra} bytes after the end of the zstd frame; send exactly one frame", "body")
    return b"".join(parts)
