"""World-model rollouts (disagreement cut, no NaN out, Episode records) and the physics check
against MuJoCo. Real MuJoCo data; a small ensemble trained in the module fixture."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from sim.batched import BatchedStepper
from sim.episode import Episode
from sim.policy_fn import random_policy
from sim.scenario import ScenarioSpec
from sim.variation import VariationProfile
from worldmodel import EnsembleConfig, RolloutConfig, TrainConfig, branch_rollouts, model_rollout, model_version, train_ensemble
from worldmodel.evaluate import observation_scale
from worldmodel.physics_check import PhysicsCheckConfig, physics_check
from worldmodel.rollout import CUT_REASONS

PROFILE = VariationProfile(mass_scale=1.1, damping_scale=0.9)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def episodes():
    with BatchedStepper("half_cheetah", 32, nthread=1, robot_id="robot-7") as stepper:
        specs = [ScenarioSpec("half_cheetah", seed=i, profile=PROFILE, max_steps=60) for i in range(32)]
        return stepper.simulate(specs, random_policy(6, 0))


@pytest.fixture(scope="module")
def model(episodes):
    ens = EnsembleConfig(ensemble_size=5, num_elites=3, hidden_size=64, num_hidden_layers=2)
    trained, _ = train_ensemble(episodes, ensemble=ens, config=TrainConfig(max_steps=300, eval_every=150, device="cpu"))  # the GPU test compares with it
    return trained


def tanh_policy(obs: np.ndarray) -> np.ndarray:
    return np.tanh(obs[:, :6] * 2.0).astype(np.float32)


def test_rollouts_stop_at_the_disagreement_threshold(model, episodes):
    starts = np.concatenate([ep.observation[:20] for ep in episodes[:10]])
    probe = model_rollout(model, starts, tanh_policy, RolloutConfig(horizon=15, disagreement_threshold=1e9, seed=1))
    threshold = float(np.nanquantile(probe.disagreement, 0.7))
    batch = model_rollout(model, starts, tanh_policy, RolloutConfig(horizon=15, disagreement_threshold=threshold, seed=1))
    cut = batch.cut == CUT_REASONS.index("disagreement")
    assert cut.sum() > 10 and (batch.length == 15).sum() > 0
    for i, length in enumerate(batch.length):
        assert (batch.disagreement[i, :length] <= threshold).all()  # every recorded step was trusted
        if cut[i]:
            assert batch.disagreement[i, length] > threshold  # and the cut came at the first untrusted one
            assert np.isnan(batch.disagreement[i, length + 1 :]).all()
    assert np.isfinite(batch.observation).all() and np.isfinite(batch.reward).all()


def test_no_start_states_give_no_rollouts(model, episodes):
    """Zero start states once failed inside numpy ("need at least one array to concatenate")."""
    full = model_rollout(model, episodes[0].observation[:2], tanh_policy, RolloutConfig(horizon=4))
    empty = model_rollout(model, np.zeros((0, model.spec.obs_dim), np.float32), tanh_policy, RolloutConfig(horizon=4))
    for f in dataclasses.fields(empty):
        got, want = getattr(empty, f.name), getattr(full, f.name)
        assert got.shape == (0, *want.shape[1:]) and got.dtype == want.dtype, f.name
    assert empty.num_transitions == 0


def test_no_nan_ever_leaves_a_rollout(model, episodes):
    starts = np.concatenate([ep.observation[:5] for ep in episodes[:4]])
    broken = _copy(model)
    with torch.no_grad():
        broken.head.weight[int(broken.elites[0])].fill_(float("nan"))  # one elite predicts NaN
    batch = model_rollout(broken, starts, tanh_policy, RolloutConfig(horizon=10, disagreement_threshold=1e9))
    assert (batch.length == 0).all() and (batch.cut == CUT_REASONS.index("disagreement")).all()
    assert np.isfinite(batch.observation).all()
    assert branch_rollouts(broken, episodes, tanh_policy, 16, RolloutConfig(horizon=10, disagreement_threshold=1e9)) == []

    exploding = _copy(model)
    with torch.no_grad():
        exploding.output_norm.std.mul_(1e6)  # predictions far outside anything seen in training
    batch = model_rollout(exploding, starts, tanh_policy, RolloutConfig(horizon=10, disagreement_threshold=1e9))
    assert (batch.cut == CUT_REASONS.index("envelope")).all() and (batch.length == 0).all()


def test_an_observation_constant_in_the_data_does_not_cut_rollouts():
    """A touch sensor that never fired gave the envelope no width there: the model's ~1e-9 predicted change of it
    left the envelope and every rollout was cut at step 0 (a model-based learner then never trained)."""
    from tests.tiny_robots import registered

    with registered(), BatchedStepper("tiny_touch", 8, nthread=1) as stepper:
        stepper.reset(seed=0)
        data = stepper.run(random_policy(1, 0), 100)
    ens = EnsembleConfig(ensemble_size=3, num_elites=2, hidden_size=32, num_hidden_layers=2)
    trained, _ = train_ensemble(data, ensemble=ens, config=TrainConfig(max_steps=200, eval_every=100, device="cpu"))
    assert float(trained.obs_low[2]) == float(trained.obs_high[2]) == 0.0  # the sensor never fired
    starts = np.concatenate([ep.observation[:5] for ep in data])
    batch = model_rollout(trained, starts, random_policy(1, 1), RolloutConfig(horizon=5, disagreement_threshold=1e9))
    assert (batch.length > 0).mean() > 0.9 and (batch.cut == CUT_REASONS.index("horizon")).mean() > 0.5


def test_the_envelope_widens_only_ranges_that_never_varied(model):
    """A range wider than the floor keeps the margin rule exactly; a constant one is widened about its value; an untrained
    model's empty range stays empty."""
    low, high = model.envelope(0.5)
    width = model.obs_high - model.obs_low
    assert torch.equal(low, model.obs_low - 0.5 * width) and torch.equal(high, model.obs_high + 0.5 * width)  # half_cheetah: all varied
    flat = _copy(model)
    flat.obs_low[0] = flat.obs_high[0] = 2.0
    low, high = flat.envelope(0.5)
    floor = 1e-3 * (1.0 + 2.0)  # SPREAD x (1 + |value|), then half of it on each side for the margin
    assert float(low[0]) == pytest.approx(2.0 - floor, rel=1e-6) and float(high[0]) == pytest.approx(2.0 + floor, rel=1e-6)
    assert torch.equal(low[1:], model.envelope(0.5)[0][1:])
    from worldmodel.ensemble import DynamicsEnsemble

    low, high = DynamicsEnsemble(model.spec).envelope(0.5)
    assert not (low <= high).any()


def _copy(model):
    from worldmodel.ensemble import DynamicsEnsemble

    out = DynamicsEnsemble(model.spec)
    out.load_state_dict(model.state_dict())
    return out.eval()


def test_branch_rollouts_are_valid_worldmodel_episodes(model, episodes):
    config = RolloutConfig(horizon=12, disagreement_threshold=2.0, seed=4)
    out = branch_rollouts(model, episodes, tanh_policy, 24, config, policy_version="pi-3")
    assert 0 < len(out) <= 24
    version = model_version(model)
    by_id = {ep.episode_id: ep for ep in episodes}
    for ep in out:
        again = Episode.from_bytes(ep.to_bytes())  # passes schema validation on the wire
        assert again.equals(ep)
        assert ep.source == "worldmodel" and ep.metadata["model_version"] == version and ep.robot_id == "robot-7"
        assert ep.metadata["policy_version"] == "pi-3"
        spec = ep.json_metadata("scenario")
        src = by_id[spec["source_episode_id"]]
        t = spec["source_step"]
        np.testing.assert_array_equal(ep.observation[0], src.observation[t])
        assert ep.timestamp[0] == src.timestamp[t]
        assert spec["profile"] == PROFILE.to_dict()
        np.testing.assert_array_equal(np.float32(spec["init_qpos"]), src.extras["qpos"][t])
        assert ep.terminated[-1] or ep.truncated[-1]
        assert spec["cut"] in CUT_REASONS and (spec["cut"] == "horizon") == (ep.num_steps == 12 and ep.truncated[-1])
    again = branch_rollouts(model, episodes, tanh_policy, 24, config, policy_version="pi-3")
    assert len(again) == len(out) and all(a.equals(b) for a, b in zip(again, out))


def test_torch_module_policy_runs_in_the_loop(model, episodes):
    torch.manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(17, 6), torch.nn.Tanh())
    starts = episodes[0].observation[:8]
    batch = model_rollout(model, starts, policy, RolloutConfig(horizon=5, disagreement_threshold=1e9, sample=False))
    with torch.no_grad():
        first = policy(torch.as_tensor(starts)).numpy()
    np.testing.assert_allclose(batch.action[:, 0], first, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        model_rollout(model, starts, lambda obs: np.zeros((len(obs), 2), np.float32), RolloutConfig(horizon=2))


def test_physics_check_of_a_perfect_model_is_near_zero(episodes):
    """Episodes that are MuJoCo's own trajectories, relabelled as model rollouts, replay with ~0 error."""
    fake = []
    for ep in episodes[:6]:
        t = 5
        spec = {"init_qpos": ep.extras["qpos"][t].tolist(), "init_qvel": ep.extras["qvel"][t].tolist(), "profile": PROFILE.to_dict()}
        fake.append(
            Episode.create(
                observation=ep.observation[t : t + 21],
                action=ep.action[t : t + 20],
                reward=ep.reward[t : t + 20],
                terminated=np.zeros(20, bool),
                truncated=np.eye(20, dtype=bool)[-1],
                timestamp=ep.timestamp[t : t + 21],
                robot_id=ep.robot_id,
                robot_model="half_cheetah",
                source="worldmodel",
                scenario=json.dumps(spec),
                model_version="wm-test",
            )
        )
    report = physics_check(fake, observation_scale(episodes), PhysicsCheckConfig(tolerance=0.05))
    assert report.k_step_count == {1: 6, 5: 6, 20: 6}
    assert max(report.k_step_error.values()) < 1e-3  # float32 recording of the start state is the only difference
    assert len(report.kept) == 6 and not report.dropped


def test_physics_check_reports_k_step_errors_and_drops_outliers(model, episodes):
    out = branch_rollouts(model, episodes, tanh_policy, 32, RolloutConfig(horizon=20, disagreement_threshold=1e9, seed=2))
    scale = observation_scale(episodes)
    report = physics_check(out, scale, PhysicsCheckConfig(ks=(1, 5, 20), tolerance=1e9))
    assert set(report.k_step_error) == {1, 5, 20} and report.k_step_count[1] == len(out)
    assert 0 < report.k_step_error[1] < report.k_step_error[20] < 10
    assert len(report.kept) == len(out)
    errors = np.concatenate(list(report.step_errors.values()))
    tolerance = float(np.median(errors))
    strict = physics_check(out, scale, PhysicsCheckConfig(tolerance=tolerance))
    assert 0 < len(strict.kept) < len(out) and len(strict.kept) + len(strict.dropped) == len(out)
    for ep in strict.kept:
        assert (strict.step_errors[ep.episode_id] <= tolerance).all()
    with pytest.raises(ValueError, match="world-model rollouts"):
        physics_check(episodes[:1], scale)


def test_physics_check_of_rollouts_branched_from_real_telemetry(model, episodes):
    """Real telemetry has no physics state or scenario: the check rebuilds the start state from the
    observation and uses the robot's calibrated profile."""
    arrays = ("observation", "action", "reward", "terminated", "truncated", "timestamp")
    real = [
        Episode.create(**{k: getattr(ep, k) for k in arrays}, robot_id=ep.robot_id, robot_model="half_cheetah", source="real")
        for ep in episodes[:8]
    ]
    out = branch_rollouts(model, real, tanh_policy, 16, RolloutConfig(horizon=8, disagreement_threshold=1e9, seed=3))
    assert out and all("init_qpos" not in ep.json_metadata("scenario") for ep in out)
    report = physics_check(out, observation_scale(episodes), PhysicsCheckConfig(ks=(1, 5), tolerance=1e9), profiles={"robot-7": PROFILE})
    assert report.k_step_count[1] == len(out) and np.isfinite(list(report.k_step_error.values())).all()
    with pytest.raises(ValueError, match="robot model 'pendulum'"):
        pendulum = [dataclasses.replace(real[0], metadata={**real[0].metadata, "robot_model": "pendulum"})]
        branch_rollouts(model, pendulum, tanh_policy, 4)


@pytest.mark.requires_gpu
def test_rollout_on_the_gpu_matches_the_cpu(model, episodes):
    starts = np.concatenate([ep.observation[:10] for ep in episodes[:10]])
    config = RolloutConfig(horizon=10, disagreement_threshold=1e9, sample=False)
    cpu = model_rollout(model, starts, tanh_policy, config)
    gpu = model_rollout(_copy(model).to("cuda"), starts, tanh_policy, config)
    np.testing.assert_allclose(gpu.observation, cpu.observation, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bad_at", [0, 3])
def test_a_policy_returning_nan_is_refused_and_the_model_keeps_its_mode(model, episodes, bad_at):
    starts = np.concatenate([ep.observation[:-1] for ep in episodes])[:50]
    calls = []

    def policy(obs: np.ndarray) -> np.ndarray:
        calls.append(1)
        action = np.zeros((len(obs), model.spec.act_dim), np.float32)
        action[-1, 0] = np.nan if len(calls) > bad_at else 0.0  # one row's action goes bad at step ``bad_at``
        return action

    was_training = model.training
    model.train()
    with pytest.raises(ValueError, match="policy returned NaN or Inf actions"):
        model_rollout(model, starts, policy, RolloutConfig(horizon=6, disagreement_threshold=1e9, envelope_margin=1e3))
    assert model.training and len(calls) == bad_at + 1  # refused at the step it happened; train mode restored
    model.train(was_training)


def test_branch_rollout_ids_follow_what_each_episode_holds(model, episodes):
    """Two policies' rollouts from the same starts, model and seed had the same ids (the id hashed where each branched
    and policy_version, "none" by default), so a store took the first and refused the second as a conflict."""
    config = RolloutConfig(horizon=6, disagreement_threshold=1e9, envelope_margin=1e3, seed=2)
    pushed = branch_rollouts(model, episodes, lambda obs: np.full((len(obs), 6), 0.5, np.float32), 12, config)
    pulled = branch_rollouts(model, episodes, lambda obs: np.full((len(obs), 6), -0.5, np.float32), 12, config)
    again = branch_rollouts(model, episodes, lambda obs: np.full((len(obs), 6), 0.5, np.float32), 12, config)
    assert len(pushed) == len(pulled) == 12
    assert not {ep.episode_id for ep in pushed} & {ep.episode_id for ep in pulled}
    assert [ep.episode_id for ep in again] == [ep.episode_id for ep in pushed]  # the same rollout again: the same ids


def test_branch_rollouts_of_a_body_conditioned_model_roll_each_start_out_in_its_body(episodes):
    from sim.variation import CONTEXT_DIM
    from worldmodel.ensemble import DynamicsEnsemble, ModelSpec
    from worldmodel.rollout import sample_starts

    spec = ModelSpec("half_cheetah", episodes[0].observation.shape[1], episodes[0].action.shape[1], EnsembleConfig(hidden_size=16, num_hidden_layers=1), context_dim=CONTEXT_DIM)
    conditioned = DynamicsEnsemble(spec, seed=3)
    conditioned.obs_low.fill_(-1e3), conditioned.obs_high.fill_(1e3)  # an untrained model's envelope is empty
    body = {ep.episode_id: np.full(CONTEXT_DIM, 0.1 * (i % 3), np.float32) for i, ep in enumerate(episodes)}
    config = RolloutConfig(horizon=4, disagreement_threshold=1e9, envelope_margin=1e3, sample=False, seed=5)
    out = branch_rollouts(conditioned, episodes, tanh_policy, 10, config, context_of=lambda ep: body[ep.episode_id])  # refused before
    starts = sample_starts(episodes, 10, config.seed)
    direct = model_rollout(conditioned, np.stack([episodes[i].observation[t] for i, t in starts]), tanh_policy, config, np.stack([body[episodes[i].episode_id] for i, _ in starts]))
    assert len(out) == 10 and all(np.array_equal(ep.observation, direct.observation[r, : ep.num_steps + 1]) for r, ep in enumerate(out))
    nominal = model_rollout(conditioned, direct.observation[:, 0], tanh_policy, config, np.zeros((10, CONTEXT_DIM), np.float32))
    assert not np.array_equal(nominal.observation, direct.observation)  # the bodies were read


def test_what_a_caller_passes_is_left_as_it_was_and_read_whatever_its_layout(model, episodes):
    starts = np.ascontiguousarray(np.concatenate([ep.observation[:-1] for ep in episodes])[:40])
    kept = starts.copy()
    config = RolloutConfig(horizon=5, disagreement_threshold=1e9, envelope_margin=1e3, seed=np.int64(1))  # a numpy seed too

    def normalise_in_place(obs):
        obs -= 1.0  # a policy that edits its input; it saw the rollout's live state, and the caller's array
        return np.tanh(obs[:, :6])

    edited = model_rollout(model, starts, normalise_in_place, config)
    plain = model_rollout(model, starts, lambda obs: np.tanh(obs[:, :6] - 1.0), config)
    assert np.array_equal(starts, kept) and np.array_equal(edited.observation, plain.observation)
    torch_edited = model_rollout(model, starts, InPlaceActor(), config)  # a torch module that edits its input, the same
    torch_plain = model_rollout(model, starts, InPlaceActor(in_place=False), config)
    assert np.array_equal(starts, kept) and np.array_equal(torch_edited.observation, torch_plain.observation)
    reversed_view = model_rollout(model, kept[::-1], lambda obs: np.tanh(obs[:, :6] - 1.0)[::-1][::-1], config)  # negative strides
    assert np.array_equal(reversed_view.observation, model_rollout(model, kept[::-1].copy(), lambda obs: np.tanh(obs[:, :6] - 1.0), config).observation)


def test_inputs_a_rollout_cannot_use_are_refused_naming_them(model, episodes):
    from sim.variation import CONTEXT_DIM
    from worldmodel.ensemble import disagreement

    starts = np.concatenate([ep.observation[:-1] for ep in episodes])[:8]
    config = RolloutConfig(horizon=3)
    with pytest.raises(ValueError, match="this world model is unconditioned: pass no context"):
        model_rollout(model, starts, tanh_policy, config, np.zeros((8, CONTEXT_DIM)))
    with pytest.raises(ValueError, match="policy_context is for a body-conditioned policy"):
        model_rollout(model, starts, tanh_policy, config, policy_context=np.zeros((8, CONTEXT_DIM)))
    with pytest.raises(TypeError, match="a torch policy must return a tensor of actions"):
        model_rollout(model, starts, TupleActor(), config)
    with pytest.raises(ValueError, match=r"policy must return actions \(N, 6\) as an array, got NoneType"):
        model_rollout(model, starts, lambda obs: None, config)
    bad = np.zeros((8, CONTEXT_DIM), np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="policy_context contains NaN or Inf"):
        model_rollout(model, starts, BodyActor(), config, policy_context=bad)
    with pytest.raises(ValueError, match=r"run in float32, and this model's parameters are torch.float64: call model.float\(\)"):
        model_rollout(copy_of(model).double(), starts, tanh_policy, config)  # the model cast by its user
    one_elite = copy_of(model)
    one_elite.elites = one_elite.elites[:1]
    with pytest.raises(ValueError, match="disagreement over the elites needs 2 or more, and this model has 1"):
        model_rollout(one_elite, starts, tanh_policy, RolloutConfig(disagreement_members="elites"))
    lone = torch.tensor([[[0.0, 1.0], [float("nan"), 0.0]]])
    assert disagreement(lone).tolist() == [0.0, float("inf")]  # one member: a non-finite row is untrusted still


class TupleActor(torch.nn.Module):
    def forward(self, obs):
        return obs[:, :6], None


class InPlaceActor(torch.nn.Module):
    def __init__(self, in_place: bool = True):
        super().__init__()
        self.in_place = in_place

    def forward(self, obs):
        return torch.tanh((obs.sub_(1.0) if self.in_place else obs - 1.0)[:, :6])


class BodyActor(torch.nn.Module):
    from sim.variation import CONTEXT_DIM as context_dim  # a body-conditioned policy (sim.policy_fn.context_dim_of)

    def forward(self, obs):
        return torch.tanh(obs[:, :6])


def copy_of(model):
    import copy

    return copy.deepcopy(model)
