"""The robot against servers and proxies that misbehave: its uploader is never stuck, never loses an episode to an
answer that is not the server's acknowledgement, never refuses a good episode for a proxy's page, and says what is
wrong in its status; a trickling registry holds a policy poll for a bounded time. Each server here is a real loopback
HTTP server answering as a broken one would."""

from __future__ import annotations

import email.utils
import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from fleet.agent.agent import RobotAgent
from fleet.agent.config import AgentConfig
from fleet.agent.spool import Spool
from fleet.agent.uploader import Uploader, _retry_after_s
from sim.episode import Episode
from tests.conftest import make_episode_arrays


class Hostile:
    """A loopback server whose answers come from ``answer(method, path, body) -> (status, headers, body bytes or an
    iterable of chunks)``; it records the requests it got."""

    def __init__(self, answer):
        self.answer, self.requests = answer, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append((self.command, self.path))
                status, headers, reply = outer.answer(self.command, self.path, body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if isinstance(reply, bytes):
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for chunk in reply:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _serve  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def ack(body: bytes) -> tuple[int, dict, bytes]:
    episode_id = Episode.from_bytes(body).episode_id
    return 201, {"Content-Type": "application/json"}, json.dumps({"episode_id": episode_id, "status": "created"}).encode()


def episode(seed: int) -> Episode:
    return Episode.create(**make_episode_arrays(num_steps=5, seed=seed), robot_id="r0", robot_model="toy", source="real")


def put(up: Uploader, seed: int) -> Episode:
    ep = episode(seed)
    up.spool.put(ep.to_bytes(), ep.episode_id)
    return ep


def uploader(tmp_path, url: str, **kw) -> Uploader:
    spool = Spool(tmp_path / "spool", max_bytes=kw.pop("max_bytes", 1 << 30))
    return Uploader(spool, url, "t", backoff_initial_s=0.01, backoff_max_s=0.05, request_timeout_s=kw.pop("request_timeout_s", 5.0), seed=0, **kw)


@pytest.mark.parametrize(
    "bad",
    [
        (200, {"Content-Type": "text/html"}, b"<html>Welcome to the hotel wifi</html>"),  # a captive portal
        (201, {"Content-Type": "application/json"}, b"{}"),
        (201, {"Content-Type": "application/json"}, b'{"episode_id": "00000000-0000-4000-8000-000000000000", "status": "created"}'),  # another episode
        (200, {"Content-Type": "application/json"}, b'{"status": "error"}'),
    ],
    ids=["portal", "empty", "other_id", "error_status"],
)
def test_only_the_servers_acknowledgement_of_the_episode_lets_the_robot_delete_it(tmp_path, bad):
    """Any 2xx once deleted the spooled episode: the four answers here lost four episodes the server never stored."""
    fixed = threading.Event()
    server = Hostile(lambda method, path, body: ack(body) if fixed.is_set() else bad)
    up = uploader(tmp_path, server.url)
    try:
        put(up, 1)
        assert up.upload_once() == "retry" and up.spool.depth == 1 and up.stats["created"] == 0
        assert "does not acknowledge" in up.last_error
        fixed.set()
        assert up.upload_once() == "acked" and up.spool.depth == 0 and up.last_error is None  # cleared once one gets through
    finally:
        server.close()


def test_an_acknowledgement_a_proxy_compressed_is_kept_and_named(tmp_path):
    """A proxy gzipping answers though the robot asks for identity: the server stored the episode, the robot could not read
    the acknowledgement and kept sending it, and its error asked whether the URL was the fleet server."""

    def gzipped(method, path, body):
        status, headers, content = ack(body)
        return status, {**headers, "Content-Encoding": "gzip"}, gzip.compress(content)

    server = Hostile(gzipped)
    up = uploader(tmp_path, server.url)
    try:
        put(up, 1)
        assert up.upload_once() == "retry" and up.spool.depth == 1  # kept: nothing read says it was stored
        assert "Content-Encoding: gzip, though the robot asked for identity" in up.last_error and "fleet server?" not in up.last_error
    finally:
        server.close()


def test_a_resumable_upload_whose_answers_a_proxy_compressed_names_the_coding(tmp_path):
    """The same proxy on the resumable path: the create's answer failed to decode and was reported as 'not the resumable
    upload protocol's', naming nothing."""

    def gzipped(method, path, body):
        answer = json.dumps({"upload_id": "u1", "offset": 0, "max_chunk_bytes": 1 << 20}).encode()
        return 201, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, gzip.compress(answer)

    server = Hostile(gzipped)
    up = uploader(tmp_path, server.url, resumable_threshold_bytes=0)
    try:
        put(up, 1)
        assert up.upload_once() == "retry" and up.spool.depth == 1
        assert "HTTP 201 in Content-Encoding: gzip, though the robot asked for identity" in up.last_error
    finally:
        server.close()


def test_a_proxys_refusals_never_refuse_a_good_episode_for_good(tmp_path):
    """An nginx-style HTML 413 or 400 once moved good episodes to rejected/ for ever."""
    pages = {"413": (413, {"Content-Type": "text/html"}, b"<html>413 Request Entity Too Large</html>"), "400": (400, {"Content-Type": "text/html"}, b"<html>400</html>")}
    mode = {"now": "400"}

    def answer(method, path, body):
        if mode["now"] == "ok":
            return ack(body)
        return pages[mode["now"]] if path == "/v1/episodes" else (404, {}, b"")

    server = Hostile(answer)
    up = uploader(tmp_path, server.url)
    try:
        put(up, 2)
        assert up.upload_once() == "retry" and up.spool.depth == 1 and not up.spool.rejected()
        mode["now"] = "413"  # a proxy's body limit: the episode goes resumable (the proxy here knows no uploads: kept)
        assert up.upload_once() == "retry" and up.spool.depth == 1 and not up.spool.rejected()
        assert ("POST", "/v1/uploads") in server.requests
        mode["now"] = "ok"
        up._too_large.clear()
        assert up.upload_once() == "acked"
    finally:
        server.close()


def test_the_upload_thread_survives_answers_of_another_shape_and_reports_them(tmp_path):
    """POST /v1/uploads answered 201 {"offset": null}: a TypeError killed the upload thread, and nothing said so."""
    fixed = threading.Event()

    def answer(method, path, body):
        if fixed.is_set():
            return ack(body) if path == "/v1/episodes" else (404, {}, b"")
        if path == "/v1/uploads":
            return 201, {"Content-Type": "application/json"}, b'{"upload_id": "u", "offset": null, "max_chunk_bytes": [1]}'
        return 404, {}, b""  # the remembered upload: forgotten, so each attempt creates one again

    server = Hostile(answer)
    agent = RobotAgent(AgentConfig(server_url=server.url, spool_dir=str(tmp_path), backoff_initial_s=0.01, backoff_max_s=0.05, resumable_threshold_bytes=0), "r0", token="t")
    try:
        agent.start()
        agent.submit(episode(3))
        deadline = time.monotonic() + 10
        while agent.status()["failed_attempts"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        status = agent.status()
        assert status["uploader_alive"] and status["failed_attempts"] >= 2 and "not the resumable upload protocol's" in status["last_error"], status
        agent.uploader.resumable_threshold_bytes = 1 << 30
        fixed.set()
        assert agent.wait_drained(10), agent.status()
        assert agent.status()["created"] == 1 and agent.status()["last_error"] is None
    finally:
        agent.stop(5)
        server.close()


def test_chunks_acknowledged_without_progress_end_the_attempt(tmp_path):
    """A PUT answered 200 at the same offset looped ~23 times a second for ever."""
    def answer(method, path, body):
        if path == "/v1/uploads":
            return 201, {"Content-Type": "application/json"}, b'{"upload_id": "u", "offset": 0, "max_chunk_bytes": 100}'
        if method == "PUT":
            return 200, {"Content-Type": "application/json"}, b'{"offset": 0}'
        return 404, {}, b""

    server = Hostile(answer)
    up = uploader(tmp_path, server.url, resumable_threshold_bytes=0)
    try:
        put(up, 4)
        assert up.upload_once() == "retry" and "without progress" in up.last_error
        assert sum(method == "PUT" for method, _ in server.requests) == 3  # MAX_STALLS, then back off
    finally:
        server.close()


def test_offset_mismatches_and_refused_chunks_start_a_new_upload_and_never_refuse_the_episode(tmp_path):
    """Nine 409 offset_mismatch answers in one attempt (replicas without shared staging) once rejected the episode."""
    flip = {"n": 0}

    def answer(method, path, body):
        if path == "/v1/uploads":
            return 201, {"Content-Type": "application/json"}, b'{"upload_id": "u", "offset": 0, "max_chunk_bytes": 100}'
        if method == "PUT":
            flip["n"] += 1
            return 409, {"Content-Type": "application/json"}, json.dumps({"error": "offset_mismatch", "field": "upload-offset", "reason": "x", "offset": flip["n"] % 2 * 50}).encode()
        return 200, {}, b""

    server = Hostile(answer)
    up = uploader(tmp_path, server.url, resumable_threshold_bytes=0)
    try:
        put(up, 5)
        assert up.upload_once() == "retry" and up.spool.depth == 1 and not up.spool.rejected()
        assert ("DELETE", "/v1/uploads/u") in server.requests  # the half-sent upload is given back, not left to expire
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["trickle", "endless", "bomb"])
def test_an_answer_that_never_ends_or_explodes_costs_a_bounded_wait_and_memory(tmp_path, kind):
    """With request_timeout_s=2 an answer trickled a byte a second kept an upload in flight past 12 s; a 500 MiB answer
    raised the robot's memory by 500 MiB, a 400 KB gzip answer by 1.8 GB."""
    sent = {"bytes": 0}

    def chunks():
        for _ in range(10_000):
            piece = b"x" if kind == "trickle" else b"y" * (1 << 20)
            sent["bytes"] += len(piece)
            yield piece
            if kind == "trickle":
                time.sleep(0.1)

    def answer(method, path, body):
        if kind == "bomb":
            return 201, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, gzip.compress(b"{" + b" " * (100 << 20) + b"}")
        return 201, {"Content-Type": "application/json"}, chunks()

    server = Hostile(answer)
    up = uploader(tmp_path, server.url, request_timeout_s=1.0)
    try:
        put(up, 6)
        start = time.monotonic()
        assert up.upload_once() == "retry" and up.spool.depth == 1  # not an acknowledgement, and over in bounded time
        assert time.monotonic() - start < 5
        assert kind != "endless" or sent["bytes"] < (64 << 20)  # the rest of the answer was not read
    finally:
        server.close()


def test_gateway_errors_never_set_an_episode_aside(tmp_path):
    """Random 502s from a gateway in front of a healthy server set good episodes aside (~0.7^8 of them)."""
    count = {"n": 0}

    def answer(method, path, body):
        count["n"] += 1
        return (502, {}, b"<html>Bad Gateway</html>") if count["n"] % 3 else ack(body)

    server = Hostile(answer)
    up = uploader(tmp_path, server.url, max_attempts=2)
    try:
        for seed in range(6):
            put(up, 10 + seed)
        for _ in range(60):
            if up.upload_once() == "empty":
                break
        assert up.stats["created"] == 6 and up.stats["set_aside"] == 0 and not up.spool.rejected()
    finally:
        server.close()


def test_refused_episodes_are_kept_within_the_spools_bound(tmp_path):
    """rejected/ grew without limit: a proxy refusing everything could fill the robot's disk."""
    server = Hostile(lambda method, path, body: (422, {"Content-Type": "application/json"}, b'{"error": "bad_shape", "field": "action", "reason": "x"}'))
    size = len(episode(0).to_bytes())
    up = uploader(tmp_path, server.url, max_bytes=3 * size + 10)
    try:
        for seed in range(10):
            last = put(up, 20 + seed)
            assert up.upload_once() == "rejected"
        kept = up.spool.rejected()
        assert len(kept) == 3 and up.spool.rejected_evicted == 7 and kept[-1].name.endswith(f"{last.episode_id}.safetensors")
        assert len(list((tmp_path / "spool" / "rejected").glob("*.reason.json"))) == 3
    finally:
        server.close()


def test_retry_after_in_either_form():
    def response(value: str) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value})

    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 < _retry_after_s(response(in_a_minute)) <= 61  # once 0: the HTTP-date form was ignored
    assert _retry_after_s(response("7")) == 7 and _retry_after_s(response("nan")) == 0 and _retry_after_s(response("-3")) == 0
    assert _retry_after_s(response("inf")) == 0 and _retry_after_s(response("soon")) == 0


def test_a_registry_that_trickles_its_files_holds_a_policy_poll_for_a_bounded_time(tmp_path):
    """A timestamp.json or weights trickled a byte a second held SignedPolicySource.current(), and so the robot's
    control loop, for as long as the file lasted (TUF reads a timestamp up to 16 KiB: ~4.5 h)."""
    from tuf.api import exceptions as tuf_errors

    from fleet.registry.fetcher import TokenFetcher

    def trickle():
        for _ in range(10_000):
            yield b" "
            time.sleep(0.05)

    server = Hostile(lambda method, path, body: (200, {"Content-Type": "application/octet-stream"}, trickle()))
    fetcher = TokenFetcher(httpx.Client(timeout=5.0), revalidate={f"{server.url}/v1/tuf/metadata/timestamp.json"},
                           partial_dir=tmp_path / "partial", resume_prefix=f"{server.url}/v1/tuf/targets/", deadline_s=1.0)  # fmt: skip
    try:
        for url in (f"{server.url}/v1/tuf/metadata/timestamp.json", f"{server.url}/v1/tuf/targets/abc.weights.safetensors"):
            start, got = time.monotonic(), 0
            with pytest.raises(tuf_errors.DownloadError, match="not finished 1 s after its headers"):
                for chunk in fetcher._fetch(url):
                    got += len(chunk)
            assert time.monotonic() - start < 3 and got > 0
        assert fetcher.partial_path(f"{server.url}/v1/tuf/targets/abc.weights.safetensors").stat().st_size > 0  # kept for the next poll
    finally:
        server.close()


def test_a_started_policy_source_never_waits_for_a_trickling_registry(tmp_path):
    """A robot's started source polls on its own thread: with the registry trickling every file, each episode still
    gets its policy at once (before, current() ran the poll and waited up to 3 x request_timeout_s per file)."""
    from fleet.agent.policy import builtin_policy
    from fleet.registry.pull import SignedPolicySource
    from fleet.registry.trust import PolicyTrust
    from tests.conftest import registry_server

    registry, _, good = registry_server(tmp_path, "robot", "robot-0")
    root = (tmp_path / "registry" / "tuf" / "metadata" / "root.json").read_bytes()
    good.stop()

    def trickle():
        for _ in range(10_000):
            yield b" "
            time.sleep(0.05)

    server = Hostile(lambda method, path, body: (200, {"Content-Type": "application/octet-stream"}, trickle()))
    trust = PolicyTrust(robot_model="pendulum", obs_dim=4, act_dim=1, state_dir=tmp_path / "robot")
    source = SignedPolicySource(server.url, None, "robot-0", trust, builtin_policy("zero", 1).current(), root=root, request_timeout_s=1.0).start()
    try:
        time.sleep(0.3)  # the first poll is under way, reading timestamp.json a byte at a time
        for _ in range(20):
            start = time.monotonic()
            assert source.current().version == "zero"
            assert time.monotonic() - start < 0.05
        deadline = time.monotonic() + 15
        while source.errors == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert source.errors >= 1 and source._poller.is_alive()  # the poll gave up (bounded) and the thread lives on
    finally:
        source.close()
        server.close()


def test_two_episodes_the_server_fails_on_never_hold_back_the_others(tmp_path):
    """A server answering 500 to two episodes at the head of the queue (and 201 to every other): in 90 s the robot
    sent 9 requests, all for those two, and none of the 7 good episodes behind them; 0 of 134 against a server whose
    staging disk was full."""
    bad: set[str] = set()

    def answer(method, path, body):
        episode_id = Episode.from_bytes(body).episode_id
        return (500, {"Content-Type": "application/json"}, b'{"error": "internal_error"}') if episode_id in bad else ack(body)

    server = Hostile(answer)
    up = uploader(tmp_path, server.url)
    try:
        first, second = put(up, 0), put(up, 1)
        bad.update({first.episode_id, second.episode_id})
        good = [put(up, seed) for seed in range(2, 9)]
        up.start()
        deadline = time.monotonic() + 20
        while up.stats["created"] < len(good) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert up.stats["created"] == len(good) and {e.episode_id for e in up.spool.entries()} == bad, up.stats
    finally:
        up.stop()
        server.close()


def test_a_full_disk_on_the_server_is_never_blamed_on_the_episode(tmp_path):
    """507 insufficient_storage (the server's staging or store disk full) keeps the episode and waits Retry-After;
    before, the server answered 500 and after 8 tries, others accepted meanwhile, the episode was set aside for good."""
    full = {"on": True}

    def answer(method, path, body):
        if full["on"] and Episode.from_bytes(body).episode_id == big.episode_id:
            return 507, {"Content-Type": "application/json", "Retry-After": "0"}, b'{"error": "insufficient_storage", "reason": "disk full"}'
        return ack(body)

    server = Hostile(answer)
    up = uploader(tmp_path, server.url, max_attempts=2)
    try:
        big = put(up, 0)
        for seed in range(1, 6):
            put(up, seed)
        for _ in range(40):
            up.upload_once()
        assert up.stats["set_aside"] == 0 and up.stats["created"] == 5 and [e.episode_id for e in up.spool.entries()] == [big.episode_id]
        full["on"] = False
        assert up.upload_once() == "acked" and up.spool.depth == 0
    finally:
        server.close()


def test_a_full_spool_disk_evicts_the_oldest_and_never_stops_the_robot(tmp_path, monkeypatch):
    """The spool's disk filling before spool_max_bytes: agent.submit raised a bare OSError (the robot app exited), left
    a .partial file holding the space, and evicted nothing."""
    import errno

    from fleet.agent import spool as spool_module

    write, room = spool_module.write_durably, {"files": 3}

    def small_disk(path, data, tmp=None):  # a disk with room for three episodes
        if len(list(path.parent.glob("*.safetensors"))) >= room["files"]:
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])  # part of it written, then the disk is full
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            finally:
                tmp.unlink(missing_ok=True)  # what write_durably does on a failed write
        return write(path, data, tmp)

    monkeypatch.setattr(spool_module, "write_durably", small_disk)
    agent = RobotAgent(AgentConfig(server_url="http://127.0.0.1:9", spool_dir=str(tmp_path / "spool"), spool_max_bytes=1 << 30), "r0", token="t")
    episodes = [episode(seed) for seed in range(5)]
    assert all(agent.submit(e) for e in episodes)
    kept = [e.episode_id for e in agent.spool.entries()]
    assert kept == [e.episode_id for e in episodes[2:]] and agent.status()["evicted"] == 2 and not list((tmp_path / "spool" / "r0").glob("*.partial"))
    room["files"] = 0  # nothing left to evict once the spool is empty and the disk still full
    assert not agent.submit(episode(9)) and agent.status()["dropped"] == 1 and "spool's disk" in agent.status()["last_error"]
    assert agent.spool.depth == 0 and agent.status()["evicted"] == 5


def test_an_episode_evicted_while_its_upload_is_in_flight_then_acknowledged_is_not_counted_lost(tmp_path):
    """flywheel-robot episodes=20 with a small spool ended with created 4, evicted 19: episodes evicted mid-upload and
    then acknowledged were counted both as delivered and as lost."""
    first, second = episode(0), episode(1)

    def answer(method, path, body):
        if Episode.from_bytes(body).episode_id == first.episode_id:
            up.spool.put(second.to_bytes(), second.episode_id)  # the robot spools its next episode meanwhile: the spool evicts this one
        return ack(body)

    server = Hostile(answer)
    up = uploader(tmp_path, server.url, max_bytes=len(first.to_bytes()))  # room for one episode
    try:
        up.spool.put(first.to_bytes(), first.episode_id)
        assert up.upload_once() == "acked" and up.stats["created"] == 1
        assert up.spool.evicted == 0 and [e.episode_id for e in up.spool.entries()] == [second.episode_id]
        put(up, 2)  # an eviction with nothing in flight is a loss, as before
        assert up.spool.evicted == 1 and up.upload_once() == "acked" and up.spool.evicted == 1
    finally:
        server.close()


class TrickledHeaders:
    """A loopback server that answers every request with a status line, then one header byte every 0.1 s."""

    def __init__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        try:
            conn.recv(1 << 20)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not self.closed.is_set():
                conn.sendall(b"X")
                time.sleep(0.1)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.closed.set()
        self.sock.close()


def test_response_headers_trickled_a_byte_at_a_time_hold_an_upload_or_a_poll_for_a_bounded_time(tmp_path):
    """Each read had the client's timeout, and each trickled header byte restarted it: up to h11's 16 KiB of headers,
    ~4.5 h at a byte a second, held the robot's upload thread (or its policy poll) that long."""
    from tuf.api import exceptions as tuf_errors

    from fleet.registry.fetcher import TokenFetcher

    server = TrickledHeaders()
    up = uploader(tmp_path, server.url, request_timeout_s=1.0)
    try:
        put(up, 0)
        start = time.monotonic()
        assert up.upload_once() == "retry" and time.monotonic() - start < 5
        assert "response headers not finished" in up.last_error
        fetcher = TokenFetcher(httpx.Client(timeout=1.0), revalidate=set(), partial_dir=None, resume_prefix="", deadline_s=1.0)
        start = time.monotonic()
        with pytest.raises(tuf_errors.DownloadError, match="response headers not finished"):
            list(fetcher._fetch(f"{server.url}/v1/tuf/metadata/timestamp.json"))
        assert time.monotonic() - start < 5
    finally:
        up.stop(timeout=5)
        server.close()
