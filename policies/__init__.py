"""Policies floor: networks, PPO/SAC trainers, evaluation, export and the numpy on-robot runtime.

Import-light on purpose: ``import policies`` does not import torch, because robots import
:mod:`policies.runtime` (numpy only). Import submodules directly::

    from policies.trainer import Trainer, TrainerConfig, make_algorithm
    from policies.runtime import load_policy
"""
