"""Export -> numpy runtime: same actions as torch; corrupted or mismatched exports are refused."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save as save_numpy

from policies.evaluate import evaluate
from policies.export import export_policy, torch_policy_from_export
from policies.networks import Policy, PolicySpec
from policies.runtime import MANIFEST_FILE, WEIGHTS_FILE, PolicyLoadError, load_policy, load_policy_bytes, manifest_bytes
from sim.variation import VariationProfile

EXPECT = dict(robot_model="pendulum", obs_dim=4, act_dim=1)


def _policy(activation: str, normalize: bool, seed: int = 0, obs_dim: int = 4, act_dim: int = 1) -> Policy:
    torch.manual_seed(seed)
    policy = Policy(PolicySpec(obs_dim, act_dim, (32, 32), activation, normalize))
    rng = np.random.default_rng(seed)
    policy.normalizer.update(torch.from_numpy(rng.normal(2.0, 3.0, size=(500, obs_dim)).astype(np.float32)))
    return policy.eval()


def _export(tmp_path, policy: Policy, name: str = "export", **kwargs):
    directory = tmp_path / name
    manifest = export_policy(
        policy, directory, robot_model="pendulum", policy_version="v7", algorithm="ppo", data_snapshot="snapshot-42", **kwargs
    )
    return directory, manifest


@pytest.mark.parametrize("activation,normalize", [("tanh", True), ("relu", True), ("relu", False)])
def test_numpy_runtime_acts_like_the_torch_policy(tmp_path, activation, normalize):
    policy = _policy(activation, normalize)
    directory, manifest = _export(tmp_path, policy)
    runtime = load_policy(directory, **EXPECT)
    obs = np.random.default_rng(1).normal(2.0, 5.0, size=(256, 4)).astype(np.float32)  # some beyond the clip
    with torch.no_grad():
        expected = policy(torch.from_numpy(obs)).numpy()
    got = runtime.act(obs)
    assert got.dtype == np.float32 and got.shape == (256, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(runtime.act(obs[3]), expected[3], atol=1e-5)  # single observation
    assert manifest["training"]["data_snapshot"] == "snapshot-42" and runtime.version == "v7"
    rebuilt = torch_policy_from_export(directory)
    with torch.no_grad():
        np.testing.assert_array_equal(rebuilt(torch.from_numpy(obs)).numpy(), expected)


def test_manifest_is_canonical_and_records_evaluation(tmp_path):
    policy = _policy("tanh", True)
    evaluation = evaluate(policy, "pendulum", [VariationProfile(), VariationProfile(payload_mass=1.0)], 2, seed=0)
    a, manifest = _export(tmp_path, policy, "a", evaluation=evaluation, env_steps=1000, seed=0)
    b, _ = _export(tmp_path, policy, "b", evaluation=evaluation, env_steps=1000, seed=0)
    raw = (a / MANIFEST_FILE).read_bytes()
    assert raw == (b / MANIFEST_FILE).read_bytes() == manifest_bytes(json.loads(raw))
    assert (a / WEIGHTS_FILE).read_bytes() == (b / WEIGHTS_FILE).read_bytes()
    assert list(json.loads(raw)) == sorted(manifest)
    assert len(manifest["evaluation"]["profiles"]) == 2
    assert manifest["architecture"] == {"activation": "tanh", "hidden_sizes": [32, 32], "output": "tanh", "type": "mlp_squashed_gaussian"}


def test_refuses_a_truncated_or_tampered_weights_file(tmp_path):
    directory, _ = _export(tmp_path, _policy("tanh", True))
    weights = directory / WEIGHTS_FILE
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(PolicyLoadError, match="truncated, corrupted"):
        load_policy(directory, **EXPECT)
    flipped = bytearray(blob)
    flipped[-1] ^= 0x01
    weights.write_bytes(bytes(flipped))
    with pytest.raises(PolicyLoadError, match="sha256"):
        load_policy(directory, **EXPECT)
    weights.unlink()
    with pytest.raises(PolicyLoadError, match="missing"):
        load_policy(directory, **EXPECT)


@pytest.mark.parametrize(
    "expect,match",
    [
        (dict(robot_model="ant", obs_dim=4, act_dim=1), "robot model 'pendulum'"),
        (dict(robot_model="pendulum", obs_dim=5, act_dim=1), "observations of 4 values"),
        (dict(robot_model="pendulum", obs_dim=4, act_dim=2), "1 actions"),
    ],
)
def test_refuses_a_policy_for_another_robot_or_spec(tmp_path, expect, match):
    directory, _ = _export(tmp_path, _policy("relu", True))
    with pytest.raises(PolicyLoadError, match=match):
        load_policy(directory, **expect)


def _rewrite(directory, manifest: dict, tensors: dict[str, np.ndarray]) -> None:
    """Write weights + a manifest whose sha256 matches them (a consistent but wrong export)."""
    blob = save_numpy(tensors)
    manifest = {**manifest, "weights": {**manifest["weights"], "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}}
    (directory / WEIGHTS_FILE).write_bytes(blob)
    (directory / MANIFEST_FILE).write_bytes(manifest_bytes(manifest))


def test_refuses_wrong_shapes_missing_tensors_and_bad_values(tmp_path):
    directory, manifest = _export(tmp_path, _policy("tanh", True))
    good = {k: v.numpy() for k, v in _policy("tanh", True).export_tensors().items()}

    wrong_shape = {**good, "trunk.1.weight": np.zeros((32, 31), np.float32)}
    _rewrite(directory, manifest, wrong_shape)
    with pytest.raises(PolicyLoadError, match=r"'trunk.1.weight' is float32\[32, 31\]"):
        load_policy(directory, **EXPECT)

    missing = {k: v for k, v in good.items() if k != "mean.bias"}
    _rewrite(directory, manifest, missing)
    with pytest.raises(PolicyLoadError, match="the architecture needs"):
        load_policy(directory, **EXPECT)

    nan = {**good, "mean.bias": np.array([np.nan], np.float32)}
    _rewrite(directory, manifest, nan)
    with pytest.raises(PolicyLoadError, match="NaN"):
        load_policy(directory, **EXPECT)

    f64 = {**good, "mean.bias": good["mean.bias"].astype(np.float64)}
    _rewrite(directory, manifest, f64)
    with pytest.raises(PolicyLoadError, match="float32"):
        load_policy(directory, **EXPECT)

    bigger = {**manifest, "architecture": {**manifest["architecture"], "hidden_sizes": [32, 64]}}
    _rewrite(directory, bigger, good)  # manifest claims another architecture than the weights hold
    with pytest.raises(PolicyLoadError, match="trunk.1.weight"):
        load_policy(directory, **EXPECT)


def test_refuses_a_malformed_manifest(tmp_path):
    directory, manifest = _export(tmp_path, _policy("tanh", True))
    weights = (directory / WEIGHTS_FILE).read_bytes()
    (directory / MANIFEST_FILE).write_bytes(b'{"format": "flywheel-policy", "format_')
    with pytest.raises(PolicyLoadError, match="not valid JSON"):
        load_policy(directory, **EXPECT)
    with pytest.raises(PolicyLoadError, match="v2"):
        load_policy_bytes({**manifest, "format_version": 2}, weights, **EXPECT)
    with pytest.raises(PolicyLoadError, match="activation"):
        load_policy_bytes({**manifest, "architecture": {**manifest["architecture"], "activation": "gelu"}}, weights, **EXPECT)
    with pytest.raises(PolicyLoadError, match="weights.file"):
        load_policy_bytes({**manifest, "weights": {**manifest["weights"], "file": "../../etc/passwd"}}, weights, **EXPECT)
    without = {k: v for k, v in manifest.items() if k != "observation"}
    with pytest.raises(PolicyLoadError, match="missing or mistypes"):
        load_policy_bytes(without, weights, **EXPECT)
    assert load_policy_bytes(manifest_bytes(manifest), weights, **EXPECT).act(np.zeros(4)).shape == (1,)


def test_export_refuses_non_finite_weights(tmp_path):
    policy = _policy("tanh", True)
    with torch.no_grad():
        policy.actor.mean.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        _export(tmp_path, policy)
