"""``ray.training.placement: cluster``: the world model and the learner train in Ray tasks and give what they
give in the driver (the same model version, checkpoint tensors, candidate and training log), continuing from
the previous files sent as bytes; a task asks Ray for the configured resources; bad settings are refused."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fleet.pipeline import ray_start
from fleet.pipeline.ray_start import ClusterResourcesError, check_feasible
from fleet.pipeline.training import Training, TrainingPlacement, _policy_task, on_the_tasks_device, policy_from_bytes, policy_to_bytes, read_folder
from policies.checkpoint import load_checkpoint
from sim.batched import BatchedStepper
from sim.policy_fn import random_policy
from sim.scenario import ScenarioSpec
from sim.variation import VariationProfile
from tests.test_flywheel_e2e import CONF

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def episodes():
    with BatchedStepper("pendulum", 4, source="real", robot_id="robot-0") as stepper:
        return stepper.simulate([ScenarioSpec("pendulum", seed=s, max_steps=60) for s in range(6)], random_policy(1, 0))


def configs():
    """The flywheel's learner and world model, small."""
    overrides = [
        "policy.trainer.torch_threads=1", "worldmodel.train.num_threads=1", "policy.algorithm.model_train.max_steps=60",
        "policy.algorithm.retrain_steps=40", "policy.trainer.eval_every=20", "worldmodel.train.max_steps=40",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("flywheel", overrides=overrides)
    trainer = dataclasses.replace(instantiate(cfg.policy.trainer), robot="pendulum", total_env_steps=120, seed=3)
    return cfg, trainer, instantiate(cfg.policy.algorithm)


def train_twice(placement: str, episodes, folder):
    """World model and learner, then each continued from what the first call left; returns what a run keeps."""
    cfg, trainer, algo = configs()
    training = Training(TrainingPlacement(placement, num_cpus=1), max_retries=0)
    profiles = {"robot-0": VariationProfile(), "robot-1": VariationProfile(actuator_strength=0.7)}
    versions, logs, policies = [], [], []
    for i, (real, sim) in enumerate([(episodes[:3], episodes[3:4]), (episodes[:5], episodes[5:])]):
        model, report, version = training.world_model(  # the second continues the first's model
            real, sim, folder / f"worldmodel{i - 1}" if i else None, folder / f"worldmodel{i}", instantiate(cfg.worldmodel.ensemble), instantiate(cfg.worldmodel.train), "cpu"
        )
        assert report.steps > 0 and model.spec is not None
        versions.append(version)
        log = []
        trained = training.policy(
            trainer, algo, {"real": real, "sim": sim}, profiles, folder / f"p{i - 1}" if i else None, folder / f"p{i}", lambda m, n: log.append((m, n))
        )
        logs.append(log)
        policies.append(trained)
    return versions, logs, policies, dict(training.nodes)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN where NaN (a measured error not measured yet)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.all((a == b) | (a.isnan() & b.isnan()))) if a.is_floating_point() else torch.equal(a, b)


def test_a_training_task_on_ray_gives_what_the_driver_gives(episodes, tmp_path, local_ray):
    here = train_twice("driver", episodes, tmp_path / "driver")
    there = train_twice("cluster", episodes, tmp_path / "cluster")
    (v_here, log_here, p_here, nodes_here), (v_there, log_there, p_there, nodes_there) = here, there
    assert nodes_here == {} and set(nodes_there) == {"world_model", "policy"}  # the tasks ran on a Ray node
    assert v_here == v_there and v_here[0] != v_here[1]  # the same world models (a content hash), the second continued the first
    for a, b in zip(p_here, p_there):
        ta, ma = load_checkpoint(a.checkpoint)
        tb, mb = load_checkpoint(b.checkpoint)
        assert ta.keys() == tb.keys() and all(same(ta[k], tb[k]) for k in ta)  # written into the run folder, bit for bit
        assert ma["env_steps"] == mb["env_steps"] == a.env_steps == b.env_steps
        sa, sb = a.policy.state_dict(), b.policy.state_dict()
        assert sa.keys() == sb.keys() and all(same(sa[k], sb[k]) for k in sa)  # the candidate (keep_best's), not only the latest
        assert a.metrics == b.metrics
    learner = load_checkpoint(p_there[1].checkpoint)[1]["algo"]
    assert learner["sac"]["env_steps"] == 2 * p_there[0].env_steps and learner["retrains"] >= 1  # the second call continued the first's learner
    assert [[n for _, n in log] for log in log_here] == [[n for _, n in log] for log in log_there] and log_there[0]  # the log, replayed
    assert [[m.get("policy/env_steps") for m, _ in log] for log in log_here] == [[m.get("policy/env_steps") for m, _ in log] for log in log_there]


def test_a_policy_crosses_as_bytes_unchanged():
    from policies.networks import Policy, PolicySpec

    policy = Policy(PolicySpec(4, 1, (32, 32), "relu", True, 5.0, 1e-8, 2))
    with torch.no_grad():
        policy.normalizer.mean.add_(0.123456789)  # float64 statistics stay float64
    back = policy_from_bytes(policy_to_bytes(policy))
    assert back.spec == policy.spec and back.normalizer.mean.dtype == torch.float64
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in policy.state_dict().items())


def test_a_task_asks_ray_for_the_configured_resources(local_ray, tmp_path):
    training = Training(TrainingPlacement("cluster", num_cpus=None, num_gpus=0, resources={"no_such_node": 1}), max_retries=0)
    ref = training._remote(read_folder, 2).remote(tmp_path)
    ready, _ = local_ray.wait([ref], timeout=2)
    assert not ready  # no node has the resource: the task waits for one (Ray reports it unschedulable)
    local_ray.cancel(ref, force=True)
    options = training.task_options(2)
    assert options["num_cpus"] == 2 and options["resources"] == {"no_such_node": 1} and options["scheduling_strategy"] == "SPREAD"
    assert Training(TrainingPlacement("cluster", num_cpus=3, num_gpus=1), max_retries=2).task_options(2) | {"scheduling_strategy": None} == {
        "num_cpus": 3, "num_gpus": 1, "resources": None, "max_retries": 2, "scheduling_strategy": None
    }


def test_training_tasks_no_node_of_the_local_ray_can_hold_are_refused_in_one_line_not_left_waiting(local_ray):
    """``ray.training.placement=cluster ray.training.num_gpus=1`` on a local Ray without a GPU (or a custom resource
    it lacks) waited forever at the world-model step, without a word: Ray's "infeasible" warning is not shown here,
    and nothing can join the run's own Ray."""
    gpus = local_ray.cluster_resources().get("GPU", 0) + 1  # one more than this machine has
    with pytest.raises(ClusterResourcesError) as refused:
        Training(TrainingPlacement("cluster", num_gpus=gpus), max_retries=0).check_cluster(1, 1)
    assert str(refused.value) == (
        f"ray.training.num_gpus={gpus:g}: the world model's training task asks Ray for CPU 1, GPU {gpus:g} on one node, but no node of the run's "
        f"own local Ray has that (it has CPU 2, GPU {gpus - 1:g} in all, at most CPU 2, GPU {gpus - 1:g} on one of its 1 nodes), and no node can "
        "join it: ask for less, or train in this process with ray.training.placement=driver, or join a cluster that has it (ray.address=HOST:PORT of its head)"
    )
    with pytest.raises(ClusterResourcesError, match=r"^ray.training.resources.trainer=1: the world model's training task asks Ray for CPU 1, trainer 1 "):
        Training(TrainingPlacement("cluster", resources={"trainer": 1}), max_retries=0).check_cluster(1, 1)
    with pytest.raises(ClusterResourcesError, match=r"^policy.trainer.torch_threads=4 \(ray.training.num_cpus is null\): the policy learner's training task"):
        Training(TrainingPlacement("cluster"), max_retries=0).check_cluster(1, 4)  # more threads than any node has CPUs
    Training(TrainingPlacement("cluster", num_cpus=2), max_retries=0).check_cluster(1, 1)  # what the local Ray has: no error
    Training(TrainingPlacement("driver", num_gpus=gpus), max_retries=0).check_cluster(1, 1)  # trains here: Ray is not asked


def test_on_a_cluster_a_task_no_node_holds_yet_is_one_warning_and_waits_for_a_node_that_joins(local_ray, caplog):
    """A cluster's nodes come and go: an autoscaler starts GPU workers from zero for a pending task, a preempted node
    is replaced. The start check refused such clusters; now it says once what the task waits for, and lets Ray wait."""
    gpus = local_ray.cluster_resources().get("GPU", 0) + 1
    with caplog.at_level(logging.WARNING, logger="fleet.pipeline.ray_start"):
        Training(TrainingPlacement("cluster", num_gpus=gpus), max_retries=0, address="auto").check_cluster(1, 1)
    lines = [r.getMessage() for r in caplog.records if r.name == "fleet.pipeline.ray_start"]
    assert len(lines) == 2 and "\n" not in lines[0]  # one line per training task
    assert lines[0] == (
        f"ray.training.num_gpus={gpus:g}: the world model's training task asks Ray for CPU 1, GPU {gpus:g} on one node, but no alive node of the "
        f"Ray cluster at auto has that now (CPU 2, GPU {gpus - 1:g} in all, at most CPU 2, GPU {gpus - 1:g} on one of its 1 nodes): the task "
        "waits until a node that has it joins (an autoscaler's, or `ray start --num-cpus/--num-gpus/--resources`)"
    )
    assert lines[1].startswith(f"ray.training.num_gpus={gpus:g}: the policy learner's training task asks Ray for CPU 1, GPU {gpus:g}")


def test_a_cluster_whose_head_has_no_cpu_and_no_worker_yet_starts_with_a_warning(local_ray, monkeypatch, caplog):
    """Ray's own advice: a head with ``--num-cpus=0``, CPU workers scaled up from zero; the ray_map check refused it."""
    head = [{"Alive": True, "Resources": {"CPU": 0.0, "memory": 1e9}}, {"Alive": False, "Resources": {"CPU": 8.0}}]
    monkeypatch.setattr(ray_start.ray, "nodes", lambda: head)
    monkeypatch.setattr(ray_start.ray, "cluster_resources", lambda: {"memory": 1e9})
    with caplog.at_level(logging.WARNING, logger="fleet.pipeline.ray_start"):
        check_feasible({"CPU": 1}, "each calibration and scenario task (ray_map)", {"CPU": "ray.num_cpus=None"}, "give the local Ray a CPU", "auto")
    assert [r.getMessage() for r in caplog.records if r.name == "fleet.pipeline.ray_start"] == [
        "ray.num_cpus=None: each calibration and scenario task (ray_map) asks Ray for CPU 1 on one node, but no alive node of the Ray cluster at auto "
        "has that now (CPU 0 in all, at most CPU 0 on one of its 1 nodes): the task waits until a node that has it joins (an autoscaler's, or "
        "`ray start --num-cpus/--num-gpus/--resources`)"
    ]
    with pytest.raises(ClusterResourcesError, match=r"^ray.num_cpus=None: each calibration .* and no node can join it: give the local Ray a CPU, or join"):
        check_feasible({"CPU": 1}, "each calibration and scenario task (ray_map)", {"CPU": "ray.num_cpus=None"}, "give the local Ray a CPU", None)


def test_a_training_task_is_not_refused_as_it_is_submitted_when_its_node_was_lost_since_the_start(local_ray, episodes, tmp_path, monkeypatch):
    """The only GPU (or custom-resource) node dying between two training tasks aborted the run at the next submission,
    though Ray retries a task whose node dies while it runs: the task now waits in Ray's queue for the replacement."""
    cfg, _, _ = configs()
    training = Training(TrainingPlacement("cluster", num_cpus=1, resources={"replaced_node": 1}), max_retries=0, address="auto")
    submitted = []

    def held(ref):  # ray.get: the task was submitted; stop the call here rather than wait for a node that never joins
        submitted.append(ref)
        raise InterruptedError("submitted")

    monkeypatch.setattr("fleet.pipeline.training.ray.get", held)
    with pytest.raises(InterruptedError, match="submitted"):
        training.world_model(episodes[:2], [], None, tmp_path / "wm", instantiate(cfg.worldmodel.ensemble), instantiate(cfg.worldmodel.train), "cpu")
    monkeypatch.undo()
    ready, pending = local_ray.wait(submitted, timeout=1)
    assert not ready and len(pending) == 1  # waiting for a node that has the resource, not refused
    local_ray.cancel(pending[0], force=True)


@pytest.mark.timeout(120)  # it waited forever: fail, not hang
def test_a_local_run_asking_for_a_gpu_its_ray_lacks_stops_before_its_robots_start(local_ray, tmp_path):
    from tests.test_loop_resume import flywheel

    gpus = local_ray.cluster_resources().get("GPU", 0) + 1
    run = flywheel(tmp_path / "run", "ray.training.placement=cluster", f"ray.training.num_gpus={gpus}")
    with pytest.raises(ClusterResourcesError, match=rf"^ray.training.num_gpus={gpus:g}: the world model's training task asks Ray for"):
        run.run()
    assert not (tmp_path / "run" / "robots").exists() and not (tmp_path / "run" / "state.json").exists()  # no robot started, nothing ran


def _task_devices() -> list[str]:
    from policies.trainer import TrainerConfig
    from worldmodel import TrainConfig

    return [on_the_tasks_device(c).device for c in (TrainConfig(device="auto"), TrainerConfig(device="auto"), TrainConfig(device="cpu"))]


def test_a_task_that_asked_for_no_gpu_trains_on_the_cpu_and_a_gpu_task_gets_a_fresh_worker(local_ray):
    """Ray 2.60 leaves a node's GPUs visible to a task that asked for none: ``auto`` there must not take one."""
    assert local_ray.get(Training(TrainingPlacement("cluster", num_gpus=0), max_retries=0)._remote(_task_devices, 1).remote()) == ["cpu"] * 3
    gpu_task = Training(TrainingPlacement("cluster", num_gpus=1), max_retries=0)._remote(_task_devices, 1)
    assert gpu_task._default_options["max_calls"] == 1  # Ray's own default for a function declared with GPUs (ray#29624)


@pytest.mark.parametrize("bad", [{"placement": "gpu"}, {"num_gpus": -1}, {"num_cpus": -2}])
def test_bad_training_settings_are_refused_with_what_is_allowed(bad):
    with pytest.raises(ValueError, match="ray.training"):
        TrainingPlacement(**bad)
