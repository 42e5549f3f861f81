"""Policy redistribution security: each attack on a robot's policy trust, one test each,
plus the registry's staged rollout (canary routing, widen, rollback as a new version)."""

import json

import pytest

from fleet.registry.manifest import build_manifest
from fleet.registry.signing import generate_keypair, load_private_key, load_public_key, sign
from fleet.registry.store import PolicyRegistry, RegistryError
from fleet.registry.trust import PolicyRejected, PolicyTrust

SPEC = {"robot_model": "pendulum", "obs_dim": 4, "act_dim": 1}


@pytest.fixture
def keys(tmp_path):
    generate_keypair(tmp_path / "registry.pem", tmp_path / "registry.pub")
    generate_keypair(tmp_path / "attacker.pem", tmp_path / "attacker.pub")
    return {
        "private": load_private_key(tmp_path / "registry.pem"),
        "public": load_public_key(tmp_path / "registry.pub"),
        "attacker": load_private_key(tmp_path / "attacker.pem"),
    }


@pytest.fixture
def registry(tmp_path, keys):
    return PolicyRegistry(tmp_path / "registry", keys["private"])


def robot(tmp_path, keys, clock=None, **spec):
    kwargs = {"clock": clock} if clock else {}
    return PolicyTrust(keys["public"], **{**SPEC, **spec}, state_dir=tmp_path / "robot", **kwargs)


def install(trust, envelope, weights):
    manifest = trust.check(envelope)
    trust.accept(manifest, trust.receive_weights(manifest, [weights]))


def test_a_good_policy_is_accepted_and_survives_a_restart(tmp_path, keys, registry):
    env = registry.publish(b"weights-1", **SPEC)
    trust = robot(tmp_path, keys)
    install(trust, env, b"weights-1")
    again = robot(tmp_path, keys)  # robot restart
    assert again.version == 1 and again.weights_path.read_bytes() == b"weights-1"
    assert again.check(env) is None  # already running it: no swap, no refusal
    assert sum(again.refusals.values()) == 0


def test_bad_signature_is_refused(tmp_path, keys, registry):
    env = registry.publish(b"w", **SPEC)
    forged = sign(env["manifest"], keys["attacker"])
    tampered = json.loads(json.dumps(env))
    tampered["manifest"]["gate"] = {"promote": True, "forged": 1}
    trust = robot(tmp_path, keys)
    for bad in (forged, tampered, {"manifest": env["manifest"]}, {"manifest": env["manifest"], "signature": "!!"}):
        with pytest.raises(PolicyRejected) as err:
            trust.check(bad)
        assert err.value.reason == "signature"
    assert trust.refusals["signature"] == 4 and trust.version == 0


def test_rollback_to_a_lower_version_is_refused(tmp_path, keys, registry):
    old = registry.publish(b"w1", **SPEC)
    new = registry.publish(b"w2", **SPEC)
    trust = robot(tmp_path, keys)
    install(trust, new, b"w2")
    with pytest.raises(PolicyRejected, match="lower than the trusted 2") as err:
        trust.check(old)
    assert err.value.reason == "rollback" and trust.version == 2


def test_replay_of_the_same_version_with_other_content_is_refused(tmp_path, keys, registry):
    env = registry.publish(b"w1", **SPEC)
    trust = robot(tmp_path, keys)
    install(trust, env, b"w1")
    other = sign({**env["manifest"], "note": "same version, other content"}, keys["private"])
    with pytest.raises(PolicyRejected) as err:
        trust.check(other)
    assert err.value.reason == "replay"


def test_expired_manifest_is_refused(tmp_path, keys):
    manifest = build_manifest(version=1, weights=b"w", ttl_s=60, now=1000.0, **SPEC)
    env = sign(manifest, keys["private"])
    trust = robot(tmp_path, keys, clock=lambda: 2000.0)
    with pytest.raises(PolicyRejected, match="expired") as err:
        trust.check(env)
    assert err.value.reason == "expired"


def test_substituted_weights_are_refused(tmp_path, keys, registry):
    env = registry.publish(b"good-weights", **SPEC)
    trust = robot(tmp_path, keys)
    manifest = trust.check(env)
    with pytest.raises(PolicyRejected) as err:
        trust.receive_weights(manifest, [b"evil-weights"])  # same size, other bytes
    assert err.value.reason == "hash" and trust.version == 0


def test_endless_weights_stop_at_the_manifest_size(tmp_path, keys, registry):
    env = registry.publish(b"x" * 100, **SPEC)
    trust = robot(tmp_path, keys)
    manifest = trust.check(env)
    read = []

    def endless():
        while True:
            read.append(1)
            yield b"x" * 64

    with pytest.raises(PolicyRejected) as err:
        trust.receive_weights(manifest, endless())
    assert err.value.reason == "size" and len(read) == 2  # stopped right after passing 100 bytes
    with pytest.raises(PolicyRejected, match="manifest says 100"):
        trust.receive_weights(manifest, [b"x" * 99])


def test_mix_and_match_spec_is_refused(tmp_path, keys, registry):
    trust = robot(tmp_path, keys)
    for spec in ({"robot_model": "ant", "obs_dim": 4, "act_dim": 1}, {**SPEC, "obs_dim": 5}, {**SPEC, "act_dim": 2}):
        env = registry.publish(b"w", **spec)
        with pytest.raises(PolicyRejected, match="does not fit this robot") as err:
            trust.check(env)
        assert err.value.reason == "spec"


def test_failed_health_check_restores_and_blocks_the_version(tmp_path, keys, registry):
    good = registry.publish(b"good", **SPEC)
    bad = registry.publish(b"bad", **SPEC)
    trust = robot(tmp_path, keys)
    install(trust, good, b"good")
    previous = (trust.manifest, trust.weights_path.read_bytes())
    install(trust, bad, b"bad")
    trust.restore(*previous, failed_version=2)
    assert trust.version == 1 and trust.weights_path.read_bytes() == b"good"
    with pytest.raises(PolicyRejected) as err:
        robot(tmp_path, keys).check(bad)  # even after a restart
    assert err.value.reason == "health"


def test_canary_cohort_then_widen(registry):
    registry.publish(b"v1", **SPEC)
    registry.publish(b"v2", cohort=["robot-0"], **SPEC)
    assert registry.latest_for("robot-0")["manifest"]["version"] == 2
    assert registry.latest_for("robot-1")["manifest"]["version"] == 1
    assert registry.widen() == 2
    assert registry.latest_for("robot-1")["manifest"]["version"] == 2
    with pytest.raises(RegistryError, match="no canary"):
        registry.widen()


def test_rollback_republishes_the_last_good_weights_as_a_newer_version(tmp_path, keys, registry):
    registry.publish(b"v1-weights", **SPEC)
    registry.publish(b"v2-weights", cohort=["robot-0"], **SPEC)
    canary = robot(tmp_path, keys)
    install(canary, registry.latest_for("robot-0"), b"v2-weights")
    envelope = registry.rollback("canary return dropped")
    assert envelope["manifest"]["version"] == 3 and "rollback of v2" in envelope["manifest"]["note"]
    assert registry.latest_for("robot-0")["manifest"]["version"] == 3
    install(canary, registry.latest_for("robot-0"), b"v1-weights")  # the canary accepts it: higher version
    assert canary.weights_path.read_bytes() == b"v1-weights"
    assert [h["event"] for h in registry.rollout()["history"]] == ["stable", "canary", "stable", "rolled_back"]


def test_rolling_back_a_first_canary_leaves_no_policy(registry):
    registry.publish(b"v1-weights", cohort=["robot-0"], **SPEC)
    assert registry.rollback("first canary regressed") is None
    assert registry.latest_for("robot-0") is None and registry.rollout()["canary"] is None
    assert [h["event"] for h in registry.rollout()["history"]] == ["canary", "rolled_back"]
