"""Policy registry: signed manifests (Ed25519), versions on disk, staged rollout, robot-side verification."""
