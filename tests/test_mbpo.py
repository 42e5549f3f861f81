"""The model-based learner: real-data bookkeeping, the measured horizon, carrying a learner over,
and "does it learn" on the pendulum with a few thousand real steps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from policies.evaluate import evaluate
from policies.mbpo import MBPO, MBPOConfig, RealLog, default_config
from policies.networks import gaussian_log_prob
from policies.sac import SAC, SACConfig
from policies.trainer import Trainer, TrainerConfig, make_algorithm, make_spec
from policies.transition import VectorStep
from sim.variation import VariationProfile
from worldmodel.evaluate import open_loop_errors, trusted_horizon


def _step(obs, action, done, t):
    n = len(obs)
    return VectorStep(obs, action, np.full(n, t, np.float32), obs + 1, obs + 1, np.zeros(n, bool), done)


def test_real_log_keeps_episodes_apart_across_interleaved_worlds():
    log = RealLog(obs_dim=1, act_dim=1)
    # 2 worlds; world 0's episodes last 3 steps, world 1's 2 steps; obs encodes (world, t)
    for t in range(6):
        obs = np.array([[100 + t], [200 + t]], np.float32)
        log.add(_step(obs, obs / 1000, np.array([t % 3 == 2, t % 2 == 1]), t))
    data = log.view()
    assert len(data) == 12 and data.episode.max() == 4  # 2 + 3 episodes started
    for e in np.unique(data.episode):
        rows = np.flatnonzero(data.episode == e)
        assert len({int(o) // 100 for o in data.obs[rows, 0]}) == 1  # one world per episode
        assert list(data.step[rows]) == list(range(len(rows)))
    obs, action, valid, _ = log.segments(np.ones(12, bool), horizon=3, max_starts=100, rng=np.random.default_rng(0))
    for s in range(len(obs)):
        k = int(valid[s].sum())
        assert k >= 1 and (np.diff(obs[s, : k + 1, 0]) == 1).all()  # consecutive steps of one world only
    assert valid.sum(1).max() == 3 and valid.sum(1).min() == 1

    copy = RealLog(1, 1)
    copy.load_state_tensors(log.state_tensors())
    assert copy.size == log.size and (copy.view().episode == data.episode).all() and copy.next_episode == log.next_episode


def test_long_episodes_are_held_out_in_blocks_and_segments_stay_inside_them():
    """A robot with 1,000-step episodes: a fifth of every episode is held out (not one whole early
    episode standing for all), and an open-loop segment never runs into training rows."""
    log = RealLog(obs_dim=1, act_dim=1)
    for t in range(3000):  # one world, three 1,000-step episodes
        log.add(_step(np.array([[float(t)]], np.float32), np.zeros((1, 1), np.float32), np.array([t % 1000 == 999]), t))
    val = log.is_val(0.2, block=100)
    data = log.view()
    for e in range(3):
        share = val[data.episode == e].mean()
        assert 0.0 < share < 0.6  # every episode has held-out blocks and training blocks
    block = data.episode * 10 + data.step // 100
    for b in np.unique(block):
        assert len(set(val[block == b])) == 1  # a block is held out or trained on whole
    obs, _, valid, _ = log.segments(val, horizon=15, max_starts=1000, rng=np.random.default_rng(0))
    rows = obs[:, :-1, 0].astype(int)  # obs encodes the global step: row index in the log
    assert valid.any(1).all() and val[rows[valid]].all()  # every recorded step of a segment is held out
    assert (valid.sum(1) < 15).any()  # segments that reach a block's end stop there
    with pytest.raises(ValueError, match="val_block"):  # a block shorter than the horizon could never measure it
        MBPOConfig(val_block=10, max_horizon=15)


@pytest.mark.parametrize("option", ["mbpo", "mbpo_fleet"])
def test_too_short_a_warm_up_is_refused_when_the_config_is_made_and_the_shipped_ones_pass(option):
    """sac.learning_starts 0 or 1 passed every check, then the first step crashed in the world model's fit ("need training
    and validation transitions, got 0 and 1"), a traceback mid-run under flywheel-train; 2 fitted on one transition
    (val_mse 6e9). flywheel-train turns the config's ValueError into its one-line refusal (fleet/apps/train.py)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    import fleet.conf.schema_flywheel  # noqa: F401  (registers the schemas the YAML's defaults name)
    from fleet.conf import CONF_DIR

    for short in (0, 1, 9):  # 10: 8 transitions to fit, 2 to validate on (the first fit holds out the newest 20 %)
        with pytest.raises(ValueError, match=rf"mbpo: sac.learning_starts={short} is too short a warm-up: .* set sac.learning_starts to 10 or more"):
            MBPOConfig(sac=SACConfig(learning_starts=short))
    assert MBPOConfig(sac=SACConfig(learning_starts=10)).sac.learning_starts == 10
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        shipped = compose(config_name="flywheel", overrides=[f"policy={option}"])
        short = compose(config_name="flywheel", overrides=[f"policy={option}", "policy.algorithm.sac.learning_starts=1"])
    assert instantiate(shipped.policy.algorithm).sac.learning_starts >= 10
    with pytest.raises(InstantiationException) as refused:
        instantiate(short.policy.algorithm)
    assert "sac.learning_starts=1 is too short a warm-up" in str(refused.value.__cause__ or refused.value)


def test_every_real_row_carries_its_body_for_the_world_model(one_torch_thread):
    """Own steps carry their world's profile, handed-in episodes the body profile_of names (nominal
    if none); the contexts survive a checkpoint; an unconditioned learner stores none."""
    from sim.batched import BatchedStepper
    from sim.policy_fn import random_policy
    from sim.scenario import ScenarioSpec

    bodies = [VariationProfile(), VariationProfile(actuator_strength=0.5)]
    heavy = VariationProfile(payload_mass=2.0)
    learner = MBPO(make_spec("pendulum", MBPOConfig()), MBPOConfig(), robot_model="pendulum")
    learner.set_world_profiles(bodies)
    obs = np.zeros((2, 4), np.float32)
    learner.observe(VectorStep(obs, np.zeros((2, 1), np.float32), np.ones(2, np.float32), obs, obs, np.zeros(2, bool), np.zeros(2, bool)))
    with BatchedStepper("pendulum", 2, nthread=1) as stepper:
        episodes = stepper.simulate([ScenarioSpec("pendulum", seed=i, max_steps=5) for i in range(2)], random_policy(1, 0))
    learner.add_offline(episodes[:1], lambda ep: heavy)
    learner.add_offline(episodes[1:], lambda ep: None)
    context = learner.real.view().context
    n0, n1 = episodes[0].num_steps, episodes[1].num_steps
    np.testing.assert_array_equal(context[:2], np.stack([b.context() for b in bodies]))
    np.testing.assert_array_equal(context[2 : 2 + n0], np.tile(heavy.context(), (n0, 1)))
    assert not context[2 + n0 :].any() and len(context) == 2 + n0 + n1
    copy = RealLog(4, 1, context.shape[1])
    copy.load_state_tensors(learner.real.state_tensors())
    np.testing.assert_array_equal(copy.view().context, context)
    plain = MBPO(make_spec("pendulum", MBPOConfig()), MBPOConfig(condition_on_profile=False), robot_model="pendulum")
    plain.set_world_profiles(bodies)
    plain.add_offline(episodes[:1], lambda ep: heavy)
    assert plain.real.view().context is None


def test_the_horizon_is_where_the_measured_error_passes_the_tolerance():
    assert trusted_horizon(np.array([0.05, 0.1, 0.2, 0.4, 0.1]), 0.25, 15) == 3
    assert trusted_horizon(np.array([0.05, 0.1, np.nan]), 0.25, 15) == 2  # unmeasured: not trusted
    assert trusted_horizon(np.array([0.9, 0.1]), 0.25, 15) == 1  # at least one step
    assert trusted_horizon(np.full(20, 0.01), 0.25, 15) == 15
    # a model that drifts by 0.1 per step (scale 1) has error 0.1 k at step k
    obs = np.zeros((4, 6, 2), np.float32)
    errors = open_loop_errors(lambda o, a: o + 0.1, obs, np.zeros((4, 5, 1), np.float32), np.ones((4, 5), bool), np.ones(2))
    np.testing.assert_allclose(errors, [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-5)
    assert trusted_horizon(errors, 0.25, 15) == 2


def test_a_learner_carries_over_to_new_offline_data_without_a_second_warm_up(one_torch_thread):
    config = TrainerConfig(robot="pendulum", algorithm="sac", num_worlds=4, total_env_steps=200, seed=1)
    algo = SACConfig(hidden_sizes=(16, 16), batch_size=32, learning_starts=100)
    with Trainer(config, make_algorithm(config, algo)) as trainer:
        trainer.train()
        tensors, meta = trainer.algo.state()
    fresh = SAC(make_spec("pendulum", algo), algo, seed=2)
    fresh.continue_from(tensors, meta)
    assert fresh.env_steps == 200 and fresh.replay.sizes()["online"] == 200
    assert torch.equal(fresh.policy.actor.mean.weight, tensors["policy.actor.mean.weight"])
    obs = np.zeros((4, 4), np.float32)
    fresh.observe(VectorStep(obs, np.zeros((4, 1), np.float32), np.ones(4, np.float32), obs, obs, np.zeros(4, bool), np.zeros(4, bool)))
    assert fresh.ready()  # learning goes on at once: no second learning_starts


def test_rollouts_come_from_the_current_policy_at_the_measured_horizon(one_torch_thread):
    config, algo = default_config("pendulum", total_env_steps=300, seed=0)
    cheap = dataclasses.replace(algo.sac, utd_ratio=2.0)  # this test is about the data, not the learning
    algo = dataclasses.replace(algo, sac=cheap, model_train=dataclasses.replace(algo.model_train, max_steps=300), rollouts_per_step=8, model_train_every=100)
    with Trainer(config, make_algorithm(config, algo)) as trainer:
        trainer.train()
        learner: MBPO = trainer.algo
        assert learner.retrains == 2 and learner.model is not None
        assert 1 <= learner.horizon <= algo.max_horizon
        assert learner.k_step_error[learner.horizon - 1] <= algo.horizon_tolerance or learner.horizon == 1
        model = learner.sac.replay.sources["model"]
        assert model.size > 0
        # a refill holds the current stochastic policy's actions: far likelier under it than random ones
        start = model.pos
        learner._refill()
        rows = np.arange(start, model.pos)
        assert len(rows) > 0
        with torch.no_grad():
            mean, log_std = learner.policy.actor(learner.policy.normalizer(torch.from_numpy(model.obs[rows])))

        def log_likelihood(action: np.ndarray) -> float:  # of the pre-tanh action under the policy's Gaussian
            u = torch.atanh(torch.from_numpy(action).clamp(-0.999, 0.999))
            return float(gaussian_log_prob(mean, log_std, u).mean())

        refill = log_likelihood(model.action[rows])
        uniform = log_likelihood(np.random.default_rng(0).uniform(-1, 1, model.action[rows].shape).astype(np.float32))
        assert refill > uniform + 0.5, (refill, uniform)  # nats per action


@pytest.mark.slow
def test_the_model_based_learner_masters_the_pendulum_in_a_few_thousand_real_steps(one_torch_thread):
    """Does it learn: conf/policy/mbpo.yaml's settings, 2,000 real steps (model-free SAC needs ~13,500;
    benchmarks/real_step_efficiency.py, seed 0, reaches 1,000 here: its median over seeds)."""
    config, algo = default_config("pendulum", total_env_steps=2000, seed=0)
    config = dataclasses.replace(config, torch_threads=2)  # both cores: the other test worker mostly waits on servers and subprocesses
    with Trainer(config, make_algorithm(config, algo)) as trainer:
        trainer.train()
        policy = trainer.algo.policy
    result = evaluate(policy, "pendulum", [VariationProfile()], 5, seed=777)
    assert result.mean_return >= 900, result.to_dict()


def test_the_hydra_config_is_the_learner_the_benchmark_measures():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("flywheel", overrides=["policy=mbpo"])
    trainer, algo = instantiate(cfg.policy.trainer), instantiate(cfg.policy.algorithm)
    want_trainer, want_algo = default_config("pendulum", total_env_steps=trainer.total_env_steps)
    assert algo == want_algo
    assert (trainer.algorithm, trainer.num_worlds) == (want_trainer.algorithm, want_trainer.num_worlds) == ("mbpo", 1)


def test_the_flywheel_learner_continues_with_a_newer_snapshot(one_torch_thread):
    from sim.batched import BatchedStepper
    from sim.policy_fn import random_policy
    from sim.scenario import ScenarioSpec

    with BatchedStepper("pendulum", 4, source="real", robot_id="r") as stepper:
        episodes = stepper.simulate([ScenarioSpec("pendulum", seed=s, max_steps=50) for s in range(8)], random_policy(1, 0))
    config, algo = default_config("pendulum", total_env_steps=300, seed=0)
    algo = dataclasses.replace(algo, sac=dataclasses.replace(algo.sac, utd_ratio=2.0), model_train=dataclasses.replace(algo.model_train, max_steps=100), rollouts_per_step=4)
    first = make_algorithm(config, algo)
    first.add_offline(episodes[:4])
    with Trainer(config, first) as trainer:
        trainer.train()
    tensors, meta = first.state()
    own = int((~first.real.arrays["offline"][: first.real.size]).sum())
    assert own == 300 and first.real.size == own + sum(e.num_steps for e in episodes[:4])

    second = make_algorithm(config, algo)
    second.continue_from(tensors, meta)
    second.add_offline(episodes[4:])  # the newer snapshot replaces the old episodes, the own steps stay
    assert second.real.size == own + sum(e.num_steps for e in episodes[4:])
    assert second.sac.env_steps == 300 and second.model is not None and second.retrains == first.retrains
    with Trainer(dataclasses.replace(config, total_env_steps=60), second) as trainer:
        trainer.train()
    assert second.retrains == first.retrains + 1  # refitted at once on the new data, no warm-up
    assert second.sac.gradient_steps > first.sac.gradient_steps


def test_each_batch_is_mostly_model_data_in_the_configured_ratio(one_torch_thread):
    """Swapped real and model shares (90 % real) passed every fast test: the model-based speed-up gone, silently."""
    from policies.replay import split_counts

    learner = MBPO(make_spec("pendulum", MBPOConfig()), MBPOConfig(real_ratio=0.1), robot_model="pendulum")
    assert learner.sac.replay.ratios == {"model": 0.9, "real": 0.1}
    assert split_counts(learner.sac.replay.ratios, 100) == {"model": 90, "real": 10}


def test_a_recorded_episode_with_actions_past_the_range_is_taken_as_applied(one_torch_thread):
    """An uploaded or imported episode may hold actions beyond [-1, 1] (the actuators clip them): the learner's log once
    kept them, and every later view of it was refused, stopping training partway through an iteration."""
    learner = MBPO(make_spec("pendulum", MBPOConfig()), MBPOConfig(), robot_model="pendulum")
    obs = np.zeros((6, 4), np.float32)
    learner.real.add_episode(obs, np.full((5, 1), 1.5, np.float32), np.zeros(5, np.float32), np.zeros(5, bool))
    assert float(learner.real.view().action.max()) == 1.0


def _small(robot: str, **changes):
    """(TrainerConfig, MBPOConfig) of a 300-step run that fits the model at 100 real steps and refills every 50."""
    config, algo = default_config(robot, total_env_steps=300, seed=0)
    sac = dataclasses.replace(algo.sac, hidden_sizes=(32, 32), learning_starts=100, utd_ratio=1.0, batch_size=32)
    model_train = dataclasses.replace(algo.model_train, max_steps=200)
    return config, dataclasses.replace(algo, sac=sac, model_train=model_train, retrain_steps=50, model_train_every=100, rollouts_per_step=4, **changes)


def test_an_observation_constant_in_the_data_does_not_stop_the_model_based_learner(one_torch_thread):
    """A touch sensor that never fired gave the world model's envelope no width there: every rollout was cut at step 0,
    the model replay stayed empty, and the run ended with 0 updates, the untrained policy exported, no word."""
    from tests.tiny_robots import registered

    with registered():
        config, algo = _small("tiny_touch")
        with Trainer(config, make_algorithm(config, algo)) as trainer:
            result = trainer.train()
        learner: MBPO = trainer.algo
    assert float(np.ptp(learner.real.view().obs[:, -1])) == 0.0  # the touch sensor never fired
    assert learner.sac.replay.sources["model"].size > 0 and learner.refill_transitions > 0
    assert result.updates > 0


def test_refills_that_add_nothing_are_reported(one_torch_thread):
    """A model that trusts none of its predictions (here: any disagreement cuts) leaves SAC waiting: it says so."""
    config, algo = _small("pendulum", disagreement_threshold=1e-12)
    with Trainer(config, make_algorithm(config, algo)) as trainer:
        with pytest.warns(RuntimeWarning, match=r"last 3 rollout refills added no model transitions .*disagreement \d+"):
            result = trainer.train()
    assert result.updates == 0 and trainer.algo.empty_refills == trainer.algo.refills == 5
    assert trainer.algo.model_metrics()["model/refill_transitions"] == 0.0
