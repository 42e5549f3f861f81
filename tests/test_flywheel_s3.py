"""The flywheel's episode store and policy registry on object storage (moto's S3 server on loopback,
the ``s3_server`` fixture): ``fleet.store.path`` and ``fleet.registry.dir`` of ``s3://bucket/prefix``
put the run's own at ``s3://bucket/prefix/<run id>`` (recorded in the run folder at its first start),
and nothing of either in the run folder.

What the loop stands on (``fleet.pipeline.services.Services``) is tested here, not a whole loop: one
short iteration on S3 took 43-51 s on this 2-core machine (under other load), and the loop reaches
the registry and the store only through these objects (tests/test_flywheel_e2e.py runs the loop)."""

import json
import uuid

import boto3
import pytest
from hydra import compose, initialize_config_dir

from fleet.agent.policy import builtin_policy
from fleet.pipeline.services import Services, run_id_of, run_location
from fleet.registry.pull import SignedPolicySource
from fleet.registry.store import open_registry
from fleet.registry.trust import PolicyTrust
from fleet.run_folders import FLYWHEEL_RUN, RUN_ID, recorded_run_id
from fleet.store import EpisodeStore, StoreConfig
from tests.test_flywheel_e2e import CONF
from tests.test_policy_pull_http import SPEC, exported


def flywheel_cfg(run, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("flywheel", overrides=[*overrides, "ray.num_cpus=1", "wandb.mode=disabled", f"run_dir={run}"])


def test_run_location_maps_local_paths_into_the_run_folder_and_s3_under_the_run_id(tmp_path):
    run = tmp_path / "20260101-120000"
    assert run_location("runs/fleet/registry", run, "registry", "20260101-120000-1a2b3c4d") == str(run / "registry")
    assert run_location("s3://fleet/flywheel/registry/", run, "registry", "20260101-120000-1a2b3c4d") == "s3://fleet/flywheel/registry/20260101-120000-1a2b3c4d"


def test_runs_whose_folders_share_a_name_get_their_own_locations_and_a_resume_its_own(tmp_path):
    """Two sweeps' job ``0`` (or ``runs/exp1`` in two checkouts) shared ``s3://bucket/prefix/<folder name>``: the second
    appended to the first's store and trained on its episodes. A run's id is made at its first start and recorded."""
    first, second = tmp_path / "sweep-a" / "0", tmp_path / "sweep-b" / "0"
    ids = [run_id_of(run) for run in (first, second)]
    assert ids[0] != ids[1] and all(i.startswith("0-") for i in ids)
    assert run_location("s3://fleet/runs", first, "store", ids[0]) != run_location("s3://fleet/runs", second, "store", ids[1])
    first.mkdir(parents=True)
    (first / RUN_ID).write_text(json.dumps({"run_id": ids[0]}))  # as the run records it when it starts
    assert run_id_of(first) == ids[0]  # a resume finds it again
    legacy = tmp_path / "old" / "exp1"  # a run of an earlier build (settings, no id): its store is under its folder's name
    legacy.mkdir(parents=True)
    (legacy / FLYWHEEL_RUN).write_text("{}")
    assert recorded_run_id(legacy) == "exp1"


def test_the_run_publishes_to_its_registry_on_s3_and_a_robot_pulls_it(s3_server, tmp_path):
    top, run = f"flywheel-{uuid.uuid4().hex[:8]}", tmp_path / "run"
    on_s3 = [f"fleet.store.path=s3://fleet/{top}/store", f"fleet.registry.dir=s3://fleet/{top}/registry"]
    cfg = flywheel_cfg(run, *on_s3)
    weights, manifest = exported(tmp_path, "p")
    with Services(cfg, run, ["robot-0"]) as svc:
        rid = svc.run_id
        assert rid.startswith("run-") and recorded_run_id(run) == rid  # made at the first start, recorded in the run folder
        assert svc.registry_dir == f"s3://fleet/{top}/registry/{rid}" and svc.store_cfg.path == f"s3://fleet/{top}/store/{rid}"
        assert svc.registry.publish(weights, policy=manifest, **SPEC)["version"] == 1
        trust = PolicyTrust(**SPEC, state_dir=tmp_path / "robot")
        robot = SignedPolicySource(svc.url, svc.tokens["robot-0"], "robot-0", trust, builtin_policy("zero", 1).current(), root=svc.root_metadata)
        try:
            assert robot.poll() and robot.current().version == "1"  # verified, through the run's server reading the bucket
        finally:
            robot.close()

    assert open_registry(f"s3://fleet/{top}/registry/{rid}", run / "keys" / "online.pem").versions() == [1]  # a rerun finds it
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="fleet", Prefix=f"{top}/")["Contents"]]
    assert f"{top}/registry/{rid}/tuf/metadata/timestamp.json" in keys and any(k.startswith(f"{top}/registry/{rid}/tuf/targets/") for k in keys)
    assert any(k.startswith(f"{top}/store/{rid}/icechunk/") for k in keys)
    EpisodeStore.open(StoreConfig(path=f"s3://fleet/{top}/store/{rid}"))
    assert not [p for p in run.rglob("*") if p.name in ("registry", "store", "tuf", "icechunk", "history.jsonl")]  # none of either on local disk


def test_a_resumed_run_finds_its_store_and_registry_on_s3_and_a_fresh_one_gets_its_own(s3_server, tmp_path):
    """Start, stop, resume in one run folder: the same store and registry; a fresh run in a folder of the same name gets
    its own id (its random part keeps it off the first run's locations), recorded only when it starts."""
    top = f"flywheel-{uuid.uuid4().hex[:8]}"
    on_s3 = [f"fleet.store.path=s3://fleet/{top}/store", f"fleet.registry.dir=s3://fleet/{top}/registry"]
    run, other = tmp_path / "a" / "exp1", tmp_path / "b" / "exp1"
    weights, manifest = exported(tmp_path, "p")
    with Services(flywheel_cfg(run, *on_s3), run, ["robot-0"]) as svc:
        first = (svc.run_id, svc.store_cfg.path, svc.registry_dir)
        assert svc.registry.publish(weights, policy=manifest, **SPEC)["version"] == 1
    with Services(flywheel_cfg(run, *on_s3), run, ["robot-0"]) as svc:  # the resume
        assert (svc.run_id, svc.store_cfg.path, svc.registry_dir) == first and svc.registry.versions() == [1]

    fresh = run_id_of(other)
    assert fresh != first[0] and not (other / RUN_ID).exists()  # its own location; recorded only when the run starts
