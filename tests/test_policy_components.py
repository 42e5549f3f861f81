"""Policy floor parts in isolation: normaliser, replay mixing, bootstrapping, evaluation, import floors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from policies.networks import Policy, PolicySpec, TwinQ, tanh_log_det
from policies.normalizer import ObsNormalizer
from policies.ppo import PPO, PPOConfig
from policies.replay import MixedReplay, split_counts
from policies.sac import SAC, SACConfig
from policies.transition import VectorStep
from sim.batched import BatchedStepper
from sim.episode import Episode
from sim.policy_fn import zero_policy
from sim.robots.pendulum import Pendulum
from sim.robots import registry
from sim.scenario import ScenarioSpec
from sim.variation import VariationProfile


def _episodes(source: str, count: int, steps: int, obs_dim: int = 4, act_dim: int = 1, seed: int = 0) -> list[Episode]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        term = np.zeros(steps, bool)
        trunc = np.zeros(steps, bool)
        (term if i % 2 else trunc)[-1] = True
        out.append(
            Episode.create(
                observation=rng.normal(size=(steps + 1, obs_dim)),
                action=rng.uniform(-1, 1, size=(steps, act_dim)),
                reward=np.full(steps, {"real": 1.0, "sim": 2.0, "worldmodel": 3.0}[source]),
                terminated=term,
                truncated=trunc,
                timestamp=np.arange(steps + 1) * 0.04,
                robot_id="r1",
                robot_model="pendulum",
                source=source,
            )
        )
    return out


def test_normalizer_matches_numpy_moments_over_batches():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(1000, 3)).astype(np.float32)
    norm = ObsNormalizer(3)
    for chunk in np.array_split(data, 7):
        norm.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(norm.mean.numpy(), data.mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm.var.numpy(), data.var(0), rtol=1e-5)
    out = norm(torch.from_numpy(data)).numpy()
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-4)
    disabled = ObsNormalizer(3, enabled=False)
    disabled.update(torch.from_numpy(data))
    assert torch.equal(disabled(torch.from_numpy(data)), torch.from_numpy(data))


def test_tanh_log_det_is_stable_and_exact():
    u = torch.tensor([[-30.0, -1.0, 0.0, 2.0, 30.0]], dtype=torch.float64)
    expected = torch.log(1 - torch.tanh(u[:, 1:4]) ** 2).sum()
    assert torch.isfinite(tanh_log_det(u)).all()
    assert torch.allclose(tanh_log_det(u[:, 1:4]), expected)


def test_twin_q_members_are_independent_networks():
    q = TwinQ(4, 1, (8, 8), "relu")
    out = q(torch.zeros(5, 4), torch.zeros(5, 1))
    assert out.shape == (2, 5)
    assert not torch.equal(out[0], out[1])


def test_twin_q_is_each_members_mlp_and_its_frozen_pass_gives_no_weight_gradients():
    q = TwinQ(4, 1, (8, 8), "relu")
    obs, act = torch.randn(5, 4), torch.randn(5, 1, requires_grad=True)
    for i in range(2):
        x = torch.cat([obs, act], -1)
        for k, (w, b) in enumerate(zip(q.weights, q.biases)):
            x = x @ w[i] + b[i]
            x = torch.relu(x) if k < len(q.weights) - 1 else x
        torch.testing.assert_close(q(obs, act)[i], x.squeeze(-1))
    q(obs, act, frozen=True).sum().backward()
    assert act.grad is not None and all(p.grad is None for p in q.parameters())


def _one_sac_step(precision: str) -> tuple[SAC, dict[str, float]]:
    spec = PolicySpec(4, 1, (64, 64), "relu", False)
    sac = SAC(spec, SACConfig(hidden_sizes=(64, 64), learning_starts=0, batch_size=64, precision=precision), seed=3)
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((256, 4)).astype(np.float32)
    sac.observe(VectorStep(obs, rng.uniform(-1, 1, (256, 1)).astype(np.float32), rng.standard_normal(256).astype(np.float32), obs, obs, np.zeros(256, bool), np.zeros(256, bool)))
    sac.grad_debt = 1
    return sac, sac.update()


def test_bfloat16_precision_steps_like_float32_and_keeps_float32_weights():
    """Mixed precision (SACConfig.precision): hidden matmuls in bfloat16, heads, losses and weights in float32."""
    (ref, ref_metrics), (mixed, metrics) = _one_sac_step("float32"), _one_sac_step("bfloat16")
    for key in ("train/critic_loss", "train/actor_loss", "train/q", "train/entropy"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=0.03, abs=0.02), key
    assert all(p.dtype == torch.float32 for p in [*mixed.policy.parameters(), *mixed.critic.parameters()])
    for a, b in zip(mixed._flat, ref._flat):  # the actor's and the critic's gradients point the same way
        assert torch.nn.functional.cosine_similarity(a.grad, b.grad, dim=0) > 0.99
    assert mixed.critic(torch.zeros(2, 4), torch.zeros(2, 1)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision 'float16'"):
        SACConfig(precision="float16")


def test_auto_precision_takes_bfloat16_only_where_it_pays():
    from policies.sac import matmul_dtype
    from worldmodel.device import fast_bfloat16

    cpu = torch.device("cpu")
    assert matmul_dtype("auto", cpu, (256, 256)) == (torch.bfloat16 if fast_bfloat16(cpu) else None)
    assert matmul_dtype("auto", cpu, (64, 64)) is None  # narrow layers: the casts cost more than they save
    assert matmul_dtype("auto", torch.device("cuda"), (256, 256)) is None  # launch-bound on a GPU
    assert (matmul_dtype("float32", cpu, (256, 256)), matmul_dtype("bfloat16", cpu, (64, 64))) == (None, torch.bfloat16)


def test_split_counts_follow_ratios_and_sum_to_batch():
    counts = split_counts({"real": 0.5, "sim": 0.3, "worldmodel": 0.2}, 256)
    assert sum(counts.values()) == 256
    assert counts == {"real": 128, "sim": 77, "worldmodel": 51}


def test_mixed_replay_samples_sources_in_ratio_and_stores_end_flags():
    offline = {"real": _episodes("real", 4, 10), "worldmodel": _episodes("worldmodel", 2, 5, seed=1)}
    replay = MixedReplay({"real": 0.5, "sim": 0.25, "worldmodel": 0.25}, 4, 1, online_source="sim", online_capacity=100, offline=offline)
    assert replay.sizes() == {"real": 40, "sim": 0, "worldmodel": 10}
    assert not replay.can_sample()
    n = 8
    obs = np.zeros((n, 4), np.float32)
    replay.add_online(obs, np.zeros((n, 1)), np.full(n, 2.0), obs, np.zeros(n, bool), np.zeros(n, bool))
    batch = replay.sample(400, torch.Generator().manual_seed(0))
    rewards = batch.reward.numpy()
    assert (rewards == 1.0).sum() == 200 and (rewards == 2.0).sum() == 100 and (rewards == 3.0).sum() == 100
    real = replay.sources["real"]
    ends = np.flatnonzero(real.terminated + real.truncated)
    assert list(ends) == [9, 19, 29, 39]
    assert real.truncated[9] == 1 and real.terminated[19] == 1 and real.terminated[9] == 0
    ep = offline["real"][0]
    np.testing.assert_array_equal(real.next_obs[9], ep.observation[-1])  # the final observation is kept


def test_mixed_replay_refuses_sources_without_data_or_ratio():
    with pytest.raises(ValueError, match="'real' has ratio"):
        MixedReplay({"real": 0.5, "online": 0.5}, 4, 1)
    with pytest.raises(ValueError, match="would be dropped"):
        MixedReplay({"real": 1.0}, 4, 1, offline={"real": _episodes("real", 1, 3)})
    with pytest.raises(ValueError, match="no ratio"):
        MixedReplay({"online": 1.0}, 4, 1, offline={"sim": _episodes("sim", 1, 3)})
    with pytest.raises(ValueError, match="obs_dim 4"):
        MixedReplay({"real": 1.0}, 5, 1, online_source="real", offline={"real": _episodes("real", 1, 3)})
    with pytest.raises(ValueError, match="robot model"):
        MixedReplay({"real": 1.0}, 4, 1, online_source="real", offline={"real": _episodes("real", 1, 3)}, robot_model="ant")


@pytest.mark.parametrize("make", [lambda spec: PPO(spec, PPOConfig(), num_worlds=4, seed=3), lambda spec: SAC(spec, SACConfig(hidden_sizes=(64, 64)), seed=3)], ids=["ppo", "sac"])
def test_initial_weights_do_not_depend_on_the_thread_count(make):
    """A 64x64 PPO's orthogonal init (a QR decomposition) differed between 1 and 2 torch threads, and the learner is built
    before the trainer applies torch_threads: a first run in a process, or one on another machine, diverged from the rest."""
    spec = PolicySpec(17, 6, (64, 64), "tanh", True)
    before = torch.get_num_threads()
    built = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            learner = make(spec)
            built[threads] = {k: v.clone() for k, v in learner.policy.state_dict().items()}
            assert torch.get_num_threads() == threads  # the caller's count, restored
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(built[1][k], built[2][k]) for k in built[1])


def test_sac_bootstraps_through_truncation_not_termination():
    spec = PolicySpec(4, 1, (16, 16), "relu", False)
    sac = SAC(spec, SACConfig(learning_starts=0, batch_size=2, buffer_size=100))
    obs = np.zeros((2, 4), np.float32)
    step = VectorStep(obs, np.zeros((2, 1), np.float32), np.ones(2, np.float32), obs, obs + 1, np.array([True, False]), np.array([False, True]))
    sac.observe(step)
    buf = sac.replay.sources["online"]
    assert list(buf.terminated[:2]) == [1.0, 0.0] and list(buf.truncated[:2]) == [0.0, 1.0]
    np.testing.assert_array_equal(buf.next_obs[:2], obs + 1)
    batch = sac.replay.sample(2, torch.Generator().manual_seed(0))
    assert set(batch.terminated.tolist()) <= {0.0, 1.0}


def test_ppo_adds_discounted_final_value_on_truncation_only():
    spec = PolicySpec(4, 1, (8,), "tanh", False)
    ppo = PPO(spec, PPOConfig(n_steps=2, hidden_sizes=(8,), normalize_obs=False), num_worlds=3)
    obs = np.zeros((3, 4), np.float32)
    final = np.full((3, 4), 0.5, np.float32)
    ppo.explore(obs)
    ppo.observe(VectorStep(obs, np.zeros((3, 1), np.float32), np.ones(3, np.float32), obs, final, np.array([True, False, False]), np.array([False, True, False])))
    with torch.no_grad():
        v_final = float(ppo.value(torch.from_numpy(final[:1])).squeeze())
    reward = ppo.buf["reward"][0]
    assert float(reward[0]) == 1.0 and float(reward[2]) == 1.0
    assert float(reward[1]) == pytest.approx(1.0 + ppo.config.gamma * v_final)
    assert list(ppo.buf["done"][0]) == [1.0, 1.0, 0.0]


def test_policy_runs_in_the_batched_stepper_and_stays_in_range():
    policy = Policy(PolicySpec(4, 1, (16,), "tanh"))
    scenarios = [ScenarioSpec("pendulum", seed=s) for s in range(3)]
    with BatchedStepper("pendulum", 3, nthread=1) as stepper:
        episodes = stepper.simulate(scenarios, policy)
    assert len(episodes) == 3
    assert all(np.abs(ep.action).max() <= 1.0 for ep in episodes)


def test_evaluate_counts_success_and_failure_per_profile():
    from policies.evaluate import evaluate

    profiles = [VariationProfile(), VariationProfile(actuator_strength=0.5)]
    result = evaluate(zero_policy(1), "pendulum", profiles, episodes_per_profile=3, seed=7)
    assert [p.episodes for p in result.profiles] == [3, 3]
    for p in result.profiles:  # a zero action lets the pole fall: every episode fails, none succeeds
        assert p.failures == 3 and p.successes == 0
        assert 1 <= p.mean_return < 200
    again = evaluate(zero_policy(1), "pendulum", profiles, episodes_per_profile=3, seed=7)
    assert again.to_dict() == result.to_dict()
    metrics = result.metrics()
    assert metrics["eval/failures"] == 6.0 and metrics["eval/success_rate"] == 0.0
    reach = evaluate(zero_policy(2), "reacher", profiles[:1], episodes_per_profile=2, seed=0)
    assert reach.profiles[0].failures == 0  # reacher never terminates; success is distance-based


def test_importing_policies_and_runtime_does_not_import_torch_or_ray():
    code = "import sys, policies, policies.runtime; bad = {'torch', 'ray'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_keep_best_makes_the_best_evaluated_policy_the_result_and_the_learner_goes_on(one_torch_thread):
    from policies.evaluate import evaluate
    from policies.trainer import Trainer, TrainerConfig, make_algorithm

    with pytest.raises(ValueError, match="eval_every"):
        TrainerConfig(algorithm="sac", keep_best=True)
    profiles = [VariationProfile(), VariationProfile(actuator_strength=0.5)]
    config = TrainerConfig(robot="pendulum", algorithm="sac", num_worlds=4, total_env_steps=400, eval_every=10, eval_episodes=2, keep_best=True, log_every=0)
    algo = SACConfig(hidden_sizes=(16, 16), batch_size=32, learning_starts=100)
    logged = []
    with Trainer(config, make_algorithm(config, algo), profiles=profiles, log=lambda m, s: logged.append(m)) as trainer:
        trainer.train()
        best, latest = trainer.best_policy, trainer.algo.policy
    scores = [(m["eval/min_profile_return"], m["eval/mean_return"]) for m in logged if "eval/mean_return" in m]
    assert len(scores) >= 8 and trainer.best_score == max(scores)  # every evaluation competed, the final one too
    again = evaluate(best, "pendulum", profiles, 2, seed=config.seed)  # the copy is the policy that scored it
    assert (min(p.mean_return for p in again.profiles), again.mean_return) == trainer.best_score
    assert best is not latest and not any(p is q for p, q in zip(best.parameters(), latest.parameters()))


class FiveStepPendulum(Pendulum):
    """The pendulum with a 5-step time limit: any policy keeps it up that long, so every evaluation scores
    the maximum return."""

    name = "pendulum_five_steps"
    max_steps = 5


def test_training_stops_once_the_kept_policy_cannot_be_beaten(one_torch_thread, monkeypatch):
    from policies.trainer import Trainer, TrainerConfig, make_algorithm

    monkeypatch.setitem(registry._TASKS, FiveStepPendulum.name, FiveStepPendulum)  # registered for this test only

    with pytest.raises(ValueError, match="keep_best"):
        TrainerConfig(algorithm="sac", eval_every=10, stop_at_max_return=True)
    algo = SACConfig(hidden_sizes=(16, 16), batch_size=32, learning_starts=40)
    ran, evaluated_at = {}, {}
    for robot, stop in [("pendulum_five_steps", True), ("pendulum_five_steps", False), ("pendulum", True)]:
        config = TrainerConfig(robot=robot, algorithm="sac", num_worlds=4, total_env_steps=200, eval_every=5, eval_episodes=1, keep_best=True, stop_at_max_return=stop, log_every=0)
        log = lambda m, steps, key=(robot, stop): evaluated_at.setdefault(key, []).append(steps) if "eval/mean_return" in m else None  # noqa: E731
        with Trainer(config, make_algorithm(config, algo), log=log) as trainer:
            ran[robot, stop] = (trainer.train().env_steps, trainer.best_score)
    # training ended at the evaluation that first scored 5 of 5 steps on every profile
    assert ran["pendulum_five_steps", True] == (evaluated_at["pendulum_five_steps", True][-1], (5.0, 5.0))
    assert ran["pendulum_five_steps", True][0] < 200
    assert ran["pendulum_five_steps", False][0] == 200  # without the rule it trains on to its budget
    assert ran["pendulum", True][0] == 200 and ran["pendulum", True][1][0] < 1000  # a score short of the maximum never stops it


def test_a_filtered_sensor_counts_in_the_noise_rule_at_what_its_filter_leaves():
    """The robot is told its filtered sensor is clean (its body features); the actors train under the noise its filter leaves."""
    from fleet.pipeline.steps import filter_residuals, robust_to_fleet_sensors

    seen = {"clean": VariationProfile(), "filtered": VariationProfile(actuator_strength=0.5)}  # as seen_bodies gives them
    view = filter_residuals(seen, {"filtered": 0.03})
    assert view == {"clean": VariationProfile(), "filtered": VariationProfile(actuator_strength=0.5, obs_noise_std=0.03)}
    assert robust_to_fleet_sensors(SACConfig(), view).actor_obs_noise == pytest.approx(0.03)
    assert robust_to_fleet_sensors(SACConfig(), filter_residuals(seen, {})).actor_obs_noise == 0.0  # no filter kept: nothing added


def test_the_actor_learns_under_the_fleets_noisiest_calibrated_sensor():
    from fleet.pipeline.steps import robust_to_fleet_sensors
    from policies.mbpo import MBPOConfig

    fleet = {"a": VariationProfile(), "b": VariationProfile(obs_noise_std=0.04), "c": VariationProfile(obs_noise_std=0.01)}
    assert robust_to_fleet_sensors(SACConfig(), fleet).actor_obs_noise == pytest.approx(0.04)
    assert robust_to_fleet_sensors(SACConfig(actor_obs_noise=0.1), fleet).actor_obs_noise == pytest.approx(0.1)  # never below its own
    nested = robust_to_fleet_sensors(MBPOConfig(), fleet)
    assert nested.sac.actor_obs_noise == pytest.approx(0.04) and nested.sac.hidden_sizes == MBPOConfig().sac.hidden_sizes
    assert robust_to_fleet_sensors(SACConfig(), {"a": VariationProfile()}).actor_obs_noise == 0.0
    with pytest.raises(ValueError, match="actor_obs_noise"):
        SACConfig(actor_obs_noise=-0.1)
    # loop.noise_free_training_worlds: the worlds keep each body and sensor offset, not the noise
    from fleet.pipeline.steps import clean_sensor_worlds

    worlds = clean_sensor_worlds({"n": VariationProfile(obs_noise_std=0.05, obs_bias=0.02, actuator_strength=0.5)})
    assert worlds == {"n": VariationProfile(obs_bias=0.02, actuator_strength=0.5)}
