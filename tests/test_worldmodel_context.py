"""A world model conditioned on each transition's body (sim.variation.VariationProfile.context):
one model for a fleet's bodies that still tells them apart. Real MuJoCo data."""

import dataclasses

import numpy as np
import pytest
import torch

from sim.batched import BatchedStepper
from sim.policy_fn import random_policy
from sim.scenario import ScenarioSpec
from sim.variation import CONTEXT_DIM, VariationProfile
from worldmodel import EnsembleConfig, TrainConfig
from worldmodel.evaluate import ensemble_step_fn, k_step_errors, observation_scale
from worldmodel.rollout import RolloutConfig, model_rollout
from worldmodel.train import fit_transitions
from worldmodel.transitions import Transitions, to_transitions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BODIES = {"nominal": VariationProfile(), "weak_motor": VariationProfile(actuator_strength=0.3)}
SMALL = EnsembleConfig(ensemble_size=3, num_elites=2, hidden_size=64, num_hidden_layers=2)


def body_transitions(profile: VariationProfile, seed: int, count: int) -> Transitions:
    with BatchedStepper("pendulum", 16, nthread=1) as stepper:
        specs = [ScenarioSpec("pendulum", seed=seed * 1000 + i, max_steps=40, profile=profile) for i in range(count)]
        episodes = stepper.simulate(specs, random_policy(stepper.task.act_dim, seed))
    data = to_transitions(episodes)
    return dataclasses.replace(data, context=np.tile(profile.context(), (len(data), 1)))


def join(parts: list[Transitions], context: bool) -> Transitions:
    fields = {f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Transitions)}
    return Transitions(**(fields if context else {**fields, "context": None}))


@pytest.fixture(scope="module")
def data():
    train = [body_transitions(p, seed=i, count=48) for i, p in enumerate(BODIES.values())]
    val = [body_transitions(p, seed=10 + i, count=12) for i, p in enumerate(BODIES.values())]
    return train, val


def one_step_error(model, data: Transitions, context: bool) -> float:
    pred = ensemble_step_fn(model, data.context if context else None)(data.obs, data.action)
    return float(np.sqrt(np.mean((pred - data.next_obs) ** 2)))


def test_a_conditioned_model_tells_the_bodies_apart_and_an_unconditioned_one_blurs_them(data):
    train, val = data
    config = TrainConfig(max_steps=1500, eval_every=250, seed=0)
    conditioned, _ = fit_transitions(join(train, True), join(val, True), robot="pendulum", ensemble=SMALL, config=config)
    pooled, _ = fit_transitions(join(train, False), join(val, False), robot="pendulum", ensemble=SMALL, config=config)
    assert conditioned.spec.context_dim == CONTEXT_DIM and pooled.spec.context_dim == 0
    for body, v in zip(BODIES, val):
        ours, blurred = one_step_error(conditioned, v, True), one_step_error(pooled, v, False)
        assert ours < 0.7 * blurred, (body, ours, blurred)
    # a rollout stays in its row's body: the same start and policy, two bodies, two different futures
    start = np.repeat(val[0].obs[:1], 2, axis=0)
    contexts = np.stack([p.context() for p in BODIES.values()])
    push = lambda obs: np.ones((len(obs), 1), np.float32)  # noqa: E731
    batch = model_rollout(conditioned, start, push, RolloutConfig(horizon=3, disagreement_threshold=1e9, sample=False), contexts)
    speed = batch.observation[:, 1, 2]  # cart velocity after one full push: the weak motor moves it less
    assert abs(speed[1]) < 0.6 * abs(speed[0]), speed


def test_a_conditioned_model_refuses_rows_without_their_body(data):
    train, val = data
    model, _ = fit_transitions(join(train, True), join(val, True), robot="pendulum", ensemble=SMALL, config=TrainConfig(max_steps=1, eval_every=1))
    obs, act = torch.as_tensor(val[0].obs[:4]), torch.as_tensor(val[0].action[:4])
    with pytest.raises(ValueError, match="pass context="):
        model.mean_step(obs, act)
    with pytest.raises(ValueError, match="context must be"):
        model_rollout(model, val[0].obs[:4], lambda o: np.zeros((len(o), 1), np.float32), RolloutConfig(horizon=2), np.zeros((3, CONTEXT_DIM)))
    with pytest.raises(ValueError, match="cannot continue training"):
        fit_transitions(join(train, False), join(val, False), robot="pendulum", ensemble=SMALL, config=TrainConfig(max_steps=1, eval_every=1), model=model)


def test_k_step_errors_of_a_conditioned_model_read_each_start_with_its_episodes_body(data):
    """k_step_errors picks its starts itself, so a context fixed in ensemble_step_fn could not match them (it failed
    with "context must be (B, 8), B = 90"); given one context per episode, each start is read with its own."""
    train, val = data
    model, _ = fit_transitions(join(train, True), join(val, True), robot="pendulum", ensemble=SMALL, config=TrainConfig(max_steps=1, eval_every=1))
    with BatchedStepper("pendulum", 4, nthread=1) as stepper:
        specs = [ScenarioSpec("pendulum", seed=i, max_steps=12, profile=p) for i, p in enumerate([*BODIES.values()] * 2)]
        episodes = stepper.simulate(specs, random_policy(1, 0))
    bodies = np.stack([ScenarioSpec.from_json(ep.metadata["scenario"]).profile.context() for ep in episodes])
    errors = k_step_errors(ensemble_step_fn(model), episodes, ks=(1, 3), max_starts=7, contexts=bodies)
    assert set(errors) == {1, 3} and all(np.isfinite(e) for e in errors.values())
    scale = observation_scale(episodes)
    alone = [k_step_errors(ensemble_step_fn(model, np.tile(c, (ep.num_steps, 1))), [ep], ks=(1,), scale=scale)[1] for ep, c in zip(episodes, bodies)]
    together = k_step_errors(ensemble_step_fn(model), episodes, ks=(1,), scale=scale, contexts=bodies)[1]
    assert together == pytest.approx(np.average(alone, weights=[ep.num_steps for ep in episodes]), rel=1e-5)
    with pytest.raises(ValueError, match=r"contexts must be \(len\(episodes\), context_dim\) = \(4, C\)"):
        k_step_errors(ensemble_step_fn(model), episodes, ks=(1,), contexts=bodies[:2])


def test_context_features_are_bounded_and_zero_at_nominal():
    assert not VariationProfile().context().any()
    extreme = VariationProfile(payload_mass=1e3, mass_scale=1e3, friction_scale=1e-3, actuator_strength=1e-3, damping_scale=0.0, obs_noise_std=9.0, obs_bias=-9.0, action_latency=50)
    features = extreme.context()
    assert features.shape == (CONTEXT_DIM,) and np.isfinite(features).all() and (np.abs(features) <= 1).all()
    assert VariationProfile(actuator_strength=0.5).context()[3] < 0 < VariationProfile(actuator_strength=2.0).context()[3]
