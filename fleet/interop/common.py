"""What every format shares: choosing episodes from a snapshot (pinned while exported), array layouts,
provenance, deterministic ids for imported recordings, and delivery to a store or a server."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sim.durable import fsync_dir
from sim.episode import REQUIRED_ARRAYS, Episode, EpisodeValidationError, encode_safetensors

INTEROP_VERSION = "1"  # version of the flywheel provenance written into every exported format
# Namespace of the ids given to imported recordings that carry no flywheel episode_id.
IMPORT_NAMESPACE = uuid.UUID("6c1f1d1e-5d0b-4b8e-9a57-2f0e4a6b9c31")
log = logging.getLogger(__name__)


class InteropError(ValueError):
    """Input that does not fit a format, or a selection that cannot be exported; says what to do."""


SOURCE_NAME_KEYS = ("x.rosbag",)  # metadata naming where a recording was read from, not what it holds: see write_to_store
PARTIAL_MARK = "flywheel-export-partial"  # in an export's partial folder once its lock is held: one a later export may remove


@contextlib.contextmanager
def new_output(path: str | Path):
    """Write ``path`` (a file, or a folder absent or empty) whole or not at all: the block writes the path it is given,
    ``path``'s name inside a partial folder of its own beside it (``.<name>.partial-<random>``, made new by mkdtemp:
    never one a killed export left), and that is moved to ``path`` once the block ends, never over what another export
    put there meanwhile (:func:`_publish`). Any failure removes the partial folder, a SIGTERM or Ctrl-C too (the export
    command turns them into an exception); a kill (SIGKILL, the OOM killer) leaves only it, never an export that looks complete,
    and the next export to ``path`` removes it (:func:`_remove_dead_partials`).
    InteropError when ``path`` holds something already. The caller returns ``path``, not what it was given."""
    path = Path(path).resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InteropError(_exists(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(path)
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    lock = os.open(partial, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a filesystem without flock (some NFS): a partial left there is removed by hand
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until this export ends; the kernel drops it when it dies
            (partial / PARTIAL_MARK).touch()  # only once the lock is held
        yield partial / path.name
        _publish(partial / path.name, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        os.close(lock)


def _exists(path: Path) -> str:
    return f"{path} exists already{' and is not empty' if path.is_dir() else ''}; choose another --out or remove it"


def _publish(done: Path, path: Path) -> None:
    """Move the finished export ``done`` to ``path``; InteropError if another export put something there meanwhile."""
    try:
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()  # an empty folder given: the export takes its place (a file, or a folder filled meanwhile: refused)
        if done.is_dir():
            os.rename(done, path)  # a folder never goes over one that holds something (ENOTEMPTY)
            return
        try:
            os.link(done, path)  # unlike a rename, never over a file there (EEXIST)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                raise
            if path.exists():  # a filesystem without hard links (FAT): checked, then renamed
                raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
            os.rename(done, path)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise
        raise InteropError(f"{_exists(path)} (another export wrote it while this one ran; nothing of this one was kept)") from None


def _remove_dead_partials(path: Path) -> None:
    """Remove the partial folders that killed exports to ``path`` left: those holding :data:`PARTIAL_MARK` whose lock no
    export holds any more. Anything else beside ``path`` stays (a partial of a running export, of an older flywheel,
    whose name ended in a pid, or of a filesystem without flock: docs/interop.md says how to remove them)."""
    for partial in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
        if not (partial / PARTIAL_MARK).is_file():
            continue
        try:
            lock = os.open(partial, os.O_RDONLY)
        except OSError:  # removed meanwhile by another export
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its export runs
            os.close(lock)
            continue
        shutil.rmtree(partial, ignore_errors=True)
        os.close(lock)
        log.warning("removed %s, the partial folder of an export to %s that was killed", partial, path)


EXPORT_BATCH_BYTES = 64 << 20  # an export holds about this much of the selection's arrays at a time, whatever its size


@dataclasses.dataclass
class Selection:
    """Episodes of one pinned snapshot of a store, read in batches of about ``batch_bytes``: an export of the whole
    fleet's store holds one batch at a time, never the selection (:meth:`batches`)."""

    store: str
    snapshot: Any  # fleet.store.StoreSnapshot, one fixed snapshot (:func:`pinned` keeps it through maintenance)
    infos: list  # the selected EpisodeInfo, in catalog order
    batch_bytes: int = EXPORT_BATCH_BYTES
    episode_store: Any = None  # the fleet.store.EpisodeStore it was read from (pins it)

    @property
    def snapshot_id(self) -> str:
        return self.snapshot.snapshot_id

    @property
    def streams(self) -> list[str]:
        """The store streams the episodes come from (one per array layout and writer)."""
        return sorted({i.stream for i in self.infos})

    def __len__(self) -> int:
        return len(self.infos)

    def layouts(self) -> dict[str, dict[str, dict]]:
        """Each stream's array layout (what :func:`layout` gives for any of its episodes), from the store's signatures."""
        return {stream: _signature_layout(self.snapshot.signature(stream)) for stream in self.streams}

    def _groups(self) -> Iterator[list]:
        """The infos in catalog order, cut into groups of about ``batch_bytes`` of arrays each."""
        arrays = {stream: self.snapshot.signature(stream).arrays for stream in self.streams}
        nbytes = lambda a: np.dtype(a.dtype).itemsize * int(np.prod(a.tail))  # noqa: E731  (one row)
        group, size = [], 0
        for info in self.infos:
            frames = {camera: n for camera, _, n in info.frames}  # a camera with its own clock: its own rows
            group.append(info)
            size += max(1, sum(nbytes(a) * (frames.get(a.camera, 0) if a.length == "frames" else info.num_steps + 1) for a in arrays[info.stream]))
            if size >= self.batch_bytes:
                yield group
                group, size = [], 0
        if group:
            yield group

    def batches(self) -> Iterator[list[Episode]]:
        """The episodes, each checked against its commit digest, a batch at a time."""
        for group in self._groups():
            yield self.snapshot.read_episodes(group)

    def headers(self, arrays: Sequence[str] = ()) -> Iterator[tuple[dict[str, str], dict[str, np.ndarray]]]:
        """Each episode's metadata map and only ``arrays`` of it (a first pass that reads little), in order."""
        for group in self._groups():
            yield from zip(self.snapshot.metadata(group), self.snapshot.read_arrays(group, arrays) if arrays else ({} for _ in group))

    def provenance(self) -> dict:
        """Dataset-level provenance written beside the episodes in every format."""
        store = self.store if "://" in self.store else str(Path(self.store).resolve())  # a relative path means nothing once the export moves
        versions = sorted({i.schema_version or self.snapshot.info["episode_schema_version"] for i in self.infos})
        return {"flywheel_interop_version": INTEROP_VERSION, "store": store, "snapshot_id": self.snapshot_id, "episode_schema_version": ",".join(versions)}


def _signature_layout(signature) -> dict[str, dict]:
    return {a.name: {"dtype": str(np.dtype(a.dtype)), "tail": list(a.tail), "length": a.length} for a in signature.arrays}


def select(
    store: str | Path,
    snapshot_id: str | None = None,
    *,
    robot_id: Sequence[str] | None = None,
    source: Sequence[str] | None = None,
    robot_model: str | None = None,
    stream: str | None = None,
) -> Selection:
    """The episodes of ``store`` at ``snapshot_id`` (default: its tip) matching the filters, withdrawn ones left out (read
    later, in batches)."""
    from fleet.store import EpisodeStore, StoreConfig
    from fleet.store.backend import UnknownSnapshotError
    from fleet.store.location import WHERE_STORES_ARE

    if Path(store).is_file():
        raise InteropError(f"--store {store} is a file; pass the folder of a flywheel episode store ({WHERE_STORES_ARE})")
    try:
        opened = EpisodeStore.open(StoreConfig(path=str(store), fsync=False))
    except FileNotFoundError:
        raise InteropError(f"no flywheel episode store at {store}; pass --store with the folder of one ({WHERE_STORES_ARE})") from None
    try:
        snap = opened.snapshot(snapshot_id)
        snap.catalog()
    except Exception as exc:  # icechunk raises its own error types (multi-line, with its source location) for an unknown id
        recent = ", ".join(h["snapshot_id"] for h in opened.history(limit=5))
        first_line = _first_line(exc, None if isinstance(exc, UnknownSnapshotError) else 200)  # ours whole: it says what to do
        raise InteropError(f"cannot open snapshot {snapshot_id!r} of store {store} ({first_line}); its newest snapshots: {recent} (or leave out --snapshot for the tip)") from None
    every = snap.episodes(include_withdrawn=True)
    matching = snap.episodes(robot_id=robot_id or None, source=source or None, robot_model=robot_model, include_withdrawn=True)
    if stream is not None:
        matching = [i for i in matching if i.stream == stream]
    withdrawn = snap.withdrawn() if matching else frozenset()
    infos = [i for i in matching if i.episode_id not in withdrawn]  # withdrawn episodes stay out (docs/store.md, Withdrawing episodes)
    if not every:
        raise InteropError(f"snapshot {snap.snapshot_id} of {store} holds no episodes yet: nothing to export")
    if matching and not infos:
        raise InteropError(f"the {len(matching)} episodes in snapshot {snap.snapshot_id} of {store} that match the filters are all withdrawn from training "
                           f"(`flywheel store withdrawals --store {store}` lists the rules): nothing to export")  # fmt: skip
    if not infos:
        raise InteropError(f"none of the {len(every)} episodes in snapshot {snap.snapshot_id} of {store} match the filters; drop or change --robot-id/--source/--robot-model/--stream")
    return Selection(str(store), snap, infos, episode_store=opened)


@contextlib.contextmanager
def pinned(selection: Selection) -> Iterator[str | None]:
    """Pin the selection's snapshot while the block reads it (``export.<UTC time>.<random>``), and let it go after.
    Maintenance expires a snapshot ``keep_history_s`` (1 h by default) after a newer one replaced it, so an export of
    a busy store that ran longer would find its chunks deleted midway. Yields the pin's name, or None (with a note on
    stderr) where the store refuses the pin (read-only files or credentials, a snapshot gone since it was chosen): the
    export then reads it unpinned, as before. A SIGKILLed export leaves its pin: `flywheel store pins --store PATH`
    lists it, `flywheel store unpin --store PATH --name NAME` lets it go."""
    store = selection.episode_store
    name: str | None = f"export.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.{uuid.uuid4().hex[:8]}"
    try:
        with _stop_held():
            try:
                store.pin(selection.snapshot_id, name)
            except Exception as exc:  # noqa: BLE001  Icechunk's own error where a local store's files are read-only
                print(f"flywheel export: note: could not pin snapshot {selection.snapshot_id} while exporting "
                      f"({_first_line(exc)}); exporting it unpinned: maintenance may expire it if this export outlasts "
                      "the store's keep_history_s. To be sure, have a user who may write the store pin it (`flywheel store pin "
                      f"--store {selection.store} --snapshot {selection.snapshot_id} --name NAME`) and export that --snapshot",
                      file=sys.stderr)  # fmt: skip
                name = None
        _StopSignal.unwind_if_held()  # one that came while the tag was written: now, with the finally below in place
        yield name
    finally:
        if name is not None:
            with _stop_held():  # one that comes now is dropped: the export has ended either way, and so does the process
                try:
                    store.unpin(name)
                except LookupError:
                    pass  # let go already (an operator's `flywheel store unpin` while it ran)
                except Exception as exc:  # noqa: BLE001  the export's own result or error goes on; the pin is named
                    print(f"flywheel export: note: the export's pin {name!r} stays ({_first_line(exc)}); let it go with "
                          f"`flywheel store unpin --store {selection.store} --name {name}`", file=sys.stderr)  # fmt: skip
            _StopSignal.held = None


def _first_line(exc: BaseException, limit: int | None = 300) -> str:
    """An error's first line (Icechunk's run on with their Rust context), at most ``limit`` characters (None: whole)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else exc.__class__.__name__


# -- stopping an export: SIGTERM or Ctrl-C unwinds it, so its pin is let go and its partial folder removed ------------
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ExportStopped(BaseException):
    """SIGTERM or SIGINT during an export (:func:`stop_signals_unwind`). Not an Exception: no handler on the way out
    takes it for a failure of its own, and the finally blocks (the pin, the partial folder) run."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _StopSignal:
    """While a pin is written or deleted, a stop signal is held, not raised mid-call: one raised as Icechunk's tag write
    returned unwound before the block that lets the pin go was in place, and left the pin."""

    holding = False
    held: int | None = None

    @classmethod
    def handle(cls, signum: int, frame) -> None:
        if cls.holding:
            cls.held = signum
            return
        raise ExportStopped(signum)

    @classmethod
    def unwind_if_held(cls) -> None:
        signum, cls.held = cls.held, None
        if signum is not None:
            raise ExportStopped(signum)


@contextlib.contextmanager
def _stop_held():
    _StopSignal.holding = True
    try:
        yield
    finally:
        _StopSignal.holding = False


@contextlib.contextmanager
def stop_signals_unwind():
    """While the block runs, SIGTERM and SIGINT raise :class:`ExportStopped` in it (SIGTERM's default action ended the
    process where it stood, and its pin stayed; Ctrl-C's KeyboardInterrupt could come as the pin was written). The
    previous handlers come back after. Off the main thread (which alone sets handlers), nothing changes; a signal the
    process was started ignoring stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}
    for sig in previous:
        signal.signal(sig, _StopSignal.handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():  # None: a handler set from C, not Python; the default is the nearest
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def layout(episode: Episode) -> dict[str, dict]:
    """Array layout: name -> {dtype, tail (shape after time), length ("T", "T+1", or "frames" for a
    schema 1.1 camera with its own clock: image.NAME and image.NAME.timestamp)}: its stream signature's
    (:class:`fleet.store.layout.StreamSignature`, the store's one rule)."""
    from fleet.store.layout import StreamSignature

    return _signature_layout(StreamSignature.of(episode))


def single_layout(selection: Selection, fmt: str) -> dict[str, dict]:
    """The one layout all of ``selection``'s episodes share (datasets with fixed features need it)."""
    of_stream = {stream: json.dumps(lay, sort_keys=True) for stream, lay in selection.layouts().items()}
    layouts: dict[str, list[tuple[str, str]]] = {}
    for info in selection.infos:
        layouts.setdefault(of_stream[info.stream], []).append((info.robot_model, info.source))
    if len(layouts) > 1:
        kinds = "; ".join(
            f"{len(eps)} episodes of {sorted({m for m, _ in eps})} from {sorted({s for _, s in eps})} with arrays {sorted(json.loads(k))}" for k, eps in layouts.items()
        )
        raise InteropError(
            f"a {fmt} dataset has one set of features, but the selection mixes {len(layouts)} array layouts ({kinds}); "
            "export one layout at a time with --source (a flywheel run's store: real telemetry has no qpos/qvel, simulated episodes do), "
            f"--robot-model or --stream (the selection's streams: {', '.join(selection.streams)})"
        )
    return json.loads(next(iter(layouts)))


def step_rate(timestamp: np.ndarray) -> float:
    """An episode's control rate (Hz) from the median step of its timestamps."""
    return 1.0 / float(np.median(np.diff(timestamp)))


def fps_of(declared: Sequence[float | None], rates: Sequence[float]) -> int:
    """The control rate (Hz, rounded): the episodes' ``declared`` ``control_rate_hz`` when they all declare one that
    rounds alike, else the median of their timestamps' ``rates``."""
    rounded = {None if d is None else max(1, round(float(d))) for d in declared}
    if len(rounded) == 1 and None not in rounded:
        return rounded.pop()
    return max(1, int(round(float(np.median(rates)))))


def derived_episode_id(episode_id: str, dropped: Sequence[str]) -> str:
    """The id of an episode less the arrays ``dropped`` (a format that cannot carry them): other content than the
    original, so never its id (the 409 rule); the same for every import of it."""
    return str(uuid.uuid5(IMPORT_NAMESPACE, f"{episode_id}/without/{','.join(sorted(dropped))}"))


def content_episode_id(arrays: dict[str, np.ndarray], robot_id: str) -> str:
    """A UUID derived from the recording's arrays and robot: re-importing it gives the same id."""
    digest = hashlib.sha256(encode_safetensors(arrays, {})).hexdigest()
    return str(uuid.uuid5(IMPORT_NAMESPACE, f"{robot_id}/{digest}"))


@dataclasses.dataclass(frozen=True)
class ImportOptions:
    """Metadata for recordings that carry no flywheel provenance (a flywheel export keeps its own).

    robot_id / robot_model: required for foreign recordings. source: "real" by default.
    """

    robot_id: str | None = None
    robot_model: str | None = None
    source: str = "real"
    policy_version: str = "none"
    hardware: str | None = None  # JSON text
    calibration: str | None = None  # JSON text


def foreign_episode(arrays: dict[str, np.ndarray], options: ImportOptions, origin: str, extra_metadata: dict[str, str] | None = None) -> Episode:
    """Build a schema-v1 episode from a recording without flywheel metadata (deterministic id)."""
    if not options.robot_id or not options.robot_model:
        raise InteropError(f"{origin} carries no flywheel provenance: pass --robot-id and --robot-model for the robot that recorded it")
    meta = {"source": options.source, "policy_version": options.policy_version}
    for key in ("hardware", "calibration"):
        if getattr(options, key):
            meta[key] = getattr(options, key)
    meta.update(extra_metadata or {})
    required = {k: arrays[k] for k in REQUIRED_ARRAYS}
    extras = {k: v for k, v in arrays.items() if k not in REQUIRED_ARRAYS}
    try:
        return Episode.create(
            **required,
            extras=extras,
            robot_id=options.robot_id,
            robot_model=options.robot_model,
            episode_id=content_episode_id(arrays, options.robot_id),
            **meta,
        )
    except EpisodeValidationError as exc:
        raise InteropError(f"{origin} does not make a valid episode: {exc}") from None


def restored_episode(arrays: dict[str, np.ndarray], metadata: dict[str, str], origin: str) -> Episode:
    """An episode exported by flywheel, rebuilt with its own metadata (same id, same bytes)."""
    required = {k: arrays.pop(k) for k in REQUIRED_ARRAYS}
    try:
        return Episode(**required, metadata=dict(metadata), extras=arrays).validate()
    except EpisodeValidationError as exc:
        raise InteropError(f"{origin} holds flywheel provenance but not a valid schema-v1 episode: {exc}") from None


def cast(arr, dtype: str, tail: Sequence[int], origin: str) -> np.ndarray:
    """``arr`` as ``dtype`` with rows of shape ``tail``; InteropError if the sizes do not fit."""
    out = np.asarray(arr, dtype=np.dtype(dtype))
    rows = out.shape[0] if out.ndim else 0
    try:
        return np.ascontiguousarray(out.reshape(rows, *tail))
    except ValueError:
        raise InteropError(f"{origin}: values of shape {out.shape} do not fit rows of shape {tuple(tail)}") from None


# -- delivery ---------------------------------------------------------------------------
def write_to_store(episodes: Sequence[Episode], store: str | Path) -> dict[str, int]:
    """Append ``episodes`` to the store at ``store`` (created if absent) in one commit, or nothing: inputs holding one
    episode id twice with different content, or an id stored with other content, are refused before it. An episode
    stored under another name of its source only (``SOURCE_NAME_KEYS``: a bag an earlier build stored as ``b1.db3`` or
    '', ``b1`` now) is the same recording: a duplicate, left as it is stored."""
    from fleet.store import EpisodeStore, StoreConfig
    from fleet.store.writer import canonical_digest

    digests, inputs = [canonical_digest(ep) for ep in episodes], {}
    for ep, digest in zip(episodes, digests):  # checked before anything is committed: an import is whole or absent
        first = inputs.setdefault(ep.episode_id, (ep, digest))
        if first[1] != digest:
            raise InteropError(
                f"the inputs hold episode {ep.episode_id} twice with different content ({_differences(first[0], ep, 'first', 'second')}); "
                "import them separately, or drop one; nothing was imported"
            )
    target = EpisodeStore.open_or_create(StoreConfig(path=str(store)))
    target.refresh_index()
    differing = [ep for ep, digest in zip(episodes, digests) if target.lookup(ep.episode_id) not in (None, digest)]
    clash, renamed = _other_content(target, differing)
    if clash:
        stored = _differences(target.snapshot().read_episode(clash[0].episode_id), clash[0], "stored", "imported")
        raise InteropError(f"{len(clash)} episode ids are stored with different content (first: {clash[0].episode_id}, {stored}); nothing was imported")
    same = {ep.episode_id for ep in renamed}
    kept = [(ep, digest) for ep, digest in zip(episodes, digests) if ep.episode_id not in same]
    result = target.append([ep for ep, _ in kept], digests=[digest for _, digest in kept], message="flywheel import")
    counts = {s: result.statuses.count(s) for s in ("created", "duplicate", "conflict")}
    counts["snapshot_id"] = result.snapshot_id
    if counts["conflict"]:  # stored meanwhile by another writer
        eps, renamed_meanwhile = _other_content(target, [ep for (ep, _), s in zip(kept, result.statuses) if s == "conflict"])
        counts["conflict"], renamed = len(eps), renamed + renamed_meanwhile
        if eps:
            stored = _differences(target.snapshot().read_episode(eps[0].episode_id), eps[0], "stored", "imported")
            raise InteropError(f"{len(eps)} episode ids were stored with different content meanwhile (first: {eps[0].episode_id}, {stored}); the rest are in snapshot {result.snapshot_id}")
    counts["duplicate"] += len(renamed)
    return counts


def _other_content(target, episodes: Sequence[Episode]) -> tuple[list[Episode], list[Episode]]:
    """``episodes`` (each of an id ``target`` stores with other bytes) split into (those stored with other content, those
    stored under another name of their source only: the value of a ``SOURCE_NAME_KEYS`` key both have)."""
    if not episodes:
        return [], []
    snapshot, other, renamed = target.snapshot(), [], []
    for ep in episodes:
        stored = snapshot.read_episode(ep.episode_id)
        keys, arrays = _differing(stored, ep)
        named = bool(keys) and not arrays and all(k in SOURCE_NAME_KEYS and k in stored.metadata and k in ep.metadata for k in keys)
        (renamed if named else other).append(ep)
    return other, renamed


def _differing(a: Episode, b: Episode) -> tuple[list[str], list[str]]:
    """(the metadata keys whose values differ, the arrays that differ) between two episodes of one id."""
    keys = sorted(k for k in a.metadata.keys() | b.metadata.keys() if a.metadata.get(k) != b.metadata.get(k))
    arrays, brr = a.arrays(), b.arrays()
    changed = sorted(
        k for k in arrays.keys() | brr.keys()
        if k not in arrays or k not in brr or (arrays[k].dtype, arrays[k].shape) != (brr[k].dtype, brr[k].shape) or arrays[k].tobytes() != brr[k].tobytes()
    )  # fmt: skip
    return keys, changed


def _differences(a: Episode, b: Episode, a_is: str, b_is: str) -> str:
    """What tells two episodes of one id apart, for a refusal: the metadata keys whose values differ (with both values)
    and the arrays that differ."""
    keys, changed = _differing(a, b)
    value = lambda v: "absent" if v is None else repr(v if len(v) <= 60 else v[:57] + "...")  # noqa: E731
    said = [f"metadata {k!r} {value(a.metadata.get(k))} {a_is}, {value(b.metadata.get(k))} {b_is}" for k in keys]
    said += [f"array {k!r}" for k in changed]
    return "they differ in " + ("; ".join(said) if said else "their bytes only")


def upload(episodes: Sequence[Episode], server_url: str, token: str, *, spool_dir: str | Path | None = None, max_attempts: int = 8) -> dict[str, int]:
    """Upload ``episodes`` to a fleet server through the robot agent's spool and uploader.

    An episode the spool holds queued already (an earlier run's, the same bytes) is not queued again. Episodes the
    server refuses for good, and those of another robot than the token's (403 robot_id_mismatch), are set aside in
    ``<spool>/rejected/`` with its reason while the others go up; InteropError names them afterwards.
    """
    from fleet.agent.spool import Spool
    from fleet.agent.uploader import Uploader

    with tempfile.TemporaryDirectory(prefix="flywheel-import-") as tmp:
        spool = Spool(spool_dir or tmp, max_bytes=1 << 62)
        queued = {entry.episode_id: entry for entry in spool.entries()}
        for ep in episodes:
            data = ep.to_bytes()
            if ep.episode_id not in queued or spool.read(queued[ep.episode_id]) != data:  # a rerun's: queued once
                queued[ep.episode_id] = spool.put(data, ep.episode_id)
        uploader = Uploader(
            spool, server_url, token, max_attempts=max_attempts, backoff_initial_s=0.2, backoff_max_s=5.0, refused_for_good=[(403, "robot_id_mismatch")],
        )  # fmt: skip
        rejected = []
        try:
            failures = 0
            while (outcome := uploader.upload_once()) != "empty":
                if outcome != "retry":  # an entry left the spool: acknowledged, or moved to rejected/
                    if outcome in ("rejected", "set_aside"):  # told apart by entry, not by id: one id may be queued twice, other bytes each
                        rejected.append(uploader.last_entry)
                    failures = 0
                    continue
                failures += 1
                refused = (uploader.last_error or "").startswith("HTTP 4")  # 401/403/404/429: token or URL, not a busy server
                if failures >= max_attempts or (refused and not uploader.last_error.startswith("HTTP 429")):
                    raise InteropError(
                        f"upload to {server_url} failed after {failures} attempt(s) ({uploader.last_error}); {spool.depth} episodes not uploaded "
                        f"({_went_up(uploader.stats)}): check --server and the token, then run the import again (it is idempotent)"
                    )
                time.sleep(uploader.backoff_s())
        finally:
            uploader.stop()
        stats = dict(uploader.stats)
        if stats["rejected"] or stats["set_aside"]:
            raise InteropError(_refusals(rejected, stats, spool.rejected_dir, kept=spool_dir is not None))
    return stats


def _went_up(stats: dict) -> str:
    return f"{stats['created']} created, {stats['duplicate']} duplicate"


def _refusals(refused: Sequence, stats: dict, rejected_dir: Path, *, kept: bool) -> str:
    """One line on the spool entries the server refused for good: each answer and how many got it (their reasons in
    ``rejected_dir``), what went up, and where the files are (not ``kept``: a temporary spool, removed)."""
    answers: dict[str, int] = {}
    for entry in refused:
        try:
            reason = json.loads((rejected_dir / f"{entry.path.name}.reason.json").read_text())
        except (OSError, ValueError):  # evicted, or not the server's JSON
            reason = {}
        answer = f"{reason.get('status', '?')} {reason.get('error', '')}: {reason.get('reason') or reason.get('body', '')}"
        answers[answer] = answers.get(answer, 0) + 1
    said = "; ".join(f"{answer} ({n} episodes)" for answer, n in list(answers.items())[:5]) + ("; ..." if len(answers) > 5 else "")
    other_robot = " a robot token uploads only its own robot's episodes: upload each robot's with its token, chosen with --robot-id;" if "robot_id_mismatch" in said else ""
    where = f"files kept in {rejected_dir}" if kept else "files not kept (a temporary spool: pass --spool to keep them)"
    return f"the server refused {stats['rejected'] + stats['set_aside']} episodes ({_went_up(stats)}): {said};{other_robot} {where}"
