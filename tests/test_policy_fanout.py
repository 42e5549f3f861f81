"""Policy fan-out over HTTP: conditional GETs (ETag, 304), range requests (206, 416, If-Range) and
the cache policy of each TUF file kind on the registry's routes; a robot that polls timestamp.json
with If-None-Match, resumes a cut weights download, refuses a tampered partial file through TUF's
hash check; and a robot updating from the registry's directory on a plain static HTTP server
(Python's http.server, no flywheel code serving). Real servers on loopback throughout."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from functools import partial

import httpx
import pytest

from fleet.agent.policy import builtin_policy
from fleet.registry.http_cache import IMMUTABLE, NOT_FOUND, REVALIDATE
from fleet.registry.pull import SignedPolicySource, registry_token
from fleet.registry.store import open_registry, root_metadata
from fleet.registry.trust import PolicyTrust
from tests.conftest import forward_get, registry_server
from tests.test_policy_pull_http import SPEC, exported


def publish(registry, tmp_path, name: str) -> dict:
    weights, manifest = exported(tmp_path, name)
    return registry.publish(weights, policy=manifest, **SPEC)


def robot(tmp_path, url: str, token: str | None) -> SignedPolicySource:
    trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
    return SignedPolicySource(url, token, "robot-0", trust, builtin_policy("zero", 1).current(), root=root_metadata(tmp_path / "registry"))


def weights_url(registry, version: int) -> str:
    info = registry.repo.target_listing()[f"policies/{version:08d}/weights.safetensors"]
    return f"/v1/tuf/targets/policies/{version:08d}/{info.hashes['sha256']}.weights.safetensors"


def partial_of(source, registry, version: int = 1):
    """Where ``source`` keeps a cut download of release ``version``'s weights."""
    return source._fetcher.partial_path(f"{source.targets_url}{weights_url(registry, version).removeprefix('/v1/tuf/targets/')}")


@pytest.fixture
def served(tmp_path):
    """(registry with v1 published, robot token, server, an httpx client holding the token)."""
    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    publish(registry, tmp_path, "v1")
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"})
    yield registry, token, server, client
    client.close()
    server.stop()


@pytest.fixture
def thread_server():
    """Start an http.server handler class on loopback in a thread; returns its base URL."""
    started = []

    def start(handler) -> str:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        started.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def test_etags_304_head_and_the_cache_policy_of_each_file_kind(served):
    registry, _, _, client = served
    snapshot = registry.repo.snapshot_info.version
    targets = registry.repo.targets_infos["targets.json"].version
    kinds = {
        "/v1/tuf/metadata/timestamp.json": REVALIDATE, "/v1/tuf/metadata/root.json": REVALIDATE, "/v1/tuf/metadata/1.root.json": REVALIDATE,
        f"/v1/tuf/metadata/{snapshot}.snapshot.json": IMMUTABLE, f"/v1/tuf/metadata/{targets}.targets.json": IMMUTABLE,
        weights_url(registry, 1): IMMUTABLE,
    }  # fmt: skip
    for url, cache_control in kinds.items():
        full = client.get(url)
        etag = f'"{hashlib.sha256(full.content).hexdigest()}"'  # strong, the content's hash
        assert (full.status_code, full.headers["etag"], full.headers["cache-control"], full.headers["accept-ranges"]) == (200, etag, cache_control, "bytes"), url
        for matching in (etag, f'"other", W/{etag}', "*"):
            unchanged = client.get(url, headers={"If-None-Match": matching})
            assert (unchanged.status_code, unchanged.content, unchanged.headers["etag"]) == (304, b"", etag), (url, matching)
        assert client.get(url, headers={"If-None-Match": '"other"'}).content == full.content
        head = client.head(url)
        assert (head.status_code, head.content, head.headers["content-length"], head.headers["etag"]) == (200, b"", str(len(full.content)), etag)
    for missing in ("/v1/tuf/metadata/2.root.json", "/v1/tuf/targets/policies/00000009/" + "0" * 64 + ".weights.safetensors"):
        answer = client.get(missing)
        assert (answer.status_code, answer.headers["cache-control"]) == (404, NOT_FOUND), missing  # "no next root yet" is never cached
    assert client.get("/v1/tuf/metadata/2.root.json").json()["error"] == "no_such_metadata"
    assert client.get("/v1/tuf/metadata/3.snapshot.json").status_code == 404
    # every robot's every poll asks for the next root: those 404s are answers, not refusals (an alert on refusals fired all day)
    assert served[2].app.state.metrics.registry.get_sample_value("flywheel_rejections_total", {"reason": "no_such_metadata"}) == 1.0
    assert httpx.get(client.base_url.join("/v1/tuf/metadata/timestamp.json")).status_code == 401  # the token still gates the server


def test_range_requests_206_416_and_if_range(served):
    registry, _, _, client = served
    url = weights_url(registry, 1)
    whole = client.get(url).content
    size, etag = len(whole), client.head(url).headers["etag"]
    for asked, (start, end) in {"bytes=0-9": (0, 10), "BYTES=0-1": (0, 2), "bytes=10-": (10, size), "bytes=-5": (size - 5, size), f"bytes=5-{10 * size}": (5, size)}.items():
        answer = client.get(url, headers={"Range": asked})
        assert answer.status_code == 206 and answer.content == whole[start:end], asked
        assert answer.headers["content-range"] == f"bytes {start}-{end - 1}/{size}" and answer.headers["content-length"] == str(end - start)
    for unsatisfiable in (f"bytes={size}-", "bytes=-0"):
        answer = client.get(url, headers={"Range": unsatisfiable})
        assert (answer.status_code, answer.headers["content-range"]) == (416, f"bytes */{size}"), unsatisfiable
        assert answer.json()["error"] == "range_not_satisfiable" and f"below {size}" in answer.json()["reason"]  # the refusal's shape
    for ignored in ("bytes=0-1,5-6", "bytes=9-2", "items=0-1", "bytes=x-"):  # multi-range and malformed: the whole body (RFC 9110 14.2)
        answer = client.get(url, headers={"Range": ignored})
        assert (answer.status_code, answer.content) == (200, whole), ignored
    assert client.get(url, headers={"Range": "bytes=4-", "If-Range": etag}).content == whole[4:]
    changed = client.get(url, headers={"Range": "bytes=4-", "If-Range": '"an older file"'})
    assert (changed.status_code, changed.content) == (200, whole)  # If-Range failed: the whole current file
    assert client.head(url, headers={"Range": "bytes=0-1"}).status_code == 200  # HEAD ignores Range
    timestamp = client.get("/v1/tuf/metadata/timestamp.json", headers={"Range": "bytes=0-0"})
    assert (timestamp.status_code, timestamp.content) == (206, b"{")  # metadata (served from memory) too


def test_an_unchanged_registry_costs_the_robot_a_304(tmp_path, served):
    registry, token, server, _ = served
    source = robot(tmp_path, server.url, token)
    try:
        assert source.poll() and source._fetcher.not_modified == 0
        assert not source.poll() and source._fetcher.not_modified == 1  # timestamp.json answered 304; TUF re-checked the kept body
        publish(registry, tmp_path, "v2")
        assert source.poll() and source.trust.version == 2 and source.status()["pull_not_modified"] == 1
        assert source.refusals == {} and source.errors == 0
    finally:
        source.close()


class Proxy(http.server.BaseHTTPRequestHandler):
    """Forwards GETs to ``upstream`` (an httpx client on the flywheel server) with the robot's conditional and range
    headers; ``mangle(path, status, body)`` may change a body on the way (Content-Length follows it)."""

    upstream: httpx.Client
    mangle = staticmethod(lambda path, status, body: body)

    def do_GET(self):
        answer = forward_get(self, self.upstream)
        body = self.mangle(self.path, answer.status_code, answer.content)
        self.send_response(answer.status_code)
        for key in ("content-type", "content-range", "etag", "accept-ranges"):
            if key in answer.headers:
                self.send_header(key, answer.headers[key])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_one_mangled_timestamp_answer_costs_one_poll(tmp_path, served, thread_server):
    """A proxy truncating one timestamp.json answer (under the registry's ETag) blocked updates until the registry's
    timestamp changed: the fetcher kept the body as it arrived, before TUF refused it, and replayed it at every 304."""
    registry, token, server, _ = served
    mangled = []

    def truncate_once(path, status, body):
        if path.endswith("/timestamp.json") and status == 200 and not mangled:
            mangled.append(path)
            return body[: len(body) // 2]
        return body

    upstream = httpx.Client(base_url=server.url)
    source = robot(tmp_path, thread_server(type("Truncating", (Proxy,), {"upstream": upstream, "mangle": staticmethod(truncate_once)})), token)
    try:
        assert not source.poll() and source.refusals == {"malformed": 1} and mangled  # the mangled answer: refused
        assert source.poll() and source.status()["policy_version"] == 1 and source.refusals == {"malformed": 1}  # the next poll asked afresh
        assert not source.poll() and source.status()["pull_not_modified"] == 1  # an accepted body is kept: 304 from then on
    finally:
        source.close()
        upstream.close()


def test_a_cut_weights_download_resumes_with_a_range_request_and_installs_verified(tmp_path, served, thread_server):
    registry, token, server, _ = served
    cut_once = [weights_url(registry, 1)]
    upstream = httpx.Client(base_url=server.url)
    seen_ranges = []

    class CuttingProxy(http.server.BaseHTTPRequestHandler):
        """Forwards to the flywheel server; the first weights answer stops after half its body."""

        def do_GET(self):
            seen_ranges.append(self.headers.get("range"))
            answer = forward_get(self, upstream)
            self.send_response(answer.status_code)
            for key in ("content-type", "content-length", "content-range", "etag", "accept-ranges"):
                if key in answer.headers:
                    self.send_header(key, answer.headers[key])
            self.end_headers()
            body = answer.content
            if self.path in cut_once:
                cut_once.remove(self.path)
                body, self.close_connection = body[: len(body) // 2], True
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    source = robot(tmp_path, thread_server(CuttingProxy), token)
    try:
        assert not source.poll() and source.errors == 1 and source.refusals == {}  # the cut: a network error, nothing installed
        partial_file = partial_of(source, registry)
        half = partial_file.stat().st_size
        assert half > 0 and partial_file.with_name(partial_file.name + ".etag").exists()
        seen_ranges.clear()
        assert source.poll() and source.current().version == "1"  # TUF checked the whole file's length and sha256
        assert f"bytes={half}-" in seen_ranges and source.status()["pull_resumed_bytes"] == half
        assert not partial_file.exists() and source.refusals == {}
    finally:
        source.close()
        upstream.close()


def test_a_tampered_partial_file_is_refused_by_tufs_hash_check_then_fetched_whole(tmp_path, served):
    registry, token, server, client = served
    source = robot(tmp_path, server.url, token)
    try:
        whole = client.get(weights_url(registry, 1)).content
        partial_file = partial_of(source, registry)
        partial_file.parent.mkdir(parents=True, exist_ok=True)
        tampered = bytearray(whole[: len(whole) // 2])
        tampered[-1] ^= 0xFF  # a partial download changed on the robot's disk (or by a lying mirror)
        partial_file.write_bytes(bytes(tampered))
        assert not source.poll() and source.refusals == {"hash": 1} and source.swaps == 0
        assert source.status()["pull_resumed_bytes"] == len(tampered) and not partial_file.exists()  # resumed, refused, dropped
        assert source.poll() and source.current().version == "1"  # fetched whole this time
    finally:
        source.close()


class Coding(http.server.BaseHTTPRequestHandler):
    """Forwards GETs to ``upstream``; answers the paths ending in ``coded`` with 8 MiB of zeros in gzip (8 KiB on the
    wire) under ``Content-Encoding: gzip``, as a hostile or misconfigured host may, whatever the robot asked for.
    ``accepted``: the Accept-Encoding of every request."""

    upstream: httpx.Client
    coded: str | None = None
    coding: str = "gzip"  # the Content-Encoding of the gzip bomb
    label: str | None = None  # a Content-Encoding put on every forwarded (plain) answer
    accepted: list
    BOMB = gzip.compress(bytes(8 << 20), compresslevel=9)

    def do_GET(self):
        self.accepted.append(self.headers.get("accept-encoding"))
        if self.coded is not None and self.path.endswith(self.coded):
            status, headers, body = 200, {"Content-Encoding": self.coding}, self.BOMB
        else:
            answer = forward_get(self, self.upstream)
            status, body = answer.status_code, answer.content
            headers = {k: answer.headers[k] for k in ("content-type", "content-range", "etag") if k in answer.headers}
            headers |= {"Content-Encoding": self.label} if self.label else {}
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("coded", ["timestamp.json", "snapshot.json", ".weights.safetensors"])  # conditional, plain and resumable GETs
def test_an_answer_in_a_content_coding_is_refused_unread(tmp_path, served, thread_server, coded, caplog):
    """httpx decoded whatever Content-Encoding a host declared, whole, before TUF's length cap saw a byte: a 16 KiB zstd
    timestamp.json took a robot past 1 GB (and counted as a `size` refusal once decoded). The robot now asks for
    identity, reads raw, and refuses a coded answer as a pull error naming the coding; the next honest answer installs."""
    registry, token, server, _ = served
    upstream = httpx.Client(base_url=server.url)
    host = type("Coding", (Coding,), {"upstream": upstream, "coded": coded, "accepted": []})
    source = robot(tmp_path, thread_server(host), token)
    try:
        assert not source.poll() and source.errors == 1 and source.refusals == {} and source.swaps == 0
        assert "Content-Encoding: gzip" in caplog.text and "serve the registry's files uncompressed" in caplog.text
        assert host.accepted and set(host.accepted) == {"identity"}  # every request asked for the file's own bytes
        host.coded = None  # the host serves the files as they are
        assert source.poll() and source.current().version == "1" and source.refusals == {}
    finally:
        source.close()
        upstream.close()


@pytest.mark.parametrize("label", ["aws-chunked", "AWS-Chunked", "aws-chunked, identity"])
def test_an_aws_chunked_label_left_on_plain_files_is_no_coding(tmp_path, served, thread_server, label):
    """Several S3-compatible stores keep ``Content-Encoding: aws-chunked`` on objects that AWS CLI v2.23+ (the
    `aws s3 sync` route of docs/security.md) uploaded, and send it with the plain bytes: refused as a coding, every
    robot stopped updating from such a registry. It passes; a real coding beside it is still refused, named."""
    registry, token, server, _ = served
    upstream = httpx.Client(base_url=server.url)
    host = type("Coding", (Coding,), {"upstream": upstream, "label": label, "accepted": []})
    source = robot(tmp_path, thread_server(host), token)
    try:
        assert source.poll() and source.current().version == "1" and source.errors == 0 and source.refusals == {}
    finally:
        source.close()
        upstream.close()


def test_a_real_coding_beside_aws_chunked_is_refused_naming_it(tmp_path, served, thread_server, caplog):
    registry, token, server, _ = served
    upstream = httpx.Client(base_url=server.url)
    host = type("Coding", (Coding,), {"upstream": upstream, "coded": "timestamp.json", "coding": "aws-chunked,GZIP", "accepted": []})
    source = robot(tmp_path, thread_server(host), token)
    try:
        assert not source.poll() and source.errors == 1 and source.swaps == 0
        assert "the answer is Content-Encoding: gzip, though the robot asked for identity" in caplog.text
    finally:
        source.close()
        upstream.close()


@pytest.mark.parametrize("etag", ['"caf\u00e9"', '"a"b"', "unquoted", '"' + "x" * 300 + '"'])
def test_an_etag_a_request_cannot_carry_back_is_never_kept(tmp_path, served, thread_server, etag):
    """A non-ASCII ETag kept beside a cut download was sent back as If-Range at every later poll: httpx raised
    UnicodeEncodeError before any request, and the robot never installed that release, even after a restart or with
    the honest host back. Now only a strong, visible-ASCII, bounded ETag is kept (for timestamp.json's If-None-Match
    too), and one already on disk, left by an earlier build, drops its partial: the download starts over."""
    registry, token, server, _ = served
    upstream = httpx.Client(base_url=server.url)
    hostile = [True]

    class BadETag(http.server.BaseHTTPRequestHandler):
        """Forwards to the flywheel server; while ``hostile``, every answer carries ``etag`` and weights are cut halfway."""

        def do_GET(self):
            answer = forward_get(self, upstream)
            body = answer.content
            self.send_response(answer.status_code)
            for key in ("content-type", "content-range", "etag"):
                if key in answer.headers and not (hostile[0] and key == "etag"):
                    self.send_header(key, answer.headers[key])
            if hostile[0]:
                self.send_header("ETag", etag)
                if self.path.endswith(".weights.safetensors"):
                    body, self.close_connection = body[: len(body) // 2], True
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    source = robot(tmp_path, thread_server(BadETag), token)
    partial_file = partial_of(source, registry)
    etag_file = partial_file.with_name(partial_file.name + ".etag")
    try:
        assert not source.poll() and source.errors == 1 and not etag_file.exists()  # cut, its ETag not kept
        half = partial_file.stat().st_size
        hostile[0] = False  # the honest host is back
        assert source.poll() and source.current().version == "1" and source.errors == 1 and source.refusals == {}
        assert source.status()["pull_resumed_bytes"] == half and not partial_file.exists()  # resumed (no If-Range), TUF checked the whole
    finally:
        source.close()
        upstream.close()


def test_a_kept_etag_a_request_cannot_carry_drops_its_partial_and_the_download_starts_over(tmp_path, served):
    """What an earlier build left beside a cut download (it kept any ETag): the partial is dropped, never resumed."""
    registry, token, server, _ = served
    source = robot(tmp_path, server.url, token)
    partial_file = partial_of(source, registry)
    partial_file.parent.mkdir(parents=True)
    partial_file.write_bytes(b"\0" * 100)
    partial_file.with_name(partial_file.name + ".etag").write_text('"caf\u00e9"')
    try:
        assert source.poll() and source.current().version == "1" and source.errors == 0 and source.refusals == {}
        assert source.status()["pull_resumed_bytes"] == 0 and not partial_file.exists()
    finally:
        source.close()


def test_a_robot_updates_from_a_plain_static_http_server(tmp_path, thread_server):
    keys = tmp_path / "keys"
    registry = open_registry(tmp_path / "registry", keys / "online.pem", root_keys=[keys / f"root-{i}.pem" for i in (1, 2, 3)])
    site = tmp_path / "site" / "v1"  # the bucket: <registry>/tuf/ uploaded as <base>/v1/tuf/
    site.mkdir(parents=True)
    (site / "tuf").symlink_to(registry.root / "tuf", target_is_directory=True)
    requests = []

    class Static(http.server.SimpleHTTPRequestHandler):  # Python's static file server, unchanged but for a request log
        def log_message(self, *args):
            requests.append((self.path, self.headers.get("authorization")))

    base = thread_server(partial(Static, directory=str(tmp_path / "site")))
    source = robot(tmp_path, base, None)  # no token: nothing secret is fetched, and a CDN never sees the fleet token
    try:
        assert not source.poll() and source.errors == 0 and source.refusals == {}  # nothing released yet
        publish(registry, tmp_path, "v1")
        assert source.poll() and source.current().version == "1" and source.refusals == {}
        publish(registry, tmp_path, "v2")
        assert source.poll() and source.current().version == "2"
        assert source.status()["pull_not_modified"] == 0  # http.server sends no ETag: every poll is a full GET, still verified
        assert any("weights.safetensors" in path for path, _ in requests) and all(auth is None for _, auth in requests)
    finally:
        source.close()


@pytest.mark.parametrize(
    "registry_url, sent",
    [
        ("http://fleet:8700", True), ("HTTP://Fleet:8700/", True),  # the fleet server
        ("http://fleet:8700/registry", False),  # another path on its host: a CDN may route it to a bucket
        ("https://fleet:8700", False), ("http://fleet:8701", False), ("http://cdn.example:8700", False),  # another origin
        ("http://fleet", False), ("http://fleet.evil:8700", False), ("http://fleet:99999", False), ("http://fleet:x", False),
    ],
)
def test_the_token_goes_to_the_registry_only_where_it_is_the_fleet_server(registry_url, sent):
    """flywheel-robot and the ROS 2 node once sent the robot's upload token to whatever served the registry; matched by
    origin only, a CDN routing /v1/ to the server and /registry/ to a bucket got it at the bucket; a port like :99999 raised."""
    assert registry_token(registry_url, "http://fleet:8700", "t") == ("t" if sent else None)
    assert registry_token("https://fleet", "https://fleet:443/", "t") == "t" and registry_token("http://fleet:80", "http://fleet", "t") == "t"
    assert registry_token("https://cdn/fleet/", "https://cdn/fleet", "t") == "t" and registry_token("https://cdn/registry", "https://cdn/fleet", "t") is None
    assert registry_token("http://fleet:99999", "http://fleet:99999", "t") is None


def test_weights_are_not_downloaded_into_the_room_the_robots_episodes_need(tmp_path, served):
    """A policy download could fill the robot's disk: its spool then dropped telemetry. It now waits for room: twice
    the listed length (partial file and TUF's copy) plus min_free_bytes must be free."""
    registry, token, server, _ = served
    source = robot(tmp_path, server.url, token)
    try:
        source.min_free_bytes = shutil.disk_usage(tmp_path).free + (1 << 40)  # a disk that could not take the weights and keep this room
        assert not source.poll() and source.status()["pull_no_room"] == 1 and source.status()["policy_version"] == 0
        assert source.refusals == {} and source.errors == 0 and not any("weights" in p.name for p in source.targets_dir.rglob("*"))  # none of the weights fetched
        source.min_free_bytes = 0  # room again (the operator freed the disk)
        assert source.poll() and source.status()["policy_version"] == 1 and source.status()["pull_no_room"] == 1
    finally:
        source.close()


class Cutting(http.server.BaseHTTPRequestHandler):
    """Forwards to ``upstream``; every weights answer stops halfway through its body (a link that cuts them all)."""

    upstream: httpx.Client

    def do_GET(self):
        answer = forward_get(self, self.upstream)
        self.send_response(answer.status_code)
        for key in ("content-type", "content-length", "content-range", "etag"):
            if key in answer.headers:
                self.send_header(key, answer.headers[key])
        self.end_headers()
        body = answer.content
        if self.path.endswith(".weights.safetensors"):
            body, self.close_connection = body[: len(body) // 2], True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_only_the_partial_download_of_the_release_being_fetched_is_kept_and_counted(tmp_path, served, thread_server):
    """Each release's cut weights download kept its partial file until a release installed: they piled up on a flaky
    link, and the disk-room check counted all of them as free room, allowing a download the disk had no room for."""
    registry, token, server, _ = served
    upstream = httpx.Client(base_url=server.url)
    source = robot(tmp_path, thread_server(type("Cut", (Cutting,), {"upstream": upstream})), token)
    partials = lambda: sorted(p.name for p in source.targets_dir.glob("*.partial*"))  # noqa: E731
    try:
        assert not source.poll() and source.errors == 1 and len(partials()) == 2  # v1's partial and its ETag
        publish(registry, tmp_path, "v2")
        assert not source.poll() and source.errors == 2 and len(partials()) == 2 and all("00000002" in name for name in partials())  # v1's gone
        stale = source.targets_dir / "policies%2F00000001%2Fearlier.weights.safetensors.partial"  # one an earlier build left
        with open(stale, "wb") as sparse:
            sparse.truncate(1 << 36)  # 64 GiB listed, none of it on disk
        source.min_free_bytes = shutil.disk_usage(tmp_path).free + (1 << 35)  # room only if the stale file counted as free
        assert not source.poll() and source.status()["pull_no_room"] == 1 and source.errors == 2 and not stale.exists()
        source.min_free_bytes = 0
        upstream.close()
        source.close()
        source = robot(tmp_path, server.url, token)  # the link mended (the state folder kept): v2 resumes and installs
        assert source.poll() and source.current().version == "2" and source.status()["pull_resumed_bytes"] > 0 and partials() == []
    finally:
        source.close()
        upstream.close()


_FULL_DISK_ROBOT = """
import json, resource, sys
from pathlib import Path
from fleet.agent.policy import builtin_policy
from fleet.registry.pull import SignedPolicySource
from fleet.registry.trust import PolicyTrust
url, token, root, state, weights_url = sys.argv[1:]
resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))  # no file past 256 KiB: writes past it fail (EFBIG), as on a full disk
trust = PolicyTrust(robot_model="pendulum", obs_dim=4, act_dim=1, state_dir=Path(state))
source = SignedPolicySource(url, token, "robot-0", trust, builtin_policy("zero", 1).current(), root=Path(root).read_bytes())
try:
    for _ in source._fetcher._fetch(source.targets_url + weights_url):
        pass
    failed = None
except OSError as exc:
    failed = exc.__class__.__name__
partial = source._fetcher.partial_path(source.targets_url + weights_url).exists()
polled = source.poll()
left = sorted(str(p.relative_to(source.targets_dir)) for p in source.targets_dir.rglob("*") if p.is_file())
print(json.dumps({"fetch_failed": failed, "partial_kept": partial, "polled": polled, "errors": source.errors, "left": left}))
source.close()
"""


def test_a_download_that_fills_the_disk_leaves_nothing_behind(tmp_path, served):
    """A weights download that hit a full disk left its .partial file: the disk stayed at 100 %. The robot here runs with
    a file size limit (RLIMIT_FSIZE) that the weights exceed: every write past it fails, as on a full disk."""
    registry, token, server, _ = served
    registry.publish(os.urandom(1 << 20), **SPEC)  # v2: 1 MiB of weights (never loaded: the download fails first)
    listed = weights_url(registry, 2).removeprefix("/v1/tuf/targets/")
    root = tmp_path / "root.json"
    root.write_bytes(root_metadata(tmp_path / "registry"))
    out = subprocess.run([sys.executable, "-c", _FULL_DISK_ROBOT, server.url, token, str(root), str(tmp_path / "robot"), listed],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fetch_failed"] == "OSError" and not result["partial_kept"]  # the fetcher drops the partial it could not write
    assert not result["polled"] and result["errors"] == 1 and result["left"] == []  # and the poll leaves no file of the download
