"""Policy registry: a TUF repository (offline threshold root, online targets/snapshot/timestamp), staged rollout, robot-side TUF updates and checks."""
