"""Server memory under sustained ingest: does flywheel-server's memory level off?

16 robot threads upload ``--episodes`` 200-step episodes to flywheel-server (its own process,
real store, real HTTP). Then an operator reads back 500 of them and lists the store, and the
server idles for 5 s. The server's anonymous resident memory (RssAnon: heap, not file cache) is
sampled all along.

Line: ``server/rss_anon_mib``. Its value is the idle level at the end, and its baseline is the
level halfway through the uploads. The ratio, end / halfway, is 1.0 for memory that is flat,
and more for memory that keeps growing with the episodes ingested.

Run: `.venv/bin/python benchmarks/server_memory.py [--episodes 12800]`
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from common import emit  # noqa: E402

from fleet.server import ServerConfig, add_token  # noqa: E402
from fleet.server.runner import ServerProcess  # noqa: E402
from fleet.store import StoreConfig  # noqa: E402
from sim.episode import Episode  # noqa: E402
from tests.conftest import make_episode_arrays  # noqa: E402

ROBOTS = 16


def rss_anon_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc: Linux only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=12800)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="flywheel-memory-"))
    tokens = root / "tokens.json"
    tok = {f"r{i}": add_token(tokens, "robot", f"r{i}") for i in range(ROBOTS)}
    operator = add_token(tokens, "operator")
    server = ServerProcess(StoreConfig(path=str(root / "store"), fsync=False), ServerConfig(port=0, token_file=str(tokens)), root / "server")
    url = server.start()
    pid = server.proc.pid
    arrays = make_episode_arrays(num_steps=200, seed=0)
    done, ids, lock = [0], [], threading.Lock()

    def robot(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {tok[f'r{i}']}"}) as client:
            for _ in range(args.episodes // ROBOTS):
                ep = Episode.create(**arrays, robot_id=f"r{i}", robot_model="toy", source="real")
                response = client.post("/v1/episodes", content=ep.to_bytes())
                if response.status_code == 429:  # over this token's rate: wait as told, then go on
                    time.sleep(float(response.headers.get("retry-after", "1")))
                    response = client.post("/v1/episodes", content=ep.to_bytes())
                response.raise_for_status()
                with lock:
                    done[0] += 1
                    ids.append(ep.episode_id)

    try:
        start = rss_anon_mib(pid)
        threads = [threading.Thread(target=robot, args=(i,)) for i in range(ROBOTS)]
        for t in threads:
            t.start()
        halfway = None
        while any(t.is_alive() for t in threads):
            time.sleep(0.5)
            if halfway is None and done[0] >= args.episodes // 2:
                halfway = rss_anon_mib(pid)
            print(f"# {done[0]} episodes, RssAnon {rss_anon_mib(pid):.0f} MiB", file=sys.stderr)
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {operator}"}) as client:
            for eid in ids[:: max(1, len(ids) // 500)]:
                client.get(f"/v1/episodes/{eid}").raise_for_status()
            client.get("/v1/episodes", params={"limit": 1000}).raise_for_status()
        time.sleep(5)
        end = rss_anon_mib(pid)
        print(f"# start {start:.0f} MiB, halfway {halfway:.0f} MiB, idle after read-back {end:.0f} MiB", file=sys.stderr)
        emit("server/rss_anon_mib", end, "MiB", round(halfway, 1), round(end / halfway, 3))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
