"""The robot's HTTP for python-tuf: conditional polls of timestamp.json and resumable target downloads.

python-tuf 7.0.1's ``ngclient`` does all its network IO through ``FetcherInterface._fetch(url)``,
which returns an iterator of the body's bytes; ``FetcherInterface.download_file`` writes them to a
temporary file, stopping past the length TUF expects, and ``Updater.download_target`` then checks
the whole file's length and sha256 against the signed targets metadata. ngclient has no hook for
conditional requests or ranges (it asks for every URL afresh), so both live here, below TUF, where
what they hand back is still verified as if it had come whole off the network:

* **Conditional polls** (``revalidate``: the timestamp.json URL). The fetcher keeps the body and the
  strong ETag of the last 200 that TUF accepted, sends ``If-None-Match`` with it, and on 304 hands TUF
  the body it kept, as an HTTP cache does (RFC 9111 4.3.4). TUF checks it again (signature, version,
  and its expiry: a frozen registry is still noticed); an unchanged registry costs one header-only
  answer. A body is kept only once the TUF refresh that read it has run through (:meth:`TokenFetcher.settle`):
  one mangled on the way (truncated by a proxy, under the registry's ETag) was once kept as it
  arrived and replayed at every 304, refused each time, until the registry's timestamp changed; now
  it costs one poll.
  Nothing is kept across a restart or for a server that sends no strong ETag (Python's
  ``http.server`` sends none: every poll is a full GET there).
* **Resumable downloads** (``partial_dir``, URLs under ``resume_prefix``: the targets). Bytes are
  appended to ``<partial_dir>/<quoted url path>.partial`` as they arrive, the server's ETag beside
  it in ``.partial.etag`` (only a strong entity tag of visible ASCII, bounded: :func:`_strong_etag`;
  a kept one that is not, from an earlier build, drops the partial and the download starts over). After a cut connection the next download asks for the rest
  (``Range: bytes=<have>-``, ``If-Range: <etag>``) and hands TUF the kept bytes, then the new ones:
  TUF checks the whole file, so a partial file changed on disk, or a server that changed the file,
  ends in TUF's hash refusal, never in a policy. A 200 (no range support, or If-Range failed)
  starts over; a 416 drops the partial and asks again. A partial is deleted once its download
  has run to the end (whether TUF then accepts it or not: a refused file is fetched whole next
  time), when TUF stops reading early (more bytes than it expects) and when writing it fails (a
  full disk: a partial file once stayed, holding the disk at 100 %, and the robot's spool dropped
  telemetry for want of room). Only a cut or late answer keeps it, for the next poll to resume.
* **Raw bytes only**: every request asks for ``Accept-Encoding: identity``, bodies are read raw
  (``iter_raw``), and an answer declaring any other Content-Encoding is refused unread (a
  DownloadError: a pull error). TUF caps a download at the length it expects, but counts what the
  fetcher hands it: httpx decoded whatever coding the host declared, whole, before that, and a 16 KiB
  zstd timestamp.json took a robot past 1 GB. Robots read the upload answers raw too
  (fleet/agent/answers.py).
* **A deadline per download** (``deadline_s``): a body that has not ended ``deadline_s`` after its
  headers is cut (a DownloadError: the robot keeps its policy and counts a pull error). A registry
  that trickles its files cannot hold the robot's control loop for hours; a target's bytes received
  so far stay in its partial file, so a slow link still gets the whole file over several polls.
"""

from __future__ import annotations

import email.utils
import logging
import re
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.ngclient.fetcher import FetcherInterface

from fleet.agent.answers import send_bounded, timed

log = logging.getLogger(__name__)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
MAX_ETAG_CHARS = 256  # the registry's are 66 (a quoted sha256), S3's about 40
_STRONG_ETAG = re.compile(r'"[\x21\x23-\x7e]*"')  # RFC 9110 8.8.3 entity-tag, strong, visible ASCII only (no obs-text)


class TokenFetcher(FetcherInterface):
    """python-tuf's fetcher over an httpx client (the robot's token, if any, in its headers); TUF caps
    every download at the length it expects, so an endless answer is cut there.

    ``revalidate``: URLs polled with If-None-Match; ``partial_dir`` and ``resume_prefix``: where the
    partial downloads of URLs starting with ``resume_prefix`` are kept (None: no resuming)."""

    def __init__(
        self,
        client: httpx.Client,
        chunk_size: int = 1 << 16,
        *,
        revalidate: Collection[str] = (),
        partial_dir: str | Path | None = None,
        resume_prefix: str = "",
        deadline_s: float = 30.0,
    ):
        self.client, self.chunk_size, self.deadline_s = client, chunk_size, deadline_s
        self.revalidate = frozenset(revalidate)
        self.partial_dir = Path(partial_dir) if partial_dir is not None else None
        self.resume_prefix = resume_prefix
        self._validated: dict[str, tuple[str, bytes]] = {}  # url -> (strong ETag, body) of its last 200 TUF accepted
        self._unsettled: dict[str, tuple[str, bytes]] = {}  # the same, read in the refresh under way: kept once it succeeds
        self.not_modified = 0  # polls answered 304
        self.resumed_bytes = 0  # bytes not downloaded again thanks to a range request
        self.clock_ahead_s: float | None = None  # this clock minus the server's (its last answer's Date header); None: no Date yet

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url in self.revalidate:
            return self._conditional(url)
        if self.partial_dir is not None and url.startswith(self.resume_prefix):
            return self._resumable(url)
        return self._chunks(self._get(url))

    # -- plain and conditional GET -----------------------------------------------------------------
    def _get(self, url: str, headers: dict | None = None, ok: Collection[int] = (200,)) -> httpx.Response:
        """The answer's headers, its body unread; one with another status than ``ok``, or with a body in a content coding,
        is refused (DownloadError)."""
        headers = {"Accept-Encoding": "identity", **(headers or {})}  # httpx's default asks for gzip, br and zstd
        try:
            response = send_bounded(self.client, self.client.build_request("GET", url, headers=headers), self.deadline_s)
        except httpx.HTTPError as exc:
            raise tuf_errors.DownloadError(f"GET {url}: {exc}") from None
        self._note_server_clock(response)
        if response.status_code not in ok:
            response.close()
            raise tuf_errors.DownloadHTTPError(f"GET {url}: HTTP {response.status_code}", response.status_code)
        if response.status_code != 304:  # no body
            _refuse_coded(response)
        return response

    def _note_server_clock(self, response: httpx.Response) -> None:
        """Keep how far this clock is ahead of the server's, from the answer's Date header (whole seconds, unsigned: it
        only explains a refusal, it decides nothing; a robot whose clock runs ahead reads fresh metadata as expired). A
        cache's answer is as old as its Age header says (RFC 9111): its Date is the origin's, that long ago."""
        try:
            served = email.utils.parsedate_to_datetime(response.headers["date"])
            age = float(response.headers.get("age", 0))
        except (KeyError, TypeError, ValueError, IndexError):
            return
        if served.tzinfo is not None and 0 <= age < float("inf"):
            self.clock_ahead_s = time.time() - served.timestamp() - age

    def _chunks(self, response: httpx.Response) -> Iterator[bytes]:
        try:
            # raw (never decoded: _refuse_coded), as they arrive: a cut connection loses none of what came
            yield from timed(response.iter_raw(), self.deadline_s, response.request)
        except httpx.HTTPError as exc:  # a late body (httpx.ReadTimeout) too: the next poll goes on
            raise tuf_errors.DownloadError(f"GET {response.url}: {exc}") from None
        finally:
            response.close()

    def _conditional(self, url: str) -> Iterator[bytes]:
        kept = self._validated.get(url)
        response = self._get(url, {"If-None-Match": kept[0]} if kept else None, ok=(200, 304) if kept else (200,))
        if response.status_code == 304:
            response.close()
            self.not_modified += 1
            return iter([kept[1]])
        self._validated.pop(url, None)
        etag = _strong_etag(response.headers.get("etag"))
        if etag is None:
            return self._chunks(response)
        return self._remembered(url, etag, response)

    def _remembered(self, url: str, etag: str, response: httpx.Response) -> Iterator[bytes]:
        """The body, noted with its ETag once it has arrived whole (not if TUF stopped reading it); :meth:`settle`
        keeps it if TUF accepts it."""
        parts = []
        for chunk in self._chunks(response):
            parts.append(chunk)
            yield chunk
        self._unsettled[url] = (etag, b"".join(parts))

    def settle(self, accepted: bool) -> None:
        """After a TUF refresh: keep the bodies it read for conditional polls if it ran through (``accepted``: TUF
        verified them), forget them otherwise; the next poll of such a URL then asks for the whole body again."""
        if accepted:
            self._validated.update(self._unsettled)
        self._unsettled.clear()

    # -- resumable download ------------------------------------------------------------------------
    def partial_path(self, url: str) -> Path:
        """Where the partial download of ``url`` is kept."""
        return self.partial_dir / f"{quote(url[len(self.resume_prefix) :], safe='')}.partial"

    def _resumable(self, url: str) -> Iterator[bytes]:
        partial = self.partial_path(url)
        etag_file = partial.with_name(partial.name + ".etag")
        have = partial.stat().st_size if partial.exists() else 0
        headers = {}  # _get asks for identity: ranges count the bytes of the file, as TUF's length does
        if have and etag_file.exists():
            etag = _strong_etag(etag_file.read_bytes().decode("latin-1"))
            if etag is None:  # not one a request can carry (written by an earlier build): start over rather than fail every poll
                log.warning("the ETag kept beside %s is no strong entity tag; downloading %s from the start", partial, url)
                _discard(partial, etag_file)
                have = 0
            else:
                headers["If-Range"] = etag
        if have:
            headers["Range"] = f"bytes={have}-"
        response = self._get(url, headers, ok=(200, 206, 416) if have else (200,))
        if response.status_code == 416:  # the partial is no prefix of this file: start over
            response.close()
            _discard(partial, etag_file)
            return self._resumable(url)
        if response.status_code == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
            if match is None or int(match.group(1)) != have:
                response.close()
                _discard(partial, etag_file)
                raise tuf_errors.DownloadError(f"GET {url}: asked for bytes {have}- and got Content-Range {response.headers.get('content-range')!r}")
            self.resumed_bytes += have
            log.info("resuming %s at byte %d", url, have)
        else:
            have = 0  # a 200: the whole file again
            partial.parent.mkdir(parents=True, exist_ok=True)
            etag = _strong_etag(response.headers.get("etag"))
            if etag is not None:
                etag_file.write_text(etag, encoding="ascii")
            else:
                etag_file.unlink(missing_ok=True)
        return self._appending(response, partial, etag_file, have)

    def _appending(self, response: httpx.Response, partial: Path, etag_file: Path, have: int) -> Iterator[bytes]:
        """The kept ``have`` bytes of ``partial``, then the response's, each appended to ``partial`` as it arrives."""
        finished = False
        try:
            with open(partial, "r+b" if have else "w+b") as out:
                out.truncate(have)
                out.seek(0)
                while chunk := out.read(self.chunk_size):
                    yield chunk
                for chunk in self._chunks(response):
                    out.write(chunk)
                    out.flush()
                    yield chunk
            finished = True
        except GeneratorExit:  # TUF stopped reading (more bytes than the targets metadata lists)
            finished = True
            raise
        except OSError:  # the robot's disk (full, failing): the space goes back to what the robot records
            finished = True
            raise
        finally:
            response.close()
            if finished:
                _discard(partial, etag_file)


# Content-Encoding tokens that leave the body as it is: identity, and aws-chunked (S3's framing of an upload, which
# several S3-compatible stores keep on the object uploaded by AWS CLI v2.23+ / boto3 1.36+, and send back on GET with
# the plain bytes: versitygw#2398, noobaa-core#9138, older Ceph)
NOT_CODINGS = ("identity", "aws-chunked")


def _strong_etag(value: str | None) -> str | None:
    """``value`` if it is a strong entity tag a request can carry back (quoted visible ASCII, at most ``MAX_ETAG_CHARS``),
    else None: it is not kept. A non-ASCII one (``"café"``) once kept beside a cut download made httpx raise
    UnicodeEncodeError building every later If-Range, before any request: the robot never installed that release,
    even after a restart. A weak one (``W/"..."``) cannot validate a range or a body (RFC 9110 13.1.5)."""
    if value is None or len(value) > MAX_ETAG_CHARS or _STRONG_ETAG.fullmatch(value) is None:
        return None
    return value


def _refuse_coded(response: httpx.Response) -> None:
    """Refuse (DownloadError) an answer whose body is in a content coding: the fetcher asked for identity, and a coded
    body's decoded size is bounded by nothing TUF can check before it is decoded (a zstd or gzip bomb). The tokens of
    :data:`NOT_CODINGS` in the header's list are no coding of the body and pass."""
    codings = [token.strip().lower() for token in response.headers.get("content-encoding", "").split(",")]
    coded = [token for token in codings if token and token not in NOT_CODINGS]
    if not coded:
        return
    response.close()
    raise tuf_errors.DownloadError(
        f"GET {response.url}: the answer is Content-Encoding: {', '.join(coded)}, though the robot asked for identity; refused unread "
        "(TUF can bound only the bytes it is handed, not what a coded body decodes to): serve the registry's files uncompressed"
    )


def _discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
