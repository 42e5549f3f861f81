"""The batched stepper: episodes in schema v1, scenario semantics, latency, sensor model, its two lanes, lazy metadata and seeding."""

import dataclasses

import numpy as np
import pytest

from sim.batched import BatchedStepper, episode_metadata
from sim.episode import Episode
from sim.policy_fn import random_policy, zero_policy
from sim.scenario import DomainRandomization, ScenarioSpec
from sim.seeding import new_generator, reseed
from sim.variation import VariationProfile


def test_simulate_returns_one_valid_episode_per_scenario_in_order():
    specs = DomainRandomization({"mass_scale": (0.8, 1.2), "friction_scale": (0.5, 1.5)}).sample("ant", 6, seed=1)
    specs = [ScenarioSpec(**{**s.__dict__, "max_steps": 40}) for s in specs]
    episodes = BatchedStepper("ant", 4).simulate(specs, random_policy(8, seed=0))
    assert [e.metadata["scenario"] for e in episodes] == [s.to_json() for s in specs]
    for e in episodes:
        Episode.from_bytes(e.to_bytes())
        assert e.terminated[-1] or e.truncated[-1]
        assert not (e.terminated[-1] and e.truncated[-1])
        assert e.observation.shape[0] == e.num_steps + 1 and e.extras["qpos"].shape[0] == e.num_steps + 1
        assert e.episode_id == ScenarioSpec.from_json(e.metadata["scenario"]).episode_id("none")


def test_an_episode_is_the_same_whatever_runs_beside_it():
    # a longer scenario starting mid-run grows the episode buffers; the episodes in progress keep their steps
    specs = [ScenarioSpec("half_cheetah", seed=s, max_steps=n) for s, n in ((0, 5), (1, 30), (2, 60), (3, 12))]
    policy = lambda obs: np.tanh(obs[:, :6] * 0.5).astype(np.float32)  # noqa: E731  deterministic, state-dependent
    together = BatchedStepper("half_cheetah", 2).simulate(specs, policy)
    for spec, ep in zip(specs, together, strict=True):
        (alone,) = BatchedStepper("half_cheetah", 1).simulate([spec], policy)
        np.testing.assert_array_equal(ep.observation, alone.observation)
        np.testing.assert_array_equal(ep.extras["qpos"], alone.extras["qpos"])
        assert ep.metadata == alone.metadata


def test_recorded_metadata_is_checked_when_the_stepper_is_built():
    with pytest.raises(ValueError, match="robot_id"):
        BatchedStepper("pendulum", 1, robot_id="has space")


def test_time_limit_truncates_and_keeps_the_final_observation():
    spec = ScenarioSpec("half_cheetah", seed=0, max_steps=25)
    (ep,) = BatchedStepper("half_cheetah", 1).simulate([spec], zero_policy(6))
    assert ep.num_steps == 25 and ep.truncated[-1] and not ep.terminated.any()
    # the final observation is the state after the last action, not a reset state
    np.testing.assert_allclose(ep.observation[-1][:8], ep.extras["qpos"][-1][1:], atol=1e-6)


def test_termination_is_not_truncation():
    (ep,) = BatchedStepper("pendulum", 1).simulate([ScenarioSpec("pendulum", seed=0)], lambda o: np.ones((len(o), 1), np.float32))
    assert ep.terminated[-1] and not ep.truncated.any() and ep.num_steps < 100
    assert abs(ep.observation[-1, 1]) > 0.2


def open_loop(actions):
    """A policy that replays ``actions`` (T, act_dim) step by step (one world)."""
    step = iter(actions)
    return lambda obs: next(step)[None]


def test_action_latency_delays_the_actuators_exactly():
    pushes = np.linspace(0.02, 0.06, 6, dtype=np.float32)[:, None]

    def run(latency, actions):
        spec = ScenarioSpec("pendulum", seed=0, profile=VariationProfile(action_latency=latency), max_steps=6)
        return BatchedStepper("pendulum", 1).simulate([spec], open_loop(actions))[0]

    late = run(2, pushes)
    shifted = run(0, np.concatenate([np.zeros((2, 1), np.float32), pushes[:4]]))
    assert late.num_steps == shifted.num_steps == 6
    np.testing.assert_array_equal(late.extras["qpos"], shifted.extras["qpos"])  # same physics, 2 steps later
    np.testing.assert_array_equal(late.action, pushes)  # the record holds what the policy commanded


def test_sensor_bias_and_noise_shift_only_the_observation():
    base = ScenarioSpec("pendulum", seed=3, max_steps=5)
    biased = ScenarioSpec("pendulum", seed=3, max_steps=5, profile=VariationProfile(obs_bias=0.5))
    noisy = ScenarioSpec("pendulum", seed=3, max_steps=5, profile=VariationProfile(obs_noise_std=0.1))
    a, b, c = BatchedStepper("pendulum", 3).simulate([base, biased, noisy], zero_policy(1))
    np.testing.assert_allclose(b.observation - a.observation, 0.5, atol=1e-5)
    np.testing.assert_array_equal(a.extras["qpos"], b.extras["qpos"])  # physics identical under zero actions
    assert 0.02 < np.std(c.observation - a.observation) < 0.3


def test_run_collects_finished_episodes_and_counts_steps():
    with BatchedStepper("reacher", 8) as stepper:
        stepper.reset(seed=0)
        episodes = stepper.run(random_policy(2, seed=0), 120)
        assert len(episodes) == 16  # 8 worlds x 2 full 50-step episodes
        assert stepper.stats["steps"] == 8 * 120
        assert len({e.episode_id for e in episodes}) == 16


def test_bad_inputs_say_what_is_wrong():
    stepper = BatchedStepper("reacher", 2)
    stepper.reset(seed=0)
    with pytest.raises(ValueError, match="action must have shape"):
        stepper.step(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN or Inf actions"):
        stepper.step(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="scenario for robot 'ant'"):
        stepper.simulate([ScenarioSpec("ant", seed=0)], zero_policy(2))
    with pytest.raises(ValueError, match="out of range"):
        VariationProfile(mass_scale=-1)
    for bad, reason in ((dict(payload_mass="abc"), "payload_mass='abc' is not a number"), (dict(action_latency=1.5), "is not an integer")):
        with pytest.raises(ValueError, match=reason):  # once a TypeError from the range check
            VariationProfile(**bad)
    assert VariationProfile(payload_mass=np.float32(0.5), action_latency=np.int64(2)).to_dict()["action_latency"] == 2  # numpy scalars, as Python's
    with pytest.raises(ValueError, match="not a VariationProfile field"):
        DomainRandomization({"gravity": (0, 1)})


def test_run_and_simulate_refuse_actions_of_the_wrong_shape():
    """step() checked its actions, run and simulate did not: an (N, 1) output drove both of the reacher's actuators,
    other shapes failed deep in MuJoCo or numpy, and a policy returning None was reported as giving NaN actions."""
    wrong = {"(N, 1)": lambda o: np.ones((len(o), 1)), "(1, 2)": lambda o: np.ones((1, 2)), "(2,)": lambda o: np.ones(2), "None": lambda o: None}
    with BatchedStepper("reacher", 2, nthread=1) as stepper:
        for name, policy in wrong.items():
            stepper.reset(seed=0)
            with pytest.raises(ValueError, match=r"policy returned \w+ of shape \(.*\) for 2 observations; expected .* \(2, 2\)"):
                stepper.run(policy, 3)
        with pytest.raises(ValueError, match=r"returned NoneType of shape \(\) for 1 observations"):
            stepper.simulate([ScenarioSpec("reacher", seed=0, max_steps=3)], wrong["None"])
        assert len(stepper.simulate([ScenarioSpec("reacher", seed=0, max_steps=3)], zero_policy(2))) == 1  # still usable


def test_scenarios_that_do_not_fit_the_robot_are_refused_naming_why():
    """A length-1 init_qpos once filled every qpos entry of the ant (its free joint's quaternion too), other lengths
    failed as a bare numpy broadcast, NaN started an episode, and reset_to took another robot's scenario silently."""
    with BatchedStepper("ant", 1, nthread=1) as stepper:
        m = stepper.task.model
        assert (m.nq, m.nv) == (15, 14)
        one = ScenarioSpec("ant", seed=0, init_qpos=(0.5,), init_qvel=(0.0,))
        for bad in (one, ScenarioSpec("ant", seed=0, init_qpos=(0.0,) * 14, init_qvel=(0.0,) * 14)):
            want = rf"scenario init_qpos has {len(bad.init_qpos)} values and init_qvel {len(bad.init_qvel)}; robot 'ant' has nq=15 and nv=14"
            with pytest.raises(ValueError, match=want):
                stepper.reset_to([bad])
            with pytest.raises(ValueError, match=want):  # before any scenario of the queue runs
                stepper.simulate([ScenarioSpec("ant", seed=1, max_steps=2), bad], zero_policy(8))
        with pytest.raises(ValueError, match="scenario for robot 'pendulum' given to a 'ant' stepper"):
            stepper.reset_to([ScenarioSpec("pendulum", seed=0)])
        stepper.reset_to([ScenarioSpec("ant", seed=0, max_steps=1)], then=lambda world: one)
        with pytest.raises(ValueError, match="init_qpos has 1 values"):  # a later scenario, from a source
            stepper.step(np.zeros((1, 8)))
        start = ScenarioSpec("ant", seed=0, max_steps=2, init_qpos=tuple(m.qpos0), init_qvel=(0.0,) * 14)
        assert len(stepper.simulate([start], zero_policy(8))) == 1
    with pytest.raises(ValueError, match="init_qpos holds NaN or Inf"):
        ScenarioSpec("ant", seed=0, init_qpos=(np.nan,) * 15, init_qvel=(0.0,) * 14)


def test_a_goal_of_another_length_than_the_tasks_is_refused():
    """A reacher goal of 1 value once filled both target coordinates, one of 3 failed as a bare numpy broadcast, and a
    goal given to the pendulum (no goal) was ignored."""
    with BatchedStepper("reacher", 1, nthread=1) as stepper:
        for goal in ((0.1,), (0.1, 0.1, 0.1)):
            with pytest.raises(ValueError, match=f"scenario goal has {len(goal)} values; robot 'reacher' takes a goal of goal_dim=2"):
                stepper.simulate([ScenarioSpec("reacher", seed=0, goal=goal, max_steps=2)], zero_policy(2))
        assert len(stepper.simulate([ScenarioSpec("reacher", seed=0, goal=(0.1, 0.0), max_steps=2)], zero_policy(2))) == 1
    with BatchedStepper("pendulum", 1, nthread=1) as stepper:
        with pytest.raises(ValueError, match=r"robot 'pendulum' has no goal \(goal_dim=0\): leave goal=None"):
            stepper.reset_to([ScenarioSpec("pendulum", seed=0, goal=(1.0, 2.0))])


def test_scenario_and_profile_json_round_trip():
    spec = DomainRandomization({"payload_mass": (0, 2), "action_latency": (0, 3)}).sample("reacher", 1, seed=5)[0]
    spec = ScenarioSpec(**{**spec.__dict__, "goal": (0.1, -0.05)})
    assert ScenarioSpec.from_json(spec.to_json()) == spec
    (a,) = BatchedStepper("reacher", 1).simulate([spec], zero_policy(2))
    np.testing.assert_allclose(a.extras["qpos"][0, 2:4], [0.1, -0.05])


def test_non_finite_or_overflowing_sensor_and_start_noise_are_refused():
    """obs_bias=NaN once fed the policy NaN at every step (found only at to_bytes, as a JSON error), obs_bias=Inf gave a
    context of 1.0, obs_noise_std=1e300 overflowed float32 observations to Inf, and init_noise_scale=NaN started the
    episode from a NaN state."""
    for bad in ({"obs_bias": np.nan}, {"obs_bias": np.inf}, {"obs_bias": -np.inf}, {"obs_bias": 1e31}, {"obs_noise_std": 1e300},
                {"obs_noise_std": np.nan}, {"obs_noise_std": np.inf}):  # fmt: skip
        name = next(iter(bad))
        with pytest.raises(ValueError, match=f"variation profile: {name}=.* is out of range"):
            VariationProfile(**bad)
    assert VariationProfile(obs_bias=-9.0, obs_noise_std=9.0).obs_bias == -9.0  # large but sane values still run
    for scale in (np.nan, np.inf, -1.0):
        with pytest.raises(ValueError, match="scenario: init_noise_scale must be a finite number >= 0"):
            ScenarioSpec("pendulum", seed=0, init_noise_scale=scale)
    assert ScenarioSpec("pendulum", seed=0, init_noise_scale=0).init_noise_scale == 0.0


def test_a_scenario_has_one_json_however_its_numbers_were_typed():
    """ints in the start state or goal once gave another JSON (so another episode id) than the same scenario after a
    JSON round trip, and a fan-out that looked its episode up by that JSON lost it; floats keep the JSON they had."""
    typed = ScenarioSpec("reacher", seed=np.int64(2), init_qpos=(0, 0, 0.1, 0.1), init_qvel=[0, 0, 0, 0], max_steps=7.0)
    aimed = ScenarioSpec("reacher", seed=2, goal=(0, np.float32(0.5)))
    for spec in (typed, aimed):
        assert spec == ScenarioSpec.from_json(spec.to_json())
        assert spec.to_json() == ScenarioSpec.from_json(spec.to_json()).to_json()
    assert typed.init_qpos == (0.0, 0.0, 0.1, 0.1) and aimed.goal == (0.0, 0.5) and (typed.seed, typed.max_steps) == (2, 7)
    assert all(type(x) is float for x in (*typed.init_qpos, *typed.init_qvel, *aimed.goal, typed.init_noise_scale))
    assert (type(typed.seed), type(typed.max_steps)) == (int, int)
    floats = ScenarioSpec("reacher", seed=3, init_qpos=(0.0, 0.0, 0.1, 0.1), init_qvel=(0.0,) * 4, max_steps=5)
    assert floats.to_json() == (  # the JSON (hence the ids of stored episodes) of float-valued scenarios is unchanged
        '{"goal": null, "init_noise_scale": 1.0, "init_qpos": [0.0, 0.0, 0.1, 0.1], "init_qvel": [0.0, 0.0, 0.0, 0.0], '
        '"max_steps": 5, "profile": {"action_latency": 0, "actuator_strength": 1.0, "damping_scale": 1.0, "friction_scale": 1.0, '
        '"mass_scale": 1.0, "obs_bias": 0.0, "obs_noise_std": 0.0, "payload_mass": 0.0}, "robot": "reacher", "seed": 3, "tag": ""}'
    )
    for bad, field in (({"seed": 1.5}, "seed"), ({"seed": True}, "seed"), ({"seed": -1}, "seed"), ({"seed": "abc"}, "seed"),
                       ({"max_steps": 2.5}, "max_steps"), ({"max_steps": 0}, "max_steps"), ({"max_steps": False}, "max_steps"),
                       ({"init_noise_scale": "1"}, "init_noise_scale"), ({"goal": (True, 0.0)}, "goal"), ({"goal": "ab"}, "goal"),
                       ({"goal": (np.inf, 0.0)}, "goal"), ({"profile": {}}, "profile")):  # fmt: skip
        with pytest.raises(ValueError, match=f"scenario: {field}"):
            ScenarioSpec("reacher", **{"seed": 0, **bad})
    with pytest.raises(ValueError, match="or a goal, not both"):  # the start state holds the goal: one given with it was ignored
        ScenarioSpec("reacher", seed=0, init_qpos=(0.0, 0.0, 0.1, 0.1), init_qvel=(0.0,) * 4, goal=(0.1, 0.0))


BLOW_UP = VariationProfile(mass_scale=1e-12, damping_scale=1e9)  # MuJoCo warns "the simulation is unstable"


@pytest.mark.parametrize(
    "robot, blown",
    [("pendulum", [{"profile": VariationProfile(mass_scale=1e-12)}, {"profile": VariationProfile(damping_scale=1e9)}]),
     ("half_cheetah", [{"init_noise_scale": 1e5}, {"profile": VariationProfile(damping_scale=1e9)}])],  # fmt: skip
)
def test_physics_blow_ups_are_dropped_and_counted_as_diverged(robot, blown):
    """MuJoCo's automatic reset once made a blown-up world finite again (pendulum observations of 1e30, a half
    cheetah jumping back to its start pose): the episodes were kept as valid data and stats['diverged'] stayed 0.
    The valid scenario beside them gives the episode it gives alone."""
    act_dim = 1 if robot == "pendulum" else 6
    valid = ScenarioSpec(robot, seed=1, max_steps=20)
    blown = [ScenarioSpec(robot, seed=0, max_steps=20, **kw) for kw in (*blown, {"profile": BLOW_UP, "init_noise_scale": 1e5})]
    with BatchedStepper(robot, 4, nthread=1) as stepper:
        episodes = stepper.simulate([*blown, valid], zero_policy(act_dim))
        assert [e.metadata["scenario"] for e in episodes] == [valid.to_json()]
        assert stepper.stats["diverged"] == len(blown)
    with BatchedStepper(robot, 1, nthread=1) as alone:
        (expected,) = alone.simulate([valid], zero_policy(act_dim))
    assert episodes[0].equals(expected)
    with BatchedStepper(robot, 2, nthread=1, record=False) as stepper:  # the vector-env path: ended, observation zeroed
        stepper.reset(seed=0, profiles=[BLOW_UP, VariationProfile()])
        obs, reward, terminated, truncated, info = stepper.step(np.zeros((2, act_dim)))
        assert terminated[0] and not terminated[1] and stepper.stats["diverged"] == 1
        assert not info["final_observation"][0].any() and reward[0] == 0.0 and np.isfinite(obs).all()


def test_set_state_refuses_a_recording_stepper_and_arrays_of_another_shape():
    """A capture restored into a record=True stepper once gave an episode of 12 steps after 4 real ones (8 of zero
    actions and observations); an obs array of shape (1,) filled every world's observation silently."""
    with BatchedStepper("reacher", 2, nthread=1, record=False) as source:
        source.reset(seed=0)
        for _ in range(5):
            source.step(np.full((2, 2), 0.3, np.float32))
        arrays, meta = source.get_state()
    with BatchedStepper("reacher", 2, nthread=1, record=True) as recording:
        with pytest.raises(ValueError, match="set_state\\(\\) cannot restore the episode recorder.*record=False"):
            recording.set_state(arrays, meta)
    with BatchedStepper("reacher", 2, nthread=1, record=False) as target:
        for name, bad in (("obs", np.zeros(1, np.float32)), ("state", arrays["state"][:, :3]), ("history", np.zeros((2, 1, 5)))):
            with pytest.raises(ValueError, match=f"state array '{name}' has shape"):
                target.set_state({**arrays, name: bad}, meta)
        with pytest.raises(ValueError, match="state has no 't' array"):
            target.set_state({k: v for k, v in arrays.items() if k != "t"}, meta)
        np.testing.assert_array_equal(target.set_state(arrays, meta), arrays["obs"])  # the capture itself restores


def test_seeded_generators_start_as_numpy_default_rng():
    seeds = [0, 1, 2024, 2**31 - 1, 2**32 - 1, 2**32, 2**40 + 3, *range(5, 400, 7)]
    generators = [new_generator() for _ in seeds]
    reseed(generators, seeds)
    for generator, seed in zip(generators, seeds, strict=True):
        reference = np.random.default_rng(seed)
        assert generator.bit_generator.state == reference.bit_generator.state, seed
        np.testing.assert_array_equal(generator.uniform(size=3), reference.uniform(size=3))
    with pytest.raises(ValueError, match="non-negative"):
        reseed([new_generator()], [-1])


def test_two_lanes_give_the_episodes_one_call_per_step_gives():
    # 64 worlds run in two lanes half a step apart; step() calls the policy once over all of them
    profiles = [VariationProfile(obs_noise_std=0.01 * (w % 3), action_latency=w % 2) for w in range(64)]

    def episodes(drive):
        with BatchedStepper("pendulum", 64, nthread=2) as stepper:
            stepper.reset(seed=7, profiles=profiles)
            return drive(stepper, random_policy(1, seed=3)), dict(stepper.stats)

    def by_step(stepper, policy):
        for _ in range(30):
            stepper.step(policy(stepper.obs))
        return stepper.pop_episodes()

    lanes, lane_stats = episodes(lambda stepper, policy: stepper.run(policy, 30))
    single, single_stats = episodes(by_step)
    assert lane_stats == single_stats and lane_stats["episodes"] > 64
    assert [e.metadata for e in lanes] == [e.metadata for e in single]
    for a, b in zip(lanes, single, strict=True):
        for key, value in a.arrays().items():
            np.testing.assert_array_equal(value, b.arrays()[key], err_msg=key)


def test_recorded_metadata_is_built_when_read_and_fixed_when_finished():
    stepper = BatchedStepper("pendulum", 2, robot_id="robot-1", policy_version="v3")
    stepper.reset(seed=0)
    ep = stepper.run(lambda obs: np.ones((len(obs), 1), np.float32), 100)[0]
    stepper.policy_version = "v4"  # after the episode finished: not its metadata
    scenario = ScenarioSpec.from_json(ep.metadata["scenario"])
    assert ep.metadata == episode_metadata(scenario, "robot-1", "v3", "sim", "pendulum")
    assert list(ep.metadata) == ["schema_version", "robot_id", "episode_id", "policy_version", "source", "robot_model", "scenario"]
    assert Episode.from_bytes(ep.to_bytes()).metadata == ep.metadata
    copy = dataclasses.replace(ep, observation=ep.observation + 1)
    assert copy.metadata == ep.metadata and copy.episode_id == ep.episode_id
    ep.metadata = {**ep.metadata, "robot_id": "robot-2"}
    assert ep.robot_id == "robot-2"


def test_a_failing_policy_leaves_every_world_at_a_step_end():
    calls = []

    def failing(obs):
        calls.append(len(obs))
        if len(calls) == 5:
            raise RuntimeError("policy crashed")
        return np.zeros((len(obs), 1), np.float32)

    with BatchedStepper("pendulum", 64, nthread=2) as stepper:
        stepper.reset(seed=0)
        with pytest.raises(RuntimeError, match="policy crashed"):
            stepper.run(failing, 10)
        assert stepper.stats["steps"] == sum(calls[:4])  # the launched steps all landed
        stepper.run(zero_policy(1), 3)
        assert stepper.stats["steps"] == sum(calls[:4]) + 3 * 64


@pytest.mark.parametrize("count", [0, 2.0, "3", True, None])
def test_a_world_count_that_is_not_a_whole_number_above_zero_is_refused(count):
    """BatchedStepper("pendulum", 2.0) once failed deep inside with a raw TypeError."""
    with pytest.raises(ValueError, match="num_worlds must be a whole number >= 1"):
        BatchedStepper("pendulum", count)
    assert BatchedStepper("pendulum", np.int64(2)).num_worlds == 2


def test_a_scenario_with_another_seed_is_the_one_its_constructor_builds():
    base = ScenarioSpec("reacher", 3, VariationProfile(obs_bias=-0.0, mass_scale=2), init_noise_scale=0.5, goal=(0.1, 0), max_steps=7, tag="t")
    base.to_json()  # cached for seed 3: a copy must not keep it
    for seed in (0, 17, 2**31 - 1, np.int64(5)):
        spec, built = base.with_seed(seed), dataclasses.replace(base, seed=seed)
        assert spec == built and spec.to_json() == built.to_json() and spec.episode_id("v1") == built.episode_id("v1")
        assert type(spec.seed) is int
    with pytest.raises(ValueError, match="seed"):
        base.with_seed(-1)
