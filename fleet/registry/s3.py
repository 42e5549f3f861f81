"""A small S3 client for the registry's files (fleet/registry/files.py): GET, HEAD, PUT with S3's
conditional writes, DELETE and ListObjectsV2, signed with AWS Signature Version 4, over httpx.

httpx is already a core dependency and boto3 is not (it comes with moto, for the tests only): six
calls do not justify a 35 MB SDK on every server. Endpoint, region and credentials come from the
environment exactly as the episode store reads them (``fleet.store.backend.s3_options``:
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``). With an endpoint (MinIO, Ceph, moto) requests
are path-style (``<endpoint>/<bucket>/<key>``); without one they go to AWS, virtual-hosted
(``https://<bucket>.s3.<region>.amazonaws.com/<key>``; path-style for a bucket name with dots).
Credentials must be in the environment: on a host whose credentials come from an instance profile
or a web identity, export them first (``aws configure export-credentials --format env``).

Idempotent requests (GET, HEAD, DELETE, LIST, an unconditional PUT) are retried on a transport
error or a 5xx; a conditional PUT is not (a retry of one that had succeeded would fail its own
precondition): its caller decides.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from urllib.parse import quote

import httpx

ATTEMPTS = 4  # tries of an idempotent request before its error is raised
_RETRY_STATUS = {500, 502, 503, 504}
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNANSWERED_HINT = "is the endpoint reachable? check AWS_ENDPOINT_URL, the bucket and the credentials (docs/security.md, The registry on object storage)"


class S3Error(RuntimeError):
    """An S3 request that failed, or could not be made; ``status`` its HTTP status (0: no answer),
    ``code`` S3's error code."""

    def __init__(self, message: str, *, status: int = 0, code: str = ""):
        self.status, self.code = status, code
        super().__init__(message)


class PreconditionFailed(S3Error):
    """A conditional PUT whose condition did not hold (412), or that raced another one on the same key (409)."""


@dataclasses.dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    session_token: str | None = None


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """Where and as whom: ``endpoint`` None means AWS itself."""

    region: str
    credentials: Credentials
    endpoint: str | None = None

    @classmethod
    def from_env(cls) -> S3Settings:
        from fleet.store.backend import s3_options  # one reading of the AWS_* variables for the store and the registry

        options = s3_options()
        if not options.get("access_key_id"):
            raise S3Error(
                "the registry on object storage signs its requests with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) "
                "from the environment: set them (for an instance profile or web identity: `aws configure export-credentials --format env`)",
                code="NoCredentials",
            )
        credentials = Credentials(options["access_key_id"], options.get("secret_access_key") or "", options.get("session_token"))
        return cls(region=options["region"], credentials=credentials, endpoint=options.get("endpoint_url"))


class S3Client:
    """One bucket. Keys are plain strings (``prefix/tuf/metadata/timestamp.json``); thread-safe."""

    def __init__(self, bucket: str, settings: S3Settings, *, timeout_s: float = 30.0, clock=time.time):
        self.bucket, self.settings, self.clock = bucket, settings, clock
        if settings.endpoint:
            self.base, self.path_prefix = settings.endpoint.rstrip("/"), f"/{bucket}"
        elif "." in bucket:  # a dotted name does not match AWS's TLS certificate as a host name: path-style
            self.base, self.path_prefix = f"https://s3.{settings.region}.amazonaws.com", f"/{bucket}"
        else:
            self.base, self.path_prefix = f"https://{bucket}.s3.{settings.region}.amazonaws.com", ""
        self.http = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    # -- objects ----------------------------------------------------------------------------
    def get(self, key: str) -> httpx.Response | None:
        """The object (``.content``, ``.headers["etag"]``), None if there is none."""
        return self._call("GET", key, missing_ok=True)

    def head(self, key: str) -> httpx.Response | None:
        return self._call("HEAD", key, missing_ok=True)

    def stream(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) of the object, as they arrive (never whole in memory)."""
        if end <= start:
            return
        request = self._request("GET", key, headers={"Range": f"bytes={start}-{end - 1}"})
        response = self.http.send(request, stream=True)
        try:
            if response.status_code != 206:  # a 200 would be the whole object, not the range asked for
                response.read()
                raise self._error(request, response)
            yield from response.iter_bytes()
        finally:
            response.close()

    def put(self, key: str, data: bytes, headers: Mapping[str, str] | None = None) -> str:
        """Store ``data`` under ``key``; returns its ETag. With ``If-None-Match: *`` or ``If-Match``
        in ``headers`` it raises PreconditionFailed when the condition does not hold."""
        headers = dict(headers or {})
        conditional = any(h.lower() in ("if-match", "if-none-match") for h in headers)
        response = self._call("PUT", key, headers=headers, content=data, attempts=1 if conditional else ATTEMPTS)
        return response.headers.get("etag", "")

    def delete(self, key: str) -> None:
        self._call("DELETE", key, missing_ok=True)

    def list(self, prefix: str, delimiter: str = "/") -> list[str]:
        """Keys directly under ``prefix`` (not under a deeper ``delimiter``), all pages."""
        keys: list[str] = []
        token = None
        while True:
            query = {"list-type": "2", "prefix": prefix, "delimiter": delimiter, **({"continuation-token": token} if token else {})}
            page = ET.fromstring(self._call("GET", "", query=query).content)
            keys += [element.text or "" for element in page.iterfind("{*}Contents/{*}Key")]
            token = page.findtext("{*}NextContinuationToken")
            if page.findtext("{*}IsTruncated") != "true" or not token:
                return keys

    # -- requests ---------------------------------------------------------------------------
    def _call(self, method: str, key: str, *, query=None, headers=None, content: bytes = b"", missing_ok=False, attempts=ATTEMPTS):
        for attempt in range(attempts):
            request = self._request(method, key, query=query, headers=headers, content=content)
            try:
                response = self.http.send(request)
            except httpx.TransportError as exc:
                if attempt + 1 == attempts:
                    raise S3Error(f"S3 {method} {request.url}: {exc.__class__.__name__}: {exc}; {UNANSWERED_HINT}", code=exc.__class__.__name__) from None
                time.sleep(0.1 * 2**attempt)
                continue
            if response.status_code in _RETRY_STATUS and attempt + 1 < attempts:
                time.sleep(0.1 * 2**attempt)
                continue
            if response.status_code >= 300:
                error = self._error(request, response)
                if response.status_code == 404 and missing_ok and error.code != "NoSuchBucket":
                    return None
                raise error
            return response
        raise AssertionError("unreachable")

    def _error(self, request: httpx.Request, response: httpx.Response) -> S3Error:
        code, message = str(response.status_code), response.reason_phrase
        if response.content:
            try:
                body = ET.fromstring(response.content)
                code, message = body.findtext("Code") or code, body.findtext("Message") or message
            except ET.ParseError:
                pass  # not S3's XML (a proxy's page): the status says enough
        kind = PreconditionFailed if response.status_code in (409, 412) and code != "BucketAlreadyExists" else S3Error
        if response.status_code == 404 and code == "NoSuchBucket":
            message += f": create bucket {self.bucket!r} first, or fix the s3:// location"
        return kind(f"S3 {request.method} {request.url}: {response.status_code} {code}: {message}", status=response.status_code, code=code)

    def _request(self, method: str, key: str, *, query: Mapping[str, str] | None = None, headers=None, content: bytes = b"") -> httpx.Request:
        path = quote(f"{self.path_prefix}/{key}" if key else self.path_prefix or "/", safe="/~")  # no key: the bucket
        url = httpx.URL(self.base + path + ("?" + canonical_query(query) if query else ""))
        signed = sign(method, url, dict(headers or {}), content, self.settings, self.clock())
        return self.http.build_request(method, url, headers=signed, content=content)


def canonical_query(query: Mapping[str, str]) -> str:
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items()))


def sign(method: str, url: httpx.URL, headers: dict[str, str], content: bytes, settings: S3Settings, now: float) -> dict[str, str]:
    """``headers`` plus the AWS Signature Version 4 ones (Authorization, x-amz-date,
    x-amz-content-sha256, x-amz-security-token) for this request. ``url``: path and query already
    URI-encoded (S3 signs them as sent, without encoding them again)."""
    stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    creds = settings.credentials
    amz = {
        "host": url.netloc.decode("ascii"),
        "x-amz-content-sha256": hashlib.sha256(content).hexdigest() if content else _EMPTY_SHA256,
        "x-amz-date": stamp,
        **({"x-amz-security-token": creds.session_token} if creds.session_token else {}),
    }
    names = sorted(amz)
    raw_path, _, raw_query = url.raw_path.decode("ascii").partition("?")
    canonical = "\n".join(
        [method, raw_path, raw_query, *(f"{name}:{amz[name].strip()}" for name in names), "", ";".join(names), amz["x-amz-content-sha256"]]
    )
    scope = f"{stamp[:8]}/{settings.region}/s3/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = f"AWS4{creds.secret_key}".encode()
    for part in (stamp[:8], settings.region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    authorization = f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, SignedHeaders={';'.join(names)}, Signature={signature}"
    return {**headers, **amz, "authorization": authorization}
