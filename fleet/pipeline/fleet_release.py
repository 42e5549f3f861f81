"""The fleet's stable release, where the loop did not make it: an operator's rollback, or any release another publisher
made to the run's registry (``flywheel-registry rollback``, ``POST /v1/policies``).

The loop's current policy (``state["current"]``: its version and export) is what the gate measures each candidate
against and what the lineage names as the candidate's parent. After an operator rolled the fleet back, the stable
version is not the one the state names; a run that went on from its state would gate the next candidate against the
policy the operator withdrew, and promote it over that. So each iteration starts by asking the registry
(:func:`fleet_current`): a stable release of another version that the loop did not make itself (:func:`loop_iteration`)
becomes the current policy, its export written from the registry's files, and the run says so. A stable release
carrying the current policy's own weights (the loop's own rollback of a canary republishes them under a new version)
only moves the version. A rollback made later in the iteration (while it trains, or while its canary runs) stops its
release there (fleet/pipeline/loop.py, ``Flywheel._fleet_moved``); the next iteration starts from the fleet's release.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from policies.runtime import MANIFEST_FILE, PolicyLoadError, load_policy, manifest_bytes, parse_manifest

log = logging.getLogger(__name__)
_LOOP_NOTE = re.compile(r"iteration (\d+)")


def release_note(k: int) -> str:
    """The note of the release iteration ``k`` makes: what tells the loop's own releases from others' (:func:`loop_iteration`)."""
    return f"iteration {k}"


def loop_iteration(manifest: dict) -> int | None:
    """The iteration whose release ``manifest`` is (its note as :func:`release_note` writes it), None for a release the loop
    did not make (an operator's rollback, another publisher's)."""
    match = _LOOP_NOTE.fullmatch(manifest.get("note") or "")
    return None if match is None else int(match.group(1))


def fleet_current(registry, stable: int | None, current: dict | None, run_dir: Path, spec: dict) -> dict | None:
    """The current policy the iteration should start from where it is not ``current`` (None: keep it). ``registry``: the
    run's PolicyRegistry; ``stable``: its stable version, as just read; ``spec``: robot_model, obs_dim, act_dim of the run's
    robots. A release the run cannot load as its policy is a ValueError saying what to do: the loop would otherwise gate
    against a policy the fleet does not run."""
    version = (current or {}).get("version")
    if stable is None or stable == version:
        return None
    manifest = registry.manifest(stable)
    if loop_iteration(manifest) is not None:  # the loop's own (a release an interrupted iteration left: _settle_release)
        return None
    if current is not None and _weights_sha256(current.get("export")) == manifest["weights"]["sha256"]:
        log.info("the fleet runs v%d, the weights of the current policy v%s (%s): v%d is the current version now", stable, version, manifest.get("note"), stable)
        return {**current, "version": stable}
    export = Path(run_dir) / "policies" / f"fleet-v{stable:08d}"
    try:
        write_export(parse_manifest(manifest.get("policy") or {}), registry.weights(stable), export)
        load_policy(export, **spec)
    except PolicyLoadError as exc:
        raise ValueError(
            f"the fleet runs v{stable} ({manifest.get('note') or 'no note'}), which this run cannot load as its current policy ({exc}): "
            "the gate would measure candidates against a policy the fleet does not run. Publish a policy for this run's robots "
            "(or roll the fleet back to one: flywheel-registry rollback --to N), then resume"
        ) from None
    log.warning(
        "the fleet runs v%d (%s), not v%s, which this run's state names as its current policy and an operator withdrew or replaced: "
        "v%d is the current policy from now on (the gate's baseline and the next release's parent), its export %s",
        stable, manifest.get("note") or "no note", version, stable, export,
    )  # fmt: skip
    return {"version": stable, "checkpoint": None, "export": str(export)}


def write_export(policy: dict, weights: bytes, directory: Path) -> None:
    """An export folder (policies/export.py's layout) holding a release's export manifest ``policy`` (parsed: its weights
    file is a plain name) and ``weights``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / policy["weights"]["file"]).write_bytes(weights)
    (directory / MANIFEST_FILE).write_bytes(manifest_bytes(policy))


def _weights_sha256(export: str | None) -> str | None:
    """The sha256 of the weights an export folder's manifest names (None: no export, or one that cannot be read)."""
    try:
        return json.loads((Path(export) / MANIFEST_FILE).read_bytes())["weights"]["sha256"]
    except (TypeError, OSError, ValueError, KeyError):
        return None
