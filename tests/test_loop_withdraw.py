"""The loop and withdrawn episodes (docs/store.md, "Withdrawing episodes"): it reads none, and it drops what it learned
from them (the carried learner, the world model, the robots' calibration) when the store's rules change. Before, an
operator had to edit state.json by hand: with the store cleaned, the carried learner kept every candidate under the gate."""

from __future__ import annotations

import json
import types

import pytest

from fleet.pipeline.services import Services
from fleet.store import EpisodeStore, StoreConfig
from tests.test_loop_resume import flywheel
from tests.test_store_withdraw import episode


@pytest.fixture
def store(tmp_path) -> EpisodeStore:
    return EpisodeStore.create(StoreConfig(path=str(tmp_path / "store"), fsync=False))


def test_the_loop_reads_no_withdrawn_episode(store):
    bad, good = episode(0, "robot-bad"), episode(1, "robot-0")
    store.append([bad, good, episode(2, "scenario", "sim", {"tag": "dr:robot-bad"}), episode(3, "scenario", "sim", {"tag": "dr:robot-0"})])
    start = store.latest_snapshot_id()
    services = Services.of_store(store)
    assert "withdrawals" not in services.read_data("pendulum", start)[3]
    rule, _ = store.withdraw("bad sensor", robot_id="robot-bad")  # made after the iteration began: its sim episodes go too
    _, real, sim, counts = services.read_data("pendulum", start)
    assert [e.episode_id for e in real] == [good.episode_id] and [e.json_metadata("scenario")["tag"] for e in sim] == ["dr:robot-0"]
    assert counts["withdrawn"] == {"real": 1, "sim": 1} and counts["withdrawals"] == {rule.id: ["robot-bad"]}
    assert counts["real_in_store"] == 1 and counts["sim_in_store"] == 1


def test_the_loop_drops_its_learner_world_model_and_the_robots_calibration_when_the_rules_change(store, tmp_path):
    """The carried learner's replay and the world model held the withdrawn data: after the store alone was cleaned,
    no candidate passed the gate until state.json was edited by hand. A resumed run resets the same way."""
    from worldmodel.io import META_FILE

    store.append([episode(0, "robot-bad"), episode(1, "robot-0")])
    run = tmp_path / "run"
    fw = flywheel(run)
    (run / "worldmodel").mkdir(parents=True)
    (run / "worldmodel" / META_FILE).write_text("{}")  # a model an earlier build kept in worldmodel/ itself: not taken back either
    carried = {"learner": {"iteration": 3, "checkpoint": str(run / "policies" / "iter003" / "state.safetensors"), "export": str(run / "x")},
               "worldmodel": str(run / "worldmodel" / "iter003"), "learner_env_steps": 5000,
               "calibrated_profiles": {"robot-bad": {"mass_scale": 9.0}, "robot-0": {"mass_scale": 1.1}},
               "sensor_beliefs": {"robot-bad": {"mean": [1.0]}, "robot-0": {"mean": [0.0]}}}  # fmt: skip

    def rules_now() -> dict:
        return Services.of_store(store).read_data("pendulum")[3].get("withdrawals", {})

    fw.state.update(json.loads(json.dumps(carried)))
    record = {}
    fw._after_withdrawals(4, record, rules_now())
    assert fw.state["learner"] == carried["learner"] and not record  # no rule, none before: nothing changes
    rule, _ = store.withdraw("bad sensor", robot_id="robot-bad")
    notes = []
    fw.progress = types.SimpleNamespace(note=notes.append)
    fw._after_withdrawals(4, record, rules_now())
    assert fw.state["learner"] is None and fw.state["worldmodel"] is None and fw._world_model_dir() is None
    assert fw.state["learner_env_steps"] == 5000  # the run's budget counts on
    assert set(fw.state["calibrated_profiles"]) == {"robot-0"} and set(fw.state["sensor_beliefs"]) == {"robot-0"}
    assert record["withdrawals"] == {"added": [rule.id], "lifted": [], "robots": ["robot-bad"], "reset": ["learner", "worldmodel"]}
    assert len(notes) == 1 and rule.id in notes[0] and "start afresh" in notes[0]
    fw._save_state()
    assert json.loads((run / "state.json").read_text())["withdrawals"] == {rule.id: ["robot-bad"]}

    resumed = flywheel(run)  # a resume with the same rules: what it trains from now on is kept
    resumed.state["learner"] = carried["learner"]
    resumed._after_withdrawals(5, record := {}, rules_now())
    assert resumed.state["learner"] == carried["learner"] and not record
    store.restore(rule.id)  # lifting it gives the episodes back: what was learned without them goes too
    resumed._after_withdrawals(5, record, rules_now())
    assert resumed.state["learner"] is None and record["withdrawals"]["lifted"] == [rule.id] and record["withdrawals"]["robots"] == ["robot-bad"]

    interrupted = flywheel(tmp_path / "run2")  # stopped after the reset, before its iteration saved the state: the redo resets again
    interrupted.state.update(json.loads(json.dumps(carried)))
    store.withdraw("again", robot_id="robot-bad")
    interrupted._after_withdrawals(0, {}, rules_now())
    again = flywheel(tmp_path / "run2")
    again.state.update(json.loads(json.dumps(carried)))
    again._after_withdrawals(0, {}, rules_now())
    assert again.state["learner"] is None and again.state["worldmodel"] is None


def test_a_robot_whose_physics_cannot_explain_its_telemetry_is_named():
    """A poisoned-data probe's robots (observations x1000, mislabelled actions) calibrated to a normalised error of 2.6-47
    against ~1e-15 for healthy ones; it was in summary.json only, and the profile was used with no word."""
    from fleet.pipeline.loop import unexplained_telemetry

    assert unexplained_telemetry({"robot-0": 1e-15, "robot-noisy": 0.78}) is None  # the demo's noisy sensor: its noise's share
    said = unexplained_telemetry({"robot-0": 1e-15, "robot-bad": 47.2, "robot-b2": 2.6})
    assert said.startswith("the robot's physics cannot explain the telemetry of robot-b2 (normalised error 2.6), robot-bad (normalised error 47.2)")
    assert "flywheel store withdraw --robot-id" in said


def test_a_rule_on_another_models_robot_resets_nothing(store):
    """On a store shared by several models' servers, a rule on another model's robot reset this loop's learner."""
    from tests.conftest import make_episode_arrays
    from sim.episode import Episode

    store.append([episode(0, "robot-0"), Episode.create(**make_episode_arrays(num_steps=3, seed=4), robot_id="arm-1", robot_model="arm", source="real")])
    store.withdraw("broken gripper", robot_id="arm-1")
    counts = Services.of_store(store).read_data("pendulum")[3]
    assert "withdrawals" not in counts
    store.withdraw("bad sensor", robot_id="robot-0")
    assert list(Services.of_store(store).read_data("pendulum")[3]["withdrawals"].values()) == [["robot-0"]]
