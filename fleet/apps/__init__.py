"""Thin Hydra entry points: config -> objects -> one run() call."""
