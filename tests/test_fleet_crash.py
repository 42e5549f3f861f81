"""SIGKILL the server (a real separate process) at random points while robot agents upload,
many times: no partial episode is ever visible, every acknowledged episode is present, and
the agents resend the rest until the store holds every episode exactly once."""

import json
import signal
import socket
import threading
import time

import numpy as np

from fleet.agent import AgentConfig, RobotAgent
from fleet.server import ServerConfig, add_token
from fleet.server.runner import ServerProcess
from fleet.store import EpisodeStore, StoreConfig
from sim.episode import Episode
from tests.conftest import make_episode_arrays

ROBOTS, PER_ROUND, KILLS = 6, 3, 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_store(store_cfg: StoreConfig, originals: dict[str, Episode], acked: set[str]) -> int:
    """Every visible episode is complete and bit-exact; every acknowledged one is visible."""
    snap = EpisodeStore.open(store_cfg).snapshot()
    ids = [e.episode_id for e in snap.catalog()]
    assert len(ids) == len(set(ids)), "an episode is stored twice"
    assert acked <= set(ids), f"acknowledged but missing: {sorted(acked - set(ids))[:5]}"
    for eid, back in zip(ids, snap.read_episodes(ids)):  # verify=True re-checks each commit digest
        assert back.equals(originals[eid])
    return len(ids)


def test_sigkill_during_uploads_loses_nothing_acknowledged(tmp_path):
    rng = np.random.default_rng(0)
    tokens = tmp_path / "tokens.json"
    tok = {r: add_token(tokens, "robot", f"robot-{r}") for r in range(ROBOTS)}
    store_cfg = StoreConfig(path=str(tmp_path / "store"), chunk_rows=512, index_rows=8)
    server = ServerProcess(store_cfg, ServerConfig(port=free_port(), token_file=str(tokens)), tmp_path / "server")
    agent_cfg = AgentConfig(server_url=f"http://127.0.0.1:{server.server.port}", spool_dir=str(tmp_path / "spool"), backoff_initial_s=0.05, backoff_max_s=0.3, request_timeout_s=10)
    originals: dict[str, Episode] = {}
    acked: set[str] = set()
    lock = threading.Lock()

    def on_ack(episode_id: str, status: str) -> None:
        with lock:
            acked.add(episode_id)

    agents = [RobotAgent(agent_cfg, f"robot-{r}", token=tok[r], on_ack=on_ack, seed=r).start() for r in range(ROBOTS)]
    counts = []
    try:
        for round_ in range(KILLS):
            for r, agent in enumerate(agents):  # robots keep producing episodes, server up or not
                for k in range(PER_ROUND):
                    steps = int(rng.integers(20, 80))
                    ep = Episode.create(
                        **make_episode_arrays(num_steps=steps, seed=1000 * round_ + 10 * r + k), robot_id=f"robot-{r}", robot_model="toy", source="real"
                    )
                    originals[ep.episode_id] = ep
                    agent.submit(ep)
            server.start()
            time.sleep(float(rng.uniform(0.05, 0.5)))
            server.kill()
            with lock:
                acked_now = set(acked)
            counts.append((len(acked_now), check_store(store_cfg, originals, acked_now)))
        server.start()
        assert all(a.wait_drained(120) for a in agents), [a.status() for a in agents]
    finally:
        for a in agents:
            a.stop()
        server.stop()
    assert check_store(store_cfg, originals, set(originals)) == ROBOTS * PER_ROUND * KILLS
    resent = sum(a.uploader.stats["duplicate"] for a in agents)
    failed = sum(a.uploader.stats["failed_attempts"] for a in agents)
    print(json.dumps({"kills": KILLS, "episodes": len(originals), "acked_and_stored_after_each_kill": counts, "acks_lost_then_resent": resent, "failed_attempts": failed}))


def test_sighup_stops_the_server_as_sigterm_does(tmp_path):
    """SIGHUP (a unit's ExecReload=kill -HUP, a closed terminal) killed the server on the spot: no drain, its ready file
    left behind. It stops as SIGTERM does: what it acknowledged is stored, the ready file goes, it exits by SIGTERM."""
    import httpx

    tokens = tmp_path / "tokens.json"
    token = add_token(tokens, "robot", "robot-0")
    store_cfg = StoreConfig(path=str(tmp_path / "store"), chunk_rows=512, index_rows=8)
    server = ServerProcess(store_cfg, ServerConfig(port=free_port(), token_file=str(tokens)), tmp_path / "server")
    url = server.start()
    try:
        ep = Episode.create(**make_episode_arrays(num_steps=30, seed=5), robot_id="robot-0", robot_model="toy", source="real")
        answer = httpx.post(f"{url}/v1/episodes", content=ep.to_bytes(), headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert answer.status_code == 201, answer.text
    finally:
        code = server.stop(sig=signal.SIGHUP)
    assert code == -signal.SIGTERM and not server.ready_file.exists(), (code, (tmp_path / "server" / "server.log").read_text()[-2000:])
    assert check_store(store_cfg, {ep.episode_id: ep}, {ep.episode_id}) == 1
