"""Simulating scenarios in MuJoCo, fanned out over any map function (Ray tasks, or in-process).

The library never starts Ray: :func:`simulate_scenarios` takes ``map_fn(fn, jobs) -> results
in order`` (default: the builtin ``map``). A caller with a Ray cluster passes one that runs
``fn`` as Ray tasks, e.g.::

    remote = ray.remote(run_job)
    ray_map = lambda fn, jobs: ray.get([remote.remote(job) for job in jobs])

A :class:`SimulationJob` holds only scenario JSON strings, names and a policy factory; a
job's result is a list of episodes as canonical safetensors bytes, parsed and validated
here (no pickled episodes cross the boundary). Keep the factory a module-level function
(or a functools.partial of one over plain values such as weight bytes) so an executor
ships a reference to code, not an object graph.

Determinism: a scenario's episode depends only on its spec and the policy (the stepper's
guarantee), so the fan-out gives the same episodes however the jobs are spread, provided
the policy's action for a row does not depend on the other rows of its batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

from sim.batched import BatchedStepper
from sim.episode import Episode
from sim.scenario import ScenarioSpec

MapFn = Callable[[Callable, Iterable], Iterable]
PolicyFactory = Callable[[], object]  # -> a numpy callable or torch module, built inside the worker


@dataclasses.dataclass(frozen=True)
class SimulationJob:
    robot: str
    scenarios: tuple[str, ...]  # ScenarioSpec JSON, all of ``robot``
    policy_factory: PolicyFactory
    policy_version: str = "none"
    robot_id: str = "sim"
    num_worlds: int = 64
    nthread: int = 1


def run_job(job: SimulationJob) -> list[bytes]:
    """Simulate one job's scenarios; returns their episodes as safetensors bytes, in the scenarios' order."""
    specs = [ScenarioSpec.from_json(text) for text in job.scenarios]
    with BatchedStepper(
        job.robot,
        max(1, min(job.num_worlds, len(specs))),
        nthread=job.nthread,
        robot_id=job.robot_id,
        policy_version=job.policy_version,
    ) as stepper:
        episodes = stepper.simulate(specs, job.policy_factory())
    return [ep.to_bytes() for ep in episodes]


def make_jobs(
    scenarios: Sequence[ScenarioSpec],
    policy_factory: PolicyFactory,
    *,
    chunk_size: int = 64,
    policy_version: str = "none",
    robot_id: str = "sim",
    nthread: int = 1,
) -> list[SimulationJob]:
    """Group scenarios by robot (first-seen order) and cut each group into jobs of ``chunk_size``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    groups: dict[str, list[str]] = {}
    for spec in scenarios:
        groups.setdefault(spec.robot, []).append(spec.to_json())
    return [
        SimulationJob(robot, tuple(texts[i : i + chunk_size]), policy_factory, policy_version, robot_id, chunk_size, nthread)
        for robot, texts in groups.items()
        for i in range(0, len(texts), chunk_size)
    ]


def simulate_scenarios(
    scenarios: Sequence[ScenarioSpec],
    policy_factory: PolicyFactory,
    *,
    map_fn: MapFn | None = None,
    chunk_size: int = 64,
    policy_version: str = "none",
    robot_id: str = "sim",
    nthread: int = 1,
) -> list[Episode]:
    """One MuJoCo episode per scenario, in the scenarios' order (a diverged scenario yields none).

    A repeated scenario is simulated once and its episode returned at each of its places (the same
    spec gives the same episode, id included). Every episode carries its spec in the ``scenario``
    metadata (see :func:`replay`).
    """
    unique = list(dict.fromkeys(scenarios))  # simulating a repeated spec again would only give the same episode
    jobs = make_jobs(unique, policy_factory, chunk_size=chunk_size, policy_version=policy_version, robot_id=robot_id, nthread=nthread)
    results = list((map_fn or map)(run_job, jobs))
    if len(results) != len(jobs):
        raise ValueError(f"map_fn returned {len(results)} results for {len(jobs)} jobs; it must return one per job, in order")
    by_spec = {}
    for blobs in results:
        for blob in blobs:
            episode = Episode.from_bytes(blob)
            by_spec[episode.metadata["scenario"]] = episode
    return [by_spec[s.to_json()] for s in scenarios if s.to_json() in by_spec]


def replay(episode: Episode, policy, nthread: int = 1) -> Episode:
    """Re-simulate a generated episode from the scenario spec it records (bit-identical for a row-wise deterministic policy)."""
    if "scenario" not in episode.metadata or episode.source != "sim":
        raise ValueError(f"episode {episode.episode_id} is not a simulated scenario episode (source {episode.source!r}); nothing to replay")
    spec = ScenarioSpec.from_json(episode.metadata["scenario"])
    with BatchedStepper(spec.robot, 1, nthread=nthread, robot_id=episode.robot_id, policy_version=episode.metadata["policy_version"]) as stepper:
        out = stepper.simulate([spec], policy)
    if not out:
        raise ValueError(f"scenario of episode {episode.episode_id} diverged on replay")
    return out[0]
