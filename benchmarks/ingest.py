"""Fleet ingest speed: episodes/s and MB/s end to end through HTTP (1 and 16 concurrent robots),
p99 upload latency, a lone robot's median latency against one fsync'd commit of one episode (goal
<= 2x), the store's own append speed, the read-back rate (every stored episode from a
pinned snapshot in one call, and one at a time; baseline the 16 robots' ingest rate, goal >= 1),
and store bytes per transition.

Episodes: 1,000-step Ant episodes (obs 27, act 8, qpos 15, qvel 14; ~271 KB each on the wire),
simulated in MuJoCo once, then copied with fresh episode ids and per-copy sensor noise so
no two uploads carry the same bytes. Every acknowledgement means durable (fsync per commit).

Baseline (physical limit, same run, same bytes): np.save of the episodes' arrays into one file
per batch of 16 episodes, fsync after each file. Ratios are ours / baseline (goal >= 0.5).

The server runs as its own process (flywheel-server), the robots are threads of this one.
Run: `.venv/bin/python benchmarks/ingest.py [--repeats 3] [--episodes 48]`
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import emit  # noqa: E402

from fleet.server import ServerConfig, add_token  # noqa: E402
from fleet.server.runner import ServerProcess  # noqa: E402
from fleet.store import EpisodeStore, StoreConfig  # noqa: E402
from sim.batched import BatchedStepper  # noqa: E402
from sim.episode import Episode  # noqa: E402
from sim.scenario import ScenarioSpec  # noqa: E402

BATCH = 16


def simulate_pool(n: int) -> list[Episode]:
    rng = np.random.default_rng(0)
    with BatchedStepper("ant", 2, robot_id="bench", source="real") as stepper:
        specs = [ScenarioSpec(robot="ant", seed=i, max_steps=1000, init_noise_scale=0.1) for i in range(n)]
        eps = stepper.simulate(specs, lambda o: (0.2 * rng.uniform(-1, 1, (o.shape[0], 8))).astype(np.float32))
    return [e for e in eps if e.num_steps == 1000]


def variants(pool: list[Episode], count: int, robot_id: str, seed: int) -> list[Episode]:
    """``count`` distinct episodes: pool copies with new ids and small per-copy sensor noise."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        base = pool[k % len(pool)]
        noisy = {n: (a + rng.normal(0, 1e-3, a.shape).astype(a.dtype)) if a.dtype == np.float32 and n != "action" else a for n, a in base.arrays().items()}
        required = {n: noisy.pop(n) for n in ("observation", "action", "reward", "terminated", "truncated", "timestamp")}
        meta = {k2: v for k2, v in base.metadata.items() if k2 not in ("schema_version", "robot_id", "episode_id", "source", "robot_model", "policy_version")}
        out.append(
            Episode.create(**required, extras=noisy, robot_id=robot_id, robot_model="ant", source="real", policy_version="bench", episode_id=str(uuid.uuid4()), **meta)
        )
    return out


def np_save_rate(episodes: list[Episode], workdir: Path) -> float:
    """MB/s of np.save + fsync of the same arrays, one file per batch of 16 episodes."""
    nbytes = sum(len(e.to_bytes()) for e in episodes)
    start = time.perf_counter()
    for i in range(0, len(episodes), BATCH):
        with open(workdir / f"batch{i}.npy", "wb") as f:
            for ep in episodes[i : i + BATCH]:
                for arr in ep.arrays().values():
                    np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
    return nbytes / (time.perf_counter() - start) / 1e6


def store_rate(episodes: list[Episode], path: Path) -> float:
    """MB/s of EpisodeStore.append in batches of 16 (no HTTP), fsync per commit."""
    store = EpisodeStore.open_or_create(StoreConfig(path=str(path)))
    nbytes = sum(len(e.to_bytes()) for e in episodes)
    start = time.perf_counter()
    for i in range(0, len(episodes), BATCH):
        store.append(episodes[i : i + BATCH])
    return nbytes / (time.perf_counter() - start) / 1e6


def commit_seconds(episodes: list[Episode], path: Path) -> list[float]:
    """Seconds of each EpisodeStore.append of one episode (no HTTP): one fsync'd commit each."""
    store = EpisodeStore.open_or_create(StoreConfig(path=str(path)))
    out = []
    for episode in episodes:
        start = time.perf_counter()
        store.append([episode])
        out.append(time.perf_counter() - start)
    return out


def http_run(url: str, tokens: dict[str, str], bodies: dict[str, list[bytes]]) -> tuple[float, float, list[float]]:
    """Each robot uploads its bodies back to back. Returns (episodes/s, MB/s, latencies in s)."""
    latencies: list[float] = []
    lock, barrier = threading.Lock(), threading.Barrier(len(bodies) + 1)
    failures: list[str] = []

    def robot(robot_id: str) -> None:
        mine = []
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {tokens[robot_id]}"}) as client:
            barrier.wait()
            for body in bodies[robot_id]:
                t0 = time.perf_counter()
                r = client.post("/v1/episodes", content=body)
                mine.append(time.perf_counter() - t0)
                if r.status_code != 201:
                    failures.append(f"{r.status_code} {r.text[:200]}")
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=robot, args=(rid,)) for rid in bodies]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} uploads failed, e.g. {failures[0]}")
    n = sum(len(b) for b in bodies.values())
    nbytes = sum(len(x) for b in bodies.values() for x in b)
    return n / elapsed, nbytes / elapsed / 1e6, latencies


def commit_summary(url: str, operator_token: str) -> str:
    """Group-commit statistics from the server's /metrics: commits, episodes per commit, seconds per commit."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {operator_token}"}).text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    commits = float(values["flywheel_commits_total"])
    episodes = float(values["flywheel_commit_episodes_sum"])
    seconds = float(values["flywheel_commit_seconds_sum"])
    return f"{commits:.0f} commits, {episodes / commits:.1f} episodes/commit, {1e3 * seconds / commits:.1f} ms/commit"


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a process has used so far; None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=48, help="uploads per repeat and robot count (1 robot: this many; 16 robots: this many each / 16 * 4)")
    parser.add_argument("--robots", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flywheel-ingest-"))
    try:
        t0 = time.perf_counter()
        pool = simulate_pool(8)
        print(f"# simulated {len(pool)} Ant episodes of 1000 steps in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        n1, n16 = args.episodes, args.episodes * 4
        per_robot = max(1, n16 // args.robots)
        tokens_file = work / "tokens.json"
        robot_ids = [f"robot-{r}" for r in range(args.robots)]
        tokens = {rid: add_token(tokens_file, "robot", rid) for rid in robot_ids}
        operator = add_token(tokens_file, "operator")
        base, store_mb, one, many, commits = [], [], [], [], []
        lat1, lat16 = [], []
        cpu = {"1_robot": [0.0, 0], f"{args.robots}_robots": [0.0, 0]}  # the server process's CPU seconds, uploads
        # the server's capacity, not its per-token admission policy: rate limits sized to the load
        limits = {"max_concurrent_uploads": 64, "upload_rate_per_s": 1e6, "upload_burst": 10**6}
        server = ServerProcess(StoreConfig(path=str(work / "http-store")), ServerConfig(port=free_port(), token_file=str(tokens_file), **limits), work / "server")
        url = server.start()
        try:
            for rep in range(args.repeats):
                eps1 = variants(pool, n1, robot_ids[0], seed=10 * rep + 1)
                eps16 = {rid: variants(pool, per_robot, rid, seed=1000 * rep + r) for r, rid in enumerate(robot_ids)}
                flat16 = [e for v in eps16.values() for e in v]
                scratch = work / f"npsave{rep}"
                scratch.mkdir()
                base.append(np_save_rate(flat16, scratch))
                shutil.rmtree(scratch)
                store_mb.append(store_rate(variants(pool, n16, "direct", seed=5000 + rep), work / "direct-store"))
                commits += commit_seconds(variants(pool, 16, "single", seed=7000 + rep), work / "single-store")
                bodies1 = {robot_ids[0]: [e.to_bytes() for e in eps1]}
                before = process_cpu_s(server.proc.pid)
                eps_s, mb_s, lat = http_run(url, tokens, bodies1)
                after = process_cpu_s(server.proc.pid)
                one.append((eps_s, mb_s))
                lat1 += lat
                if before is not None and after is not None:
                    cpu["1_robot"][0] += after - before
                    cpu["1_robot"][1] += len(eps1)
                bodies16 = {rid: [e.to_bytes() for e in v] for rid, v in eps16.items()}
                before = process_cpu_s(server.proc.pid)
                eps_s, mb_s, lat = http_run(url, tokens, bodies16)
                after = process_cpu_s(server.proc.pid)
                many.append((eps_s, mb_s))
                lat16 += lat
                if before is not None and after is not None:
                    cpu[f"{args.robots}_robots"][0] += after - before
                    cpu[f"{args.robots}_robots"][1] += len(flat16)
                print(f"# repeat {rep}: np.save {base[-1]:.0f} MB/s, store {store_mb[-1]:.0f} MB/s, http x1 {one[-1][1]:.1f} MB/s, x{args.robots} {many[-1][1]:.1f} MB/s", file=sys.stderr)
            print(f"# server: {commit_summary(url, operator)}", file=sys.stderr)
        finally:
            server.stop()
        b = statistics.median(base)
        wire = len(pool[0].to_bytes())
        emit("ingest/np_save_fsync_MBps", b, "MB/s")
        s = statistics.median(store_mb)
        emit("ingest/store_append_MBps", s, "MB/s", b, s / b)
        commit_ms = statistics.median(commits) * 1e3
        emit("ingest/store_commit_one_episode_ms", commit_ms, "ms")
        # a lone robot's upload, request to acknowledgement, vs one fsync'd commit of one episode (goal <= 2x)
        emit("ingest/http_1_robot_p50_latency_ms", float(np.median(lat1)) * 1e3, "ms", commit_ms, float(np.median(lat1)) * 1e3 / commit_ms)
        for name, runs, lats in (("1_robot", one, lat1), (f"{args.robots}_robots", many, lat16)):
            eps_s, mb_s = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            emit(f"ingest/http_{name}_episodes_per_s", eps_s, "episodes/s", b * 1e6 / wire, eps_s / (b * 1e6 / wire))
            emit(f"ingest/http_{name}_MBps", mb_s, "MB/s", b, mb_s / b)
            emit(f"ingest/http_{name}_p99_latency_ms", float(np.percentile(lats, 99)) * 1e3, "ms")
            if cpu[name][1]:  # the server's CPU per upload (parse, validate, digest, commit share; all its threads)
                emit(f"ingest/http_{name}_server_cpu_ms_per_episode", 1e3 * cpu[name][0] / cpu[name][1], "ms")
        store = EpisodeStore.open(StoreConfig(path=str(work / "http-store")))
        # read-back: every stored episode from a pinned snapshot, in one call (as a trainer reads) and one at a time
        snap = store.snapshot()
        infos = snap.episodes()
        start = time.perf_counter()
        back = snap.read_episodes(infos)
        batch_rate = len(back) / (time.perf_counter() - start)
        start = time.perf_counter()
        for info in infos[:64]:
            snap.read_episode(info.episode_id)
        one_rate = min(64, len(infos)) / (time.perf_counter() - start)
        ingest_rate = statistics.median(r[0] for r in many)  # the 16 robots' HTTP ingest, episodes/s
        emit("ingest/read_back_episodes_per_s", batch_rate, "episodes/s", ingest_rate, batch_rate / ingest_rate)
        emit("ingest/read_one_episode_per_s", one_rate, "episodes/s", ingest_rate, one_rate / ingest_rate)
        transitions = sum(e.num_steps for e in snap.catalog())
        per_transition = du(work / "http-store") / transitions
        raw_per_transition = wire / pool[0].num_steps
        emit("ingest/store_bytes_per_transition", per_transition, "bytes", raw_per_transition, per_transition / raw_per_transition)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
