"""Content-Encoding: zstd on POST /v1/episodes: stored bit-exact, duplicates across encodings, zip
bombs 413 within a memory bound, corrupt streams 400, other codings 415; the agent compresses end
to end once the server advertises zstd, and its spool keeps the uncompressed canonical bytes."""

import tracemalloc

import httpx
import pytest
import zstandard

from fleet.agent import AgentConfig, RobotAgent
from fleet.server import ServerConfig, add_token, serve
from fleet.server.content_encoding import MemoryBudget, decode_body
from fleet.server.errors import ApiError
from fleet.store import EpisodeStore, StoreConfig
from sim.episode import Episode
from tests.conftest import make_episode_arrays

LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("zstd")
    tokens = root / "tokens.json"
    tok = {"robot": add_token(tokens, "robot", "r0"), "operator": add_token(tokens, "operator")}
    store_cfg = StoreConfig(path=str(root / "store"), chunk_rows=256, index_rows=8)
    handle = serve(ServerConfig(port=0, token_file=str(tokens), max_body_bytes=LIMIT), store_cfg)
    client = httpx.Client(base_url=handle.url, timeout=30)
    yield {"url": handle.url, "tok": tok, "client": client, "store_cfg": store_cfg, "tokens": tokens}
    client.close()
    handle.stop()


def make(seed: int, steps: int = 50) -> Episode:
    return Episode.create(**make_episode_arrays(num_steps=steps, seed=seed), robot_id="r0", robot_model="toy", source="real")


def post(fleet, body: bytes, encoding: str | None = "zstd") -> httpx.Response:
    headers = {"Authorization": f"Bearer {fleet['tok']['robot']}"}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    return fleet["client"].post("/v1/episodes", content=body, headers=headers)


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def bomb(size: int) -> bytes:
    """One zstd frame of ``size`` zero bytes, its content size not declared (a streaming compressor's)."""
    cobj, zeros = zstandard.ZstdCompressor(level=1).compressobj(), bytes(1 << 20)
    return b"".join(cobj.compress(zeros) for _ in range(size >> 20)) + cobj.flush()


def test_compressed_upload_is_stored_bit_exact_and_duplicates_across_encodings(fleet):
    ep = make(1)
    answer = post(fleet, zstd(ep.to_bytes()))
    assert answer.status_code == 201, answer.text
    assert "zstd" in answer.headers["accept-encoding"]  # RFC 7694: the robot learns it may compress
    fetched = fleet["client"].get(f"/v1/episodes/{ep.episode_id}", headers={"Authorization": f"Bearer {fleet['tok']['operator']}"})
    assert fetched.content == ep.to_bytes()  # canonical, uncompressed
    assert post(fleet, ep.to_bytes(), encoding=None).json() == {"episode_id": ep.episode_id, "status": "duplicate"}
    assert post(fleet, ep.to_bytes(), encoding="identity").status_code == 200
    again = post(fleet, zstd(ep.to_bytes()), encoding="ZSTD")  # codings are case-insensitive
    assert again.status_code == 200 and again.json()["status"] == "duplicate"


def test_zip_bomb_is_413_and_decoding_stays_within_the_bound(fleet):
    small = bomb(256 << 20)  # 256 MiB of zeros in a few KiB
    assert len(small) < LIMIT
    answer = post(fleet, small)
    assert answer.status_code == 413, answer.text
    assert answer.json() == {"error": "body_too_large", "field": "content-encoding", "reason": f"zstd body decompresses to more than the {LIMIT}-byte limit"}
    declared = zstd(bytes(8 << 20))  # content size in the frame header, over the limit
    assert post(fleet, declared).json()["error"] == "body_too_large"
    tracemalloc.start()
    try:
        with pytest.raises(ApiError) as refused:
            decode_body(small, "zstd", LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.status == 413 and peak < LIMIT + (9 << 20)  # the limit + one slice's worst case, never 256 MiB


def test_large_decodes_share_one_budget_over_the_whole_server():
    """The resumable route decodes up to max_episode_bytes: a few KiB of zstd could claim that much each, for every
    robot at once. Decodes reserve what their frame declares (or their whole bound) from one budget: 503 beyond it."""
    budget = MemoryBudget(1 << 20)
    declared = zstd(bytes(600_000))  # its frame says 600,000 bytes
    assert decode_body(declared, "zstd", 4 << 20, budget) == bytes(600_000) and budget.held == 0
    with budget.hold(600_000):  # another robot's decode in progress
        with pytest.raises(ApiError) as busy:
            decode_body(declared, "zstd", 4 << 20, budget)
        assert (busy.value.status, busy.value.error, busy.value.headers) == (503, "decoding_busy", {"Retry-After": "1"})
        assert decode_body(declared, "zstd", 4 << 20) == bytes(600_000)  # the plain route's decodes are bounded on their own
    with budget.hold(1):  # a frame that does not declare its size reserves its whole bound
        with pytest.raises(ApiError, match="decoding_busy"):
            decode_body(bomb(8 << 20), "zstd", 4 << 20, budget)
    with pytest.raises(ApiError, match="body_too_large"):  # alone it may decode up to its bound, then 413
        decode_body(bomb(8 << 20), "zstd", 4 << 20, budget)
    assert budget.held == 0


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"not zstd at all, a plain episode would be", "not a valid zstd stream"),
        (b"", "zstd stream truncated"),
        ("truncated", "zstd stream truncated"),
        ("trailing", "bytes after the end of the zstd frame"),
        ("flipped", "not a valid zstd stream"),
        ("skippable", "starts with a zstd skippable frame"),  # once: "N bytes after the end of the zstd frame" (the data frame)
    ],
)
def test_corrupt_stream_is_400_and_nothing_is_stored(fleet, body, reason):
    ep = make(2)
    good = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(ep.to_bytes())
    body = {"truncated": good[: len(good) // 2], "trailing": good + b"junk", "flipped": good[:-4] + bytes(4), "skippable": bytes.fromhex("502a4d1804000000") + b"note" + good}.get(body, body)
    answer = post(fleet, body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "bad_zstd" and answer.json()["field"] == "body" and reason in answer.json()["reason"]
    assert ep.episode_id not in EpisodeStore.open(fleet["store_cfg"]).snapshot()


def test_a_zstd_body_without_its_header_and_a_window_too_large_are_refused_saying_what_to_send(fleet):
    ep = make(3)
    answer = post(fleet, zstd(ep.to_bytes()), encoding=None)  # once: "declared header length 5548987112322217256 ..."
    assert (answer.status_code, answer.json()["field"]) == (400, "content-encoding") and "Content-Encoding: zstd" in answer.json()["reason"], answer.text
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28)  # a 256 MiB window, over the server's cap
    streamed = zstandard.ZstdCompressor(compression_params=params).compressobj()  # size unknown: the window stays
    wide = streamed.compress(ep.to_bytes()) + streamed.flush()
    answer = post(fleet, wide)
    assert answer.status_code == 400 and "window of at most" in answer.json()["reason"], answer.text
    assert ep.episode_id not in EpisodeStore.open(fleet["store_cfg"]).snapshot()


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd, gzip", "x-unknown"])
def test_unknown_content_encoding_is_415_naming_the_accepted_ones(fleet, encoding):
    answer = post(fleet, zstd(make(3).to_bytes()), encoding=encoding)
    assert answer.status_code == 415, answer.text
    body = answer.json()
    assert body["error"] == "unsupported_content_encoding" and body["field"] == "content-encoding"
    assert "zstd, identity" in body["reason"] and answer.headers["accept-encoding"] == "zstd, identity"


def test_two_content_encoding_lines_are_a_list_and_get_415(fleet):
    headers = [("Authorization", f"Bearer {fleet['tok']['robot']}"), ("Content-Encoding", "zstd"), ("Content-Encoding", "zstd")]
    answer = httpx.post(f"{fleet['url']}/v1/episodes", content=zstd(make(4).to_bytes()), headers=headers)
    assert (answer.status_code, answer.json()["error"]) == (415, "unsupported_content_encoding"), answer.text


def test_the_agent_uploads_compressed_end_to_end(fleet, tmp_path):
    cfg = AgentConfig(server_url=fleet["url"], spool_dir=str(tmp_path / "spool"), backoff_initial_s=0.02, backoff_max_s=0.2)
    agent = RobotAgent(cfg, "r0", token=fleet["tok"]["robot"])
    eps = [make(10 + i, steps=200) for i in range(4)]
    for ep in eps:
        agent.submit(ep)
    assert [agent.spool.read(e) for e in agent.spool.entries()] == [ep.to_bytes() for ep in eps]  # the spool keeps canonical bytes
    with agent:
        assert agent.wait_drained(30), agent.status()
    status = agent.status()
    assert status["created"] == 4 and status["compressed"] == 3  # the first answer advertises zstd; the rest go compressed
    assert status["sent_bytes"] < sum(len(ep.to_bytes()) for ep in eps)
    snap = EpisodeStore.open(fleet["store_cfg"]).snapshot()
    for ep in eps:
        assert snap.read_bytes(ep.episode_id) == ep.to_bytes()


def test_compression_is_off_when_configured(fleet, tmp_path):
    cfg = AgentConfig(server_url=fleet["url"], spool_dir=str(tmp_path / "spool"), compress_uploads=False)
    agent = RobotAgent(cfg, "r0", token=fleet["tok"]["robot"])
    eps = [make(20 + i) for i in range(2)]
    for ep in eps:
        agent.submit(ep)
    with agent:
        assert agent.wait_drained(30), agent.status()
    assert agent.status()["created"] == 2 and agent.status()["compressed"] == 0
    assert agent.status()["sent_bytes"] == sum(len(ep.to_bytes()) for ep in eps)


def test_routes_that_decode_nothing_refuse_a_content_encoding_instead_of_taking_the_coded_bytes(fleet):
    """A resumable chunk sent with Content-Encoding: zstd was stored as its compressed bytes (the offset moved by
    their length) and the upload later failed its digest; a publish labelled gzip was signed."""
    client, robot = fleet["client"], {"Authorization": f"Bearer {fleet['tok']['robot']}"}
    data = make(21).to_bytes()
    create = {"size": len(data), "sha256": __import__("hashlib").sha256(data).hexdigest()}
    answer = client.post("/v1/uploads", json=create, headers={**robot, "Content-Encoding": "gzip"})
    assert (answer.status_code, answer.json()["error"]) == (415, "unsupported_content_encoding"), answer.text
    assert "POST /v1/uploads" in answer.json()["reason"]
    upload = client.post("/v1/uploads", json=create, headers={**robot, "Content-Encoding": "identity"}).json()["upload_id"]
    answer = client.put(f"/v1/uploads/{upload}", content=zstd(data), headers={**robot, "Upload-Offset": "0", "Content-Encoding": "zstd"})
    assert (answer.status_code, answer.json()["error"]) == (415, "unsupported_content_encoding"), answer.text
    assert client.get(f"/v1/uploads/{upload}", headers=robot).json()["offset"] == 0  # nothing of it kept
    assert client.put(f"/v1/uploads/{upload}", content=data, headers={**robot, "Upload-Offset": "0"}).json()["offset"] == len(data)
    assert client.post(f"/v1/uploads/{upload}/complete", headers=robot).status_code == 201
