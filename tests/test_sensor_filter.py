"""Sensor filtering: a robot with a noisy calibrated sensor runs a Kalman filter, fitted on its
simulated body and delivered signed with the release, before its policy (sim/sensor_filter.py)."""

import base64
import dataclasses
import types

import httpx
import numpy as np
import pytest
import torch

from fleet.agent.policy import builtin_policy
from fleet.agent.robot import run_episode
from fleet.registry.pull import SignedPolicySource
from fleet.registry.store import root_metadata
from fleet.registry.trust import PolicyTrust
from policies.export import export_policy
from policies.networks import Policy, PolicySpec
from policies.runtime import WEIGHTS_FILE, load_policy_bytes
from sim.batched import BatchedStepper
from sim.scenario import ScenarioSpec
from sim.sensor_filter import FilterFit, SensorFilter, SensorFilterError, filter_vectors, filtered_act, filtered_episodes, fit_sensor_filter
from sim.variation import VariationProfile
from tests.conftest import registry_server
from tests.test_calibration import GAINS

SPEC = {"robot_model": "pendulum", "obs_dim": 4, "act_dim": 1}
NOISE = 0.15  # three times the demo's noisy sensor: the LQR controller alone drops the pendulum


def lqr(obs):
    return np.clip(-(obs @ GAINS), -1, 1)


def returns(episode_act, profile, count=6):
    """1,000-step returns of count episodes, each with a fresh per-episode policy from ``episode_act``."""
    out = []
    for s in range(count):
        with BatchedStepper("pendulum", 1, nthread=1) as stepper:
            (ep,) = stepper.simulate([ScenarioSpec("pendulum", seed=500 + s, profile=profile, max_steps=1000)], episode_act())
        out.append(float(ep.reward.sum()))
    return out


@pytest.fixture(scope="module")
def fit():
    return fit_sensor_filter("pendulum", VariationProfile(), NOISE, lqr)


def test_a_filter_fitted_on_the_calibrated_body_keeps_a_noisy_pendulum_up(fit):
    assert fit.keep and (fit.filtered_rms < 0.6 * fit.raw_rms).all() and fit.filtered_rms.sum() < 0.4 * fit.raw_rms.sum(), fit.to_dict()
    assert abs(fit.raw_rms.mean() - NOISE) < 0.02
    noisy = VariationProfile(obs_noise_std=NOISE)
    raw, filtered = returns(lambda: lqr, noisy), returns(filtered_act(lqr, fit.filter), noisy)
    assert np.median(raw) < 500 and min(filtered) == 1000.0, (raw, filtered)


def readings(model, actions, first, seed=0):
    """Readings of a body that moves as the model says, through the model's sensor."""
    rng, x, out = np.random.default_rng(seed), np.asarray(first, np.float64), []
    for t in range(len(actions) + 1):
        out.append(x + rng.normal(size=x.shape) * np.sqrt(np.diag(model.R)))
        if t < len(actions):
            x = model.A @ x + model.B @ actions[t] + model.c
    return np.asarray(out, np.float32)


def test_the_filter_is_a_kalman_filter_started_at_the_first_reading(fit):
    model = fit.filter
    actions = np.random.default_rng(1).uniform(-1, 1, size=(5, 1)).astype(np.float32)
    obs = readings(model, actions, [0.1, 0.05, -0.2, 0.3])
    out = model.run(obs, actions)
    np.testing.assert_allclose(out[0], obs[0], atol=1e-6)  # the first estimate is the first reading
    x, P = obs[0].astype(np.float64), model.R.copy()
    for t in range(5):  # the textbook recursion
        x, P = model.A @ x + model.B @ actions[t] + model.c, model.A @ P @ model.A.T + model.Q
        gain = P @ np.linalg.inv(P + model.R)
        x, P = x + gain @ (obs[t + 1] - x), (np.eye(4) - gain) @ P
        np.testing.assert_allclose(out[t + 1], x, rtol=1e-4, atol=1e-5)
    act = filtered_act(lambda o: o[:, :1], model)  # a policy that echoes what it sees
    for _ in range(2):  # every episode starts a fresh filter
        run = act()
        assert np.allclose(run(obs[:1]), obs[0, 0])


def test_a_reading_the_model_cannot_explain_restarts_the_filter_there(fit):
    """A strike (the cart at the end of its rail, a push) moves the body where no prediction goes: the
    filter takes that reading as a new start instead of averaging it into a wrong prediction."""
    model = fit.filter
    actions = np.zeros((40, 1), np.float32)
    obs = readings(model, actions, [0.0, 0.01, 0.0, 0.0], seed=3)
    smooth = model.run(obs, actions)
    assert not np.allclose(smooth[1:], obs[1:], atol=1e-3)  # ordinary readings are filtered
    struck = obs.copy()
    struck[20:, 2] -= 1.5  # the cart stops dead: its velocity jumps by 30 sensor deviations
    out = model.run(struck, actions)
    np.testing.assert_allclose(out[20], struck[20], atol=1e-6)  # restarted at the reading
    np.testing.assert_allclose(out[:20], smooth[:20], atol=1e-6)  # nothing before it changed
    assert np.abs(out[30:, 2] - struck[30:, 2]).max() < 3 * NOISE  # and it follows the body where it is now



def test_a_reading_that_is_not_a_number_is_not_an_observation():
    """A NaN reading failed the jump test (NaN compares False), went into the filter's state, and every later estimate,
    and so every later action, of the episode was NaN. Now the filter keeps its prediction for it (dead reckoning) and
    takes the next finite reading as usual."""
    eye = np.eye(3)
    model = SensorFilter(A=eye, B=np.zeros((3, 1)), c=np.full(3, 0.01), Q=0.01 * eye, R=0.1 * eye)
    act = filtered_act(lambda o: np.tanh(o.sum(axis=-1, keepdims=True)), model)()
    seen = []
    for k in range(8):
        obs = np.full((1, 3), 0.1, np.float32)
        obs[0, 1] = {2: np.nan, 3: np.inf, 4: -np.inf}.get(k, 0.1)
        seen.append(act(obs))
    assert np.isfinite(seen).all() and np.isfinite(model.run(np.full((2, 3), 0.1, np.float32), np.zeros((1, 1)))).all()
    gains = iter([np.nan, 1.0, 1.0])  # a policy's NaN action: the robot's loop sends zeros, and so the filter predicts
    act = filtered_act(lambda o: next(gains) * np.tanh(o.sum(axis=-1, keepdims=True)), model)()
    assert [np.isnan(act(np.full((1, 3), 0.1, np.float32))).any() for _ in range(3)] == [True, False, False]
    state = model.start()
    first = state.update(np.full((1, 3), 0.1))
    state.predict(np.zeros((1, 1)))
    P = state.P.copy()
    partial = state.update(np.array([[0.1, np.nan, 0.1]]))
    np.testing.assert_allclose(partial[0, 1], first[0, 1] + 0.01, atol=1e-6)  # the unread entry: the prediction
    assert state.P[1, 1] == P[1, 1] and state.P[0, 0] < P[0, 0]  # as uncertain as predicted there, less where read
    state.predict(np.zeros((1, 1)))
    assert np.isfinite(state.update(np.full((1, 3), np.nan))).all()  # nothing read: the prediction
    state.predict(np.zeros((1, 1)))
    assert np.isfinite(state.update(np.full((1, 3), 0.12))).all()
    rows = model.start()  # several robots in rows: one's dropout leaves the others' updates alone
    rows.update(np.full((2, 3), 0.1))
    rows.predict(np.zeros((2, 1)))
    one = model.start()
    one.update(np.full((1, 3), 0.1))
    one.predict(np.zeros((1, 1)))
    out = rows.update(np.array([[0.2, 0.2, 0.2], [np.nan, 0.2, 0.2]]))
    np.testing.assert_allclose(out[0], one.update(np.full((1, 3), 0.2))[0], atol=1e-6)
    np.testing.assert_allclose(out[1, 0], 0.11, atol=1e-6)  # the unread entry: the prediction; the read ones updated
    np.testing.assert_allclose(out[1, 1:], out[0, 1:], atol=1e-6)
    unstarted = model.start()  # nothing read yet: nothing to predict from, and the first reading with a finite entry starts it
    assert np.isnan(unstarted.update(np.full((1, 3), np.nan))).all() and unstarted.x is None
    unstarted.predict(np.zeros((1, 1)))
    np.testing.assert_allclose(unstarted.update(np.array([[np.nan, 0.3, 0.3]])), [[0.0, 0.3, 0.3]], atol=1e-6)  # the unread one unknown
    assert unstarted.P[0, 0] >= 1.0 and not unstarted.P[0, 1:].any()

def test_a_reading_with_a_persistent_nan_entry_is_updated_from_its_finite_entries():
    """A NaN in one entry threw away the whole reading: with a joint whose velocity is never measured the filter ran open
    loop for good (its estimate drifting) and its jump test, with no innovation, never restarted it. The finite entries
    are now read (the measurement is those rows of the identity): the same as a filter of those entries alone when the
    model does not couple them to the unread one, and a jump in them still restarts the filter."""
    eye = np.eye(3)
    model = SensorFilter(A=eye, B=np.zeros((3, 1)), c=np.array([0.01, 0.02, 0.5]), Q=0.01 * eye, R=0.1 * eye)
    sub = SensorFilter(A=np.eye(2), B=np.zeros((2, 1)), c=np.array([0.01, 0.02]), Q=0.01 * np.eye(2), R=0.1 * np.eye(2))
    state, alone = model.start(), sub.start()
    state.update(np.array([[0.1, 0.2, 0.3]]))
    alone.update(np.array([[0.1, 0.2]]))
    rng = np.random.default_rng(0)
    for _ in range(40):
        reading = 0.1 + 0.1 * rng.standard_normal(2)
        state.predict(np.zeros((1, 1)))
        alone.predict(np.zeros((1, 1)))
        got = state.update(np.array([[reading[0], reading[1], np.nan]]))
        np.testing.assert_allclose(got[0, :2], alone.update(reading[None])[0], atol=1e-6)  # read: not drifting at c = 0.01, 0.02 a step
    assert abs(got[0, 0] - 0.1) < 0.3 and got[0, 2] > 0.3 + 0.5 * 39  # the unread entry dead-reckons
    state.predict(np.zeros((1, 1)))
    before = state.P[2, 2]
    np.testing.assert_allclose(state.update(np.array([[5.0, 5.0, np.nan]]))[0, :2], 5.0, atol=1e-6)  # a jump restarts it
    np.testing.assert_array_equal(state.P[:2, :2], model.R[:2, :2])  # the read entries as uncertain as the sensor
    assert state.P[2, 2] == before and not state.P[2, :2].any() and not state.P[:2, 2].any()  # the unread one as it was, uncorrelated


def test_an_entry_never_read_from_the_start_is_found_from_the_read_ones():
    """A joint whose velocity is never measured, not even in the first reading: the filter starts from the position (the
    velocity at 0, unknown) and finds the velocity from the positions the model couples it to; it waited for a reading
    read whole, which never came, and passed the NaN to the policy."""
    dt, true_velocity = 0.1, 0.5
    model = SensorFilter(A=np.array([[1.0, dt], [0.0, 1.0]]), B=np.zeros((2, 1)), c=np.zeros(2), Q=1e-6 * np.eye(2), R=1e-4 * np.eye(2))
    state, rng = model.start(), np.random.default_rng(0)
    got = state.update(np.array([[0.0, np.nan]]))
    assert np.isfinite(got).all() and got[0, 1] == 0.0
    for t in range(1, 60):
        state.predict(np.zeros((1, 1)))
        got = state.update(np.array([[true_velocity * dt * t + 0.01 * rng.standard_normal(), np.nan]]))
    assert np.isfinite(got).all() and abs(got[0, 1] - true_velocity) < 0.05, got
    assert model.start().update(np.full((1, 2), np.nan)).tolist() != [[0.0, 0.0]]  # nothing read at all: nothing to start from


def test_a_fully_read_update_is_the_plain_kalman_update(fit):
    """The fast path for a reading read whole (no masking) is the full update, bit for bit."""
    model, rng = fit.filter, np.random.default_rng(1)
    d = model.A.shape[0]
    state = model.start()
    x = state.update(np.zeros((1, d)))
    for _ in range(5):
        state.predict(np.zeros((1, model.B.shape[1])))
        P, xp, obs = state.P.copy(), state.x.copy(), 0.01 * rng.standard_normal((1, d))
        gain = np.linalg.solve(P + model.R, P).T
        x = state.update(obs)
        np.testing.assert_allclose(state.x, xp + (obs - xp) @ gain.T, rtol=1e-12, atol=1e-15)  # one solve or two: BLAS rounding only
        np.testing.assert_allclose(state.P, 0.5 * (((np.eye(d) - gain) @ P) + ((np.eye(d) - gain) @ P).T), rtol=1e-12, atol=1e-15)


def test_the_fit_leaves_out_the_steps_linear_dynamics_cannot_explain():
    """1 % of strikes among linear steps: the trimmed fit finds the linear body and its own process
    noise; counted in, the strikes made Q about 100x larger (the last build) and the filter pass the noise through."""
    from sim.sensor_filter import _fit_linear

    rng = np.random.default_rng(0)
    A = np.array([[1.0, 0.04], [0.1, 0.98]])
    B, q_std = np.array([[0.0], [0.5]]), 1e-3
    episodes = []
    for _ in range(8):
        x, xs, us = rng.normal(size=2) * 0.1, [], []
        for _t in range(300):
            u = rng.uniform(-1, 1, size=1)
            xs.append(x)
            us.append(u)
            x = A @ x + B @ u + rng.normal(size=2) * q_std
            if rng.uniform() < 0.01:
                x = x + np.array([0.0, rng.choice([-1.0, 1.0])])  # a strike
        xs.append(x)
        episodes.append(types.SimpleNamespace(observation=np.array(xs, np.float32), action=np.array(us, np.float32), num_steps=300))
    model = _fit_linear(episodes, 0.05)
    np.testing.assert_allclose(model.A, A, atol=5e-3)
    np.testing.assert_allclose(model.B, B, atol=5e-3)
    assert np.sqrt(np.diag(model.Q)).max() < 2 * q_std, np.diag(model.Q)


def test_a_filter_is_kept_only_if_it_cuts_the_error_and_the_episodes_show_what_it_leaves(fit):
    worse = FilterFit(fit.filter, np.full(4, 0.05), np.full(4, 0.04), keep_ratio=0.7)
    assert not worse.keep and filter_vectors({"robot-1": worse}) == {}
    # the sum falls to 0.48 of the sensor's, but one entry (a free joint's quaternion, say) gets 1.5x noisier: view_noise
    # 0.06 over the raw 0.04, so the policy would train under more noise with the filter than without (kept, once)
    lagging = FilterFit(fit.filter, np.full(4, 0.04), np.array([0.005, 0.005, 0.007, 0.06]), keep_ratio=0.7)
    assert lagging.filtered_rms.sum() <= 0.7 * lagging.raw_rms.sum() and lagging.view_noise > lagging.raw_rms.max() and not lagging.keep
    assert set(filter_vectors({"robot-1": fit, "robot-2": worse})) == {"robot-1"}
    with BatchedStepper("pendulum", 2, nthread=1, robot_id="robot-1") as stepper:
        episodes = stepper.simulate([ScenarioSpec("pendulum", seed=s, profile=VariationProfile(obs_noise_std=NOISE), max_steps=50) for s in range(2)], lqr)
    other = episodes[1].__class__(**{**episodes[1].__dict__, "metadata": {**episodes[1].metadata, "robot_id": "robot-2"}})
    view = filtered_episodes([episodes[0], other], {"robot-1": fit, "robot-2": worse})
    np.testing.assert_array_equal(view[0].observation, fit.filter.run(episodes[0].observation, episodes[0].action))
    assert view[1] is other
    assert fit.view_noise == pytest.approx(fit.filtered_rms.max()) and fit.view_noise < NOISE


def test_a_malformed_filter_is_refused(fit):
    good = fit.filter.to_dict()
    assert SensorFilter.from_dict(good, 4, 1).to_dict() == good
    asymmetric = np.array(good["R"])
    asymmetric[0, 1] = 1.0
    for bad in (
        {**good, "A": np.eye(3).tolist()},  # wrong shape
        {**good, "c": [float("nan")] * 4},  # not finite
        {**good, "R": np.zeros((4, 4)).tolist()},  # a sensor without noise has no filter
        {**good, "R": asymmetric.tolist()},
        {k: v for k, v in good.items() if k != "Q"},
        "kalman",
    ):
        with pytest.raises(SensorFilterError):
            SensorFilter.from_dict(bad, 4, 1)


@pytest.fixture
def robots(tmp_path):
    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
    source = SignedPolicySource(server.url, token, "robot-0", trust, builtin_policy("zero", 1).current(), root=root_metadata(tmp_path / "registry"))
    yield registry, token, server, source
    source.close()
    server.stop()


def exported(tmp_path):
    torch.manual_seed(1)
    manifest = export_policy(Policy(PolicySpec(4, 1, (16,), "tanh", True)), tmp_path / "p", robot_model="pendulum", policy_version="p", algorithm="sac")
    return (tmp_path / "p" / WEIGHTS_FILE).read_bytes(), manifest


def test_a_robot_runs_its_signed_filter_before_its_policy_and_refuses_a_malformed_one(tmp_path, robots, fit):
    registry, token, server, source = robots
    weights, manifest = exported(tmp_path)
    runtime = load_policy_bytes(manifest, weights, **SPEC)
    obs = np.random.default_rng(0).normal(scale=0.1, size=(20, 4)).astype(np.float32)
    offset = np.full(4, 0.02, np.float32)
    registry.publish(weights, policy=manifest, sensor_filters={"robot-0": fit.filter.to_dict()}, sensor_offsets={"robot-0": offset.tolist()}, **SPEC)
    assert source.poll()
    policy = source.current()
    expected_run = filtered_act(runtime.act, fit.filter)()
    for _ in range(2):  # one episode after another: each starts its filter afresh
        act, expected = policy.for_episode(), filtered_act(runtime.act, fit.filter)()
        for t in range(5):
            np.testing.assert_allclose(act(obs[t : t + 1] + offset), expected(obs[t : t + 1]), atol=1e-5)
    assert not np.allclose([expected_run(obs[t : t + 1]) for t in range(5)][1:], [runtime.act(obs[t : t + 1]) for t in range(1, 5)], atol=1e-4)
    registry.publish(weights, policy=manifest, sensor_filters={"robot-7": fit.filter.to_dict()}, **SPEC)
    assert source.poll() and source.current().for_episode()(obs[:1]) == pytest.approx(runtime.act(obs[:1]))  # not listed: its readings
    registry.publish(weights, policy=manifest, sensor_filters={"robot-0": {**fit.filter.to_dict(), "B": [[1.0]]}}, **SPEC)
    assert not source.poll() and source.refusals == {"malformed": 1}
    body = {"weights_b64": base64.b64encode(weights).decode(), "policy": manifest, **SPEC}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as client:  # the robot's token may not publish
        assert client.post("/v1/policies", json={**body, "sensor_filters": {"robot-0": "kalman"}}).status_code in (401, 403)


def test_publishing_checks_sensor_filters(tmp_path, fit):
    registry, token, server = registry_server(tmp_path, "publisher")
    weights, manifest = exported(tmp_path)
    body = {"weights_b64": base64.b64encode(weights).decode(), "policy": manifest, **SPEC}
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as client:
            for filters in ({"robot-0": "kalman"}, [fit.filter.to_dict()], {"robot-0": {**fit.filter.to_dict(), "A": [[1.0]]}}):
                response = client.post("/v1/policies", json={**body, "sensor_filters": filters})
                assert response.status_code == 400 and response.json()["field"] == "sensor_filters", response.text
            assert registry.versions() == []
            good = {"robot-0": fit.filter.to_dict()}
            response = client.post("/v1/policies", json={**body, "sensor_filters": good})
            assert response.status_code == 201 and response.json()["manifest"]["sensor_filters"] == good
    finally:
        server.stop()


def test_the_agent_starts_a_fresh_filter_each_episode(fit):
    from fleet.agent.policy import Policy as RobotPolicy
    from fleet.agent.recorder import EpisodeRecorder
    from fleet.agent.robot import SimRobot, SimRobotConfig

    policy = RobotPolicy("1", lqr, episode=filtered_act(lqr, fit.filter))
    robot = SimRobot(SimRobotConfig(model="pendulum", profile=VariationProfile(obs_noise_std=NOISE).to_dict(), max_steps=300))
    try:
        rets = [float(run_episode(robot, policy, EpisodeRecorder(robot_id="r", robot_model="pendulum"), seed=s).reward.sum()) for s in range(2)]
    finally:
        robot.close()
    assert rets == [300.0, 300.0]


def test_the_pipeline_fits_filters_for_noisy_calibrated_sensors_only():
    from fleet.pipeline.steps import fit_sensor_filters
    from sim.policy_fn import zero_policy

    profiles = {"robot-0": VariationProfile(), "robot-1": VariationProfile(obs_noise_std=0.05), "robot-2": VariationProfile(actuator_strength=0.5, obs_noise_std=0.05)}
    fits = fit_sensor_filters("pendulum", profiles, zero_policy(1), seed=0)  # the fleet's first iteration: no policy yet
    assert set(fits) == {"robot-1", "robot-2"} and all(f.keep for f in fits.values())
    assert set(filter_vectors(fits)) == {"robot-1", "robot-2"}
    assert not np.allclose(fits["robot-1"].filter.B, fits["robot-2"].filter.B, rtol=0.2)  # each robot's own body: the weak motor moves half as far


def test_the_stepper_runs_a_filtered_robots_filter_and_checkpoints_it(fit):
    """A world of a filtered body reads the filter's estimates (what the robot's policy sees), the
    same ones the filter gives offline on the raw readings; its filter state survives get/set_state."""
    noisy, clean = VariationProfile(obs_noise_std=NOISE), VariationProfile()
    rng = np.random.default_rng(3)
    actions = rng.uniform(-0.3, 0.3, size=(40, 2, 1)).astype(np.float32)  # open loop: both runs act the same

    def rollout(filters):
        with BatchedStepper("pendulum", 2, nthread=1, record=False, sensor_filters=filters) as stepper:
            obs, done = [stepper.reset(seed=7, profiles=[noisy, clean])], []
            for a in actions:
                o, _, term, trunc, _ = stepper.step(a)
                obs.append(o)
                done.append(term | trunc)
        return np.stack(obs), np.stack(done)

    (raw, done), (filtered, _) = rollout(None), rollout({noisy: fit.filter})
    first = int(np.argmax(done[:, 0])) if done[:, 0].any() else len(actions)  # world 0's first episode: steps 0..first
    assert first >= 5
    np.testing.assert_allclose(filtered[: first + 1, 0], fit.filter.run(raw[: first + 1, 0], actions[:first, 0]), atol=1e-5)
    np.testing.assert_array_equal(filtered[:, 1], raw[:, 1])  # the clean body reads its sensor
    assert np.abs(filtered[1 : first + 1, 0] - raw[1 : first + 1, 0]).mean() > 0.01

    split = first // 2  # mid-episode; compared until the episode ends (the restored stepper then draws other scenarios)
    with BatchedStepper("pendulum", 2, nthread=1, record=False, sensor_filters={noisy: fit.filter}) as a:
        a.reset(seed=7, profiles=[noisy, clean])
        for act in actions[:split]:
            a.step(act)
        arrays, meta = a.get_state()
    with BatchedStepper("pendulum", 2, nthread=1, record=False, sensor_filters={noisy: fit.filter}) as b:
        b.set_state(arrays, meta, then=lambda w: ScenarioSpec("pendulum", seed=w, profile=[noisy, clean][w]))
        resumed = np.stack([b.step(act)[0] for act in actions[split:first]])
    np.testing.assert_array_equal(resumed[:, 0], filtered[split + 1 : first + 1, 0])
    with BatchedStepper("pendulum", 1, nthread=1) as stepper:  # and a stepper whose worlds all stopped says so
        stepper.reset_to([ScenarioSpec("pendulum", seed=0, max_steps=1)])
        stepper.step(np.zeros((1, 1), np.float32))
        with pytest.raises(RuntimeError, match="reset it"):
            stepper.step(np.zeros((1, 1), np.float32))


def test_a_conditioned_policy_is_told_a_filtered_body_has_a_clean_sensor(fit):
    """The body features a policy reads for a filtered robot are those of its body with a clean sensor,
    the same in the training worlds, the learner's world contexts, the fleet's episodes and the release;
    the world itself still simulates the noisy sensor (its readings differ from the clean body's)."""
    from fleet.pipeline.steps import seen_bodies
    from policies.mbpo import default_config
    from policies.trainer import Trainer, make_algorithm
    from sim.sensor_filter import seen_body

    noisy = VariationProfile(actuator_strength=0.5, obs_noise_std=NOISE)
    weak = VariationProfile(actuator_strength=0.5)
    filters = {noisy: fit.filter}
    assert seen_body(noisy, filters) == weak and seen_body(noisy, None) == noisy and seen_body(weak, filters) == weak
    assert seen_bodies({"r0": noisy, "r1": VariationProfile()}, filters) == {"r0": weak, "r1": VariationProfile()}
    with BatchedStepper("pendulum", 2, nthread=1, record=False, sensor_filters=filters) as stepper:
        obs = stepper.reset(seed=1, profiles=[noisy, weak])
        np.testing.assert_array_equal(stepper.context[0], weak.context())
        assert not np.allclose(obs[0], obs[1])  # same seed, same body: only the sensor differs
    assert not np.allclose(noisy.context(), weak.context())  # without the filter the body is told apart

    config, algo = default_config("pendulum", total_env_steps=1000, seed=0)  # not trained: a budget that would reach an update
    algo = dataclasses.replace(algo, sac=dataclasses.replace(algo.sac, body_context=True))
    learner = make_algorithm(dataclasses.replace(config, num_worlds=2), algo)
    with Trainer(dataclasses.replace(config, num_worlds=2), learner, profiles=[noisy, VariationProfile()], sensor_filters=filters):
        np.testing.assert_array_equal(learner.sac.world_context, np.stack([weak.context(), VariationProfile().context()]))
