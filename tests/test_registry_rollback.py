"""Rolling the whole fleet back (a stable release withdrawn, not only a canary) on a real registry and a real server on
loopback: a robot's TUF client moves from the bad version to the new one carrying the good weights; only versions the
signed targets metadata lists are sent out again (a storage writer without a key gets nothing signed), their files
checked against the listing; each refusal says what to do; `flywheel-registry rollback` over HTTP and where the keys
are. Also the publish of a release no robot of the fleet would take, and a mistyped version in a canary's widen or
rollback."""

import base64
import json
import socket
import threading

import httpx
import pytest
import torch

from fleet.agent.policy import builtin_policy
from fleet.apps.registry_keys import main as registry_cli
from fleet.apps import registry_rollback
from fleet.registry.manifest import MAX_JSON_BYTES, manifest_target, sha256_hex
from fleet.registry.pull import SignedPolicySource
from fleet.registry.signing import canonical_json
from fleet.registry.store import KEEP_VERSIONS, CanaryChanged, RegistryError, RolloutRefused, open_registry, root_metadata
from fleet.registry.tuf_repo import RegistryCorrupted
from fleet.registry.trust import PolicyTrust
from fleet.server.auth import add_token
from policies.export import export_policy
from policies.networks import Policy, PolicySpec
from policies.runtime import WEIGHTS_FILE
from tests.conftest import registry_server
from tests.test_policy_pull_http import SPEC, exported


@pytest.fixture
def registry(tmp_path):
    keys = tmp_path / "keys"
    return open_registry(tmp_path / "registry", keys / "online.pem", root_keys=[keys / f"root-{i}.pem" for i in (1, 2, 3)])


@pytest.fixture
def fleet(tmp_path):
    """(registry, a client with a publisher token, a robot-0 TUF client, a publish body of policy ``push``) on loopback."""
    robot_token = add_token(tmp_path / "tokens.json", "robot", "robot-0")  # before the server reads the file
    registry, token, server = registry_server(tmp_path, "publisher")
    trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
    source = SignedPolicySource(server.url, robot_token, "robot-0", trust, builtin_policy("zero", 1).current(), root=root_metadata(tmp_path / "registry"), min_healthy_steps=0)

    def body(name: str, push: float = 0.0, **extra) -> dict:
        weights, manifest = exported(tmp_path, name, push)
        return {"weights_b64": base64.b64encode(weights).decode(), "policy": manifest, **SPEC, **extra}

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        yield registry, client, source, body, server.url, token
    source.close()
    server.stop()


def test_an_operator_rolls_a_widened_release_back_and_the_robot_follows(tmp_path, fleet):
    """Once widened, a release could not be rolled back: every call answered 409 no_canary, "nothing to do"."""
    registry, client, source, body, _, _ = fleet
    assert client.post("/v1/policies", json=body("good")).status_code == 201
    good_weights = (tmp_path / "good" / WEIGHTS_FILE).read_bytes()
    assert client.post("/v1/policies", json=body("bad", push=0.5, cohort=["robot-0"])).status_code == 201
    assert client.post("/v1/rollout/widen", json={"version": 2}).status_code == 200
    assert source.poll() and source.current().version == "2"

    answer = client.post("/v1/rollout/rollback", json={"reason": "v2 drops the pole"})  # no canary: say how to roll back the stable one
    assert (answer.status_code, answer.json()["error"]) == (409, "no_canary"), answer.text
    assert 'To roll back the stable version v2, send {"to": N' in answer.json()["reason"] and "N one of v1" in answer.json()["reason"]
    assert "nothing to do" not in answer.json()["reason"]

    rolled = client.post("/v1/rollout/rollback", json={"to": 1, "reason": "v2 drops the pole", "version": 2})
    assert rolled.status_code == 200, rolled.text
    manifest = rolled.json()["manifest"]
    assert (manifest["version"], rolled.json()["stable"], rolled.json()["canary"]) == (3, 3, None)
    assert manifest["note"] == "rollback of v2 to the weights of v1: v2 drops the pole"
    assert manifest["policy"] == registry.manifest(1)["policy"] and manifest["weights"] == registry.manifest(1)["weights"]
    keys = ("version", "event", "reason", "to", "as")
    assert [{k: e.get(k) for k in keys} for e in rolled.json()["history"][-2:]] == [
        {"version": 3, "event": "stable", "reason": None, "to": None, "as": None},
        {"version": 2, "event": "rolled_back", "reason": "v2 drops the pole", "to": 1, "as": 3},
    ]
    assert source.poll() and source.current().version == "3" and source.trust.weights_path.read_bytes() == good_weights
    assert source.refusals == {}  # a higher version: TUF's and the robot's rollback protection let it through

    again = client.post("/v1/rollout/rollback", json={"to": 1, "reason": "v2 drops the pole", "version": 2})  # a retry, its answer lost
    assert (again.status_code, again.json()["error"]) == (409, "nothing_to_do") and "v2 was already rolled back to the weights of v1 (as v3" in again.json()["reason"]
    again = client.post("/v1/rollout/rollback", json={"to": 1, "reason": "again"})
    assert (again.status_code, again.json()["error"]) == (409, "nothing_to_do") and "carries the weights of v1 already" in again.json()["reason"]
    answer = client.post("/v1/rollout/rollback", json={"to": 3, "reason": "x"})
    assert (answer.status_code, answer.json()["error"], answer.json()["field"]) == (409, "nothing_to_do", "to") and "v3 is the stable version" in answer.json()["reason"]
    answer = client.post("/v1/rollout/rollback", json={"to": 99, "reason": "x"})
    assert (answer.status_code, answer.json()["error"], answer.json()["field"]) == (400, "unknown_version", "to"), answer.text
    assert "v99 was never published here" in answer.json()["reason"] and "N one of v1" in answer.json()["reason"]  # v2 was withdrawn, v3 runs
    for bad in ({"to": "1"}, {"to": 0}, {"to": True}):
        answer = client.post("/v1/rollout/rollback", json=bad)
        assert (answer.status_code, answer.json()["error"], answer.json()["field"]) == (400, "bad_rollout", "to"), (bad, answer.text)
    assert registry.rollout()["stable"] == 3 and registry.published_versions() == [1, 2, 3]  # no refusal signed anything


def test_a_rollback_with_a_canary_running_withdraws_both(registry):
    registry.publish(b"v1", **SPEC)
    registry.publish(b"v2", **SPEC)
    registry.publish(b"v3", cohort=["robot-0"], **SPEC)
    with pytest.raises(RolloutRefused, match=r"to: v3 is the canary: to give it to every robot, widen it") as refused:
        registry.rollback("x", to=3)
    assert refused.value.code == "not_the_canary"
    manifest = registry.rollback("both regressed", 3, to=1)
    assert manifest["note"] == "rollback of v2 and canary v3 to the weights of v1: both regressed" and registry.weights(4) == b"v1"
    assert [(e["version"], e["event"], e.get("to")) for e in registry.rollout()["history"][-3:]] == [(4, "stable", None), (2, "rolled_back", 1), (3, "rolled_back", 1)]
    assert registry.latest_for("robot-0")["version"] == registry.latest_for("robot-1")["version"] == 4


def test_with_a_canary_running_version_names_the_canary_and_to_the_stable_version_ends_it(registry):
    """{"to": 1, "version": 2} (v2 the stable version judged) with canary v3 running was refused with the advice to send
    {"to": N}, which the caller had sent; {"to": 2}, the stable version, withdraws the canary alone (undocumented)."""
    registry.publish(b"v1", **SPEC)
    registry.publish(b"v2", **SPEC)
    registry.publish(b"v3", cohort=["robot-0"], **SPEC)
    with pytest.raises(CanaryChanged) as refused:
        registry.rollback("v2 drops the pole", 2, to=1)
    assert str(refused.value).startswith("v2 is the stable version, not the canary; the canary is v3 (on robot-0)")
    assert 'send {"to": 1, "version": 3} once you judged v3' in str(refused.value) and '{"to": N}' not in str(refused.value)
    manifest = registry.rollback("the canary regressed", 3, to=2)
    assert manifest["note"] == "rollback of canary v3 to the weights of v2: the canary regressed" and registry.weights(4) == b"v2"
    assert [(e["version"], e["event"]) for e in registry.rollout()["history"][-2:]] == [(4, "stable"), (3, "rolled_back")]


def test_a_version_no_longer_listed_is_refused_naming_the_listed_ones(fleet):
    """A rollback read a version past the listing from storage, where no signature covers its files any more."""
    registry, client, *_ = fleet
    for i in range(1, KEEP_VERSIONS + 4):
        registry.publish(f"weights-{i}".encode(), **SPEC)
    listed = list(range(4, KEEP_VERSIONS + 4))
    assert registry.versions() == listed and registry.rollback_choices() == listed[::-1][1:]  # v11 is the stable version
    answer = client.post("/v1/rollout/rollback", json={"to": 1, "reason": "back to the first"})
    assert (answer.status_code, answer.json()["error"], answer.json()["field"]) == (409, "unavailable", "to"), answer.text
    reason = answer.json()["reason"]
    assert "v1 is no longer listed in the signed targets metadata" in reason and "so its files cannot be verified" in reason
    assert reason.endswith("N one of " + ", ".join(f"v{v}" for v in listed[::-1][1:]))
    for read in (registry.manifest, registry.weights):
        with pytest.raises(RegistryError, match="v1 is no longer listed"):
            read(1)
    assert registry.rollout()["stable"] == KEEP_VERSIONS + 3 and "rolled_back" not in [e["event"] for e in registry.rollout()["history"]]


def stored(registry, version: int):
    """The folder the registry stores ``version``'s target files in (listed or not)."""
    return registry.repo.dir / "targets" / manifest_target(version).rpartition("/")[0]


@pytest.mark.parametrize("attack", ["swap", "plant"])
def test_a_storage_writer_without_a_key_gets_nothing_signed_through_a_rollback(tmp_path, registry, attack):
    """Writing the storage was enough: v1's files swapped and its sha256 in history.jsonl changed (swap), or a v40 folder
    and a history line made up (plant), and rollback(to=...) signed the writer's weights, which robots installed."""
    for i in range(1, KEEP_VERSIONS + 4):
        registry.publish(f"weights-{i}".encode(), **SPEC)
    target = 1 if attack == "swap" else 40
    folder, evil = stored(registry, target), b"EVIL-WEIGHTS"
    real = json.loads(next(stored(registry, 1).glob("*.manifest.json")).read_bytes())
    for old in folder.glob("*"):
        old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    data = canonical_json({**real, "version": target, "weights": {"sha256": sha256_hex(evil), "size": len(evil)}})
    (folder / f"{sha256_hex(data)}.manifest.json").write_bytes(data)
    (folder / f"{sha256_hex(evil)}.weights.safetensors").write_bytes(evil)
    history = registry.files.local_dir / "history.jsonl"
    with history.open("a") as out:
        out.write(json.dumps({"version": target, "event": "stable", "manifest_sha256": sha256_hex(data), "at": 0}) + "\n")
    assert target not in registry.rollback_choices()
    with pytest.raises(RolloutRefused, match=f"v{target} is no longer listed in the signed targets metadata") as refused:
        registry.rollback("v11 regressed", to=target)
    assert refused.value.code == "unavailable" and registry.rollout()["stable"] == KEEP_VERSIONS + 3
    trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
    trust.accept(trust.check(registry.latest_for("robot-0")), registry.weights(registry.rollout()["stable"]))
    assert trust.weights_path.read_bytes() == f"weights-{KEEP_VERSIONS + 3}".encode()


def test_listed_files_changed_or_gone_are_refused_against_the_listing(registry):
    for i in range(1, 8):
        registry.publish(f"weights-{i}".encode(), **SPEC)
    (weights,) = stored(registry, 1).glob("*.weights.safetensors")
    weights.write_bytes(b"weights-X")  # same size, other bytes, under the listed name
    (manifest,) = stored(registry, 2).glob("*.manifest.json")
    manifest.write_bytes(manifest.read_bytes().replace(b'"note":""', b'"note":"x"'))
    for f in stored(registry, 3).iterdir():
        f.unlink()
    refusals = {1: "is not the file the targets metadata lists", 2: "is not the file the targets metadata lists", 3: "missing", 99: "never published"}
    for to, why in refusals.items():
        with pytest.raises(RolloutRefused, match=why) as refused:
            registry.rollback("x", to=to)
        assert refused.value.code == ("unknown_version" if to == 99 else "unavailable") and "N one of v" in str(refused.value)
    with pytest.raises(RegistryCorrupted, match="length or sha256 differ"):
        registry.weights(1)
    assert [e["event"] for e in registry.rollout()["history"]].count("rolled_back") == 0


def test_a_rollback_robots_would_refuse_is_a_409_saying_why_not_a_500(fleet):
    """v1's manifest near the size robots read plus a long reason in the note: PublishRefused answered 500 internal_error."""
    registry, client, *_ = fleet
    registry.publish(b"w1", **SPEC, gate={"x": "a" * (MAX_JSON_BYTES - 1200)})
    registry.publish(b"w2", **SPEC)
    answer = client.post("/v1/rollout/rollback", json={"to": 1, "reason": "r" * 1000})
    assert (answer.status_code, answer.json()["error"], answer.json()["field"]) == (409, "unavailable", "to"), answer.text
    assert answer.json()["reason"].startswith("to: v1's weights and manifest fields cannot be sent out again (gate: the manifest would be")
    assert "a shorter reason (it goes into the note) may fit" in answer.json()["reason"]
    answer = client.post("/v1/rollout/rollback", json={"to": 1, "reason": "v2 regressed"})  # what the refusal says to do
    assert answer.status_code == 200 and registry.weights(answer.json()["stable"]) == b"w1", answer.text


def reacher_body() -> dict:
    """A publish body of a policy for another robot (reacher: 10 observations, 2 actions)."""
    import tempfile
    from pathlib import Path

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        manifest = export_policy(Policy(PolicySpec(10, 2, (16,), "tanh", False)), folder, robot_model="reacher", policy_version="r", algorithm="sac")
        weights = (Path(folder) / WEIGHTS_FILE).read_bytes()
    return {"weights_b64": base64.b64encode(weights).decode(), "policy": manifest, "robot_model": "reacher", "obs_dim": 10, "act_dim": 2}


def test_a_release_for_other_robots_than_the_stable_versions_is_refused_unless_the_fleet_moves(fleet):
    """It was signed (201) and every robot refused it ('spec'), while the registry said the fleet ran it."""
    registry, client, source, body, _, _ = fleet
    assert client.post("/v1/policies", json=body("good")).status_code == 201
    assert source.poll()
    for extra in ({}, {"cohort": ["robot-0"]}):
        answer = client.post("/v1/policies", json={**reacher_body(), **extra})
        assert (answer.status_code, answer.json()["error"], answer.json()["field"]) == (400, "bad_publish", "robot_model"), answer.text
        assert "robot_model reacher, obs_dim 10, act_dim 2" in answer.json()["reason"] and "stable v1 for robot_model pendulum, obs_dim 4, act_dim 1" in answer.json()["reason"]
    answer = client.post("/v1/policies", json={**reacher_body(), "spec_change": "yes"})
    assert (answer.status_code, answer.json()["field"]) == (400, "spec_change"), answer.text
    assert registry.versions() == [1]  # nothing signed
    assert client.post("/v1/policies", json={**reacher_body(), "spec_change": True}).status_code == 201  # the fleet moves to reacher
    with pytest.raises(RolloutRefused, match="to: v1 is for robot_model pendulum.*stable v2 for robot_model reacher"):
        registry.rollback("x", to=1)


def test_a_mistyped_version_is_named_as_what_it_is_not_blamed_on_another_publisher(fleet):
    registry, client, _, body, _, _ = fleet
    assert client.post("/v1/policies", json=body("good")).status_code == 201
    assert client.post("/v1/policies", json=body("next", cohort=["robot-0"])).status_code == 201
    for route in ("/v1/rollout/rollback", "/v1/rollout/widen"):
        for version, why in ((99, "v99 was never published here; the canary is v2"), (1, "v1 is the stable version, not the canary; the canary is v2")):
            answer = client.post(route, json={"version": version})
            assert (answer.status_code, answer.json()["error"]) == (409, "canary_changed"), answer.text
            assert answer.json()["reason"].startswith(why) and "another publisher" not in answer.json()["reason"], answer.text
    assert registry.rollout()["canary"] == 2


def test_rolling_back_a_first_canary_over_http_is_refused_and_rolling_back_to_an_earlier_version_works(fleet):
    registry, client, source, body, _, _ = fleet
    assert client.post("/v1/policies", json=body("first", cohort=["robot-0"])).status_code == 201
    assert source.poll() and source.current().version == "1"
    answer = client.post("/v1/rollout/rollback", json={"reason": "bad", "version": 1})
    assert (answer.status_code, answer.json()["error"]) == (409, "no_stable") and "robot-0" in answer.json()["reason"], answer.text
    assert "Publish a known-good policy as stable" in answer.json()["reason"]
    assert registry.rollout()["canary"] == 1
    assert client.post("/v1/policies", json=body("known-good", push=0.1)).status_code == 201  # what the refusal says to do
    assert source.poll() and source.current().version == "2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_rollback_command_over_http_in_place_and_with_the_server_down(tmp_path, fleet, capsys, monkeypatch):
    registry, client, _, body, url, token = fleet
    for i, name in enumerate(("v1", "v2", "v3")):
        assert client.post("/v1/policies", json=body(name, push=0.1 * i)).status_code == 201
    monkeypatch.delenv("FLYWHEEL_PUBLISHER_TOKEN", raising=False)
    assert registry_cli(["rollback", "--server", url, "--to", "1", "--reason", "v3 regressed"]) == 1
    err = capsys.readouterr().err
    assert err == "flywheel-registry rollback: no publisher token: set $FLYWHEEL_PUBLISHER_TOKEN or --token-file (issue one with " \
        "`python -m fleet.server.auth --tokens TOKENS.json add --role publisher`)\n"
    assert registry_cli(["rollback", "--server", url, "--token-file", str(tmp_path / "none.tok"), "--to", "1", "--reason", "x"]) == 1
    assert capsys.readouterr().err.startswith(f"flywheel-registry rollback: publisher token file {tmp_path / 'none.tok'} does not exist: write")
    monkeypatch.setenv("FLYWHEEL_PUBLISHER_TOKEN", token)
    assert registry_cli(["rollback", "--server", url, "--to", "1", "--reason", "v3 regressed"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["version"], printed["stable"], printed["note"]) == (4, 4, "rollback of v3 to the weights of v1: v3 regressed")
    assert registry_cli(["rollback", "--server", url, "--to", "1", "--reason", "again"]) == 1  # a refusal: one line, its code
    err = capsys.readouterr().err
    assert err.startswith("flywheel-registry rollback: 409 nothing_to_do:") and err.count("\n") == 1

    down = f"http://127.0.0.1:{free_port()}"
    assert registry_cli(["rollback", "--server", down, "--to", "2", "--reason", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{down}/v1/rollout/rollback did not answer" in err and "is the server up" in err and "Nothing was rolled back" in err

    (tmp_path / "pub.tok").write_text(token + "\n")
    monkeypatch.delenv("FLYWHEEL_PUBLISHER_TOKEN")
    keys = tmp_path / "keys"
    in_place = ["rollback", "--dir", str(tmp_path / "registry"), "--online-key", str(keys / "online.pem"), "--to", "2", "--reason", "v1 too"]
    assert registry_cli(in_place) == 0 and json.loads(capsys.readouterr().out)["stable"] == 5
    assert registry.weights(5) == registry.weights(2) and registry.rollout()["history"][-1]["version"] == 4
    assert registry_cli(["rollback", "--server", url, "--token-file", str(tmp_path / "pub.tok"), "--reason", "x"]) == 1  # no canary
    assert "409 no_canary" in capsys.readouterr().err


def test_a_publisher_token_saved_with_a_bom_is_sent_and_a_non_ascii_one_is_one_line(tmp_path, monkeypatch, capsys):
    """A token file saved "UTF-8 with BOM" (Windows Notepad), or $FLYWHEEL_PUBLISHER_TOKEN with one, ended the
    operator's emergency command in an httpx traceback (UnicodeEncodeError)."""
    down = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "bom.tok").write_bytes("\ufefft0k\n".encode())
    monkeypatch.setenv("FLYWHEEL_PUBLISHER_TOKEN", "\ufefft0k")
    for token_file in (["--token-file", str(tmp_path / "bom.tok")], []):  # the token is read, and the request tried
        assert registry_cli(["rollback", "--server", down, *token_file, "--reason", "x"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "did not answer" in err, err
    (tmp_path / "bad.tok").write_text("t\u00f6k")
    monkeypatch.setenv("FLYWHEEL_PUBLISHER_TOKEN", "t\u00f6k")
    for token_file, where in ((["--token-file", str(tmp_path / "bad.tok")], f"publisher token file {tmp_path / 'bad.tok'}"), ([], "$FLYWHEEL_PUBLISHER_TOKEN")):
        assert registry_cli(["rollback", "--server", down, *token_file, "--reason", "x"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"flywheel-registry rollback: {where}") and "holds 'ö'" in err, err


def test_the_rollback_command_after_a_timeout_says_the_outcome_is_unknown_and_a_bad_url_is_one_line(monkeypatch, capsys):
    """A server that took the POST and answered late (a slow sign-and-store) was reported as 'Nothing was rolled back';
    --server 'http://[::1' ended in a traceback (httpx.InvalidURL is not an httpx.HTTPError)."""
    monkeypatch.setenv("FLYWHEEL_PUBLISHER_TOKEN", "t")
    monkeypatch.setattr(registry_rollback, "TIMEOUT_S", 0.5)
    received, done = [], threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def take_and_say_nothing():
            connection, _ = listener.accept()
            with connection:
                received.append(connection.recv(65536))
                done.wait(10)

        thread = threading.Thread(target=take_and_say_nothing, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        try:
            assert registry_cli(["rollback", "--server", url, "--to", "1", "--reason", "x"]) == 1
        finally:
            done.set()
            thread.join()
    err = capsys.readouterr().err
    assert received and received[0].startswith(b"POST /v1/rollout/rollback")
    assert err.count("\n") == 1 and "Nothing was rolled back" not in err and "whether the fleet was rolled back is unknown" in err
    assert f"Check GET {url}/v1/rollout" in err
    assert registry_cli(["rollback", "--server", "http://[::1", "--to", "1", "--reason", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flywheel-registry rollback: --server http://[::1: not a URL") and err.count("\n") == 1
