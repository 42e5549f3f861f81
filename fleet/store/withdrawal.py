"""Withdrawn episodes: rules that keep episodes out of training while the store keeps them (docs/store.md,
"Withdrawing episodes").

No zarr calls here: this module says what a rule is, how it is written in the store's root group attribute
:data:`WITHDRAWALS_ATTR` (a JSON list, committed like any commit), and which catalog entries the rules withdraw,
so the writer, the reader and the CLI agree by construction.

A rule names a robot (every episode it sent with ``since <= upload_time < until``, either bound open: a rule with
no ``until`` also covers what the robot uploads later, until the rule is lifted) or a list of episode ids. The
episodes the loop derived from a withdrawn robot's data go too (:func:`lineage_robot`): a scenario episode (source
``sim``) names the robot it started from in its ``scenario`` tag (``failure:<reason>:<robot>:<episode>:<step>``,
``uncertainty:<robot>:<episode>:<step>``, ``dr:<robot>``), a world-model episode (source ``worldmodel``) carries its
source robot's id. Such an episode is withdrawn when it was stored from the first upload of a withdrawn episode of
that robot until :data:`DERIVED_MARGIN_S` after the last rule naming them was made: its start state, or the body
calibrated from that robot's newest episodes, may come from them; later, the loop no longer reads them (an iteration
running when the rule was made still may, for its length: the margin).
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence

WITHDRAWALS_ATTR = "flywheel_withdrawals"  # root group attribute: list of rules (Withdrawal.to_dict)
DERIVED_SOURCES = ("sim", "worldmodel")
DERIVED_MARGIN_S = 3600.0  # derived episodes stored this long after a rule was made may still come from what it withdrew
EARLIEST_TIME = 946684800.0  # 2000-01-01: a smaller number given as a time is a date written without dashes, not unix seconds


@dataclasses.dataclass(frozen=True)
class Withdrawal:
    """One rule: ``robot_id`` (with optional ``since``/``until`` on upload_time, unix seconds) or ``episode_ids``;
    why (``reason``) and when it was made (``made_at``, unix seconds)."""

    id: str
    reason: str
    made_at: float
    robot_id: str | None = None
    episode_ids: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None

    def __post_init__(self):
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ValueError("a withdrawal needs a reason (--reason): say why, for the audit")
        if (self.robot_id is None) == (not self.episode_ids):
            raise ValueError("a withdrawal names a robot (--robot-id) or episodes (--episode-id), not both and not neither")
        if self.episode_ids and (self.since is not None or self.until is not None):
            raise ValueError("--since/--until select a robot's episodes; episodes named by id are withdrawn whenever they were uploaded")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise ValueError(f"withdrawal {name} must be a finite time (unix seconds), got {value!r}")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError(f"since ({_iso(self.since)}) is not before until ({_iso(self.until)}): nothing could match; swap them")
        object.__setattr__(self, "episode_ids", tuple(self.episode_ids))

    @classmethod
    def new(cls, reason: str, robot_id: str | None = None, episode_ids: Iterable[str] = (), since: float | None = None, until: float | None = None) -> Withdrawal:
        """A rule made now, with a fresh id (``w-`` and 12 hex digits)."""
        return cls(f"w-{uuid.uuid4().hex[:12]}", reason, time.time(), robot_id, tuple(dict.fromkeys(episode_ids)), since, until)

    def covers(self, info) -> bool:
        """Whether this rule names catalog entry ``info`` (an EpisodeInfo) itself (not through lineage)."""
        if self.robot_id is None:
            return info.episode_id in self.episode_ids
        return info.robot_id == self.robot_id and (self.since is None or info.upload_time >= self.since) and (self.until is None or info.upload_time < self.until)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["episode_ids"] = list(self.episode_ids)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> Withdrawal:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "episode_ids" else v) for k, v in data.items() if k in fields})


def rules_of(attrs: Mapping) -> list[Withdrawal]:
    """The rules a root group's attributes hold (none: an empty list)."""
    return [Withdrawal.from_dict(r) for r in attrs.get(WITHDRAWALS_ATTR) or []]


def lineage_robot(info, scenario: dict | None) -> str | None:
    """The robot a derived episode (source sim or worldmodel) was made from: a world-model episode's own robot id, a
    scenario's from its tag (``scenario``: the episode's parsed scenario JSON); None where nothing says."""
    if info.source == "worldmodel":
        return info.robot_id
    tag = (scenario or {}).get("tag") or ""
    parts = tag.split(":")
    if parts[0] == "dr" and len(parts) == 2:
        return parts[1] or None
    if parts[0] == "uncertainty" and len(parts) == 4:
        return parts[1]
    if parts[0] == "failure" and len(parts) == 5:
        return parts[2]
    return None


def withdrawn_ids(catalog: Sequence, rules: Sequence[Withdrawal], lineage) -> frozenset[str]:
    """Ids of the catalog entries ``rules`` withdraw: those a rule covers, and the derived ones made from a covered
    robot's data (module docstring). ``lineage(infos)``: :func:`lineage_robot` of each of ``infos`` (asked only for
    derived episodes stored in a withdrawn robot's span)."""
    if not rules:
        return frozenset()
    by_robot: dict[str, list[Withdrawal]] = {}
    by_id: dict[str, Withdrawal] = {}
    for rule in rules:  # looked up by robot and by id: 10,000 rules once took 13 s a snapshot, each checked against each episode
        if rule.robot_id is not None:
            by_robot.setdefault(rule.robot_id, []).append(rule)
        for episode_id in rule.episode_ids:
            by_id.setdefault(episode_id, rule)
    out, first, made = set(), {}, {}  # robot -> the earliest upload_time of its withdrawn episodes, the latest rule naming them
    for info in catalog:
        named = [rule for rule in by_robot.get(info.robot_id, ()) if rule.covers(info)]
        if info.episode_id in by_id:
            named.append(by_id[info.episode_id])
        if not named:
            continue
        out.add(info.episode_id)
        if info.source == "real":
            first[info.robot_id] = min(first.get(info.robot_id, math.inf), info.upload_time)
            made[info.robot_id] = max(made.get(info.robot_id, -math.inf), *(rule.made_at for rule in named))
    if not first:
        return frozenset(out)
    after = min(first.values())
    derived = [i for i in catalog if i.source in DERIVED_SOURCES and i.episode_id not in out and i.upload_time >= after]
    for info, robot in zip(derived, lineage(derived) if derived else []):
        if robot in first and first[robot] <= info.upload_time < made[robot] + DERIVED_MARGIN_S:
            out.add(info.episode_id)
    return frozenset(out)


def _iso(when: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(timespec="seconds")


def parse_time(text: str) -> float:
    """Unix seconds from ``text``: a number, or an ISO 8601 time (UTC where it names no zone)."""
    import datetime

    try:
        value = float(text)
    except ValueError:
        try:
            when = datetime.datetime.fromisoformat(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a time: give unix seconds (1767225600) or ISO 8601 (2026-01-01T00:00:00Z)") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        return when.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite time")
    if value < EARLIEST_TIME:  # --since 20261128: a date without dashes, read as unix seconds of 1970
        raise ValueError(f"{text!r} as unix seconds is {_iso(value)}, before 2000: write a date as ISO 8601 (2026-11-28 or 2026-11-28T09:00:00Z)")
    return value
