"""Does it learn: PPO and SAC on the pendulum (reward 1 per step alive; random/zero policies get ~5).

Budgets and thresholds were measured (docs/policies.md): PPO evaluates ~330 after 32k env
steps (~6 s), SAC ~80 after 4k env steps (~14 s) on 2 shared cores; the thresholds leave
a wide margin. Seeds are fixed, so each run is deterministic on a given machine.
"""

from __future__ import annotations

from policies.evaluate import evaluate
from policies.ppo import PPOConfig
from policies.sac import SACConfig
from policies.trainer import Trainer, TrainerConfig, make_algorithm
from sim.policy_fn import random_policy
from sim.variation import VariationProfile

EVAL = dict(robot="pendulum", profiles=[VariationProfile()], episodes_per_profile=8, seed=123)


def _train_and_evaluate(config: TrainerConfig, algo_config) -> tuple[float, list]:
    with Trainer(config, make_algorithm(config, algo_config)) as trainer:
        result = trainer.train()
        evaluation = evaluate(trainer.algo.policy, **EVAL)
    return evaluation.mean_return, result.curve


def test_random_policy_baseline_is_low():
    assert evaluate(random_policy(1, seed=0), **EVAL).mean_return < 20


def test_ppo_learns_pendulum():
    config = TrainerConfig(robot="pendulum", algorithm="ppo", num_worlds=16, total_env_steps=32 * 1024, seed=0)
    mean_return, curve = _train_and_evaluate(config, PPOConfig(n_steps=64, epochs=10, minibatch_size=256))
    assert mean_return >= 150, f"PPO evaluated {mean_return:.1f} (curve tail {curve[-3:]})"
    assert curve[-1][1] > curve[0][1]


def test_sac_learns_pendulum():
    config = TrainerConfig(robot="pendulum", algorithm="sac", num_worlds=8, total_env_steps=4000, seed=0, log_every=0)
    mean_return, curve = _train_and_evaluate(config, SACConfig(hidden_sizes=(64, 64), learning_starts=500))
    assert mean_return >= 40, f"SAC evaluated {mean_return:.1f} (curve tail {curve[-3:]})"
