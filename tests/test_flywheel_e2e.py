"""The whole flywheel, for real: local Ray, the server on loopback, simulated robots uploading
over HTTP, the Zarr store, world model, scenarios, the model-based learner, gate, signed publish, canary, pull."""

import json
from pathlib import Path

import pytest
import ray
from hydra import compose, initialize_config_dir

from fleet.pipeline import loop as loop_module
from fleet.pipeline import simfleet
from fleet.pipeline.loop import Flywheel
from fleet.pipeline.ray_start import start_ray
from fleet.registry.store import open_registry
from fleet.store import EpisodeStore, StoreConfig
from fleet.wandb_offline import offline_run
from sim.episode import Episode
from sim.sensor_filter import filter_digest
from tests.conftest import make_episode_arrays

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = [
    "loop.num_robots=2",
    "loop.iterations=2",
    "loop.episodes_per_robot=2",
    "loop.canary_episodes=1",
    "loop.train_env_steps=400",
    "policy.algorithm.sac.utd_ratio=2",          # the default learner (mbpo_fleet), cheap: this test is about the loop
    "policy.algorithm.model_train.max_steps=300",
    "policy.algorithm.retrain_steps=100",
    "policy.trainer.eval_every=25",
    "loop.wm_rollouts=32",
    "loop.eval_episodes=2",
    "worldmodel.train.max_steps=100",
    "scenarios.proposals.num_randomized=4",
    "scenarios.proposals.num_uncertain=4",
    "scenarios.calibration.iterations=3",
    "scenarios.calibration.windows_per_episode=4",
    "wandb.mode=offline",
    "ray.num_cpus=2",
    # one torch thread for the learner and the world model: on 2 shared cores a second one stalls in OpenMP
    # spin-waits whenever anything else runs (this machine's other work, Ray's processes): up to ~50x per step
    "policy.trainer.torch_threads=1",
    "worldmodel.train.num_threads=1",
]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the overrides set this process's torch count; restored after the module


def config(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("flywheel", overrides=[*TINY, f"run_dir={run_dir}", *overrides])


def flywheel(run_dir: Path, *overrides: str) -> Flywheel:
    return Flywheel(config(run_dir, *overrides), run_dir)


@pytest.fixture(scope="module", autouse=True)
def shared_ray(tmp_path_factory):
    """One local Ray for the module, started as the flywheel starts it (a start costs ~5 s; a flywheel joins a
    running Ray and leaves it up). The crash test restarts it as a restarted driver would; none is left after."""
    start_ray(config(tmp_path_factory.mktemp("run")).ray)
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_two_robots_two_iterations_promote_pull_and_log(tmp_path):
    updated = [Episode.create(**make_episode_arrays(num_steps=20, obs_dim=5, act_dim=1, seed=k), robot_id="robot-fw", robot_model="pendulum", source="real")
               for k in range(2)]  # fmt: skip
    EpisodeStore.open_or_create(StoreConfig(path=str(tmp_path / "run" / "store"))).append(updated)  # a firmware update: obs 4 -> 5
    summary = flywheel(tmp_path / "run").run()  # it crashed every iteration (calibration: "observations must be (N, 4)")
    first, second = summary["iterations"]
    assert first["data"]["other_layout"] == {"robot-fw": {"episodes": 2, "layouts": ["action 1, observation 5"]}}  # left out, said
    assert first["policy_versions"] == ["zero"]
    assert first["gate"]["promote"], first["gate"]["reason"]
    assert first["rollout"]["stage"] == "widened" and first["rollout"]["version"] == 1
    assert second["policy_versions"] == ["1"]  # every robot pulled, verified and ran v1
    assert all(r["policy_version"] >= 1 and r["swaps"] >= 1 and not r["refusals"] for r in summary["robots"])
    assert min(second["fleet_returns"].values()) > max(first["fleet_returns"].values())  # the fleet got better
    assert second["real_steps"]["robot-0"] > first["real_steps"]["robot-0"] > 0  # real steps used, next to the return
    assert second["data"]["real"] == second["data"]["real_in_store"] > first["data"]["real"]  # under loop.real_window_steps: all read
    final, last_release = summary["final"], max(h["rollout"]["version"] for h in summary["iterations"] if h["rollout"]["stage"] == "widened")
    assert final["policy_versions"] == [str(last_release)]  # the closing round runs the last release on every robot
    assert final["real_steps"]["robot-0"] > second["real_steps"]["robot-0"] and "rollout" not in final
    gate_record = second["gate"]
    assert gate_record["episodes"] == 2 and len(gate_record["fleet_ci"]) == 2 and "ci_low" in gate_record["per_robot"]["robot-0"]

    from policies.checkpoint import load_checkpoint

    _, meta = load_checkpoint(tmp_path / "run" / "policies" / "iter001")
    # the learner carried over: iteration 1 continued iteration 0's steps (each rounded up to 4 worlds)
    assert 2 * 400 <= meta["algo"]["sac"]["env_steps"] < 2 * (400 + 4)
    assert meta["algo"]["retrains"] >= 2 and meta["algo"]["model_spec"]["context_dim"] > 0  # its world model reads each body

    store = EpisodeStore.open(StoreConfig(path=str(tmp_path / "run" / "store")))
    snapshot = store.snapshot()
    real = [e for e in snapshot.episodes(source="real") if e.robot_id != "robot-fw"]
    assert {e.robot_id for e in real} == {"robot-0", "robot-1"} and len(real) >= 2 * 2 * 2
    for robot in ("robot-0", "robot-1"):  # every real step the robots took counts, the canary's too (left out once)
        assert final["real_steps"][robot] == sum(e.num_steps for e in real if e.robot_id == robot), robot
    assert snapshot.episodes(source="sim") and snapshot.episodes(source="worldmodel")
    pins = store.pins()  # the data each iteration trained on (a release's lineage) survives the store's maintenance; the last
    assert all(name == f"data.{sid}" for name, sid in pins.items()) and len(pins) >= 2, pins  # iteration's start went with the run

    run = tmp_path / "run"
    state = json.loads((run / "state.json").read_text())
    named = {(run / state[key]["checkpoint"]).resolve() for key in ("learner", "current") if (state.get(key) or {}).get("checkpoint")}
    checkpoints = {p.parent.resolve() for p in (run / "policies").glob("iter*/state.safetensors")}
    assert checkpoints == named and len(named) >= 1, (checkpoints, named)  # an older iteration's (it holds the replay) is gone ...
    assert all((d / "export").is_dir() for d in (run / "policies").glob("iter???"))  # ... its export stays
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("fleet/return/robot-0" in x for x in lines) and any("gate/promote" in x for x in lines)
    gate_row = next(x for x in lines if "gate/promote" in x)  # each robot's interval beside the fleet's (once in summary.json only)
    assert gate_row["gate/robot-0/ci_low"] <= gate_row["gate/robot-0/difference"] <= gate_row["gate/robot-0/ci_high"]
    wandb_run = offline_run(run / "wandb")  # what W&B shows after `wandb sync`
    assert wandb_run["metrics"]["policy/*"] == "policy/env_steps" and wandb_run["metrics"]["fleet/*"] == wandb_run["metrics"]["canary/*"] == "iteration"
    recorded = wandb_run["config"]  # what ran: the run folder (absolute), the learner's device as auto resolved it
    assert recorded["run_dir"] == str(run.resolve()) and recorded["effective_trainer"]["device"] in ("cpu", "cuda")
    assert recorded["code"]["git_commit"] and json.loads((run / "summary.json").read_text())["code"] == recorded["code"]  # the code that ran
    assert wandb_run["exit_code"] == 0 and "stopped" not in wandb_run["summary"]  # finished by itself
    learner_rows = [row for row in wandb_run["history"] if "policy/env_steps" in row]
    assert len(learner_rows) > 2 * 2  # the learner's log lines stay separate points, not one per iteration
    learner_steps = [row["policy/env_steps"] for row in learner_rows]
    assert learner_steps == sorted(learner_steps) and learner_steps[-1] > 400  # one axis over both iterations
    assert {row["iteration"] for row in wandb_run["history"]} == {0, 1, 2}  # 2 iterations and the closing round
    policies = [a for a in wandb_run["artifacts"] if a["name"] == "policy-pendulum"]
    datasets = {alias for a in wandb_run["artifacts"] if a["name"] == "dataset-pendulum" for alias in a["aliases"]}
    assert policies and "stable" in policies[0]["aliases"] and "release-1" in policies[0]["aliases"]
    made_from = policies[0]["metadata"]  # what else the release came from, beside its dataset
    assert made_from["iteration"] == 0 and made_from["parent_release"] is None and made_from["world_model"] and made_from["gate"]["fleet_ci"]
    (lineage,) = policies[0]["metadata"]["lineage"]  # dataset -> policy, recorded offline
    assert lineage.startswith("dataset-pendulum:snapshot-") and lineage.split(":")[1] in datasets
    assert (run / "report.png").stat().st_size > 1000 and (run / "summary.json").exists()
    assert list((run / "videos").glob("eval_video_v1_*.mp4"))  # evaluation video of the release (EGL)


def test_a_crash_mid_iteration_resumes_without_duplicates_or_loss(tmp_path, monkeypatch):
    """Also the sensor correction: robot-1's sensors read 0.1 high; the release carries its offset (and no filter: no noise)."""
    run = tmp_path / "run"
    monkeypatch.setitem(simfleet.CONDITIONS, "noisy_sensor", {"obs_bias": 0.1})
    sensors = "loop.conditions=[nominal,noisy_sensor]"
    real_train = loop_module.steps.train_policy
    calls = {"n": 0}

    def crash_in_second_iteration(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected crash: the learner died")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(loop_module.steps, "train_policy", crash_in_second_iteration)
    with pytest.raises(RuntimeError, match="injected crash"):
        flywheel(run, sensors).run()
    state = json.loads((run / "state.json").read_text())
    assert state["next_iteration"] == 1  # iteration 0 finished, iteration 1 did not
    store = EpisodeStore.open(StoreConfig(path=str(run / "store")))
    before = {e.episode_id for e in store.snapshot().catalog()}

    monkeypatch.setattr(loop_module.steps, "train_policy", real_train)
    if ray.is_initialized():
        ray.shutdown()  # the restarted driver starts a fresh Ray, as after a real crash
    summary = flywheel(run, sensors).run()
    assert [h["iteration"] for h in summary["iterations"]] == [0, 1]  # iteration 0 was not redone
    store.refresh_index()
    after = [e.episode_id for e in store.snapshot().catalog()]
    assert len(after) == len(set(after))  # nothing stored twice (synthetic episodes of the redo deduplicated)
    assert before <= set(after)  # nothing acknowledged before the crash was lost

    assert summary["iterations"][-1]["sensor_offsets"]["robot-1"] == pytest.approx(0.1, abs=0.01)
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(x.get("calibration/robot-1/sensor_offset", 0) == pytest.approx(0.1, abs=0.01) for x in logged)
    assert sorted(x["step"] for x in logged if "fleet/return_mean" in x) == [0, 1, 2]  # the interrupted attempt's rows dropped, then the closing round
    assert sorted(p.name for p in (run / "worldmodel").iterdir()) == ["iter001"]  # each iteration's model in its own folder: the redo began where the attempt did
    assert "robot-0" not in summary["iterations"][-1]["sensor_offsets"]  # a clean sensor gets none
    registry = open_registry(run / "registry", run / "keys" / "online.pem")
    offsets = registry.manifest(registry.rollout()["stable"])["sensor_offsets"]  # in the release the robots run, under TUF
    assert set(offsets) == {"robot-1"} and offsets["robot-1"] == pytest.approx([0.1] * 4, abs=0.01)
    # a filter only for a sensor calibrated as noisy (tests/test_sensor_filter.py has one)
    assert summary["iterations"][-1]["sensor_filters"] == {} and registry.manifest(registry.rollout()["stable"])["sensor_filters"] == {}


def test_a_release_carries_a_sensor_filter_fitted_under_its_own_policy(tmp_path):
    """The noisy robot's filter of the iteration was fitted under the policy it ran (here the zero policy); the
    candidate is gated, and released, with one refitted under the candidate, where the candidate drives the body."""
    run = tmp_path / "run"
    summary = flywheel(run, "loop.conditions=[noisy_sensor]", "loop.num_robots=1", "loop.iterations=1", "loop.gate.min_improvement=-1000000", "loop.gate.abs_tolerance=1000000").run()
    (record,) = summary["iterations"]
    trained_with, released = record["sensor_filters"]["robot-0"], record["release_sensor_filters"]["robot-0"]
    assert trained_with["kept"] and released["kept"] and released["filter_sha256"] != trained_with["filter_sha256"]
    assert record["rollout"]["stage"] == "released", record["gate"]  # any candidate passes this gate; a lone robot has no canary stage
    registry = open_registry(run / "registry", run / "keys" / "online.pem")
    assert filter_digest(registry.manifest(registry.rollout()["stable"])["sensor_filters"]["robot-0"]) == released["filter_sha256"]
