"""32 robot clients upload at once to a real server on loopback; every acknowledged episode
reads back bit-exact from the store, each exactly once."""

import threading

import httpx
import numpy as np

from fleet.server import ServerConfig, add_token, serve
from fleet.store import EpisodeStore, StoreConfig
from sim.episode import Episode
from tests.conftest import make_episode_arrays

ROBOTS, PER_ROBOT = 32, 4


def robot_episodes(robot: int) -> list[Episode]:
    rng = np.random.default_rng(robot)
    out = []
    for k in range(PER_ROBOT):
        steps = int(rng.integers(10, 200))
        extras = {"qpos": rng.standard_normal((steps + 1, 5)).astype(np.float32)}
        out.append(
            Episode.create(
                **make_episode_arrays(num_steps=steps, obs_dim=6, act_dim=3, seed=1000 * robot + k),
                robot_id=f"robot-{robot}",
                robot_model="toy",
                source="real",
                extras=extras,
            )
        )
    return out


def test_32_robots_upload_concurrently_and_every_ack_reads_back_bit_exact(tmp_path):
    tokens = tmp_path / "tokens.json"
    tok = {r: add_token(tokens, "robot", f"robot-{r}") for r in range(ROBOTS)}
    store_cfg = StoreConfig(path=str(tmp_path / "store"), chunk_rows=1024, index_rows=16)
    handle = serve(ServerConfig(port=0, token_file=str(tokens)), store_cfg)
    episodes = {r: robot_episodes(r) for r in range(ROBOTS)}
    acked: dict[str, int] = {}
    barrier, lock, errors = threading.Barrier(ROBOTS), threading.Lock(), []

    def robot(r: int) -> None:
        with httpx.Client(base_url=handle.url, headers={"Authorization": f"Bearer {tok[r]}"}, timeout=60) as client:
            barrier.wait()
            for ep in episodes[r]:
                resp = client.post("/v1/episodes", content=ep.to_bytes())
                with lock:
                    if resp.status_code == 201:
                        acked[ep.episode_id] = r
                    else:
                        errors.append((r, resp.status_code, resp.text))

    try:
        threads = [threading.Thread(target=robot, args=(r,)) for r in range(ROBOTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        handle.stop()
    assert errors == [] and len(acked) == ROBOTS * PER_ROBOT
    snap = EpisodeStore.open(store_cfg).snapshot()
    stored = [e.episode_id for e in snap.catalog()]
    assert len(stored) == len(set(stored)) == len(acked) and set(stored) == set(acked)
    originals = [ep for r in range(ROBOTS) for ep in episodes[r]]
    for ep, back in zip(originals, snap.read_episodes([ep.episode_id for ep in originals])):  # verify=True: digests too
        assert back.to_bytes() == ep.to_bytes()
