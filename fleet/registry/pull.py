"""Robot side: update policies with TUF's client workflow, check, and swap between episodes.

Runs on the robot: numpy, httpx, python-tuf and cryptography, no torch, Ray or MuJoCo (the light
package flywheel-robot-agent ships it; tests/test_robot_imports.py pulls a release without them).
At each episode start the agent asks :meth:`SignedPolicySource.current` for the policy to run. A
started source (:meth:`SignedPolicySource.start`, what robots use) polls on its own thread every
``poll_interval_s``, so ``current()`` never waits for the network and a slow or hostile registry never
delays an episode or a control callback; an unstarted one polls inside ``current()`` at most every
``poll_interval_s`` (tests, scripts). Each poll runs one TUF update against the registry (python-tuf's
``ngclient.Updater``): the root chain from the root this robot was provisioned with (key
rotations), then timestamp, snapshot and targets, each checked for signatures, thresholds, versions
and expiry. The robot then reads the rollout target for its version, that version's manifest
(checked by :class:`PolicyTrust`: no rollback, no replay, the robot's spec) and weights (length and
sha256 from the signed targets), loads them with the numpy runtime (behind this robot's signed
sensor correction, if the manifest carries one: ``sim/sensors.py``), runs a health check, and only
then swaps.

Any failure keeps the last good policy and is logged and counted: ``refusals`` by reason (an
attack or a bad release), ``errors`` (network or server trouble); the same failure as the poll before is logged again
only REPEAT_LOG_S after its last line. Expired metadata means the
registry is frozen (an attacker replaying old metadata, or a dead signer): the robot keeps its
policy, counts ``freeze`` and reports ``frozen_since`` until a fresh timestamp arrives. A registry
that is blocked rather than replayed (503s, dropped connections, garbage) is frozen too once the
metadata the robot trusts has expired: any failed poll past that sets ``frozen_since`` (counted as
the error it was, not as a ``freeze`` refusal). A failed
health check rolls back to the previous policy and blocks that version on this robot.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import Updater

from fleet.agent.policy import Policy
from fleet.registry.fetcher import TokenFetcher
from fleet.registry.manifest import MAX_JSON_BYTES, ROLLOUT_TARGET, manifest_target, version_for, weights_target
from fleet.registry.trust import MIN_HEALTHY_STEPS, PolicyRejected, PolicyTrust
from policies.runtime import PolicyLoadError, load_policy_bytes
from sim.body_context import BodyContextError, robot_context
from sim.episode import EpisodeValidationError, loads_bounded
from sim.policy_fn import with_context
from sim.sensor_filter import SensorFilterError, filtered_act, robot_filter
from sim.sensors import SensorCorrectionError, corrected_act, robot_offset

log = logging.getLogger(__name__)
MAX_WEIGHTS_BYTES = 256 << 20  # the largest weights a robot downloads (the server's publish limit): a larger target is refused unread
MIN_BACKGROUND_POLL_S = 1.0  # a started source's shortest interval between polls (poll_interval_s 0 would spin)
MIN_FREE_BYTES = 64 << 20  # disk room a weights download leaves free on the robot, for what it records (its spool)


# TUF's refusals, by the robot's reason names (an expired role is a frozen registry)
REPEAT_LOG_S = 3600.0  # the same failed poll as the one before is logged again at most this often (counted at every poll)
CLOCK_SKEW_NOTE_S = 300.0  # a clock further ahead of the registry server's than this is named in an expiry refusal
_TUF_REASONS = (
    (tuf_errors.ExpiredMetadataError, "freeze"),
    (tuf_errors.BadVersionNumberError, "rollback"),
    (tuf_errors.UnsignedMetadataError, "signature"),
    (tuf_errors.LengthOrHashMismatchError, "hash"),
    (tuf_errors.RepositoryError, "malformed"),
)


class SignedPolicySource:
    """``root``: the registry's root metadata this robot was provisioned with (bytes), needed until
    the first update has stored its own copy in ``<trust.state_dir>/tuf``. Given where a copy is stored, it replaces that
    copy only where its version is higher (re-provisioning a robot whose root chain the registry no longer serves; the
    version floor is kept), valid and signed by its own root threshold; ``root_origin`` names where it came from, in the log.

    ``server_url``: the flywheel server, or any HTTP server, bucket or CDN holding the registry's
    ``tuf/`` directory as ``<server_url>/v1/tuf/`` (static hosting, docs/security.md).
    ``token``: the robot's bearer token, sent with every request; None sends none (a static host:
    never hand the token that uploads this robot's episodes to a third party; :func:`registry_token`
    decides which).
    timestamp.json is polled with If-None-Match, and an interrupted target download resumes with
    a range request (fleet/registry/fetcher.py); TUF verifies both as before.
    ``min_free_bytes``: disk room a weights download must leave free (for the episodes the robot
    records): weights are downloaded only while the disk holds twice their listed length and this
    much more; else the poll waits for room (``pull_no_room``). A download that fails writing (a full
    disk) leaves nothing half-written behind.
    ``min_healthy_steps``: a new release's first episode here (:meth:`report_episode`) ending terminated within
    this many steps fails its health check: the previous policy is restored and the release blocked on this robot
    (``MIN_HEALTHY_STEPS`` by default; 0 turns the check off, logged as a warning)."""

    def __init__(
        self,
        server_url: str,
        token: str | None,
        robot_id: str,
        trust: PolicyTrust,
        fallback: Policy,
        *,
        root: bytes | None = None,
        poll_interval_s: float = 0.0,
        request_timeout_s: float = 10.0,
        probe_obs: np.ndarray | None = None,
        min_healthy_steps: int = MIN_HEALTHY_STEPS,
        max_weights_bytes: int = MAX_WEIGHTS_BYTES,
        min_free_bytes: int = MIN_FREE_BYTES,
        root_origin: str = "the root metadata given (root=)",
    ):
        self.url, self.robot_id, self.trust, self.fallback = server_url.rstrip("/"), robot_id, trust, fallback
        self.poll_interval_s, self.max_weights_bytes, self.min_free_bytes = poll_interval_s, max_weights_bytes, min_free_bytes
        self._client = httpx.Client(headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=request_timeout_s)
        self.metadata_dir, self.targets_dir = trust.state_dir / "tuf" / "metadata", trust.state_dir / "tuf" / "targets"
        self.metadata_url, self.targets_url = f"{self.url}/v1/tuf/metadata/", f"{self.url}/v1/tuf/targets/"
        self._fetcher = TokenFetcher(  # polls timestamp.json with If-None-Match; resumes targets beside TUF's download cache
            self._client, revalidate={f"{self.metadata_url}timestamp.json"}, partial_dir=self.targets_dir, resume_prefix=self.targets_url,
            deadline_s=3 * request_timeout_s,  # a trickling registry holds a poll (between episodes) for a bounded time
        )  # fmt: skip
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        if not (self.metadata_dir / "root.json").exists():
            if root is None:
                raise ValueError(f"{self.metadata_dir} has no root metadata: provision this robot with the registry's root.json")
            try:
                Updater(str(self.metadata_dir), self.metadata_url, bootstrap=root)  # stores it as the trust anchor
            except tuf_errors.RepositoryError as exc:
                raise ValueError(f"the root metadata this robot was given is not valid TUF root metadata ({exc}): use the registry's tuf/metadata/root.json") from None
        elif root is not None:
            self._reprovision(root, root_origin)
        self._last_poll = -np.inf
        self.probe_obs = probe_obs if probe_obs is not None else np.zeros((4, trust.spec["obs_dim"]), np.float32)
        self.min_healthy_steps = _checked_min_healthy_steps(min_healthy_steps, robot_id)
        self._probation: tuple | None = None  # (previous manifest, weights, policy, running version) while a new policy runs its first episode
        self.swaps = 0
        self.errors = 0  # network/server trouble (not refusals): the robot just keeps its policy
        self.no_room = 0  # polls that left a release's weights undownloaded for want of disk room (what the robot records comes first)
        self.frozen_since: float | None = None  # wall time the registry's metadata was first seen expired (None: fresh)
        self.advice: str | None = None  # what to do about the last poll's refusal where the robot cannot follow the root chain (None: nothing)
        self._repeat: tuple | None = None  # the last failed poll's (cause, when it was last logged, polls since not logged)
        self.root_version = self._trusted_root_version()
        self._swap = threading.Lock()  # the install, health check and rollback, against report_episode on the robot's thread
        self._stopping = threading.Event()
        self._poller: threading.Thread | None = None
        trusted = self._load_trusted()
        self._policy = trusted or fallback
        self._running = self.trust.version if trusted else 0  # the trusted version the robot runs; 0: the fallback

    def _reprovision(self, root: bytes, where: str) -> None:
        """A robot that already trusts a root (``<state_dir>/tuf/metadata/root.json``), given one at its start (``root``, read
        from ``where``): a valid root of a HIGHER version replaces the stored trust anchor (re-provisioning: the way back for a
        robot whose root chain the registry no longer serves, docs/security.md), the version floor and the policy it runs kept;
        the same version with other content is warned about and the stored one kept; a lower one is ignored (a robot
        provisioned long ago that followed the chain since). Never a lower version: that would roll its trust back."""
        stored_path = self.metadata_dir / "root.json"
        try:
            given = Metadata.from_bytes(root)
            if not isinstance(given.signed, Root):
                raise tuf_errors.RepositoryError(f"it is {given.signed.type} metadata, not root metadata")
            given.signed.verify_delegate(Root.type, given.signed_bytes, given.signatures)  # self-signed to its threshold, as TUF's bootstrap checks
        except (tuf_errors.RepositoryError, ValueError, TypeError, KeyError) as exc:
            log.warning("robot %s: %s is not valid TUF root metadata (%s): ignored; this robot keeps trusting the root in %s (use the "
                        "registry's tuf/metadata/root.json to re-provision it)", self.robot_id, where, exc, stored_path)  # fmt: skip
            return
        try:
            stored: Metadata | None = Metadata.from_bytes(stored_path.read_bytes())
        except (OSError, tuf_errors.RepositoryError):
            stored = None  # unreadable: TUF could not start from it either
        version = stored.signed.version if stored is not None else 0
        if given.signed.version < version:
            return  # provisioned long ago: the chain since is followed at every poll
        if given.signed.version == version:
            if given != stored:
                log.warning("robot %s: %s is root v%d, as is the root this robot trusts (%s), but they differ: the stored one is kept "
                            "(a different root of the same version is never taken; check that %s is the registry's current tuf/metadata/root.json)",
                            self.robot_id, where, version, stored_path, where)  # fmt: skip
            return
        Updater(str(self.metadata_dir), self.metadata_url, bootstrap=root)  # stores it as the trust anchor (root_history/N.root.json)
        log.warning("robot %s: re-provisioned: trusting root v%d from %s in place of %s", self.robot_id, given.signed.version, where,
                    f"v{version}" if stored is not None else f"an unreadable {stored_path}")  # fmt: skip

    def start(self) -> SignedPolicySource:
        """Poll on a background thread from now on (every ``poll_interval_s``, at least
        ``MIN_BACKGROUND_POLL_S``); :meth:`current` then only returns the policy installed last."""
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll_until_closed, name=f"policy-poll-{self.robot_id}", daemon=True)
            self._poller.start()
        return self

    def _poll_until_closed(self) -> None:
        while not self._stopping.is_set():
            self.poll()  # never raises: every failure keeps the policy, counted and logged
            self._stopping.wait(max(self.poll_interval_s, MIN_BACKGROUND_POLL_S))

    @property
    def refusals(self) -> dict[str, int]:
        return dict(self.trust.refusals)

    def status(self) -> dict:
        """The policy side of the robot's status: the version it runs (``policy_version``; 0: the fallback) and the one
        it trusts (``trusted_version``, its floor: they differ while the trusted weights are to be fetched again), swaps,
        refusals by reason, network trouble, since when its registry looks frozen (None: its metadata is fresh), polls
        answered 304, bytes a resumed download did not fetch again, polls that left a release undownloaded for want of disk
        room (``pull_no_room``), how far this robot's clock is ahead of the registry server's (``clock_ahead_s``, from
        its last answer's Date header; negative: behind; None before one), the version of the registry root it trusts
        (``trusted_root_version``), and what to do where its last poll was refused because it may not follow the registry's
        root chain (``pull_advice``: re-provision it, or renew the registry's root; None otherwise)."""
        return {
            "policy_version": self._running, "trusted_version": self.trust.version, "swaps": self.swaps, "refusals": self.refusals,
            "pull_errors": self.errors, "registry_frozen_since": self.frozen_since,
            "pull_not_modified": self._fetcher.not_modified, "pull_resumed_bytes": self._fetcher.resumed_bytes,
            "pull_no_room": self.no_room, "clock_ahead_s": None if self._fetcher.clock_ahead_s is None else round(self._fetcher.clock_ahead_s),
            "trusted_root_version": self.root_version, "pull_advice": self.advice,
        }  # fmt: skip

    def current(self) -> Policy:
        if self._poller is None and time.monotonic() - self._last_poll >= self.poll_interval_s:
            self._last_poll = time.monotonic()
            self.poll()
        return self._policy

    def poll(self) -> bool:
        """One TUF update; True if a new policy was swapped in."""
        refreshed = False
        try:
            updater = self._refresh()
            self.frozen_since, refreshed, self.advice = None, True, None
            swapped = self._consider(updater)
            self._repeat_ended()
            return swapped
        except PolicyRejected as exc:
            self._warn(("policy", str(exc)), "robot %s refused a policy: %s; keeping %s", self.robot_id, exc, self._policy.version)
        except tuf_errors.RepositoryError as exc:
            reason = next(name for kind, name in _TUF_REASONS if isinstance(exc, kind))
            self.trust.refusals[reason] += 1
            if reason == "freeze" and self.frozen_since is None:
                self.frozen_since = time.time()
            clock = self._clock_note() if reason == "freeze" else ""
            self.advice = self._root_advice(reason, exc) if not clock else None
            self._warn((reason, str(exc)), "robot %s: registry metadata refused (%s: %s)%s; keeping %s%s", self.robot_id, reason, exc, clock,
                       self._policy.version, "" if self.advice is None else f"; {self.advice}")  # fmt: skip
        except tuf_errors.DownloadLengthMismatchError as exc:
            self.trust.refusals["size"] += 1
            self._warn(("size", str(exc)), "robot %s: registry sent more than TUF allows (%s); keeping %s", self.robot_id, exc, self._policy.version)
        except (tuf_errors.DownloadError, httpx.HTTPError, OSError, ValueError) as exc:
            self.errors += 1
            self._warn((exc.__class__.__name__, str(exc)), "policy update failed (%s: %s)%s; keeping %s", exc.__class__.__name__, exc,
                       self._no_token_note(exc), self._policy.version)  # fmt: skip
        except Exception:  # whatever a release holds, the robot keeps running what it trusts and says why
            self.errors += 1
            log.exception("robot %s: policy update failed unexpectedly; keeping %s", self.robot_id, self._policy.version)
        finally:
            self.root_version = self._trusted_root_version()  # (a refresh may have walked the chain before it was refused)
        if not refreshed:  # after a refresh the metadata the robot trusts is fresh: nothing to read from disk
            self._notice_expired_metadata()
        return False

    def _warn(self, cause: tuple, fmt: str, *args) -> None:
        """A failed poll's warning. The same ``cause`` as the failed poll before, within REPEAT_LOG_S of its last line, is
        counted only (refusals, pull_errors), not logged: a robot refused for good (a root it cannot follow, a clock far
        ahead) logged the same line at every poll, ~8,600 a day at 10 s. It keeps polling at its interval (a fix on the
        registry is taken at the next poll); the line an hour later says how many polls it stood for."""
        now = time.monotonic()
        same = self._repeat is not None and self._repeat[0] == cause
        if same and now - self._repeat[1] < REPEAT_LOG_S:
            self._repeat = (cause, self._repeat[1], self._repeat[2] + 1)
            return
        quiet = self._repeat[2] if same else 0
        self._repeat = (cause, now, 0)
        log.warning(fmt + "%s", *args, f" (the same at {quiet} polls since it was last logged)" if quiet else "")

    def _repeat_ended(self) -> None:
        """A poll that went through after failed ones: said where the last failure repeated unlogged."""
        if self._repeat is not None and self._repeat[2]:
            log.info("robot %s: the pull goes through again, after %d more polls failed as last logged", self.robot_id, self._repeat[2])
        self._repeat = None

    def _notice_expired_metadata(self) -> None:
        """After a failed poll: a registry whose metadata the robot trusts has expired is frozen, however the refresh failed.
        Only TUF's expiry refusal once set ``frozen_since``, which a replayed timestamp gets; an attacker (or an outage)
        that blocks the registry instead (503s, dropped connections, garbage) left it unset, and an operator alerting on it
        saw nothing but ``pull_errors``, which ordinary network trouble raises too."""
        if self.frozen_since is not None:
            return
        expired = expired_role(self.metadata_dir, datetime.now(timezone.utc))
        if expired is None:
            return
        self.frozen_since = time.time()
        role, expires = expired
        chain = ", or this robot cannot follow the registry's root chain (pull_advice in its status)" if self.advice else ""
        log.warning("robot %s: the registry's %s metadata this robot trusts expired at %s and no fresh metadata could be fetched: "
                    "the registry looks frozen (blocked, or its signer down%s)%s; keeping %s", self.robot_id, role, expires.isoformat(), chain,
                    self._clock_note(), self._policy.version)  # fmt: skip

    def _trusted_root_version(self) -> int | None:
        """The version of the registry root this robot trusts (``<state_dir>/tuf/metadata/root.json``); None if unreadable."""
        try:
            return int(json.loads((self.metadata_dir / "root.json").read_bytes())["signed"]["version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _root_advice(self, reason: str, exc: Exception) -> str | None:
        """What to do about a TUF refusal that a robot unable to follow the registry's root chain gets, None for any other.
        The refresh walks the root chain first, up to the first root version the registry does not serve; a timestamp,
        snapshot or next root then not signed by the keys of the root this robot trusts (``signature``), or that root
        itself expired (``freeze`` of the final root), is what a robot gets whose registry moved on without it (its newer
        roots removed, restored from an older backup, re-made) as well as what forged metadata gets: the log said only
        "signature" or "freeze" and "registry looks frozen", and never what to do."""
        try:
            root = Metadata.from_bytes((self.metadata_dir / "root.json").read_bytes()).signed
        except (OSError, tuf_errors.RepositoryError):
            return None
        role = str(exc).split(" ", 1)[0]
        if reason == "signature" and role in (Root.type, "timestamp", "snapshot"):
            why = f"its metadata is not signed by the keys of root v{root.version}, the root this robot trusts, and it serves no root v{root.version + 1} signed by them"
        elif reason == "freeze" and root.is_expired(datetime.now(timezone.utc)):
            why = f"root v{root.version}, the newest root this robot could reach, expired at {root.expires.isoformat()}"
        else:
            return None
        reprovision = (f"if the registry's current root is newer and the chain to it is broken (root files removed, a registry restored "
                       f"from a backup or re-made), re-provision this robot with the registry's current tuf/metadata/root.json, checked "
                       f"out of band (policy.root: a higher version replaces this robot's root v{root.version} at its next start; at the same "
                       f"or a lower version, delete {self.metadata_dir.parent} first: the version floor is kept; docs/security.md, Re-provisioning)")  # fmt: skip
        if reason == "freeze":
            return (f"{why}: {reprovision}; if the registry's own root expired, its operator must renew it with the root keys "
                    "(flywheel-registry rotate --dir REG --root-key .. --root-key .. --threshold N, docs/security.md, Key ceremonies): "
                    "robots follow at their next poll")  # fmt: skip
        return f"{why}: {reprovision}; otherwise the registry's metadata may be forged (docs/security.md)"

    def _no_token_note(self, exc: Exception) -> str:
        """What to add where a registry this robot sends no token to answered 401 (what a flywheel server answers a call
        without one: its registry routes take the robot token, which goes only to the server the robot uploads to,
        registry_token). Not a 403: a bucket answers that for a file it does not have (a mistyped path)."""
        if "Authorization" in self._client.headers or getattr(exc, "status_code", None) != 401:
            return ""
        return (f": the registry at {self.url} wants a token, and this robot sends its token only to the fleet server it uploads to; "
                "point policy.server_url at that server (one server and registry per robot model: docs/robots.md), or serve the "
                "registry as static files, which need none")  # fmt: skip

    def _clock_note(self) -> str:
        """What to add to an expiry refusal when this robot's clock is ahead of the server's by more than CLOCK_SKEW_NOTE_S:
        a robot whose clock runs a day ahead reads every fresh timestamp.json as expired, and the refusal then read as a
        frozen registry (an attack, or a stopped signer) while the fix is the robot's clock. (A clock behind makes nothing
        look expired: not named.)"""
        ahead = self._fetcher.clock_ahead_s
        if ahead is None or ahead <= CLOCK_SKEW_NOTE_S:
            return ""
        return (f": this robot's clock is {ahead:.0f} s ahead of the registry server's (its Date header), and TUF judges expiry by "
                "this robot's clock; set the robot's clock (NTP) if the server's is right")  # fmt: skip

    def _refresh(self) -> Updater:
        """TUF's refresh (root chain, timestamp, snapshot, targets); the fetcher keeps the timestamp.json it read for
        its next conditional poll only if the refresh ran through."""
        updater = Updater(str(self.metadata_dir), self.metadata_url, str(self.targets_dir), self.targets_url, self._fetcher, bootstrap=None)
        try:
            updater.refresh()
        except BaseException:
            self._fetcher.settle(accepted=False)
            raise
        self._fetcher.settle(accepted=True)
        return updater

    def _consider(self, updater: Updater) -> bool:
        rollout = self._target(updater, ROLLOUT_TARGET, MAX_JSON_BYTES)
        if rollout is None:
            return False  # nothing released yet
        try:
            version = version_for(self._json(rollout, "the rollout"), self.robot_id)
        except ValueError as exc:
            self.trust.refusals["malformed"] += 1
            raise PolicyRejected("malformed", str(exc)) from None
        if version is None:
            return False  # nothing released for this robot yet
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            self.trust.refusals["malformed"] += 1
            raise PolicyRejected("malformed", f"the rollout names version {version!r}, not a positive integer")
        manifest_bytes = self._target(updater, manifest_target(version), MAX_JSON_BYTES)
        if manifest_bytes is None:
            self.trust.refusals["malformed"] += 1
            raise PolicyRejected("malformed", f"the rollout names v{version}, whose manifest the registry does not list")
        manifest = self.trust.check(self._json(manifest_bytes, f"v{version}'s manifest"), running=self._running == self.trust.version)
        if manifest is None:
            return False  # already running it
        again = manifest["version"] == self.trust.version  # the trusted version, whose weights on disk were unusable: fetched again
        info = updater.get_targetinfo(weights_target(version))
        if info is None or (info.length, info.hashes.get("sha256")) != (manifest["weights"]["size"], manifest["weights"]["sha256"]):
            self.trust.refusals["hash"] += 1
            raise PolicyRejected("hash", f"v{version}'s manifest names other weights than the registry lists")
        if info.length > self.max_weights_bytes:  # checked before a byte is fetched: a signed 50 GiB target cannot fill the disk
            self.trust.refusals["size"] += 1
            raise PolicyRejected("size", f"v{version}'s weights are listed at {info.length} bytes, more than this robot's max_weights_bytes={self.max_weights_bytes}")
        if updater.find_cached_target(info) is None:
            partial = self._partial_of(info)
            self._drop_other_partials(partial)
            if not self._room_for(info.length, version, partial):
                return False
        weights = self._download(updater, info, f"v{version}'s weights")
        policy = self._runtime(manifest, weights)  # raises PolicyRejected("malformed")
        with self._swap:
            if again:  # a failed probe keeps the version as the floor (blocked, the fallback running), never drops it
                kept = weights
            else:  # what a failed health check returns to: the trusted pair, if its weights are intact
                try:
                    kept = self.trust.trusted_weights() if self.trust.manifest else None
                except (OSError, PolicyRejected):
                    kept = None
            # an install again keeps its own manifest as the floor's record (trusted.json may be what was unreadable)
            previous = ((manifest if again else self.trust.manifest) if kept is not None else None, kept, self._policy, self._running)
            try:
                self.trust.accept(manifest, weights)
            finally:  # TUF's download cache: the trusted copy is in state_dir (or could not be written: a full disk keeps neither)
                shutil.rmtree(self.targets_dir, ignore_errors=True)
            if not self._healthy(policy):
                self._roll_back(previous, manifest["version"], "gave bad actions on probe observations")
                return False
            self._policy, self._running = policy, manifest["version"]
            self._probation = None if again else previous  # the version passed its first episode here before
            self.swaps += 1
        log.info("robot %s %s policy v%s", self.robot_id, "installed its trusted" if again else "swapped to", manifest["version"])
        return True

    def _json(self, data: bytes, what: str):
        """A signed JSON target read by the rule the server reads what it is sent by (no NaN, no number past a double's
        range, each key once, bounded nesting): a release no other reader would read the same is refused."""
        try:
            value = loads_bounded(data, what)
        except EpisodeValidationError as exc:
            self.trust.refusals["malformed"] += 1
            raise PolicyRejected("malformed", f"{what} is not JSON: {exc.reason}") from None
        if not isinstance(value, dict):
            self.trust.refusals["malformed"] += 1
            raise PolicyRejected("malformed", f"{what} is not a JSON object")
        return value

    def _target(self, updater: Updater, path: str, max_bytes: int) -> bytes | None:
        """A small target's verified bytes (None if the registry does not list it)."""
        info = updater.get_targetinfo(path)
        if info is None:
            return None
        if info.length > max_bytes:
            self.trust.refusals["size"] += 1
            raise PolicyRejected("size", f"{path} is listed at {info.length} bytes, more than the {max_bytes} a robot reads")
        return self._download(updater, info, path)

    def _download(self, updater: Updater, info, what: str) -> bytes:
        """A listed target's verified bytes. One that fails its signed length or sha256 is refused naming ``what`` (the
        release's weights and version) and the target's path: TUF's error said only "metadata refused", and an operator
        could not tell from a robot's log which release was tampered with."""
        try:
            path = updater.find_cached_target(info) or updater.download_target(info)  # length and sha256 checked by TUF
            return Path(path).read_bytes()
        except tuf_errors.LengthOrHashMismatchError as exc:
            self.trust.refusals["hash"] += 1
            raise PolicyRejected("hash", f"{what} ({info.path}) failed verification against the signed targets metadata ({exc}): "
                                         "refused; the registry's copy was changed or damaged after it was signed") from None  # fmt: skip
        except OSError:  # the robot's disk full or failing: nothing half-written (partial, TUF's copy) keeps its space
            shutil.rmtree(self.targets_dir, ignore_errors=True)
            raise

    def _partial_of(self, info) -> Path:
        """The partial file of target ``info``'s download: the fetcher's, for the URL python-tuf asks for (the registry
        makes consistent snapshots: the file name prefixed with its first listed hash; under another layout no partial
        is this one, and a cut download starts over, never resumes wrongly)."""
        directory, slash, name = info.path.rpartition("/")
        return self._fetcher.partial_path(f"{self.targets_url}{directory}{slash}{next(iter(info.hashes.values()))}.{name}")

    def _drop_other_partials(self, keep: Path) -> None:
        """Delete every partial download but ``keep`` (and its ETag) before a weights download: a cut download of each
        release kept its own partial file until a release installed, so they piled up on a flaky link while releases came."""
        if not self.targets_dir.is_dir():
            return
        dropped = 0
        for path in [*self.targets_dir.glob("*.partial"), *self.targets_dir.glob("*.partial.etag")]:
            if path not in (keep, keep.with_name(keep.name + ".etag")):
                dropped += path.stat().st_size
                path.unlink(missing_ok=True)
        if dropped:
            log.info("robot %s: dropped %d bytes of other releases' cut downloads", self.robot_id, dropped)

    def _room_for(self, length: int, version: int, partial: Path) -> bool:
        """Whether the disk holds a download of ``length`` bytes (the partial file and TUF's copy of it: twice that)
        and still ``min_free_bytes``, the room left to what the robot records; counted and logged if not. ``partial``:
        this download's partial file, whose bytes are there already (any other one's once counted as free room too)."""
        free = shutil.disk_usage(self.trust.state_dir).free
        held = partial.stat().st_size if partial.exists() else 0  # a cut download's, resumed
        if free + held >= 2 * length + self.min_free_bytes:
            return True
        self.no_room += 1
        log.warning("robot %s: v%s's weights (%d bytes) wait for disk room: %d bytes free, %d needed (twice their size and min_free_bytes=%d, "
                    "kept for the episodes); keeping %s", self.robot_id, version, length, free, 2 * length + self.min_free_bytes,
                    self.min_free_bytes, self._policy.version)  # fmt: skip
        return False

    def report_episode(self, episode) -> None:
        """After each episode: the first one on a newly swapped policy is its health check.

        An episode that terminated within ``min_healthy_steps`` steps rolls the robot back to
        its previous policy and blocks the new version here.
        """
        with self._swap:
            if self._probation is None or episode.metadata["policy_version"] != self._policy.version:
                return
            previous, self._probation = self._probation, None
            if bool(episode.terminated[-1]) and episode.num_steps < self.min_healthy_steps:
                self._roll_back(previous, int(self._policy.version), f"first episode terminated after {episode.num_steps} steps")

    def _roll_back(self, previous: tuple, failed_version: int, why: str) -> None:
        manifest, weights, policy, running = previous
        self.trust.restore(manifest, weights, failed_version=failed_version)
        self._policy, self._running = policy, running
        log.warning("robot %s: v%s failed its health check (%s); back on %s", self.robot_id, failed_version, why, policy.version)

    def _runtime(self, manifest: dict, weights: bytes) -> Policy:
        spec = self.trust.spec
        try:
            runtime = load_policy_bytes(manifest["policy"], weights, robot_model=spec["robot_model"], obs_dim=spec["obs_dim"], act_dim=spec["act_dim"])
            offset = robot_offset(manifest.get("sensor_offsets", {}), self.robot_id, spec["obs_dim"])
            sensor_filter = robot_filter(manifest.get("sensor_filters", {}), self.robot_id, spec["obs_dim"], spec["act_dim"])
            act = runtime.act
            if runtime.context_dim:  # a body-conditioned policy: this robot's calibrated body, delivered with it
                act = with_context(runtime, robot_context(manifest.get("body_contexts", {}), self.robot_id, runtime.context_dim))
        except (PolicyLoadError, SensorCorrectionError, BodyContextError, SensorFilterError) as exc:
            self.trust.refusals["malformed"] += 1
            raise PolicyRejected("malformed", f"policy does not load: {exc}") from None
        if sensor_filter is None:
            return Policy(str(manifest["version"]), corrected_act(act, offset))
        episode = filtered_act(act, sensor_filter)  # offset out first, then the filter, then the policy
        return Policy(str(manifest["version"]), corrected_act(act, offset), episode=lambda: corrected_act(episode(), offset))

    def _healthy(self, policy: Policy) -> bool:
        """The policy gives finite actions in [-1, 1] of the right shape on probe observations: all at once, and, for a
        policy that remembers within an episode (a sensor filter), one by one as an episode runs it, after a first
        reading and a NaN one (a sensor dropout: a filter that took it into its state answered NaN for the rest of the episode)."""
        try:
            checked = [np.asarray(policy.act(self.probe_obs))]
            if policy.episode is not None:
                act = policy.for_episode()
                act(self.probe_obs[:1])
                act(np.full(self.probe_obs[:1].shape, np.nan, np.float32))  # its answer is not checked (a network answers NaN with NaN): what it leaves is
                checked.append(np.concatenate([np.asarray(act(row[None])) for row in self.probe_obs]))
        except Exception as exc:  # any crash of a freshly loaded policy is a failed health check
            log.warning("health check raised %s", exc)
            return False
        shape = (len(self.probe_obs), self.trust.spec["act_dim"])
        return all(a.shape == shape and bool(np.isfinite(a).all()) and bool(np.abs(a).max() <= 1.0) for a in checked)

    def _load_trusted(self) -> Policy | None:
        """After a robot restart: the policy it trusted before, if its files are intact and it passes the health check."""
        if self.trust.manifest is None or self.trust.version in self.trust.blocked:
            return None
        try:
            policy = self._runtime(self.trust.manifest, self.trust.trusted_weights())
        except (PolicyRejected, OSError) as exc:
            log.warning("trusted policy on disk is unusable (%s); using the fallback", exc)
            return None
        return policy if self._healthy(policy) else None

    def close(self, timeout: float = 5.0) -> None:
        """Stop polling (waiting up to ``timeout`` s for a poll in flight) and close the connection."""
        self._stopping.set()
        if self._poller is not None:
            self._poller.join(timeout)
        self._client.close()


def expired_role(metadata_dir: Path, now: datetime) -> tuple[str, datetime] | None:
    """The first of the top-level roles TUF keeps in ``metadata_dir`` (the metadata this robot trusts) whose expiry is
    before ``now``, with that expiry; None if none has expired (a role not there yet, or unreadable, is not counted: TUF
    refuses it at the next refresh anyway)."""
    for role in ("timestamp", "snapshot", "targets", "root"):
        try:
            expires = Metadata.from_bytes((metadata_dir / f"{role}.json").read_bytes()).signed.expires
        except (OSError, tuf_errors.RepositoryError):
            continue
        if expires <= now:
            return role, expires
    return None


def _checked_min_healthy_steps(steps: int, robot_id: str) -> int:
    """``min_healthy_steps`` as given; negative refused, 0 said out loud: the first-episode check is then off, and a release
    that topples the robot runs until an operator rolls it back (flywheel-robot once ran so, by default, unnoticed)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"min_healthy_steps must be an integer >= 0 (0: no first-episode health check), got {steps!r}")
    if steps == 0:
        log.warning("robot %s: min_healthy_steps=0: a new release's first episode is no health check (a release that makes the robot "
                    "fall at once is not rolled back here); set it (policy.min_healthy_steps, default %d) to turn the check on", robot_id, MIN_HEALTHY_STEPS)  # fmt: skip
    return steps


def registry_token(registry_url: str, server_url: str, token: str | None) -> str | None:
    """The bearer token a robot sends to the registry at ``registry_url``: its ``token`` where the registry is its fleet
    server (the same base as ``server_url``, where it uploads: scheme, host, port and path, a trailing slash aside), else
    None. A static host, bucket or CDN never gets it, nor another path on the server's host (a CDN may route /v1/ to the
    server and /registry/ to a bucket): the token also uploads this robot's episodes (docs/security.md, What needs auth).
    A URL whose port is no port (``:99999``) is never the server."""
    base = _base(registry_url)
    return token if base is not None and base == _base(server_url) else None


def _base(url: str) -> tuple[str, str, int | None, str] | None:
    """``url`` normalised (scheme, host, port, path without trailing slash); None where its port is not one."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # out of range or not a number
        return None
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme), parts.path.rstrip("/")


def signed_policy_source(
    root: str, server_url: str, token: str | None, robot_id: str, robot_model: str, state_dir: str, poll_interval_s: float,
    min_free_bytes: int = MIN_FREE_BYTES, *, fleet_url: str | None = None, min_healthy_steps: int = MIN_HEALTHY_STEPS,
) -> SignedPolicySource:  # fmt: skip
    """A robot's policy source trusting the registry root metadata at ``root`` (falls back to a zero policy), pulling
    from ``server_url``; ``fleet_url``: the fleet server the robot uploads to, where that is another URL (a static
    registry): ``token`` goes to ``server_url`` only where it is that server (:func:`registry_token`).
    ``min_healthy_steps``: the first-episode health check's (:class:`SignedPolicySource`).

    The spec comes from the MuJoCo task of ``robot_model`` (the flywheel-robot app's simulated robots); a
    robot without MuJoCo builds :class:`SignedPolicySource` with its own ``PolicyTrust`` (examples/ros2/)."""
    from fleet.agent.policy import builtin_policy
    from sim.robots import get_task

    task = get_task(robot_model)
    trust = PolicyTrust(robot_model=robot_model, obs_dim=task.obs_dim, act_dim=task.act_dim, state_dir=state_dir)
    fallback = builtin_policy("zero", task.act_dim).current()
    if not Path(root).is_file():
        raise FileNotFoundError(
            f"policy.root {root} {'is a folder' if Path(root).is_dir() else 'does not exist'}: give the registry's root metadata "
            "(<registry>/tuf/metadata/root.json, copied from where the registry was made), or policy.root=null to pull no policy"
        )
    token = registry_token(server_url, fleet_url or server_url, token)
    return SignedPolicySource(
        server_url, token, robot_id, trust, fallback, root=Path(root).read_bytes(), poll_interval_s=poll_interval_s, min_free_bytes=min_free_bytes,
        min_healthy_steps=min_healthy_steps, root_origin=f"policy.root {root}",
    )
