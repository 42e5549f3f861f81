"""A robot's policy pull over real HTTP (TUF's client against the server's TUF repository): swaps,
the first-episode health check's rollback and block, the signed sensor correction, and the publish
route's checks. Attacks on the registry are in tests/test_registry_tuf.py."""

import base64
import contextlib
import json
import logging
import time

import httpx
import numpy as np
import pytest
import torch

from fleet.agent.config import SimRobotConfig
from fleet.agent.policy import builtin_policy
from fleet.agent.recorder import EpisodeRecorder
from fleet.agent.robot import SimRobot, run_episode
from fleet.registry.manifest import build_manifest
from fleet.registry.pull import SignedPolicySource
from fleet.registry.store import root_metadata
from fleet.registry.trust import PolicyRejected, PolicyTrust
from policies.export import export_policy
from policies.networks import Policy, PolicySpec
from policies.runtime import WEIGHTS_FILE, load_policy_bytes
from tests.conftest import registry_server

SPEC = {"robot_model": "pendulum", "obs_dim": 4, "act_dim": 1}


def exported(tmp_path, name: str, push: float = 0.0) -> tuple[bytes, dict]:
    """A small exported pendulum policy; ``push`` biases its action (a large push topples the pole)."""
    torch.manual_seed(0)
    policy = Policy(PolicySpec(4, 1, (16,), "tanh", False))
    with torch.no_grad():
        policy.actor.mean.weight.zero_()
        policy.actor.mean.bias.fill_(push)
    manifest = export_policy(policy, tmp_path / name, robot_model="pendulum", policy_version=name, algorithm="sac")
    return (tmp_path / name / WEIGHTS_FILE).read_bytes(), manifest


@pytest.fixture
def fleet(tmp_path):
    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
    source = SignedPolicySource(
        server.url, token, "robot-0", trust, builtin_policy("zero", 1).current(), root=root_metadata(tmp_path / "registry"), min_healthy_steps=10
    )
    yield registry, source
    source.close()
    server.stop()


def publish(registry, tmp_path, name, push=0.0):
    weights, manifest = exported(tmp_path, name, push)
    return registry.publish(weights, policy=manifest, **SPEC)


def test_robot_pulls_verifies_and_swaps(tmp_path, fleet):
    registry, source = fleet
    assert source.current().version == "zero" and source.swaps == 0  # nothing released: keep the fallback
    publish(registry, tmp_path, "good")
    assert source.poll() and source.current().version == "1" and source.trust.version == 1
    assert not source.poll()  # already running it


def test_a_policy_failing_its_first_episode_is_rolled_back_and_blocked(tmp_path, fleet):
    registry, source = fleet
    publish(registry, tmp_path, "good")
    source.poll()
    publish(registry, tmp_path, "topples", push=5.0)  # pushes the cart at full force: the pole falls at once
    assert source.poll() and source.current().version == "2"
    robot = SimRobot(SimRobotConfig(robot_id="robot-0", model="pendulum", max_steps=200))
    recorder = EpisodeRecorder(robot_id="robot-0", robot_model="pendulum", source="real", hardware={})
    episode = run_episode(robot, source.current(), recorder, seed=0)
    assert episode.terminated[-1] and episode.num_steps < 10
    source.report_episode(episode)
    assert source.current().version == "1" and source.trust.version == 1  # back on the last good policy
    assert not source.poll() and source.refusals["health"] >= 2  # the failed version stays refused
    robot.close()


def test_the_robot_runs_its_signed_sensor_correction(tmp_path, fleet):
    registry, source = fleet
    torch.manual_seed(1)
    policy = Policy(PolicySpec(4, 1, (16,), "tanh", False))  # untouched weights: its action depends on the observation
    manifest = export_policy(policy, tmp_path / "p", robot_model="pendulum", policy_version="p", algorithm="sac")
    weights = (tmp_path / "p" / WEIGHTS_FILE).read_bytes()
    offset = [0.3, -0.2, 0.1, 0.5]
    registry.publish(weights, policy=manifest, sensor_offsets={"robot-0": offset, "robot-9": [9.0] * 4}, **SPEC)
    assert source.poll()
    obs = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    runtime = load_policy_bytes(manifest, weights, **SPEC)
    np.testing.assert_allclose(source.current().act(obs), runtime.act(obs - np.float32(offset)), atol=1e-6)
    assert not np.allclose(source.current().act(obs), runtime.act(obs), atol=1e-3)  # the offset mattered
    registry.publish(weights, policy=manifest, sensor_offsets={"robot-0": [0.1, 1e9, 0.0, 0.0]}, **SPEC)
    assert not source.poll() and source.refusals == {"malformed": 1} and source.current().version == "1"
    source.trust.refusals.clear()
    for bad in ([0.1], ["0.1", 0, 0, 0], {"x": 1}):  # wrong length, not numbers, not a list
        registry.publish(weights, policy=manifest, sensor_offsets={"robot-0": bad}, **SPEC)
        assert not source.poll()
    assert source.refusals == {"malformed": 3} and source.current().version == "1"


def in_dtype(weights: bytes, manifest: dict, dtype: str) -> tuple[bytes, dict]:
    """The same safetensors file with every tensor's header dtype set to ``dtype`` (valid TUF, a file robots cannot run),
    and a manifest naming it."""
    n = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + n])
    for name, entry in header.items():
        if name != "__metadata__":
            entry["dtype"] = dtype
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    forged = len(raw).to_bytes(8, "little") + raw + weights[8 + n :]
    import hashlib

    return forged, {**manifest, "weights": {**manifest["weights"], "sha256": hashlib.sha256(forged).hexdigest(), "size": len(forged)}}


def test_weights_of_a_dtype_numpy_lacks_are_refused_by_robot_publisher_and_registry(tmp_path, fleet):
    """BF16/F8 weights raised KeyError out of the loader: a 500 on publish, a robot whose every current() raised, and
    PolicyRegistry.publish (the loop's path) signed them."""
    from fleet.registry.store import PublishRefused
    from policies.runtime import PolicyLoadError

    registry, source = fleet
    weights, manifest = exported(tmp_path, "p")
    for dtype in ("BF16", "F8_E4M3", "F8_E5M2"):
        forged, forged_manifest = in_dtype(weights, manifest, dtype)
        with pytest.raises(PolicyLoadError, match="numpy dtypes"):
            load_policy_bytes(forged_manifest, forged, **SPEC)
        with pytest.raises(PublishRefused, match="a robot would refuse it"):
            registry.publish(forged, policy=forged_manifest, **SPEC)
    assert registry.versions() == []
    forged, forged_manifest = in_dtype(weights, manifest, "BF16")  # signed anyway, as a holder of the online key could
    registry.repo.change(lambda: registry._publish({"stable": 1, "canary": None, "cohort": []}, {
        "policies/00000001/manifest.json": json.dumps(build_manifest(version=1, weights=forged, policy=forged_manifest, **SPEC)).encode(),
        "policies/00000001/weights.safetensors": forged}, {"version": 1, "event": "stable"}))  # fmt: skip
    assert not source.poll() and source.refusals == {"malformed": 1} and source.errors == 0 and source._policy.version == "zero"


@contextlib.contextmanager
def publisher(tmp_path):
    """(registry, a client with a publisher token, a publish body of a small pendulum policy) on a server on loopback."""
    registry, token, server = registry_server(tmp_path, "publisher")
    weights, manifest = exported(tmp_path, "p")
    body = {"weights_b64": base64.b64encode(weights).decode(), "policy": manifest, **SPEC}
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as client:
            yield registry, client, body
    finally:
        server.stop()


def test_publishing_checks_sensor_offsets(tmp_path):
    with publisher(tmp_path) as (registry, client, body):
        for bad in ({"robot-0": [0.1]}, {"robot-0": [0.0, 0.0, 0.0, 5e3]}, [[0.1] * 4], {"robot-0": "0.1"}):
            response = client.post("/v1/policies", json={**body, "sensor_offsets": bad})
            assert response.status_code == 400 and response.json()["field"] == "sensor_offsets", response.text
        assert registry.versions() == []  # nothing signed
        response = client.post("/v1/policies", json={**body, "sensor_offsets": {"robot-0": [0.02] * 4}})
        assert response.status_code == 201 and response.json()["manifest"]["sensor_offsets"] == {"robot-0": [0.02] * 4}


def test_a_publisher_over_http_runs_a_canary_widens_and_rolls_back(tmp_path):
    """An outside publisher could start a canary but neither see nor end it: no route widened or rolled back."""
    with publisher(tmp_path) as (_, client, body):
        assert client.post("/v1/policies", json=body).json()["manifest"]["version"] == 1
        answer = client.post("/v1/rollout/widen")
        assert (answer.status_code, answer.json()["error"]) == (409, "no_canary") and "start one with POST /v1/policies" in answer.json()["reason"], answer.text
        assert client.post("/v1/policies", json={**body, "cohort": ["robot-0"]}).status_code == 201
        rollout = client.get("/v1/rollout").json()
        assert (rollout["stable"], rollout["canary"], rollout["cohort"]) == (1, 2, ["robot-0"])
        assert [e["event"] for e in rollout["history"]] == ["stable", "canary"]
        widened = client.post("/v1/rollout/widen").json()
        assert (widened["version"], widened["stable"], widened["canary"]) == (2, 2, None)
        again = client.post("/v1/rollout/widen", json={"version": 2})  # a retry whose answer was lost, or a replica that lost the race
        assert again.status_code == 409 and "v2 was already widened" in again.json()["reason"] and "POST /v1/policies" not in again.json()["reason"]
        assert client.post("/v1/policies", json={**body, "cohort": ["robot-0"]}).status_code == 201
        for bad in (b"[1]", b'{"why": "x"}', b"{", b'{"version": "3"}'):
            answer = client.post("/v1/rollout/rollback", content=bad)
            assert (answer.status_code, answer.json()["error"]) == (400, "bad_rollout"), (bad, answer.text)
        for bad in ({"reason": 5}, {"reason": "a\u0000b"}, {"reason": "x" * 1025}):  # it goes into every robot's manifest
            answer = client.post("/v1/rollout/rollback", json=bad)
            assert (answer.status_code, answer.json()["error"]) == (400, "bad_rollback"), (bad, answer.text)
        answer = client.post("/v1/rollout/widen", json={"version": 2})  # the canary judged was v2; v3 has replaced it
        assert (answer.status_code, answer.json()["error"]) == (409, "canary_changed"), answer.text
        rolled = client.post("/v1/rollout/rollback", json={"reason": "regressed on robot-0", "version": 3}).json()
        assert rolled["manifest"]["version"] == 4 and (rolled["stable"], rolled["canary"]) == (4, None)
        assert "regressed on robot-0" in rolled["manifest"]["note"] and rolled["history"][-1]["event"] == "rolled_back"
        assert client.get("/v1/rollout", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_a_publish_robots_would_refuse_is_refused_naming_its_field(tmp_path):
    """Publishing once took garbage weights, any obs_dim and a cohort string spelled into characters (201), and
    answered 500 to a null obs_dim, a number as cohort, or deeply nested JSON."""
    registry, token, server = registry_server(tmp_path, "publisher")
    weights, manifest = exported(tmp_path, "p")
    body = {"weights_b64": base64.b64encode(weights).decode(), "policy": manifest, **SPEC}
    bad = {
        "weights_b64": [{"weights_b64": base64.b64encode(b"garbage").decode()}, {"weights_b64": ""}, {"weights_b64": "not base64!"}]
        + [{"weights_b64": base64.b64encode(w).decode(), "policy": m} for w, m in [in_dtype(weights, manifest, "BF16")]],  # once: 500
        "policy": [{"policy": "x"}, {"policy": {}}, {"obs_dim": SPEC["obs_dim"] + 1}],  # robots of that spec would not load it
        "obs_dim": [{"obs_dim": None}, {"obs_dim": -1}, {"obs_dim": 10**30}, {"obs_dim": 4.0}, {"obs_dim": True}],
        "robot_model": [{"robot_model": 5}, {"robot_model": ""}, {"robot_model": "a\nb"}],
        "cohort": [{"cohort": "robot-0"}, {"cohort": 5}, {"cohort": ["robot-0", 1]}, {"cohort": ["../x"]}],
        "gate": [{"gate": [1]}],
        "note": [{"note": 3}, {"note": "\ud800"}, {"note": "ok\x1b[2J"}],  # a lone surrogate (once: signed, then 500), a control character
        "data_snapshot": [{"data_snapshot": "x" * (1 << 20)}],  # a manifest over the 1 MiB robots read (once: signed, 201)
    }
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as client:
            for field, changes in bad.items():
                for change in changes:  # json.dumps as Python writes it: NaN and lone surrogates reach the server
                    response = client.post("/v1/policies", content=json.dumps({**body, **change}), headers={"Content-Type": "application/json"})
                    assert (response.status_code, response.json()["error"], response.json()["field"]) == (400, "bad_publish", field), (change, response.text)
            cohort = ["r%063d" % i for i in range(17_000)]  # a rollout.json over the 1 MiB robots read: every robot would freeze
            response = client.post("/v1/policies", json={**body, "cohort": cohort})
            assert (response.status_code, response.json()["field"]) == (400, "cohort") and "1048576" in response.json()["reason"], response.text
            for raw in (b"[" * 100_000 + b"]" * 100_000, b"[1, 2]", b"{not json", b'{"obs_dim": 4, "obs_dim": 5}', b'{"gate": {"x": NaN}}'):
                response = client.post("/v1/policies", content=raw, headers={"Content-Type": "application/json"})
                assert (response.status_code, response.json()["error"]) == (400, "bad_publish"), response.text
            assert registry.versions() == []  # nothing signed
            response = client.post("/v1/policies", json={**body, "cohort": ["robot-1", "robot-0", "robot-1"]})
            assert response.status_code == 201 and registry._state()["cohort"] == ["robot-0", "robot-1"]
    finally:
        server.stop()


def test_a_publish_body_is_read_under_its_limit_and_deadline(tmp_path, monkeypatch):
    """The publish body was read whole with no limit when sent chunked (300 MiB taken, then a 400), and with no deadline."""
    from fleet.registry import routes

    monkeypatch.setattr(routes, "MAX_PUBLISH_BYTES", 1 << 20)
    registry, token, server = registry_server(tmp_path, "publisher")
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as client:
            chunked = (b"x" * (64 << 10) for _ in range(40))  # a generator: sent chunked, no Content-Length
            response = client.post("/v1/policies", content=chunked)
            assert (response.status_code, response.json()["error"]) == (413, "body_too_large"), response.text
        assert registry.versions() == []
    finally:
        server.stop()


def test_the_registry_signs_no_release_a_robot_would_refuse(tmp_path):
    """Publishing in-process (the loop's way) is checked as the HTTP route is: JSON that cannot carry it, or a file
    over what robots read, is refused before anything is signed, naming the field to change."""
    from fleet.registry.store import PublishRefused

    registry, _, server = registry_server(tmp_path, "publisher")
    server.stop()
    weights, manifest = exported(tmp_path, "p")
    for fields, field in (({"gate": {"x": float("nan")}}, "gate"), ({"note": "\ud800"}, "note"), ({"data_snapshot": "x" * (1 << 20)}, "data_snapshot")):
        with pytest.raises(PublishRefused, match=field) as refused:
            registry.publish(weights, policy=manifest, **SPEC, **fields)
        assert refused.value.field == field
    with pytest.raises(PublishRefused, match="rollout.json would be") as refused:
        registry.publish(weights, policy=manifest, **SPEC, cohort=["r%063d" % i for i in range(17_000)])
    assert refused.value.field == "cohort" and registry.versions() == []
    assert registry.publish(weights, policy=manifest, **SPEC)["version"] == 1  # and the registry goes on


def test_a_started_source_swaps_on_its_own_thread_and_still_rolls_back(tmp_path, fleet):
    """Robots start their source: current() never polls (a slow registry never delays an episode); the
    background poll installs a release, and the first episode's health check still rolls a bad one back."""
    registry, source = fleet
    source.poll_interval_s = 0.0  # the background thread still waits MIN_BACKGROUND_POLL_S between polls
    source.start()
    publish(registry, tmp_path, "good")
    deadline = time.monotonic() + 20
    while source.current().version != "1" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert source.current().version == "1" and source.swaps == 1
    publish(registry, tmp_path, "topples", push=5.0)
    while source.current().version != "2" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert source.current().version == "2"
    robot = SimRobot(SimRobotConfig(robot_id="robot-0", model="pendulum", max_steps=200))
    recorder = EpisodeRecorder(robot_id="robot-0", robot_model="pendulum", source="real", hardware={})
    source.report_episode(run_episode(robot, source.current(), recorder, seed=0))
    robot.close()
    assert source.current().version == "1" and source.trust.version == 1 and 2 in source.trust.blocked
    time.sleep(2.5)  # two more background polls: the blocked version stays out
    assert source.current().version == "1" and source.refusals["health"] >= 1
    source.close()
    assert not source._poller.is_alive()


def test_a_release_failing_the_install_time_probe_is_not_run_and_stays_blocked(tmp_path):
    """The probe at install (finite actions in [-1, 1], of the right shape) was never exercised by a test."""
    from fleet.agent.policy import Policy as RobotPolicy

    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
    probe = np.full((4, 4), np.nan, np.float32)  # observations on which any released policy answers NaN
    source = SignedPolicySource(server.url, token, "robot-0", trust, builtin_policy("zero", 1).current(), root=root_metadata(tmp_path / "registry"), probe_obs=probe)
    try:
        publish(registry, tmp_path, "v1")
        assert not source.poll() and source.current().version == "zero"  # kept the policy it ran
        assert 1 in trust.blocked and source.refusals["health"] >= 1
        assert not source.poll() and source.current().version == "zero"  # and it stays refused
        source.probe_obs = np.zeros((4, 4), np.float32)
        for actions, healthy in ((1.5, False), (1.0, True), (np.nan, False)):
            assert source._healthy(RobotPolicy("x", lambda o, a=actions: np.full((len(o), 1), a, np.float32))) is healthy, actions
        assert not source._healthy(RobotPolicy("x", lambda o: np.zeros((len(o), 2), np.float32)))  # the wrong act_dim
        # a policy that remembers within an episode is probed as an episode runs it, through a NaN reading (a sensor dropout)
        from sim.sensor_filter import SensorFilter, filtered_act

        def summing():  # remembers the sum of its readings: one NaN reading and it answers NaN for the rest of the episode
            total = np.zeros(1)

            def act(o):
                total[:] += o.sum()
                return np.tanh(np.full((len(o), 1), total, np.float32))

            return act

        tanh = lambda o: np.tanh(o.sum(axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
        eye = np.eye(4)
        kalman = filtered_act(tanh, SensorFilter(A=eye, B=np.zeros((4, 1)), c=np.zeros(4), Q=0.01 * eye, R=0.1 * eye))
        assert not source._healthy(RobotPolicy("x", tanh, episode=summing))
        assert source._healthy(RobotPolicy("x", tanh, episode=kalman))  # the release's sensor filter keeps its estimate finite
    finally:
        source.close()
        server.stop()


def test_a_manifest_naming_other_weights_than_the_signed_target_is_refused(tmp_path, fleet, monkeypatch):
    """Installed, such a release would leave trusted weights that do not match on the next reboot (the fallback then)."""
    import fleet.registry.store as store

    registry, source = fleet
    publish(registry, tmp_path, "v1")
    assert source.poll() and source.trust.version == 1

    def lying(**fields):
        manifest = build_manifest(**fields)
        return {**manifest, "weights": {**manifest["weights"], "sha256": "0" * 64}}

    monkeypatch.setattr(store, "build_manifest", lying)
    publish(registry, tmp_path, "v2")
    assert not source.poll() and source.refusals == {"hash": 1} and source.trust.version == 1 and source.current().version == "1"


def test_a_short_first_episode_cut_by_the_operator_is_no_failed_health_check(tmp_path, fleet):
    """Only a first episode that *terminated* early rolls back; one truncated early (stopped by hand) is no verdict."""
    registry, source = fleet
    publish(registry, tmp_path, "v1")
    source.poll()
    publish(registry, tmp_path, "v2")
    assert source.poll() and source.current().version == "2"
    robot = SimRobot(SimRobotConfig(robot_id="robot-0", model="pendulum", max_steps=5))
    recorder = EpisodeRecorder(robot_id="robot-0", robot_model="pendulum", source="real", hardware={})
    episode = run_episode(robot, source.current(), recorder, seed=0)
    assert episode.truncated[-1] and not episode.terminated[-1] and episode.num_steps < 10
    source.report_episode(episode)
    assert source.current().version == "2" and 2 not in source.trust.blocked
    robot.close()


def test_a_robot_upgraded_from_one_shared_state_folder_keeps_its_trusted_policy_and_floor(tmp_path):
    """Builds before per-robot folders kept the state in runs/fleet/robot-policy/; the new default, .../<robot_id>, started
    empty: the robot reinstalled from nothing, and a registry restored from an older backup could send it back a version."""
    from fleet.registry.trust import adopt_shared_state

    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    old = tmp_path / "robot-policy"
    source = SignedPolicySource(server.url, token, "robot-0", PolicyTrust(**SPEC, state_dir=old), builtin_policy("zero", 1).current(), root=root_metadata(tmp_path / "registry"))
    try:
        publish(registry, tmp_path, "v1")
        assert source.poll() and source.trust.version == 1
    finally:
        source.close()
        server.stop()
    assert not adopt_shared_state(old / "custom", "robot-0")  # a state_dir of one's own is left alone
    assert adopt_shared_state(old / "robot-0", "robot-0") and not (old / "trusted.json").exists()
    upgraded = PolicyTrust(**SPEC, state_dir=old / "robot-0")
    assert upgraded.version == 1 and upgraded.trusted_weights()  # the floor and the weights came along
    assert not adopt_shared_state(old / "robot-0", "robot-0")  # once


def restarted(tmp_path, server, token) -> SignedPolicySource:
    """The robot-0 of ``fleet`` after a restart, on the same state folder."""
    trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
    return SignedPolicySource(server.url, token, "robot-0", trust, builtin_policy("zero", 1).current(), root=root_metadata(tmp_path / "registry"))


@pytest.mark.parametrize("damage", ["overwritten", "deleted"])
def test_damaged_trusted_weights_are_fetched_again_and_the_status_says_what_runs(tmp_path, damage):
    """A robot whose trusted weights were damaged on disk ran the zero policy for ever while its status said it ran the
    trusted version: "same version, same manifest" counted as "already running it", so it never fetched them again."""
    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    source = restarted(tmp_path, server, token)
    try:
        publish(registry, tmp_path, "v1")
        assert source.poll() and source.status()["policy_version"] == 1
        source.close()
        weights = source.trust.weights_path
        if damage == "deleted":
            weights.unlink()
        else:
            with open(weights, "r+b") as f:
                f.seek(100)
                f.write(b"\xde\xad\xbe\xef")
        source = restarted(tmp_path, server, token)  # the robot restarts on its damaged state: on the fallback
        assert source.status()["policy_version"] == 0 and source.status()["trusted_version"] == 1  # never a version it does not run
        assert source.poll() and source.current().version == "1" and source.status()["policy_version"] == 1  # fetched and verified again
        assert source.refusals == {} and source.errors == 0 and source.trust.trusted_weights()  # intact on disk again
        assert not source.poll() and source.swaps == 1  # and now it runs it
        source.close()
        source = restarted(tmp_path, server, token)
        assert source.status()["policy_version"] == 1  # the next restart runs it at once
    finally:
        source.close()
        server.stop()


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b'{"version": 2}'], ids=["empty", "not_json", "not_object", "no_manifest"])
def test_an_unreadable_trusted_manifest_runs_the_fallback_and_fetches_the_policy_again(tmp_path, content, caplog):
    """An empty trusted.json stopped the robot app at boot ("flywheel-robot: Expecting value: line 1 column 1"), no
    episode recorded. Now the error names the file, the robot runs its fallback and installs the registry's policy again;
    the weights kept beside the file still hold its version floor."""
    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    source = restarted(tmp_path, server, token)
    try:
        publish(registry, tmp_path, "v1")
        publish(registry, tmp_path, "v2")
        assert source.poll() and source.trust.version == 2
        source.close()
        (tmp_path / "robot" / "trusted.json").write_bytes(content)
        with caplog.at_level(logging.ERROR, logger="fleet.registry.trust"):
            source = restarted(tmp_path, server, token)
        assert str(tmp_path / "robot" / "trusted.json") in caplog.text and source.trust.manifest is None
        assert (source.status()["policy_version"], source.status()["trusted_version"]) == (0, 2)  # the fallback; the floor from weights-v00000002
        with pytest.raises(PolicyRejected, match="rollback"):
            source.trust.check(registry.manifest(1))  # a lower version is still refused
        assert source.poll() and source.current().version == "2" and source.trust.manifest["version"] == 2
        source.close()
        source = restarted(tmp_path, server, token)
        assert source.status()["policy_version"] == 2  # trusted.json is whole again
        source.close()
        (tmp_path / "robot" / "trusted.json").write_bytes(content)  # unreadable again, and this time v2 fails its probe here:
        source = restarted(tmp_path, server, token)
        source._healthy = lambda policy: False
        assert not source.poll() and source.current().version == "zero"
        source.close()
        source = restarted(tmp_path, server, token)  # trusted.json was deleted with the failed install once: the floor went to 0
        with pytest.raises(PolicyRejected, match="rollback"):
            source.trust.check(registry.manifest(1))
    finally:
        source.close()
        server.stop()



def test_weights_that_cannot_be_kept_leave_no_download_behind(tmp_path):
    """Downloaded whole into TUF's cache, the weights could not be written beside trusted.json (the disk filled meanwhile):
    the cached copy stayed, and every later poll skipped the room check for it and failed again."""
    import errno

    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    source = restarted(tmp_path, server, token)
    try:
        publish(registry, tmp_path, "v1")

        def full_disk(manifest, weights):
            raise OSError(errno.ENOSPC, "No space left on device")

        source.trust.accept = full_disk
        assert not source.poll() and source.errors == 1 and source.current().version == "zero"
        assert not source.targets_dir.exists() or not any(source.targets_dir.rglob("*"))  # nothing downloaded is kept
    finally:
        source.close()
        server.stop()


def test_flywheel_robot_rolls_back_and_blocks_a_canary_that_makes_the_robot_fall_in_its_first_episode(tmp_path):
    """flywheel-robot built its policy source without min_healthy_steps (SignedPolicySource's default was 0), so its
    first-episode health check never failed: a canary that toppled the robot at once ran on it for good."""
    import os
    import signal
    import subprocess
    import sys

    from tests.test_agent import REPO

    registry, token, server = registry_server(tmp_path, "robot", "robot-a")
    root, state = registry.root / "tuf" / "metadata" / "root.json", tmp_path / "robot-policy" / "robot-a"
    publish(registry, tmp_path, "good")
    first = SignedPolicySource(server.url, token, "robot-a", PolicyTrust(**SPEC, state_dir=state), builtin_policy("zero", 1).current(), root=root.read_bytes())
    assert first.poll()  # the robot runs v1 ...
    first.close()
    weights, manifest = exported(tmp_path, "topples", push=5.0)
    registry.publish(weights, policy=manifest, cohort=["robot-a"], **SPEC)  # ... and v2, a canary for it, topples the pole at once
    overrides = [
        "robot.robot_id=robot-a", "robot.model=pendulum", "robot.max_steps=25", "episodes=0", "policy.poll_interval_s=1",
        f"fleet.agent.server_url={server.url}", f"policy.root={root}", f"policy.state_dir={state}",
        f"fleet.agent.spool_dir={tmp_path / 'spool'}", f"hydra.run.dir={tmp_path / 'hydra'}",
    ]  # fmt: skip
    running = subprocess.Popen([sys.executable, "-m", "fleet.apps.robot", *overrides], cwd=REPO, env={**os.environ, "FLYWHEEL_ROBOT_TOKEN": token},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while 2 not in PolicyTrust(**SPEC, state_dir=state).blocked and running.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        running.send_signal(signal.SIGTERM)
        stdout, stderr = running.communicate(timeout=60)
    finally:
        running.kill()
        server.stop()
    log_text = (tmp_path / "hydra" / "robot.log").read_text()
    assert "v2 failed its health check (first episode terminated after" in log_text, (log_text[-3000:], stderr[-3000:])
    trust = PolicyTrust(**SPEC, state_dir=state)
    assert trust.blocked == {2} and trust.version == 1  # back on v1 for good, v2 blocked here
    status = json.loads(stdout.strip().splitlines()[-1])
    assert status["policy_version"] == 1 and status["trusted_version"] == 1


def test_tampered_weights_are_refused_naming_the_release_and_its_file(tmp_path, fleet, caplog):
    """Weights changed on the registry's disk after signing were refused, but logged as "registry metadata refused (hash:
    ...)": neither the release's version nor its file, and the metadata was fine."""
    registry, source = fleet
    publish(registry, tmp_path, "v1")
    assert source.poll()
    publish(registry, tmp_path, "v2")
    (stored,) = (registry.root / "tuf" / "targets" / "policies" / "00000002").glob("*weights.safetensors")
    tampered = bytearray(stored.read_bytes())
    tampered[-2:] = bytes(b ^ 0xFF for b in tampered[-2:])
    stored.write_bytes(bytes(tampered))
    with caplog.at_level(logging.WARNING, logger="fleet.registry.pull"):
        assert not source.poll()
    assert source.refusals == {"hash": 1} and source.current().version == "1" and source.trust.version == 1
    assert "v2's weights (policies/00000002/weights.safetensors) failed verification" in caplog.text and "keeping 1" in caplog.text
    assert "metadata refused" not in caplog.text
