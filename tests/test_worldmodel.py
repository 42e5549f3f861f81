"""World model: transitions and the episode split, training (does it learn, early stopping,
elites, logging), and safetensors + JSON save/load. Real MuJoCo data, real files."""

import json

import numpy as np
import pytest
import torch

from sim.batched import BatchedStepper
from sim.episode import Episode
from sim.policy_fn import random_policy
from sim.scenario import ScenarioSpec
from worldmodel import EnsembleConfig, TrainConfig, load, model_version, save, train_ensemble
from worldmodel.evaluate import LinearDynamics, ensemble_step_fn, k_step_errors, observation_scale
from worldmodel.transitions import split_by_episode, split_transitions, to_transitions

SMALL = EnsembleConfig(ensemble_size=5, num_elites=3, hidden_size=128, num_hidden_layers=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def simulate(robot: str, count: int, steps: int, seed: int = 0, robot_id: str = "robot-0") -> list[Episode]:
    with BatchedStepper(robot, 32, nthread=1, robot_id=robot_id) as stepper:
        specs = [ScenarioSpec(robot, seed=seed * 1000 + i, max_steps=steps) for i in range(count)]
        return stepper.simulate(specs, random_policy(stepper.task.act_dim, seed))


@pytest.fixture(scope="module")
def cheetah():
    episodes = simulate("half_cheetah", 48, 100)
    return episodes[:40], episodes[40:]


@pytest.fixture(scope="module")
def trained(cheetah):
    train_eps, _ = cheetah
    logs = []
    config = TrainConfig(max_steps=500, eval_every=250, seed=0, device="cpu")  # these tests compare with CPU tensors
    model, report = train_ensemble(train_eps, ensemble=SMALL, config=config, log=lambda m, s: logs.append((s, m)))
    return model, report, logs


def test_transitions_keep_the_final_observation_and_flags(cheetah):
    ep = cheetah[0][0]
    data = to_transitions([ep])
    assert len(data) == ep.num_steps
    np.testing.assert_array_equal(data.next_obs[-1], ep.observation[-1])
    np.testing.assert_array_equal(data.obs[1:], data.next_obs[:-1])
    assert not data.terminated.any()  # a time-limit cut is not a termination


def test_split_is_by_episode(cheetah):
    episodes = cheetah[0]
    train, val = split_by_episode(episodes, 0.25, seed=3)
    ids_train, ids_val = {e.episode_id for e in train}, {e.episode_id for e in val}
    assert not ids_train & ids_val
    assert ids_train | ids_val == {e.episode_id for e in episodes}
    assert len(val) == 10
    assert split_by_episode(episodes, 0.25, seed=3)[1][0].equals(val[0])
    with pytest.raises(ValueError, match="at least 2 episodes"):
        split_by_episode(episodes[:1], 0.25, seed=0)


def test_a_lone_episode_is_split_by_its_steps(cheetah):
    """A fleet of one robot that has sent one episode: its last steps are held out, and a world model trains on it."""
    (ep,) = cheetah[0][:1]
    train, val, counts = split_transitions([ep], 0.25, seed=0)
    assert counts == (1, 1) and (len(train), len(val)) == (75, 25)
    np.testing.assert_array_equal(np.concatenate([train.step, val.step]), np.arange(ep.num_steps))  # every step once, the last held out
    _, report = train_ensemble([ep], ensemble=SMALL, config=TrainConfig(max_steps=20, eval_every=10))
    assert (report.train_episodes, report.val_episodes) == (1, 1) and np.isfinite(report.elite_val_mse)
    with pytest.raises(ValueError, match="at least 2 transitions"):
        split_transitions(simulate("pendulum", 1, 1), 0.25, seed=0)


def test_one_world_model_per_robot_model(cheetah):
    other = simulate("pendulum", 2, 5)
    with pytest.raises(ValueError, match="one world model per robot model"):
        train_ensemble(cheetah[0][:3] + other, ensemble=SMALL, config=TrainConfig(max_steps=1))


def test_model_learns_and_beats_the_linear_baseline(cheetah, trained):
    train_eps, test_eps = cheetah
    model, report, _ = trained
    linear = LinearDynamics.fit(to_transitions(train_eps))
    scale = observation_scale(test_eps)
    ours = k_step_errors(ensemble_step_fn(model), test_eps, ks=(1, 5), scale=scale)
    base = k_step_errors(linear, test_eps, ks=(1, 5), scale=scale)
    assert ours[1] < 0.9 * base[1], (ours, base)
    assert len(report.elites) == 3 and report.elites == [int(i) for i in model.elites]
    assert all(report.val_mse[i] <= sorted(report.val_mse)[2] for i in report.elites)
    assert report.train_episodes + report.val_episodes == len(train_eps)


def test_training_logs_documented_metrics(trained):
    _, _, logs = trained
    assert [s for s, _ in logs] == [250, 500]
    for _, metrics in logs:
        assert set(metrics) == {"worldmodel/train_loss", "worldmodel/val_mse", "worldmodel/val_nll", "worldmodel/val_term_acc"}
        assert all(np.isfinite(v) for v in metrics.values())
    assert logs[1][1]["worldmodel/val_mse"] < logs[0][1]["worldmodel/val_mse"]


def test_early_stopping_when_validation_stops_improving(cheetah):
    config = TrainConfig(max_steps=10_000, eval_every=5, patience=2, learning_rate=0.0)
    _, report = train_ensemble(cheetah[0][:8], ensemble=SMALL, config=config)
    assert report.stopped_early and report.steps == 10 and report.evaluations == 2


def test_continued_training_refits_the_normalisers_and_starts_from_the_same_predictions(cheetah, trained):
    from worldmodel.train import _refit_statistics

    model, _, _ = trained
    fresh = load_copy(model)
    episode = cheetah[1][0]
    obs, act = torch.as_tensor(episode.observation[:-1]), torch.as_tensor(episode.action)
    with torch.no_grad():
        before = fresh.predict(obs, act)
        _refit_statistics(fresh, to_transitions(cheetah[1]))
        after = fresh.predict(obs, act)
    assert not torch.equal(fresh.input_norm.mean, model.input_norm.mean)  # the new data's statistics ...
    for field in ("delta_mean", "delta_std", "reward_mean", "reward_std", "term_logit"):  # ... and the same function
        torch.testing.assert_close(getattr(after, field), getattr(before, field), rtol=1e-4, atol=1e-4)
    more, report = train_ensemble(cheetah[1] + cheetah[0][:4], model=load_copy(model), config=TrainConfig(max_steps=20, eval_every=10, device="cpu"))
    assert report.steps == 20 and model_version(more) != model_version(model)


def test_a_model_first_fitted_on_a_zero_policy_learns_the_actions_that_come_later():
    """The loop's first data comes from the zero policy: kept as first fitted, the action normaliser (std 1e-6) made every
    later action of +-1 an input of +-1e6, and the world model's error 1e4-1e6 for the rest of the run."""
    with BatchedStepper("pendulum", 32, nthread=1) as stepper:
        still = stepper.simulate([ScenarioSpec("pendulum", seed=i, max_steps=60) for i in range(24)], lambda obs: np.zeros((len(obs), 1), np.float32))
    config = TrainConfig(max_steps=300, eval_every=100, seed=0, device="cpu")
    model, _ = train_ensemble(still, ensemble=SMALL, config=config)
    assert float(model.input_norm.std[-1]) == pytest.approx(1e-6)  # no spread in the action
    model, report = train_ensemble(simulate("pendulum", 24, 60, seed=1), model=model, config=config)
    assert float(model.input_norm.std[-1]) > 0.3 and report.elite_val_mse < 1.0, report.val_mse


def load_copy(model):
    from worldmodel.ensemble import DynamicsEnsemble

    copy = DynamicsEnsemble(model.spec)
    copy.load_state_dict(model.state_dict())
    return copy


def test_save_load_roundtrip_is_exact(trained, cheetah, tmp_path):
    model, report, _ = trained
    version = save(model, tmp_path / "wm", extra={"val_mse": report.val_mse})
    assert version == model_version(model) and version.startswith("wm-")
    meta = json.loads((tmp_path / "wm" / "model.json").read_text())
    assert meta["model_version"] == version and meta["spec"]["robot"] == "half_cheetah"
    assert meta["extra"]["val_mse"] == report.val_mse
    loaded = load(tmp_path / "wm", device="cpu")
    assert model_version(loaded) == version
    obs = torch.as_tensor(cheetah[1][0].observation[:-1])
    act = torch.as_tensor(cheetah[1][0].action)
    torch.testing.assert_close(loaded.mean_step(obs, act)[0], model.mean_step(obs, act)[0], rtol=0, atol=0)
    assert torch.equal(loaded.elites, model.elites) and torch.equal(loaded.obs_high, model.obs_high)


def test_predictions_take_numpy_rows_and_name_a_wrong_shape(trained, cheetah):
    """mean_step and predict refused numpy arrays with a TypeError (model_rollout takes them), and a wrong width failed
    as a size mismatch inside the normaliser."""
    model, _, _ = trained
    obs, act = cheetah[1][0].observation[:-1], cheetah[1][0].action  # numpy, float32
    want = model.mean_step(torch.as_tensor(obs), torch.as_tensor(act))
    got = model.mean_step(obs, act.astype(np.float64))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(model.predict(obs, act).delta_mean, model.predict(torch.as_tensor(obs), torch.as_tensor(act)).delta_mean)
    with pytest.raises(ValueError, match=r"obs must be \(B, 17\), got \(100, 5\)"):
        model.mean_step(obs[:, :5], act)
    with pytest.raises(ValueError, match=r"action must be \(B, 6\), B = 100 as obs has, got \(99, 6\)"):
        model.predict(obs, act[:-1])


def test_load_names_mismatched_tensors(trained, cheetah, tmp_path):
    model, _, _ = trained
    save(model, tmp_path / "a")
    other, _ = train_ensemble(cheetah[0][:4], ensemble=EnsembleConfig(5, 3, 64, 2), config=TrainConfig(max_steps=1))
    save(other, tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"tensor hidden\.0\.weight: saved shape \(5, 23, 64\).*needs \(5, 23, 128\)"):
        load(tmp_path / "a")


def test_load_detects_changed_weights(trained, tmp_path):
    model, _, _ = trained
    save(model, tmp_path / "wm")
    meta_path = tmp_path / "wm" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["model_version"] = "wm-0000000000000000"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="content hash"):
        load(tmp_path / "wm")
    with pytest.raises(FileNotFoundError, match="model.json is missing"):
        load(tmp_path / "nowhere")


def test_disagreement_is_the_std_across_members_rms_over_dims_and_inf_where_not_finite():
    from worldmodel.ensemble import disagreement

    means = torch.randn(5, 300, 17, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = means.std(0, correction=0).square().mean(-1).sqrt()  # the definition, written with torch's std
    torch.testing.assert_close(disagreement(means.float()), expected.float(), rtol=1e-5, atol=1e-7)
    means[2, 7, 3] = float("nan")
    means[0, 9, 0] = float("inf")
    dis = disagreement(means)
    assert dis[7] == float("inf") and dis[9] == float("inf") and torch.isfinite(dis[[0, 8, 10]]).all()
    lone = disagreement(means[:1])  # one member: nothing to disagree with, but its non-finite row (9) is untrusted still
    assert lone[9] == float("inf") and torch.equal(lone[torch.arange(300) != 9], torch.zeros(299, dtype=lone.dtype))


def test_seeds_are_integers_in_range_numpy_ones_taken():
    from worldmodel import RolloutConfig

    assert TrainConfig(seed=np.int32(4)).seed == 4 and type(RolloutConfig(seed=np.int64(5)).seed) is int  # for seed in np.arange(...)
    for bad in (-1, 1.5, True, "3", 2**64, float("nan")):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 9223372036854775807\]"):
            TrainConfig(seed=bad)
        with pytest.raises(ValueError, match=r"rollout: seed must be an integer in \[0, 9223372036854775807\]"):
            RolloutConfig(seed=bad)
