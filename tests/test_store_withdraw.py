"""Withdrawn episodes (docs/store.md, "Withdrawing episodes"): a robot's bad telemetry kept out of training while the
store keeps it. An operator had no way to do that but to copy the store without it and hand-edit the run's
state.json; the loop's carried learner and world model kept the damage after that too."""

from __future__ import annotations

import json

import pytest

from fleet.store import EpisodeStore, StoreConfig
from fleet.store.cli import main as store_cli
from fleet.store.withdrawal import Withdrawal, parse_time
from sim.episode import Episode
from tests.conftest import make_episode_arrays


def episode(seed: int, robot: str = "robot-0", source: str = "real", scenario: dict | None = None) -> Episode:
    extra = {"scenario": json.dumps(scenario)} if scenario is not None else {}
    return Episode.create(**make_episode_arrays(num_steps=3, obs_dim=3, act_dim=1, seed=seed), robot_id=robot, robot_model="pendulum", source=source, **extra)


def ids(infos) -> set[str]:
    return {i.episode_id for i in infos}


@pytest.fixture
def store(tmp_path) -> EpisodeStore:
    return EpisodeStore.create(StoreConfig(path=str(tmp_path / "store"), fsync=False))


def test_a_withdrawal_is_kept_by_the_store_and_seen_by_every_handle_and_after_a_reopen(store, tmp_path):
    bad, good = episode(0, "robot-bad"), episode(1, "robot-0")
    store.append([bad, good])
    other = EpisodeStore.open(StoreConfig(path=store.config.path, fsync=False))  # a replica's handle, opened before the rule
    rule, named = store.withdraw("sensor failed: observations x1000", robot_id="robot-bad")
    assert named == 1 and rule.id.startswith("w-") and rule.made_at > 0
    for handle in (other, store, EpisodeStore.open(StoreConfig(path=store.config.path, fsync=False))):
        snap = handle.snapshot()
        assert snap.withdrawals() == [rule] and handle.withdrawals() == [rule]
        assert ids(snap.episodes()) == {good.episode_id}  # training never sees it
        assert ids(snap.episodes(include_withdrawn=True)) == {bad.episode_id, good.episode_id}  # the audit does
        assert snap.read_episode(bad.episode_id).episode_id == bad.episode_id  # kept, bytes and all
    before = store.history(limit=2)[1]["snapshot_id"]
    assert store.snapshot(before).withdrawals() == []  # the history keeps what was in force then
    assert "withdraw episodes" in store.history(limit=1)[0]["message"]
    other.append([episode(2, "robot-0")])  # a writer that opened before the rule appends on: the rule stays
    assert store.snapshot().withdrawals() == [rule]


def test_a_duplicate_upload_stays_withdrawn_and_an_open_rule_covers_later_uploads_until_lifted(store):
    bad = episode(0, "robot-bad")
    store.append([bad, episode(1)], upload_times=[100.0, 100.0])
    rule, _ = store.withdraw("bad sensor", robot_id="robot-bad", since=50.0)
    assert store.append([bad]).statuses == ("duplicate",)  # its spool sends it again: the id index is unchanged
    later = episode(2, "robot-bad")
    store.append([later], upload_times=[200.0])
    snap = store.snapshot()
    assert not ids(snap.episodes(robot_id="robot-bad")) and len(snap.withdrawn()) == 2
    assert store.restore(rule.id) == rule
    assert ids(store.snapshot().episodes(robot_id="robot-bad")) == {bad.episode_id, later.episode_id}
    assert store.withdrawals() == []
    with pytest.raises(LookupError, match="no withdrawal rule"):
        store.restore(rule.id)


def test_a_window_and_episode_ids_withdraw_only_what_they_name(store):
    early, bad, after = episode(0, "r"), episode(1, "r"), episode(2, "r")
    store.append([early, bad, after], upload_times=[100.0, 200.0, 300.0])
    store.withdraw("the bad hour", robot_id="r", since=150.0, until=250.0)
    assert ids(store.snapshot().episodes()) == {early.episode_id, after.episode_id}
    rule, named = store.withdraw("this one too", episode_ids=[early.episode_id])
    assert named == 1 and ids(store.snapshot().episodes()) == {after.episode_id}


def test_scenario_and_world_model_episodes_made_from_a_withdrawn_robot_go_too(store):
    """The loop's scenarios start from a robot's states and calibrated body (their tag names it); its world-model
    episodes carry the source robot's id. Those stored before the bad data arrived, or from other robots, stay."""
    store.append([episode(0, "robot-0"), episode(1, "robot-0", "sim", {"tag": "dr:robot-bad"})], upload_times=[10.0, 10.0])  # before
    bad = episode(2, "robot-bad")
    store.append([bad], upload_times=[100.0])
    derived = [
        episode(3, "scenario", "sim", {"tag": "dr:robot-bad"}),
        episode(4, "scenario", "sim", {"tag": f"failure:terminated:robot-bad:{bad.episode_id}:3"}),
        episode(5, "scenario", "sim", {"tag": f"uncertainty:robot-bad:{bad.episode_id}:1"}),
        episode(6, "robot-bad", "worldmodel", {"kind": "worldmodel_branch", "source_episode_id": bad.episode_id}),
    ]
    kept = [episode(7, "scenario", "sim", {"tag": "dr:robot-0"}), episode(8, "robot-0", "worldmodel", {"kind": "worldmodel_branch"})]
    store.append([*derived, *kept], upload_times=[200.0] * 6)
    store.withdraw("bad sensor", robot_id="robot-bad", since=50.0)
    snap = store.snapshot()
    assert snap.withdrawn() == {bad.episode_id, *(e.episode_id for e in derived)}
    assert len(snap.episodes(source="sim")) == 2 and len(snap.episodes(source="worldmodel")) == 1


def test_withdraw_refuses_a_robot_or_episode_the_store_lacks_and_a_rule_naming_nothing(store):
    store.append([episode(0, "r")], upload_times=[100.0])
    with pytest.raises(LookupError, match="no episode of robot 'robot-x'"):
        store.withdraw("typo", robot_id="robot-x")
    with pytest.raises(LookupError, match="not in the store"):
        store.withdraw("typo", episode_ids=["00000000-0000-0000-0000-000000000000"])
    with pytest.raises(ValueError, match="no episode in that window"):
        store.withdraw("later", robot_id="r", since=500.0)
    with pytest.raises(ValueError, match="reason"):
        store.withdraw(" ", robot_id="r")
    with pytest.raises(ValueError, match="not before"):
        Withdrawal.new("x", robot_id="r", since=5.0, until=5.0)
    assert store.withdrawals() == []  # nothing was made
    rule, named = store.withdraw("not enrolled yet", robot_id="robot-x", force=True)
    assert named == 0 and store.withdrawals() == [rule]


def test_store_cli_withdraws_lists_and_restores(store, capsys):
    bad = episode(0, "robot-bad")
    store.append([bad, episode(1, "robot-0")], upload_times=[parse_time("2026-11-28T10:00:00Z"), 0.0])
    path = store.config.path
    assert store_cli(["withdraw", "--store", path, "--robot-id", "robot-bad", "--since", "2026-11-28T09:00", "--reason", "obs x1000"]) == 0
    made = json.loads(capsys.readouterr().out)["rule"]
    assert made["robot_id"] == "robot-bad" and made["since"] == parse_time("2026-11-28T09:00:00+00:00") and made["episodes"] == made["withdrawn"] == 1
    assert store_cli(["withdrawals", "--store", path]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in listed["rules"]] == [made["id"]] and listed["withdrawn"] == 1
    for argv, said in (
        (["withdraw", "--store", path, "--robot-id", "robot-9", "--reason", "x"], "no episode of robot 'robot-9'"),
        (["withdraw", "--store", path, "--robot-id", "robot-0", "--since", "yesterday", "--reason", "x"], "'yesterday' is not a time"),
        (["withdraw", "--store", path, "--robot-id", "robot-0", "--since", "1e12", "--reason", "x"], "no episode in that window"),
        (["withdraw", "--store", path, "--episode-id", bad.episode_id, "--until", "5", "--reason", "x"], "--since/--until select a robot"),
        (["restore", "--store", path, "--rule", "w-nope"], "no withdrawal rule 'w-nope'"),
    ):
        assert store_cli(argv) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert store_cli(["withdraw", "--store", path, "--robot-id", "robot-9", "--reason", "before it enrols", "--force"]) == 0
    capsys.readouterr()
    assert store_cli(["restore", "--store", path, "--rule", made["id"]]) == 0
    assert json.loads(capsys.readouterr().out)["rule"]["id"] == made["id"]
    assert len(store.snapshot().episodes()) == 2


def test_an_export_leaves_withdrawn_episodes_out(store):
    from fleet.interop.common import InteropError, select

    bad, good = episode(0, "robot-bad"), episode(1, "robot-0")
    store.append([bad, good])
    store.withdraw("bad sensor", robot_id="robot-bad")
    assert ids(select(store.config.path).infos) == {good.episode_id}
    with pytest.raises(InteropError, match="all withdrawn"):
        select(store.config.path, robot_id=["robot-bad"])


def test_derived_episodes_go_only_while_they_may_come_from_the_withdrawn_data(monkeypatch):
    """A second reader's case: a closed window (or one episode) withdrew every later scenario of that robot for as long as
    the rule stood, so letting its good data back in never brought its scenarios back. Derived episodes go from the
    first withdrawn upload until an hour after the rule was made (the loop reads them no more)."""
    import types

    from fleet.store.withdrawal import DERIVED_MARGIN_S, Withdrawal, parse_time, withdrawn_ids

    def info(eid: str, robot: str, source: str, t: float):
        return types.SimpleNamespace(episode_id=eid, robot_id=robot, source=source, upload_time=t)

    rule = Withdrawal("w-1", "bad imu", made_at=1000.0, robot_id="robot-0", since=100.0, until=200.0)
    catalog = [info("bad", "robot-0", "real", 150.0), info("good", "robot-0", "real", 300.0), info("before", "scenario", "sim", 50.0),
               info("from-bad", "scenario", "sim", 160.0), info("late", "scenario", "sim", 1000.0 + DERIVED_MARGIN_S + 1)]  # fmt: skip
    assert withdrawn_ids(catalog, [rule], lambda infos: ["robot-0"] * len(infos)) == {"bad", "from-bad"}
    with pytest.raises(ValueError, match="before 2000: write a date as ISO 8601"):
        parse_time("20261128")
    with pytest.raises(ValueError, match=r"since \(2026-11-28T10:00:00\+00:00\) is not before until \(2026-11-28T09:00:00\+00:00\)"):
        Withdrawal("w-2", "x", 0.0, robot_id="r", since=parse_time("2026-11-28T10:00Z"), until=parse_time("2026-11-28T09:00Z"))
