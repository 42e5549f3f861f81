"""A registry restored from a backup older than what the fleet ran (docs/security.md, "Backing up and restoring the
registry"): `flywheel-registry restored --past-version N` puts the next release past N and the TUF metadata past what
robots trust, so a robot that installed a release made after the backup takes the next one. Before, the restored
registry's next release reused a version the fleet had run with other weights, and robots refused release after
release (TUF's `rollback` on the timestamp, then a 404 for the old release's files). A real registry, a real server on
loopback, real robots (python-tuf's client)."""

import json
import shutil

import pytest
from tuf.api.metadata import Metadata

from fleet.agent.policy import builtin_policy
from fleet.apps.registry_keys import main as registry_cli
from fleet.registry.pull import SignedPolicySource
from fleet.registry.store import METADATA_MARGIN, PolicyRegistry, open_registry, root_metadata
from fleet.registry.signing import load_signer
from fleet.registry.trust import PolicyTrust
from fleet.server.auth import add_token
from fleet.server.config import ServerConfig
from fleet.server.runner import serve
from fleet.store import StoreConfig
from tests.test_policy_pull_http import SPEC, exported


def publish(registry, tmp_path, name: str, push: float = 0.0) -> int:
    weights, manifest = exported(tmp_path / "exports", name, push)
    return registry.publish(weights, policy=manifest, **SPEC)["version"]


def running(source: SignedPolicySource) -> int:
    """The version ``source`` runs (``current()`` would poll again)."""
    return source.status()["policy_version"]


def timestamp_version(metadata_dir) -> int:
    return Metadata.from_bytes((metadata_dir / "timestamp.json").read_bytes()).signed.version


class Fleet:
    """A registry with its keys under ``tmp_path``, served on loopback, and robots pulling from it."""

    def __init__(self, tmp_path, release_key: bool = False):
        self.tmp, self.dir, self.keys = tmp_path, tmp_path / "registry", tmp_path / "keys"
        self.release = self.keys / "release.pem" if release_key else None
        self.robot_token = add_token(tmp_path / "tokens.json", "robot", "robot-0")
        self.server = self.robots = None

    def start(self) -> PolicyRegistry:
        self.registry = open_registry(self.dir, self.keys / "online.pem", release_key=self.release, root_keys=[self.keys / f"root-{i}.pem" for i in (1, 2, 3)])
        self.server = serve(ServerConfig(port=0, token_file=str(self.tmp / "tokens.json")), StoreConfig(path=str(self.tmp / "store")), policy_registry=self.registry)
        for robot in self.robots or []:
            robot.close()
        self.robots = None
        return self.registry

    def robot(self, name: str) -> SignedPolicySource:
        """robot-0's policy source with its state in ``name`` (kept across restarts of the server)."""
        trust = PolicyTrust(**SPEC, state_dir=self.tmp / name)
        source = SignedPolicySource(self.server.url, self.robot_token, "robot-0", trust, builtin_policy("zero", 1).current(), root=root_metadata(self.dir), min_healthy_steps=0)
        self.robots = [*(self.robots or []), source]
        return source

    def stop(self) -> None:
        for robot in self.robots or []:
            robot.close()
        if self.server is not None:
            self.server.stop()
        self.server = self.robots = None

    def restored(self, *extra: str) -> list[str]:
        release = ["--release-key", str(self.release)] if self.release else []
        return ["restored", "--dir", str(self.dir), "--online-key", str(self.keys / "online.pem"), *release, *extra]


@pytest.fixture
def fleet(tmp_path):
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.stop()


def test_after_a_restore_the_command_lets_robots_that_ran_newer_releases_take_the_next_one(tmp_path, fleet, capsys):
    registry = fleet.start()
    publish(registry, tmp_path, "v1")
    publish(registry, tmp_path, "v2", push=0.01)
    ahead, behind = fleet.robot("ahead"), fleet.robot("behind")
    assert ahead.poll() and behind.poll() and running(ahead) == running(behind) == 2
    shutil.copytree(fleet.dir, tmp_path / "backup")  # the nightly backup (the keys are kept apart)
    publish(registry, tmp_path, "v3", push=0.02)
    publish(registry, tmp_path, "v4", push=0.03)
    assert ahead.poll() and running(ahead) == 4  # "behind" was off meanwhile: it still runs v2
    trusted_timestamp = timestamp_version(ahead.metadata_dir)

    fleet.stop()  # the disk is lost; the backup goes back in its place
    shutil.rmtree(fleet.dir)
    shutil.copytree(tmp_path / "backup", fleet.dir)
    registry = fleet.start()
    ahead, behind = fleet.robot("ahead"), fleet.robot("behind")
    assert not ahead.poll() and ahead.refusals == {"rollback": 1}  # TUF: the timestamp went back
    assert registry.next_version() == 3  # what the restored registry would reuse

    assert registry_cli(fleet.restored("--past-version", "4")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["past_version"], printed["next_version"]) == (4, 5)
    assert all(printed["metadata"][role] == printed["metadata_before"][role] + METADATA_MARGIN for role in ("targets", "snapshot", "timestamp"))
    assert printed["metadata"]["timestamp"] > trusted_timestamp
    assert registry.rollout()["history"][-1] | {"at": 0} == {"version": 4, "event": "restored", "metadata_margin": METADATA_MARGIN, "at": 0}
    assert PolicyRegistry(fleet.dir, load_signer(fleet.keys / "online.pem")).next_version() == 5  # the floor holds for a process opening it anew

    # the metadata is taken now; the rollout names the backup's stable v2, which a robot on v4 refuses (and keeps v4)
    assert not ahead.poll() and ahead.refusals == {"rollback": 2} and running(ahead) == 4
    assert timestamp_version(ahead.metadata_dir) == printed["metadata"]["timestamp"]
    assert not behind.poll() and behind.refusals == {}  # already runs v2

    assert publish(registry, tmp_path, "after the restore", push=0.04) == 5  # the running server's registry reads the floor
    assert ahead.poll() and running(ahead) == 5 and ahead.refusals == {"rollback": 2}
    assert behind.poll() and running(behind) == 5
    fresh = fleet.robot("fresh")  # provisioned after the restore: the same release under the same number
    assert fresh.poll() and running(fresh) == 5 and fresh.trust.weights_path.read_bytes() == ahead.trust.weights_path.read_bytes()


def test_the_floor_and_the_jump_hold_across_reopens_and_a_second_run_jumps_again(tmp_path, fleet, capsys):
    registry = fleet.start()
    publish(registry, tmp_path, "v1")
    fleet.stop()
    assert registry_cli(fleet.restored("--past-version", "7", "--metadata-margin", "50")) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["next_version"] == 8 and first["metadata"]["timestamp"] == first["metadata_before"]["timestamp"] + 50
    registry = fleet.start()  # a restart: the floor is read from the history, the metadata from where the jump left it
    assert registry.next_version() == 8 and registry.repo.open("timestamp").signed.version >= first["metadata"]["timestamp"]
    assert publish(registry, tmp_path, "v8") == 8
    fleet.stop()
    assert registry_cli(fleet.restored("--past-version", "3", "--metadata-margin", "50")) == 0  # a lower floor takes nothing back
    second = json.loads(capsys.readouterr().out)
    assert second["next_version"] == 9 and second["metadata"]["timestamp"] == second["metadata_before"]["timestamp"] + 50
    assert publish(fleet.start(), tmp_path, "v9") == 9


def test_a_registry_with_a_release_key_needs_it(tmp_path, capsys):
    fleet = Fleet(tmp_path, release_key=True)
    try:
        publish(fleet.start(), tmp_path, "v1")
    finally:
        fleet.stop()
    before = (fleet.dir / "history.jsonl").read_bytes()
    without = ["restored", "--dir", str(fleet.dir), "--online-key", str(fleet.keys / "online.pem"), "--past-version", "3"]
    assert registry_cli(without) == 1
    err = capsys.readouterr().err
    assert err.startswith("flywheel-registry restored: ReleaseKeyMissing: only the release key") and err.count("\n") == 1
    assert (fleet.dir / "history.jsonl").read_bytes() == before
    assert registry_cli(fleet.restored("--past-version", "3")) == 0 and json.loads(capsys.readouterr().out)["next_version"] == 4


@pytest.mark.parametrize(
    "args, says",
    [
        (("--past-version", "0"), "past version 0: the highest policy version a robot ran, an integer from 1 to 99999999"),
        (("--past-version", "100000000"), "past version 100000000: the highest policy version"),
        (("--past-version", "4", "--metadata-margin", "0"), "metadata margin 0: an integer from 1 to "),
        (("--past-version", "4", "--metadata-margin", "999999999"), "metadata names carry at most 9 digits"),
    ],
)
def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, fleet, capsys, args, says):
    publish(fleet.start(), tmp_path, "v1")
    fleet.stop()
    files = {p: p.read_bytes() for p in fleet.dir.rglob("*") if p.is_file()}
    assert registry_cli(fleet.restored(*args)) == 1
    err = capsys.readouterr().err
    assert err.startswith("flywheel-registry restored: ValueError: ") and says in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in fleet.dir.rglob("*") if p.is_file()} == files


def test_the_largest_margin_offered_leaves_room_for_the_releases_after_it(tmp_path, fleet, capsys):
    """A margin up to the last 9-digit version was taken: the next release was signed as 1000000000.snapshot.json, a
    name the server does not serve, and robots could never take a release again."""
    from fleet.registry.tuf_repo import JUMP_HEADROOM, MAX_METADATA_VERSION

    registry = fleet.start()
    publish(registry, tmp_path, "v1")
    robot = fleet.robot("r")
    assert robot.poll() and running(robot) == 1
    fleet.stop()
    newest = max(registry.repo.open(role).signed.version for role in ("targets", "snapshot", "timestamp"))
    largest = MAX_METADATA_VERSION - JUMP_HEADROOM - newest
    assert registry_cli(fleet.restored("--past-version", "1", "--metadata-margin", str(largest + 1))) == 1
    assert f"an integer from 1 to {largest}" in capsys.readouterr().err
    assert registry_cli(fleet.restored("--past-version", "1", "--metadata-margin", str(largest))) == 0
    capsys.readouterr()
    registry = fleet.start()
    assert publish(registry, tmp_path, "v2", push=0.01) == 2
    robot = fleet.robot("r")  # the restarted server's address, the same robot state
    assert robot.poll() and running(robot) == 2  # its metadata names have 9 digits: served, and taken


def test_a_registry_that_is_not_there_is_one_line(tmp_path, capsys):
    (tmp_path / "keys").mkdir()
    load_signer(tmp_path / "keys" / "online.pem", create=True)
    assert registry_cli(["restored", "--dir", str(tmp_path / "nothing"), "--online-key", str(tmp_path / "keys" / "online.pem"), "--past-version", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flywheel-registry restored: FileNotFoundError: ") and "give --dir the registry as restored" in err and err.count("\n") == 1
    assert not (tmp_path / "nothing").exists()
