"""The flywheel's episode store and policy registry on object storage (moto's S3 server on loopback,
the ``s3_server`` fixture): ``fleet.store.path`` and ``fleet.registry.dir`` of ``s3://bucket/prefix``
put the run's own at ``s3://bucket/prefix/<run folder>``, and nothing of either in the run folder.

What the loop stands on (``fleet.pipeline.services.Services``) is tested here, not a whole loop: one
short iteration on S3 took 43-51 s on this 2-core machine (under other load), and the loop reaches
the registry and the store only through these objects (tests/test_flywheel_e2e.py runs the loop)."""

import uuid

import boto3
from hydra import compose, initialize_config_dir

from fleet.agent.policy import builtin_policy
from fleet.pipeline.services import Services, run_location
from fleet.registry.pull import SignedPolicySource
from fleet.registry.store import open_registry
from fleet.registry.trust import PolicyTrust
from fleet.store import EpisodeStore, StoreConfig
from tests.test_flywheel_e2e import CONF
from tests.test_policy_pull_http import SPEC, exported


def test_run_location_maps_local_paths_into_the_run_folder_and_s3_under_the_run_name(tmp_path):
    run = tmp_path / "20260101-120000"
    assert run_location("runs/fleet/registry", run, "registry") == str(run / "registry")
    assert run_location("s3://fleet/flywheel/registry/", run, "registry") == "s3://fleet/flywheel/registry/20260101-120000"


def test_the_run_publishes_to_its_registry_on_s3_and_a_robot_pulls_it(s3_server, tmp_path):
    top, run = f"flywheel-{uuid.uuid4().hex[:8]}", tmp_path / "run"
    on_s3 = [f"fleet.store.path=s3://fleet/{top}/store", f"fleet.registry.dir=s3://fleet/{top}/registry"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("flywheel", overrides=[*on_s3, "ray.num_cpus=1", "wandb.mode=disabled", f"run_dir={run}"])
    weights, manifest = exported(tmp_path, "p")
    with Services(cfg, run, ["robot-0"]) as svc:
        assert svc.registry_dir == f"s3://fleet/{top}/registry/run" and svc.store_cfg.path == f"s3://fleet/{top}/store/run"
        assert svc.registry.publish(weights, policy=manifest, **SPEC)["version"] == 1
        trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
        robot = SignedPolicySource(svc.url, svc.tokens["robot-0"], "robot-0", trust, builtin_policy("zero", 1).current(), root=svc.root_metadata)
        try:
            assert robot.poll() and robot.current().version == "1"  # verified, through the run's server reading the bucket
        finally:
            robot.close()

    assert open_registry(f"s3://fleet/{top}/registry/run", run / "keys" / "online.pem").versions() == [1]  # a rerun finds it
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="fleet", Prefix=f"{top}/")["Contents"]]
    assert f"{top}/registry/run/tuf/metadata/timestamp.json" in keys and any(k.startswith(f"{top}/registry/run/tuf/targets/") for k in keys)
    assert any(k.startswith(f"{top}/store/run/icechunk/") for k in keys)
    EpisodeStore.open(StoreConfig(path=f"s3://fleet/{top}/store/run"))
    assert not [p for p in run.rglob("*") if p.name in ("registry", "store", "tuf", "icechunk", "history.jsonl")]  # none of either on local disk
