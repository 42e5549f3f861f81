"""SAC from a replay that mixes real fleet episodes, MuJoCo scenario episodes and world-model rollouts."""

from __future__ import annotations

import pytest

from policies.sac import SACConfig
from policies.trainer import Trainer, TrainerConfig, make_algorithm
from sim.batched import BatchedStepper
from sim.policy_fn import random_policy
from sim.scenario import ScenarioSpec
from sim.variation import VariationProfile


def _episodes(source: str, seed: int, count: int = 4):
    """Real MuJoCo episodes of a random policy, labelled as coming from ``source``."""
    scenarios = [ScenarioSpec("pendulum", seed=seed * 100 + i, profile=VariationProfile(payload_mass=0.2 * i)) for i in range(count)]
    with BatchedStepper("pendulum", count, nthread=1, source=source, robot_id=f"{source}-robot") as stepper:
        return stepper.simulate(scenarios, random_policy(1, seed=seed))


@pytest.fixture(scope="module")
def offline():
    return {"real": _episodes("real", 1), "worldmodel": _episodes("worldmodel", 2)}


CONFIG = TrainerConfig(robot="pendulum", algorithm="sac", num_worlds=4, total_env_steps=96, seed=0, log_every=0)
SAC = SACConfig(
    hidden_sizes=(16, 16),
    batch_size=20,
    learning_starts=32,
    buffer_size=1000,
    replay_ratios={"real": 0.5, "sim": 0.3, "worldmodel": 0.2},
    online_source="sim",
)


def test_sac_trains_on_real_sim_and_worldmodel_sources(offline, tmp_path):
    algo = make_algorithm(CONFIG, SAC, offline=offline)
    sizes = algo.replay.sizes()
    assert sizes["real"] == sum(ep.num_steps for ep in offline["real"]) and sizes["sim"] == 0
    with Trainer(CONFIG, algo, checkpoint_dir=tmp_path, algo_config=SAC) as trainer:
        result = trainer.train()
    assert algo.replay.sizes()["sim"] == CONFIG.total_env_steps  # online stepper data went to "sim"
    assert algo.gradient_steps == CONFIG.total_env_steps - SAC.learning_starts
    assert result.updates > 0 and all(v == v for v in result.metrics.values())  # no NaN
    assert {k for k in result.metrics} >= {"train/critic_loss", "train/actor_loss", "train/alpha", "train/entropy", "train/q"}


def test_resume_with_other_offline_data_is_refused(offline, tmp_path):
    with Trainer(CONFIG, make_algorithm(CONFIG, SAC, offline=offline), checkpoint_dir=tmp_path) as trainer:
        trainer.train(max_updates=2)
    other = {**offline, "real": _episodes("real", 3)}
    with Trainer(CONFIG, make_algorithm(CONFIG, SAC, offline=other), checkpoint_dir=tmp_path) as trainer:
        with pytest.raises(ValueError, match="same data snapshot"):
            trainer.resume()


def test_ppo_refuses_offline_episodes(offline):
    from policies.ppo import PPOConfig

    with pytest.raises(ValueError, match="on-policy"):
        make_algorithm(TrainerConfig(algorithm="ppo"), PPOConfig(), offline=offline)
