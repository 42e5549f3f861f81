"""Policy fan-out: N robots polling the registry's timestamp.json at once, conditional GETs (304)
against full GETs (200, the baseline, same run).

Each robot is one asyncio task with its own httpx connection and its own robot token (what 1,000
robots look like to the server); no MuJoCo, no TUF verification on the client side (that is the
robot's own CPU, not the server's). A warm-up GET per robot opens its connection and learns the
ETag; then every robot polls ``--rounds`` times back to back, in a phase of plain GETs (200, the
whole timestamp.json) and then a phase of If-None-Match GETs (304, headers only); ``--pairs`` such
pairs alternate, so load from other processes on a shared machine falls on both kinds alike. The server is
flywheel-server in its own process, serving a registry with one published policy.

Lines: requests/s, p50 and p99 latency (ms), bytes served per poll (status line, headers and
body, as HTTP/1.1 puts them on the wire) and the server process's CPU ms per poll (from
/proc/<pid>/stat, so other load on the machine does not count), each conditional with the full GET
as baseline; ratio = conditional / full, null where the full GET's reads 0 (the server's CPU time
comes in 10 ms ticks, so a short run, a few robots and rounds, can read none).
Run: `.venv/bin/python benchmarks/policy_fanout.py [--robots 1000] [--rounds 2] [--pairs 2]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from common import emit  # noqa: E402

from fleet.registry.store import open_registry  # noqa: E402
from fleet.server import ServerConfig  # noqa: E402
from fleet.server.auth import hash_token  # noqa: E402
from fleet.server.runner import ServerProcess  # noqa: E402
from fleet.store import StoreConfig  # noqa: E402

TIMESTAMP = "/v1/tuf/metadata/timestamp.json"


def wire_bytes(response: httpx.Response) -> int:
    """The answer's size on an HTTP/1.1 wire: status line, headers, blank line, body."""
    head = len(f"HTTP/1.1 {response.status_code} {response.reason_phrase}\r\n") + 2
    return head + sum(len(k) + len(v) + 4 for k, v in response.headers.raw) + len(response.content)


def make_registry(workdir: Path, robots: int) -> tuple[list[str], list[str]]:
    """A registry with one published policy, a token file with one robot token per robot; returns
    (tokens, the server's registry overrides)."""
    keys = workdir / "keys"
    registry = open_registry(workdir / "registry", keys / "online.pem", root_keys=[keys / f"root-{i}.pem" for i in (1, 2, 3)])
    registry.publish(secrets.token_bytes(1 << 16), robot_model="pendulum", obs_dim=4, act_dim=1)
    tokens = [secrets.token_urlsafe(32) for _ in range(robots)]
    entries = {hash_token(t): {"role": "robot", "robot_id": f"robot-{i:04d}"} for i, t in enumerate(tokens)}
    (workdir / "tokens.json").write_text(json.dumps(entries))
    overrides = [f"fleet.registry.dir={workdir / 'registry'}", f"fleet.registry.online_key={keys / 'online.pem'}", "fleet.registry.root_keys=[]"]
    return tokens, overrides


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def poll_phase(clients: list[httpx.AsyncClient], etags: list[str] | None, rounds: int, server_pid: int) -> dict:
    """Every robot polls ``rounds`` times back to back (If-None-Match with its ETag when ``etags``)."""
    expected = 200 if etags is None else 304

    async def robot(i: int) -> list[tuple[float, int]]:
        headers = {"If-None-Match": etags[i]} if etags is not None else {}
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            response = await clients[i].get(TIMESTAMP, headers=headers)
            samples.append((time.perf_counter() - start, wire_bytes(response)))
            if response.status_code != expected:
                raise RuntimeError(f"a poll answered {response.status_code}, expected {expected}")
        return samples

    cpu, start = cpu_s(server_pid), time.perf_counter()
    per_robot = await asyncio.gather(*(robot(i) for i in range(len(clients))))
    return {"wall": time.perf_counter() - start, "server_cpu": cpu_s(server_pid) - cpu, "samples": [s for r in per_robot for s in r]}


async def fleet_polls(url: str, tokens: list[str], rounds: int, pairs: int, server_pid: int) -> dict:
    """One warm-up GET per robot (its connection, its ETag), then ``pairs`` times: a phase of full
    GETs, a phase of conditional ones (alternating, so load from elsewhere hits both alike)."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {t}"}, limits=limits, timeout=120.0) for t in tokens]
    try:
        warm = await asyncio.gather(*(c.get(TIMESTAMP) for c in clients))
        if any(r.status_code != 200 for r in warm):
            raise RuntimeError(f"warm-up failed: {sorted({r.status_code for r in warm})}")
        etags = [r.headers["etag"] for r in warm]
        phases = {"full": [], "conditional": []}
        for _ in range(pairs):
            phases["full"].append(await poll_phase(clients, None, rounds, server_pid))
            phases["conditional"].append(await poll_phase(clients, etags, rounds, server_pid))
        return {kind: summary(runs) for kind, runs in phases.items()}
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


def summary(runs: list[dict]) -> dict:
    samples = [s for run in runs for s in run["samples"]]
    latencies = sorted(s[0] for s in samples)
    return {
        "rate": len(samples) / sum(run["wall"] for run in runs),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "bytes": statistics.mean(s[1] for s in samples),
        "cpu_ms": 1000 * sum(run["server_cpu"] for run in runs) / len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--robots", type=int, default=1000, help="concurrent robots (each its own connection and token)")
    parser.add_argument("--rounds", type=int, default=2, help="polls per robot in each phase")
    parser.add_argument("--pairs", type=int, default=2, help="full-then-conditional phase pairs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="policy-fanout-") as tmp:
        workdir = Path(tmp)
        tokens, overrides = make_registry(workdir, args.robots)
        server = ServerProcess(
            StoreConfig(path=str(workdir / "store")), ServerConfig(port=0, token_file=str(workdir / "tokens.json")), workdir / "server", overrides
        )
        url = server.start()
        try:
            results = asyncio.run(fleet_polls(url, tokens, args.rounds, args.pairs, server.proc.pid))
        finally:
            server.stop()
    full, conditional = results["full"], results["conditional"]
    n = args.robots
    ratio = lambda key: round(conditional[key] / full[key], 3) if full[key] else None  # noqa: E731  (a baseline that reads 0: no ratio)
    emit(f"policy_fanout/polls_per_s_304_{n}_robots", conditional["rate"], "req/s", round(full["rate"], 1), ratio("rate"))
    for q in ("p50_ms", "p99_ms"):
        emit(f"policy_fanout/poll_{q[:3]}_304_{n}_robots", conditional[q], "ms", round(full[q], 3), ratio(q))
    emit("policy_fanout/bytes_per_poll_304", conditional["bytes"], "bytes", round(full["bytes"], 1), ratio("bytes"))
    emit(f"policy_fanout/server_cpu_per_poll_304_{n}_robots", conditional["cpu_ms"], "ms", round(full["cpu_ms"], 3), ratio("cpu_ms"))


if __name__ == "__main__":
    main()
