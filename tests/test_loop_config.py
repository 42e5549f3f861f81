"""`flywheel` builds its server, registry and robots from the ``fleet`` group, and refuses at start a key it sets
itself (fleet/pipeline/loop_config.py): these keys were accepted and silently ignored, and the recorded config showed
them as if applied. Config-level: nothing here starts Ray or a loop."""

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import fleet.conf.schema_flywheel  # noqa: F401  (registers the schemas the YAML's defaults name)
from fleet.conf import CONF_DIR
from fleet.pipeline.loop_config import LOOP_SETS, LoopFleet
from fleet.run_folders import FLYWHEEL_RUN, flywheel_run_settings


def _flywheel(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="flywheel", overrides=[*overrides, "run_dir=/tmp/flywheel-test-loop-config"])


def test_the_loop_builds_its_fleet_from_the_fleet_group():
    fleet = LoopFleet.from_cfg(_flywheel(
        "fleet.server.max_body_bytes=2048", "fleet.server.commit_rejoin_ms=60", "fleet.agent.compress_uploads=false",
        "fleet.agent.spool_max_bytes=5", "fleet.registry.root_threshold=3", "+fleet.registry.expiry_s.targets=1209600",
    ))  # fmt: skip
    assert (fleet.server.max_body_bytes, fleet.server.commit_rejoin_ms) == (2048, 60)
    assert (fleet.agent.compress_uploads, fleet.agent.spool_max_bytes) == (False, 5)
    assert (fleet.root_threshold, fleet.expiry_s) == (3, {"targets": 1209600.0})
    default = LoopFleet.from_cfg(_flywheel())  # the loop's robots retry their loopback server soon (flywheel.yaml)
    assert (default.agent.backoff_initial_s, default.agent.backoff_max_s, default.root_threshold, default.expiry_s) == (0.2, 2.0, 2, {})


@pytest.mark.parametrize(
    "override, reason",
    [
        ("fleet.server.max_body_bytes=100", "fleet.server: max_body_bytes must be >= 1024"),  # flywheel-server's own check
        ("fleet.agent.spool_max_bytes=0", "fleet.agent: spool_max_bytes must be >= 1"),
        ("fleet.registry.root_threshold=4", "fleet.registry.root_threshold=4: it must be 1..3"),
        ("+fleet.registry.expiry_s.tagrets=1", "fleet.registry.expiry_s: 'tagrets' is no role"),
        ("fleet.server.port=1", "fleet.server.port=1 is not read by flywheel: the loop's server takes a free port"),
        ("fleet.server.host=0.0.0.0", "set ray.node_ip_address instead"),
        ("fleet.server.token_file=t.json", "fleet.server.token_file=t.json is not read by flywheel"),
        ("fleet.agent.server_url=http://h:1", "fleet.agent.server_url=http://h:1 is not read by flywheel"),
        ("fleet.agent.spool_dir=sp", "fleet.agent.spool_dir=sp is not read by flywheel"),
        ("fleet.registry.root_keys=[a.pem]", "fleet.registry.root_keys=['a.pem'] is not read by flywheel"),
        ("fleet.registry.online_key=o.pem", "<run_dir>/keys"),
        ("fleet.store.path=elsewhere", "a local store is <run_dir>/store; set run_dir instead"),
        ("policy.trainer.robot=reacher", "policy.trainer.robot=reacher is not read by flywheel: the learner trains on the fleet's robot model; set loop.robot_model=reacher instead"),
        ("policy.trainer.seed=7", "policy.trainer.seed=7 is not read by flywheel"),
    ],
)
def test_the_loop_refuses_a_fleet_key_it_cannot_honour_before_anything_runs(override, reason, tmp_path):
    from fleet.pipeline.loop import Flywheel

    with pytest.raises(ValueError) as refused:
        Flywheel(_flywheel(override), tmp_path / "run")
    assert reason in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()


def test_every_key_the_loop_sets_is_in_the_tree():
    cfg = _flywheel()
    for key in LOOP_SETS:
        parent, leaf = key.rsplit(".", 1)
        assert leaf in OmegaConf.select(cfg, parent), key


def test_the_learners_robot_follows_loop_robot_model_and_object_storage_is_read():
    cfg = _flywheel("loop.robot_model=reacher", "loop.episode_steps=50", "fleet.store.path=s3://b/p", "fleet.registry.dir=s3://b/r")
    assert cfg.policy.trainer.robot == "reacher"
    LoopFleet.from_cfg(cfg)


def test_a_run_recorded_with_the_policy_groups_robot_placeholder_resumes(tmp_path):
    """An earlier build recorded policy.trainer.robot='pendulum' (the policy group's, which the loop overwrote) beside
    loop.robot_model='reacher'; now the learner's robot is loop.robot_model's, and that is no other setting."""
    cfg = _flywheel("loop.robot_model=reacher", "loop.episode_steps=50")
    now = flywheel_run_settings(cfg, tmp_path)
    (tmp_path / FLYWHEEL_RUN).write_text(json.dumps({**now, "policy.trainer.robot": "pendulum"}))
    assert flywheel_run_settings(cfg, tmp_path) == now
