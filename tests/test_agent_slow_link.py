"""A robot on an uplink slower than the server waits for a body (``body_timeout_s``: 408) still uploads.

A proxy probe: a plain POST answered 408 was sent again, whole, for ever, and a resumable upload's chunks likewise
(only a 413 made them smaller): the episode never arrived. Here a real flywheel-server behind a real TCP relay that
passes the robot's bytes at 100 kB/s."""

from __future__ import annotations

import socket
import threading
import time

from fleet.agent.agent import RobotAgent
from fleet.agent.config import AgentConfig
from fleet.server import ServerConfig, add_token, serve
from fleet.store import EpisodeStore, StoreConfig
from sim.episode import Episode
from tests.conftest import make_episode_arrays

RATE = 100_000  # bytes/s from the robot to the server


class SlowUplink:
    """A TCP relay on loopback: the robot's bytes go on at RATE, the server's come back at once."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream, self.listener, self.rate = upstream, socket.create_server(("127.0.0.1", 0)), RATE
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                robot, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(robot, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, robot, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while data := src.recv(4096):
                dst.sendall(data)
                if slow:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_an_episode_slower_than_the_body_timeout_arrives_in_chunks_that_each_do(tmp_path):
    tokens = tmp_path / "tokens.json"
    token = add_token(tokens, "robot", "r0")
    server = serve(ServerConfig(port=0, token_file=str(tokens), body_timeout_s=1.0), StoreConfig(path=str(tmp_path / "store"), fsync=False))
    host, port = server.url.removeprefix("http://").split(":")
    link = SlowUplink((host, int(port)))
    episode = Episode.create(**make_episode_arrays(num_steps=2500, obs_dim=12, seed=0), robot_id="r0", robot_model="toy", source="real")
    assert 120_000 < len(episode.to_bytes()) < 200_000  # 1.2-2 s on this link: over the 1 s the server waits for a body
    agent = RobotAgent(AgentConfig(server_url=link.url, spool_dir=str(tmp_path / "spool"), backoff_initial_s=0.05, backoff_max_s=0.2, compress_uploads=False), "r0", token=token).start()
    try:
        agent.submit(episode)
        assert agent.wait_drained(60), agent.status()
        assert agent.status()["created"] == 1
        sender = agent.uploader._resumable
        before = sender.slow_cap
        assert before is not None and before < len(episode.to_bytes())  # the chunk size the link allowed
        link.rate = 100 * RATE  # the link recovers: each resumable upload without a timeout doubles the chunks back
        agent.uploader.resumable_threshold_bytes = 100_000  # these episodes in chunks too
        caps = []
        for seed in (1, 2, 3, 4):
            agent.submit(Episode.create(**make_episode_arrays(num_steps=2500, obs_dim=12, seed=seed), robot_id="r0", robot_model="toy", source="real"))
            assert agent.wait_drained(60), agent.status()
            caps.append(sender.slow_cap)
        assert caps == [2 * before, 4 * before, 8 * before, 16 * before] and agent.status()["created"] == 5  # back up to the server's chunk size
    finally:
        agent.stop()
        link.close()
        server.stop()
    stored = EpisodeStore.open(StoreConfig(path=str(tmp_path / "store"))).snapshot()
    assert stored.read_episode(episode.episode_id).to_bytes() == episode.to_bytes()
