"""The policy registry on TUF, attacked the way TUF's threat model lists (python-tuf's own client,
a real server on loopback, real files): rollback, freeze, mix-and-match, endless data, arbitrary
software installation, fast-forward, and key compromise with rotation. Each attack is made the way
an attacker in that position could (a compromised mirror rewrites the files the server serves; a
stolen key signs what the attacker likes); the robot must refuse, keep its last good policy and
count why, and recover once the operator has acted."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from fleet.agent.policy import builtin_policy
from fleet.registry.pull import SignedPolicySource
from fleet.registry.signing import load_signer
from fleet.registry.store import PolicyRegistry, root_metadata
from fleet.registry.trust import PolicyTrust
from fleet.registry.tuf_repo import RegistryCorrupted, rotate_keys
from fleet.server.config import ServerConfig
from fleet.server.runner import serve
from fleet.store import StoreConfig
from tests.conftest import forward_get, registry_server
from tests.test_policy_pull_http import SPEC, exported


@pytest.fixture
def fleet(tmp_path):
    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    source = robot(tmp_path, server, token)
    yield registry, source
    source.close()
    server.stop()


@pytest.fixture
def on_v1(tmp_path, fleet):
    """The fleet with v1 released and installed on the robot."""
    registry, source = fleet
    publish(registry, tmp_path, "v1")
    assert source.poll() and source.trust.version == 1
    return registry, source


def robot(tmp_path, server, token) -> SignedPolicySource:
    """A robot pulling from ``server`` (a server handle, or a URL)."""
    trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
    return SignedPolicySource(getattr(server, "url", server), token, "robot-0", trust, builtin_policy("zero", 1).current(), root=root_metadata(tmp_path / "registry"))


def publish(registry, tmp_path, name: str) -> int:
    weights, manifest = exported(tmp_path, name)
    return registry.publish(weights, policy=manifest, **SPEC)["version"]


def metadata(registry, name: str):
    return registry.repo.metadata_dir / name


def stored_weights(registry, version: int):
    """The file the server serves for ``version``'s listed weights."""
    info = registry.repo.target_listing()[f"policies/{version:08d}/weights.safetensors"]
    return registry.repo.targets_dir / "policies" / f"{version:08d}" / f"{info.hashes['sha256']}.weights.safetensors"


def resign(md: Metadata, signer, **changes) -> bytes:
    """What an attacker holding ``signer`` makes of ``md``."""
    for key, value in changes.items():
        setattr(md.signed, key, value)
    md.signatures.clear()
    md.sign(signer)
    return md.to_bytes()


def test_a_new_robot_follows_the_root_chain_and_installs_a_release(tmp_path, fleet):
    registry, source = fleet
    assert not source.poll() and source.current().version == "zero"  # nothing released
    publish(registry, tmp_path, "good")
    assert source.poll() and source.current().version == "1" and source.refusals == {}
    assert not source.poll()  # already running it
    assert (source.metadata_dir / "timestamp.json").exists() and source.frozen_since is None


def test_rollback_attack_replaying_older_metadata_is_refused(tmp_path, fleet):
    registry, source = fleet
    publish(registry, tmp_path, "v1")
    old_timestamp = metadata(registry, "timestamp.json").read_bytes()
    publish(registry, tmp_path, "v2")
    assert source.poll() and source.trust.version == 2
    metadata(registry, "timestamp.json").write_bytes(old_timestamp)  # a mirror serves v1's (validly signed) state
    assert not source.poll()
    assert source.refusals == {"rollback": 1} and source.current().version == "2"


def test_a_robot_clock_days_ahead_is_named_in_its_expiry_refusal_not_taken_for_a_frozen_registry(tmp_path, fleet, monkeypatch, caplog):
    """A robot whose clock ran two days ahead read every fresh timestamp.json as expired and logged 'registry metadata
    refused (freeze...)', the symptom of a replayed or stopped registry, while the fault was its own clock. TUF still
    refuses (expiry is judged by the robot's clock), and the refusal and the status now say how far the clock is off."""
    import datetime as dt
    import types

    registry, source = fleet
    publish(registry, tmp_path, "v1")
    ahead = dt.timedelta(days=2)

    class _Ahead(dt.datetime):  # the robot's wall clock, for TUF's expiry check and the fetcher's Date reading
        @classmethod
        def now(cls, tz=None):
            return dt.datetime.now(tz) + ahead

    monkeypatch.setattr("tuf.ngclient._internal.trusted_metadata_set.datetime", types.SimpleNamespace(datetime=_Ahead, timezone=dt.timezone))
    monkeypatch.setattr("fleet.registry.fetcher.time", types.SimpleNamespace(time=lambda: time.time() + ahead.total_seconds()))
    with caplog.at_level(logging.WARNING, logger="fleet.registry.pull"):
        assert not source.poll() and source.refusals == {"freeze": 1} and source.current().version == "zero"
    assert abs(source.status()["clock_ahead_s"] - 172_800) <= 2
    assert "freeze" in caplog.text and "this robot's clock is 1728" in caplog.text and "s ahead of the registry server's" in caplog.text
    monkeypatch.undo()  # NTP set the clock: the next poll installs the release
    assert source.poll() and source.current().version == "1" and abs(source.status()["clock_ahead_s"]) <= 2


def test_a_robot_that_sends_no_token_to_a_fleet_servers_registry_is_told_why_it_is_refused(tmp_path, caplog):
    """A two-model fleet: a robot uploading to one server and pulling from another server's registry sends that one no
    token (registry_token), and every poll logged a bare 'HTTP 401; keeping zero'."""
    registry, _, server = registry_server(tmp_path, "robot", "robot-0")
    source = robot(tmp_path, server, None)
    try:
        publish(registry, tmp_path, "v1")
        with caplog.at_level(logging.WARNING, logger="fleet.registry.pull"):
            assert not source.poll() and source.errors == 1
        assert "401" in caplog.text and "this robot sends its token only to the fleet server it uploads to" in caplog.text
    finally:
        source.close()
        server.stop()


def test_the_clock_offset_reads_a_cached_answer_by_its_age_and_names_only_a_clock_ahead():
    """Behind a cache that held the answers 900 s (its Date the origin's, Age 900), a robot with a right clock was told it
    ran 900 s ahead; a clock behind (which makes nothing look expired) was named too."""
    import email.utils
    import types

    from fleet.registry.fetcher import TokenFetcher
    from fleet.registry.pull import SignedPolicySource

    fetcher = TokenFetcher(httpx.Client())
    # (the Date header's offset from this clock in s, the Age header, the offset expected: None is "not read")
    for served, age, ahead in ((-900, "900", 0), (-900, None, 900), (600, None, -600), (0, "junk", None), (0, "-5", None)):
        fetcher.clock_ahead_s = None
        headers = {"date": email.utils.formatdate(time.time() + served, usegmt=True), **({"age": age} if age else {})}
        fetcher._note_server_clock(httpx.Response(200, headers=headers))
        assert (fetcher.clock_ahead_s is None) if ahead is None else abs(fetcher.clock_ahead_s - ahead) <= 2
    note = lambda ahead_s: SignedPolicySource._clock_note(types.SimpleNamespace(_fetcher=types.SimpleNamespace(clock_ahead_s=ahead_s)))  # noqa: E731
    assert note(-600.0) == "" and note(299.0) == "" and note(None) == "" and "clock is 900 s ahead" in note(900.0)


def test_a_frozen_registry_is_noticed_on_the_running_version_and_nothing_good_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("fleet.registry.tuf_repo.MIN_EXPIRY_S", 1.0)  # a 3 s timestamp, for a robot's real clock to see expire
    registry, token, server = registry_server(tmp_path, "robot", "robot-0", expiry_s={"timestamp": 3.0})
    source = robot(tmp_path, server, token)
    try:
        publish(registry, tmp_path, "v1")
        assert source.poll() and source.frozen_since is None
        registry.refresh = lambda: []  # the mirror stops following: it serves the last timestamp forever
        time.sleep(4.1)
        assert not source.poll()
        assert source.refusals == {"freeze": 1} and source.frozen_since is not None
        assert source.current().version == "1" and source.refusals == {"freeze": 2}  # it keeps running what it trusts (current() polled once more)
        del registry.refresh  # the registry signs again
        assert not source.poll() and source.frozen_since is None and source.refusals == {"freeze": 2}
        publish(registry, tmp_path, "v2")
        assert source.poll() and source.current().version == "2"
    finally:
        source.close()
        server.stop()


class Blockable(http.server.BaseHTTPRequestHandler):
    """Forwards GETs to ``upstream`` (the flywheel server) while ``block`` is None; else answers every request as a
    registry blocked by an attacker or an outage would: "503", "drop" (the connection closed, no answer) or "garbage"."""

    upstream: httpx.Client
    block: str | None = None

    def do_GET(self):
        if self.block == "drop":
            self.close_connection = True
            return
        if self.block is None:
            answer = forward_get(self, self.upstream)
            status, body, etag = answer.status_code, answer.content, answer.headers.get("etag")
        else:
            status, body, etag = (503, b"", None) if self.block == "503" else (200, b"<html>not TUF metadata</html>", None)
        self.send_response(status)
        if etag is not None:
            self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("block", ["503", "drop", "garbage"])
def test_a_blocked_registry_is_reported_frozen_once_the_metadata_the_robot_trusts_has_expired(tmp_path, block):
    """Only TUF's expiry refusal set registry_frozen_since, which a replayed timestamp gets: a registry blocked instead
    (503s, dropped connections, garbage) past the trusted timestamp's expiry showed nothing but pull_errors. The
    robot's trusted timestamp is made expired here (re-signed with the online key, as if its life had run out)
    rather than waited out."""
    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    upstream = httpx.Client(base_url=server.url)
    host = type("Host", (Blockable,), {"upstream": upstream})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), host)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    source = robot(tmp_path, f"http://127.0.0.1:{httpd.server_address[1]}", token)
    failed = lambda: source.errors + sum(source.refusals.values())  # noqa: E731 - garbage is a `malformed` refusal, the rest pull errors
    try:
        publish(registry, tmp_path, "v1")
        assert source.poll() and source.frozen_since is None
        host.block = block
        assert not source.poll() and failed() == 1 and source.frozen_since is None  # blocked, but what it trusts is fresh: no freeze
        trusted = source.metadata_dir / "timestamp.json"
        expired = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=1)
        trusted.write_bytes(resign(Metadata.from_bytes(trusted.read_bytes()), load_signer(tmp_path / "keys" / "online.pem"), expires=expired))
        before = time.time()
        assert not source.poll() and failed() == 2 and before <= source.frozen_since <= time.time()
        assert "freeze" not in source.refusals  # nothing was refused for being expired: the registry was not reached
        since = source.frozen_since
        assert not source.poll() and source.frozen_since == since and source.current().version == "1"  # since the first poll that saw it
        host.block = None  # unblocked: a fresh timestamp clears it
        publish(registry, tmp_path, "v2")
        assert source.poll() and source.frozen_since is None and source.current().version == "2"
    finally:
        source.close()
        httpd.shutdown()
        httpd.server_close()
        upstream.close()
        server.stop()


def test_a_shorter_expiry_is_signed_at_the_restart_not_at_the_next_release(tmp_path, monkeypatch):
    """Lowering fleet.registry.expiry_s and restarting left the metadata signed for the longer life served until the
    next release: a mirror replaying it could hold robots a day where the operator had asked for a minute."""
    from fleet.registry.store import open_registry

    monkeypatch.setattr("fleet.registry.tuf_repo.MIN_EXPIRY_S", 1.0)  # a one-minute timestamp
    publish(open_registry(tmp_path / "registry", tmp_path / "keys" / "online.pem", root_keys=[tmp_path / "keys" / f"root-{i}.pem" for i in (1, 2, 3)]), tmp_path, "v1")
    shorter = {"timestamp": 60.0, "snapshot": 3600.0, "targets": 7200.0}  # the defaults: 1 day, 7 days, 7 days
    registry, token, server = registry_server(tmp_path, "robot", "robot-0", expiry_s=shorter)  # the restart
    try:
        answer = httpx.get(f"{server.url}/v1/tuf/metadata/timestamp.json", headers={"authorization": f"Bearer {token}"})
        assert datetime.fromisoformat(answer.json()["signed"]["expires"]).timestamp() <= time.time() + shorter["timestamp"]
        for role, life in shorter.items():
            assert registry.repo.open(role).signed.expires.timestamp() <= time.time() + life, role
        assert registry.refresh() == []  # then re-signed only as it ages
    finally:
        server.stop()


def test_mix_and_match_of_metadata_and_of_bodies_is_refused(tmp_path, on_v1):
    registry, source = on_v1
    v1_targets = registry.repo.snapshot().meta["targets.json"].version
    publish(registry, tmp_path, "v2")
    current = registry.repo.snapshot().meta["targets.json"].version
    kept = metadata(registry, f"{current}.targets.json").read_bytes()
    (metadata(registry, f"{current}.targets.json")).write_bytes(metadata(registry, f"{v1_targets}.targets.json").read_bytes())
    assert not source.poll()  # the snapshot names targets v{current}: an older one under its name is refused
    assert source.refusals == {"rollback": 1} and source.trust.version == 1
    with pytest.raises(RegistryCorrupted, match="holds targets v"):  # nor does the registry build on it (it once re-signed it)
        publish(registry, tmp_path, "v3")
    metadata(registry, f"{current}.targets.json").write_bytes(kept)  # the operator restores the file
    weights, manifest = exported(tmp_path, "ant")
    manifest = {**manifest, "robot_model": "ant"}  # a release for another body (of the same sizes)
    registry.publish(weights, policy=manifest, **{**SPEC, "robot_model": "ant"}, spec_change=True)  # past the registry's own check
    assert not source.poll() and source.refusals["spec"] == 1 and source.trust.version == 1


def test_endless_data_is_cut_at_the_length_tuf_expects(tmp_path, on_v1):
    registry, source = on_v1
    publish(registry, tmp_path, "v2")
    path = stored_weights(registry, 2)
    path.write_bytes(path.read_bytes() + b"\0" * (64 << 20))  # 64 MiB more than listed
    assert not source.poll() and source.refusals == {"size": 1} and source.trust.version == 1
    metadata(registry, "timestamp.json").write_bytes(b"{" * (1 << 20))  # an endless timestamp
    assert not source.poll() and source.refusals == {"size": 2}


def test_arbitrary_software_is_not_installed(tmp_path, on_v1):
    registry, source = on_v1
    publish(registry, tmp_path, "v2")
    path = stored_weights(registry, 2)
    evil = bytearray(path.read_bytes())
    evil[-1] ^= 0xFF  # same length, other bytes
    path.write_bytes(bytes(evil))
    assert not source.poll() and source.refusals == {"hash": 1} and source.trust.version == 1
    # an attacker without the online key signs newer metadata of its own
    attacker = load_signer(tmp_path / "attacker.pem", create=True)
    forged = Metadata[Timestamp].from_bytes(metadata(registry, "timestamp.json").read_bytes())
    metadata(registry, "timestamp.json").write_bytes(resign(forged, attacker, version=forged.signed.version + 1))
    assert not source.poll() and source.refusals == {"hash": 1, "signature": 1} and source.current().version == "1"


def test_fast_forward_with_a_stolen_online_key_is_undone_by_rotating_it(tmp_path):
    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    source = robot(tmp_path, server, token)
    publish(registry, tmp_path, "v1")
    assert source.poll()
    legit = metadata(registry, "timestamp.json").read_bytes()
    stolen = load_signer(tmp_path / "keys" / "online.pem")
    far = Metadata[Timestamp].from_bytes(legit)
    metadata(registry, "timestamp.json").write_bytes(resign(far, stolen, version=10**9))
    assert not source.poll() and source.refusals == {}  # validly signed: the robot now trusts timestamp v1e9
    metadata(registry, "timestamp.json").write_bytes(legit)  # the operator restores the server ...
    assert not source.poll() and source.refusals == {"rollback": 1}  # ... but the robot is stuck ahead
    server.stop()
    source.close()
    # the operator rotates the online key with two of the three offline root keys, and restarts the server with it
    roots = [load_signer(tmp_path / "keys" / f"root-{i}.pem") for i in (1, 3)]
    assert rotate_keys(registry.root / "tuf", roots, online_key=load_signer(tmp_path / "keys" / "online-2.pem", create=True).public_key).version == 2
    registry = PolicyRegistry(registry.root, load_signer(tmp_path / "keys" / "online-2.pem"))
    server = serve(ServerConfig(port=0, token_file=str(tmp_path / "tokens.json")), StoreConfig(path=str(tmp_path / "store")), policy_registry=registry)
    source = robot(tmp_path, server, token)  # the robot reconnects (its trust state and TUF metadata kept)
    try:
        publish(registry, tmp_path, "v2")
        assert source.poll() and source.current().version == "2"  # root v2 made it drop timestamp v1e9
        assert json.loads((source.metadata_dir / "root.json").read_text())["signed"]["version"] == 2
        # the stolen key is worth nothing now
        ts = Metadata[Timestamp].from_bytes(metadata(registry, "timestamp.json").read_bytes())
        metadata(registry, "timestamp.json").write_bytes(resign(ts, stolen, version=ts.signed.version + 1))
        assert not source.poll() and source.refusals == {"signature": 1} and source.trust.version == 2  # (a restarted robot counts afresh)
    finally:
        source.close()
        server.stop()


def test_one_stolen_root_key_cannot_make_a_root(tmp_path, on_v1):
    registry, source = on_v1
    thief = load_signer(tmp_path / "keys" / "root-2.pem")
    attacker = load_signer(tmp_path / "attacker.pem", create=True)
    root = Metadata[Root].from_bytes(metadata(registry, "1.root.json").read_bytes())
    for role in (Targets.type, Snapshot.type, Timestamp.type):
        for keyid in list(root.signed.roles[role].keyids):
            root.signed.revoke_key(keyid, role)
        root.signed.add_key(attacker.public_key, role)
    root.signed.expires = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=30)
    metadata(registry, "2.root.json").write_bytes(resign(root, thief, version=2))  # 1 of the 2 signatures root needs
    assert not source.poll() and source.refusals == {"signature": 1} and source.current().version == "1"
    with pytest.raises(RegistryCorrupted, match="2.root.json is not signed by a threshold of root v1's keys"):
        rotate_keys(registry.root / "tuf", [thief], online_key=attacker.public_key)  # the registry's own tools refuse it too
    metadata(registry, "2.root.json").unlink()
    with pytest.raises(UnsignedMetadataError, match="signed by 1/2"):
        rotate_keys(registry.root / "tuf", [thief], online_key=attacker.public_key)  # and one root key does not make one


def test_a_registry_of_the_earlier_layout_is_imported_with_its_versions(tmp_path):
    from fleet.registry.manifest import build_manifest
    from fleet.registry.signing import canonical_json
    from fleet.registry.store import open_registry

    old = tmp_path / "registry"
    for version in (1, 2):  # the pre-TUF layout: signed envelopes and weights per version, rollout.json
        folder = old / "versions" / f"{version:08d}"
        folder.mkdir(parents=True)
        weights = f"weights-{version}".encode()
        manifest = build_manifest(version=version, weights=weights, **SPEC)
        (folder / "manifest.json").write_bytes(canonical_json({"manifest": manifest, "signature": "", "key_id": ""}))
        (folder / "weights.safetensors").write_bytes(weights)
    history = [{"version": 1, "event": "stable", "at": 1.0}, {"version": 2, "event": "canary", "at": 2.0}]
    (old / "rollout.json").write_bytes(canonical_json({"stable": 1, "canary": 2, "cohort": ["robot-0"], "history": history}))
    keys = tmp_path / "keys"
    registry = open_registry(old, keys / "online.pem", root_keys=[keys / f"root-{i}.pem" for i in (1, 2, 3)])
    assert registry.versions() == [1, 2] and registry.weights(2) == b"weights-2"
    assert registry.latest_for("robot-0")["version"] == 2 and registry.latest_for("robot-1")["version"] == 1
    assert [h["event"] for h in registry.rollout()["history"]] == ["imported", "stable", "canary"]
    assert not (old / "versions").exists() and (old / "legacy" / "versions").is_dir()
    assert registry.widen() == 2 and registry.publish(b"w3", **SPEC)["version"] == 3  # numbering goes on
    reopened = open_registry(old, keys / "online.pem")  # imported once
    assert reopened.versions() == [1, 2, 3] and reopened.rollout()["stable"] == 3


def test_the_listing_keeps_the_newest_versions_and_the_ones_robots_run(tmp_path):
    from fleet.registry.store import KEEP_VERSIONS, open_registry

    keys = tmp_path / "keys"
    registry = open_registry(tmp_path / "registry", keys / "online.pem", root_keys=[keys / "root.pem"], root_threshold=1)
    registry.publish(b"stable", **SPEC)
    for i in range(KEEP_VERSIONS + 3):
        registry.publish(f"canary-{i}".encode(), cohort=["robot-0"], **SPEC)
    listed = registry.versions()
    assert listed[0] == 1 and listed[1:] == list(range(5, KEEP_VERSIONS + 5))  # v1 is stable; v2-v4 left the listing
    assert registry.weights(1) == b"stable"
    assert len(list((registry.repo.metadata_dir).glob("*.targets.json"))) <= 16  # old metadata is pruned too


def test_key_ceremonies_with_flywheel_registry_and_a_server_that_checks_its_key(tmp_path, capsys):
    from fleet.apps.registry_keys import main
    from fleet.registry.store import RegistryError, open_registry
    from fleet.registry.tuf_repo import RepositoryNotInitialised

    reg, keys = tmp_path / "registry", tmp_path / "keys"
    roots = [arg for i in (1, 2, 3) for arg in ("--root-key", str(keys / f"root-{i}.pem"))]
    assert main(["init", "--dir", str(reg), *roots, "--threshold", "2", "--online-key", str(keys / "online.pem")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["root_version"] == 1 and shown["roles"]["root"]["threshold"] == 2 and len(shown["roles"]["root"]["keyids"]) == 3
    provisioned = (reg / "tuf" / "metadata" / "root.json").read_bytes()  # what a robot gets at this point
    with pytest.raises(RegistryError, match="is not the key root v1 names"):
        open_registry(reg, keys / "stranger.pem")
    with pytest.raises(RepositoryNotInitialised, match="flywheel-registry init"):
        open_registry(tmp_path / "empty", tmp_path / "new-keys" / "online.pem")  # no root, no root keys given: says what to do
    assert not (tmp_path / "new-keys").exists() and not (tmp_path / "empty").exists()  # and makes no key or folder for it
    one = ["--root-key", str(keys / "root-1.pem")]
    assert main(["rotate", "--dir", str(reg), *one, "--online-key", str(keys / "online-2.pem")]) == 1  # 1 of 2
    assert "signed by 1/2" in capsys.readouterr().err
    stranger = [*one, "--root-key", str(keys / "stranger.pem")]  # a key the root does not name: said so, not "signed by 1/2"
    assert main(["rotate", "--dir", str(reg), *stranger, "--online-key", str(keys / "online-2.pem")]) == 1
    assert "1 of the 2 root keys given" in (err := capsys.readouterr().err) and "are not keys of root v1" in err, err
    two = [*one, "--root-key", str(keys / "root-3.pem")]
    assert main(["rotate", "--dir", str(reg), *two, "--online-key", str(keys / "online-2.pem")]) == 0
    assert main(["show", "--dir", str(reg)]) == 0 and '"root_version": 2' in capsys.readouterr().out
    registry = open_registry(reg, keys / "online-2.pem")
    weights, manifest = exported(tmp_path, "v1")
    registry.publish(weights, policy=manifest, **SPEC)
    tokens = tmp_path / "tokens.json"
    from fleet.server.auth import add_token

    token = add_token(tokens, "robot", "robot-0")
    server = serve(ServerConfig(port=0, token_file=str(tokens)), StoreConfig(path=str(tmp_path / "store")), policy_registry=registry)
    trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
    source = SignedPolicySource(server.url, token, "robot-0", trust, builtin_policy("zero", 1).current(), root=provisioned)
    try:
        assert source.poll() and source.current().version == "1" and source.refusals == {}  # from root v1 through v2
    finally:
        source.close()
        server.stop()


def test_a_ceremony_refuses_key_sets_that_weaken_the_root_before_making_anything(tmp_path, capsys):
    """init once took --threshold 0 as 2, an online key that is also a root key (a stolen server would bring a root key),
    and the same root key twice ("signed by 1/2", an empty registry left behind); rotate took --threshold 0 as absent."""
    from fleet.apps.registry_keys import main
    from fleet.registry.signing import load_signer
    from fleet.registry.tuf_repo import init_root

    reg, keys = tmp_path / "registry", tmp_path / "keys"
    r1, r2, online = (str(keys / n) for n in ("r1.pem", "r2.pem", "online.pem"))
    for argv, reason in (
        (["--root-key", r1, "--root-key", r2, "--threshold", "0", "--online-key", online], "--threshold 0: it must be 1..2"),
        (["--root-key", r1, "--root-key", r2, "--threshold", "3", "--online-key", online], "--threshold 3: it must be 1..2"),
        (["--root-key", r1, "--root-key", online, "--online-key", online], "is also a --root-key"),
        (["--root-key", r1, "--root-key", r1, "--online-key", online], "is given twice"),
    ):
        assert main(["init", "--dir", str(reg), *argv]) == 1 and reason in capsys.readouterr().err, argv
        assert not reg.exists() and not keys.exists()  # nothing made: no registry, no key files
    same = load_signer(tmp_path / "k.pem", create=True)
    for signers, online_key, reason in (([same, same], load_signer(online, create=True).public_key, "same root key is given twice"), ([same], same.public_key, "also a root key")):
        with pytest.raises(ValueError, match=reason):  # the library checks the keys themselves (one key under two file names)
            init_root(reg / "tuf", signers, 1, online_key)
    assert not reg.exists()
    assert main(["init", "--dir", str(reg), "--root-key", r1, "--root-key", r2, "--online-key", online]) == 0
    capsys.readouterr()
    assert main(["rotate", "--dir", str(reg), "--root-key", r1, "--root-key", r2, "--threshold", "0"]) == 1
    assert "root threshold 0: it must be 1..2" in capsys.readouterr().err  # once: "rotate needs ... --threshold"
    assert main(["rotate", "--dir", str(reg), "--root-key", r1, "--root-key", r2, "--online-key", r1]) == 1
    assert "also a root key" in capsys.readouterr().err


def test_a_ceremony_that_fails_makes_no_key_file(tmp_path, capsys):
    """`rotate` with 1 of the 2 root keys it needs exited 1 ("signed by 1/2") with the new online key already made: a
    private key no root names. So did a rotation to a threshold past its new root keys, one of a registry with no root
    (a wrong --dir), and `init` of a registry that has one."""
    from fleet.apps.registry_keys import main

    reg, keys = tmp_path / "registry", tmp_path / "keys"
    roots = [arg for i in (1, 2, 3) for arg in ("--root-key", str(keys / f"root-{i}.pem"))]
    assert main(["init", "--dir", str(reg), *roots, "--threshold", "2", "--online-key", str(keys / "online.pem")]) == 0
    made = sorted(keys.iterdir())
    one, two = roots[:2], roots[:4]
    for argv, reason in (
        (["rotate", "--dir", str(reg), *one, "--online-key", str(keys / "online-2.pem")], "signed by 1/2"),
        (["rotate", "--dir", str(reg), *roots[:2], *roots[:2], "--online-key", str(keys / "online-2.pem")], "signed by 1/2"),  # one key twice
        (["rotate", "--dir", str(reg), *two, "--new-root-key", str(keys / "n1.pem"), "--new-root-key", str(keys / "n2.pem"), "--threshold", "3"], "root threshold 3: it must be 1..2"),
        (["rotate", "--dir", str(reg), *two, "--new-root-key", str(keys / "n1.pem")], "root threshold 2: it must be 1..1"),  # the threshold stays
        (["rotate", "--dir", str(tmp_path / "elsewhere"), *two, "--online-key", str(keys / "online-2.pem")], "no root metadata"),
        (["init", "--dir", str(reg), "--root-key", str(keys / "x1.pem"), "--root-key", str(keys / "x2.pem"), "--online-key", str(keys / "online-x.pem")], "already has root metadata"),
    ):
        assert main(argv) == 1 and reason in (err := capsys.readouterr().err), (argv, err)
        assert sorted(keys.iterdir()) == made, argv  # no key file made
    assert main(["show", "--dir", str(reg)]) == 0 and '"root_version": 1' in capsys.readouterr().out


def test_signed_but_nonsense_release_targets_are_refused_not_crashed_on(tmp_path, fleet, caplog):
    from fleet.registry.manifest import ROLLOUT_TARGET

    registry, source = fleet
    publish(registry, tmp_path, "v1")
    assert source.poll()
    for rollout in (b'{"stable": "2"}', b'{"stable": true}', b"[1]", b"not json", b'{"stable": 9}'):  # a buggy publisher, validly signed
        registry.repo.publish_targets({ROLLOUT_TARGET: registry.repo.store_target(ROLLOUT_TARGET, rollout)})
        assert not source.poll() and source.current().version == "1"
    assert source.refusals["malformed"] >= 5 and source.errors == 0
    for rollout in (b'{"stable": 1e999}', b'{"stable": NaN}', b'{"stable": 2, "stable": 1}'):  # read by the rule the server reads by
        registry.repo.publish_targets({ROLLOUT_TARGET: registry.repo.store_target(ROLLOUT_TARGET, rollout)})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fleet.registry.pull"):
            assert not source.poll()
        assert "the rollout is not JSON" in caplog.text, (rollout, caplog.text)
    source.trust.refusals.clear()
    publish(registry, tmp_path, "v2")
    for cohort in (5, "xrobot-0x", ["robot-0", 1]):  # a number raised TypeError out of every poll; a string matched substrings
        rollout = json.dumps({"stable": 1, "canary": 2, "cohort": cohort}).encode()
        registry.repo.publish_targets({ROLLOUT_TARGET: registry.repo.store_target(ROLLOUT_TARGET, rollout)})
        assert not source.poll() and source.current().version == "1"
    assert source.refusals == {"malformed": 6} and source.errors == 0  # poll() and current() each polled (poll_interval_s 0)


def test_weights_listed_over_the_robots_limit_are_refused_before_a_byte_is_fetched(tmp_path, on_v1):
    """A target signed at 50 GiB (a holder of the online key) was fetched and its partial kept and resumed at every
    poll: 119 -> 239 -> 361 MiB of the robot's disk over three polls."""
    registry, source = on_v1
    source.max_weights_bytes = 100  # the default is 256 MiB, the server's publish limit
    publish(registry, tmp_path, "v2")
    assert not source.poll() and source.refusals == {"size": 1} and source.current().version == "1"
    assert not list(source.targets_dir.rglob("*weights*"))  # not a byte of them fetched (the rollout and manifest were)


def test_a_robot_given_no_or_bad_root_metadata_says_what_to_provision(tmp_path):
    trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
    for root, message in ((None, "provision this robot"), (b'{"signed": {}}', "not valid TUF root metadata")):
        with pytest.raises(ValueError, match=message):
            SignedPolicySource("http://127.0.0.1:9", "t", "robot-0", trust, builtin_policy("zero", 1).current(), root=root)


def test_flywheel_registry_refresh_re_signs_a_statically_hosted_registry(tmp_path, capsys):
    """Nothing answers timestamp requests under static hosting: `flywheel-registry refresh` re-signs
    what is past half its life (here a 10-minute timestamp, the registry's setting), then nothing more."""
    from fleet.apps.registry_keys import main
    from fleet.registry.store import open_registry

    reg, keys = tmp_path / "registry", tmp_path / "keys"
    roots = [keys / f"root-{i}.pem" for i in (1, 2, 3)]
    open_registry(reg, keys / "online.pem", root_keys=roots, expiry_s={"timestamp": 600})
    registry = PolicyRegistry(reg, load_signer(keys / "online.pem"), clock=lambda: time.time() - 400)  # published 400 s ago: past half its life
    weights, manifest = exported(tmp_path, "v1")
    registry.publish(weights, policy=manifest, **SPEC)
    before = json.loads((reg / "tuf" / "metadata" / "timestamp.json").read_text())["signed"]
    assert main(["refresh", "--dir", str(reg), "--online-key", str(keys / "online.pem")]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["resigned"] == ["timestamp"] and done["versions"]["timestamp"] == before["version"] + 1
    assert before["expires"] < done["timestamp_expires"] and datetime.fromisoformat(done["timestamp_expires"]).timestamp() <= time.time() + 600  # 600 s again
    assert main(["refresh", "--dir", str(reg), "--online-key", str(keys / "online.pem")]) == 0
    assert json.loads(capsys.readouterr().out)["resigned"] == []
    assert main(["refresh", "--dir", str(reg), "--online-key", str(keys / "stranger.pem")]) == 1  # never made up
    assert "cannot read the private key" in capsys.readouterr().err
    load_signer(keys / "stranger.pem", create=True)
    assert main(["refresh", "--dir", str(reg), "--online-key", str(keys / "stranger.pem")]) == 1
    assert "is not the key root v1 names" in capsys.readouterr().err


def test_refresh_signs_with_the_lifetimes_the_registry_was_configured_with(tmp_path, capsys):
    """`flywheel-registry refresh` once signed with the default lives: the hourly cron of a static registry put a 1 h
    timestamp back to 1 day, and cut a 14-day targets life to 7 days (and re-signed the releaser's output at once)."""
    from fleet.apps.registry_keys import main
    from fleet.registry.store import open_registry

    reg, keys = tmp_path / "registry", tmp_path / "keys"
    lives = {"timestamp": 3600, "targets": 14 * 86400}
    registry = open_registry(reg, keys / "online.pem", root_keys=[keys / f"root-{i}.pem" for i in (1, 2, 3)], expiry_s=lives)  # the releaser
    publish(registry, tmp_path, "v1")
    published = {role: registry.repo.open(role).signed for role in ("timestamp", "targets")}
    refresh = ["refresh", "--dir", str(reg), "--online-key", str(keys / "online.pem")]
    assert main(refresh) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["resigned"] == [] and done["expiry_s"] == {"root": 365 * 86400, "snapshot": 7 * 86400, **lives}
    assert done["timestamp_expires"] == published["timestamp"].expires.isoformat()
    # due 40 minutes on (past half of the hour): re-signed for an hour, targets left with their 14 days
    later = PolicyRegistry(reg, load_signer(keys / "online.pem"), clock=lambda: time.time() + 2400)  # a signer with no setting: re-signs at its start
    assert later.repo.open("timestamp").signed.version == published["timestamp"].version + 1 and later.refresh() == []
    assert later.repo.open("timestamp").signed.expires.timestamp() <= time.time() + 2400 + 3600 + 1
    assert later.repo.open("targets").signed == published["targets"]
    # the setting is the registry's: refresh --expiry-s records it for every signer (roles not named keep what was recorded)
    assert main([*refresh, "--expiry-s", "timestamp=600"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["resigned"] == ["timestamp"] and done["expiry_s"]["targets"] == 14 * 86400  # the releaser's 14 days stay
    assert datetime.fromisoformat(done["timestamp_expires"]).timestamp() <= time.time() + 600
    assert PolicyRegistry(reg, load_signer(keys / "online.pem")).repo.expiry_s["timestamp"] == 600
    for bad in ("timestmp=600", "timestamp=0", "timestamp=0.001", "timestamp=1e300", "timestamp=nan", "timestamp"):
        assert main([*refresh, "--expiry-s", bad]) == 1
        assert "--expiry-s" in (err := capsys.readouterr().err) and "Traceback" not in err, err
    (reg / "tuf" / "expiry_s.json").write_text('{"timestamp": -1}')  # written by someone else
    assert main(refresh) == 1 and "expiry_s.json is not the registry's role lifetimes" in capsys.readouterr().err


def test_signers_with_other_lifetimes_follow_the_registrys_and_never_re_sign_each_others_output(tmp_path, caplog):
    """Each signer once signed with its own expiry_s and re-signed what another signed for another life (a 1 h replica
    cut the 1-day timestamp of a replica with the default, which re-signed it as soon as it had less than half a day):
    every timestamp request flipped it. The lives are the registry's now: the last setting recorded, which every signer follows."""
    from fleet.registry.store import open_registry

    reg, keys = tmp_path / "registry", tmp_path / "keys"
    a = open_registry(reg, keys / "online.pem", root_keys=[keys / f"root-{i}.pem" for i in (1, 2, 3)], expiry_s={"timestamp": 3600})
    publish(a, tmp_path, "v1")
    with caplog.at_level(logging.WARNING, logger="fleet.registry.tuf_repo"):
        b = PolicyRegistry(reg, load_signer(keys / "online.pem"), expiry_s={"timestamp": 86400})  # started later, set otherwise
        assert "lifetimes change" in caplog.text  # it says that it changed them for every signer
        signed = b.repo.open("timestamp").signed  # 1 h left of 1 day: re-signed for a day at its start, once
        assert signed.expires.timestamp() > time.time() + 86000
        for _ in range(3):
            assert a.refresh() == [] and b.refresh() == []
        assert a.repo.open("timestamp").signed == signed and a.repo.expiry_s["timestamp"] == 86400
    assert caplog.text.count("signing with the registry's") == 1  # a says once that its own setting is not what it signs with


def test_a_signer_records_only_the_roles_it_names(tmp_path, caplog):
    """record_expiry recorded {**defaults, **setting}: a releaser with {targets: 14 d, timestamp: 1 h} and replicas with
    {timestamp: 1 h} flipped the registry's targets life between 14 and 7 days at every restart. A signer records the
    roles it names now, and the others keep what was recorded."""
    from fleet.registry.store import open_registry

    reg, keys = tmp_path / "registry", tmp_path / "keys"
    releaser_lives = {"targets": 14 * 86400, "timestamp": 3600}
    releaser = open_registry(reg, keys / "online.pem", root_keys=[keys / f"root-{i}.pem" for i in (1, 2, 3)], expiry_s=releaser_lives)
    publish(releaser, tmp_path, "v1")
    targets = releaser.repo.open("targets").signed
    with caplog.at_level(logging.WARNING, logger="fleet.registry.tuf_repo"):
        for _ in range(2):  # restarts of the replica and the releaser, in turn
            replica = PolicyRegistry(reg, load_signer(keys / "online.pem"), expiry_s={"timestamp": 3600})
            assert replica.repo.expiry_s["targets"] == 14 * 86400 and replica.refresh() == []
            releaser = PolicyRegistry(reg, load_signer(keys / "online.pem"), expiry_s=releaser_lives)
            assert releaser.refresh() == []
    assert "lifetimes change" not in caplog.text and "signing with the registry's" not in caplog.text
    assert json.loads((reg / "tuf" / "expiry_s.json").read_text()) == releaser_lives
    assert releaser.repo.open("targets").signed == targets  # never re-signed for another life


def test_a_role_life_out_of_bounds_is_refused_and_a_recorded_one_is_a_corrupt_record(tmp_path):
    """check_expiry_s had no bounds: a recorded timestamp=1e300 raised OverflowError in PolicyRegistry() (every timestamp
    request failed), and 0.001 s was accepted (metadata signed already expired)."""
    from fleet.registry.store import open_registry
    from fleet.registry.tuf_repo import MAX_EXPIRY_S, MIN_EXPIRY_S, check_expiry_s

    assert check_expiry_s({"timestamp": MIN_EXPIRY_S, "root": MAX_EXPIRY_S}) == {"timestamp": MIN_EXPIRY_S, "root": MAX_EXPIRY_S}
    for life in (0.001, MIN_EXPIRY_S - 1, MAX_EXPIRY_S + 1, 1e300):
        with pytest.raises(ValueError, match="a role's life is a number of seconds from 300"):
            check_expiry_s({"timestamp": life})
    reg, keys = tmp_path / "registry", tmp_path / "keys"
    with pytest.raises(ValueError, match="expiry_s timestamp=0.001"):
        open_registry(reg, keys / "online.pem", root_keys=[keys / f"root-{i}.pem" for i in (1, 2, 3)], expiry_s={"timestamp": 0.001})
    publish(open_registry(reg, keys / "online.pem", root_keys=[keys / f"root-{i}.pem" for i in (1, 2, 3)]), tmp_path, "v1")
    for record in ('{"timestamp": 1e300}', '{"timestamp": 0.001}'):
        (reg / "tuf" / "expiry_s.json").write_text(record)
        with pytest.raises(RegistryCorrupted, match="expiry_s.json is not the registry's role lifetimes"):
            PolicyRegistry(reg, load_signer(keys / "online.pem"))


def test_show_on_a_mistyped_folder_says_there_is_no_root_and_writes_nothing(tmp_path, capsys):
    """`flywheel-registry show --dir <typo>` made <typo>/tuf/metadata and <typo>/tuf/targets (a read-only command
    wrote; on a read-only location it failed with PermissionError instead of saying there is no root)."""
    from fleet.apps.registry_keys import main

    assert main(["show", "--dir", str(tmp_path / "typo")]) == 1
    assert "has no root metadata" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_a_corrupt_expiry_record_never_blocks_a_ceremony_and_a_full_setting_overwrites_it(tmp_path, capsys, caplog):
    """A corrupt expiry_s.json said to record the lifetimes again, but recording read it first and raised the same error;
    it also blocked `show` and `rotate`, so an emergency rotation could not run."""
    from fleet.apps.registry_keys import main
    from fleet.registry.store import open_registry

    reg, keys = tmp_path / "registry", tmp_path / "keys"
    roots = [str(keys / f"root-{i}.pem") for i in (1, 2, 3)]
    publish(open_registry(reg, keys / "online.pem", root_keys=roots), tmp_path, "v1")
    (reg / "tuf" / "expiry_s.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="fleet.registry.tuf_repo"):
        assert main(["show", "--dir", str(reg)]) == 0
        assert json.loads(capsys.readouterr().out)["root_version"] == 1
        rotate = ["rotate", "--dir", str(reg), "--root-key", roots[0], "--root-key", roots[1], "--online-key", str(keys / "online-2.pem")]
        assert main(rotate) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["resigned"] == ["targets", "snapshot", "timestamp"]
    assert "reading it as the defaults" in caplog.text
    refresh = ["refresh", "--dir", str(reg), "--online-key", str(keys / "online-2.pem")]
    assert main([*refresh, "--expiry-s", "timestamp=600"]) == 1  # the other roles' record is lost: not guessed
    assert "names every role" in (err := capsys.readouterr().err) and "names timestamp only" in err
    full = {"root": 365 * 86400, "targets": 7 * 86400, "snapshot": 7 * 86400, "timestamp": 600}
    assert main([*refresh, *(arg for role, life in full.items() for arg in ("--expiry-s", f"{role}={life}"))]) == 0
    assert json.loads(capsys.readouterr().out)["expiry_s"] == full
    assert json.loads((reg / "tuf" / "expiry_s.json").read_text()) == full
    assert main(refresh) == 0  # a signer with no setting reads it again


def test_private_keys_are_made_0600_never_through_a_link_and_may_be_encrypted_at_rest(tmp_path, monkeypatch):
    """Keys were written under the umask (0644) and chmod-ed after; a planted dangling link was followed (the key
    written where it pointed); keys could not be encrypted, and an encrypted one raised TypeError with a traceback."""
    import os

    from fleet.registry.signing import PASSPHRASE_ENV, KeyFileError

    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    plain = load_signer(tmp_path / "keys" / "online.pem", create=True)
    assert (tmp_path / "keys" / "online.pem").stat().st_mode & 0o777 == 0o600 and (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    os.symlink(tmp_path / "attacker.pem", tmp_path / "keys" / "root-1.pem")
    with pytest.raises(KeyFileError, match="never written through a link"):
        load_signer(tmp_path / "keys" / "root-1.pem", create=True)
    assert not (tmp_path / "attacker.pem").exists()
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    encrypted = load_signer(tmp_path / "keys" / "root-2.pem", create=True)
    assert b"ENCRYPTED" in (tmp_path / "keys" / "root-2.pem").read_bytes()
    assert load_signer(tmp_path / "keys" / "root-2.pem").public_key == encrypted.public_key
    assert load_signer(tmp_path / "keys" / "online.pem").public_key == plain.public_key  # a key stored plain still opens
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    with pytest.raises(KeyFileError, match=f"is {PASSPHRASE_ENV} its passphrase"):
        load_signer(tmp_path / "keys" / "root-2.pem")
    monkeypatch.delenv(PASSPHRASE_ENV)
    with pytest.raises(KeyFileError, match=f"is encrypted: set {PASSPHRASE_ENV}"):
        load_signer(tmp_path / "keys" / "root-2.pem")


def test_a_server_started_on_a_registry_with_no_root_and_no_root_keys_says_so_in_one_line(tmp_path):
    """``fleet.registry.root_keys=[]`` (what the server's own warning advises) before `flywheel-registry init`: a
    traceback, and the refused start left a new online key and the registry's folders behind."""
    import subprocess
    import sys

    from fleet.server.auth import add_token

    tokens = tmp_path / "tokens.json"
    add_token(tokens, "operator")
    started = subprocess.run(
        [sys.executable, "-m", "fleet.apps.server", "fleet.registry.root_keys=[]", f"fleet.registry.dir={tmp_path / 'registry'}",
         f"fleet.registry.online_key={tmp_path / 'keys' / 'online.pem'}", f"fleet.store.path={tmp_path / 'store'}", "fleet.server.port=0",
         f"fleet.server.token_file={tokens}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode == 1 and "Traceback" not in started.stderr, started.stderr[-3000:]
    (line,) = started.stderr.strip().splitlines()
    assert line.startswith("flywheel-server: ") and "no root metadata" in line and "flywheel-registry init" in line, line
    assert not (tmp_path / "keys").exists() and not (tmp_path / "registry").exists()
