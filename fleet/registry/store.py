"""The policy registry: policy versions and the staged rollout, published as a TUF repository.

Layout under ``<root>``, a local directory or ``s3://bucket/prefix`` (fleet/registry/files.py)::

    tuf/           the TUF repository robots fetch and verify (fleet/registry/tuf_repo.py); a
                   release is the targets fleet/registry/manifest.py names
    history.jsonl  the rollout's events ({"version", "event", "at", ...}), the server's record,
                   one JSON line each, appended after the change it records is committed

Rollout: a new version goes to the canary cohort first; ``widen()`` makes it stable for all,
``rollback()`` republishes the last stable weights under a new, higher version (robots never
accept a lower version) and ends the canary; ``rollback(to=N)`` returns the whole fleet to version
N's weights the same way, a stable release withdrawn (docs/security.md, "Rolling the fleet back").
Only versions the signed targets metadata lists are read or rolled back to: the files of one that
left the listing stay in storage, but no signature covers them (nor the history) any more. Every
change is one TUF publication (targets, snapshot, then timestamp: the commit). Every change is made
on the newest published state and redone on the new one when another writer (a server replica on
another host) committed first (TufRepository.change): two replicas never both publish version N. The
registry serves; W&B only mirrors.

A registry of the earlier layout (``versions/<v>/manifest.json`` signed envelopes and
``rollout.json``) is imported into the TUF repository the first time it is opened, with the same
version numbers, and moved to ``legacy/`` (docs/security.md, cut-over).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

from securesystemslib.signer import Signer
from tuf.api.metadata import Snapshot, Targets, Timestamp

from fleet.registry.files import RegistryFiles, WriteConflict, open_files
from fleet.registry.manifest import MAX_JSON_BYTES, ROLLOUT_TARGET, build_manifest, manifest_target, version_for, weights_target
from fleet.registry.signing import canonical_json, load_signer
from fleet.registry.tuf_repo import ONLINE_ROLES, RegistryCorrupted, ReleaseKeyMissing, TufRepository
from policies.runtime import PolicyLoadError, PolicyWeightsError, load_policy_bytes

log = logging.getLogger(__name__)
KEEP_VERSIONS = 8  # newest versions kept in the targets metadata besides the stable and canary ones: what a rollback can return to
RELEASED = ("stable", "canary")  # the history's events of a version published
REPUBLISHED = ("policy", "data_snapshot", "gate", "sensor_offsets", "body_contexts", "sensor_filters")  # what a rollback sends out again
SPEC = ("robot_model", "obs_dim", "act_dim")
MAX_POLICY_VERSION = 99_999_999  # policies/<version:08d>/: the largest version a restore's floor (restored) may name
# how far a restore (restored) moves targets, snapshot and timestamp past the backup's versions: it must exceed every
# signature made since the backup. Each change (publish, widen, rollback) signs each role once (a lost race skips up to
# SKIP_TAKEN more), and the server re-signs a role at half its life: the timestamp about twice a day with the default
# 1-day life, at most every 150 s with the shortest (300 s). A million covers 25 years of 100 changes a day at the defaults,
# 4 years at the shortest timestamp life; metadata names carry 9 digits, room for 999 restores.
METADATA_MARGIN = 1_000_000


class RegistryError(ValueError):
    pass


class RegistryOpenError(RegistryError):
    """The registry cannot be opened as configured (a key its root does not name, no root metadata): what the operator
    changes, said in one line by the apps; the other :class:`RegistryError` raised later mean the caller's logic failed."""


class NoCanary(RegistryError):
    """A widen or rollback with no canary running."""


class CanaryChanged(RegistryError):
    """A widen or rollback naming a canary that is not the one running: another publisher's replaced it, or the version
    named is no canary (never published, the stable version, one ended before); the text says which."""


class RolloutRefused(RegistryError):
    """A rollback refused before anything is signed. ``code`` (the HTTP answer's error) says why: ``unknown_version``
    (``to`` was never published here), ``not_the_canary`` (``to`` is the canary: widen it instead), ``no_stable`` (a
    canary with no stable version to return to), ``stable_changed`` (the stable version judged is no longer the stable
    one), ``nothing_to_do`` (the fleet runs that version's weights already), ``unavailable`` (no longer listed in the signed
    targets metadata, its files changed or gone, for other robots than the fleet's, or a release robots would refuse).
    ``field``: the body's field to change, or None."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code, self.field = code, field


class PublishRefused(RegistryError):
    """A release no robot would take, refused before anything is signed; ``field`` names what to change."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def _check_loads(policy: dict, weights: bytes, **spec) -> None:
    """:class:`PublishRefused` unless a robot of ``spec`` would load ``policy`` with ``weights`` (as fleet.registry.pull does)."""
    try:
        load_policy_bytes(policy, weights, **spec)
    except PolicyLoadError as exc:
        raise PublishRefused("weights" if isinstance(exc, PolicyWeightsError) else "policy", f"a robot would refuse it: {exc}") from None


def signable_json(name: str, obj, field: str) -> bytes:
    """``obj`` as the canonical JSON a robot reads, or :class:`PublishRefused`: a value JSON cannot carry (NaN,
    infinities, text that is not Unicode), or a file over the size robots read (``MAX_JSON_BYTES``)."""
    try:
        data = canonical_json(obj)  # NaN and infinities raise here
        json.dumps(obj, ensure_ascii=False).encode("utf-8")  # a lone surrogate raises here (canonical_json would escape it as "\ud800")
    except (ValueError, TypeError, UnicodeError) as exc:
        raise PublishRefused(field, f"{name} would not be valid JSON ({exc.__class__.__name__}: {str(exc)[:200]}); send finite numbers and Unicode text") from None
    if len(data) > MAX_JSON_BYTES:
        raise PublishRefused(field, f"{name} would be {len(data)} bytes; robots read at most {MAX_JSON_BYTES}: send less")
    return data


class PolicyRegistry:
    """The server's registry at ``root`` (a directory or ``s3://bucket/prefix``). ``online``: the
    signer of snapshot and timestamp (and of targets where the root names no release key);
    ``release``: the release key's signer, where the root names one for targets. The repository's
    root (made offline with the root keys) must already exist and name these keys. Without the
    release key the root names, this registry serves and keeps metadata fresh but cannot release
    (``can_release``; publish, widen and rollback raise :class:`ReleaseKeyMissing`); with an online key
    a rotation replaced while it ran, it signs nothing (:class:`OnlineKeyRotated`). ``expiry_s``: role
    lifetimes to make the registry's (recorded for every signer of it: TufRepository.record_expiry); None
    signs with the registry's. Any number of these, in any processes on any hosts, may serve and change
    one registry."""

    def __init__(
        self, root: str | Path | RegistryFiles, online: Signer, *, release: Signer | None = None,
        expiry_s: Mapping[str, float] | None = None, clock=time.time,
    ):  # fmt: skip
        self.files = open_files(root)
        self.location = self.files.location
        self.root = self.files.local_dir  # the directory on this host; None on object storage
        targets = [s for s in (release, online) if s is not None]  # the one the root names signs (TufRepository.can_sign)
        signers = {Targets.type: targets, Snapshot.type: [online], Timestamp.type: [online]}
        self.repo = TufRepository(self.files.sub("tuf"), signers, expiry_s=expiry_s, clock=clock)
        root_md = self.repo.require_root()
        if any(online.public_key.keyid not in root_md.roles[role].keyids for role in (Snapshot.type, Timestamp.type)):
            raise RegistryOpenError(
                f"the online key {online.public_key.keyid[:16]} is not the key root v{root_md.version} names for "
                "snapshot and timestamp: start the server with that key, or rotate to this one (`flywheel-registry rotate`)"
            )
        if release is not None and release.public_key.keyid not in root_md.roles[Targets.type].keyids:
            named = "the online key" if online.public_key.keyid in root_md.roles[Targets.type].keyids else "another key"
            raise RegistryOpenError(
                f"the release key {release.public_key.keyid[:16]} is not the key root v{root_md.version} names for targets ({named}): "
                "give that key, or rotate to this one (`flywheel-registry rotate --release-key`)"
            )
        self.repo.record_expiry()  # a setting given: the registry's lifetimes from now on, for every signer of it
        if self.can_release and Timestamp.type not in self.repo._md:  # the cut-over only: before the first TUF publication
            self._import_legacy()
        self.repo.refresh_online(check_keys=True)  # after a key rotation: everything the old online key signed

    # -- state ----------------------------------------------------------------------------
    def refresh(self) -> list[str]:
        """Re-sign online metadata past half its life (TufRepository.refresh_online); cheap when nothing is."""
        return self.repo.refresh_online()

    def rollout(self) -> dict:
        """The published rollout and its recorded history."""
        return {**self._state(), "history": self._history()}

    def _history(self) -> list[dict]:
        """The rollout's recorded events, oldest first (a line cut by a crash is left out: the events around it count)."""
        events = []
        for line in (self.files.read("history.jsonl") or b"").decode(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def _no_canary(self, action: str, judged: int | None) -> NoCanary:
        """What became of the last canary: a widen or rollback repeated (its answer lost) or beaten by another replica's is
        told so, not to start a canary (a retry that publishes again would send new weights). A rollback is told how to roll
        back the stable version instead, and to which versions."""
        ended = next((e for e in reversed(self._history()) if e.get("event") in ("widened", "rolled_back") and (judged is None or e.get("version") == judged)), None)
        if ended is not None and ended["event"] == "rolled_back":
            return NoCanary(f"no canary to {action}: v{ended['version']} was already rolled back (at {_when(ended)} UTC); nothing to do")
        if ended is not None:
            why = f"no canary to {action}: v{ended['version']} was already widened to the whole fleet (at {_when(ended)} UTC)"
        else:
            why = f"no canary to {action}: start one with POST /v1/policies and a cohort"
        if action != "roll back":
            return NoCanary(why + ("; nothing to do" if ended is not None else ""))
        stable = self._state()["stable"]
        if stable is None:
            return NoCanary(f"{why}; nothing was released to every robot yet")
        return NoCanary(f"{why}. To roll back the stable version v{stable}, send {{\"to\": N, \"reason\": ...}} (`flywheel-registry rollback --to N`): {self._choices_text()}")

    def _recorded_versions(self) -> list[int]:
        """Every version the rollout's history records: a version number is never given twice, even where the published
        targets were pointed back to older ones (robots that ran the first would refuse the second: replay). A restore's
        floor (:meth:`restored`) is one of them."""
        return [e["version"] for e in self._history() if type(e.get("version")) is int]

    def next_version(self) -> int:
        """The version the next release takes: past every version listed or recorded, never a number released before."""
        return max([*self.versions(), *self._recorded_versions()], default=0) + 1

    def published_versions(self) -> list[int]:
        """Every version published here, listed or not: those listed, and those the history records a release of. The
        history is unsigned: this only tells a refusal's reason apart (never published, or no longer listed)."""
        released = (e["version"] for e in self._history() if e.get("event") in RELEASED and type(e.get("version")) is int)
        return sorted({*self.versions(), *released})

    def rollback_choices(self) -> list[int]:
        """The versions a refusal offers to roll the fleet back to (``rollback(to=N)``), newest first: versions the signed
        targets metadata lists (the only ones a rollback takes) that the whole fleet ran (released or widened to every
        robot; one the history does not name: imported), neither the stable version nor one withdrawn (recorded
        ``rolled_back``). Any listed version may be named; a canary never widened is only not offered."""
        state, history = self._state(), self._history()
        withdrawn = {e.get("version") for e in history if e.get("event") == "rolled_back"}
        fleet_wide = {e.get("version") for e in history if e.get("event") in ("stable", "widened")}
        named = {e.get("version") for e in history}
        return [
            v for v in reversed(self.versions())
            if v not in (state["stable"], state["canary"]) and v not in withdrawn and (v in fleet_wide or v not in named)
        ]  # fmt: skip

    def _choices_text(self) -> str:
        """The versions to roll back to, for a refusal's text."""
        choices = self.rollback_choices()
        if not choices:
            return "no other version the signed metadata lists can be rolled back to (publish a known-good policy with POST /v1/policies)"
        return "N one of " + ", ".join(f"v{v}" for v in choices)

    def _state(self) -> dict:
        return self._published_json(ROLLOUT_TARGET) or {"stable": None, "canary": None, "cohort": []}

    def versions(self) -> list[int]:
        """Versions listed in the published targets (the newest ones, and the stable and canary)."""
        return sorted(int(p.split("/")[1]) for p in self.repo.target_listing() if p.startswith("policies/") and p.endswith("/manifest.json"))

    def manifest(self, version: int) -> dict:
        """Version ``version``'s manifest, as the signed targets metadata lists it. RegistryError for a version not listed
        (never published, or past the newest KEEP_VERSIONS: its files no signature covers any more); RegistryCorrupted
        for a file changed where it is stored."""
        return self._release(version, with_weights=False)[0]

    def weights(self, version: int) -> bytes:
        """Version ``version``'s weights, as the signed targets metadata lists them; refused as :meth:`manifest` is."""
        return self._release(version)[1]

    def _release(self, version: int, with_weights: bool = True) -> tuple[dict, bytes | None]:
        """(manifest, weights or None) of a listed ``version``, each file checked against the listing."""
        manifest = self._published_json(manifest_target(version))
        if manifest is None:
            raise RegistryError(self._not_listed(version))
        weights = self.repo.listed_bytes(weights_target(version)) if with_weights else None
        if with_weights and weights is None:
            raise RegistryError(f"no weights for policy version {version}")
        return manifest, weights

    def _not_listed(self, version: int) -> str:
        """Why ``version`` (not listed) cannot be read: never published, or no longer listed, so nothing verifies its files."""
        if version not in self.published_versions():
            return f"v{version} was never published here"
        return (
            f"v{version} is no longer listed in the signed targets metadata (it lists the newest {KEEP_VERSIONS} versions and the "
            "stable and canary ones), so its files cannot be verified"
        )

    def latest_for(self, robot_id: str) -> dict | None:
        """The manifest this robot should run (canary-aware), or None before any release."""
        version = version_for(self._state(), robot_id)
        return None if version is None else self.manifest(version)

    # -- changes --------------------------------------------------------------------------
    def publish(
        self, weights: bytes, *, robot_model: str, obs_dim: int, act_dim: int, cohort: list[str] | None = None, spec_change: bool = False, **fields,
    ) -> dict:  # fmt: skip
        """Publish a new version (a canary for a non-empty ``cohort``, else stable); returns its manifest.
        :class:`PublishRefused` (nothing signed) for a release robots would refuse: a field JSON cannot carry, a
        manifest or rollout larger than robots read, a ``policy`` (export manifest) robots would not load the weights with,
        or a release for other robots than the stable version's (``robot_model``, ``obs_dim``, ``act_dim``: every robot
        would refuse it while the registry says the fleet runs it) unless ``spec_change`` says the fleet moves to them."""
        self.require_release()
        if cohort is not None and (isinstance(cohort, (str, bytes)) or not all(isinstance(r, str) for r in cohort)):
            raise PublishRefused("cohort", f"must be a list of robot ids (or empty for a stable release), got {type(cohort).__name__}")
        for key, value in fields.items():
            signable_json(key, value, key)
        if fields.get("policy"):  # the export manifest robots load the weights with (a rollback's own, as published)
            _check_loads(fields["policy"], weights, robot_model=robot_model, obs_dim=obs_dim, act_dim=act_dim)
        spec = {"robot_model": robot_model, "obs_dim": obs_dim, "act_dim": act_dim}

        def edit() -> dict:
            version = self.next_version()
            manifest = build_manifest(version=version, weights=weights, **spec, **fields)
            state = self._state()
            if state["stable"] is not None and not spec_change:
                _check_spec(self.manifest(state["stable"]), spec)
            if cohort:
                state.update(canary=version, cohort=sorted(cohort))
            else:
                state.update(stable=version, canary=None, cohort=[])
            files = {manifest_target(version): signable_json("the manifest", manifest, _largest(fields)), weights_target(version): weights}
            self._publish(state, files, {"version": version, "event": "canary" if cohort else "stable"})
            return manifest

        return self.repo.change(edit)

    def widen(self, canary: int | None = None) -> int:
        """Promote the canary to stable for the whole fleet; returns its version. ``canary``: the version the caller
        judged; :class:`CanaryChanged` if another has replaced it since (it would go to every robot untried), and
        :class:`RolloutRefused` if it is no canary at all (never published, the stable version, one ended before)."""
        self.require_release()

        def edit() -> int:
            state = self._state()
            if state["canary"] is None:
                raise self._no_canary("widen", canary)
            self._same_canary(state, canary)
            version = state["canary"]
            state.update(stable=version, canary=None, cohort=[])
            self._publish(state, {}, {"version": version, "event": "widened"})
            return version

        return self.repo.change(edit)

    def rollback(self, reason: str, canary: int | None = None, *, to: int | None = None) -> dict:
        """Withdraw a release: known-good weights go out again under a new, higher stable version for the whole fleet
        (robots never accept a lower one), and any canary ends. Returns the new manifest.

        Without ``to``: the canary is withdrawn and the stable version's weights go out again; ``canary`` names the canary
        the caller judged. With ``to`` (an operator returning the fleet to version ``to``: docs/security.md, "Rolling the
        fleet back"): the stable version, and the canary if one runs, are withdrawn and ``to``'s weights and manifest
        fields go out again, as the signed targets metadata lists them (a version no longer listed is refused: nothing
        verifies its files); ``canary`` then names the version the caller judged, the canary where one runs (the stable
        version is withdrawn with it), else the stable version. ``to`` the stable version with a canary running withdraws
        the canary alone. Each version withdrawn is recorded ``rolled_back`` with ``reason``, ``to`` and
        the new version (``as``). Nothing is signed where :class:`NoCanary`, :class:`CanaryChanged` or
        :class:`RolloutRefused` says why not: among them a canary with no stable version to return to (its robots would
        keep running it: publish a known-good policy, or roll back ``to`` an earlier version)."""
        self.require_release()

        def edit() -> dict:
            state = self._state()
            if to is not None:
                withdrawn, old, weights = self._stable_rollback(state, to, canary)
                good = to
            else:
                if state["canary"] is None:
                    raise self._no_canary("roll back", canary)
                self._same_canary(state, canary)
                if state["stable"] is None:
                    earlier = f", or roll back to an earlier version ({{\"to\": N}}): {self._choices_text()}" if self.rollback_choices() else ""
                    raise RolloutRefused(
                        "no_stable",
                        f"no stable version to return to (none was ever released to every robot): the canary's cohort ({', '.join(state['cohort'])}) "
                        f"would keep running v{state['canary']}. Publish a known-good policy as stable (POST /v1/policies without a cohort){earlier}",
                    )  # fmt: skip
                withdrawn, good = [state["canary"]], state["stable"]
                old, weights = self._release(good)
            # publish makes it the stable version, which ends the canary
            labels = [f"canary v{v}" if v == state["canary"] and to is not None else f"v{v}" for v in withdrawn]
            try:
                manifest = self.publish(
                    weights, **{k: old[k] for k in SPEC}, **{k: old[k] for k in REPUBLISHED if k in old},
                    note=f"rollback of {' and '.join(labels)} to the weights of v{good}: {reason}",
                )  # fmt: skip
            except PublishRefused as exc:  # a release robots would refuse: a manifest too large with the reason, a policy that no longer loads
                raise RolloutRefused(
                    "unavailable", f"{'to: ' if to is not None else ''}v{good}'s weights and manifest fields cannot be sent out again ({exc}). "
                    f"Where the manifest is too large, a shorter reason (it goes into the note) may fit; or roll back to another version: "
                    f"{self._choices_text()}", "to" if to is not None else None,
                ) from None  # fmt: skip
            for version in withdrawn:
                self._record({"version": version, "event": "rolled_back", "reason": reason, "to": good, "as": manifest["version"]})
            return manifest

        return self.repo.change(edit)

    def _stable_rollback(self, state: dict, to: int, judged: int | None) -> tuple[list[int], dict, bytes]:
        """What ``rollback(to=...)`` withdraws (the stable version, and the canary if one runs) and ``to``'s manifest and
        weights, or :class:`RolloutRefused` / :class:`CanaryChanged` saying why it may not."""
        stable, running = state["stable"], state["canary"]
        if to not in self.published_versions():
            raise RolloutRefused("unknown_version", f"to: v{to} was never published here; {self._choices_text()}", "to")
        if running is not None:
            self._same_canary(state, judged, to)
        elif judged is not None and judged != stable:
            raise self._stable_changed(judged, stable, to)
        if to == running:
            raise RolloutRefused("not_the_canary", f"to: v{to} is the canary: to give it to every robot, widen it (POST /v1/rollout/widen {{\"version\": {to}}})", "to")
        if to == stable and running is None:
            raise RolloutRefused(
                "nothing_to_do", f"to: v{to} is the stable version, which every robot runs already: nothing to do. To roll it back, send "
                f"{{\"to\": N}}: {self._choices_text()}", "to",
            )  # fmt: skip
        try:
            old, weights = self._release(to)
        except (RegistryError, RegistryCorrupted, FileNotFoundError) as exc:  # no longer listed, or its files changed or gone
            raise RolloutRefused("unavailable", f"to: v{to} cannot be sent out again: {exc}; {self._choices_text()}", "to") from None
        if stable is not None and stable != to:
            current = self.manifest(stable)
            if any(current[k] != old[k] for k in SPEC):
                raise RolloutRefused(
                    "unavailable", f"to: v{to} is for {_spec_text(old)}, the fleet's stable v{stable} for {_spec_text(current)}: every robot would "
                    f"refuse it; {self._choices_text()}", "to",
                )  # fmt: skip
            if running is None and current["weights"]["sha256"] == old["weights"]["sha256"]:
                note = current.get("note") or "no note"
                raise RolloutRefused("nothing_to_do", f"to: the stable version v{stable} carries the weights of v{to} already ({note}): nothing to do", "to")
        return [v for v in (stable, running) if v is not None and v != to], old, weights

    def _stable_changed(self, judged: int, stable: int | None, to: int) -> RolloutRefused:
        """A stable rollback that names (``version``) another stable version than the one published: one this rollback
        made already (a retry whose answer was lost), or one another publisher replaced since."""
        done = next((e for e in reversed(self._history()) if e.get("event") == "rolled_back" and e.get("version") == judged), None)
        if done is not None and done.get("to") == to:
            again = f"v{judged} was already rolled back to the weights of v{to} (as v{done.get('as')}, at {_when(done)} UTC); nothing to do"
            return RolloutRefused("nothing_to_do", again, "version")
        runs = f"the fleet runs v{stable} now (another publisher released it, or it was rolled back since): judge v{stable} before rolling it back"
        return RolloutRefused("stable_changed", f"version: v{judged} is not the stable version; {runs if stable is not None else 'no version is stable'}", "version")

    def _same_canary(self, state: dict, judged: int | None, to: int | None = None) -> None:
        """Nothing where the canary is the version the caller judged (or none was named); else :class:`CanaryChanged`
        saying what that version is: never published (a typo), the stable version, one widened or rolled back before, or
        an earlier canary another publisher replaced (only then is another publisher named). ``to``: the version a
        stable rollback returns the fleet to (with a canary running, its ``version`` names the canary too)."""
        running = state["canary"]
        if judged is None or judged == running:
            return
        judge = f"the canary is v{running} (on {', '.join(state['cohort'])}): judge it before widening or rolling it back"
        history = self._history()
        ended = next((e for e in reversed(history) if e.get("version") == judged and e.get("event") in ("widened", "rolled_back")), None)
        if judged not in self.published_versions():
            why = f"v{judged} was never published here"
        elif judged == state["stable"]:
            why = f"v{judged} is the stable version, not the canary" + (f" (widened at {_when(ended)} UTC)" if ended and ended["event"] == "widened" else "")
            if to is None:
                judge += '. To roll back the stable version, send {"to": N} (the version to return the fleet to)'
            else:  # a stable rollback withdraws the canary too: the caller names the canary it judged
                also = f" with the stable v{judged}" if to != judged else ""
                judge += (
                    f'. With a canary running, "version" names the canary, which a rollback to v{to} withdraws{also}: send '
                    f'{{"to": {to}, "version": {running}}} once you judged v{running}, or leave "version" out'
                )  # fmt: skip
        elif ended is not None:
            why = f"v{judged} is not the canary: it was {'widened' if ended['event'] == 'widened' else 'rolled back'} at {_when(ended)} UTC"
        elif any(e.get("version") == judged and e.get("event") == "canary" for e in history):
            why = f"v{judged} is not the canary now: another publisher replaced it"
        else:
            why = f"v{judged} is not the canary (it was released to every robot, and replaced since)"
        raise CanaryChanged(f"{why}; {judge}")

    def restored(self, past_version: int, margin: int = METADATA_MARGIN) -> dict:
        """After this registry was restored from a backup older than what robots run (docs/security.md, "Backing up and
        restoring the registry"): the next release takes a version above ``past_version``, the highest policy version any
        robot ran (robots refuse a lower one, and one they ran with other weights), recorded in the history as an event
        ``restored`` naming it (publish numbers past every version the history names: it holds across restarts, and for
        every replica); then targets, snapshot and timestamp are re-signed ``margin`` versions on (TufRepository.
        jump_versions), past whatever was signed since the backup, which robots trust. Each call jumps again. Returns the
        floor, the next version and the metadata versions before and after. Refused before anything is written: a
        ``past_version`` that is no version, a margin the metadata names have no room for, a process without the keys a
        release needs."""
        check_past_version(past_version)
        self.require_release()
        self.repo.check_jump(margin)
        before = {role: self.repo.open(role).signed.version for role in ONLINE_ROLES}
        self._record({"version": past_version, "event": "restored", "metadata_margin": margin})  # the floor first: a publish racing the jump is numbered past it
        after = self.repo.jump_versions(margin)
        return {"past_version": past_version, "next_version": self.next_version(), "metadata_before": before, "metadata": after, "root_version": self.repo.require_root().version}

    @property
    def can_release(self) -> bool:
        """Whether this process holds the key the newest root names for targets (asked of the root as last read: a
        change reads it again first, so a rotation while this runs is seen)."""
        return self.repo.can_sign(Targets.type)

    def require_release(self) -> None:
        """:class:`OnlineKeyRotated` unless this process holds the online key (a release ends in a snapshot and a
        timestamp), :class:`ReleaseKeyMissing` unless it holds the key that signs releases: the newest root asked,
        before anything is written."""
        self.repo.reload_all()
        self.repo.require_online()
        if not self.can_release:
            raise ReleaseKeyMissing(self.repo.release_key_advice())

    # -- internals ----------------------------------------------------------------------------
    def _publish(self, state: dict, files: Mapping[str, bytes], event: dict) -> None:
        """One TUF publication: the new files and rollout listed, old versions beyond KEEP_VERSIONS
        (but the stable and canary) dropped from the listing; then the event recorded. Runs inside
        a ``repo.change``, which redoes the whole change when another writer committed first."""
        rollout = {k: state[k] for k in ("stable", "canary", "cohort")}
        files = {**files, ROLLOUT_TARGET: signable_json("rollout.json", rollout, "cohort")}  # checked before any target is stored
        add = {path: self.repo.store_target(path, data) for path, data in files.items()}
        listed = sorted({*self.versions(), *(int(p.split("/")[1]) for p in add if p.startswith("policies/"))})
        keep = {*listed[-KEEP_VERSIONS:], rollout["stable"], rollout["canary"]}
        remove = [path for v in listed if v not in keep for path in (manifest_target(v), weights_target(v))]
        self.repo.publish_targets(add, remove)
        self._record(event)

    def _record(self, event: dict) -> None:
        self.files.append("history.jsonl", (json.dumps({**event, "at": time.time()}) + "\n").encode())

    def _published_json(self, path: str) -> dict | None:
        data = self.repo.listed_bytes(path)
        return None if data is None else json.loads(data)

    def _import_legacy(self) -> None:
        """Import a registry of the pre-TUF layout once (same version numbers), then move it to legacy/.
        That layout only ever existed on local disk."""
        versions = self.root / "versions" if self.root is not None else None
        if versions is None or not versions.is_dir():
            return
        old_state_path = self.root / "rollout.json"
        old_state = json.loads(old_state_path.read_text()) if old_state_path.exists() else {"stable": None, "canary": None, "cohort": []}
        files: dict[str, bytes] = {}
        for folder in sorted(p for p in versions.iterdir() if (p / "manifest.json").exists() and (p / "weights.safetensors").exists()):
            manifest = json.loads((folder / "manifest.json").read_text())["manifest"]
            files[manifest_target(manifest["version"])] = canonical_json(manifest)
            files[weights_target(manifest["version"])] = (folder / "weights.safetensors").read_bytes()
        self.repo.change(lambda: self._publish(old_state, files, {"version": old_state.get("stable"), "event": "imported", "versions": len(files) // 2}))
        for event in old_state.get("history", []):
            self._record(event)
        legacy = self.root / "legacy"
        legacy.mkdir(exist_ok=True)
        versions.rename(legacy / "versions")
        if old_state_path.exists():
            old_state_path.rename(legacy / "rollout.json")
        log.warning("imported %d policy versions of the pre-TUF registry at %s; robots need the root metadata now (docs/security.md)", len(files) // 2, self.root)


def open_registry(
    directory: str | Path,
    online_key: str | Path,
    *,
    release_key: str | Path | None = None,
    root_keys: list[str | Path] | None = None,
    root_threshold: int = 2,
    expiry_s: Mapping[str, float] | None = None,
) -> PolicyRegistry:
    """The registry at ``directory`` (a local directory or ``s3://bucket/prefix``) signing online
    with ``online_key`` (made if missing), and releases with ``release_key`` where given (made if
    missing when the root is made here; else it must be the key the root names for targets).

    A registry without root metadata needs its key ceremony first: with ``root_keys`` (files,
    made if missing) this makes root v1 here, with ``root_threshold`` of them. That is the
    single-machine set-up of the demo and tests; a production fleet runs ``flywheel-registry init``
    where the root keys live and gives the server only the online key."""
    from fleet.registry.tuf_repo import RepositoryNotInitialised, init_root

    files = open_files(directory)
    # a listing, not a HEAD: storage that does not answer, or a bucket that does not exist, fails here, before a key file is made
    has_root = "1.root.json" in files.list("tuf/metadata")
    if not has_root and not root_keys:  # refused before a key file or a folder is made for it
        raise RepositoryNotInitialised(
            f"{files.location}/tuf/metadata has no root metadata: create it with the offline root keys first (`flywheel-registry init`, "
            "docs/security.md), or give this start root key files to make it here (fleet.registry.root_keys)"
        )
    new_root = not has_root
    online = load_signer(online_key, create=True)
    release = None if release_key is None else load_signer(release_key, create=new_root)
    if new_root:
        signers = [load_signer(path, create=True) for path in root_keys]
        try:
            init_root(files.sub("tuf"), signers, root_threshold, online.public_key, release_key=release and release.public_key, expiry_s=expiry_s)
        except WriteConflict:
            pass  # another replica made root v1 at the same moment; PolicyRegistry checks that it names our key
    return PolicyRegistry(files, online, release=release, expiry_s=expiry_s)


def root_metadata(directory: str | Path) -> bytes:
    """The newest root metadata of the registry at ``directory``: what a robot is provisioned with."""
    files = open_files(directory)
    data = files.read("tuf/metadata/root.json")
    if data is None:
        raise RegistryOpenError(f"{files.location}/tuf/metadata/root.json does not exist: the registry has no root metadata yet")
    return data


def check_past_version(past_version: int) -> None:
    """ValueError unless ``past_version`` (a restore's floor: PolicyRegistry.restored) can be a policy version."""
    if isinstance(past_version, bool) or not isinstance(past_version, int) or not 1 <= past_version <= MAX_POLICY_VERSION:
        raise ValueError(f"past version {past_version!r}: the highest policy version a robot ran, an integer from 1 to {MAX_POLICY_VERSION}")


def _when(event: dict) -> str:
    """When a history event was recorded, as UTC text."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(event.get("at", 0)))


def _spec_text(spec: Mapping) -> str:
    return f"robot_model {spec['robot_model']}, obs_dim {spec['obs_dim']}, act_dim {spec['act_dim']}"


def _check_spec(stable: dict, spec: dict) -> None:
    """:class:`PublishRefused` naming the first of robot_model, obs_dim, act_dim where ``spec`` (a release's) differs from
    the stable version's manifest ``stable``: every robot of the fleet would refuse it (``spec``) and keep what it runs."""
    field = next((k for k in SPEC if spec[k] != stable[k]), None)
    if field is not None:
        raise PublishRefused(
            field, f"the release is for {_spec_text(spec)}, the fleet's stable v{stable['version']} for {_spec_text(stable)}: every robot "
            "would refuse it and keep what it runs, while the registry says the fleet runs it. Publish a policy for the fleet's robots; "
            "or, where the whole fleet moves to these robots, publish with spec_change: true",
        )  # fmt: skip


def _largest(fields: Mapping) -> str:
    """The manifest field a publish should shrink or mend: the largest of the publisher's free-form ones."""
    return max(fields, key=lambda k: len(canonical_json(fields[k])), default="policy")
