"""The policy registry on S3-compatible object storage (``fleet.registry.dir=s3://bucket/prefix``),
against a real S3 server on loopback (moto's standalone mode, the ``s3_server`` fixture): the
rollout on a bucket, a robot verifying a release the server reads from it, two replicas (two
registry objects, no lock in common) serving and publishing one registry, the race for a version,
bad locations, and the request signing checked against botocore's own."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import httpx
import pytest

from fleet.agent.policy import builtin_policy
from fleet.registry.files import S3Files, open_files
from fleet.registry.http_cache import IMMUTABLE, REVALIDATE
from fleet.registry.pull import SignedPolicySource
from fleet.registry.store import PolicyRegistry, RegistryError, open_registry, root_metadata
from fleet.registry.trust import PolicyTrust
from fleet.registry.tuf_repo import RegistryCorrupted
from tests.test_policy_pull_http import SPEC, exported


@pytest.fixture
def location(s3_server) -> str:
    return f"s3://fleet/registries/{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[bytes, dict]:
    """Weights and export manifest of one small pendulum policy (what is published does not matter here)."""
    return exported(tmp_path_factory.mktemp("policy"), "p")


def open_replica(location: str, tmp_path: Path) -> PolicyRegistry:
    """A registry object on ``location``, as a server replica on its own host opens it (the keys are
    the fleet's: the same files for every replica)."""
    keys = tmp_path / "keys"
    return open_registry(location, keys / "online.pem", root_keys=[keys / f"root-{i}.pem" for i in (1, 2, 3)])


def publish(registry: PolicyRegistry, release, **kwargs) -> int:
    weights, manifest = release
    return registry.publish(weights, policy=manifest, **SPEC, **kwargs)["version"]


@pytest.fixture
def server_for(tmp_path):
    """Start a flywheel server for a registry; returns (url, robot token). Stopped after the test."""
    from fleet.server.auth import add_token
    from fleet.server.config import ServerConfig
    from fleet.server.runner import serve
    from fleet.store import StoreConfig

    tokens, servers = tmp_path / "tokens.json", []
    token = add_token(tokens, "robot", "robot-0")

    def start(registry: PolicyRegistry) -> str:
        servers.append(serve(ServerConfig(port=0, token_file=str(tokens)), StoreConfig(path=str(tmp_path / f"store-{len(servers)}")), policy_registry=registry))
        return servers[-1].url

    yield start, token
    for server in servers:
        server.stop()


def robot(tmp_path: Path, url: str, token: str, location: str, name: str = "robot") -> SignedPolicySource:
    trust = PolicyTrust(**SPEC, state_dir=tmp_path / name)
    return SignedPolicySource(url, token, "robot-0", trust, builtin_policy("zero", 1).current(), root=root_metadata(location))


def bucket_object(location: str, name: str) -> dict:
    """HEAD of ``name`` under the registry, with an S3 client of botocore's own (what a CDN in front of the bucket sees)."""
    import boto3

    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    return boto3.client("s3").head_object(Bucket=bucket, Key=f"{prefix}/{name}")


def test_publish_widen_and_rollback_on_a_bucket(location, tmp_path, release):
    registry = open_replica(location, tmp_path)
    assert registry.root is None and registry.location == location and not (tmp_path / "registries").exists()
    assert publish(registry, release) == 1
    assert publish(registry, release, cohort=["robot-1"]) == 2
    assert registry.widen() == 2
    assert publish(registry, release, cohort=["robot-1"]) == 3
    assert registry.rollback("robot-1 fell over")["version"] == 4  # the weights of v2, under a new version
    rollout = registry.rollout()
    assert (rollout["stable"], rollout["canary"], rollout["cohort"]) == (4, None, [])
    assert [e["event"] for e in rollout["history"]] == ["stable", "canary", "widened", "canary", "stable", "rolled_back"]
    assert registry.weights(4) == registry.weights(2) and registry.versions() == [1, 2, 3, 4]
    with pytest.raises(RegistryError, match="no canary"):
        registry.widen()
    # what a bucket or CDN serving the files straight sends: each file's cache policy, kept as object metadata
    files = open_files(location)
    assert sorted(files.list("tuf/metadata"))[:3] == ["1.root.json", "1.snapshot.json", "1.targets.json"]
    assert bucket_object(location, "tuf/metadata/timestamp.json")["CacheControl"] == REVALIDATE
    assert bucket_object(location, "tuf/metadata/2.targets.json")["CacheControl"] == IMMUTABLE
    weights = registry.repo.target_listing()["policies/00000004/weights.safetensors"].hashes["sha256"]
    assert bucket_object(location, f"tuf/targets/policies/00000004/{weights}.weights.safetensors")["CacheControl"] == IMMUTABLE


def test_a_robot_verifies_a_release_the_server_reads_from_the_bucket(location, tmp_path, release, server_for):
    start, token = server_for
    registry = open_replica(location, tmp_path)
    url = start(registry)
    source = robot(tmp_path, url, token, location)
    try:
        assert not source.poll() and source.current().version == "zero"
        publish(registry, release)
        assert source.poll() and source.current().version == "1" and source.refusals == {}
    finally:
        source.close()
    info = registry.repo.target_listing()["policies/00000001/weights.safetensors"]
    path = f"/v1/tuf/targets/policies/00000001/{info.hashes['sha256']}.weights.safetensors"
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
        whole = client.get(path)
        assert whole.status_code == 200 and whole.headers["cache-control"] == IMMUTABLE and len(whole.content) == info.length
        etag = whole.headers["etag"]
        assert client.get(path, headers={"If-None-Match": etag}).status_code == 304
        part = client.get(path, headers={"Range": "bytes=10-19", "If-Range": etag})
        assert part.status_code == 206 and part.content == whole.content[10:20] and part.headers["content-range"] == f"bytes 10-19/{info.length}"
        assert client.get(path, headers={"Range": f"bytes={info.length}-"}).status_code == 416
        head = client.head(path)
        assert head.status_code == 200 and head.headers["content-length"] == str(info.length) and not head.content
        timestamp = client.get("/v1/tuf/metadata/timestamp.json")
        assert timestamp.headers["cache-control"] == REVALIDATE
        assert client.get("/v1/tuf/metadata/timestamp.json", headers={"If-None-Match": timestamp.headers["etag"]}).status_code == 304
        assert client.get("/v1/tuf/metadata/2.root.json").status_code == 404


def test_a_release_published_by_one_replica_is_served_and_built_on_by_the_other(location, tmp_path, release, server_for):
    start, token = server_for
    a, b = open_replica(location, tmp_path), open_replica(location, tmp_path)
    source = robot(tmp_path, start(b), token, location)
    try:
        assert publish(a, release) == 1
        assert b.versions() == [1] and b.latest_for("robot-0")["version"] == 1
        assert source.poll() and source.current().version == "1"  # through b's routes
        assert publish(b, release, cohort=["robot-0"]) == 2  # on a's state, not on what b read at start
        assert a.rollout()["canary"] == 2 and [e["event"] for e in a.rollout()["history"]] == ["stable", "canary"]
        assert source.poll() and source.current().version == "2"
    finally:
        source.close()


class RacedFiles(S3Files):
    """The bucket as one replica sees it while another replica publishes between that replica's
    reading the registry and its first metadata write: the race, made to happen every time."""

    def __init__(self, files: S3Files, other_publishes):
        super().__init__(files.client, files.prefix)
        self.other_publishes = other_publishes

    def sub(self, folder: str) -> S3Files:
        return RacedFiles(super().sub(folder), self.other_publishes)

    def write(self, name: str, data: bytes, **kwargs) -> str:
        if name.endswith(".targets.json") and self.other_publishes is not None:
            run, self.other_publishes = self.other_publishes, None
            run()
        return super().write(name, data, **kwargs)


def test_the_replica_that_loses_the_race_for_a_version_takes_the_next(location, tmp_path, release, server_for):
    a = open_replica(location, tmp_path)
    publish(a, release)
    won = []
    b = PolicyRegistry(RacedFiles(open_files(location), lambda: won.append(publish(a, release))), a.repo.signers["targets"][0])
    assert publish(b, release) == 3 and won == [2]  # a took v2 first; b redid its change on a's state
    assert b.repo.commit_retries == 1
    assert [(e["version"], e["event"]) for e in a.rollout()["history"]] == [(1, "stable"), (2, "stable"), (3, "stable")]
    # b's first try left metadata versions that no timestamp names; robots never see them, and a fresh robot verifies
    start, token = server_for
    source = robot(tmp_path, start(a), token, location)
    try:
        assert source.poll() and source.current().version == "3"
    finally:
        source.close()


def test_replicas_publishing_at_once_never_share_a_version_and_leave_no_torn_state(location, tmp_path, release, server_for):
    replicas = [open_replica(location, tmp_path) for _ in range(3)]
    barrier, versions = threading.Barrier(len(replicas)), {}

    def publish_some(i: int) -> None:
        barrier.wait()
        versions[i] = [publish(replicas[i], release) for _ in range(2)]

    threads = [threading.Thread(target=publish_some, args=(i,)) for i in range(len(replicas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = sorted(v for vs in versions.values() for v in vs)
    assert every == list(range(1, 7)), versions  # each version published by exactly one replica, none lost
    fresh = PolicyRegistry(location, replicas[0].repo.signers["targets"][0])
    assert fresh.versions() == every and fresh.rollout()["stable"] == 6 and len(fresh.rollout()["history"]) == 6
    start, token = server_for
    source = robot(tmp_path, start(fresh), token, location)
    try:
        assert source.poll() and source.current().version == "6" and source.refusals == {}
    finally:
        source.close()
    print(f"changes redone after losing a race: {[r.repo.commit_retries for r in replicas]}")


def test_key_ceremonies_and_refresh_with_flywheel_registry_on_a_bucket(location, tmp_path, release, capsys):
    from fleet.apps.registry_keys import main

    keys = tmp_path / "keys"
    roots = [arg for i in (1, 2, 3) for arg in ("--root-key", str(keys / f"root-{i}.pem"))]
    assert main(["init", "--dir", location, *roots, "--threshold", "2", "--online-key", str(keys / "online.pem")]) == 0
    assert json.loads(capsys.readouterr().out)["root_version"] == 1
    registry = open_registry(location, keys / "online.pem")  # the server holds the online key only
    publish(registry, release)
    assert main(["refresh", "--dir", location, "--online-key", str(keys / "online.pem")]) == 0
    assert json.loads(capsys.readouterr().out)["resigned"] == []  # nothing is past half its life
    assert main(["rotate", "--dir", location, *roots[:4], "--online-key", str(keys / "online-2.pem")]) == 0
    assert json.loads(capsys.readouterr().out)["root_version"] == 2
    rotated = open_registry(location, keys / "online-2.pem")  # re-signs the online roles with the new key
    assert rotated.repo.open("timestamp").signed.version == registry.repo.open("timestamp").signed.version


def test_metadata_someone_else_wrote_into_the_bucket_is_never_built_on(location, tmp_path, release):
    registry = open_replica(location, tmp_path)
    publish(registry, release)
    open_files(location).write("tuf/metadata/timestamp.json", b'{"signed": "not ours"}')
    with pytest.raises(RegistryCorrupted, match="timestamp.json is not TUF metadata"):
        publish(registry, release)


def test_a_bad_location_or_missing_credentials_say_what_to_do(s3_server, tmp_path, monkeypatch):
    from fleet.registry.s3 import S3Error
    from fleet.store.location import StoreLocationError

    keys = tmp_path / "keys"
    with pytest.raises(StoreLocationError, match=r"registry location 's3://' names no bucket: use s3://bucket/prefix"):
        open_registry("s3://", keys / "online.pem", root_keys=[keys / "root.pem"])
    with pytest.raises(StoreLocationError, match="only local directories and s3://bucket/prefix"):
        open_files("gs://fleet/registry")
    with pytest.raises(ValueError, match="as strings"):
        open_files(Path("s3://fleet/registry"))
    with pytest.raises(S3Error, match="create bucket 'no-such-bucket' first"):
        open_registry("s3://no-such-bucket/registry", keys / "online.pem", root_keys=[keys / "root.pem"], root_threshold=1)
    assert not keys.exists()  # refused before any key file is made (an online key was written before the bucket was asked)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(S3Error, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        open_files("s3://fleet/registry")


@pytest.mark.parametrize(
    ("method", "url", "body", "token"),
    [
        ("GET", "https://fleet.s3.eu-west-1.amazonaws.com/reg/tuf/metadata/timestamp.json", b"", None),
        ("PUT", "http://127.0.0.1:9000/fleet/reg/tuf/metadata/7.targets.json", b"{}", "session-token"),
        ("GET", "http://127.0.0.1:9000/fleet?continuation-token=a%2Bb%3D&delimiter=%2F&list-type=2&prefix=reg%2Ftuf%2Fmetadata%2F", b"", None),
        ("PUT", "https://fleet.s3.eu-west-1.amazonaws.com/my%20reg/history.jsonl", b"line\n", None),
    ],
)
def test_requests_are_signed_as_botocore_signs_them(method, url, body, token, monkeypatch):
    """AWS Signature Version 4: the same Authorization header as botocore's S3 signer, byte for byte
    (moto does not check signatures; a real bucket does)."""
    import datetime

    botocore = pytest.importorskip("botocore")
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials

    from fleet.registry.s3 import Credentials, S3Settings, sign

    now = 1_700_000_000.0
    key, secret = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    ours = sign(method, httpx.URL(url), {}, body, S3Settings(region="eu-west-1", credentials=Credentials(key, secret, token)), now)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: datetime.datetime.fromtimestamp(now, datetime.timezone.utc).replace(tzinfo=None))
    theirs = AWSRequest(method=method, url=url, data=body, headers={"X-Amz-Content-SHA256": ours["x-amz-content-sha256"]})
    S3SigV4Auth(BotoCredentials(key, secret, token), "s3", "eu-west-1").add_auth(theirs)
    assert ours["authorization"] == theirs.headers["Authorization"]
    assert ours["x-amz-date"] == theirs.headers["X-Amz-Date"] and ours.get("x-amz-security-token") == theirs.headers.get("X-Amz-Security-Token")


def test_a_bucket_that_stops_answering_is_a_503_with_retry_after_for_reads_and_registry_calls(s3_server, tmp_path, release):
    """With the store's and the registry's bucket gone, reads and every registry route answered 500 internal_error
    with a traceback in the log (only uploads answered 503); the reason was hundreds of characters of Icechunk context."""
    import boto3

    from fleet.server.auth import add_token
    from fleet.server.config import ServerConfig
    from fleet.server.runner import serve
    from fleet.store import StoreConfig
    from sim.episode import Episode
    from tests.conftest import make_episode_arrays

    s3 = boto3.client("s3")
    bucket = f"gone-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    registry = open_replica(f"s3://{bucket}/registry", tmp_path)
    publish(registry, release)
    tokens = tmp_path / "tokens.json"
    robot_token, operator = add_token(tokens, "robot", "robot-0"), add_token(tokens, "operator")
    server = serve(ServerConfig(port=0, token_file=str(tokens)), StoreConfig(path=f"s3://{bucket}/store", writer_id="a"), policy_registry=registry)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            episode = Episode.create(**make_episode_arrays(), robot_id="robot-0", robot_model="toy", source="real")
            assert client.post("/v1/episodes", content=episode.to_bytes(), headers={"Authorization": f"Bearer {robot_token}"}).status_code == 201
            assert client.get("/v1/tuf/metadata/timestamp.json", headers={"Authorization": f"Bearer {robot_token}"}).status_code == 200
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):  # the bucket goes away
                for item in page.get("Contents", []):
                    s3.delete_object(Bucket=bucket, Key=item["Key"])
            s3.delete_bucket(Bucket=bucket)
            calls = [
                ("GET", "/v1/tuf/metadata/timestamp.json", robot_token),
                ("GET", "/v1/tuf/metadata/2.root.json", robot_token),
                ("GET", "/v1/episodes", operator),
                ("GET", f"/v1/episodes/{episode.episode_id}", operator),
            ]
            for method, path, token in calls:
                response = client.request(method, path, headers={"Authorization": f"Bearer {token}"})
                body = response.json()
                assert response.status_code == 503 and response.headers["Retry-After"] == "5", (path, response.text)
                assert body["error"] == ("store_unavailable" if path.startswith("/v1/episodes") else "registry_unavailable"), body
                assert len(body["reason"]) < 400 and ("NoSuchBucket" in body["reason"] or "bucket" in body["reason"].lower()), body
    finally:
        server.stop()
