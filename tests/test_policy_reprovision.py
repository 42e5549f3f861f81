"""A robot that cannot follow its registry's root chain (the drawer probe: a robot powered up months later, against a
registry that kept only its newest roots, was restored without them, or was re-made): re-provisioning it with the
registry's current root.json, what it says when it is refused, and the server's warning before the root expires."""

from __future__ import annotations

import json
import logging
import time

from tuf.api.metadata import Metadata

from fleet.agent.policy import builtin_policy
from fleet.registry.pull import SignedPolicySource
from fleet.registry.signing import load_signer
from fleet.registry.store import PolicyRegistry, root_metadata
from fleet.registry.trust import PolicyTrust
from fleet.registry.tuf_repo import resign_rotated, rotate_keys
from fleet.server.config import ServerConfig
from fleet.server.runner import serve
from fleet.store import StoreConfig
from tests.conftest import registry_server
from tests.test_policy_pull_http import SPEC, exported


def robot(tmp_path, server, token, root: bytes | None, **kwargs) -> SignedPolicySource:
    trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
    return SignedPolicySource(getattr(server, "url", server), token, "robot-0", trust, builtin_policy("zero", 1).current(), root=root, **kwargs)


def publish(registry, tmp_path, name: str) -> int:
    weights, manifest = exported(tmp_path, name)
    return registry.publish(weights, policy=manifest, **SPEC)["version"]


def trusted_root(source) -> int:
    return json.loads((source.metadata_dir / "root.json").read_bytes())["signed"]["version"]


def test_a_robot_whose_root_chain_was_cut_is_re_provisioned_with_a_newer_root_and_never_rolled_back(tmp_path, caplog):
    """The registry kept only root v3 (v1 and v2 removed: a migration that copied the newest root only); the robot trusts
    v1 and is refused. Started with policy.root = the registry's current root.json, it once kept its stored v1 without a
    word: a higher version now replaces it (its version floor kept); a lower one is ignored, one of the same version with
    other content is warned about and not taken, and what is not valid root metadata is warned about."""
    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    v1 = root_metadata(tmp_path / "registry")
    source = robot(tmp_path, server, token, v1)
    publish(registry, tmp_path, "v1")
    assert source.poll() and source.trust.version == 1
    source.close()
    server.stop()
    keys, tuf = tmp_path / "keys", registry.root / "tuf"
    roots = [load_signer(keys / f"root-{i}.pem") for i in (1, 2)]
    rotate_keys(tuf, roots, online_key=load_signer(keys / "online-2.pem", create=True).public_key)  # root v2: a new online key
    rotate_keys(tuf, roots, threshold=2)  # root v3: renewed
    resign_rotated(tuf, load_signer(keys / "online-2.pem"))
    for v in (1, 2):
        (tuf / "metadata" / f"{v}.root.json").unlink()  # the chain from v1 is cut
    registry = PolicyRegistry(registry.root, load_signer(keys / "online-2.pem"))
    server = serve(ServerConfig(port=0, token_file=str(tmp_path / "tokens.json")), StoreConfig(path=str(tmp_path / "store")), policy_registry=registry)
    try:
        publish(registry, tmp_path, "v2")
        source = robot(tmp_path, server, token, v1)
        assert not source.poll() and source.refusals == {"signature": 1} and trusted_root(source) == 1
        source.close()
        current = root_metadata(tmp_path / "registry")
        with caplog.at_level(logging.WARNING, logger="fleet.registry.pull"):
            source = robot(tmp_path, server, token, current, root_origin="policy.root /robot/root.json")
        assert "re-provisioned: trusting root v3 from policy.root /robot/root.json in place of v1" in caplog.text
        assert trusted_root(source) == 3 and source.status()["policy_version"] == source.trust.version == 1  # its floor and policy kept
        assert source.poll() and source.current().version == "2" and source.refusals == {}
        source.close()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fleet.registry.pull"):
            source = robot(tmp_path, server, token, v1)  # provisioned long ago: the chain it followed since stays
        assert trusted_root(source) == 3 and "fleet.registry.pull" not in caplog.text
        source.close()
        other = Metadata.from_bytes(current)  # root v3 of other content (another expiry), signed by the root keys
        other.signed.expires = other.signed.expires.replace(year=other.signed.expires.year + 1)
        other.signatures.clear()
        for signer in roots:
            other.sign(signer, append=True)
        for given, said in ((other.to_bytes(), "is root v3, as is the root this robot trusts"), (b"{}", "is not valid TUF root metadata"),
                            ((tuf / "metadata" / "timestamp.json").read_bytes(), "not root metadata")):  # fmt: skip
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="fleet.registry.pull"):
                source = robot(tmp_path, server, token, given, root_origin="policy.root given.json")
            assert said in caplog.text and "policy.root given.json" in caplog.text and trusted_root(source) == 3
            assert source.poll() is False and source.refusals == {} and source.current().version == "2"
            source.close()
    finally:
        source.close()
        server.stop()


def test_a_robot_that_cannot_follow_the_root_chain_says_what_to_do_once_and_in_its_status(tmp_path, caplog):
    """The registry was re-made from scratch (new root keys): the robot, on the old root v1, was refused with 'signature:
    timestamp was signed by 0/1 keys' and 'the registry looks frozen', the symptoms of an attack, at every poll, and
    nothing said what to do. The refusal now names the root it trusts and the fix (re-provision it), once per cause, and
    its status carries both."""
    _, _, old_server = registry_server(tmp_path / "old", "robot", "robot-0")
    old_server.stop()
    registry, token, server = registry_server(tmp_path / "new", "robot", "robot-0")  # re-made: other root keys, root v1 again
    source = robot(tmp_path, server, token, root_metadata(tmp_path / "old" / "registry"))
    try:
        publish(registry, tmp_path, "v1")
        assert source.status()["trusted_root_version"] == 1 and source.status()["pull_advice"] is None
        with caplog.at_level(logging.WARNING, logger="fleet.registry.pull"):
            assert not source.poll() and source.refusals == {"signature": 1}
        assert "timestamp was signed by 0/1 keys" in caplog.text and "the root this robot trusts" in caplog.text
        assert "re-provision this robot with the registry's current tuf/metadata/root.json" in caplog.text and "root v1" in caplog.text
        status = source.status()
        assert status["trusted_root_version"] == 1 and "re-provision this robot" in status["pull_advice"] and status["refusals"] == {"signature": 1}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fleet.registry.pull"):
            assert not source.poll() and source.refusals == {"signature": 2}
        assert "re-provision" not in caplog.text and "re-provision this robot" in source.status()["pull_advice"]  # said once, kept in the status
    finally:
        source.close()
        server.stop()


def test_a_robot_whose_final_root_expired_is_told_to_be_re_provisioned_or_the_root_renewed(tmp_path, monkeypatch, caplog):
    """Root v1 expired (nobody renewed it): every robot logged 'freeze: Final root.json is expired' and 'the registry looks
    frozen'; the refusal now says that root v1 expired and that the registry's operator must renew it with the root keys
    (or that the robot be re-provisioned where the registry's root is newer)."""
    monkeypatch.setattr("fleet.registry.tuf_repo.MIN_EXPIRY_S", 1.0)
    registry, token, server = registry_server(tmp_path, "robot", "robot-0", expiry_s={"root": 2.0})
    source = robot(tmp_path, server, token, root_metadata(tmp_path / "registry"))
    try:
        publish(registry, tmp_path, "v1")
        assert source.poll() and source.status()["pull_advice"] is None
        time.sleep(2.5)
        publish(registry, tmp_path, "v2")
        with caplog.at_level(logging.WARNING, logger="fleet.registry.pull"):
            assert not source.poll() and source.refusals == {"freeze": 1} and source.current().version == "1"
        assert "Final root.json is expired" in caplog.text and "root v1, the newest root this robot could reach, expired at" in caplog.text
        assert "flywheel-registry rotate" in caplog.text and "re-provision this robot" in caplog.text
        assert "flywheel-registry rotate" in source.status()["pull_advice"] and source.status()["trusted_root_version"] == 1
    finally:
        source.close()
        server.stop()


def test_the_server_warns_once_an_hour_when_the_registry_root_is_past_half_its_life(tmp_path, caplog):
    """Nobody ran the yearly root renewal: the server opened, re-signed timestamps and served without a word while root v1
    ran out, and then every robot froze. Past half its life it now says so at most once an hour, naming the expiry and
    the ceremony that renews it."""
    registry, _, server = registry_server(tmp_path, "robot", "robot-0")
    server.stop()
    publish(registry, tmp_path, "v1")
    now = [time.time() + 100 * 86400]
    later = PolicyRegistry(registry.root, load_signer(tmp_path / "keys" / "online.pem"), clock=lambda: now[0])
    said = lambda: caplog.text.count("the root metadata of")  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="fleet.registry.tuf_repo"):
        later.refresh()
        assert said() == 0  # 100 days into 365: nothing to say
        now[0] += 100 * 86400
        later.refresh()
        later.refresh()
        assert said() == 1 and "(root v1) expires" in caplog.text and "flywheel-registry rotate --dir REG --root-key" in caplog.text
        assert "only the offline root keys can renew it" in caplog.text and "in 165.0 days" in caplog.text
        now[0] += 1800
        later.refresh()
        assert said() == 1  # once an hour
        now[0] += 200 * 86400
        later.refresh()
        assert said() == 2 and "every robot refuses this registry" in caplog.text


def test_a_refusal_that_does_not_go_away_is_logged_once_an_hour_and_counted_at_every_poll(tmp_path, monkeypatch, caplog):
    """A robot refused for good (here: a registry re-made under it) logged the same warning at every poll, ~8,600 lines a
    day at 10 s. The same refusal as the poll before is now logged again only an hour after its last line (saying how
    many polls it stood for), still counted at every poll; another failure, or a poll that goes through, ends the run."""
    _, _, old_server = registry_server(tmp_path / "old", "robot", "robot-0")
    old_server.stop()
    registry, token, server = registry_server(tmp_path / "new", "robot", "robot-0")
    source = robot(tmp_path, server, token, root_metadata(tmp_path / "old" / "registry"))
    said = lambda: caplog.text.count("registry metadata refused")  # noqa: E731
    try:
        publish(registry, tmp_path, "v1")
        with caplog.at_level(logging.INFO, logger="fleet.registry.pull"):
            for _ in range(5):
                assert not source.poll()
            assert said() == 1 and source.refusals == {"signature": 5} and "re-provision this robot" in caplog.text
            monkeypatch.setattr("fleet.registry.pull.REPEAT_LOG_S", 0.0)  # an hour later
            assert not source.poll()
            assert said() == 2 and "(the same at 4 polls since it was last logged)" in caplog.text and source.refusals == {"signature": 6}
            assert caplog.text.count("re-provision this robot") == 2  # the hourly line says what to do again
        monkeypatch.setattr("fleet.registry.pull.REPEAT_LOG_S", 3600.0)
        source.close()
        caplog.clear()
        source = robot(tmp_path / "other", server, token, root_metadata(tmp_path / "new" / "registry"))  # a robot of the new registry
        source._repeat = (("signature", "timestamp was signed by 0/1 keys"), time.monotonic(), 3)  # as after 3 unlogged refusals
        with caplog.at_level(logging.INFO, logger="fleet.registry.pull"):
            assert source.poll() and source.current().version == "1"
        assert "after 3 more polls failed as last logged" in caplog.text and source._repeat is None
    finally:
        source.close()
        server.stop()
