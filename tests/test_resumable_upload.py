"""Resumable uploads (docs/protocol.md, "Resumable uploads"): real servers on loopback over a real store,
the robot agent's uploader, nothing mocked. A camera episode over the old 64 MiB limit arrives bit-exact;
a transfer cut by a dropped connection, a server SIGKILL or a robot restart resumes from the acknowledged
offset without re-sending a byte the server acknowledged; every refusal answers in the JSON error shape."""

import dataclasses
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from fleet.agent import AgentConfig, RobotAgent
from fleet.agent.spool import Spool
from fleet.agent.uploader import Uploader
from fleet.server import ServerConfig, add_token, serve
from fleet.server.errors import ApiError
from fleet.server.runner import ServerProcess
from fleet.server.uploads import Staging, staging_dir
from fleet.store import StoreConfig
from sim.episode import Episode
from tests.conftest import make_episode_arrays

CHUNK = 16 * 1024
SMALL = {"max_body_bytes": 64 * 1024, "max_chunk_bytes": CHUNK, "max_episode_bytes": 4 << 20, "max_open_uploads": 2}
FAST = {"upload_rate_per_s": 1e6, "upload_burst": 10**6}


def tokens_for(path) -> dict:
    return {"r0": add_token(path, "robot", "r0"), "r1": add_token(path, "robot", "r1"), "operator": add_token(path, "operator")}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A server with small limits (64 KiB plain bodies, 16 KiB chunks, 4 MiB uploads, 2 open uploads per robot)."""
    root = tmp_path_factory.mktemp("resumable")
    tok = tokens_for(root / "tokens.json")
    handle = serve(ServerConfig(port=0, token_file=str(root / "tokens.json"), **SMALL, **FAST), StoreConfig(path=str(root / "store")))
    with httpx.Client(base_url=handle.url, timeout=30) as client:
        yield {"url": handle.url, "tok": tok, "client": client, "staging": root / "store.uploads"}
    handle.stop()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def episode(robot_id: str = "r0", steps: int = 4000, seed: int = 0) -> Episode:
    """A schema-1 episode of ~200 KiB (4000 steps): over the 64 KiB body limit, 13 chunks of 16 KiB."""
    return Episode.create(**make_episode_arrays(num_steps=steps, obs_dim=8, act_dim=4, seed=seed), robot_id=robot_id, robot_model="toy", source="real")


def camera_episode(robot_id: str, frames: int = 480) -> Episode:
    """Schema 1.1: 10 s of 20 Hz control and a 48 Hz raw-rgb8 320x240 camera on its own clock (480 frames: 105 MiB)."""
    steps, h, w = 200, 240, 320
    pixels = np.frombuffer(np.random.default_rng(1).bytes(frames * h * w * 3), np.uint8).reshape(frames, h, w, 3)  # incompressible, as sensor noise is
    arrays = make_episode_arrays(num_steps=steps, obs_dim=6, act_dim=2)
    arrays["timestamp"] = np.arange(steps + 1, dtype=np.float64) / 20
    return Episode.create(
        **arrays,
        robot_id=robot_id,
        robot_model="arm-cam",
        source="real",
        extras={"image.front": pixels, "image.front.timestamp": np.arange(frames, dtype=np.float64) / 48},
        cameras={"front": {"codec": "raw-rgb8", "width": w, "height": h, "rate_hz": 48}},
        control_rate_hz=20,
    )


def fetch(fleet, episode_id: str) -> httpx.Response:
    return fleet["client"].get(f"/v1/episodes/{episode_id}", headers=auth(fleet["tok"]["operator"]))


def create(fleet, body: bytes, who: str = "r0", **fields) -> httpx.Response:
    declared = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest(), **fields}
    return fleet["client"].post("/v1/uploads", json=declared, headers=auth(fleet["tok"][who]))


def put(fleet, upload_id: str, body: bytes, offset: int, who: str = "r0") -> httpx.Response:
    return fleet["client"].put(f"/v1/uploads/{upload_id}", content=body, headers={"Upload-Offset": str(offset), **auth(fleet["tok"][who])})


def call(fleet, method: str, upload_id: str, tail: str = "", who: str = "r0") -> httpx.Response:
    return fleet["client"].request(method, f"/v1/uploads/{upload_id}{tail}", headers=auth(fleet["tok"][who]))


def declared_refusal(url: str, token: str, length: int) -> bytes:
    """The answer's first bytes to POST /v1/episodes headers declaring ``length`` body bytes (no body sent)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/episodes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {length}\r\n\r\n".encode())
        return s.recv(4096)


def test_camera_episode_over_64_mib_arrives_through_the_agent_bit_exact(tmp_path):
    """The plain route's 64 MiB limit (default settings) refuses it; the agent sends it in 8 MiB chunks, zstd-framed."""
    tok = tokens_for(tmp_path / "tokens.json")
    handle = serve(ServerConfig(port=0, token_file=str(tmp_path / "tokens.json")), StoreConfig(path=str(tmp_path / "store"), chunk_rows=64))
    ep = camera_episode("r0")
    data = ep.to_bytes()
    assert len(data) > 100 << 20 and len(data) > ServerConfig().max_body_bytes
    assert declared_refusal(handle.url, tok["r0"], len(data)).startswith(b"HTTP/1.1 413")
    agent = RobotAgent(AgentConfig(server_url=handle.url, spool_dir=str(tmp_path / "spool"), backoff_initial_s=0.05), "r0", token=tok["r0"])
    try:
        with agent:
            agent.submit(ep)
            assert agent.wait_drained(60), agent.status()
        status = agent.status()
        assert (status["created"], status["rejected"], status["compressed"]) == (1, 0, 1)
        (tombstone,) = (tmp_path / "store.uploads" / "r0").glob("*.json")  # the completed upload: what was declared, no bytes left
        assert not list(tombstone.parent.glob("*.part")) and json.loads(tombstone.read_text())["episode_id"] == ep.episode_id
        assert status["sent_bytes"] == json.loads(tombstone.read_text())["size"] > 64 << 20  # each byte sent once
        back = httpx.get(f"{handle.url}/v1/episodes/{ep.episode_id}", headers=auth(tok["operator"]), timeout=60)
        assert back.status_code == 200 and back.content == data
    finally:
        handle.stop()


def test_agent_sends_an_episode_the_plain_route_refused_413_resumably(fleet, tmp_path):
    """Under its own threshold the agent POSTs; the 413 body_too_large sends it through /v1/uploads instead."""
    ep = episode(seed=1)
    cfg = AgentConfig(server_url=fleet["url"], spool_dir=str(tmp_path), resumable_threshold_bytes=1 << 30, backoff_initial_s=0.05)
    with RobotAgent(cfg, "r0", token=fleet["tok"]["r0"]) as agent:
        agent.submit(ep)
        assert agent.wait_drained(30), agent.status()
    assert agent.status()["created"] == 1 and fetch(fleet, ep.episode_id).content == ep.to_bytes()


def test_interrupted_transfer_resumes_from_the_acknowledged_offset(fleet):
    """Two chunks, then a connection drops mid-chunk: nothing of that chunk counts; the transfer goes on from
    the acknowledged offset, each byte sent once; a second complete answers as a duplicate upload."""
    data = episode(seed=2).to_bytes()
    started = create(fleet, data)
    assert started.status_code == 201 and started.json()["offset"] == 0 and started.json()["max_chunk_bytes"] == CHUNK
    uid = started.json()["upload_id"]
    assert started.headers["location"] == f"uploads/{uid}"  # relative: under a proxy's path prefix it resolves under the prefix too
    assert str(httpx.URL("https://fleet.example/flywheel/v1/uploads").join(started.headers["location"])) == f"https://fleet.example/flywheel/v1/uploads/{uid}"
    for offset in (0, CHUNK):
        assert put(fleet, uid, data[offset : offset + CHUNK], offset).json() == {"offset": offset + CHUNK}
    host, port = fleet["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # the link drops halfway through the third chunk
        s.sendall(f"PUT /v1/uploads/{uid} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {fleet['tok']['r0']}\r\nUpload-Offset: {2 * CHUNK}\r\nContent-Length: {CHUNK}\r\n\r\n".encode())
        s.sendall(data[2 * CHUNK : 2 * CHUNK + CHUNK // 2])
    time.sleep(0.2)
    head = call(fleet, "HEAD", uid)
    assert (head.status_code, head.headers["upload-offset"], head.headers["upload-length"]) == (200, str(2 * CHUNK), str(len(data)))
    stale = put(fleet, uid, data[:CHUNK], 0)  # a retry of an acknowledged chunk
    assert stale.status_code == 409 and stale.json()["error"] == "offset_mismatch" and stale.json()["offset"] == 2 * CHUNK
    offset = int(head.headers["upload-offset"])
    sent = 2 * CHUNK
    while offset < len(data):
        answer = put(fleet, uid, data[offset : offset + CHUNK], offset)
        sent += len(data[offset : offset + CHUNK])
        offset = answer.json()["offset"]
    assert sent == len(data)  # no acknowledged byte sent twice
    assert call(fleet, "GET", uid).json() | {"upload_id": None} == {
        "upload_id": None, "offset": len(data), "size": len(data), "content_encoding": "identity", "max_chunk_bytes": CHUNK, "completed": False, "episode_id": None,
    }  # fmt: skip
    done = call(fleet, "POST", uid, "/complete")
    assert done.status_code == 201 and done.json()["status"] == "created"
    again = call(fleet, "POST", uid, "/complete")
    assert (again.status_code, again.json()) == (200, {"episode_id": done.json()["episode_id"], "status": "duplicate"})
    assert fetch(fleet, done.json()["episode_id"]).content == data


def test_server_sigkill_between_chunks_keeps_every_acknowledged_byte(tmp_path):
    """An acknowledged chunk is on disk: after a SIGKILL and a restart the upload goes on from its offset."""
    tokens = tmp_path / "tokens.json"
    tok = tokens_for(tokens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    registry = [f"fleet.registry.{k}={v}" for k, v in {"dir": tmp_path / "registry", "online_key": tmp_path / "online.pem"}.items()]
    registry += [f"fleet.registry.root_keys=[{tmp_path / 'root.pem'}]", "fleet.registry.root_threshold=1", f"fleet.server.max_chunk_bytes={CHUNK}"]
    server = ServerProcess(StoreConfig(path=str(tmp_path / "store")), ServerConfig(port=port, token_file=str(tokens)), tmp_path / "server", registry)
    data = episode(seed=3).to_bytes()
    try:
        fleet = {"tok": tok, "client": httpx.Client(base_url=server.start(), timeout=30)}  # what the helpers above take
        uid = create(fleet, data).json()["upload_id"]
        for offset in (0, CHUNK):
            assert put(fleet, uid, data[offset : offset + CHUNK], offset).status_code == 200
        server.kill()
        server.start()
        offset = int(call(fleet, "HEAD", uid).headers["upload-offset"])
        assert offset == 2 * CHUNK
        while offset < len(data):
            offset = put(fleet, uid, data[offset : offset + CHUNK], offset).json()["offset"]
        done = call(fleet, "POST", uid, "/complete")
        assert done.status_code == 201, done.text
        assert fetch(fleet, done.json()["episode_id"]).content == data
    finally:
        server.kill()
        fleet["client"].close()


def test_a_restarted_robot_resumes_from_its_sidecar(tmp_path):
    """A robot stopped mid-transfer (here: its token's rate runs out after 3 chunks) keeps the upload id beside the
    spooled episode; restarted (against a restarted server on the same staging folder) it sends only the rest."""
    tokens = tmp_path / "tokens.json"
    tok = tokens_for(tokens)
    store = StoreConfig(path=str(tmp_path / "store"))
    slow = serve(ServerConfig(port=0, token_file=str(tokens), **SMALL, upload_rate_per_s=0.01, upload_burst=4), store)
    ep = episode(seed=4)
    cfg = AgentConfig(server_url=slow.url, spool_dir=str(tmp_path / "spool"), resumable_threshold_bytes=0, backoff_initial_s=0.05)
    try:
        first = RobotAgent(cfg, "r0", token=tok["r0"]).start()
        first.submit(ep)
        deadline = time.monotonic() + 30
        while "rate_limited" not in str(first.status()["last_error"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        first.stop()
        (sidecar,) = (tmp_path / "spool" / "r0").glob("*.upload.json")
        uid = json.loads(sidecar.read_text())["upload_id"]
    finally:
        slow.stop()
    handle = serve(ServerConfig(port=0, token_file=str(tokens), **SMALL, **FAST), store)
    try:
        with httpx.Client(base_url=handle.url, timeout=30) as client:
            progress = client.get(f"/v1/uploads/{uid}", headers=auth(tok["r0"])).json()
            assert progress["offset"] == 3 * CHUNK < progress["size"]
            with RobotAgent(dataclasses.replace(cfg, server_url=handle.url), "r0", token=tok["r0"]) as second:
                assert second.wait_drained(30), second.status()
            assert second.status()["created"] == 1 and second.status()["sent_bytes"] == progress["size"] - progress["offset"]
            assert client.get(f"/v1/episodes/{ep.episode_id}", headers=auth(tok["operator"])).content == ep.to_bytes()
        assert not sidecar.exists()
    finally:
        handle.stop()


def test_a_forgotten_upload_id_starts_a_new_upload(fleet, tmp_path):
    """The sidecar names an upload the server no longer has (here: aborted): a new one carries the whole episode."""
    data = episode(seed=5).to_bytes()
    uid = create(fleet, data).json()["upload_id"]
    assert call(fleet, "DELETE", uid).status_code == 204 and call(fleet, "HEAD", uid).status_code == 404
    spool = Spool(tmp_path, 1 << 30)
    entry = spool.put(data, Episode.from_bytes(data).episode_id)
    spool.remember_upload(entry, {"upload_id": uid, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "content_encoding": "identity"})
    uploader = Uploader(spool, fleet["url"], fleet["tok"]["r0"], compress=False, resumable_threshold_bytes=0)
    try:
        assert uploader.upload_once() == "acked"
    finally:
        uploader.stop()
    assert uploader.stats["sent_bytes"] == len(data) and fetch(fleet, entry.episode_id).content == data


def test_wrong_digest_is_refused_and_nothing_is_stored(fleet):
    ep = episode(seed=6)
    data = ep.to_bytes()
    uid = create(fleet, data[::-1]).json()["upload_id"]  # declares the digest of other bytes of the same length
    for offset in range(0, len(data), CHUNK):
        assert put(fleet, uid, data[offset : offset + CHUNK], offset).status_code == 200
    refused = call(fleet, "POST", uid, "/complete")
    assert refused.status_code == 400 and refused.json()["error"] == "digest_mismatch" and refused.json()["field"] == "sha256"
    assert refused.json()["offset"] == 0 and "send it again from offset 0" in refused.json()["reason"]
    assert call(fleet, "HEAD", uid).headers["upload-offset"] == "0"  # kept, reset: the robot may send it again
    assert fetch(fleet, ep.episode_id).status_code == 404
    assert call(fleet, "DELETE", uid).status_code == 204


def test_concurrent_completes_of_one_upload_create_it_once(fleet):
    """A robot whose complete timed out retries while the first still runs: one 201, the others 200 duplicate
    (they once shared a temporary file name and answered 500)."""
    ep = episode(seed=8)
    data = ep.to_bytes()
    uid = create(fleet, data).json()["upload_id"]
    for offset in range(0, len(data), CHUNK):
        assert put(fleet, uid, data[offset : offset + CHUNK], offset).status_code == 200
    answers = []

    def complete():
        with httpx.Client(base_url=fleet["url"], timeout=30) as client:
            r = client.post(f"/v1/uploads/{uid}/complete", headers=auth(fleet["tok"]["r0"]))
            answers.append((r.status_code, r.json().get("status")))

    threads = [threading.Thread(target=complete) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [(200, "duplicate")] * 3 + [(201, "created")], answers
    assert fetch(fleet, ep.episode_id).content == data


@pytest.mark.parametrize("coding", ["identity", "zstd"])
def test_completes_share_one_memory_budget_and_the_one_beyond_it_is_completed_again(fleet, monkeypatch, coding):
    """A complete holds ~3x its episode (the body, the arrays, their encoding): N robots completing 4 GiB episodes at once
    held N x 12 GiB with nothing to push back. The completes share what one max_episode_bytes complete takes (3 x 4 MiB
    here): r1's 2.3 MiB episode does not fit beside r0's, gets 503 completing_busy, its upload kept, and completes
    once r0's has. Sent zstd-compressed (what the robot's agent does), it counts at its decoded size, not the few KiB
    staged (a second reader's finding: four 3.5 MiB episodes staged as 49 KiB each went in at once)."""
    import zstandard

    from fleet.server.uploads import Staging

    first, sent = episode("r0", steps=48_000, seed=21 + 10 * (coding == "zstd")), episode("r1", steps=48_000, seed=22 + 10 * (coding == "zstd"))
    if coding == "zstd":  # a quiet sensor: it compresses to almost nothing
        sent = Episode.create(**{**make_episode_arrays(num_steps=48_000, obs_dim=8, act_dim=4, seed=32), "observation": np.zeros((48_001, 8), np.float32)},
                              robot_id="r1", robot_model="toy", source="real")  # fmt: skip
    uploads = {}
    for who, ep in (("r0", first), ("r1", sent)):
        data = ep.to_bytes()
        assert 2 << 20 < len(data) <= SMALL["max_episode_bytes"]  # two of them are over the budget together
        if who == "r1" and coding == "zstd":
            data = zstandard.ZstdCompressor().compress(data)
            assert 3 * len(data) < (12 << 20) - 3 * len(first.to_bytes())  # staged, it would fit
            uploads[who] = uid = create(fleet, data, who, content_encoding="zstd").json()["upload_id"]
        else:
            uploads[who] = uid = create(fleet, data, who).json()["upload_id"]
        for offset in range(0, len(data), CHUNK):
            assert put(fleet, uid, data[offset : offset + CHUNK], offset, who).status_code == 200
    reading, go = threading.Event(), threading.Event()
    read_whole = Staging.read_whole

    def held_up(self, upload):
        if upload.robot_id == "r0":
            reading.set()
            go.wait(30)
        return read_whole(self, upload)

    monkeypatch.setattr(Staging, "read_whole", held_up)
    answers = {}
    r0 = threading.Thread(target=lambda: answers.setdefault("r0", call(fleet, "post", uploads["r0"], "/complete", "r0")))
    r0.start()
    assert reading.wait(30)  # r0's complete holds its share of the budget
    busy = call(fleet, "post", uploads["r1"], "/complete", "r1")
    assert (busy.status_code, busy.json()["error"], busy.headers["retry-after"]) == (503, "completing_busy", "1"), busy.text
    go.set()
    r0.join(30)
    assert answers["r0"].status_code == 201, answers["r0"].text
    again = call(fleet, "post", uploads["r1"], "/complete", "r1")  # the upload was kept: completed, nothing sent again
    assert again.status_code == 201 and fetch(fleet, sent.episode_id).content == sent.to_bytes(), again.text


def test_a_complete_that_loses_the_race_to_another_replica_answers_duplicate(fleet, monkeypatch):
    """Replica B read the upload's record, then replica C completed it and deleted its bytes before B read them:
    B answered 404 no_such_upload for an episode that was stored, and the robot sent it all again."""
    ep = episode(seed=9)
    data = ep.to_bytes()
    uid = create(fleet, data).json()["upload_id"]
    for offset in range(0, len(data), CHUNK):
        assert put(fleet, uid, data[offset : offset + CHUNK], offset).status_code == 200
    read_whole = Staging.read_whole

    def other_replica_first(self, upload):  # the other replica's whole complete happens here, between the two reads
        with httpx.Client(base_url=fleet["url"], timeout=30) as client:
            monkeypatch.setattr(Staging, "read_whole", read_whole)
            assert client.post(f"/v1/uploads/{uid}/complete", headers=auth(fleet["tok"]["r0"])).status_code == 201
        return read_whole(self, upload)

    monkeypatch.setattr(Staging, "read_whole", other_replica_first)
    with httpx.Client(base_url=fleet["url"], timeout=60) as client:  # the test's own thread waits on the replica's answer
        answer = threading.Thread(target=lambda: answers.append(client.post(f"/v1/uploads/{uid}/complete", headers=auth(fleet["tok"]["r0"]))))
        answers: list = []
        answer.start()
        answer.join(60)
    assert (answers[0].status_code, answers[0].json()) == (200, {"episode_id": ep.episode_id, "status": "duplicate"}), answers[0].text
    assert fetch(fleet, ep.episode_id).content == data
    before = duplicates_counted(fleet)
    again = fleet["client"].post(f"/v1/uploads/{uid}/complete", headers=auth(fleet["tok"]["r0"]))  # answered from the tombstone
    assert again.json()["status"] == "duplicate" and duplicates_counted(fleet) == before + 1  # once uncounted


def duplicates_counted(fleet) -> float:
    text = fleet["client"].get("/metrics", headers=auth(fleet["tok"]["operator"])).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith('flywheel_uploads_total{status="duplicate"}'))


def test_an_invalid_episode_is_refused_at_complete_like_a_plain_upload(fleet):
    """Complete runs the episode route's validation: the same refusal, nothing stored, the upload removed."""
    bad = episode("r1", seed=7).to_bytes()  # r1's episode, uploaded with r0's token
    uid = create(fleet, bad).json()["upload_id"]
    for offset in range(0, len(bad), CHUNK):
        put(fleet, uid, bad[offset : offset + CHUNK], offset)
    refused = call(fleet, "POST", uid, "/complete")
    assert (refused.status_code, refused.json()["error"], refused.json()["field"]) == (403, "robot_id_mismatch", "robot_id")
    assert call(fleet, "HEAD", uid).status_code == 404
    assert fetch(fleet, Episode.from_bytes(bad).episode_id).status_code == 404


def test_another_robot_cannot_see_touch_or_complete_an_upload(fleet):
    """Another robot gets the answer an id that never existed gets (nothing leaks); other roles are refused."""
    data = episode(seed=8).to_bytes()
    uid = create(fleet, data).json()["upload_id"]
    mine = call(fleet, "GET", uid).json()
    never = "A" * 32
    for method, tail in (("HEAD", ""), ("GET", ""), ("DELETE", ""), ("POST", "/complete")):
        theirs, unknown = call(fleet, method, uid, tail, who="r1"), call(fleet, method, never, tail, who="r1")
        assert theirs.status_code == unknown.status_code == 404, (method, theirs.text)
        assert theirs.content == unknown.content.replace(never.encode(), uid.encode())
    assert put(fleet, uid, data[:CHUNK], 0, who="r1").status_code == 404
    assert call(fleet, "GET", uid, who="operator").status_code == 403 and fleet["client"].get(f"/v1/uploads/{uid}").status_code == 401
    assert call(fleet, "GET", uid).json() == mine  # untouched
    assert call(fleet, "DELETE", uid).status_code == 204


def raw_request(url: str, head: str) -> tuple[int, dict | None]:
    """Send a hand-written request (no client-side path normalisation); the status and JSON body (None: no body) of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ")[1]), json.loads(body) if body else None


@pytest.mark.parametrize("bad_id", ["..", ".", "....", "%2e%2e", "..%5c..%5cetc", "A" * 31, "A" * 33, "x" * 31 + ".", "x" * 31 + "%00"])
@pytest.mark.parametrize("method, tail", [("GET", ""), ("HEAD", ""), ("PUT", ""), ("DELETE", ""), ("POST", "/complete")])
def test_malformed_upload_ids_are_refused_before_any_file_is_touched(fleet, bad_id, method, tail):
    head = f"{method} /v1/uploads/{bad_id}{tail} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {fleet['tok']['r0']}\r\nUpload-Offset: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    status, body = raw_request(fleet["url"], head)
    assert status == 400 and (method == "HEAD" or (body["error"], body["field"]) == ("bad_upload_id", "upload_id")), body


@pytest.mark.parametrize(
    "declared, status, error, field",
    [
        ({"size": 5 << 20}, 413, "episode_too_large", "size"),
        ({"size": 0}, 400, "bad_upload", "size"),
        ({"size": "10"}, 400, "bad_upload", "size"),
        ({"size": True}, 400, "bad_upload", "size"),
        ({"sha256": "xyz"}, 400, "bad_upload", "sha256"),
        ({"content_encoding": "gzip"}, 415, "unsupported_content_encoding", "content_encoding"),
        ({"offset": 3}, 400, "bad_upload", "offset"),
    ],
)
def test_bad_create_requests_name_their_field(fleet, declared, status, error, field):
    answer = fleet["client"].post("/v1/uploads", json={"size": 100, "sha256": "0" * 64} | declared, headers=auth(fleet["tok"]["r0"]))
    assert (answer.status_code, answer.json()["error"], answer.json()["field"]) == (status, error, field), answer.text
    assert answer.json()["reason"]


def test_chunk_and_create_refusals(fleet):
    """Not JSON; a chunk over max_chunk_bytes, past the declared size, or without Upload-Offset; too many open
    uploads (429); creating the same bytes twice resumes the first upload."""
    r0 = auth(fleet["tok"]["r0"])
    for raw in (b"{not json", b"[" * 2048 + b"]" * 2048, b'["size", 100]', b"\xff\xfe", b'{"size": 10, "sha256": "%s", "size": 7412}' % (b"0" * 64)):
        answer = fleet["client"].post("/v1/uploads", content=raw, headers=r0)
        assert (answer.status_code, answer.json()["error"], answer.json()["field"]) == (400, "bad_upload", "body"), raw[:20]
    too_long = fleet["client"].post("/v1/uploads", content=b" " * 5000, headers=r0)
    assert (too_long.status_code, too_long.json()["error"]) == (413, "body_too_large")
    data = b"\1" * 100
    uid = create(fleet, data).json()["upload_id"]
    assert (put(fleet, uid, b"\0" * (CHUNK + 1), 0).status_code, put(fleet, uid, b"\0" * (CHUNK + 1), 0).json()["error"]) == (413, "chunk_too_large")
    past = put(fleet, uid, b"\0" * 101, 0)
    assert (past.status_code, past.json()["error"], past.json()["offset"]) == (400, "chunk_past_size", 0)
    no_offset = fleet["client"].put(f"/v1/uploads/{uid}", content=b"x", headers=r0)
    assert (no_offset.status_code, no_offset.json()["error"]) == (400, "bad_upload_offset")
    assert "header is missing" in no_offset.json()["reason"] and "None" not in no_offset.json()["reason"]  # once "got 'None'"
    bad_offset = fleet["client"].put(f"/v1/uploads/{uid}", content=b"x", headers={**r0, "Upload-Offset": "-1"})
    assert (bad_offset.status_code, bad_offset.json()["error"]) == (400, "bad_upload_offset") and "got '-1'" in bad_offset.json()["reason"]
    assert put(fleet, uid, data[:40], 0).json()["offset"] == 40
    again = create(fleet, data)  # the answer to create was lost, the robot asks again
    assert (again.status_code, again.json()["upload_id"], again.json()["offset"]) == (200, uid, 40)
    early = call(fleet, "POST", uid, "/complete")
    assert (early.status_code, early.json()["error"], early.json()["offset"]) == (409, "upload_incomplete", 40)
    other = create(fleet, b"\2" * 100)
    assert other.status_code == 201  # the second open upload of r0: the most allowed here
    full = create(fleet, b"\3" * 100)
    assert full.status_code == 429 and full.json()["error"] == "too_many_open_uploads" and full.headers["retry-after"]
    for upload_id in (uid, other.json()["upload_id"]):
        assert call(fleet, "DELETE", upload_id).status_code == 204
    assert create(fleet, b"\3" * 100).status_code == 201


def test_staged_uploads_expire_after_the_ttl(tmp_path):
    """Untouched for upload_ttl_s: gone (404 for its robot, files removed) and no longer counted against max_open_uploads."""
    staging = Staging(tmp_path / "uploads", ttl_s=3600, max_open=1)
    upload, _, _ = staging.create("r0", 10, "0" * 64, "identity")
    assert staging.append(upload, 0, b"12345") == 5

    def age(seconds: float) -> None:
        for path in (tmp_path / "uploads" / "r0").iterdir():
            os.utime(path, (time.time() - seconds,) * 2)

    age(1800)
    assert staging.get("r0", upload.upload_id) == upload
    age(3601)
    assert staging.sweep() == 1 and not list((tmp_path / "uploads" / "r0").iterdir())
    with pytest.raises(ApiError, match="no upload"):
        staging.get("r0", upload.upload_id)
    kept, _, _ = staging.create("r0", 10, "1" * 64, "identity")
    age(3601)  # expired, not swept yet: a create finds it gone (lazily) and is not refused for it
    fresh, _, _ = staging.create("r0", 10, "2" * 64, "identity")
    assert staging.get("r0", fresh.upload_id) == fresh and not (tmp_path / "uploads" / "r0" / f"{kept.upload_id}.json").exists()


def test_default_staging_folder():
    """Beside a local store; beside the token file for an s3:// store; upload_dir when set."""
    assert staging_dir(ServerConfig(), "runs/fleet/store/") == Path("runs/fleet/store.uploads")
    assert staging_dir(ServerConfig(token_file="/srv/fleet/tokens.json"), "s3://bucket/prefix") == Path("/srv/fleet/uploads")
    assert staging_dir(ServerConfig(upload_dir="/data/uploads"), "s3://bucket/prefix") == Path("/data/uploads")
