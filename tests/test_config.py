"""Every Hydra config composes against its schema, every `_target_` in it imports and instantiates,
a wrong type or an unknown key is refused at compose time with the key named, and the wheel ships the tree."""

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ValidationError

import fleet.conf.schema_flywheel  # noqa: F401  (registers the schemas the YAML's defaults name)
from fleet.conf import CONF_DIR
from fleet.conf.schema_tools import unknown_keys

CONF = Path(CONF_DIR)
ROOT = Path(__file__).resolve().parents[1]
PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUP_OPTIONS = sorted((g.name, p.stem) for g in CONF.iterdir() if g.is_dir() for p in g.glob("*.yaml"))
RUN_DIR = "run_dir=/tmp/flywheel-test-config"  # compose() outside an app has no Hydra output dir to default to


def _compose(name: str, overrides=()):
    overrides = [*overrides, RUN_DIR] if name in ("flywheel", "train") else list(overrides)  # the apps with a run folder
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _targets(node, path="") -> list[tuple[str, DictConfig]]:
    """Top-most nodes with a _target_ (instantiate builds the nested ones itself)."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            return [(path, node)]
        return [t for k, v in node.items_ex(resolve=False) for t in _targets(v, f"{path}.{k}")]
    if isinstance(node, ListConfig):
        return [t for i, v in enumerate(node) for t in _targets(v, f"{path}[{i}]")]
    return []


def _check(cfg: DictConfig) -> None:
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every interpolation resolves, no ??? left
    assert unknown_keys(cfg) == []
    for path, node in _targets(cfg):
        assert instantiate(node) is not None, f"{path}: {node._target_} instantiated to None"


def test_the_repository_conf_is_the_package_tree():
    assert (ROOT / "conf").resolve() == CONF  # one tree: conf/ links to fleet/conf/


def test_there_is_a_config_per_app():
    assert {"flywheel", "server", "robot"} <= set(PRIMARY)
    assert {"policy", "worldmodel", "scenarios", "fleet", "ray", "wandb"} <= {g for g, _ in GROUP_OPTIONS}


def test_the_groups_offer_their_yaml_options_only():
    """What `--help` lists: the schemas the options extend are not options (`policy=base_sac` was listed)."""
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group in {g for g, _ in GROUP_OPTIONS}:
            assert loader.get_group_options(group) == sorted(p.stem for p in (CONF / group).glob("*.yaml")), group


@pytest.mark.parametrize(
    "app, groups",
    [("flywheel", ("fleet", "policy", "ray", "scenarios", "wandb", "worldmodel")), ("flywheel-train", ("policy", "ray", "wandb")),
     ("flywheel-server", ()), ("flywheel-robot", ())],
)  # fmt: skip
def test_help_names_the_app_and_offers_the_groups_it_reads(app, groups, tmp_path):
    """Each app's --help lists the groups it reads, each with its YAML options, and no other (the server and the
    robot read none but fleet, shown in their config; they listed the learners' groups)."""
    out = subprocess.run([str(Path(sys.executable).parent / app), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith(f"{app} is powered by Hydra"), out.stdout[:200] + out.stderr
    listed = re.findall(r"^(\w+): (.+)$", out.stdout.split("== Config ==")[0], re.M)
    assert listed == [(g, ", ".join(sorted(p.stem for p in (CONF / g).glob("*.yaml")))) for g in groups], listed


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_config_composes(name):
    _check(_compose(name))


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    primary = next((p for p in PRIMARY if group in _defaults(p)), "flywheel")
    prefix = "" if group in _defaults(primary) else "+"
    _check(_compose(primary, [f"{prefix}{group}={option}"]))


def _defaults(primary: str) -> set[str]:
    entries = OmegaConf.load(CONF / f"{primary}.yaml").get("defaults", [])
    return {k for e in entries if isinstance(e, DictConfig) for k in e}


@pytest.mark.parametrize(
    "name, override, key",
    [
        ("flywheel", "loop.iterations=abc", "loop.iterations"),
        ("flywheel", "policy.trainer.total_env_steps=1e3x", "policy.trainer.total_env_steps"),
        ("flywheel", "policy.algorithm.sac.utd_ratio=fast", "policy.algorithm.sac.utd_ratio"),
        ("flywheel", "ray.include_dashboard=maybe", "ray.include_dashboard"),
        ("server", "fleet.server.port=http", "fleet.server.port"),
        ("robot", "episodes=ten", "episodes"),
        ("robot", "robot.profile.payload_mass=abc", "robot.profile.payload_mass"),  # once a TypeError when the robot started
    ],
)
def test_a_wrong_type_is_refused_with_the_key_named(name, override, key):
    with pytest.raises(ConfigCompositionException) as info:
        _compose(name, [override])
    assert isinstance(info.value.__cause__, ValidationError) and f"full_key: {key}" in str(info.value.__cause__)


@pytest.mark.parametrize(
    "name, override, key",
    [
        ("flywheel", "loop.iteratons=3", "iteratons"),
        ("flywheel", "sim.num_worlds=128", "sim"),  # removed: nothing read it
        ("flywheel", "scenarios.calibration.windows=4", "windows"),
        ("flywheel", "policy.algorithm.lr=1e-4", "lr"),  # a PPO key; the default learner is model-based
        ("server", "fleet.server.prot=8701", "prot"),
        ("robot", "robot.modle=ant", "modle"),
        ("robot", "robot.profile.payload_mas=1", "payload_mas"),
    ],
)
def test_an_unknown_key_is_refused_with_the_key_named(name, override, key):
    with pytest.raises(ConfigCompositionException) as info:
        _compose(name, [override])
    assert key in f"{info.value} {info.value.__cause__}"


def test_an_unknown_key_added_with_plus_stops_the_app_before_it_runs(tmp_path):
    """``+key=value`` gets past Hydra's schema check (it means "add"); the apps refuse what no code reads."""
    cfg = _compose("flywheel", ["+loop.iteratons=3", "+policy.algorithm.sac.utd=2"])
    assert sorted(unknown_keys(cfg)) == ["loop.iteratons", "policy.algorithm.sac.utd"]
    result = subprocess.run(  # in tmp_path: Hydra's run folder (runs/<time>) goes there, not into the checkout
        [str(Path(sys.executable).parent / "flywheel"), "+loop.iteratons=3"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode != 0 and "loop.iteratons" in result.stderr, result.stderr


def test_a_setting_out_of_range_stops_the_app_with_the_reason_and_no_traceback(tmp_path):
    """A value the loop refuses (checked when the Flywheel is built, before Ray starts) reads as a one-line error."""
    for override, reason in (("loop.iterations=0", "must be >= 1"), ("policy=ppo", "trains off-policy"), ("loop.robot_model=nosuch", "unknown robot 'nosuch'")):
        result = subprocess.run(
            [str(Path(sys.executable).parent / "flywheel"), override, f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert result.returncode == 1 and "flywheel: " in result.stderr and reason in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr


def test_a_start_refused_for_its_settings_leaves_no_run_dir_it_made(tmp_path):
    """A run_dir given on the command line that the start made was left holding .hydra/ and the app's log (a runs/<time>/
    made for the start was removed); a folder that was there before stays."""
    (tmp_path / "there").mkdir()
    for override, run_dir in (("loop.num_robots=0", "new/run"), ("+loop.foo=1", "new"), ("wandb.mode=foo", "new"), ("loop.robot_model=nosuch", "there")):
        result = subprocess.run(
            [str(Path(sys.executable).parent / "flywheel"), override, f"run_dir={tmp_path / run_dir}"], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert result.returncode == 1 and "flywheel: " in result.stderr, result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["there"], (override, list(tmp_path.rglob("*")))  # new/ too, made for new/run


@pytest.mark.parametrize(
    "override, reason",
    [  # each of these once failed iterations into a run (robots had uploaded), most with a traceback, or ran on silently
        ("loop.episodes_per_robot=0", "loop.episodes_per_robot must be >= 1"),
        ("loop.eval_episodes=1", "loop.eval_episodes must be >= 2"),
        ("loop.episode_steps=0", "loop.episode_steps must be >= 1"),
        ("loop.wm_rollouts=0", "loop.wm_rollouts must be >= 1"),
        ("loop.train_env_steps=0", "loop.train_env_steps must be >= 1"),
        ("loop.calibration_episodes=0", "loop.calibration_episodes must be >= 1"),
        ("loop.canary_fraction=-1", "loop.canary_fraction must be in [0, 1]"),
        ("loop.gate.confidence=2", "confidence must be in (0, 1)"),
        ("loop.gate.resamples=0", "resamples must be a positive integer"),
        ("worldmodel.train.max_steps=0", "worldmodel.train: "),
        ("scenarios.calibration.iterations=0", "scenarios.calibration: "),
    ],
)
def test_the_loop_refuses_a_bad_value_before_anything_runs(override, reason, tmp_path):
    from fleet.pipeline.loop import Flywheel

    with pytest.raises(ValueError, match=re.escape(reason)):
        Flywheel(_compose("flywheel", [override]), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_loop_checks_the_learners_budget_over_the_whole_run_before_anything_runs(tmp_path):
    """The learner carries over between iterations, so an iteration below its warm-up is fine when the run reaches an
    update: `flywheel loop.train_env_steps=100` (policy=mbpo_fleet, learning_starts=150) once failed in iteration 0 with a
    traceback, after Ray, the server and the robots had started. A run that never reaches one is refused in one line."""
    from fleet.pipeline.loop import Flywheel

    Flywheel(_compose("flywheel", ["loop.train_env_steps=100"]), tmp_path / "run")  # 3 x 100 steps: past 150 in iteration 1
    Flywheel(_compose("flywheel", ["loop.iterations=2", "loop.train_env_steps=76"]), tmp_path / "run")  # 2 x 76: the least
    for overrides, reason in (
        (["loop.iterations=1", "loop.train_env_steps=100"], re.escape("loop.iterations=1 x loop.train_env_steps=100 ends before the learner's first update, which needs 151 env steps "
         "(policy.algorithm.sac.learning_starts=150, then 1 at policy.algorithm.sac.utd_ratio=10): set loop.train_env_steps to 152 or more, raise loop.iterations")),
        (["loop.iterations=2", "loop.train_env_steps=72"], "needs 151 env steps .*: set loop.train_env_steps to 76 or more"),  # 2 x 72 (4 worlds)
    ):  # fmt: skip
        with pytest.raises(ValueError, match=reason) as refused:
            Flywheel(_compose("flywheel", overrides), tmp_path / "run")
        assert "\n" not in str(refused.value)  # the app prints it as its one line
    assert not (tmp_path / "run").exists()  # nothing written
    resumed = tmp_path / "resumed"  # a run stopped after iteration 0, its learner past 100 of the 150
    resumed.mkdir()
    (resumed / "state.json").write_text(json.dumps({"next_iteration": 1, "current": None, "learner": None, "history": [], "learner_env_steps": 100}))
    Flywheel(_compose("flywheel", ["loop.iterations=2", "loop.train_env_steps=52"]), resumed)
    with pytest.raises(ValueError, match=r"loop.iterations=2 \(1 left after 1 done\) x loop.train_env_steps=48 .* needs 51 env steps \(.*150, 100 already seen,"):
        Flywheel(_compose("flywheel", ["loop.iterations=2", "loop.train_env_steps=48"]), resumed)


def test_robots_episodes_stop_at_their_tasks_time_limit_as_the_gates_do(caplog):
    """Reacher robots once ran the default 200-step episodes while the gate judged the task's 50: a candidate better on
    50 steps was promoted and its telemetry could be worse."""
    from fleet.pipeline.loop import LoopSettings

    assert LoopSettings.from_cfg(_compose("flywheel", ["loop.robot_model=reacher"])).episode_steps == 50
    assert "past reacher's time limit of 50" in caplog.text
    assert LoopSettings.from_cfg(_compose("flywheel", ["loop.robot_model=reacher", "loop.episode_steps=30"])).episode_steps == 30
    assert LoopSettings.from_cfg(_compose("flywheel")).episode_steps == 200  # the pendulum's limit is 1,000


def test_a_data_window_too_small_for_the_robots_calibration_is_refused():
    """loop.real_window_steps bounds what an iteration reads; each robot's calibration reads its newest episodes from it."""
    from fleet.pipeline.loop import LoopSettings

    with pytest.raises(ValueError, match=r"loop.real_window_steps must be null \(no window\) or >= 6400, got 1000 \(num_robots x"):
        LoopSettings.from_cfg(_compose("flywheel", ["loop.real_window_steps=1000"]))  # 4 robots x 8 episodes x 200 steps
    with pytest.raises(ValueError, match=r"loop.sim_window_steps must be null \(no window\) or >= 0, got -1$"):
        LoopSettings.from_cfg(_compose("flywheel", ["loop.sim_window_steps=-1"]))
    assert LoopSettings.from_cfg(_compose("flywheel", ["loop.real_window_steps=null"])).real_window_steps is None
    defaults = LoopSettings.from_cfg(_compose("flywheel"))
    assert (defaults.real_window_steps, defaults.sim_window_steps) == (1_000_000, 1_000_000)


@pytest.mark.parametrize("fraction, robots, canaries", [(0.25, 4, 1), (0.1, 4, 1), (1.0, 4, 4), (0.0, 4, 0), (0.5, 1, 0)])
def test_the_canary_share_is_at_least_one_robot_unless_it_is_zero(fraction, robots, canaries):
    """loop.canary_fraction=0 once still canaried one robot."""
    from fleet.pipeline.loop import LoopSettings

    cfg = _compose("flywheel", [f"loop.canary_fraction={fraction}", f"loop.num_robots={robots}"])
    assert LoopSettings.from_cfg(cfg).num_canaries == canaries


def test_a_run_dir_resumes_only_the_run_it_holds(tmp_path):
    """A run's store, models and learner come from its settings: a rerun with others (but more iterations or robots)
    is refused, and so is another app's run folder, both ways."""
    from fleet.pipeline.loop import Flywheel
    from fleet.run_folders import record_run_settings
    from fleet.train_job import OtherSettingsError, TrainJob, preflight
    from policies.sac import SACConfig
    from policies.trainer import TrainerConfig

    run = tmp_path / "run"
    first = Flywheel(_compose("flywheel"), run)
    record_run_settings(run, first.run_settings)  # as Flywheel.run does when it starts
    Flywheel(_compose("flywheel", ["loop.iterations=5", "loop.num_robots=6"]), run)  # goes on longer, with more robots
    Flywheel(_compose("flywheel", ["loop.real_window_steps=2000000", "loop.sim_window_steps=null"]), run)  # reads more an iteration
    assert not any(key.endswith("_window_steps") for key in json.loads((run / "flywheel_run.json").read_text()))  # so a run from before them resumes
    with pytest.raises(ValueError, match=r"other settings: loop.robot_model='pendulum' \(now 'reacher'\)"):
        Flywheel(_compose("flywheel", ["loop.robot_model=reacher"]), run)
    with pytest.raises(ValueError, match="other settings: seed=0 \\(now 1\\)"):
        Flywheel(_compose("flywheel", ["seed=1"]), run)
    Flywheel(_compose("flywheel", ["policy.algorithm.sac.precision=bfloat16"]), run)  # how it computes, not what it learns
    settings = json.loads((run / "flywheel_run.json").read_text())
    (run / "flywheel_run.json").write_text(json.dumps({k: v for k, v in settings.items() if not k.endswith(".precision")}))
    Flywheel(_compose("flywheel"), run)  # a run recorded by a build without the key resumes
    with pytest.raises(OtherSettingsError, match="is a flywheel run"):
        preflight(TrainJob(), TrainerConfig(robot="pendulum", algorithm="sac"), SACConfig(), run)
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "train_job.json").write_text("{}")
    with pytest.raises(ValueError, match="is a flywheel-train run"):
        Flywheel(_compose("flywheel"), trained)


def test_ray_settings_that_would_wait_forever_are_refused_at_once(monkeypatch):
    """ray.address=auto once joined what it found untried: another run's private local Ray (on loopback, advertised at
    the host's address) left `flywheel ray.address=auto` retrying Ray's "Failed to connect to GCS" for minutes."""
    import socket

    from fleet.pipeline.ray_start import RayJoinError, check_ray_settings

    base = _compose("flywheel").ray
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    for changes, reason in (({"num_cpus": 0}, "needs at least 1 CPU"), ({"node_ip_address": "192.0.2.77"}, "is not an address of this machine"),
                            ({"address": closed}, "nothing answers there")):  # fmt: skip
        with pytest.raises(RayJoinError, match=reason):
            check_ray_settings(OmegaConf.merge(base, changes))
    monkeypatch.setenv("RAY_ADDRESS", closed)  # what auto finds (Ray may give it as this host's network address)
    with pytest.raises(RayJoinError, match=r"ray.address=auto found \S+:\d+ \(from RAY_ADDRESS\), which does not answer .*another run's private local Ray"):
        check_ray_settings(OmegaConf.merge(base, {"address": "auto"}))


def test_the_local_rays_settings_are_named_where_a_cluster_run_ignores_them():
    """ray.num_cpus, ray.object_store_memory and ray.include_dashboard are ray.init's for a Ray of the run's own: with
    ray.address set they were ignored without a word (start_ray warns with these as it joins: tests/test_ray_cluster.py)."""
    from fleet.pipeline.ray_start import ignored_on_a_cluster

    base = _compose("flywheel").ray
    local = {"num_cpus": 8, "object_store_memory": 1, "include_dashboard": True}
    assert ignored_on_a_cluster(OmegaConf.merge(base, local)) == []  # a local Ray reads them
    assert ignored_on_a_cluster(OmegaConf.merge(base, {"address": "10.0.0.1:6379"})) == []  # their defaults: nothing to say
    assert ignored_on_a_cluster(OmegaConf.merge(base, local, {"address": "auto"})) == [
        "ray.num_cpus=8", "ray.object_store_memory=1", "ray.include_dashboard=True"
    ]


def test_a_typo_in_a_yaml_file_is_refused(tmp_path):
    conf = tmp_path / "conf"
    subprocess.run(["cp", "-r", str(CONF), str(conf)], check=True)
    ray = conf / "ray" / "local.yaml"
    ray.write_text(ray.read_text() + "num_gpu: 1\n")
    with pytest.raises(ConfigCompositionException) as info, initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        compose("flywheel", [RUN_DIR])
    assert "num_gpu" in f"{info.value} {info.value.__cause__}"


POLICY_OPTIONS = sorted(p.stem for p in (CONF / "policy").glob("*.yaml"))
SMALL_LEARNER = ["policy.algorithm.sac.buffer_size=1000", "policy.algorithm.model_retain=1"]  # no large replay to allocate


@pytest.mark.parametrize("option", POLICY_OPTIONS)
def test_the_learner_and_its_world_model_default_to_auto(option):
    policy = _compose("flywheel", [f"policy={option}"]).policy
    assert policy.trainer.device == "auto"
    assert option.startswith(("ppo", "sac")) or policy.algorithm.model_train.device == "auto"


def test_auto_resolves_to_this_machines_device_where_the_learner_is_built():
    from policies.trainer import make_algorithm

    here = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = _compose("flywheel", SMALL_LEARNER)  # the flywheel's learner (policy=mbpo_fleet)
    trainer = instantiate(cfg.policy.trainer)
    assert trainer.device == "auto"  # the config keeps what was asked; the learner is built on what it resolves to
    learner = make_algorithm(trainer, instantiate(cfg.policy.algorithm))
    assert next(learner.policy.parameters()).device.type == here and learner.config.model_train.device == here


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_says_what_to_do():
    from policies.trainer import make_algorithm

    cfg = _compose("flywheel", [*SMALL_LEARNER, "policy.trainer.device=cuda"])
    with pytest.raises(ValueError, match="device 'cuda' asked for, but .*; use device=auto"):
        make_algorithm(instantiate(cfg.policy.trainer), instantiate(cfg.policy.algorithm))


def test_a_device_name_torch_does_not_know_is_refused_with_the_key_named():
    cfg = _compose("flywheel", ["policy.trainer.device=gpu"])
    with pytest.raises(InstantiationException, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got 'gpu'"):
        instantiate(cfg.policy.trainer)


SHOW_RUN_DIRS = f"""
import json, os, sys
import hydra, fleet.conf.schema_flywheel
@hydra.main(config_path={CONF_DIR!r}, config_name="flywheel", version_base="1.3")
def show(cfg):
    from hydra.core.hydra_config import HydraConfig
    print("run_dir", cfg.run_dir, HydraConfig.get().runtime.output_dir, flush=True)
for args in json.loads(sys.argv.pop(1)):
    if os.fork() == 0:  # each run is its own app process, forked after the slow imports
        sys.argv[1:] = args
        show()
        os._exit(0)
    status = os.wait()[1]
    if status:
        sys.exit(f"{{args}}: exit status {{status}}")
    print("end", flush=True)
"""


def _run_dirs(*runs: list[str], cwd: Path | None = None) -> list[list[tuple[str, str]]]:
    """The (run_dir, Hydra's output dir) of each command line's app runs (one list per command line). One interpreter pays
    the imports (~5 s on 2 cores); each command line runs in a child forked from it, Hydra untouched."""
    out = subprocess.run([sys.executable, "-c", SHOW_RUN_DIRS, json.dumps(runs)], capture_output=True, text=True, timeout=120, check=True, cwd=cwd).stdout
    dirs = [[]]
    for line in out.splitlines():
        if line == "end":
            dirs.append([])
        elif line.startswith("run_dir "):
            dirs[-1].append(tuple(line.split(" ")[1:]))
    return dirs[:-1]


def test_run_dir_is_hydras_output_dir_unless_set(tmp_path):
    """Each job of a multirun gets its own folder (<sweep dir>/<job number>); an explicit run_dir wins (resume),
    and Hydra's own files (.hydra/, the log) follow it there unless hydra.run.dir is set too."""
    new, explicit, both, multirun = _run_dirs(
        [f"hydra.run.dir={tmp_path / 'new'}"],
        [f"run_dir={tmp_path / 'old'}"],
        [f"hydra.run.dir={tmp_path / 'new'}", f"run_dir={tmp_path / 'old'}"],
        ["--multirun", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
    )
    assert new == [(str(tmp_path / "new"),) * 2]
    assert explicit == [(str(tmp_path / "old"),) * 2]
    assert both == [(str(tmp_path / "old"), str(tmp_path / "new"))]
    assert multirun == [(str(tmp_path / "sweep" / str(job)),) * 2 for job in (0, 1)]
    assert OmegaConf.load(CONF / "flywheel.yaml").hydra.job.chdir is False


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    """Two runs (or sweeps) started in one second shared runs/<time>/: one checkpoint, one export, both runs' rows
    interleaved in metrics.jsonl. The folder is made when its name is chosen, and a taken name gets -2, -3."""
    same = ["hydra.run.dir=${run_folder:runs/same}"]  # the default's rule, with a name that does not move with the clock
    sweep = ["--multirun", "seed=0,1", "hydra.sweep.dir=${new_folder:runs/sweep}"]
    runs = _run_dirs(same, same, same, sweep, sweep, cwd=tmp_path)
    at = lambda name: str(tmp_path / "runs" / name)  # noqa: E731
    assert [r[0][0] for r in runs[:3]] == [at("same"), at("same-2"), at("same-3")]
    assert [r[0] for r in runs[3:]] == [(at("sweep/0"),) * 2, (at("sweep-2/0"),) * 2] and [r[1][0] for r in runs[3:]] == [at("sweep/1"), at("sweep-2/1")]


@pytest.mark.slow
def test_the_wheel_ships_the_configs(tmp_path):
    """A non-editable install finds its configs: the built wheel holds fleet/conf/ (built from a copy, so
    neither the repository's conf/ link nor its build/ folder play a part)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "sim", "worldmodel", "policies", "fleet"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(tmp_path)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("fleet/conf/")}
    want = {f"fleet/conf/{p.relative_to(CONF)}" for p in CONF.rglob("*.yaml")}
    assert want and want <= shipped
    assert "fleet/conf/schema_flywheel.py" in shipped


def test_a_run_dir_that_cannot_be_a_folder_stops_the_app_in_one_line(tmp_path):
    from fleet.apps.errors import check_run_dir_argument

    (tmp_path / "afile").write_text("")
    for bad in ("afile", "afile/sub"):
        with pytest.raises(SystemExit, match=f"flywheel: run_dir={tmp_path / bad}: {tmp_path / 'afile'} is a file, not a folder"):
            check_run_dir_argument("flywheel", ["seed=1", f"run_dir={tmp_path / bad}"])
    check_run_dir_argument("flywheel", [f"run_dir={tmp_path / 'new' / 'run'}"])  # a folder to create: fine


def test_the_loops_values_that_failed_late_are_refused_before_anything_runs(tmp_path, monkeypatch):
    """policy.trainer.seed was silently ignored by the loop (a seed sweep gave identical runs); an unknown activation, an
    empty replay buffer or zero torch threads crashed after iteration 0's telemetry, calibration and world model,
    with the bad value already recorded in the run's settings; ray.auth=foo and a tiny object store failed in ray.init."""
    from fleet.pipeline.loop import Flywheel
    from fleet.pipeline.ray_start import RayJoinError, check_ray_settings

    for override, reason in (
        ("policy.trainer.seed=7", "policy.trainer.seed=7 is not read by flywheel"),
        ("policy.algorithm.sac.activation=foo", "activation 'foo' is not one of"),
        ("policy.algorithm.sac.buffer_size=0", r"buffer_size=0 \(must be >= 1\)"),
        ("policy.algorithm.sac.buffer_size=8", "buffer_size=8 holds fewer transitions than one batch"),
        ("policy.trainer.torch_threads=0", r"torch_threads=0 \(must be >= 1\)"),
    ):
        with pytest.raises(ValueError, match=reason):
            Flywheel(_compose("flywheel", [override]), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing recorded
    for override, reason in (
        ("ray.auth=foo", "ray.auth='foo'"), ("ray.object_store_memory=1", "at least 78643200 bytes"),
        ("ray.address=ray://nohost.invalid:10001", "Ray Client is not supported"),  # once probed as a host, "nothing answers there"
        ("ray.address=auto", "no Ray cluster runs on this machine"),  # once a run folder recorded, then Ray's ConnectionError
    ):  # fmt: skip
        if override == "ray.address=auto":  # as where no cluster runs (another test's may, on this host, meanwhile): Ray's own answer
            import ray._private.services as services

            def none_here(address):
                raise ConnectionError("Could not find any running Ray instance.")

            monkeypatch.setattr(services, "canonicalize_bootstrap_address", none_here)
        with pytest.raises(RayJoinError, match=reason):
            check_ray_settings(_compose("flywheel", [override]).ray)


def test_a_run_of_an_earlier_build_without_recorded_settings_is_checked_on_what_it_recorded(tmp_path):
    """A run folder from before flywheel_run.json was resumed with any settings: a reacher fleet wrote into a pendulum
    run's store, then the run died with a traceback on the pendulum policy."""
    import json

    from fleet.run_folders import flywheel_run_settings

    export = tmp_path / "policies" / "iter000"
    export.mkdir(parents=True)
    (export / "manifest.json").write_text(json.dumps({"robot_model": "pendulum"}))
    (tmp_path / "state.json").write_text(json.dumps({"next_iteration": 1, "current": {"version": 1, "export": str(export)}}))
    with pytest.raises(ValueError, match="holds a run of robot model 'pendulum'.*loop.robot_model=pendulum"):
        flywheel_run_settings(_compose("flywheel", ["loop.robot_model=reacher"]), tmp_path)
    assert flywheel_run_settings(_compose("flywheel", ["loop.robot_model=pendulum"]), tmp_path)["loop.robot_model"] == "pendulum"


def test_a_deleted_key_and_a_value_that_does_not_resolve_stop_the_app_in_one_line(tmp_path, monkeypatch):
    """``~seed`` ended in a ConfigAttributeError traceback from the loop; ``run_dir=${oc.env:UNSET}`` in an
    InterpolationResolutionError traceback; a --multirun Hydra refused left runs/<time>/multirun.yaml behind."""
    from fleet.conf.schema_tools import check, missing_keys

    monkeypatch.delenv("FLYWHEEL_UNSET_FOR_TEST", raising=False)
    with pytest.raises(SystemExit, match=r"flywheel: config keys \['seed'\] were deleted \(~key\)"):
        cfg = _compose("flywheel", ["~seed", f"run_dir={tmp_path}"])
        assert missing_keys(cfg) == ["seed"]
        check(cfg, "flywheel")
    with pytest.raises(SystemExit, match=r"flywheel: loop.iterations: .*FLYWHEEL_UNSET_FOR_TEST"):
        check(_compose("flywheel", ["loop.iterations=${oc.env:FLYWHEEL_UNSET_FOR_TEST}", f"run_dir={tmp_path}"]), "flywheel")
    result = subprocess.run([str(Path(sys.executable).parent / "flywheel"), "-m", "loop.iteratons=1,2"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and "iteratons" in result.stderr
    assert not (tmp_path / "runs").exists(), list((tmp_path / "runs").rglob("*"))  # no sweep folder of multirun.yaml alone, no empty runs/


@pytest.mark.parametrize("name", ["flywheel", "server", "robot", "train"])
def test_every_app_logs_http_requests_at_warning_only_into_a_file_that_rotates(name):
    """httpx logs every request at INFO: with the registry on S3 a replica wrote one line per robot poll, whatever
    fleet.server.log_level said, and the loop's log held nothing else. The log file grew without end (a soak's robot:
    ~20 MiB a day): it rotates at 20 MiB, 5 files at most."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=[RUN_DIR] if name in ("flywheel", "train") else [], return_hydra_config=True)
    loggers = cfg.hydra.job_logging.loggers
    assert {key: loggers[key].level for key in ("httpx", "httpcore", "tuf")} == dict.fromkeys(("httpx", "httpcore", "tuf"), "WARNING")
    file = cfg.hydra.job_logging.handlers.file
    assert (file["class"], file.maxBytes, file.backupCount, "file" in cfg.hydra.job_logging.root.handlers) == ("logging.handlers.RotatingFileHandler", 20 << 20, 4, True)


def test_the_loops_steps_and_decisions_reach_its_log_file_once_and_the_console_once(tmp_path):
    """A run's flywheel.log held nothing after 24 iterations, a SIGTERM and two resumes: the resume line, the gate's and
    the canary's decisions and each step's time went to the console only. Run in a process of its own (the app's logging
    set up as Hydra sets it, from the composed config)."""
    import subprocess
    import sys

    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="flywheel", overrides=[RUN_DIR], return_hydra_config=True)
    setup = OmegaConf.to_container(cfg.hydra.job_logging, resolve=False)
    setup["handlers"]["file"]["filename"] = str(tmp_path / "flywheel.log")
    script = (
        "import json, logging.config, sys\n"
        "from rich.console import Console\n"
        "from fleet.pipeline.progress import Progress\n"
        "logging.config.dictConfig(json.loads(sys.argv[1]))\n"
        "progress = Progress(Console(stderr=True, width=200))\n"
        "with progress.task('world model'):\n    pass\n"
        "progress.note('resuming run_dir at iteration 3')\n"
        "from fleet.apps.errors import one_line_errors\n"
        "with one_line_errors('flywheel', on_interrupt='rerun with run_dir=r to resume it'):\n    raise KeyboardInterrupt\n"
    )
    ran = subprocess.run([sys.executable, "-c", script, json.dumps(setup)], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 130, ran.stderr
    logged = (tmp_path / "flywheel.log").read_text()
    assert "done world model (" in logged and logged.count("resuming run_dir at iteration 3") == 1
    assert (ran.stdout + ran.stderr).count("resuming run_dir at iteration 3") == 1  # the console shows it once (not Hydra's handler too)
    stopped = "flywheel: interrupted; rerun with run_dir=r to resume it"  # why the run stopped: in the file too (it jumped to "resuming")
    assert logged.count(stopped) == 1 and (ran.stdout + ran.stderr).count(stopped) == 1


def test_a_path_in_the_users_home_is_expanded_in_every_app_setting(monkeypatch, tmp_path):
    """Nothing expanded ``~``: ``fleet.store.path='~/store'`` made a folder named ``~`` in the working directory (the
    log line read like the home folder), and a robot's token file in the home was "not there"."""
    import fleet.conf.schema_fleet  # noqa: F401

    from fleet.conf.schema_tools import check

    monkeypatch.setenv("HOME", str(tmp_path))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("server", overrides=["fleet.store.path='~/store'", "fleet.server.token_file='~'", "fleet.registry.root_keys=['~/k/root.pem']"])
        robot = compose("robot", overrides=["fleet.agent.token_file='~/robot.token'"])
    check(cfg, "flywheel-server"), check(robot, "flywheel-robot")
    assert cfg.fleet.store.path == f"{tmp_path}/store" and cfg.fleet.server.token_file == str(tmp_path)
    assert list(cfg.fleet.registry.root_keys) == [f"{tmp_path}/k/root.pem"] and robot.fleet.agent.token_file == f"{tmp_path}/robot.token"
    assert not cfg.fleet.registry.dir.startswith(str(tmp_path))  # a relative default stays relative


def test_a_run_dir_in_the_home_is_hydras_folder_too(monkeypatch, tmp_path):
    """`run_dir='~/r'`: the app expanded it, Hydra's folder (its ``${run_folder:...}``) did not, so .hydra/ and the log
    went to a folder named ~ in the working directory and the run to the home's r."""
    import fleet.conf  # noqa: F401  (registers run_folder)

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = OmegaConf.create({"run_dir": "~/r", "dir": "${run_folder:runs/now}"})
    assert cfg.dir == f"{tmp_path}/r"
