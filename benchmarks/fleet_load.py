"""Fleet load: N lightweight robots (asyncio tasks, no MuJoCo) upload real episodes for a bounded
time against 1, 2 and 4 flywheel-server replicas on one episode store, while one replica is
SIGKILLed and restarted every few seconds.

Each robot is one asyncio task with its own robot token and its own connection. It uploads its
episodes one after another to its replica; on a connection error or a 5xx it waits briefly and
sends the same bytes to the next replica (a load balancer's retry: the upload is idempotent). An
episode counts as acknowledged on a 201 or a 200 duplicate. Episodes: simulated pendulum
half_cheetah episodes (200 steps, obs 17, act 6, with qpos/qvel: ~40 KB on the wire), recorded once, each robot's copies given their own ids
and robot id and encoded before the clock starts (and the robots' HTTP clients made, sharing one TLS
context: each would otherwise load the CA bundle, ~55 ms of CPU). The replicas are flywheel-server processes on
one store on local disk (their commits serialise on the store's flock; on object storage they
would race and redo, docs/store.md). Every acknowledgement is durable (fsync per commit).

At the end the store is read: every acknowledged episode must be there (``lost_acknowledged``,
must be 0) and no episode id twice (``stored_twice``). Lines: episodes/s per replica count (ratio
vs 1 replica), MB/s, p50/p99 upload latency, errors seen by robots (each retried), server
CPU-seconds per stored episode (from /proc, all replicas, killed ones included), lost and doubled.

Run: `.venv/bin/python benchmarks/fleet_load.py [--robots 1000] [--seconds 20] [--replicas 1 2 4] [--kill-every 5]`
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import secrets
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from common import emit  # noqa: E402
from policy_fanout import cpu_s  # noqa: E402

from fleet.server import ServerConfig  # noqa: E402
from fleet.server.auth import hash_token  # noqa: E402
from fleet.server.runner import ServerProcess  # noqa: E402
from fleet.store import EpisodeStore, StoreConfig  # noqa: E402
from sim.batched import BatchedStepper  # noqa: E402
from sim.episode import Episode  # noqa: E402
from sim.policy_fn import random_policy  # noqa: E402
from sim.scenario import ScenarioSpec  # noqa: E402


ROBOT, STEPS = "half_cheetah", 200  # never terminates early: every episode is 200 steps (~40 KB on the wire)


def episode_pool(robots: int, per_robot: int) -> list[list[tuple[str, bytes]]]:
    """Per robot, ``per_robot`` (episode id, upload bytes) with that robot's id."""
    with BatchedStepper(ROBOT, 4, robot_id="load", source="real") as stepper:
        act = random_policy(stepper.task.act_dim, 0)
        base = stepper.simulate([ScenarioSpec(ROBOT, seed=s, max_steps=STEPS) for s in range(16)], lambda o: 0.3 * act(o))
    out = []
    for r in range(robots):
        mine = []
        for k in range(per_robot):
            ep = base[(r + k) % len(base)]
            eid = str(uuid.uuid4())
            copy = Episode(**{**ep.__dict__, "metadata": {**ep.metadata, "robot_id": f"robot-{r:04d}", "episode_id": eid}})
            mine.append((eid, copy.to_bytes()))
        out.append(mine)
    return out


class Replicas:
    """n flywheel-server processes on one store; ``kill_one`` SIGKILLs one and starts it again."""

    def __init__(self, n: int, store: StoreConfig, tokens: Path, workdir: Path):
        config = ServerConfig(port=0, token_file=str(tokens), max_concurrent_uploads=64, upload_rate_per_s=1000.0, upload_burst=1000)
        # each replica a stable writer id (docs/store.md, "Writers"): a restarted one appends to its own partition again
        self.procs = [ServerProcess(dataclasses.replace(store, writer_id=f"replica-{i}"), config, workdir / f"replica-{i}") for i in range(n)]
        self.urls = [p.start() for p in self.procs]
        self.cpu_dead = 0.0  # CPU seconds of killed processes

    def kill_one(self, i: int) -> None:
        proc = self.procs[i]
        self.cpu_dead += cpu_s(proc.proc.pid)
        proc.kill()
        self.urls[i] = proc.start()  # a fresh port: robots find it through the list, as through a balancer

    def cpu(self) -> float:
        return self.cpu_dead + sum(cpu_s(p.proc.pid) for p in self.procs if p.proc and p.proc.poll() is None)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


async def load(replicas: Replicas, tokens: list[str], pool: list[list[tuple[str, bytes]]], seconds: float, kill_every: float) -> dict:
    acked: set[str] = set()
    latencies: list[float] = []
    stats = {"errors": 0, "bytes": 0, "kills": 0, "exhausted": 0}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = ssl.create_default_context()  # one for all (plain HTTP here; httpx builds one per client otherwise)
    clients = [httpx.AsyncClient(timeout=30, limits=limits, verify=tls, headers={"Authorization": f"Bearer {t}"}) for t in tokens]
    stop_at = time.monotonic() + seconds

    async def robot(r: int) -> None:
        async with clients[r] as client:
            k, target = 0, r % len(replicas.urls)
            while time.monotonic() < stop_at:
                if k == len(pool[r]):  # every episode of this robot acknowledged: it idles (counted)
                    stats["exhausted"] += 1
                    return
                eid, body = pool[r][k]
                start = time.perf_counter()
                try:
                    response = await client.post(f"{replicas.urls[target]}/v1/episodes", content=body)
                    ok = response.status_code in (200, 201)
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                    acked.add(eid)
                    stats["bytes"] += len(body)
                    k += 1
                else:  # the replica died or refused: the same bytes to the next one
                    stats["errors"] += 1
                    target = (target + 1) % len(replicas.urls)
                    await asyncio.sleep(0.05 + random.random() * 0.1)

    async def killer() -> None:
        i = 0
        while time.monotonic() + kill_every < stop_at:
            await asyncio.sleep(kill_every)
            await asyncio.to_thread(replicas.kill_one, i % len(replicas.procs))
            stats["kills"] += 1
            i += 1

    start = time.monotonic()
    tasks = [asyncio.create_task(robot(r)) for r in range(len(tokens))]
    if kill_every > 0:
        tasks.append(asyncio.create_task(killer()))
    await asyncio.gather(*tasks)
    return {"acked": acked, "latencies": latencies, "elapsed": time.monotonic() - start, **stats}


def run(n: int, robots: int, seconds: float, kill_every: float, pool, workdir: Path) -> dict:
    tokens = [secrets.token_urlsafe(32) for _ in range(robots)]
    token_file = workdir / f"tokens-{n}.json"
    token_file.write_text(json.dumps({hash_token(t): {"role": "robot", "robot_id": f"robot-{i:04d}"} for i, t in enumerate(tokens)}))
    store = StoreConfig(path=str(workdir / f"store-{n}"))
    EpisodeStore.create(store)
    replicas = Replicas(n, store, token_file, workdir / f"replicas-{n}")
    cpu_before = replicas.cpu()
    try:
        result = asyncio.run(load(replicas, tokens, pool, seconds, kill_every))
        cpu = replicas.cpu() - cpu_before
    finally:
        replicas.stop()
    snap = EpisodeStore.open(store).snapshot()
    ids = [e.episode_id for e in snap.catalog()]
    lost = len(result["acked"] - set(ids))
    lat = sorted(result["latencies"])
    return {
        "episodes_per_s": len(result["acked"]) / result["elapsed"], "mb_per_s": result["bytes"] / result["elapsed"] / 1e6,
        "p50_ms": 1e3 * lat[len(lat) // 2] if lat else None, "p99_ms": 1e3 * lat[int(len(lat) * 0.99)] if lat else None,
        "errors": result["errors"], "kills": result["kills"], "exhausted": result["exhausted"], "lost": lost, "twice": len(ids) - len(set(ids)),
        "cpu_s_per_episode": cpu / max(len(set(ids)), 1), "stored": len(set(ids)),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--robots", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0, help="load per replica count")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--kill-every", type=float, default=5.0, help="SIGKILL one replica this often (0: never)")
    parser.add_argument("--per-robot", type=int, default=24, help="distinct episodes per robot, encoded before the clock starts (enough that no robot runs out)")
    args = parser.parse_args()
    pool = episode_pool(args.robots, args.per_robot)
    results = {}
    with tempfile.TemporaryDirectory(prefix="fleet-load-") as tmp:
        for n in args.replicas:
            results[n] = r = run(n, args.robots, args.seconds, args.kill_every, pool, Path(tmp))
            print(f"# {n} replica(s): {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})}", file=sys.stderr)
    one = results[args.replicas[0]]["episodes_per_s"]
    for n, r in results.items():  # goals (p99 <= 100 ms, nothing lost) are not peers: no baseline (docs/benchmarks.md)
        emit(f"fleet_load/replicas_{n}/episodes_per_s", r["episodes_per_s"], "episodes/s", one, round(r["episodes_per_s"] / one, 3) if one else None)
        emit(f"fleet_load/replicas_{n}/mb_per_s", r["mb_per_s"], "MB/s")
        emit(f"fleet_load/replicas_{n}/upload_p50", r["p50_ms"], "ms")
        emit(f"fleet_load/replicas_{n}/upload_p99", r["p99_ms"], "ms")
        emit(f"fleet_load/replicas_{n}/errors_retried", r["errors"], "errors")
        emit(f"fleet_load/replicas_{n}/robots_out_of_episodes", r["exhausted"], "robots")  # > 0: the rate is bound by --per-robot, not the server
        if r["exhausted"]:
            print(f"# {n} replica(s): {r['exhausted']} robots ran out of episodes; the rate above is bound by --per-robot: raise it", file=sys.stderr)
    emit("fleet_load/lost_acknowledged", sum(r["lost"] for r in results.values()), "episodes")
    emit("fleet_load/stored_twice", sum(r["twice"] for r in results.values()), "episodes")
    cpu = statistics.median(r["cpu_s_per_episode"] for r in results.values())
    first = results[args.replicas[0]]["cpu_s_per_episode"]
    emit("fleet_load/cpu_s_per_episode", cpu, "s", first, round(cpu / first, 3) if first else None)


if __name__ == "__main__":
    main()
