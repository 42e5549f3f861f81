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
import shutil
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


def soak(episodes: int, read_back: int = 500, log=print) -> dict:
    """Upload ``episodes`` from ROBOTS robot threads to a flywheel-server process, read ``read_back``
    of them back and list the store, idle 5 s. Returns RssAnon samples (MiB: ``start``, ``halfway``,
    ``peak``, ``end``), the acknowledged episode ids and the ids the read-back found."""
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
            for _ in range(episodes // ROBOTS):
                ep = Episode.create(**arrays, robot_id=f"r{i}", robot_model="toy", source="real")
                response = client.post("/v1/episodes", content=ep.to_bytes())
                while response.status_code == 429:  # over this token's rate: wait as told, then go on
                    time.sleep(float(response.headers.get("retry-after", "1")))
                    response = client.post("/v1/episodes", content=ep.to_bytes())
                response.raise_for_status()
                with lock:
                    done[0] += 1
                    ids.append(ep.episode_id)

    try:
        out = {"start": rss_anon_mib(pid), "halfway": None, "peak": 0.0}
        threads = [threading.Thread(target=robot, args=(i,)) for i in range(ROBOTS)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(0.5)
            now = rss_anon_mib(pid)
            out["peak"] = max(out["peak"], now)
            if out["halfway"] is None and done[0] >= episodes // 2:
                out["halfway"] = now
            log(f"# {done[0]} episodes, RssAnon {now:.0f} MiB")
        if out["halfway"] is None:  # the uploads passed halfway and ended between two samples: the level they left
            out["halfway"] = rss_anon_mib(pid)
            out["peak"] = max(out["peak"], out["halfway"])
        found = set()
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {operator}"}) as client:
            for eid in ids[:: max(1, len(ids) // read_back)]:
                client.get(f"/v1/episodes/{eid}").raise_for_status()
            total, offset = None, 0
            while total is None or offset < total:  # the whole listing, page by page
                page = client.get("/v1/episodes", params={"limit": 1000, "offset": offset})
                page.raise_for_status()
                body = page.json()
                found.update(e["episode_id"] for e in body["episodes"])
                total, offset = body["total"], offset + 1000
        time.sleep(5)
        out.update(end=rss_anon_mib(pid), acknowledged=list(ids), listed=found)
        log(f"# start {out['start']:.0f} MiB, halfway {out['halfway']:.0f} MiB, peak {out['peak']:.0f} MiB, idle after read-back {out['end']:.0f} MiB")
        return out
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)  # the store and tokens: ~300 MB at the default 12,800 episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=12800, help=f"episodes uploaded, {ROBOTS} or more (each of the {ROBOTS} robots uploads episodes // {ROBOTS})")
    args = parser.parse_args()
    if args.episodes < ROBOTS:  # each robot uploads episodes // ROBOTS: fewer would upload nothing, and measure nothing
        parser.error(f"--episodes {args.episodes} is below the {ROBOTS} robots, so no robot would upload one: give {ROBOTS} or more")
    out = soak(args.episodes, log=lambda line: print(line, file=sys.stderr))
    emit("server/rss_anon_mib", out["end"], "MiB", round(out["halfway"], 1), round(out["end"] / out["halfway"], 3))


if __name__ == "__main__":
    main()
