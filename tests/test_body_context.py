"""One policy, many bodies: a body-conditioned policy reads each robot's calibrated body features.

The features travel everywhere the policy runs: the stepper hands each simulated world's, the
learners store each transition's (own steps, recorded episodes, model rollouts), the export names
them, and a robot appends the ones its signed release gives it (unlisted: the nominal body)."""

import base64
import dataclasses

import httpx
import numpy as np
import pytest
import torch

from fleet.agent.policy import builtin_policy
from fleet.pipeline.loop import LoopSettings
from fleet.registry.pull import SignedPolicySource
from fleet.registry.store import root_metadata
from fleet.registry.trust import PolicyTrust
from policies.export import export_policy, torch_policy_from_export
from policies.mbpo import MBPOConfig
from policies.networks import Policy, PolicySpec
from policies.runtime import WEIGHTS_FILE, PolicyLoadError, load_policy_bytes, parse_manifest
from policies.sac import SACConfig
from policies.trainer import Trainer, TrainerConfig, make_algorithm
from sim.batched import BatchedStepper
from sim.body_context import BodyContextError, context_vectors, parse_contexts
from sim.policy_fn import with_context
from sim.scenario import ScenarioSpec
from sim.variation import CONTEXT_DIM, CONTEXT_FIELDS, VariationProfile
from tests.conftest import registry_server

SPEC = {"robot_model": "pendulum", "obs_dim": 4, "act_dim": 1}
BODIES = [VariationProfile(), VariationProfile(actuator_strength=0.5), VariationProfile(payload_mass=2.0)]
STRENGTH = CONTEXT_FIELDS.index("actuator_strength")


def conditioned_export(tmp_path, name="p"):
    torch.manual_seed(1)
    policy = Policy(PolicySpec(4, 1, (16,), "tanh", True, context_dim=CONTEXT_DIM))  # untouched weights: actions depend on the context
    manifest = export_policy(policy, tmp_path / name, robot_model="pendulum", policy_version=name, algorithm="sac")
    return policy, (tmp_path / name / WEIGHTS_FILE).read_bytes(), manifest


def test_an_exported_conditioned_policy_acts_as_the_torch_one_and_names_its_features(tmp_path):
    policy, weights, manifest = conditioned_export(tmp_path)
    assert manifest["observation"]["dim"] == 4 and manifest["observation"]["context"]["fields"] == list(CONTEXT_FIELDS)
    runtime = load_policy_bytes(manifest, weights, **SPEC)
    obs = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    for body in BODIES:
        x = np.concatenate([obs, np.tile(body.context(), (6, 1))], axis=1)
        np.testing.assert_allclose(with_context(runtime, body.context())(obs), policy(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
    weak, nominal = (with_context(runtime, b.context())(obs) for b in BODIES[1::-1])
    assert not np.allclose(weak, nominal, atol=1e-4)  # the body matters
    with pytest.raises(ValueError, match="observation \\+ body context"):
        runtime.act(obs)  # without the context
    assert torch_policy_from_export(tmp_path / "p").context_dim == CONTEXT_DIM
    for bad in ({"dim": 3, "fields": ["a"], "encoding": "variation_profile_tanh_v1"}, {**manifest["observation"]["context"], "encoding": "other"}):
        with pytest.raises(PolicyLoadError, match="observation.context"):
            parse_manifest({**manifest, "observation": {**manifest["observation"], "context": bad}})


def test_the_normaliser_tracks_the_observation_and_leaves_the_context_as_it_is():
    policy = Policy(PolicySpec(4, 1, (8,), "relu", True, context_dim=CONTEXT_DIM))
    x = np.concatenate([np.random.default_rng(0).normal(3.0, 2.0, (500, 4)), np.tile(BODIES[1].context(), (500, 1))], axis=1)
    policy.normalizer.update(torch.from_numpy(x))
    assert np.allclose(policy.normalizer.mean[:4].numpy(), 3.0, atol=0.3) and np.allclose(policy.normalizer.var[:4].numpy(), 4.0, atol=0.8)
    assert (policy.normalizer.mean[4:] == 0).all() and (policy.normalizer.var[4:] == 1).all()  # one body only: a zero variance otherwise


def test_the_stepper_hands_each_world_its_own_body():
    def strength_feature(x):  # acts with the body's actuator feature, so the recorded actions show what it was given
        return x[:, 4 + STRENGTH : 5 + STRENGTH].copy()

    strength_feature.context_dim = CONTEXT_DIM
    scenarios = [ScenarioSpec("pendulum", seed=s, profile=BODIES[s % 3], max_steps=5) for s in range(6)]
    with BatchedStepper("pendulum", 2) as stepper:
        episodes = stepper.simulate(scenarios, strength_feature)
    assert len(episodes) == 6
    for scenario, episode in zip(scenarios, episodes):
        np.testing.assert_allclose(episode.action, scenario.profile.context()[STRENGTH])


def test_the_learners_store_each_transitions_body():
    sac_cfg = SACConfig(hidden_sizes=(16, 16), learning_starts=100, utd_ratio=0.5, body_context=True)
    config = TrainerConfig(robot="pendulum", algorithm="mbpo", num_worlds=3, total_env_steps=300, seed=0)
    algo_cfg = MBPOConfig(sac=sac_cfg, model_train=dataclasses.replace(MBPOConfig().model_train, max_steps=50), rollouts_per_step=2, rollout_every=100)
    with Trainer(config, make_algorithm(config, algo_cfg), profiles=BODIES) as trainer:
        trainer.train()
        replay = trainer.algo.sac.replay.sources
    bodies = {tuple(b.context()) for b in BODIES}
    for name in ("real", "model"):  # the learner's own steps, and rollouts from its real states
        rows = replay[name].obs[: replay[name].size]
        assert replay[name].size > 0 and {tuple(r) for r in rows[:, 4:]} == bodies, name
        np.testing.assert_array_equal(rows[:, 4:], replay[name].next_obs[: replay[name].size, 4:])  # a transition stays in its body
    # SAC's offline sources: each recorded episode in the body context_of gives it
    with BatchedStepper("pendulum", 1) as stepper:
        episodes = stepper.simulate([ScenarioSpec("pendulum", seed=s, profile=BODIES[s], max_steps=20) for s in range(3)], lambda o: np.zeros((len(o), 1), np.float32))
    by_id = {ep.episode_id: BODIES[i] for i, ep in enumerate(episodes)}
    sac = make_algorithm(
        dataclasses.replace(config, algorithm="sac"), dataclasses.replace(sac_cfg, replay_ratios={"online": 0.5, "sim": 0.5}),
        offline={"sim": episodes}, context_of=lambda ep: by_id[ep.episode_id].context(),
    )
    stored = sac.replay.sources["sim"].obs[: sac.replay.sources["sim"].size, 4:]
    np.testing.assert_array_equal(stored, np.concatenate([np.tile(by_id[ep.episode_id].context(), (ep.num_steps, 1)) for ep in episodes]))


@pytest.fixture
def robots(tmp_path):
    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
    source = SignedPolicySource(server.url, token, "robot-0", trust, builtin_policy("zero", 1).current(), root=root_metadata(tmp_path / "registry"))
    yield registry, source
    source.close()
    server.stop()


def test_a_robot_runs_the_conditioned_policy_with_its_signed_body(tmp_path, robots):
    registry, source = robots
    _, weights, manifest = conditioned_export(tmp_path)
    runtime = load_policy_bytes(manifest, weights, **SPEC)
    obs = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    registry.publish(weights, policy=manifest, body_contexts=context_vectors({"robot-0": BODIES[1], "robot-7": BODIES[2]}), **SPEC)
    assert source.poll()
    np.testing.assert_allclose(source.current().act(obs), with_context(runtime, BODIES[1].context())(obs), atol=1e-6)
    registry.publish(weights, policy=manifest, body_contexts=context_vectors({"robot-7": BODIES[2]}), **SPEC)
    assert source.poll()  # not calibrated in this release: the nominal body
    np.testing.assert_allclose(source.current().act(obs), with_context(runtime, np.zeros(CONTEXT_DIM))(obs), atol=1e-6)
    for bad in ([0.5] * 3, [2.0] * CONTEXT_DIM, "weak"):  # wrong length, outside the features' range, not a list
        registry.publish(weights, policy=manifest, body_contexts={"robot-0": bad}, **SPEC)
        assert not source.poll()
    assert source.refusals == {"malformed": 3} and source.current().version == "2"


def test_publishing_checks_body_contexts(tmp_path):
    registry, token, server = registry_server(tmp_path, "publisher")
    _, weights, manifest = conditioned_export(tmp_path)
    _, _, plain = conditioned_export(tmp_path, "plain")
    plain = {**plain, "observation": {k: v for k, v in plain["observation"].items() if k != "context"}}
    body = {"weights_b64": base64.b64encode(weights).decode(), "policy": manifest, **SPEC}
    good = context_vectors({"robot-0": BODIES[1]})
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as client:
            for request in ({**body, "body_contexts": {"robot-0": [0.1]}}, {**body, "body_contexts": [[0.0] * CONTEXT_DIM]}, {**body, "policy": plain, "body_contexts": good}):
                response = client.post("/v1/policies", json=request)
                assert response.status_code == 400 and response.json()["field"] == "body_contexts", response.text
            assert registry.versions() == []  # nothing signed
            response = client.post("/v1/policies", json={**body, "body_contexts": good})
            assert response.status_code == 201 and response.json()["manifest"]["body_contexts"] == good
    finally:
        server.stop()
    with pytest.raises(BodyContextError):
        parse_contexts({"robot-0": [float("nan")] * CONTEXT_DIM}, CONTEXT_DIM)


def test_the_loop_refuses_a_conditioned_policy_trained_in_other_bodies_than_the_robots():
    from hydra import compose, initialize_config_dir

    from tests.test_flywheel_e2e import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("flywheel", overrides=["loop.body_context=true", "loop.noise_free_training_worlds=true"])
    with pytest.raises(ValueError, match="body_context with loop.noise_free_training_worlds"):
        LoopSettings.from_cfg(cfg)
