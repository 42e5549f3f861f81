"""What a learner, a world model and the stepper take from their caller, checked where it enters: config values
out of range, NaN from an env or a robot's task, actions outside [-1, 1], shapes that do not agree, and a resume
under other settings from Python. Each was taken once, silently or with an error far from its cause."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from policies.evaluate import evaluate
from policies.mbpo import MBPOConfig
from policies.networks import Policy, PolicySpec
from policies.ppo import PPO, PPOConfig
from policies.sac import SAC, SACConfig
from policies.trainer import Trainer, TrainerConfig, make_algorithm
from policies.transition import VectorStep
from sim.batched import BatchedStepper
from sim.robots import get_task
from sim.scenario import ScenarioSpec
from sim.variation import VariationProfile
from worldmodel.train import TrainConfig
from worldmodel.transitions import Transitions


@pytest.mark.parametrize(
    "make, named",
    [
        (lambda: SACConfig(actor_lr=-0.001), "actor_lr=-0.001"),  # gradient ascent, once to rc=0
        (lambda: SACConfig(init_alpha=0), "init_alpha=0"),  # once "math domain error"
        (lambda: SACConfig(learning_starts=-5), "learning_starts=-5"),
        (lambda: SACConfig(critic_lr=float("nan")), "critic_lr=nan"),
        (lambda: PPOConfig(gamma=2, clip_range=-0.2), "gamma=2 (must be in [0, 1]), clip_range=-0.2"),
        (lambda: PPOConfig(lr=0), "lr=0"),
        (lambda: TrainConfig(learning_rate=-1), "learning_rate=-1"),  # 0 stays: a model held still
        (lambda: TrainConfig(weight_decay=float("inf")), "weight_decay=inf"),
        (lambda: TrainConfig(val_fraction=1.0), "val_fraction=1.0"),
        (lambda: TrainerConfig(eval_episodes=0), "eval_episodes=0"),  # once a traceback mid-run
        (lambda: TrainerConfig(checkpoint_every=-1), "checkpoint_every=-1"),
        (lambda: TrainerConfig(log_every=-1), "log_every=-1"),  # 0 stays: no log calls
    ],
)
def test_config_values_out_of_range_are_refused_naming_the_field(make, named):
    with pytest.raises(ValueError, match="must be") as refused:
        make()
    assert named in str(refused.value)


def step(n=2, **change) -> VectorStep:
    obs = np.zeros((n, 3))
    fields = dict(obs=obs, action=np.zeros((n, 1)), reward=np.zeros(n), next_obs=obs, final_obs=obs, terminated=np.zeros(n), truncated=np.zeros(n))
    return VectorStep(**{**fields, **change})


def test_a_vector_step_is_cast_and_checked_where_it_enters_a_learner():
    taken = step()  # float64 and int arrays, as a gymnasium env gives them
    assert taken.obs.dtype == np.float32 and taken.terminated.dtype == bool
    for change, said in (
        ({"obs": np.full((2, 3), np.nan)}, "obs holds NaN"),  # once stored: every weight NaN a few updates later
        ({"reward": np.array([0.0, np.inf])}, "reward holds NaN"),
        ({"action": np.full((2, 1), 2.0)}, "learners act in [-1, 1]"),  # env-scaled actions, once stored as they were
        ({"reward": np.zeros(3)}, "one row per world"),
        ({"obs": np.zeros(3)}, "one env: N = 1"),
    ):
        with pytest.raises(ValueError, match=said.replace("[", r"\[").replace("]", r"\]")):
            step(**change)


def test_a_learner_acts_on_rows_of_worlds_and_says_so_for_one_observation():
    config = SACConfig(hidden_sizes=(8, 8), batch_size=8, learning_starts=0)
    sac = make_algorithm(TrainerConfig(robot="pendulum", algorithm="sac", num_worlds=2), config)
    assert sac.explore(np.zeros((2, 4), np.float64)).shape == (2, 1)  # float64: once a torch dtype error
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        sac.explore(np.zeros(4))  # once (3, 1) before learning_starts and (1,) after


def transitions(**change) -> Transitions:
    m = 6
    fields = dict(obs=np.zeros((m, 2)), action=np.zeros((m, 1)), next_obs=np.zeros((m, 2)), reward=np.zeros(m), terminated=np.zeros(m), episode=np.zeros(m), step=np.arange(m))
    return Transitions(**{**fields, **change})


def test_world_model_transitions_are_checked_and_a_diverged_model_is_not_saved(tmp_path):
    import torch

    from worldmodel.ensemble import DynamicsEnsemble, EnsembleConfig, ModelSpec
    from worldmodel.io import save

    assert transitions().obs.dtype == np.float32
    for change, said in (
        ({"obs": np.full((6, 2), np.nan)}, "obs holds NaN"),  # once: val_mse NaN, saved, rolled out nothing
        ({"action": np.full((6, 1), 1.999)}, "actions in [-1, 1]"),  # once clamped silently in rollouts
        ({"reward": np.zeros((6, 1))}, "reward has shape"),
        ({"action": np.zeros(6)}, "action has shape"),
    ):
        with pytest.raises(ValueError, match=said.replace("[", r"\[").replace("]", r"\]")):
            transitions(**change)
    model = DynamicsEnsemble(ModelSpec("pendulum", 4, 1, EnsembleConfig(ensemble_size=2, num_elites=1, hidden_size=8, num_hidden_layers=1)), seed=0)
    assert save(model, tmp_path / "untrained")  # its envelope is +-inf until data widens it: no divergence
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="diverged"):
        save(model, tmp_path / "model")
    assert not any((tmp_path / "model").iterdir())  # nothing written


def test_nan_from_a_robots_task_is_named_at_its_method_not_blamed_on_the_policy():
    pendulum = type(get_task("pendulum"))

    class LeakyReward(pendulum):
        def reward_terms(self, before, after, action):
            terms = super().reward_terms(before, after, action)
            return {**terms, "leak": np.full(len(action), np.nan, np.float32)}

    stepper = BatchedStepper(LeakyReward(), 2)
    with pytest.raises(ValueError, match=r"LeakyReward.reward_terms\(\)\['leak'\] gave NaN"):
        stepper.simulate([ScenarioSpec("pendulum", seed=0, max_steps=5)], lambda obs: np.zeros((len(obs), 1), np.float32))


def test_a_budget_short_of_the_first_update_is_refused_before_anything_runs():
    """SAC below learning_starts, PPO below one rollout, the model-based learner below its SAC's learning_starts: train() once
    ran to the budget with 0 updates and no word, and flywheel-train exported the initial network as the trained policy."""
    sac = SACConfig(hidden_sizes=(8, 8), batch_size=8, learning_starts=10)
    ppo = PPOConfig(hidden_sizes=(8, 8), n_steps=4, minibatch_size=8)
    mbpo = MBPOConfig(sac=SACConfig(hidden_sizes=(8, 8), learning_starts=150, utd_ratio=10.0))
    for algorithm, algo, short, needs, least in (
        ("sac", sac, 10, r"11 env steps \(algorithm.learning_starts=10, then 1 at algorithm.utd_ratio=1\)", 12),
        ("sac", dataclasses.replace(sac, utd_ratio=0.25), 12, r"14 env steps \(algorithm.learning_starts=10, then 4 at algorithm.utd_ratio=0.25\)", 14),
        ("ppo", ppo, 6, r"8 env steps \(one rollout: algorithm.n_steps=4 x trainer.num_worlds=2\)", 8),
        ("mbpo", mbpo, 150, r"151 env steps \(algorithm.sac.learning_starts=150, then 1 at algorithm.sac.utd_ratio=10\)", 152),
    ):
        config = TrainerConfig(robot="pendulum", algorithm=algorithm, num_worlds=2, total_env_steps=short)
        with pytest.raises(ValueError, match=rf"trainer.total_env_steps={short} ends before the learner's first update, which needs {needs}: set trainer.total_env_steps to {least} or more"):
            Trainer(config, make_algorithm(config, algo))
    config = TrainerConfig(robot="pendulum", algorithm="sac", num_worlds=2, total_env_steps=12)
    with Trainer(config, make_algorithm(config, sac)) as trainer:  # the least budget updates
        assert trainer.train().updates == 1
    with Trainer(dataclasses.replace(config, total_env_steps=2), trainer.algo) as again:  # a learner carried over is past its warm-up
        assert again.train().updates == 1
    short = dataclasses.replace(config, total_env_steps=6)  # a learner carried on (a flywheel iteration): its run's budget is the caller's to check
    with Trainer(short, make_algorithm(short, sac), carried_on=True) as first, Trainer(short, first.algo, carried_on=True) as second:
        assert first.train().updates == 0 and second.train().updates == 1  # the warm-up ends in the second call


def test_rows_of_another_width_are_refused_naming_the_field():
    """A VectorStep of 4-wide observations for a learner of 3 failed deep in SAC's replay as a numpy broadcast, and a
    policy of another robot in evaluate as a matmul error in its first layer."""
    spec = PolicySpec(3, 1, (8,), "relu", False)
    sac = SAC(spec, SACConfig(hidden_sizes=(8,), batch_size=2, learning_starts=1))
    wide = np.zeros((2, 4))
    with pytest.raises(ValueError, match=r"VectorStep: obs rows of 4 values, this learner's obs_dim is 3"):
        sac.observe(step(obs=wide, next_obs=wide, final_obs=wide))
    ppo = PPO(spec, PPOConfig(hidden_sizes=(8,), n_steps=2, minibatch_size=2), num_worlds=2)
    with pytest.raises(ValueError, match=r"VectorStep: action rows of 2 values, this learner's act_dim is 1"):
        ppo.observe(step(action=np.zeros((2, 2))))
    with pytest.raises(ValueError, match=r"the policy reads observations of 3 values; robot 'pendulum' gives 4"):
        evaluate(Policy(spec), "pendulum", [VariationProfile()], 1, seed=0)


def test_a_python_resume_under_other_learner_settings_is_refused(tmp_path):
    """A Trainer given no algo_config recorded none, so resuming with another actor_lr, gamma and batch mixed them."""
    config = TrainerConfig(robot="pendulum", algorithm="sac", num_worlds=2, total_env_steps=40)
    first = SACConfig(hidden_sizes=(8, 8), batch_size=8, learning_starts=10)
    with Trainer(config, make_algorithm(config, first), checkpoint_dir=tmp_path) as trainer:  # README's mbpo example passes none
        trainer.train()
        trainer.save()
    other = SACConfig(hidden_sizes=(8, 8), batch_size=8, learning_starts=10, actor_lr=0.05, gamma=0.5)
    with Trainer(config, make_algorithm(config, other), checkpoint_dir=tmp_path) as trainer:
        with pytest.raises(ValueError, match=r"algorithm\.actor_lr, algorithm\.gamma"):
            trainer.resume()
    with Trainer(config, make_algorithm(config, first), checkpoint_dir=tmp_path) as trainer:
        trainer.resume()  # the same settings resume
        assert trainer.env_steps == 40


def test_ppo_refuses_rows_for_another_number_of_worlds_naming_both_counts():
    """PPO built for 4 worlds and fed one broadcast that world into all 4 rollout rows (trained on copies, silently);
    built for 1 and fed 2, it failed inside torch at the rollout write."""
    spec = PolicySpec(3, 1, (8,), "tanh", True)
    four = PPO(spec, PPOConfig(hidden_sizes=(8,), n_steps=2, minibatch_size=2), num_worlds=4)
    with pytest.raises(ValueError, match=r"observations for 1 worlds, this learner was built for num_worlds=4: .* or build it with num_worlds=1"):
        four.explore(np.zeros((1, 3)))
    one = PPO(spec, PPOConfig(hidden_sizes=(8,), n_steps=2, minibatch_size=2), num_worlds=1)
    with pytest.raises(ValueError, match=r"observations for 2 worlds, this learner was built for num_worlds=1"):
        one.explore(np.zeros((2, 3)))
    one.explore(np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"VectorStep: rows for 2 worlds, this learner was built for num_worlds=1"):
        one.observe(step(n=2))
    one.observe(step(n=1))  # the right count is taken
    assert one.t == 1


def test_explore_refuses_nan_and_non_numeric_observations_saying_what_to_do():
    """explore() once turned a NaN observation into a NaN action the env was stepped with (the next VectorStep then blamed
    the env), and a Dict observation into a bare numpy TypeError that did not say to flatten it."""
    spec = PolicySpec(3, 1, (8,), "tanh", True)
    sac = SAC(spec, SACConfig(hidden_sizes=(8,), batch_size=2, learning_starts=0))
    ppo = PPO(spec, PPOConfig(hidden_sizes=(8,), n_steps=2, minibatch_size=2), num_worlds=1)
    for learner in (sac, ppo):
        with pytest.raises(ValueError, match=r"explore: obs holds NaN or Inf; an env's observations must be finite"):
            learner.explore(np.array([[0.0, np.nan, 0.0]]))
        with pytest.raises(ValueError, match=r"observations of type dict are not numbers: .*gymnasium.wrappers.FlattenObservation"):
            learner.explore({"position": np.zeros(3)})
    assert ppo._pending is None  # nothing half-remembered for observe()
