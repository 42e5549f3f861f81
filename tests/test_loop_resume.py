"""What a resumed flywheel run finds and settles before it redoes an interrupted iteration: a release the iteration
left half done (a canary, or a release widened before the state was saved), its log rows, its robots. The loop's
end-to-end crash test is tests/test_flywheel_e2e.py; these check each rule on a real registry, without Ray."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from fleet.pipeline.loop import RELEASE_FILE, Flywheel
from fleet.registry.store import open_registry
from fleet.tracking import Tracker
from tests.test_policy_pull_http import SPEC, exported

CONF = Path(__file__).resolve().parents[1] / "conf"


def flywheel(run_dir: Path, *overrides: str) -> Flywheel:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("flywheel", overrides=["loop.num_robots=2", "wandb.mode=disabled", f"run_dir={run_dir}", *overrides])
    return Flywheel(cfg, run_dir)


def interrupted_release(tmp_path, widened: bool) -> tuple[Flywheel, object]:
    """A run whose iteration 0 published v2 (v1 stable before it) and stopped before saving its state."""
    run = tmp_path / "run"
    registry = open_registry(run / "registry", run / "keys" / "online.pem", root_keys=[run / "keys" / f"root-{i}.pem" for i in (1, 2, 3)])
    weights, manifest = exported(tmp_path, "p")
    registry.publish(weights, policy=manifest, **SPEC, note="an earlier run's")
    export = run / "policies" / "iter000" / "export"
    export.mkdir(parents=True)
    (export / "manifest.json").write_text(json.dumps(manifest))
    (run / RELEASE_FILE).write_text(json.dumps({"iteration": 0, "export": str(export)}))
    registry.publish(weights, policy=manifest, **SPEC, cohort=["robot-0"], note="iteration 0")
    if widened:
        registry.widen()
    fw = flywheel(run)
    fw.state["current"] = {"version": 1, "checkpoint": None, "export": "somewhere"}
    fw.svc = types.SimpleNamespace(registry=registry)
    return fw, registry


def test_a_canary_left_by_an_interrupted_iteration_is_rolled_back_before_the_redo(tmp_path):
    """Once the redo's robot-0 ran the abandoned canary v2 for its telemetry, and v2 was never rolled back or widened."""
    fw, registry = interrupted_release(tmp_path, widened=False)
    fw._settle_release()
    rollout = registry.rollout()
    assert rollout["canary"] is None and rollout["stable"] == 3  # v1's weights again, under a new version
    assert [(e["version"], e["event"]) for e in rollout["history"]][-2:] == [(3, "stable"), (2, "rolled_back")]
    assert fw.state["current"]["version"] == 1 and not (fw.run_dir / RELEASE_FILE).exists()


def test_a_release_widened_by_an_interrupted_iteration_becomes_the_current_policy(tmp_path):
    """Once the redo gated its candidate against the zero policy while every robot ran the widened v2."""
    fw, registry = interrupted_release(tmp_path, widened=True)
    fw._settle_release()
    assert registry.rollout()["stable"] == 2 and fw.state["current"]["version"] == 2
    kept = Path(fw.state["current"]["export"])
    assert kept != fw.run_dir / "policies" / "iter000" / "export" and (kept / "manifest.json").exists()  # the redo cannot overwrite it
    assert json.loads((fw.run_dir / "state.json").read_text())["current"]["version"] == 2  # saved at once
    assert not (fw.run_dir / RELEASE_FILE).exists()


def test_a_resume_drops_the_interrupted_iterations_log_rows(tmp_path):
    """metrics.jsonl was appended to: the interrupted attempt's rows stayed beside the redo's (up to 25 pairs twice)."""
    rows = [{"step": 0, "fleet/return_mean": 1.0}, {"step": 1, "fleet/return_mean": 2.0}, {"step": 1, "gate/x": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Tracker(tmp_path, mode="disabled", redo_from=1).log({"fleet/return_mean": 2.5}, 1)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [rows[0], {"step": 1, "fleet/return_mean": 2.5}]


def test_a_resume_drops_the_rows_of_an_attempt_at_the_first_iteration_too(tmp_path, monkeypatch):
    """Rows were dropped only after a finished iteration: a run stopped in iteration 0 kept its first attempt's rows (19
    keys at step 0 twice, and a second policy/* evaluation) beside the redo's. A fresh run has nothing to drop."""
    from fleet.pipeline import loop as loop_module

    class Started(Exception):
        pass

    def services(cfg, run_dir, robot_ids, redo_from=None, fleet=None, run_id=None):  # the tracker Services opens, then stop before Ray
        Tracker(run_dir, mode="disabled", redo_from=redo_from).finish()
        raise Started

    monkeypatch.setattr(loop_module, "Services", services)
    run = tmp_path / "run"
    with pytest.raises(Started):
        flywheel(run).run()  # a fresh run
    assert (run / "metrics.jsonl").read_text() == ""
    attempt = [{"step": 0, "fleet/return_mean": 1.0}, {"step": 0, "policy/actor_loss": 0.5, "policy/env_steps": 400}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in attempt))  # stopped in iteration 0: no state.json
    with pytest.raises(Started):
        flywheel(run).run()
    assert (run / "metrics.jsonl").read_text() == ""


def test_fewer_robots_on_resume_are_refused_before_anything_runs(tmp_path):
    """loop.num_robots may grow on resume; a shrink once ran the robots, then failed with a KeyError for the one gone."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(json.dumps({"next_iteration": 1, "current": None, "learner": None, "history": [], "real_steps": {"robot-0": 5, "robot-1": 5}}))
    with pytest.raises(ValueError, match=r"would drop robot-1: resume with loop.num_robots >= 2"):
        flywheel(run, "loop.num_robots=1")
    assert flywheel(run, "loop.num_robots=3").specs.keys() == {"robot-0", "robot-1", "robot-2"}


def test_a_rerun_of_a_finished_run_says_there_is_nothing_to_do_and_starts_nothing(tmp_path):
    """A finished run rerun (with its settings, or fewer loop.iterations) started Ray, the server, the robots and an empty
    W&B run, then exited 0 without a word, its summary.json pointed at that run; an unfinished one with fewer is refused."""
    import subprocess
    import sys

    from fleet.run_folders import record_run_settings

    run = tmp_path / "run"
    record_run_settings(run, flywheel(run).run_settings)
    record = {"iteration": 2, "fleet_returns": {"robot-0": 1.0, "robot-1": 1.0}, "policy_versions": ["1"], "real_steps": {"robot-0": 5, "robot-1": 5}}
    state = {"next_iteration": 2, "current": None, "learner": None, "history": [], "real_steps": record["real_steps"], "final": record}
    (run / "state.json").write_text(json.dumps(state))
    (run / "summary.json").write_text(json.dumps({"wandb_dir": "the first start's"}))
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- the first start's\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for iterations in (2, 1):
        result = subprocess.run(
            [sys.executable, "-m", "fleet.apps.flywheel", "loop.num_robots=2", f"loop.iterations={iterations}", f"run_dir={run}"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
        assert result.returncode == 0 and f"run_dir {run} holds a finished run of 2 iterations" in result.stdout, result.stdout + result.stderr[-2000:]
        assert "nothing to do" in result.stdout and "raise loop.iterations to continue it" in result.stdout
        assert ("loop.iterations=1 is fewer" in result.stdout) == (iterations == 1)
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # its record, summary.json, no W&B run
    (run / "state.json").write_text(json.dumps({**state, "final": None}))  # stopped in its closing round
    with pytest.raises(ValueError, match=r"holds a run of 2 finished iterations: resume it with loop.iterations >= 2"):
        flywheel(run, "loop.iterations=1")


def test_w_and_b_names_sweep_jobs_and_later_starts_of_a_run_apart(tmp_path):
    """Sweep jobs were all named "0", "1" (every sweep alike), and a resumed run was a second run of the same name
    with nothing linking it to the first; flywheel-train's runs had no name at all."""
    from fleet.tracking import run_names

    sweep = tmp_path / "runs" / "20261128-010203"
    (sweep / "1").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}")
    assert run_names(sweep / "1") == ("20261128-010203/1", "20261128-010203")
    single = tmp_path / "runs" / "20261128-020304"
    assert run_names(single) == ("20261128-020304", "20261128-020304")
    (single / "wandb" / "offline-run-20261128_020305-abc").mkdir(parents=True)
    (single / "wandb" / "latest-run").symlink_to(single / "wandb" / "offline-run-20261128_020305-abc")
    assert run_names(single) == ("20261128-020304-resumed-1", "20261128-020304")  # the second start, in the first's group


def test_a_redone_iteration_trains_on_the_sim_data_its_first_attempt_began_with(tmp_path):
    """The interrupted attempt's scenario episodes were in the redo's snapshot: its world model trained on its own
    iteration's scenarios, and the resumed run went another way than an uninterrupted one."""
    from fleet.pipeline.services import Services
    from fleet.store import EpisodeStore, StoreConfig
    from sim.episode import Episode
    from tests.conftest import make_episode_arrays

    fw = flywheel(tmp_path / "run")
    fw.run_dir.mkdir()  # as Services makes it
    tip, pinned, released = ["snapshot-before"], [], []
    fw.svc = types.SimpleNamespace(pinned_tip=lambda: pinned.append(tip[0]) or tip[0], pin_start=pinned.append, release_start=released.append)
    assert fw._iteration_start(0) == "snapshot-before"
    tip[0] = "snapshot-after-the-attempt"
    assert fw._iteration_start(0) == "snapshot-before"  # the redo: as the first attempt began
    assert fw._iteration_start(1) == "snapshot-after-the-attempt"  # the next iteration: as it begins
    # each start pinned (the redo's again: a run folder of an earlier build never pinned it), iteration 0's let go once 1 began
    assert (pinned, released) == (["snapshot-before", "snapshot-before", "snapshot-after-the-attempt"], ["snapshot-before"])

    def episode(seed: int, source: str) -> Episode:
        return Episode.create(**make_episode_arrays(num_steps=3, seed=seed), robot_id="robot-0", robot_model="pendulum", source=source)

    store = EpisodeStore.create(StoreConfig(path=str(tmp_path / "store"), fsync=False))
    earlier = episode(1, "sim")
    store.append([episode(0, "real"), earlier])
    before = store.latest_snapshot_id()
    newest = episode(2, "real")
    store.append([newest, episode(3, "sim")])  # the attempt's telemetry, then its scenarios
    services = Services.of_store(store)  # what the loop stands on, its store alone (no Ray, no server)
    _, real, sim, counts = services.read_data("pendulum", before)
    assert len(real) == 2 and [e.episode_id for e in sim] == [earlier.episode_id]
    assert counts == {"real": 2, "sim": 1, "real_in_store": 2, "sim_in_store": 1}
    assert len(services.read_data("pendulum")[2]) == 2  # unpinned: everything
    _, real, sim, counts = services.read_data("pendulum", None, 3, 0)  # a window of 3 real steps and none of sim
    assert [e.episode_id for e in real] == [newest.episode_id] and not sim  # the newest
    assert counts == {"real": 1, "sim": 0, "real_in_store": 2, "sim_in_store": 2}


def test_episodes_of_another_layout_under_the_robots_model_are_left_out_and_named(tmp_path):
    """A robot whose firmware update widened its observation (4 -> 5) under the same robot_model: its episodes were read
    with the others, and calibration stopped every iteration of the fleet's training ("observations must be (N, 4)")."""
    from fleet.pipeline.services import Services
    from fleet.store import EpisodeStore, StoreConfig
    from sim.episode import Episode
    from tests.conftest import make_episode_arrays

    def episode(seed: int, robot: str, obs_dim: int, source: str = "real") -> Episode:
        return Episode.create(**make_episode_arrays(num_steps=3, obs_dim=obs_dim, act_dim=1, seed=seed), robot_id=robot, robot_model="pendulum", source=source)

    store = EpisodeStore.create(StoreConfig(path=str(tmp_path / "store"), fsync=False))
    store.append([episode(0, "robot-0", 4), episode(1, "robot-fw", 5), episode(2, "robot-fw", 5), episode(3, "robot-0", 4, "sim"), episode(4, "x", 4, "sim")])
    state = make_episode_arrays(num_steps=3, obs_dim=4, act_dim=1, seed=9)  # the right widths, but a qpos of 7 where the body has 2
    store.append([Episode.create(**state, robot_id="robot-q", robot_model="pendulum", source="real", extras={"qpos": np.zeros((4, 7), np.float32)})])
    layout = {"observation": 4, "action": 1, "qpos": 2, "qvel": 2}
    _, real, sim, counts = Services.of_store(store).read_data("pendulum", None, None, None, layout)
    assert [e.metadata["robot_id"] for e in real] == ["robot-0"] and len(sim) == 2
    assert counts["other_layout"] == {"robot-fw": {"episodes": 2, "layouts": ["action 1, observation 5"]},
                                      "robot-q": {"episodes": 1, "layouts": ["action 1, observation 4, qpos 7"]}} and counts["real_in_store"] == 1  # fmt: skip
    assert "other_layout" not in Services.of_store(store).read_data("pendulum", None, None, None, None)[3]  # no dims: all, as before


def test_each_iteration_reads_only_the_catalog_rows_committed_since_the_last(tmp_path, monkeypatch):
    """The loop reads its iteration's start (for the sim episodes) and the tip: the start was opened without a base, so
    every iteration loaded the whole catalog however long the fleet had run (a second reader's count: 20, 40, 60, 80)."""
    from fleet.pipeline.services import Services
    from fleet.store import EpisodeStore, StoreConfig
    from fleet.store.reader import StoreSnapshot
    from sim.episode import Episode
    from tests.conftest import make_episode_arrays

    loaded = []
    load_partition = StoreSnapshot._load_partition

    async def counted(self, writer, start):
        rows = await load_partition(self, writer, start)
        loaded.append(len(rows))
        return rows

    monkeypatch.setattr(StoreSnapshot, "_load_partition", counted)
    store = EpisodeStore.create(StoreConfig(path=str(tmp_path / "store"), fsync=False))
    services = Services.of_store(store)
    seed = iter(range(1000))

    def stored(source: str, n: int) -> None:
        store.append([Episode.create(**make_episode_arrays(num_steps=3, seed=next(seed)), robot_id="robot-0", robot_model="pendulum", source=source) for _ in range(n)])

    per_iteration = []
    for _ in range(4):  # as the loop: the start, the robots' telemetry, the read, then the iteration's scenarios
        start = store.latest_snapshot_id()
        stored("real", 3)
        loaded.clear()
        _, real, sim, _ = services.read_data("pendulum", start)
        per_iteration.append(sum(loaded))
        stored("sim", 2)
    assert per_iteration == [3, 5, 5, 5] and len(real) == 12 and len(sim) == 6  # the new rows only: 2 scenarios, 3 uploads


def test_a_run_folder_moved_or_copied_resumes_from_its_own_files(tmp_path):
    """state.json held absolute paths: a copied folder warm-started from the original's checkpoint, a moved one failed."""
    import shutil

    run = tmp_path / "run"
    fw = flywheel(run)
    export = run / "policies" / "iter000" / "export"
    export.mkdir(parents=True)
    fw.state.update(next_iteration=1, current={"version": 1, "checkpoint": None, "export": str(export)}, worldmodel=str(run / "worldmodel" / "iter000"))
    (run / "worldmodel" / "iter000").mkdir(parents=True)
    (run / "worldmodel" / "iter009").mkdir()  # an abandoned attempt's model
    fw._save_state()
    assert not (run / "worldmodel" / "iter009").exists() and (run / "worldmodel" / "iter000").is_dir()  # only the state's model stays
    assert json.loads((run / "state.json").read_text())["current"]["export"] == "policies/iter000/export"  # kept relative
    shutil.move(run, tmp_path / "moved")
    moved = flywheel(tmp_path / "moved")
    assert moved.state["current"]["export"] == str(tmp_path / "moved" / "policies/iter000/export")
    assert moved.state["worldmodel"] == str(tmp_path / "moved" / "worldmodel/iter000")
    state = json.loads((tmp_path / "moved" / "state.json").read_text())  # as an earlier build wrote it: absolute, of the old place
    state["current"]["export"] = str(export)
    (tmp_path / "moved" / "state.json").write_text(json.dumps(state))
    assert flywheel(tmp_path / "moved").state["current"]["export"] == str(tmp_path / "moved" / "policies/iter000/export")


def loop_with_release(tmp_path) -> tuple[Flywheel, object]:
    """A run whose iterations released v1 and then v2 (the state's current policy), its registry as the run keeps it."""
    run = tmp_path / "run"
    registry = open_registry(run / "registry", run / "keys" / "online.pem", root_keys=[run / "keys" / f"root-{i}.pem" for i in (1, 2, 3)])
    for k, push in enumerate((0.0, 0.3)):
        weights, manifest = exported(run / "policies" / f"iter{k:03d}", "export", push)
        registry.publish(weights, policy=manifest, **SPEC, note=f"iteration {k}")
    fw = flywheel(run)
    fw.state["current"] = {"version": 2, "checkpoint": None, "export": str(run / "policies" / "iter001" / "export")}
    fw.svc = types.SimpleNamespace(registry=registry)
    return fw, registry


def test_a_resumed_run_adopts_the_fleets_release_after_an_operators_rollback(tmp_path, caplog):
    """The loop kept the withdrawn v2 as the gate's baseline and the next release's parent after an operator rolled the
    fleet back to v1's weights (as v3): it gated against, and re-promoted over, the policy the operator withdrew."""
    import logging

    from policies.runtime import load_policy

    fw, registry = loop_with_release(tmp_path)
    registry.rollback("v2 drops the pole", to=1)
    with caplog.at_level(logging.WARNING, logger="fleet.pipeline.fleet_release"):
        fw._follow_fleet(2)
    current = fw.state["current"]
    assert current["version"] == 3 and current["checkpoint"] is None
    assert "the fleet runs v3 (rollback of v2 to the weights of v1: v2 drops the pole), not v2" in caplog.text
    policy = load_policy(current["export"], robot_model="pendulum", obs_dim=4, act_dim=1)  # the gate's baseline: v1's weights
    assert policy.manifest["weights"]["sha256"] == registry.manifest(1)["policy"]["weights"]["sha256"]
    assert json.loads((fw.run_dir / "state.json").read_text())["current"]["version"] == 3  # saved: a resume keeps it
    caplog.clear()
    fw._follow_fleet(3)  # the fleet runs the current policy: nothing more
    assert fw.state["current"] == current and caplog.text == ""


def test_the_loops_own_releases_are_not_taken_for_an_operators(tmp_path, caplog):
    """The loop's canary rollback republishes the current policy's weights under a new version: only the version moves,
    silently. A release of the loop's own ('iteration k') is settled by _settle_release, not adopted here."""
    import logging

    fw, registry = loop_with_release(tmp_path)
    export = fw.state["current"]["export"]
    registry.publish(b"w", **SPEC, cohort=["robot-0"], note="iteration 2")
    registry.rollback("canary regressed", canary=3)  # v4: v2's weights again
    with caplog.at_level(logging.WARNING):
        fw._follow_fleet(3)
    assert fw.state["current"] == {"version": 4, "checkpoint": None, "export": export} and caplog.text == ""
    fw.state["current"] = {"version": 1, "checkpoint": None, "export": export}
    registry.publish(b"w5", **SPEC, note="iteration 3")
    fw._follow_fleet(4)
    assert fw.state["current"]["version"] == 1  # its own: left as the state says


def test_a_first_canary_left_by_an_interrupted_iteration_stays_on_its_cohort(tmp_path, caplog):
    """With no stable version, settling once 'rolled back' the canary by clearing it; robot-0 kept running it all the same.
    The registry now refuses that rollback, and the resume says the cohort keeps the canary until the redo's release."""
    import logging

    run = tmp_path / "run"
    registry = open_registry(run / "registry", run / "keys" / "online.pem", root_keys=[run / "keys" / f"root-{i}.pem" for i in (1, 2, 3)])
    weights, manifest = exported(tmp_path, "p")
    registry.publish(weights, policy=manifest, **SPEC, cohort=["robot-0"], note="iteration 0")
    (run / RELEASE_FILE).write_text(json.dumps({"iteration": 0, "export": str(tmp_path / "p")}))
    fw = flywheel(run)
    fw.svc = types.SimpleNamespace(registry=registry)
    with caplog.at_level(logging.WARNING, logger="fleet.pipeline.loop"):
        fw._settle_release()
    assert "no stable version to return its cohort to, so it stays on robot-0" in caplog.text
    assert (registry.rollout()["canary"], registry.rollout()["stable"]) == (1, None) and not (run / RELEASE_FILE).exists()


def releasing(tmp_path, during_canary=None, after: float = 1.0) -> tuple[Flywheel, object, object]:
    """A run like :func:`loop_with_release` at iteration 2, set to release a candidate (pushing 0.6) to canary robot-0
    without Ray: (flywheel, registry, a call releasing it). ``during_canary(registry)`` runs while the canary does, and
    the canary returns ``after`` (1.0 as before: widened; lower: rolled back)."""
    fw, registry = loop_with_release(tmp_path)
    weights, manifest = exported(tmp_path / "candidate", "export", 0.6)
    fw.svc = types.SimpleNamespace(registry=registry, tracker=types.SimpleNamespace(log=lambda *a, **k: None), mirror_policy=lambda *a, **k: None)
    fw.robots, fw._video = {"robot-0": None, "robot-1": None}, lambda *a, **k: None
    fw.task = types.SimpleNamespace(obs_dim=4, act_dim=1)

    def act(canaries, episodes, call):
        if during_canary is not None:
            during_canary(registry)
        return [{"robot_id": r, "return": after, "policy_version": str(registry.rollout()["history"][-1]["version"])} for r in canaries]

    fw._act = act
    trained = types.SimpleNamespace(checkpoint=tmp_path / "candidate" / "state", policy=None)
    decision = types.SimpleNamespace(to_dict=lambda: {})
    export = tmp_path / "candidate" / "export"
    return fw, registry, lambda: fw._release(2, trained, (weights, manifest, export), decision, {}, {}, "snap", {"robot-0": 1.0, "robot-1": 1.0}, {})


@pytest.mark.parametrize("after, when", [(1.0, "canary"), (1.0, "widen"), (-100.0, "canary")], ids=["to be widened", "as it widens", "to be rolled back"])
def test_an_operators_rollback_while_the_loops_canary_runs_is_adopted_not_a_crash(tmp_path, monkeypatch, after, when):
    """The running loop died (NoCanary from its widen or rollback) when the on-call operator rolled the fleet back while
    its canary ran: the moment a misbehaving canary makes the likeliest for it."""
    operator = lambda registry: registry.rollback("v2 drops the pole", to=1)  # noqa: E731
    fw, registry, release = releasing(tmp_path, operator if when == "canary" else None, after)
    if when == "widen":  # between the loop's last look at the registry and its widen
        widen = registry.widen
        monkeypatch.setattr(registry, "widen", lambda *a, **k: (operator(registry), widen(*a, **k)))
    fw._follow_fleet(2)
    record = release()
    assert (record["stage"], record["version"], record["canaries"]) == ("settled by operator", 3, ["robot-0"]), record
    assert "canary v3 was settled outside the run while it ran (no canary to" in record["reason"] and "the fleet runs v4" in record["reason"]
    assert fw.state["current"]["version"] == 2 and (registry.rollout()["stable"], registry.rollout()["canary"]) == (4, None)
    fw._follow_fleet(3)  # the next iteration starts from the operator's release: v1's weights as v4
    assert fw.state["current"]["version"] == 4 and registry.manifest(4)["weights"] == registry.manifest(1)["weights"]


def test_an_operator_widening_the_loops_canary_while_it_runs_makes_it_the_current_policy(tmp_path):
    fw, registry, release = releasing(tmp_path, lambda registry: registry.widen(3), after=-100.0)
    fw._follow_fleet(2)
    record = release()
    assert (record["stage"], record["version"]) == ("widened", 3), record
    assert fw.state["current"] == {"version": 3, "checkpoint": str(tmp_path / "candidate" / "state"), "export": str(tmp_path / "candidate" / "export")}
    assert [e["event"] for e in registry.rollout()["history"]][-2:] == ["canary", "widened"]  # the operator's widen only


def test_a_rollback_made_while_the_loop_trains_is_not_released_over(tmp_path):
    """The candidate gated against v2 was published and widened over the operator's rollback of v2 made while the
    iteration trained: v4 (parent v2) became the fleet's stable version and the loop's current policy."""
    fw, registry, release = releasing(tmp_path)
    fw._follow_fleet(2)  # the iteration begins: the fleet runs v2, as the state says
    registry.rollback("v2 drops the pole", to=1)  # while it trains
    record = release()
    assert record["stage"] == "fleet moved" and "the fleet runs v3, not v2 as when iteration 2 began" in record["reason"], record
    assert registry.versions() == [1, 2, 3] and registry.rollout()["stable"] == 3 and fw.state["current"]["version"] == 2
    assert not (fw.run_dir / RELEASE_FILE).exists()  # nothing published: nothing for a resume to settle
    fw._follow_fleet(3)
    assert fw.state["current"]["version"] == 3
    fw, registry, release = releasing(tmp_path / "race")  # the rollback lands between the loop's look and its publish
    publish = registry.publish
    operator = lambda *a, **k: (registry.rollback("v2 drops the pole", to=1), publish(*a, **k))[1]  # noqa: E731
    fw.svc.registry = types.SimpleNamespace(publish=operator, rollout=registry.rollout, rollback=registry.rollback, widen=registry.widen)
    fw._follow_fleet(2)
    record = release()
    assert (record["stage"], record["version"]) == ("fleet moved", 4) and "the fleet runs v3, not v2" in record["reason"], record
    assert [(e["version"], e["event"]) for e in registry.rollout()["history"]][-3:] == [(4, "canary"), (5, "stable"), (4, "rolled_back")]
    assert registry.weights(5) == registry.weights(1) and fw.state["current"]["version"] == 2  # the canary withdrawn, never widened
    fw, registry, release = releasing(tmp_path / "again")  # the fleet where it was: released as before
    fw._follow_fleet(2)
    assert release()["stage"] == "widened" and registry.rollout()["stable"] == 3


def test_the_loops_own_releases_are_told_by_one_rule():
    from fleet.pipeline.fleet_release import loop_iteration, release_note

    assert loop_iteration({"note": release_note(7)}) == 7
    for note in ("iteration 7 of another run: x", "rollback of v2 to the weights of v1: iteration 3", "", None):
        assert loop_iteration({"note": note}) is None
    assert loop_iteration({}) is None


def test_calibration_errors_skip_robots_the_loop_does_not_simulate(tmp_path):
    """A store that also holds robots that uploaded through flywheel-server (a run folder that is the server's): the
    loop calibrates them with the rest, but has no true profile to score them against; it crashed on KeyError."""
    fw = flywheel(tmp_path / "run")
    truth = fw.specs["robot-1"].profile  # the heavy payload's
    result = types.SimpleNamespace(estimates={"payload_mass": truth.payload_mass * 1.1}, identifiable={"payload_mass": True})
    errors = fw._calibration_error({"robot-1": result, "reach-1": result})
    assert truth.payload_mass > 0 and list(errors) == ["robot-1"] and errors["robot-1"]["payload_mass"] == pytest.approx(0.1)
