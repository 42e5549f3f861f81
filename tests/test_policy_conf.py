"""fleet/conf/policy/{ppo,sac,sac_fleet}.yaml (conf/ links there) compose into configs that build and run a trainer."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import fleet.conf.schema_flywheel  # noqa: F401  (registers the schemas the YAML's defaults name)
from fleet.conf import CONF_DIR
from policies.trainer import Trainer, first_update, make_algorithm


@pytest.mark.parametrize("option", ["ppo", "sac", "sac_fleet"])
def test_policy_config_builds_a_trainer_that_runs(option):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="flywheel", overrides=[f"policy={option}"])
    trainer_config = instantiate(cfg.policy.trainer)
    algo_config = instantiate(cfg.policy.algorithm)
    assert trainer_config.algorithm == option.split("_")[0]
    algo_config = algo_config.__class__(**{**algo_config.__dict__, "hidden_sizes": (8,)})
    worlds = trainer_config.num_worlds  # the least budget that reaches the first update (a smaller one is refused)
    small = trainer_config.__class__(**{**trainer_config.__dict__, "total_env_steps": -(-first_update(trainer_config, algo_config)[0] // worlds) * worlds})
    if hasattr(algo_config, "replay_ratios"):  # the fleet's offline sources come from the loop, not from here
        assert algo_config.online_source in algo_config.replay_ratios
        algo_config = algo_config.__class__(**{**algo_config.__dict__, "replay_ratios": {algo_config.online_source: 1.0}})
    with Trainer(small, make_algorithm(small, algo_config)) as trainer:
        result = trainer.train()
    assert result.env_steps == small.total_env_steps and result.updates >= 1
