"""flywheel-server on loopback over a real store (on disk, and in S3-compatible object storage):
auth, every kind of bad upload refused with its reason (and nothing stored), good uploads never
refused, idempotency, listing, metrics."""

import json
import re
import socket
import struct
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
import safetensors.numpy
from prometheus_client.parser import text_string_to_metric_families

from fleet.server import ServerConfig, add_token, serve
from fleet.server.auth import TokenRegistry
from fleet.server.errors import ApiError
from fleet.store import EpisodeStore, StoreConfig
from sim.batched import BatchedStepper
from sim.episode import Episode
from sim.policy_fn import random_policy
from sim.scenario import ScenarioSpec
from tests.conftest import make_episode_arrays, tampered_bytes

LIMIT = 256 * 1024


@pytest.fixture(scope="module", params=["disk", "s3"])
def fleet(request, tmp_path_factory):
    """The server over a store on local disk, and over one in S3-compatible object storage (a real
    S3 server on loopback: every test of this module runs against both)."""
    root = tmp_path_factory.mktemp("server")
    tokens = root / "tokens.json"
    tok = {
        "r0": add_token(tokens, "robot", "r0"),
        "r1": add_token(tokens, "robot", "r1"),
        "operator": add_token(tokens, "operator"),
        "publisher": add_token(tokens, "publisher"),
    }
    where = str(root / "store") if request.param == "disk" else f"s3://fleet/server-{uuid.uuid4().hex}"
    if request.param == "s3":
        request.getfixturevalue("s3_server")
    store_cfg = StoreConfig(path=where, chunk_rows=256, index_rows=8)
    # 16 uploads of one token in flight: a test below sends 9 at once (test_upload_limits_answer_429 checks the limit)
    handle = serve(ServerConfig(port=0, token_file=str(tokens), max_body_bytes=LIMIT, max_concurrent_uploads=16), store_cfg)
    client = httpx.Client(base_url=handle.url, timeout=30)
    yield {"url": handle.url, "tok": tok, "client": client, "store_cfg": store_cfg}
    client.close()
    handle.stop()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def post(fleet, body: bytes, who: str = "r0", **kw) -> httpx.Response:
    return fleet["client"].post("/v1/episodes", content=body, headers=auth(fleet["tok"][who]), **kw)


def make(robot_id: str = "r0", steps: int = 5, seed: int = 0, **kw) -> Episode:
    return Episode.create(**make_episode_arrays(num_steps=steps, seed=seed), robot_id=robot_id, robot_model="toy", source="sim", **kw)


def stored_count(fleet) -> int:
    return fleet["client"].get("/v1/episodes", headers=auth(fleet["tok"]["operator"])).json()["total"]


def raw(drop=(), arrays=None, meta=None) -> bytes:
    return tampered_bytes(make(seed=7), arrays, meta, drop)


def framed(header: bytes) -> bytes:
    """A safetensors file with this header and no tensor data."""
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def _valid() -> bytes:
    return make(seed=3).to_bytes()


BAD = {
    # name: (body, status, error, field)
    "pickle": (b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94", 400, "not_safetensors", "<header>"),
    "tiny": (b"abc", 400, "not_safetensors", "<file>"),
    "header_not_json": (struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 8, 400, "bad_header", "<header>"),
    "header_not_object": (struct.pack("<Q", 8) + b"[1,2,3] ", 400, "bad_header", "<header>"),
    "truncated_body": (_valid()[:-4], 400, "size_mismatch", None),
    "trailing_bytes": (_valid() + b"\0" * 8, 400, "size_mismatch", "<file>"),
    "missing_array": (raw(drop=["reward"]), 422, "missing_array", "reward"),
    "extra_array": (raw(arrays={"foo": np.zeros(5, np.float32)}), 422, "unknown_array", "foo"),
    "misshaped": (raw(arrays={"reward": np.zeros(4, np.float32)}), 422, "bad_shape", "reward"),
    "wrong_ndim": (raw(arrays={"action": np.zeros((5, 2, 1), np.float32)}), 422, "bad_shape", "action"),
    "wrong_dtype": (raw(arrays={"action": np.zeros((5, 2), np.float64)}), 422, "bad_dtype", "action"),
    "nan": (raw(arrays={"observation": np.full((6, 3), np.nan, np.float32)}), 422, "non_finite", "observation"),
    "inf": (raw(arrays={"reward": np.array([0, 1, np.inf, 0, 0], np.float32)}), 422, "non_finite", "reward"),
    "timestamps": (raw(arrays={"timestamp": np.array([0, 1, 1, 2, 3, 4], np.float64)}), 422, "non_increasing_timestamp", "timestamp"),
    "schema_version": (raw(meta={"schema_version": "2"}), 422, "unknown_schema_version", "schema_version"),
    "missing_metadata": (raw(drop=["robot_model"]), 422, "missing_metadata", "robot_model"),
    "bad_source": (raw(meta={"source": "mars"}), 422, "bad_metadata", "source"),
    "bad_episode_id": (raw(meta={"episode_id": "not-a-uuid"}), 422, "bad_metadata", "episode_id"),
    "other_robot": (make("r1").to_bytes(), 403, "robot_id_mismatch", "robot_id"),
    # hostile headers that once answered 500: nesting past the JSON parser's recursion limit, and a
    # shape whose element count wraps int64 (and one whose empty product hides an axis numpy cannot hold)
    "deep_header": (framed(b"[" * 50_000 + b"]" * 50_000), 400, "bad_header", "<header>"),
    "deep_metadata": (raw(meta={"hardware": "[" * 50_000 + "]" * 50_000}), 422, "bad_metadata", "hardware"),
    "wrapping_shape": (framed(b'{"reward":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}'), 400, "size_mismatch", "reward"),
    "huge_empty_shape": (framed(b'{"reward":{"dtype":"F32","shape":[0,4611686018427387904],"data_offsets":[0,0]}}'), 400, "bad_header", "reward"),
    # found by a review: integers past Python's digit limit (a 500), text the store cannot encode (a failed group commit
    # for every upload in it), several spellings of one id (stored once each), control characters bound for logs
    "huge_int_header": (framed(b'{"reward":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,0]}}'), 400, "bad_header", "<header>"),
    "huge_int_metadata": (raw(meta={"hardware": '{"a": ' + "9" * 5000 + "}"}), 422, "bad_metadata", "hardware"),
    "lone_surrogate": (raw(meta={"policy_version": "\ud800"}), 422, "bad_metadata", "policy_version"),
    "lone_surrogate_in_json": (raw(meta={"scenario": '{"a": "\ud800"}'}), 422, "bad_metadata", "scenario"),
    "control_character": (raw(meta={"robot_model": "toy\x1b[31m"}), 422, "bad_metadata", "robot_model"),
    "uppercase_episode_id": (raw(meta={"episode_id": "ABCDEF00-0000-4000-8000-00000000ABCD"}), 422, "bad_metadata", "episode_id"),
    "braced_episode_id": (raw(meta={"episode_id": "{abcdef00-0000-4000-8000-00000000abcd}"}), 422, "bad_metadata", "episode_id"),
    # a number past a double's range: Python read it as inf (and wrote it back out as Infinity), where NaN is refused
    "overflowing_number_metadata": (raw(meta={"hardware": '{"motor_gain": 1e999}'}), 422, "bad_metadata", "hardware"),
    "overflowing_number_header": (framed(b'{"__metadata__":{},"reward":{"dtype":"F32","shape":[-1e999],"data_offsets":[0,0]}}'), 400, "bad_header", "<header>"),
    # the id of every robot whose id field is unset (zeroed or all ones): each later episode would be a 409 for good
    "nil_episode_id": (raw(meta={"episode_id": "00000000-0000-0000-0000-000000000000"}), 422, "bad_metadata", "episode_id"),
    "max_episode_id": (raw(meta={"episode_id": "ffffffff-ffff-ffff-ffff-ffffffffffff"}), 422, "bad_metadata", "episode_id"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_upload_is_refused_with_its_reason_and_nothing_is_stored(fleet, name):
    body, status, error, field = BAD[name]
    before = stored_count(fleet)
    r = post(fleet, body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error and r.json()["reason"]
    if field is not None:
        assert r.json()["field"] == field
    assert stored_count(fleet) == before


def test_body_over_the_limit_is_refused_before_it_is_read(fleet):
    r = post(fleet, b"\0" * (LIMIT + 1))
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    # a declared size over the limit is answered at once, without sending any body
    host, port = fleet["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            f"POST /v1/episodes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {fleet['tok']['r0']}\r\n"
            f"Content-Length: {10**12}\r\n\r\n".encode()
        )
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    # a chunked body (no Content-Length) is cut off once it passes the limit
    chunks = (b"\0" * 65536 for _ in range(8))  # 512 KiB: small enough to sit in socket buffers
    r = post(fleet, chunks)
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_auth_roles(fleet):
    c, body = fleet["client"], make(seed=11).to_bytes()
    assert c.post("/v1/episodes", content=body).status_code == 401
    assert c.post("/v1/episodes", content=body, headers=auth("made-up")).status_code == 401
    for role, article in (("operator", "an"), ("publisher", "a")):
        r = post(fleet, body, who=role)
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert r.json()["reason"] == f"this call needs a robot token, got {article} {role} token"
    refused = c.get("/v1/episodes", headers=auth(fleet["tok"]["r0"]))
    assert refused.status_code == 403 and refused.json()["reason"] == "this call needs an operator token, got a robot token"
    assert c.get("/metrics").status_code == 401
    assert c.get("/healthz").json()["status"] == "ok"


def test_idempotent_upload(fleet):
    ep = make(seed=21)
    assert post(fleet, ep.to_bytes()).status_code == 201
    r = post(fleet, ep.to_bytes())
    assert r.status_code == 200 and r.json()["status"] == "duplicate"
    other = Episode.create(**make_episode_arrays(seed=22), robot_id="r0", robot_model="toy", source="sim", episode_id=ep.episode_id)
    r = post(fleet, other.to_bytes())
    assert r.status_code == 409 and r.json()["error"] == "episode_id_conflict"


def test_episode_ids_are_fleet_wide_and_the_refusals_say_how_to_make_them_without_naming_another_robot(fleet):
    """A zero-initialised id was stored for the first robot that sent it, and every other episode under it was a 409,
    which robots set aside for good. An id another robot took first (a predictable uuid5, as docs/protocol.md once
    advised: any robot token could squat a robot's next ids) was answered as if the victim had reused its own id; the
    reason now says another robot's episode holds it, never which robot, and what to do."""
    nil = post(fleet, raw(meta={"episode_id": "00000000-0000-0000-0000-000000000000"}))
    assert (nil.status_code, nil.json()["error"], nil.json()["field"]) == (422, "bad_metadata", "episode_id")
    assert "nil UUID" in nil.json()["reason"] and "unique across the whole fleet" in nil.json()["reason"] and "uuid4" in nil.json()["reason"]
    predictable = str(uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, f"robots-{uuid.uuid4()}/r1"), "1"))  # the old advice; fresh per store
    assert post(fleet, make("r0", seed=25, episode_id=predictable).to_bytes()).status_code == 201  # r0's token takes r1's next id
    squatted = post(fleet, make("r1", seed=26, episode_id=predictable).to_bytes(), who="r1")
    assert (squatted.status_code, squatted.json()["error"], squatted.json()["field"]) == (409, "episode_id_conflict", "episode_id")
    reason = squatted.json()["reason"]
    assert "taken by another robot's episode" in reason and "no reuse by this robot" in reason and "new random uuid4" in reason
    assert "token" in reason and "r0" not in reason.replace(predictable, "") and "reused" not in reason
    changed = post(fleet, make("r0", seed=27, episode_id=predictable).to_bytes())  # the robot that stored it, other content
    assert changed.status_code == 409 and "the id was reused" in changed.json()["reason"] and "unique across the whole fleet" in changed.json()["reason"]


def test_concurrent_duplicates_are_stored_once(fleet):
    ep = make(seed=31, steps=50)
    other = Episode.create(**make_episode_arrays(seed=32), robot_id="r0", robot_model="toy", source="sim", episode_id=ep.episode_id)
    codes, barrier = [], threading.Barrier(9)

    def send(body):
        with httpx.Client(base_url=fleet["url"], timeout=30) as c:
            barrier.wait()
            codes.append(c.post("/v1/episodes", content=body, headers=auth(fleet["tok"]["r0"])).status_code)

    threads = [threading.Thread(target=send, args=(ep.to_bytes(),)) for _ in range(8)] + [threading.Thread(target=send, args=(other.to_bytes(),))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # whichever content commits first wins: 8 identical copies give one 201 and 200s, the other bytes 409
    assert sorted(codes) in ([200] * 7 + [201, 409], [201] + [409] * 8)
    listed = fleet["client"].get("/v1/episodes", params={"robot_id": "r0", "limit": 1000}, headers=auth(fleet["tok"]["operator"])).json()
    assert [e["episode_id"] for e in listed["episodes"]].count(ep.episode_id) == 1


def good_episodes() -> list[Episode]:
    rng = np.random.default_rng(5)
    out = [
        make(steps=1, seed=41),
        make(steps=700, seed=42, hardware={"motor": "m2", "mass": 1.5}, calibration={"offset": [0.1, 0.2]}, **{"x.site": "lab-3"}),
        Episode.create(
            **make_episode_arrays(num_steps=30, seed=43),
            robot_id="r0",
            robot_model="toy-cam",
            source="real",
            extras={
                "image.front": rng.integers(0, 256, (31, 8, 8, 3), dtype=np.uint8),
                "intervention": rng.random(30) > 0.5,
                "contact_force": rng.standard_normal((30, 4)),
            },
        ),
        Episode.create(
            **make_episode_arrays(num_steps=9, seed=44), robot_id="r0", robot_model="toy", source="worldmodel", model_version="wm-3"
        ),
    ]
    with BatchedStepper("pendulum", 2, robot_id="r0", source="sim") as stepper:
        out += stepper.simulate([ScenarioSpec(robot="pendulum", seed=s, max_steps=40) for s in range(2)], random_policy(1, seed=0))
    return out


def test_good_uploads_are_never_refused_and_read_back_bit_exact(fleet):
    op = auth(fleet["tok"]["operator"])
    for ep in good_episodes():
        r = post(fleet, ep.to_bytes())
        assert r.status_code == 201, r.text
        back = fleet["client"].get(f"/v1/episodes/{ep.episode_id}", headers=op)
        assert back.status_code == 200 and back.content == ep.to_bytes()
    # the safetensors library's own (non-canonical) encoding of a valid episode is fine too
    ep = make(seed=51)
    body = safetensors.numpy.save(ep.arrays(), metadata=ep.metadata)
    assert post(fleet, body).status_code == 201
    assert Episode.from_bytes(fleet["client"].get(f"/v1/episodes/{ep.episode_id}", headers=op).content).equals(ep)
    assert fleet["client"].get(f"/v1/episodes/{uuid.uuid4()}", headers=op).status_code == 404


def test_listing_filters_and_metrics(fleet):
    op = auth(fleet["tok"]["operator"])
    ep = make("r1", seed=61)
    assert post(fleet, ep.to_bytes(), who="r1").status_code == 201
    listed = fleet["client"].get("/v1/episodes", params={"robot_id": "r1"}, headers=op).json()
    assert [e["episode_id"] for e in listed["episodes"]] == [ep.episode_id] and listed["snapshot_id"]
    assert fleet["client"].get("/v1/episodes", params={"limit": 0}, headers=op).status_code == 400
    response = fleet["client"].get("/metrics", headers=op)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}  # a Prometheus parser reads it
    samples = [sample for family in families.values() for sample in family.samples]
    value = lambda name, **labels: next(s.value for s in samples if s.name == name and s.labels == labels)  # noqa: E731
    assert value("flywheel_uploads_total", status="created") >= 1 and value("flywheel_upload_latency_seconds_count") >= 1
    assert value("flywheel_rejections_total", reason="unauthorized") >= 1 and "flywheel_commits" in families
    assert all(f.documentation for f in families.values())  # HELP text on every metric
    assert value("process_resident_memory_bytes") > 0  # the process collector
    # per route, by template (an episode id in the path does not make a new series)
    assert value("flywheel_http_requests_total", method="POST", route="/v1/episodes", status="201") >= 1
    assert value("flywheel_http_requests_total", method="GET", route="/v1/episodes", status="400") >= 1
    # every upload counted: stored episodes match the store itself
    snap = EpisodeStore.open(fleet["store_cfg"]).snapshot()
    assert value("flywheel_store_episodes") == len(snap)


def test_a_listed_episode_has_the_fields_protocol_md_documents_with_null_where_absent(fleet):
    """protocol.md named no EpisodeInfo field and store.md said an absent model_version or task is "": a typed client (a Go
    struct, serde) written from them failed on the nulls the API sends (and on slot, row, stream, frames)."""
    import dataclasses
    import hashlib
    import re
    from pathlib import Path

    from fleet.store.catalog import EpisodeInfo

    plain, v1_1 = make(seed=71), make(seed=72, task="pick the cup", control_rate_hz=20, model_version="wm-1")
    for ep in (plain, v1_1):
        assert post(fleet, ep.to_bytes()).status_code == 201
    listed = fleet["client"].get("/v1/episodes", params={"robot_id": "r0", "limit": 1000}, headers=auth(fleet["tok"]["operator"])).json()["episodes"]
    items = [next(e for e in listed if e["episode_id"] == ep.episode_id) for ep in (plain, v1_1)]
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    section = doc.split("### EpisodeInfo", 1)[1].split("\n### ", 1)[0]
    rows = {m[0]: (m[1], m[2]) for m in re.findall(r"^\| `(\w+)` \| (\w+) \| (yes|no) \|", section, re.M)}
    assert set(rows) == {f.name for f in dataclasses.fields(EpisodeInfo)} == set(items[0]) == set(items[1])
    assert {name for name, (_, nullable) in rows.items() if nullable == "yes"} == {f.name for f in dataclasses.fields(EpisodeInfo) if "None" in str(f.type)}
    kinds = {"string": str, "integer": int, "number": (int, float), "array": list}
    for item in items:
        for name, value in item.items():
            assert (value is None and rows[name][1] == "yes") or (isinstance(value, kinds[rows[name][0]]) and not isinstance(value, bool)), (name, value)
    assert (items[0]["model_version"], items[0]["task"], items[0]["control_rate_hz"], items[0]["frames"]) == (None, None, None, [])
    assert (items[1]["model_version"], items[1]["task"], items[1]["control_rate_hz"], items[1]["schema_version"]) == ("wm-1", "pick the cup", 20.0, "1.1")
    assert items[0]["schema_version"] == "1" and items[0]["digest"] == hashlib.sha256(plain.to_bytes()).hexdigest()
    # since <= upload_time < until, as documented (it said both were inclusive)
    at = items[0]["upload_time"]
    ids = lambda **window: [e["episode_id"] for e in fleet["client"].get("/v1/episodes", params={"robot_id": "r0", "limit": 1000, **window}, headers=auth(fleet["tok"]["operator"])).json()["episodes"]]  # noqa: E731
    assert plain.episode_id in ids(since=at) and plain.episode_id not in ids(until=at)


def test_extra_routes_share_the_servers_tokens(tmp_path):
    from fastapi import APIRouter, Request

    tokens = tmp_path / "tokens.json"
    op = add_token(tokens, "operator")

    def routes(registry):
        router = APIRouter()

        @router.get("/v1/whoami")
        async def whoami(request: Request):
            return {"role": registry.authenticate(request.headers.get("authorization")).role}

        return [router]

    handle = serve(ServerConfig(port=0, token_file=str(tokens)), StoreConfig(path=str(tmp_path / "store")), routes=routes)
    try:
        assert httpx.get(f"{handle.url}/v1/whoami", headers=auth(op)).json() == {"role": "operator"}
        assert httpx.get(f"{handle.url}/v1/whoami").status_code == 401  # ApiError from a mounted route is answered as JSON
    finally:
        handle.stop()


def raw_request(fleet, head: str) -> tuple[int, dict]:
    """Send hand-written request bytes; the status and JSON body of the answer."""
    host, port = fleet["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.replace("TOKEN", fleet["tok"]["r0"]).encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ")[1]), json.loads(body)


@pytest.mark.parametrize(
    "head, status, error",
    [
        ("POST /v1/episodes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer TOKEN\r\nContent-Length: abc\r\n\r\n", 400, "bad_http_request"),
        ("POST /v1/episodes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer TOKEN\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n12345", 400, "bad_http_request"),
        ("POST /v1/episodes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer TOKEN\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n", 400, "ambiguous_framing"),
        ("GET /v1/episodes?limit=abc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer TOKEN\r\nConnection: close\r\n\r\n", 400, "bad_query"),
        ("NOT-HTTP\r\n\r\n", 400, "bad_http_request"),
        ("GET /v1/episodes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer TOKEN\r\nAuthorization: Bearer x\r\nConnection: close\r\n\r\n", 400, "ambiguous_authorization"),
        ("GET /v1/episodes/ HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n", 404, "not_found"),  # once a 307 to that Host
    ],
)
def test_malformed_http_is_refused_in_the_documented_shape(fleet, head, status, error):
    """Refusals by the HTTP layer and the framework's parameter checks answer {"error", "field", "reason"} too;
    Content-Length with Transfer-Encoding (request smuggling behind a proxy) is refused, not guessed."""
    before = stored_count(fleet)
    got, body = raw_request(fleet, head)
    assert (got, body["error"]) == (status, error) and body["reason"] and "field" in body
    assert stored_count(fleet) == before


def test_a_malformed_request_is_told_what_was_malformed_and_counted(fleet):
    def refused() -> float:
        text = fleet["client"].get("/metrics", headers=auth(fleet["tok"]["operator"])).text
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "flywheel_rejections_total"]
        return sum(s.value for s in samples if s.labels.get("reason") == "bad_http_request")

    before = refused()
    _, body = raw_request(fleet, "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")  # HTTP/1.1 without Host
    assert body["error"] == "bad_http_request" and "Host" in body["reason"], body
    assert refused() == before + 1  # the HTTP layer's refusals are in /metrics like every other


def test_made_up_methods_and_paths_never_make_new_metric_series(fleet):
    """Each made-up method name (no token needed, answered 405) was a new label value of flywheel_http_requests_total and
    of the duration histogram: 2,000 requests took /metrics from 14 KB to 71 MB. Methods outside the fixed set count as
    "other", paths no route takes as "unmatched"."""
    client, op = fleet["client"], auth(fleet["tok"]["operator"])

    def series() -> set[tuple]:
        text = client.get("/metrics", headers=op).text
        return {(s.name, tuple(sorted(s.labels.items()))) for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("flywheel_http_")}

    def made_up_requests(count: int) -> None:
        for _ in range(count):
            method = f"M{uuid.uuid4().hex.upper()}"
            assert client.request(method, "/healthz").status_code == 405
            assert client.request(method, f"/v1/episodes/{uuid.uuid4()}", headers=op).status_code == 405
            assert client.request("GET", f"/nope-{method}").status_code == 404

    made_up_requests(1)  # the series such requests make, once
    series()  # and the scrape's own
    before = series()
    made_up_requests(20)
    after = series()
    assert after == before, sorted(after ^ before)[:6]
    assert {dict(labels)["method"] for _, labels in after} <= {"DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "other"}
    assert not any("nope" in dict(labels).get("route", "") for _, labels in after)


def test_a_refused_upload_never_fails_the_uploads_committed_beside_it(fleet):
    """A body the store could not encode once failed the whole group commit: every upload in it got 503."""
    poisoned = raw(meta={"policy_version": "\ud800", "episode_id": str(uuid.uuid4())})
    good = [make("r1", seed=900 + k) for k in range(6)]
    answers: dict[str, int] = {}

    def send(name, body, who):
        with httpx.Client(base_url=fleet["url"], timeout=30) as client:
            answers[name] = client.post("/v1/episodes", content=body, headers=auth(fleet["tok"][who])).status_code

    threads = [threading.Thread(target=send, args=("poisoned", poisoned, "r0"))]
    threads += [threading.Thread(target=send, args=(ep.episode_id, ep.to_bytes(), "r1")) for ep in good]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers.pop("poisoned") == 422 and set(answers.values()) == {201}
    for ep in good:
        assert fleet["client"].get(f"/v1/episodes/{ep.episode_id}", headers=auth(fleet["tok"]["operator"])).status_code == 200


def test_unknown_routes_and_bad_queries_answer_in_the_documented_shape(fleet):
    client, operator = fleet["client"], auth(fleet["tok"]["operator"])
    for method, path, status, error in (("GET", "/nope", 404, "not_found"), ("GET", "/docs", 404, "not_found"), ("PUT", "/v1/episodes", 405, "method_not_allowed")):
        r = client.request(method, path, headers=operator)
        assert (r.status_code, r.json()["error"]) == (status, error) and r.json()["reason"] and "field" in r.json()
        assert status != 404 or r.headers["cache-control"] == "no-store"
    for method, path, allowed in (("PUT", "/v1/episodes", "GET, POST"), ("POST", "/healthz", "GET, HEAD"), ("PATCH", f"/v1/uploads/{uuid.uuid4()}", "DELETE, GET, HEAD, PUT")):
        r = client.request(method, path, headers=operator)
        assert (r.status_code, r.headers["allow"]) == (405, allowed), (method, path)  # every method of every route on the path
    bad = (("robot=r0", "robot"), ("snapshot_id=x", "snapshot_id"), ("since=nan", "since"), ("until=-inf", "until"), ("offset=-1", "offset"), ("limit=0", "limit"), ("since=5&until=1", "since"), ("limit=1&limit=2", "limit"), ("robot_id=r0&robot_id=r1", "robot_id"))
    for query, field in bad:
        r = client.get(f"/v1/episodes?{query}", headers=operator)
        assert (r.status_code, r.json()["error"], r.json()["field"]) == (400, "bad_query", field), query
    assert client.head("/healthz").status_code == 200
    stored = make("r0", seed=4242).episode_id
    assert post(fleet, make("r0", seed=4242).to_bytes()).status_code in (200, 201)
    for spelling in (stored.upper(), stored.replace("-", "")):  # found under one spelling only: say which
        r = client.get(f"/v1/episodes/{spelling}", headers=operator)
        assert (r.status_code, r.json()["error"]) == (400, "bad_episode_id") and stored in r.json()["reason"], r.text


def test_idle_and_half_sent_connections_are_closed_after_head_timeout_s(tmp_path):
    """uvicorn times out neither a connection that sends nothing nor one that stops mid-header."""
    tokens = tmp_path / "tokens.json"
    token = add_token(tokens, "robot", "r0")
    handle = serve(ServerConfig(port=0, token_file=str(tokens), head_timeout_s=0.5), StoreConfig(path=str(tmp_path / "store")))
    try:
        host, port = handle.url.removeprefix("http://").split(":")
        silent = socket.create_connection((host, int(port)), timeout=10)
        half = socket.create_connection((host, int(port)), timeout=10)
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ")
        for s in (silent, half):
            assert s.recv(4096) == b""  # closed by the server (a timeout here raises)
            s.close()
        # refused before its body was read (no token), the body then trickled: once held open as long as bytes came
        refused = socket.create_connection((host, int(port)), timeout=10)
        refused.sendall(b"POST /v1/episodes HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nxx")
        answer, start = b"", time.monotonic()
        while time.monotonic() - start < 5:
            try:
                refused.sendall(b"x")
                refused.settimeout(0.1)
                chunk = refused.recv(4096)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 401") and time.monotonic() - start < 3  # answered, then closed after head_timeout_s
        refused.close()
        with httpx.Client(base_url=handle.url, timeout=10) as client:  # keep-alive: the next request on one connection, later
            assert client.get("/healthz").status_code == 200
            time.sleep(0.8)
            assert client.post("/v1/episodes", content=make().to_bytes(), headers=auth(token)).status_code == 201
    finally:
        handle.stop()


def test_robot_ids_are_a_documented_character_set_and_bearer_is_case_insensitive(fleet, tmp_path):
    for bad in ("robot\x1b[31m", "r0\r\nX-Injected: 1", "", "-leading-dash", "x" * 65, "robot 7"):
        with pytest.raises(ValueError, match="robot id|needs robot_id"):
            add_token(tmp_path / "t.json", "robot", bad)
    planted = tmp_path / "old.json"  # a token file written before the rule: refused at load, naming the fix
    planted.write_text(json.dumps({"a" * 64: {"role": "robot", "robot_id": "robot\r\nX: 1"}}))
    with pytest.raises(ValueError, match="is not allowed.*new token"):
        TokenRegistry(planted)
    r = post(fleet, raw(meta={"robot_id": "r0\x1b[2J"}))
    assert r.status_code == 422 and r.json()["field"] == "robot_id" and "not a robot id" in r.json()["reason"]
    for scheme in ("bearer", "BEARER"):
        got = fleet["client"].get("/v1/episodes", headers={"Authorization": f"{scheme} {fleet['tok']['operator']}"})
        assert got.status_code == 200, got.text


def test_a_broken_token_file_keeps_robots_uploading_and_a_deleted_one_revokes_every_token(tmp_path):
    """A half-edited or deleted token file once answered 500 on each reload check; then it kept every token read
    before, so deleting the file, or a revoking edit with a typo in it, revoked nothing."""
    path = tmp_path / "tokens.json"
    old, operator = add_token(path, "robot", "r0"), add_token(path, "operator")
    tokens = TokenRegistry(path, reload_every_s=0.0)  # re-read on every request
    path.write_text("{not json")
    assert tokens.authenticate(f"Bearer {old}").robot_id == "r0"  # uploads go on
    with pytest.raises(ApiError, match="unknown token"):
        tokens.authenticate(f"Bearer {operator}")  # privileged calls wait for the fix
    path.unlink()
    with pytest.raises(ApiError, match="unknown token"):
        tokens.authenticate(f"Bearer {old}")  # deleted: every token revoked
    path.write_text("{}")
    new = add_token(path, "robot", "r1")  # back: a file holding only the new token
    assert tokens.authenticate(f"Bearer {new}").robot_id == "r1"
    with pytest.raises(ApiError, match="unknown token"):
        tokens.authenticate(f"Bearer {old}")


def test_tokens_are_revoked_and_listed_with_the_cli_and_a_running_server_follows(tmp_path, capsys):
    """There was only `add`: revoking meant hand-editing the JSON, and an edit that kept the file's mtime (cp -p,
    rsync -t) was never reloaded."""
    import os
    import threading

    from fleet.server.auth import main as auth_main

    path = tmp_path / "tokens.json"
    robot, spare, operator = add_token(path, "robot", "r0"), add_token(path, "robot", "r0"), add_token(path, "operator")
    tokens = TokenRegistry(path, reload_every_s=0.0)
    auth_main(["--tokens", str(path), "list"])
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 3 and sum(" r0" in line for line in listed) == 2 and robot not in "".join(listed)
    mtime = path.stat().st_mtime_ns
    auth_main(["--tokens", str(path), "revoke", f"--token={spare}"])  # the = form: a token may start with "-"
    os.utime(path, ns=(mtime, mtime))  # as `cp -p` or `rsync -t` would leave it
    with pytest.raises(ApiError, match="unknown token"):
        tokens.authenticate(f"Bearer {spare}")
    assert tokens.authenticate(f"Bearer {robot}").robot_id == "r0"
    auth_main(["--tokens", str(path), "revoke", "--robot-id", "r0"])
    with pytest.raises(ApiError, match="unknown token"):
        tokens.authenticate(f"Bearer {robot}")
    assert tokens.authenticate(f"Bearer {operator}").role == "operator"
    for bad in (["--robot-id", "r0"], ["--hash", "abc"]):  # nothing left to revoke; a prefix too short to name one token
        with pytest.raises(SystemExit, match="no token|at least 8"):
            auth_main(["--tokens", str(path), "revoke", *bad])
    made = []
    threads = [threading.Thread(target=lambda i=i: made.append(add_token(path, "robot", f"c{i}"))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(tokens.authenticate(f"Bearer {t}") for t in made) and len(made) == 8  # concurrent adds lose none
    assert path.stat().st_mode & 0o777 == 0o600


def test_the_token_cli_keeps_the_files_mode_owner_and_symlink(tmp_path):
    """`add` and `revoke` replaced the file with a new 0600 one owned by the CLI's user and a symlink with a plain
    file: a root `add` on a root:flywheel 0640 file locked the server (running as flywheel) out of it."""
    import os

    path = tmp_path / "tokens.json"
    add_token(path, "operator")
    assert path.stat().st_mode & 0o777 == 0o600  # a new file: 0600
    path.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(path, 0, 65534)  # root:<the server's group>
    token = add_token(path, "robot", "r0")
    assert path.stat().st_mode & 0o777 == 0o640 and TokenRegistry(path).authenticate(f"Bearer {token}").robot_id == "r0"
    if os.geteuid() == 0:
        assert (path.stat().st_uid, path.stat().st_gid) == (0, 65534)
    link = tmp_path / "etc" / "tokens.json"
    link.parent.mkdir()
    link.symlink_to(path)
    linked = add_token(link, "robot", "r1")
    assert link.is_symlink() and TokenRegistry(path).authenticate(f"Bearer {linked}").robot_id == "r1"
    from fleet.server.auth import revoke_tokens

    revoke_tokens(link, robot_id="r0")
    assert link.is_symlink() and path.stat().st_mode & 0o777 == 0o640 and [p.robot_id for p in TokenRegistry(path)._tokens.values()].count("r0") == 0


def test_an_unwritable_ready_file_is_refused_at_the_start_and_the_ready_file_goes_at_a_clean_stop(tmp_path):
    """An unwritable fleet.server.ready_file failed after "listening" with a traceback (exit 3); the file (url, pid)
    was left behind at every exit, so a supervisor read a dead server's URL."""
    import os

    tokens = tmp_path / "tokens.json"
    add_token(tokens, "operator")
    (tmp_path / "a-file").write_text("")
    for ready, says in ((tmp_path / "a-file" / "server.json", "cannot write in"), (tmp_path, "is a folder")):
        with pytest.raises(ValueError, match=f"^fleet.server.ready_file {re.escape(str(ready))}:? .*{says}"):
            serve(ServerConfig(port=0, token_file=str(tokens), ready_file=str(ready)), StoreConfig(path=str(tmp_path / "store")))
    ready = tmp_path / "run" / "server.json"
    config = ServerConfig(port=0, token_file=str(tokens), ready_file=str(ready))
    handle = serve(config, StoreConfig(path=str(tmp_path / "store")))
    assert json.loads(ready.read_text()) == {"url": handle.url, "pid": os.getpid()}
    handle.stop()
    assert not ready.exists()
    handle = serve(config, StoreConfig(path=str(tmp_path / "store")))
    ready.write_text(json.dumps({"url": "http://127.0.0.1:1", "pid": os.getpid() + 1}))  # a newer server's: not ours to remove
    handle.stop()
    assert json.loads(ready.read_text())["pid"] == os.getpid() + 1


def test_upload_limits_answer_429_with_retry_after_and_a_slow_body_408(tmp_path):
    """Per token: uploads in flight and a rate are bounded (429 + Retry-After, nothing stored); a body
    that does not arrive in time is cut off (408); another robot's token is not affected."""
    tokens = tmp_path / "tokens.json"
    tok = {r: add_token(tokens, "robot", r) for r in ("r0", "r1")} | {"operator": add_token(tokens, "operator")}
    config = ServerConfig(port=0, token_file=str(tokens), max_concurrent_uploads=1, upload_rate_per_s=0.5, upload_burst=3, body_timeout_s=1.0)
    handle = serve(config, StoreConfig(path=str(tmp_path / "store")))
    host, port = handle.url.removeprefix("http://").split(":")
    try:
        with httpx.Client(base_url=handle.url, timeout=30) as client:
            send = lambda r, seed: client.post("/v1/episodes", content=make(r, seed=seed).to_bytes(), headers=auth(tok[r]))  # noqa: E731
            # one upload in flight: its headers are sent, its body is not (yet)
            slow = socket.create_connection((host, int(port)), timeout=10)
            slow.sendall(f"POST /v1/episodes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok['r0']}\r\nContent-Length: 1000\r\n\r\n".encode())
            time.sleep(0.2)
            busy = send("r0", 1)
            assert busy.status_code == 429 and busy.json()["error"] == "too_many_uploads" and busy.headers["retry-after"] == "1"
            assert send("r1", 2).status_code == 201  # another token is not held up
            data = b""
            while chunk := slow.recv(4096):
                data += chunk
            slow.close()
            assert data.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in data  # the slow body was cut off after 1 s
            assert [send("r0", 10 + i).status_code for i in range(2)] == [201, 201]  # the burst of 3: one spent by the slow upload
            limited = send("r0", 20)
            assert limited.status_code == 429 and limited.json()["error"] == "rate_limited" and int(limited.headers["retry-after"]) >= 1
            listed = client.get("/v1/episodes", headers=auth(tok["operator"])).json()["total"]
            assert listed == 3  # r1's one and r0's two: nothing refused was stored
    finally:
        handle.stop()


def hang_the_store(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Every store commit waits (up to 30 s) until the first event is set; the second is set once one is waiting."""
    stall, entered = threading.Event(), threading.Event()
    append = EpisodeStore.append

    def hung(self, *args, **kwargs):
        entered.set()
        stall.wait(30)
        return append(self, *args, **kwargs)

    monkeypatch.setattr(EpisodeStore, "append", hung)
    return stall, entered


def test_uploads_waiting_on_a_stalled_store_count_against_the_tokens_limit(tmp_path, monkeypatch):
    """With the store hung, a robot that gave up after its timeout and sent its next episode had 40 episodes
    queued in the server (max_concurrent_uploads 4, no 429): the admission slot ended before the commit's wait."""
    stall, entered = hang_the_store(monkeypatch)
    tokens = tmp_path / "tokens.json"
    tok = add_token(tokens, "robot", "r0")
    handle = serve(ServerConfig(port=0, token_file=str(tokens), max_concurrent_uploads=2), StoreConfig(path=str(tmp_path / "store")))
    try:
        answers, bodies = [], [make("r0", seed=seed).to_bytes() for seed in range(6)]
        with httpx.Client(base_url=handle.url, timeout=0.5) as impatient:
            for body in bodies:  # each gives up at 0.5 s and sends the next, as a robot's timeout does
                try:
                    answers.append(impatient.post("/v1/episodes", content=body, headers=auth(tok)).status_code)
                except httpx.TimeoutException:
                    answers.append("timeout")
        assert entered.is_set() and answers[:2] == ["timeout", "timeout"] and set(answers[2:]) == {429}, answers
        stall.set()
        with httpx.Client(base_url=handle.url, timeout=30) as client:
            deadline, again = time.monotonic() + 20, []
            for body in bodies[:2]:
                while (code := client.post("/v1/episodes", content=body, headers=auth(tok)).status_code) == 429 and time.monotonic() < deadline:
                    time.sleep(0.1)
                again.append(code)
            assert again == [200, 200]  # both stored by their first try, which the robot gave up on
    finally:
        stall.set()
        handle.stop()


def test_a_full_disk_is_a_507_that_keeps_nothing_and_healthz_says_degraded(tmp_path, monkeypatch):
    """A full staging disk answered 500 internal_error (robots set the episode aside after 8 tries) and kept half a
    chunk; a full store disk answered 503 with an empty reason ("IcechunkError: ") and a 1 s Retry-After; /healthz said
    ok throughout, so a load balancer kept sending the fleet there."""
    import errno

    from fleet.server import app as server_app
    from fleet.server.uploads import Staging

    tokens = tmp_path / "tokens.json"
    tok = add_token(tokens, "robot", "r0")
    handle = serve(ServerConfig(port=0, token_file=str(tokens)), StoreConfig(path=str(tmp_path / "store")))
    append, write = EpisodeStore.append, Staging.append
    try:
        with httpx.Client(base_url=handle.url, timeout=30) as client:
            def full_store(self, *a, **k):
                raise RuntimeError("x failed to write manifest\n  |\n  -> No space left on device (os error 28)\n  | ")  # Icechunk's shape

            monkeypatch.setattr(EpisodeStore, "append", full_store)
            episode = make("r0", seed=1)
            refused = client.post("/v1/episodes", content=episode.to_bytes(), headers=auth(tok))
            assert (refused.status_code, refused.json()["error"], refused.headers["Retry-After"]) == (507, "insufficient_storage", "30"), refused.text
            assert "No space left on device (os error 28)" in refused.json()["reason"]
            health = client.get("/healthz")
            assert health.status_code == 503 and health.json()["status"] == "degraded" and "No space left" in health.json()["reason"]

            def full_staging(self, upload, offset, chunk):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(Staging, "append", full_staging)
            body = episode.to_bytes()
            created = client.post("/v1/uploads", json={"size": len(body), "sha256": __import__("hashlib").sha256(body).hexdigest()}, headers=auth(tok))
            chunk = client.put(f"/v1/uploads/{created.json()['upload_id']}", content=body, headers={"Upload-Offset": "0", **auth(tok)})
            assert (chunk.status_code, chunk.json()["error"]) == (507, "insufficient_storage"), chunk.text

            monkeypatch.setattr(EpisodeStore, "append", append)  # space again
            monkeypatch.setattr(Staging, "append", write)
            monkeypatch.setattr(server_app, "DEGRADED_FOR_S", 0.0)  # past the window: uploads let in again
            assert client.get("/healthz").status_code == 200
            assert client.post("/v1/episodes", content=episode.to_bytes(), headers=auth(tok)).status_code == 201
            assert client.get("/healthz").json() == {"status": "ok", "pending_uploads": 0}
    finally:
        handle.stop()


def test_a_read_only_staging_disk_is_a_logged_503_naming_the_file_and_every_500_is_logged(tmp_path, monkeypatch, caplog):
    """A staging disk remounted read-only (ext4 errors=remount-ro) answered resumable uploads 500 internal_error "it is
    logged", and nothing was logged: an OSError handled by disk_fault never reaches the server's own traceback log."""
    import errno
    import hashlib
    import logging

    from fleet.server.uploads import Staging

    tokens = tmp_path / "tokens.json"
    tok = add_token(tokens, "robot", "r0")
    handle = serve(ServerConfig(port=0, token_file=str(tokens)), StoreConfig(path=str(tmp_path / "store")))
    failure = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "store.uploads" / "u1"))

    def refused(self, upload, offset, chunk):
        raise failure

    monkeypatch.setattr(Staging, "append", refused)
    caplog.set_level(logging.INFO, logger="fleet.server.app")
    try:
        with httpx.Client(base_url=handle.url, timeout=30) as client:
            body = make("r0", seed=1).to_bytes()
            created = client.post("/v1/uploads", json={"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}, headers=auth(tok))

            def put() -> httpx.Response:
                return client.put(f"/v1/uploads/{created.json()['upload_id']}", content=body, headers={"Upload-Offset": "0", **auth(tok)})

            chunk = put()
            assert (chunk.status_code, chunk.json()["error"], chunk.headers["Retry-After"]) == (503, "store_unavailable", "5"), chunk.text
            assert f"Read-only file system: {failure.filename}" in chunk.json()["reason"]
            assert f"refused a write (Read-only file system: {failure.filename})" in caplog.text
            failure.errno = errno.ENOTDIR  # no disk condition an operator fixes: a bug, answered 500, its traceback logged
            caplog.clear()
            assert (put().status_code, put().json()["error"]) == (500, "internal_error")
            assert "Traceback" in caplog.text and "OSError" in caplog.text
    finally:
        handle.stop()


def test_a_damaged_chunk_is_a_store_corrupt_500_naming_the_episode_not_a_retry(tmp_path, caplog):
    """A truncated or deleted chunk answered 503 "the episode store did not answer (...); retry later" naming no episode or
    file, and flipped bytes 500 internal_error: damage that stays, presented as transient or as a bug."""
    import logging
    from pathlib import Path

    tokens = tmp_path / "tokens.json"
    tok, op = add_token(tokens, "robot", "r0"), add_token(tokens, "operator")
    handle = serve(ServerConfig(port=0, token_file=str(tokens)), StoreConfig(path=str(tmp_path / "store")))
    caplog.set_level(logging.INFO, logger="fleet.server.app")
    try:
        with httpx.Client(base_url=handle.url, timeout=30) as client:
            episodes = [make("r0", steps=2000, seed=k) for k in range(3)]
            for episode in episodes:
                assert client.post("/v1/episodes", content=episode.to_bytes(), headers=auth(tok)).status_code == 201
            chunks = sorted((tmp_path / "store" / "icechunk" / "chunks").iterdir(), key=lambda p: p.stat().st_mtime)

            def damage(chunk: Path, how) -> None:
                data = chunk.read_bytes()
                chunk.write_bytes(how(data))

            damage(chunks[-1], lambda b: b[: len(b) // 2])  # the newest episode's, truncated
            damage(chunks[0], lambda b: b[:-64] + bytes(x ^ 0xFF for x in b[-64:-56]) + b[-56:])  # the first's, bytes flipped
            for episode in (episodes[-1], episodes[0]):
                got = client.get(f"/v1/episodes/{episode.episode_id}", headers=auth(op))
                assert (got.status_code, got.json()["error"], "Retry-After" in got.headers) == (500, "store_corrupt", False), got.text
                assert f"episode {episode.episode_id} in snapshot " in got.json()["reason"] and "restore the store from backup" in got.json()["reason"]
                assert f"GET /v1/episodes/{episode.episode_id}: episode {episode.episode_id} in snapshot" in caplog.text
    finally:
        handle.stop()


def test_a_stalled_store_answers_503_before_the_robots_timeout_and_healthz_says_so(tmp_path, monkeypatch):
    """With S3 throttling, a commit sits in Icechunk's retries for ~30 s: the upload's 503 came at 25-33 s, the robots'
    own timeout is 30 s, and /healthz said ok all the while (it only counted commits that had failed)."""
    from fleet.server import app as server_app

    stall, entered = hang_the_store(monkeypatch)
    monkeypatch.setattr(server_app, "STALLED_S", 0.2)
    tokens = tmp_path / "tokens.json"
    tok, op = add_token(tokens, "robot", "r0"), add_token(tokens, "operator")
    handle = serve(ServerConfig(port=0, token_file=str(tokens), commit_timeout_s=0.5, max_concurrent_uploads=1), StoreConfig(path=str(tmp_path / "store")))
    try:
        with httpx.Client(base_url=handle.url, timeout=30) as client:
            first, second = make("r0", seed=1).to_bytes(), make("r0", seed=2).to_bytes()
            slow = client.post("/v1/episodes", content=first, headers=auth(tok))
            assert (slow.status_code, slow.json()["error"], slow.headers["Retry-After"]) == (503, "commit_slow", "5") and entered.is_set(), slow.text
            # every queued upload was told its retry answers 200 duplicate; one whose id holds other content gets 409
            assert "200 duplicate if this episode was stored" in slow.json()["reason"] and "409 episode_id_conflict" in slow.json()["reason"]
            health = client.get("/healthz")
            assert health.status_code == 503 and "a group commit has run" in health.json()["reason"] and health.json()["pending_uploads"] == 1
            running = {s.name: s.value for f in text_string_to_metric_families(client.get("/metrics", headers=auth(op)).text) for s in f.samples}
            assert running["flywheel_commit_running_seconds"] > 0.2
            assert client.post("/v1/episodes", content=second, headers=auth(tok)).status_code == 429  # the queued one still holds the slot
            stall.set()
            deadline, code = time.monotonic() + 20, None
            while (code := client.post("/v1/episodes", content=first, headers=auth(tok)).status_code) == 429 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert code == 200  # stored by the commit it waited on: the retry is a duplicate, nothing twice
            assert client.post("/v1/episodes", content=second, headers=auth(tok)).status_code == 201
            assert client.get("/healthz").json() == {"status": "ok", "pending_uploads": 0}
            counted = {(s.name, s.labels.get("status")): s.value for f in text_string_to_metric_families(client.get("/metrics", headers=auth(op)).text) for s in f.samples}
            assert counted[("flywheel_uploads_total", "created")] == 2 and counted[("flywheel_uploads_total", "duplicate")] == 1  # the slow one counted once stored

            from fleet.store.backend import StoreBusyError

            def busy(self, *args, **kwargs):  # a TimeoutError of the store's own, at once: a failed commit, not a slow one
                raise StoreBusyError("another process holds the store's lock")

            monkeypatch.setattr(EpisodeStore, "append", busy)
            failed = client.post("/v1/episodes", content=make("r0", seed=3).to_bytes(), headers=auth(tok))
            assert (failed.status_code, failed.json()["error"], failed.headers["Retry-After"]) == (503, "store_unavailable", "1"), failed.text
    finally:
        stall.set()
        handle.stop()
