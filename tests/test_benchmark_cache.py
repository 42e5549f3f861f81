"""The learning benchmarks' seed cache (benchmarks/common.py): a result says which build computed it."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import cached_json, current_build  # noqa: E402


def test_a_cached_result_of_another_build_is_read_back_and_named(tmp_path, capsys):
    path, calls = tmp_path / "seed0.json", []
    compute = lambda: calls.append(1) or {"return": 1000.0}  # noqa: E731
    assert cached_json(path, compute, build="abc1234") == {"return": 1000.0} and len(calls) == 1
    assert (tmp_path / "seed0.json.build").read_text().strip() == "abc1234"
    assert cached_json(path, compute, build="abc1234") == {"return": 1000.0} and len(calls) == 1  # read back, silently
    assert capsys.readouterr().err == ""
    assert cached_json(path, compute, build="def5678") == {"return": 1000.0} and len(calls) == 1  # still read back ...
    assert "computed by abc1234, this is def5678 (--fresh recomputes)" in capsys.readouterr().err  # ... and named
    cached_json(path, compute, fresh=True, build="def5678")
    assert len(calls) == 2 and (tmp_path / "seed0.json.build").read_text().strip() == "def5678"
    assert current_build()  # this checkout's commit, or "unknown"


def test_real_step_efficiency_names_every_missing_seed(tmp_path):
    """Lines are medians over the same seeds for every method: a seed cached for one method and not another is a
    missing run, named, not dropped from that method's median."""
    from argparse import Namespace

    from real_step_efficiency import cached_runs, rerun_command

    for method, seed in (("sac", 0), ("sac", 1), ("sb3", 0), ("mbpo", 0), ("mbpo", 1)):
        (tmp_path / f"t_{method}_s{seed}.json").write_text(json.dumps({"method": method, "seed": seed, "curve": [[450, 1.0]], "wall_s": 1}))
    (tmp_path / "t_sac_ablation_s0.json").write_text("{}")  # another method whose name starts alike: not a sac run
    runs, missing = cached_runs(tmp_path, "t", ("sac", "sb3", "mbpo"), [0, 1])
    assert missing == [("sb3", 1)]
    assert [r["seed"] for r in runs["sac"]] == [0, 1] and [r["seed"] for r in runs["sb3"]] == [0]
    assert cached_runs(tmp_path, "t", ("sac", "mbpo"), [0, 1])[1] == []
    args = Namespace(robot="pendulum", eval_episodes=2, threshold=None, seeds=[0, 1])
    assert rerun_command(args, 450, 200, ["sb3"]).endswith("--robot pendulum --budget 450 --eval-every 200 --eval-episodes 2 --methods sb3 --seeds 0 1")


def test_quiet_sb3_leaves_no_log_folder(tmp_path, monkeypatch):
    """SB3's default logger makes an empty $TMPDIR/SB3-<date> folder on every learn(); the benchmarks' one does not."""
    import tempfile

    import gymnasium as gym
    from stable_baselines3 import SAC

    from common import quiet_sb3

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    env = gym.make("Pendulum-v1")
    quiet_sb3(SAC("MlpPolicy", env, learning_starts=100, device="cpu", policy_kwargs={"net_arch": [8]})).learn(20)
    env.close()
    assert not list(tmp_path.glob("SB3-*"))  # (torch may leave its own torchinductor_<user> cache there)
