"""What a robot checks on top of TUF (rollback and replay of versions, its own spec, its health
check), and the registry's staged rollout (canary routing, widen, rollback as a new version)."""

import logging

import pytest

from fleet.registry.store import RegistryError, RolloutRefused, open_registry
from fleet.registry.trust import PolicyRejected, PolicyTrust

SPEC = {"robot_model": "pendulum", "obs_dim": 4, "act_dim": 1}


@pytest.fixture
def registry(tmp_path):
    keys = tmp_path / "keys"
    return open_registry(tmp_path / "registry", keys / "online.pem", root_keys=[keys / f"root-{i}.pem" for i in (1, 2, 3)])


def robot(tmp_path, **spec):
    return PolicyTrust(**{**SPEC, **spec}, state_dir=tmp_path / "robot")


def install(trust, registry, manifest):
    checked = trust.check(manifest)
    trust.accept(checked, registry.weights(checked["version"]))


def test_a_good_policy_is_accepted_and_survives_a_restart(tmp_path, registry):
    manifest = registry.publish(b"weights-1", **SPEC)
    trust = robot(tmp_path)
    install(trust, registry, manifest)
    again = robot(tmp_path)  # robot restart
    assert again.version == 1 and again.weights_path.read_bytes() == b"weights-1" and again.trusted_weights() == b"weights-1"
    assert again.check(manifest) is None  # already running it: no swap, no refusal
    assert sum(again.refusals.values()) == 0


def test_rollback_to_a_lower_version_is_refused(tmp_path, registry):
    old = registry.publish(b"w1", **SPEC)
    new = registry.publish(b"w2", **SPEC)
    trust = robot(tmp_path)
    install(trust, registry, new)
    with pytest.raises(PolicyRejected, match="lower than the trusted 2") as err:
        trust.check(old)
    assert err.value.reason == "rollback" and trust.version == 2


def test_replay_of_the_same_version_with_other_content_is_refused(tmp_path, registry):
    manifest = registry.publish(b"w1", **SPEC)
    trust = robot(tmp_path)
    install(trust, registry, manifest)
    with pytest.raises(PolicyRejected) as err:
        trust.check({**manifest, "note": "same version, other content"})
    assert err.value.reason == "replay"


def test_malformed_manifests_are_refused(tmp_path, registry):
    manifest = registry.publish(b"w1", **SPEC)
    trust = robot(tmp_path)
    for bad in ([], {**manifest, "format": "flywheel-policy/0"}, {k: v for k, v in manifest.items() if k != "weights"}, {**manifest, "version": "1"}):
        with pytest.raises(PolicyRejected) as err:
            trust.check(bad)
        assert err.value.reason == "malformed"
    assert trust.refusals == {"malformed": 4}


def test_mix_and_match_spec_is_refused(tmp_path, registry):
    trust = robot(tmp_path)
    for spec in ({"robot_model": "ant", "obs_dim": 4, "act_dim": 1}, {**SPEC, "obs_dim": 5}, {**SPEC, "act_dim": 2}):
        manifest = registry.publish(b"w", **spec, spec_change=True)  # past the registry's own check (a fleet moving to other robots)
        with pytest.raises(PolicyRejected, match="does not fit this robot") as err:
            trust.check(manifest)
        assert err.value.reason == "spec"


def test_failed_health_check_restores_and_blocks_the_version(tmp_path, registry):
    good = registry.publish(b"good", **SPEC)
    bad = registry.publish(b"bad", **SPEC)
    trust = robot(tmp_path)
    install(trust, registry, good)
    previous = (trust.manifest, trust.weights_path.read_bytes())
    install(trust, registry, bad)
    trust.restore(*previous, failed_version=2)
    assert trust.version == 1 and trust.weights_path.read_bytes() == b"good"
    with pytest.raises(PolicyRejected) as err:
        robot(tmp_path).check(bad)  # even after a restart
    assert err.value.reason == "health"


def test_weights_changed_on_the_robots_disk_are_not_run(tmp_path, registry):
    trust = robot(tmp_path)
    install(trust, registry, registry.publish(b"good", **SPEC))
    trust.weights_path.write_bytes(b"evil")
    with pytest.raises(PolicyRejected) as err:
        robot(tmp_path).trusted_weights()
    assert err.value.reason == "hash"


def test_an_unreadable_blocked_list_is_named_and_blocks_nothing_until_a_version_fails_again(tmp_path, registry, caplog):
    """A damaged blocked.json stopped the robot at boot (a JSONDecodeError out of PolicyTrust)."""
    trust = robot(tmp_path)
    install(trust, registry, registry.publish(b"good", **SPEC))
    bad = registry.publish(b"bad", **SPEC)
    trust.restore(trust.manifest, b"good", failed_version=bad["version"])
    (tmp_path / "robot" / "blocked.json").write_bytes(b"{oops")
    with caplog.at_level(logging.ERROR, logger="fleet.registry.trust"):
        again = robot(tmp_path)
    assert str(tmp_path / "robot" / "blocked.json") in caplog.text and again.blocked == set() and again.version == 1


def test_canary_cohort_then_widen(registry):
    registry.publish(b"v1", **SPEC)
    registry.publish(b"v2", cohort=["robot-0"], **SPEC)
    assert registry.latest_for("robot-0")["version"] == 2
    assert registry.latest_for("robot-1")["version"] == 1
    assert registry.widen() == 2
    assert registry.latest_for("robot-1")["version"] == 2
    with pytest.raises(RegistryError, match="no canary"):
        registry.widen()


def test_rollback_republishes_the_last_good_weights_as_a_newer_version(tmp_path, registry):
    registry.publish(b"v1-weights", **SPEC)
    registry.publish(b"v2-weights", cohort=["robot-0"], **SPEC)
    canary = robot(tmp_path)
    install(canary, registry, registry.latest_for("robot-0"))
    manifest = registry.rollback("canary return dropped")
    assert manifest["version"] == 3 and "rollback of v2" in manifest["note"]
    assert registry.latest_for("robot-0")["version"] == 3
    install(canary, registry, registry.latest_for("robot-0"))  # the canary accepts it: higher version
    assert canary.weights_path.read_bytes() == b"v1-weights"
    assert [h["event"] for h in registry.rollout()["history"]] == ["stable", "canary", "stable", "rolled_back"]


def test_rolling_back_a_first_canary_is_refused_saying_what_to_do(registry):
    """It answered None and cleared the canary, while robot-0 went on running the version said to be rolled back."""
    registry.publish(b"v1-weights", cohort=["robot-0"], **SPEC)
    with pytest.raises(RolloutRefused, match=r"no stable version to return to \(none was ever released to every robot\): the canary's cohort \(robot-0\) would keep running v1") as refused:
        registry.rollback("first canary regressed")
    assert refused.value.code == "no_stable" and "robot-0" in str(refused.value) and "POST /v1/policies without a cohort" in str(refused.value)
    assert registry.rollout()["canary"] == 1 and registry.latest_for("robot-0")["version"] == 1  # the registry says what robot-0 runs
    assert [h["event"] for h in registry.rollout()["history"]] == ["canary"]
