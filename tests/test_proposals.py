"""Scenario proposals (fleet failures, model uncertainty, domain randomisation around calibrated
profiles), their simulation fanned out in-process and as real local Ray tasks, and exact replay."""

import dataclasses
import functools

import numpy as np
import pytest
import torch

from sim.batched import BatchedStepper
from sim.episode import Episode
from sim.policy_fn import random_policy, zero_policy
from sim.scenario import DomainRandomization, ScenarioSpec
from sim.variation import CONTEXT_DIM, VariationProfile, contexts
from worldmodel.ensemble import DynamicsEnsemble, EnsembleConfig, ModelSpec
from worldmodel.fanout import make_jobs, replay, run_job, simulate_scenarios
from worldmodel.proposals import ProposalConfig, failure_scenarios, find_failures, propose, randomized_scenarios, uncertain_scenarios
from worldmodel.train import _fit_statistics
from worldmodel.transitions import to_transitions

CALIBRATED = {"robot-1": VariationProfile(mass_scale=1.2, friction_scale=0.9), "robot-2": VariationProfile(actuator_strength=0.8)}


def rowwise_policy(obs: np.ndarray) -> np.ndarray:
    """Deterministic and row-independent (each row's action depends on that row only)."""
    return np.tanh(np.sin(3.0 * obs[:, :1]) + obs[:, 1:2]).astype(np.float32)


@pytest.fixture(scope="module")
def fleet():
    """Two simulated pendulum robots; pendulums fall often, so there are failures to find."""
    episodes = []
    for robot_id in ("robot-1", "robot-2"):
        with BatchedStepper("pendulum", 8, nthread=1, robot_id=robot_id) as stepper:
            specs = [ScenarioSpec("pendulum", seed=i, profile=CALIBRATED[robot_id], init_noise_scale=20.0, max_steps=40) for i in range(8)]
            episodes += stepper.simulate(specs, random_policy(1, seed=len(episodes)))
    return episodes


def _episode(reward, terminated=False, intervention=None, robot_id="robot-1"):
    t = len(reward)
    ends = np.eye(t, dtype=bool)[-1]
    extras = {} if intervention is None else {"intervention": np.asarray(intervention, bool)}
    return Episode.create(
        observation=np.zeros((t + 1, 4)),
        action=np.zeros((t, 1)),
        reward=np.asarray(reward, np.float32),
        terminated=ends if terminated else np.zeros(t, bool),
        truncated=np.zeros(t, bool) if terminated else ends,
        timestamp=np.arange(t + 1) * 0.04,
        robot_id=robot_id,
        robot_model="pendulum",
        source="real",
        extras=extras,
    )


def test_find_failures_names_reason_and_step():
    episodes = [
        _episode([1, 1, 1, 1]),  # fine
        _episode([1, 1, 1], terminated=True),  # fell at its last step
        _episode([1, 1, 1, 1, 1], intervention=[0, 0, 1, 1, 0]),  # operator took over at step 2
        _episode([1, -5, 0, 0]),  # lowest return, worst at step 1
        _episode([1, 1, 1, 2]),
    ]
    assert find_failures(episodes, low_return_quantile=0.25) == [(2, 2, "intervention"), (1, 2, "terminated"), (3, 1, "low_return")]
    assert find_failures(episodes, low_return_quantile=0.0) == [(2, 2, "intervention"), (1, 2, "terminated")]


def test_failure_scenarios_start_before_the_failure_from_the_recorded_state(fleet):
    config = ProposalConfig(lookback=3, max_steps=25)
    specs = failure_scenarios(fleet, CALIBRATED, config)
    failures = find_failures(fleet, config.low_return_quantile)
    assert len(specs) == len(failures) > 0
    for spec, (i, step, reason) in zip(specs, failures):
        ep, start = fleet[i], max(0, step - 3)
        assert spec.tag == f"failure:{reason}:{ep.robot_id}:{ep.episode_id}:{start}"
        np.testing.assert_array_equal(np.float32(spec.init_qpos), ep.extras["qpos"][start])
        assert spec.profile == CALIBRATED[ep.robot_id] and spec.max_steps == 25
    no_state = [dataclasses.replace(ep, extras={}) for ep in fleet]  # real telemetry: observations only
    rebuilt = failure_scenarios(no_state, CALIBRATED, config)
    np.testing.assert_allclose(np.array([s.init_qpos for s in rebuilt]), np.array([s.init_qpos for s in specs]), atol=1e-6)


def test_proposals_are_seeded_by_the_experience_not_by_the_episode_ids(fleet):
    """A robot draws its episode ids at random, so a second run of the same seed has other ids for the
    same experience: its scenarios must be the same (the ids stay in the tags, for provenance)."""
    config = ProposalConfig(lookback=3, max_steps=25)
    renamed = [dataclasses.replace(ep, metadata={**ep.metadata, "episode_id": f"other-{i}"}) for i, ep in enumerate(fleet)]
    specs, again = failure_scenarios(fleet, CALIBRATED, config), failure_scenarios(renamed, CALIBRATED, config)
    assert [s.seed for s in again] == [s.seed for s in specs] and len(set(s.seed for s in specs)) == len(specs)
    assert all(":other-" in s.tag for s in again)
    changed = [dataclasses.replace(fleet[0], action=fleet[0].action + 0.5), *fleet[1:]]  # other experience: another seed
    first = next(s for s, (i, _, _) in zip(specs, find_failures(fleet, config.low_return_quantile)) if i == 0)
    assert first.seed not in {s.seed for s in failure_scenarios(changed, CALIBRATED, config)}


def test_uncertain_scenarios_pick_the_highest_disagreement(fleet):
    model = DynamicsEnsemble(ModelSpec("pendulum", 4, 1, EnsembleConfig(4, 2, 32, 1)), seed=3)  # untrained: members disagree
    _fit_statistics(model, to_transitions(fleet))
    specs = uncertain_scenarios(model, fleet, CALIBRATED, ProposalConfig(num_uncertain=3))
    assert len(specs) == 3
    data = to_transitions(fleet)
    with torch.no_grad():
        scores = model.disagreement(torch.as_tensor(data.obs), torch.as_tensor(data.action)).numpy()
    best_per_episode = {}
    for s, i, t in zip(scores, data.episode, data.step):
        if s > best_per_episode.get(i, (-1.0, 0))[0]:
            best_per_episode[i] = (s, t)
    expected = sorted(best_per_episode.items(), key=lambda kv: -kv[1][0])[:3]
    for spec, (i, (_, t)) in zip(specs, expected):
        assert spec.tag == f"uncertainty:{fleet[i].robot_id}:{fleet[i].episode_id}:{t}"


def test_a_body_conditioned_model_scores_each_row_with_its_robots_profile(fleet):
    """propose() once failed on a conditioned world model ("pass context="), though it is given every robot's profile."""
    model = DynamicsEnsemble(ModelSpec("pendulum", 4, 1, EnsembleConfig(4, 2, 32, 1), context_dim=CONTEXT_DIM), seed=3)  # untrained
    data = to_transitions(fleet)
    context = contexts([CALIBRATED[fleet[i].robot_id] for i in data.episode])
    _fit_statistics(model, dataclasses.replace(data, context=context))
    specs = uncertain_scenarios(model, fleet, CALIBRATED, ProposalConfig(num_uncertain=3))
    with torch.no_grad():
        scores = model.disagreement(torch.as_tensor(data.obs), torch.as_tensor(data.action), torch.as_tensor(context)).numpy()
    best = {}
    for score, i, t in zip(scores, data.episode, data.step):
        if score > best.get(i, (-1.0, 0))[0]:
            best[i] = (score, t)
    expected = sorted(best.items(), key=lambda kv: -kv[1][0])[:3]
    assert [s.tag for s in specs] == [f"uncertainty:{fleet[i].robot_id}:{fleet[i].episode_id}:{t}" for i, (_, t) in expected]
    assert any(s.tag.startswith("uncertainty:") for s in propose(fleet, CALIBRATED, model, ProposalConfig(num_uncertain=3, num_randomized=1)))


def test_randomized_scenarios_stay_around_the_calibrated_profile():
    dr = DomainRandomization(ranges={"mass_scale": (0.9, 1.1), "friction_scale": (0.8, 1.2)})
    specs = randomized_scenarios("pendulum", "robot-1", CALIBRATED["robot-1"], ProposalConfig(num_randomized=50, randomization=dr, max_steps=30))
    masses = np.array([s.profile.mass_scale for s in specs])
    assert len(specs) == 50 and (masses >= 1.2 * 0.9).all() and (masses <= 1.2 * 1.1).all()
    assert all(s.tag == "dr:robot-1" and s.max_steps == 30 for s in specs)
    assert randomized_scenarios("pendulum", "robot-1", CALIBRATED["robot-1"], ProposalConfig(num_randomized=50, randomization=dr)) != specs


def test_generated_episodes_validate_and_replay_bit_identically(fleet):
    specs = propose(fleet, CALIBRATED, config=ProposalConfig(num_randomized=3, max_steps=20))
    assert {s.tag.split(":")[0] for s in specs} == {"failure", "dr"}
    episodes = simulate_scenarios(specs, lambda: rowwise_policy, chunk_size=5, robot_id="sim-fleet")
    assert len(episodes) == len(specs)
    for spec, ep in zip(specs, episodes):
        assert Episode.from_bytes(ep.to_bytes()).equals(ep)
        assert ScenarioSpec.from_json(ep.metadata["scenario"]) == spec and ep.source == "sim"
    for ep in episodes[:3] + episodes[-2:]:
        assert replay(ep, rowwise_policy).equals(ep)  # alone in a batch of one: the same bits


def test_fanout_returns_one_episode_per_scenario_however_typed_or_repeated():
    """A scenario with ints in its start state or goal once went missing from the fan-out (its JSON changed on the way
    through the worker), replay gave it a new id, and a repeated scenario came back once."""
    ints = ScenarioSpec("reacher", seed=2, init_qpos=(0, 0, 0.1, 0.1), init_qvel=(0, 0, 0, 0), max_steps=5)
    goal = ScenarioSpec("reacher", seed=3, goal=(0, 0.1), max_steps=5)
    plain = ScenarioSpec("reacher", seed=4, max_steps=5)
    episodes = simulate_scenarios([ints, plain, goal, ints], functools.partial(zero_policy, 2), chunk_size=2)
    assert [e.metadata["scenario"] for e in episodes] == [s.to_json() for s in (ints, plain, goal, ints)]
    assert episodes[0] is episodes[3]
    again = replay(episodes[0], zero_policy(2))
    assert again.episode_id == episodes[0].episode_id == ints.episode_id() and again.equals(episodes[0])


def test_ray_fanout_gives_the_same_episodes_as_in_process(fleet, local_ray):
    specs = propose(fleet, CALIBRATED, config=ProposalConfig(num_randomized=4, max_steps=15))
    factory = functools.partial(random_policy, 1, 11)  # built afresh inside every job: same actions anywhere
    remote = local_ray.remote(run_job)

    def ray_map(fn, jobs):
        assert fn is run_job
        return local_ray.get([remote.remote(job) for job in jobs])

    assert len(make_jobs(specs, factory, chunk_size=6)) > 1
    here = simulate_scenarios(specs, factory, chunk_size=6)
    there = simulate_scenarios(specs, factory, chunk_size=6, map_fn=ray_map)
    assert len(here) == len(there) == len(specs)
    assert all(a.equals(b) for a, b in zip(here, there))
