"""The release key: a key of its own for TUF's targets role, held where releases are made, so that a
server that only serves (the online key: snapshot and timestamp) cannot release, and neither can
whoever steals it. Real files, python-tuf's client, a real server on loopback."""

from __future__ import annotations

import json
import logging
import re
import time

import httpx
import pytest
from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp

from fleet.apps.registry_keys import main
from fleet.registry.signing import load_signer
from fleet.registry.store import PolicyRegistry, RegistryError, open_registry
from fleet.registry.tuf_repo import OnlineKeyRotated, RegistryCorrupted, ReleaseKeyMissing
from fleet.server.auth import add_token
from fleet.server.config import ServerConfig
from fleet.server.runner import serve
from fleet.store import StoreConfig
from tests.test_policy_pull_http import exported
from tests.test_registry_tuf import SPEC, publish, resign, robot

ROOTS = (1, 2, 3)


def init(tmp_path, *extra: str) -> int:
    keys = tmp_path / "keys"
    roots = [arg for i in ROOTS for arg in ("--root-key", str(keys / f"root-{i}.pem"))]
    return main(["init", "--dir", str(tmp_path / "registry"), *roots, "--threshold", "2", "--online-key", str(keys / "online.pem"), *extra])


def serve_replica(tmp_path, registry: PolicyRegistry):
    tokens = tmp_path / "tokens.json"
    robot_token, publisher = add_token(tokens, "robot", "robot-0"), add_token(tokens, "publisher")
    server = serve(ServerConfig(port=0, token_file=str(tokens)), StoreConfig(path=str(tmp_path / "store")), policy_registry=registry)
    return server, robot_token, publisher


def plant_release(registry: PolicyRegistry, signer, weights: bytes) -> None:
    """What a thief of ``signer`` can do to a registry: list other weights under the released path
    and re-sign targets, snapshot and timestamp with it."""
    repo, meta = registry.repo, registry.repo.metadata_dir
    targets = Metadata[Targets].from_bytes(repo.files.read(f"metadata/{repo.open('targets').signed.version}.targets.json"))
    path = next(p for p in targets.signed.targets if p.endswith("weights.safetensors"))
    info = repo.store_target(path, weights)  # the attacker's file, under its hash-prefixed name
    targets.signed.targets[path] = info
    new_targets = targets.signed.version + 1
    (meta / f"{new_targets}.targets.json").write_bytes(resign(targets, signer, version=new_targets))
    snapshot = repo.open("snapshot")
    snapshot.signed.meta["targets.json"].version = new_targets
    (meta / f"{snapshot.signed.version + 1}.snapshot.json").write_bytes(resign(snapshot, signer, version=snapshot.signed.version + 1))
    timestamp = repo.open("timestamp")
    timestamp.signed.snapshot_meta.version = snapshot.signed.version
    (meta / "timestamp.json").write_bytes(resign(timestamp, signer, version=timestamp.signed.version + 1))


def test_a_server_without_the_release_key_serves_keeps_metadata_fresh_and_cannot_release(tmp_path, caplog):
    keys = tmp_path / "keys"
    assert init(tmp_path, "--release-key", str(keys / "release.pem")) == 0
    releaser = open_registry(tmp_path / "registry", keys / "online.pem", release_key=keys / "release.pem")  # the loop
    assert releaser.can_release
    v1 = publish(releaser, tmp_path, "v1")
    replica = PolicyRegistry(tmp_path / "registry", load_signer(keys / "online.pem"))  # an internet-facing server
    assert not replica.can_release
    for change in (lambda: publish(replica, tmp_path, "v2"), replica.widen, lambda: replica.rollback("x")):
        with pytest.raises(ReleaseKeyMissing, match=r"only the release key .* signs releases"):
            change()
    # the replica re-signs snapshot and timestamp as they age; targets, which it cannot, it reports
    day = 86400.0
    aged = PolicyRegistry(tmp_path / "registry", load_signer(keys / "online.pem"), clock=lambda: time.time() + 0.75 * day)
    assert aged.repo.open("timestamp").signed.expires.timestamp() > time.time() + 1.5 * day
    targets = releaser.repo.open("targets").signed.version
    with caplog.at_level(logging.WARNING, logger="fleet.registry.tuf_repo"):
        late = PolicyRegistry(tmp_path / "registry", load_signer(keys / "online.pem"), clock=lambda: time.time() + 5 * day)
    assert "needs re-signing" in caplog.text and "release key" in caplog.text
    assert late.repo.open("targets").signed.version == targets  # not re-signed: it cannot
    assert late.repo.open("timestamp").signed.expires.timestamp() > time.time() + 5.5 * day
    server, robot_token, publisher = serve_replica(tmp_path, replica)
    source = robot(tmp_path, server, robot_token)
    try:
        assert source.poll() and source.trust.version == v1  # the replica serves what the releaser released
        answer = httpx.post(f"{server.url}/v1/policies", json={}, headers={"authorization": f"Bearer {publisher}"})
        assert answer.status_code == 403 and answer.json()["error"] == "no_release_key", answer.text
        assert "release key" in answer.json()["reason"]
        # whoever steals the replica's key signs a release of their own: robots refuse it and keep v1
        plant_release(replica, load_signer(keys / "online.pem"), exported(tmp_path, "evil")[0])
        assert not source.poll() and source.refusals == {"signature": 1} and source.trust.version == v1
    finally:
        source.close()
        server.stop()
    with pytest.raises(RegistryCorrupted, match="not signed by the targets keys"):  # nor does the releaser build on it
        publish(releaser, tmp_path, "v2")


def test_rotating_in_a_release_key_takes_releases_off_the_online_key_and_robots_follow(tmp_path, capsys):
    keys, reg = tmp_path / "keys", tmp_path / "registry"
    assert init(tmp_path) == 0  # one online key for everything, as before
    provisioned = (reg / "tuf" / "metadata" / "root.json").read_bytes()
    server_key = load_signer(keys / "online.pem")
    assert PolicyRegistry(reg, server_key).can_release
    two = ["--root-key", str(keys / "root-1.pem"), "--root-key", str(keys / "root-3.pem")]
    assert main(["rotate", "--dir", str(reg), *two, "--release-key", str(keys / "online.pem")]) == 1
    assert "the release key" in capsys.readouterr().err  # the online key cannot be its own release key
    assert main(["rotate", "--dir", str(reg), *two, "--release-key", str(keys / "release.pem")]) == 0
    roles = json.loads(capsys.readouterr().out)["roles"]
    assert roles["targets"]["keyids"] != roles["timestamp"]["keyids"] == roles["snapshot"]["keyids"]
    with pytest.raises(RegistryError, match="is not the key root v2 names for targets"):
        PolicyRegistry(reg, server_key, release=load_signer(keys / "stranger.pem", create=True))
    assert not PolicyRegistry(reg, server_key).can_release
    # rotating the online key later keeps the release key where it is
    assert main(["rotate", "--dir", str(reg), *two, "--online-key", str(keys / "online-2.pem")]) == 0
    roles = json.loads(capsys.readouterr().out)["roles"]
    assert roles["targets"]["keyids"] == [load_signer(keys / "release.pem").public_key.keyid[:16]] != roles["timestamp"]["keyids"]
    # the releaser re-signs targets under the new root; a robot provisioned with root v1 walks to v3 and installs
    releaser = PolicyRegistry(reg, load_signer(keys / "online-2.pem"), release=load_signer(keys / "release.pem"))
    weights, manifest = exported(tmp_path, "v1")
    version = releaser.publish(weights, policy=manifest, **SPEC)["version"]
    server, robot_token, _ = serve_replica(tmp_path, PolicyRegistry(reg, load_signer(keys / "online-2.pem")))
    from fleet.agent.policy import builtin_policy
    from fleet.registry.pull import SignedPolicySource
    from fleet.registry.trust import PolicyTrust

    source = SignedPolicySource(server.url, robot_token, "robot-0", PolicyTrust(**SPEC, state_dir=tmp_path / "robot"), builtin_policy("zero", 1).current(), root=provisioned)
    try:
        assert source.poll() and source.trust.version == version and source.refusals == {}
    finally:
        source.close()
        server.stop()
    # static hosting: refresh re-signs targets only with the release key
    assert main(["refresh", "--dir", str(reg), "--online-key", str(keys / "online-2.pem"), "--release-key", str(keys / "release.pem")]) == 0
    assert json.loads(capsys.readouterr().out)["versions"]["targets"] >= releaser.repo.open("targets").signed.version


@pytest.mark.parametrize("split", [True, False], ids=["release-key", "online-key-releases"])
def test_a_server_whose_online_key_a_rotation_replaced_signs_nothing_and_says_to_restart(tmp_path, caplog, capsys, split):
    """After `rotate --online-key` while a server ran, it re-signed a due timestamp with the old key over the file the
    rotation pinned (the server restarted with the new key then refused the registry); once it had read the new root,
    publishes got 500 (an orphan N.targets.json left behind) and so did every timestamp.json."""
    keys, reg = tmp_path / "keys", tmp_path / "registry"
    assert init(tmp_path, *(["--release-key", str(keys / "release.pem")] if split else [])) == 0
    held = {"release": load_signer(keys / "release.pem")} if split else {}
    now = [time.time()]
    registry = PolicyRegistry(reg, load_signer(keys / "online.pem"), **held, clock=lambda: now[0])
    v1 = publish(registry, tmp_path, "v1")
    two = ["--root-key", str(keys / "root-1.pem"), "--root-key", str(keys / "root-3.pem")]
    assert main(["rotate", "--dir", str(reg), *two, "--online-key", str(keys / "online-2.pem")]) == 0
    capsys.readouterr()
    meta = reg / "tuf" / "metadata"
    files, served = sorted(p.name for p in meta.iterdir()), (meta / "timestamp.json").read_bytes()
    server, robot_token, publisher = serve_replica(tmp_path, registry)

    def timestamp() -> httpx.Response:
        return httpx.get(f"{server.url}/v1/tuf/metadata/timestamp.json", headers={"authorization": f"Bearer {robot_token}"})

    try:
        now[0] += 0.75 * 86400  # the timestamp is past half its life
        with caplog.at_level(logging.WARNING, logger="fleet.registry.tuf_repo"):
            for answer in (timestamp(), timestamp()):  # served as it is: robots see it expire (a freeze), not a 500
                assert answer.status_code == 200 and answer.content == served, answer.text
            for path in ("policies", "rollout/widen", "rollout/rollback"):
                answer = httpx.post(f"{server.url}/v1/{path}", json={}, headers={"authorization": f"Bearer {publisher}"})
                assert answer.status_code == 503 and answer.json()["error"] == "online_key_rotated", answer.text
                assert "restart the server with the online key the root names" in answer.json()["reason"]
            for change in (lambda: publish(registry, tmp_path, "v2"), registry.widen, lambda: registry.rollback("x")):
                with pytest.raises(OnlineKeyRotated, match="is not the key root v2 names for snapshot and timestamp"):
                    change()
            assert timestamp().content == served
        assert caplog.text.count("needs re-signing, and the online key") == 1  # once an hour, not at every request
    finally:
        server.stop()
    assert sorted(p.name for p in meta.iterdir()) == files  # nothing written: no orphan targets, the pinned files intact
    assert publish(PolicyRegistry(reg, load_signer(keys / "online-2.pem"), **held), tmp_path, "v2") == v1 + 1  # restarted


@pytest.mark.parametrize("split", [True, False], ids=["release-key", "online-key-releases"])
def test_robots_update_with_no_refusal_right_after_the_online_key_is_rotated(tmp_path, capsys, split):
    """`rotate --online-key` once published root v2 over metadata signed by the key it took out: every robot counted a
    `signature` refusal at each poll until a server restarted with the new key or `refresh` ran. The ceremony holds the
    new key (it makes it): it re-signs what that key signs (snapshot, timestamp; targets where no release key does)."""
    from fleet.agent.policy import builtin_policy
    from fleet.registry.pull import SignedPolicySource
    from fleet.registry.trust import PolicyTrust

    keys, reg = tmp_path / "keys", tmp_path / "registry"
    assert init(tmp_path, *(["--release-key", str(keys / "release.pem")] if split else [])) == 0
    capsys.readouterr()
    held = {"release": load_signer(keys / "release.pem")} if split else {}
    registry = PolicyRegistry(reg, load_signer(keys / "online.pem"), **held)  # a server that runs on with the old key
    v1 = publish(registry, tmp_path, "v1")
    targets = registry.repo.open("targets").signed.version
    server, robot_token, _ = serve_replica(tmp_path, registry)
    trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
    source = SignedPolicySource(server.url, robot_token, "robot-0", trust, builtin_policy("zero", 1).current(), root=(reg / "tuf" / "metadata" / "root.json").read_bytes())
    try:
        assert source.poll() and source.trust.version == v1
        two = ["--root-key", str(keys / "root-1.pem"), "--root-key", str(keys / "root-3.pem")]
        assert main(["rotate", "--dir", str(reg), *two, "--online-key", str(keys / "online-2.pem")]) == 0
        assert not source.poll() and (source.refusals, source.errors, source.trust.version) == ({}, 0, v1)  # served by the old-key server
        done = json.loads(capsys.readouterr().out)
        assert done["resigned"] == (["snapshot", "timestamp"] if split else ["targets", "snapshot", "timestamp"])
        assert json.loads((source.metadata_dir / "root.json").read_text())["signed"]["version"] == 2
        assert (registry.repo.open("targets").signed.version == targets) is split  # the release key's targets stand
        releaser = PolicyRegistry(reg, load_signer(keys / "online-2.pem"), **held)  # restarted with the new key: nothing left to re-sign
        assert releaser.refresh() == [] and publish(releaser, tmp_path, "v2") == v1 + 1
        assert source.poll() and source.trust.version == v1 + 1 and source.refusals == {}
    finally:
        source.close()
        server.stop()
    assert main(["rotate", "--dir", str(reg), *two, "--threshold", "2"]) == 0  # renewing root: no online key held, nothing re-signed
    assert json.loads(capsys.readouterr().out)["resigned"] == []


def test_a_rotation_whose_re_signing_fails_says_the_root_stands_and_what_to_run(tmp_path, capsys, monkeypatch):
    import fleet.apps.registry_keys as registry_keys

    keys, reg = tmp_path / "keys", tmp_path / "registry"
    assert init(tmp_path) == 0
    publish(PolicyRegistry(reg, load_signer(keys / "online.pem")), tmp_path, "v1")
    capsys.readouterr()

    def unreachable(*args, **kwargs):
        raise OSError("the storage is unreachable")

    monkeypatch.setattr(registry_keys, "resign_rotated", unreachable)
    two = ["--root-key", str(keys / "root-1.pem"), "--root-key", str(keys / "root-3.pem")]
    assert main(["rotate", "--dir", str(reg), *two, "--online-key", str(keys / "online-2.pem")]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["root_version"] == 2 and json.loads(out)["resigned"] is None
    assert "root v2 is published, but re-signing with the new online key failed (OSError: the storage is unreachable)" in err
    assert "flywheel-registry refresh --online-key" in err and "Traceback" not in err
    assert main(["refresh", "--dir", str(reg), "--online-key", str(keys / "online-2.pem")]) == 0  # what it says to run
    assert json.loads(capsys.readouterr().out)["resigned"] == ["targets", "snapshot", "timestamp"]


def test_a_server_reads_a_rotation_made_while_it_ran_before_it_re_signs(tmp_path, caplog, capsys):
    """A server re-signed what was due under the root it had read at start: after `rotate --release-key` it signed
    targets with the online key over the file the rotation pinned, and the releaser then refused the registry."""
    keys, reg = tmp_path / "keys", tmp_path / "registry"
    assert init(tmp_path) == 0
    now = [time.time()]
    replica = PolicyRegistry(reg, load_signer(keys / "online.pem"), clock=lambda: now[0])
    publish(replica, tmp_path, "v1")
    two = ["--root-key", str(keys / "root-1.pem"), "--root-key", str(keys / "root-3.pem")]
    assert main(["rotate", "--dir", str(reg), *two, "--release-key", str(keys / "release.pem")]) == 0
    capsys.readouterr()
    now[0] += 5 * 86400  # targets, snapshot and timestamp past half their life
    with caplog.at_level(logging.WARNING, logger="fleet.registry.tuf_repo"):
        assert replica.refresh() == ["snapshot", "timestamp"]  # targets only by the release key, which root v2 names
    assert "the targets metadata" in caplog.text and "release key" in caplog.text
    releaser = PolicyRegistry(reg, load_signer(keys / "online.pem"), release=load_signer(keys / "release.pem"))
    assert publish(releaser, tmp_path, "v2") == 2


def test_init_refuses_a_release_key_that_is_a_root_key_or_the_online_key(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert init(tmp_path, "--release-key", str(keys / "online.pem")) == 1
    assert "--release-key" in capsys.readouterr().err
    assert init(tmp_path, "--release-key", str(keys / "root-2.pem")) == 1
    assert "its own key file" in capsys.readouterr().err
    assert not (tmp_path / "registry" / "tuf" / "metadata" / "1.root.json").exists()


def test_after_rotating_in_a_release_key_targets_planted_with_the_online_key_are_never_signed_by_the_releaser(tmp_path, capsys):
    """Metadata a rotated-out key signed was accepted by writers as long as any older root named the key, and re-signed
    with the new one: the thief of the online key (still live for snapshot and timestamp) released through the releaser."""
    keys, reg = tmp_path / "keys", tmp_path / "registry"
    assert init(tmp_path) == 0
    publish(PolicyRegistry(reg, load_signer(keys / "online.pem")), tmp_path, "v1")
    two = ["--root-key", str(keys / "root-1.pem"), "--root-key", str(keys / "root-3.pem")]
    assert main(["rotate", "--dir", str(reg), *two, "--release-key", str(keys / "release.pem")]) == 0
    replica = PolicyRegistry(reg, load_signer(keys / "online.pem"))  # the targets published at the rotation: still built on
    plant_release(replica, load_signer(keys / "online.pem"), exported(tmp_path, "evil")[0])
    with pytest.raises(RegistryCorrupted, match="rotated out, and is not the file that was published when it was rotated"):
        PolicyRegistry(reg, load_signer(keys / "online.pem"), release=load_signer(keys / "release.pem"))


def test_a_snapshot_signed_to_point_back_is_not_built_on(tmp_path):
    """The online key can sign a snapshot naming older targets (a canary since rolled back, say): a writer built on it."""
    keys = tmp_path / "keys"
    assert init(tmp_path, "--release-key", str(keys / "release.pem")) == 0
    releaser = open_registry(tmp_path / "registry", keys / "online.pem", release_key=keys / "release.pem")
    publish(releaser, tmp_path, "v1")
    publish(releaser, tmp_path, "v2")
    meta, online = releaser.repo.metadata_dir, load_signer(keys / "online.pem")
    snapshot, timestamp = releaser.repo.open("snapshot"), releaser.repo.open("timestamp")
    snapshot.signed.meta["targets.json"].version -= 1  # the targets of v1's release
    (meta / f"{snapshot.signed.version + 1}.snapshot.json").write_bytes(resign(snapshot, online, version=snapshot.signed.version + 1))
    timestamp.signed.snapshot_meta.version = snapshot.signed.version
    (meta / "timestamp.json").write_bytes(resign(timestamp, online, version=timestamp.signed.version + 1))
    with pytest.raises(RegistryCorrupted, match="the published targets went back"):
        publish(releaser, tmp_path, "v3")


def test_rotate_refuses_a_key_set_by_its_files_before_making_any(tmp_path, capsys):
    keys, reg = tmp_path / "keys", tmp_path / "registry"
    assert init(tmp_path) == 0
    two = ["--root-key", str(keys / "root-1.pem"), "--root-key", str(keys / "root-3.pem")]
    new = ["--new-root-key", str(keys / "n1.pem"), "--new-root-key", str(keys / "n2.pem")]
    assert main(["rotate", "--dir", str(reg), *two, *new, "--release-key", str(keys / "n1.pem")]) == 1
    assert "is also a root key" in capsys.readouterr().err
    assert not (keys / "n1.pem").exists() and not (keys / "n2.pem").exists()  # once made before the refusal


def test_a_version_number_is_never_given_twice(tmp_path):
    """Built on targets pointed back to older ones, a publish reused the number of a release robots had run (they then
    refused the new one as a replay): the number comes from the rollout's history too."""
    keys = tmp_path / "keys"
    assert init(tmp_path, "--release-key", str(keys / "release.pem")) == 0
    releaser = open_registry(tmp_path / "registry", keys / "online.pem", release_key=keys / "release.pem")
    assert publish(releaser, tmp_path, "v1") == 1
    releaser._record({"version": 7, "event": "stable"})  # released once; the published targets no longer list it
    assert publish(releaser, tmp_path, "v8") == 8


def test_a_replica_reads_the_lifetimes_only_where_it_can_sign_what_is_due(tmp_path):
    """A replica without the release key, with targets past half their life, read expiry_s.json at every timestamp
    request (one extra storage GET per robot poll for half of each targets period): nothing it could re-sign was due."""
    keys = tmp_path / "keys"
    assert init(tmp_path, "--release-key", str(keys / "release.pem")) == 0
    publish(open_registry(tmp_path / "registry", keys / "online.pem", release_key=keys / "release.pem"), tmp_path, "v1")
    late = PolicyRegistry(tmp_path / "registry", load_signer(keys / "online.pem"), clock=lambda: time.time() + 4 * 86400.0)
    files, reads = late.repo.files, []
    read = files.read
    files.read = lambda name, *a, **kw: (reads.append(name), read(name, *a, **kw))[1]
    for _ in range(5):
        assert late.refresh() == []  # targets are due, and only the releaser signs them
    assert "expiry_s.json" not in reads
    late.repo.clock = lambda: time.time() + 4.6 * 86400.0  # the timestamp it signs comes due too: it reads, once
    assert late.refresh() == ["timestamp"] and reads.count("expiry_s.json") == 1


def test_a_replica_of_a_registry_not_released_yet_advises_a_refresh_that_works_as_printed(tmp_path, capsys):
    """After ``init --release-key`` no targets exist yet: a replica (online key only) refuses to start and says to run
    ``flywheel-registry refresh``. The command it printed lacked --dir and --online-key, which refresh requires."""
    keys = tmp_path / "keys"
    assert init(tmp_path, "--release-key", str(keys / "release.pem")) == 0
    with pytest.raises(ReleaseKeyMissing, match="has no targets metadata yet") as refused:
        PolicyRegistry(str(tmp_path / "registry"), load_signer(keys / "online.pem"))
    command = re.search(r"`flywheel-registry (refresh [^`]*)`", str(refused.value)).group(1)
    argv = command.replace("ONLINE.pem", str(keys / "online.pem")).replace("RELEASE.pem", str(keys / "release.pem")).split()
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["resigned"] == ["targets", "snapshot", "timestamp"]
    assert not PolicyRegistry(str(tmp_path / "registry"), load_signer(keys / "online.pem")).can_release  # the replica starts
