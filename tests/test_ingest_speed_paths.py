"""The ingest fast paths behave like the paths they replace (behaviour only, no timings):

* the writer appends rows by writing each array's metadata and whole encoded chunks itself
  (fleet/store/writer.py ``_append_rows``): the store holds the same keys with the same bytes as
  zarr's ``resize`` + ``setitem`` would write, across catalog chunk boundaries, multi-chunk data
  blocks, a reopened store (a partly filled chunk read back) and schema 1.1 camera frames;
* the partly filled chunks it remembers are not used after another handle committed to the same
  partition (a local store's writers share the writer id ``local``);
* the server's request counting and framing check are plain ASGI middleware: counts, refusals
  and chunked bodies behave as before.
"""

import socket
import tracemalloc
import uuid

import httpx
import numpy as np
import pytest
import zarr

from fleet.server import ServerConfig, add_token, serve
from fleet.store import EpisodeStore, StoreConfig, backend
from fleet.store import layout as layout_module
from fleet.store import writer as writer_module
from sim.episode import Episode
from tests.conftest import make_episode_arrays
from tests.test_episode_v1_1 import camera, make_v1_1


def episode(seed: int, steps: int = 6, robot_id: str = "r0") -> Episode:
    arrays = make_episode_arrays(num_steps=steps, obs_dim=3, seed=seed)
    eid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"speed/{seed}/{steps}/{robot_id}"))
    return Episode.create(**arrays, robot_id=robot_id, robot_model="toy", source="sim", policy_version="p", episode_id=eid)


def cameras(frames: int) -> Episode:
    return make_v1_1(extras=camera(frames=frames, rate_hz=60.0), cameras={"wrist": {"codec": "raw-rgb8", "width": 6, "height": 4}}, control_rate_hz="20.0")


async def _zarr_rows(self, arr, start, block, tails, grow):
    """What the writer did before: zarr's own resize, then setitem."""
    await arr.resize((start + grow, *block.shape[1:]))
    await arr.setitem(slice(start, start + len(block)), block)


def _contents(store: EpisodeStore) -> dict[str, bytes]:
    from zarr.core.buffer import default_buffer_prototype

    async def dump():
        session = store._repo.readonly_session(branch="main")
        keys = [k async for k in session.store.list()]
        return {k: (await session.store.get(k, prototype=default_buffer_prototype())).to_bytes() for k in keys}

    return backend.run(dump())


PLAN = [
    [episode(0), episode(30)],
    [episode(k) for k in range(1, 6)],  # crosses a 4-row catalog chunk
    [episode(6, steps=40), cameras(16)],  # a data block of several 32-row chunks; a new stream with a frame axis
    "reopen",  # the partly filled catalog chunk is read back, not remembered
    [episode(k, steps=3 + k % 5) for k in range(7, 20)],
    [cameras(3), episode(20)],
    [episode(k) for k in range(21, 24)],
]


def _build(path: str, monkeypatch, rows_fn, plan=PLAN) -> EpisodeStore:
    monkeypatch.setattr(writer_module.EpisodeStore, "_append_rows", rows_fn)
    cfg = StoreConfig(path=path, chunk_rows=32, index_rows=4)
    store = EpisodeStore.create(cfg)
    t = 1.7e9
    for step in plan:
        if step == "reopen":
            store = EpisodeStore.open(cfg)
            continue
        store.append(step, upload_times=[t + k for k in range(len(step))])
        t += 100
    return store


def test_direct_chunk_writes_store_the_same_bytes_as_zarr_resize_and_setitem(tmp_path, monkeypatch):
    fast = _build(str(tmp_path / "fast"), monkeypatch, writer_module.EpisodeStore._append_rows)
    slow = _build(str(tmp_path / "slow"), monkeypatch, _zarr_rows)
    mine, theirs = _contents(fast), _contents(slow)
    assert sorted(mine) == sorted(theirs)
    assert [k for k in mine if mine[k] != theirs[k]] == []
    snap = fast.snapshot()
    appended = [ep for step in PLAN if step != "reopen" for ep in step]
    assert [e.episode_id for e in snap.catalog()] == [ep.episode_id for ep in appended]
    for ep, back in zip(appended, snap.read_episodes([ep.episode_id for ep in appended])):
        assert back.equals(ep)


WIDE = [[cameras(3), episode(40)], [cameras(14)], "reopen", [cameras(9), cameras(2)]]


def test_a_wide_array_is_written_in_its_own_chunks_with_no_padding_chunks(tmp_path, monkeypatch):
    """Camera rows of 72 bytes with 576-byte chunks: 8 rows a chunk against the commits' 32. A commit writes the camera's
    chunks that hold frames and leaves the rest of its 32 rows unwritten (they read as padding): the same rows, data and
    padding, as zarr's setitem of the whole padded block, in fewer chunks."""
    monkeypatch.setattr(layout_module, "MAX_CHUNK_BYTES", 576)
    grown = []

    async def spy(self, arr, start, block, tails, grow):
        grown.append((arr.path, len(block), grow))
        await real(self, arr, start, block, tails, grow)

    real = writer_module.EpisodeStore._append_rows
    fast = _build(str(tmp_path / "fast"), monkeypatch, spy, WIDE)
    frames = [(path, rows, grow) for path, rows, grow in grown if path.endswith("image.wrist")]
    assert frames and all(rows < grow == 32 and rows % 8 == 0 for _, rows, grow in frames)  # 8 of 32 (3 frames), 16 (14), 16 (11)

    async def padded_block(self, arr, start, block, tails, grow):  # the writer before: every row of the block written
        full = np.full((grow, *block.shape[1:]), arr.metadata.fill_value, dtype=block.dtype)
        full[: len(block)] = block
        await _zarr_rows(self, arr, start, full, tails, grow)

    slow = _build(str(tmp_path / "slow"), monkeypatch, padded_block, WIDE)
    mine, theirs = _contents(fast), _contents(slow)
    assert set(mine) < set(theirs)  # fewer chunks ...
    assert [k for k in mine if mine[k] != theirs[k]] == []  # ... and the ones written, the same bytes
    assert all("image.wrist" in k for k in set(theirs) - set(mine))
    ids = [ep.episode_id for step in WIDE if step != "reopen" for ep in step]
    for a, b in zip(fast.snapshot().read_episodes(ids), slow.snapshot().read_episodes(ids)):
        assert a.equals(b)
    stream = next(k.rsplit("/", 2)[0] for k in mine if k.endswith("image.wrist/zarr.json"))
    for store in (fast, slow):
        array = zarr.open_array(store._repo.readonly_session(branch="main").store, path=stream + "/image.wrist", mode="r", zarr_format=3)
        assert array.shape[0] == 96  # three commits of 32 rows
        whole = array[:]
        assert (whole[3:32] == 0).all() and (whole[32 + 14 : 64] == 0).all() and (whole[64 + 11 :] == 0).all()  # padding, either way


def test_a_vga_camera_episode_is_stored_and_read_at_the_default_chunk_rows_in_memory_its_size(tmp_path):
    """One 640x480 frame pair at the default 16,384 rows a commit: the commit builds the camera's 16-row chunk that holds
    them (14 MiB), not 16,384 rows of frames (14 GiB: it failed with MemoryError), and a read reads that chunk."""
    store = EpisodeStore.create(StoreConfig(path=str(tmp_path / "store")))
    assert store.info["chunk_rows"] == 16384
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (2, 480, 640, 3), dtype=np.uint8)
    ep = Episode.create(**make_episode_arrays(num_steps=1, obs_dim=3), robot_id="r0", robot_model="toy", source="sim", policy_version="p",
                        extras={"image.wrist": frames})  # fmt: skip
    tracemalloc.start()
    try:
        assert store.append([ep]).statuses == ("created",)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 << 20, f"a 1.8 MB episode's commit peaked at {peak >> 20} MiB"
    snapshot = EpisodeStore.open(StoreConfig(path=str(tmp_path / "store"))).snapshot()
    snapshot.catalog()
    tracemalloc.start()
    try:
        (back,) = snapshot.read_episodes([ep.episode_id])  # in the camera's own 16-row chunks (it read 16,384 rows: 14 GiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert back.equals(ep) and peak < 200 << 20, f"reading it back peaked at {peak >> 20} MiB"


def test_remembered_chunks_are_not_used_after_another_handle_committed(tmp_path):
    cfg = StoreConfig(path=str(tmp_path / "store"), chunk_rows=32, index_rows=4)
    a = EpisodeStore.create(cfg)
    b = EpisodeStore.open(cfg)
    assert a.writer_id == b.writer_id  # both write the partition "local", taking turns under the lock
    expected = []
    for k in range(7):
        batch = [episode(10 * k + j) for j in range(k % 3 + 1)]
        writer = a if k % 2 == 0 else b
        writer.refresh_index()
        assert writer.append(batch).statuses == ("created",) * len(batch)
        expected += batch
    assert a.append([episode(0)]).statuses == ("duplicate",)  # it reads b's rows, not its memory
    snap = EpisodeStore.open(cfg).snapshot()
    catalog = snap.catalog()
    assert [e.episode_id for e in catalog] == [ep.episode_id for ep in expected]
    assert [e.slot for e in catalog] == list(range(len(expected)))
    for ep, back in zip(expected, snap.read_episodes([ep.episode_id for ep in expected])):
        assert back.equals(ep)


@pytest.fixture
def server(tmp_path):
    tokens = tmp_path / "tokens.json"
    robot, operator = add_token(tokens, "robot", "r0"), add_token(tokens, "operator")
    handle = serve(ServerConfig(port=0, token_file=str(tokens)), StoreConfig(path=str(tmp_path / "store")))
    yield handle, robot, operator
    handle.stop()


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{want}}} in /metrics")


def test_requests_are_counted_by_route_and_status_and_chunked_bodies_arrive_whole(server):
    handle, robot, operator = server
    ep = episode(1)
    body = ep.to_bytes()

    def chunks():
        for i in range(0, len(body), 100):
            yield body[i : i + 100]

    with httpx.Client(base_url=handle.url, headers={"Authorization": f"Bearer {robot}"}) as client:
        assert client.post("/v1/episodes", content=chunks()).status_code == 201  # Transfer-Encoding: chunked, 100-byte chunks
        assert client.post("/v1/episodes", content=body).status_code == 200
        assert client.get("/v1/episodes").status_code == 403
    host, port = handle.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:  # both framings at once: refused before any route
        raw.sendall(b"POST /v1/episodes HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n")
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    assert b" 400 " in answer.split(b"\r\n", 1)[0]
    text = httpx.get(f"{handle.url}/metrics", headers={"Authorization": f"Bearer {operator}"}).text
    assert _metric(text, "flywheel_http_requests_total", method="POST", route="/v1/episodes", status="201") == 1
    assert _metric(text, "flywheel_http_requests_total", method="POST", route="/v1/episodes", status="200") == 1
    assert _metric(text, "flywheel_http_requests_total", method="GET", route="/v1/episodes", status="403") == 1
    snap = handle.app.state.store.snapshot()
    assert snap.read_episode(ep.episode_id).equals(ep)
