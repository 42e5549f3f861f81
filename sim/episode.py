"""The Episode record, schema v1 / v1.1: the one unit of experience on the wire and in the store.

An episode of T control steps holds (time on axis 0):

    observation  float32 (T+1, obs_dim)   includes the final observation
    action       float32 (T, act_dim)
    reward       float32 (T,)
    terminated   bool    (T,)             true end of task (not a time limit)
    truncated    bool    (T,)             cut by a time limit or an operator
    timestamp    float64 (T+1,)           seconds, strictly increasing

plus optional arrays (``qpos``, ``qvel``, ``actuator_force``, ``contact_force``,
``intervention``, ``image.NAME``) whose leading axis is T or T+1, and string metadata
(``schema_version``, ``robot_id``, ``episode_id``, ``policy_version``, ``source``,
``robot_model``, optional JSON strings ``hardware``/``calibration``/``scenario`` and
``model_version``; user keys start with ``x.``).

Schema 1.1 (``schema_version`` "1.1") adds optional metadata and camera timelines; a 1.1
record without them is valid, and "1" records are read exactly as before (docs/protocol.md):

    names            JSON {array: [one string per feature]} for 2-D arrays (joint names)
    control_rate_hz  decimal text, > 0, within 10 % of 1 / median(diff(timestamp))
    task             the task instruction, UTF-8, at most 4096 bytes
    cameras          JSON {NAME: {"codec": "raw-rgb8" | "raw-rgba8" | "raw-gray8",
                     "width": W, "height": H, "rate_hz"?: r}} for arrays image.NAME (N, H, W, C)
    image.NAME.timestamp  float64 (N,): camera NAME's own clock; image.NAME then has N frames
                     (any N >= 1) instead of T or T+1

On the wire an episode is one safetensors file (arrays + the metadata map). Nothing is
ever unpickled: :func:`Episode.from_bytes` parses the header itself and bounds every size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
import uuid
from collections.abc import Mapping

import numpy as np

SCHEMA_VERSION = "1"  # what a record without 1.1 content is written as
SCHEMA_VERSION_1_1 = "1.1"
SCHEMA_VERSIONS = (SCHEMA_VERSION, SCHEMA_VERSION_1_1)  # what this build reads
SOURCES = ("real", "sim", "worldmodel")
REQUIRED_ARRAYS: dict[str, tuple[np.dtype, int, str]] = {
    # name: (dtype, ndim, leading length: "T" or "T+1")
    "observation": (np.dtype(np.float32), 2, "T+1"),
    "action": (np.dtype(np.float32), 2, "T"),
    "reward": (np.dtype(np.float32), 1, "T"),
    "terminated": (np.dtype(np.bool_), 1, "T"),
    "truncated": (np.dtype(np.bool_), 1, "T"),
    "timestamp": (np.dtype(np.float64), 1, "T+1"),
}
OPTIONAL_ARRAYS: dict[str, np.dtype | None] = {
    "qpos": np.dtype(np.float32),
    "qvel": np.dtype(np.float32),
    "actuator_force": np.dtype(np.float32),
    "contact_force": np.dtype(np.float32),
    "intervention": np.dtype(np.bool_),
}
IMAGE_PREFIX = "image."
REQUIRED_METADATA = ("schema_version", "robot_id", "episode_id", "policy_version", "source", "robot_model")
JSON_METADATA = ("hardware", "calibration", "scenario")
OPTIONAL_METADATA = (*JSON_METADATA, "model_version")
PLAIN_TEXT_METADATA = ("policy_version", "robot_model", "model_version")  # shown in logs and reports: printable text only
V1_1_METADATA = ("names", "control_rate_hz", "task", "cameras")  # schema 1.1 only
USER_METADATA_PREFIX = "x."
CAMERA_TIMESTAMP_SUFFIX = ".timestamp"  # schema 1.1: image.NAME.timestamp is camera NAME's clock
# codec -> channels of its uint8 frames (N, H, W, C); encoded streams (h264, av1, ...) are not schema 1.1
CAMERA_CODECS = {"raw-rgb8": 3, "raw-rgba8": 4, "raw-gray8": 1}
RATE_TOLERANCE = 0.10  # a declared rate may differ from 1 / median step by this fraction
MAX_RATE_HZ = 1e6
MAX_TASK_BYTES = 4096
MAX_NAME_CHARS = 128  # one dimension name
MAX_V1_1_JSON_BYTES = 1 << 16  # names, cameras
_DECIMAL = re.compile(r"[0-9]{1,12}(\.[0-9]{1,12})?([eE][+-]?[0-9]{1,3})?")
MAX_HEADER_BYTES = 1 << 20
MAX_JSON_DEPTH = 32  # nesting a header or a JSON metadata value may have (a safetensors header needs 3)
MAX_TENSOR_DIMS = 8
ROBOT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ROBOT_ID_RULE = "1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit (no spaces or control characters)"
# ids every robot with an unset (zeroed, or all-ones) id field would send: refused for new episodes, see check_new_episode_id
RESERVED_EPISODE_IDS = {str(uuid.UUID(int=0)): "the nil UUID", str(uuid.UUID(int=(1 << 128) - 1)): "the max UUID"}
EPISODE_ID_RULE = (  # docs/protocol.md, "Episode ids are fleet-wide": a predictable id can be taken first by another robot's token
    "episode ids are unique across the whole fleet: make each a random uuid4 (a uuid5 only under a namespace kept secret on the robot)"
)
_JSON_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, unrolled (linear time)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
MAX_DIM = 1 << 40  # per axis: shapes are checked in exact integer arithmetic, never in wrapping int64
_SAFETENSORS_DTYPES = {"F32": np.float32, "F64": np.float64, "BOOL": np.bool_, "U8": np.uint8, "F16": np.float16}


class EpisodeValidationError(ValueError):
    """An episode that breaks schema v1; ``field`` names the array or metadata key at fault."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"episode field '{field}': {reason}")



def schema_cast(name: str, value, dtype: np.dtype) -> np.ndarray:
    """``value`` as the schema's ``dtype``: a float64 reading narrows to float32
    (~7 significant digits: the schema's precision), but a cast that would change what was measured is refused, naming
    the field: finite values beyond float32's range (they became inf, refused as "NaN or Inf"), integers the float type
    does not hold exactly (encoder ticks over 2^24 moved by up to a tick), flags other than 0 and 1 (2 became True).
    What ``Episode.create`` and the importers cast with."""
    arr = np.asarray(value)
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # a value beyond the range is refused below, by name, not warned of
        out = np.ascontiguousarray(arr, dtype=dtype)
    if arr.dtype == dtype or arr.dtype.kind not in "iufb":
        return out
    if dtype.kind == "f" and arr.dtype.kind == "f":
        bad = np.isinf(out) & np.isfinite(arr)
        if bad.any():
            raise EpisodeValidationError(name, f"holds {arr[bad].flat[0].item():.6g}, beyond {dtype}'s range (±{np.finfo(dtype).max:.3g}), at index "
                                               f"{np.argwhere(bad)[0].tolist()}: rescale it")  # fmt: skip
    elif dtype.kind == "f" and arr.dtype.kind in "iu":
        bad = out.astype(arr.dtype) != arr
        if bad.any():
            raise EpisodeValidationError(name, f"holds the integer {arr[bad].flat[0].item()}, which {dtype} cannot hold exactly (it holds every integer "
                                               f"only up to 2^{np.finfo(dtype).nmant + 1}): rescale them (encoder ticks to radians, nanoseconds to "
                                               "seconds, say) or send them as offsets from a reference")  # fmt: skip
    elif dtype.kind == "b" and arr.dtype.kind in "iuf" and not np.isin(arr, (0, 1)).all():
        raise EpisodeValidationError(name, f"is a flag, true or false, but holds {arr[~np.isin(arr, (0, 1))].flat[0].item()!r}: send 0/1 or booleans")
    return out


@dataclasses.dataclass
class Episode:
    """One episode; see the module docstring for shapes. Build it, then call :meth:`validate`."""

    observation: np.ndarray  # (T+1, obs_dim) float32
    action: np.ndarray  # (T, act_dim) float32
    reward: np.ndarray  # (T,) float32
    terminated: np.ndarray  # (T,) bool
    truncated: np.ndarray  # (T,) bool
    timestamp: np.ndarray  # (T+1,) float64
    metadata: dict[str, str]
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        *,
        observation,
        action,
        reward,
        terminated,
        truncated,
        timestamp,
        robot_id: str,
        robot_model: str,
        source: str,
        policy_version: str = "none",
        episode_id: str | None = None,
        extras: Mapping[str, np.ndarray] | None = None,
        **metadata: str | dict,
    ) -> Episode:
        """Build and validate an episode, casting arrays to their schema dtypes.

        JSON metadata (``hardware``, ``calibration``, ``scenario``, ``names``, ``cameras``) may be
        given as dicts, ``control_rate_hz`` as a number. The record is schema 1.1 when it has any
        1.1 content (metadata or camera timestamps), else schema 1, unless ``schema_version`` is given.
        """
        is_1_1 = any(k in V1_1_METADATA for k in metadata) or any(_is_camera_clock(k) for k in extras or {})
        version = metadata.pop("schema_version", SCHEMA_VERSION_1_1 if is_1_1 else SCHEMA_VERSION)
        meta = {
            "schema_version": version,
            "robot_id": robot_id,
            "episode_id": episode_id or str(uuid.uuid4()),
            "policy_version": policy_version,
            "source": source,
            "robot_model": robot_model,
        }
        for key, value in metadata.items():
            try:
                meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, allow_nan=False)
            except ValueError:
                raise EpisodeValidationError(key, "holds NaN or Infinity, which JSON has no numbers for: write null or a string instead") from None
        arrays = {
            "observation": observation,
            "action": action,
            "reward": reward,
            "terminated": terminated,
            "truncated": truncated,
            "timestamp": timestamp,
        }
        arrays = {k: schema_cast(k, v, REQUIRED_ARRAYS[k][0]) for k, v in arrays.items()}
        casted_extras = {}
        for key, value in (extras or {}).items():
            dtype = np.dtype(np.float64) if version == SCHEMA_VERSION_1_1 and _is_camera_clock(key) else OPTIONAL_ARRAYS.get(key)
            casted_extras[key] = schema_cast(key, value, dtype) if dtype else np.ascontiguousarray(value)
        check_new_episode_id(meta["episode_id"])
        return cls(**arrays, metadata=meta, extras=casted_extras).validate()

    # -- accessors ----------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return int(self.action.shape[0])

    @property
    def episode_id(self) -> str:
        return self.metadata["episode_id"]

    @property
    def robot_id(self) -> str:
        return self.metadata["robot_id"]

    @property
    def source(self) -> str:
        return self.metadata["source"]

    def json_metadata(self, key: str) -> dict:
        """The parsed JSON metadata field ``key`` (``{}`` when absent)."""
        return json.loads(self.metadata[key]) if key in self.metadata else {}

    def arrays(self) -> dict[str, np.ndarray]:
        """All arrays by their wire name."""
        out = {k: getattr(self, k) for k in REQUIRED_ARRAYS}
        out.update(self.extras)
        return out

    @property
    def total_return(self) -> float:
        return float(self.reward.sum(dtype=np.float64))

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> Episode:
        """Check schema v1 / v1.1; raise :class:`EpisodeValidationError` naming the first bad field."""
        _validate(self.arrays(), self.metadata)
        return self

    def camera_clocks(self) -> dict[str, np.ndarray]:
        """Schema 1.1 cameras with their own clock: {"image.NAME": its (N,) float64 timestamps}."""
        return camera_clocks(self.arrays())

    # -- wire format --------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The episode as one canonical safetensors file: equal episodes give equal bytes."""
        self.validate()
        return encode_safetensors(self.arrays(), self.metadata)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Episode:
        """Parse and validate a safetensors episode. Raises EpisodeValidationError on any fault."""
        arrays, metadata = parse_safetensors(data)
        _validate(arrays, metadata)
        required = {k: arrays.pop(k) for k in REQUIRED_ARRAYS}
        return cls(**required, metadata=metadata, extras=arrays)

    def equals(self, other: Episode) -> bool:
        """Bit-exact equality of every array and metadata entry."""
        mine, theirs = self.arrays(), other.arrays()
        return (
            self.metadata == other.metadata
            and mine.keys() == theirs.keys()
            and all(mine[k].dtype == theirs[k].dtype and np.array_equal(mine[k], theirs[k]) for k in mine)
        )


def encode_safetensors(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """Canonical safetensors: tensors and metadata in sorted order, header padded to 8 bytes.

    (The safetensors library writes its metadata map in hash order, so equal episodes could
    give different bytes; idempotent uploads compare bytes.) Readable by any safetensors reader.
    """
    names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset, blobs = 0, []
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        if arr.dtype not in names:
            raise EpisodeValidationError(name, f"dtype {arr.dtype} cannot be written to safetensors")
        blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text, *blobs])


def parse_safetensors(data: bytes | memoryview) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse an untrusted safetensors buffer into (arrays, metadata) with every size checked.

    The header is read and bounded before any tensor is touched; offsets must tile the
    data section exactly (no gaps, overlaps or trailing bytes).
    """
    buf = memoryview(data)
    if len(buf) < 8:
        raise EpisodeValidationError("<file>", f"not a safetensors file: {len(buf)} bytes, need an 8-byte header length")
    (header_len,) = struct.unpack("<Q", buf[:8])
    if header_len > len(buf) - 8:
        raise EpisodeValidationError("<header>", f"declared header length {header_len} exceeds the body ({len(buf)} bytes)")
    if header_len > MAX_HEADER_BYTES:  # the metadata (hardware, calibration...) lives in the header: that is what to shrink
        raise EpisodeValidationError("<header>", f"header too large: {header_len} bytes, over the {MAX_HEADER_BYTES}-byte limit; send less metadata")
    header = loads_bounded(bytes(buf[8 : 8 + header_len]), "<header>")
    if not isinstance(header, dict):
        raise EpisodeValidationError("<header>", "header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise EpisodeValidationError("<metadata>", "__metadata__ must map strings to strings")
    body = buf[8 + header_len :]
    spans = []
    arrays: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise EpisodeValidationError(name, "tensor entry needs exactly dtype, shape and data_offsets")
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise EpisodeValidationError(name, f"unsupported dtype {str(info['dtype'])[:100]!r} (allowed: {sorted(_SAFETENSORS_DTYPES)})")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_DIMS and all(type(s) is int and 0 <= s <= MAX_DIM for s in shape)):
            raise EpisodeValidationError(name, f"bad shape {str(shape)[:200]}: at most {MAX_TENSOR_DIMS} axes of 0..{MAX_DIM}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise EpisodeValidationError(name, f"bad data_offsets {str(offsets)[:200]}")
        start, end = offsets
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize  # exact: Python integers do not wrap
        if not 0 <= start <= end <= len(body) or end - start != nbytes:
            raise EpisodeValidationError(
                name, f"declared size {nbytes} bytes at offsets {offsets} does not match the {len(body)}-byte data section"
            )
        spans.append((start, end, name))
        arrays[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(shape).copy()
    cursor = 0
    for start, end, name in sorted(spans):
        if start != cursor:
            raise EpisodeValidationError(name, "tensor data overlaps another tensor or leaves a gap")
        cursor = end
    if cursor != len(body):
        raise EpisodeValidationError("<file>", f"{len(body) - cursor} trailing bytes after the last tensor")
    return arrays, dict(metadata)


def loads_bounded(text: str | bytes, field: str):
    """``json.loads`` of untrusted text whose nesting is at most MAX_JSON_DEPTH and whose numbers are all finite; any
    fault is an EpisodeValidationError naming ``field`` (never a RecursionError from a deeply nested document). Every
    JSON the server is sent (episode headers and metadata, publish, rollout and upload bodies) is read here."""
    try:
        raw = text.decode() if isinstance(text, bytes) else text
    except UnicodeDecodeError:
        raise EpisodeValidationError(field, "not valid JSON (not UTF-8)") from None
    brackets = np.frombuffer(_NOT_BRACKETS.sub("", _JSON_STRINGS.sub('""', raw)).encode(), np.uint8)  # strings cannot nest
    if len(brackets) and int(np.cumsum(np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)).max()) > MAX_JSON_DEPTH:
        raise EpisodeValidationError(field, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_no_constants, parse_float=_finite)
    except (ValueError, RecursionError) as exc:  # ValueError: also an integer past Python's digit limit, a repeated key
        raise EpisodeValidationError(field, f"not valid JSON ({exc.__class__.__name__}: {str(exc)[:120]})") from None


def _no_constants(name: str):
    """NaN, Infinity and -Infinity: Python's JSON reads them, standard JSON (and most other readers) has no such
    numbers, so a document that holds one is refused."""
    raise ValueError(f"{name} is not a JSON number: write null or a string instead")


def _finite(text: str) -> float:
    """A JSON number past a double's range (``1e999``) reads as inf, which Python writes back out as Infinity: refused
    as the constants are."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is past the range of a double (it reads as {value}): write a finite number, null or a string instead")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique: a repeated key means what each reader decides (Python keeps the last,
    others the first), so a document that says two things is refused."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {repeated[:40]!r} appears more than once in one object")
    return out


def check_new_episode_id(episode_id: str) -> None:
    """Refuse the nil and the max UUID as the id of a new episode (an upload, :meth:`Episode.create`).

    Ids are the idempotency key across the whole fleet, whichever robot sent them: a robot whose id field is
    never set sends the same id every time, and every episode after its first would be a 409 conflict, refused
    for good. Not a schema rule: an episode stored under such an id before this check still reads and re-encodes.
    """
    what = RESERVED_EPISODE_IDS.get(episode_id)
    if what is not None:
        raise EpisodeValidationError("episode_id", f"{episode_id!r} is {what}, the id of every robot whose id is unset; {EPISODE_ID_RULE}")


def validate_metadata(meta: Mapping[str, str]) -> None:
    for key in REQUIRED_METADATA:
        if key not in meta:
            raise EpisodeValidationError(key, "missing required metadata")
        if not isinstance(meta[key], str) or not meta[key]:
            raise EpisodeValidationError(key, "must be a non-empty string")
    if meta["schema_version"] not in SCHEMA_VERSIONS:
        raise EpisodeValidationError(
            "schema_version", f"unknown schema version {meta['schema_version'][:40]!r}; this build reads {' and '.join(map(repr, SCHEMA_VERSIONS))}"
        )
    if not ROBOT_ID.fullmatch(meta["robot_id"]):
        raise EpisodeValidationError("robot_id", f"{meta['robot_id'][:80]!r} is not a robot id: {ROBOT_ID_RULE}")
    if meta["source"] not in SOURCES:
        raise EpisodeValidationError("source", f"{meta['source']!r} is not one of {SOURCES}")
    try:
        canonical = str(uuid.UUID(meta["episode_id"]))
    except ValueError:
        raise EpisodeValidationError("episode_id", f"{meta['episode_id'][:80]!r} is not a UUID") from None
    if meta["episode_id"] != canonical:  # one spelling per id: the idempotency key and the store's index compare text
        raise EpisodeValidationError("episode_id", f"{meta['episode_id'][:80]!r} is not in the canonical form: send {canonical!r} (lowercase, 8-4-4-4-12)")
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise EpisodeValidationError(str(key)[:80], "metadata keys and values must be strings")
        try:
            key.encode("utf-8"), value.encode("utf-8")
        except UnicodeEncodeError:
            raise EpisodeValidationError(key.encode("utf-8", "backslashreplace").decode()[:80], "must be UTF-8 text (it holds a lone surrogate)") from None
        if key in PLAIN_TEXT_METADATA and not value.isprintable():
            raise EpisodeValidationError(key, "holds a control character; only printable text")
        if key in REQUIRED_METADATA or key.startswith(USER_METADATA_PREFIX):
            continue
        if key in V1_1_METADATA and meta["schema_version"] == SCHEMA_VERSION:
            raise EpisodeValidationError(key, f"unknown metadata key in schema {SCHEMA_VERSION}; it is a schema 1.1 key: set schema_version to '1.1'")
        if key not in OPTIONAL_METADATA + V1_1_METADATA:
            raise EpisodeValidationError(
                key, f"unknown metadata key; allowed: {REQUIRED_METADATA + OPTIONAL_METADATA + V1_1_METADATA} or '{USER_METADATA_PREFIX}*'"
            )
        if key in JSON_METADATA:
            try:
                loads_bounded(value, key)
            except EpisodeValidationError as exc:
                raise EpisodeValidationError(key, f"must be a JSON string: {exc.reason}") from None


def _validate(arrays: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> None:
    """The whole record: metadata, arrays, then the 1.1 fields that refer to arrays."""
    validate_metadata(meta)
    _validate_arrays(arrays, meta["schema_version"])
    if meta["schema_version"] == SCHEMA_VERSION_1_1:
        _validate_v1_1(arrays, meta)


def _is_camera_clock(name: str) -> bool:
    return name.startswith(IMAGE_PREFIX) and name.endswith(CAMERA_TIMESTAMP_SUFFIX) and len(name) > len(IMAGE_PREFIX) + len(CAMERA_TIMESTAMP_SUFFIX)


def camera_clocks(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{"image.NAME": timestamps} of every camera with its own clock (schema 1.1 ``image.NAME.timestamp``)."""
    return {name[: -len(CAMERA_TIMESTAMP_SUFFIX)]: arr for name, arr in arrays.items() if _is_camera_clock(name)}


def _validate_arrays(arrays: Mapping[str, np.ndarray], version: str = SCHEMA_VERSION) -> None:
    for name in REQUIRED_ARRAYS:
        if name not in arrays:
            raise EpisodeValidationError(name, "missing required array")
    num_steps = None
    for name, (dtype, ndim, _) in REQUIRED_ARRAYS.items():
        arr = arrays[name]
        if not isinstance(arr, np.ndarray):
            raise EpisodeValidationError(name, f"must be a numpy array, got {type(arr).__name__}")
        if arr.dtype != dtype:
            raise EpisodeValidationError(name, f"expected dtype {dtype}, got {arr.dtype}")
        if arr.ndim != ndim:
            raise EpisodeValidationError(name, f"expected {ndim} dimensions, got shape {arr.shape}")
    num_steps = arrays["action"].shape[0]
    if num_steps < 1:
        raise EpisodeValidationError("action", "an episode needs at least one step")
    lengths = {"T": num_steps, "T+1": num_steps + 1}
    for name, (_, _, length) in REQUIRED_ARRAYS.items():
        if arrays[name].shape[0] != lengths[length]:
            raise EpisodeValidationError(
                name, f"leading axis is {arrays[name].shape[0]}, expected {length} = {lengths[length]} (T from action)"
            )
    for name in ("observation", "action"):
        if arrays[name].shape[1] < 1:
            raise EpisodeValidationError(name, f"needs at least one feature, got shape {arrays[name].shape}")
    clocks = camera_clocks(arrays) if version == SCHEMA_VERSION_1_1 else {}
    for name, arr in arrays.items():
        if name in REQUIRED_ARRAYS:
            continue
        if version == SCHEMA_VERSION_1_1 and _is_camera_clock(name):
            _check_camera_clock(name, arr, arrays)
            continue
        if not (name in OPTIONAL_ARRAYS or (name.startswith(IMAGE_PREFIX) and len(name) > len(IMAGE_PREFIX))):
            raise EpisodeValidationError(
                name, f"unknown array; allowed: {list(REQUIRED_ARRAYS)} + {list(OPTIONAL_ARRAYS)} + '{IMAGE_PREFIX}NAME'"
            )
        expected = OPTIONAL_ARRAYS.get(name, np.dtype(np.uint8))
        if arr.dtype != expected:
            raise EpisodeValidationError(name, f"expected dtype {expected}, got {arr.dtype}")
        if name in clocks:
            if arr.ndim < 1 or arr.shape[0] != clocks[name].shape[0]:
                raise EpisodeValidationError(
                    name, f"leading axis must be the {clocks[name].shape[0]} frames of {name}{CAMERA_TIMESTAMP_SUFFIX}, got shape {arr.shape}"
                )
        elif arr.ndim < 1 or arr.shape[0] not in (num_steps, num_steps + 1):
            raise EpisodeValidationError(name, f"leading axis must be T={num_steps} or T+1={num_steps + 1}, got shape {arr.shape}")
        if 0 in arr.shape[1:]:  # rows of no values: nothing to store (Minari's writer crashed the process on one)
            raise EpisodeValidationError(name, f"has no values in its rows (shape {arr.shape}); leave the array out instead")
    for name, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))[0].tolist()
            raise EpisodeValidationError(name, f"contains NaN or Inf (first at index {bad})")
    for name in ("timestamp", *(f"{c}{CAMERA_TIMESTAMP_SUFFIX}" for c in clocks)):
        if not (np.diff(arrays[name]) > 0).all():
            step = int(np.argmax(~(np.diff(arrays[name]) > 0)))
            raise EpisodeValidationError(name, f"must be strictly increasing; not at step {step} -> {step + 1}")
    start, end = arrays["timestamp"][0], arrays["timestamp"][-1]
    for camera, clock in clocks.items():
        if clock[0] < start or clock[-1] > end:
            raise EpisodeValidationError(
                f"{camera}{CAMERA_TIMESTAMP_SUFFIX}", f"frames from {clock[0]!r} to {clock[-1]!r} s lie outside the episode's time span [{start!r}, {end!r}] s"
            )
    for name in ("terminated", "truncated"):
        if arrays[name][:-1].any():
            step = int(np.argmax(arrays[name][:-1]))
            raise EpisodeValidationError(name, f"set at step {step} before the last step {num_steps - 1}; an episode ends there")


# -- schema 1.1 ---------------------------------------------------------------------------
def _check_camera_clock(name: str, clock: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
    camera = name[: -len(CAMERA_TIMESTAMP_SUFFIX)]
    if camera not in arrays:
        raise EpisodeValidationError(name, f"timestamps of camera {camera!r}, but the episode has no array {camera!r}")
    if clock.dtype != np.float64:
        raise EpisodeValidationError(name, f"expected dtype float64, got {clock.dtype}")
    if clock.ndim != 1 or clock.shape[0] < 1:
        raise EpisodeValidationError(name, f"expected 1 dimensions, got shape {clock.shape} (and at least one frame)")


def _median_step(timestamps: np.ndarray) -> float | None:
    return float(np.median(np.diff(timestamps))) if timestamps.shape[0] >= 2 else None


def _check_rate(field: str, rate: float, timestamps: np.ndarray, what: str) -> None:
    """``rate`` (Hz) must be within RATE_TOLERANCE of 1 / the median step of ``timestamps``."""
    step = _median_step(timestamps)
    if step is not None and abs(rate * step - 1.0) > RATE_TOLERANCE:
        raise EpisodeValidationError(
            field, f"{rate!r} Hz disagrees with the {what}: median step {step:.6g} s is {1.0 / step:.6g} Hz (tolerance {RATE_TOLERANCE:.0%})"
        )


def _bounded_json(meta: Mapping[str, str], key: str):
    if len(meta[key].encode("utf-8", "surrogatepass")) > MAX_V1_1_JSON_BYTES:
        raise EpisodeValidationError(key, f"longer than {MAX_V1_1_JSON_BYTES} bytes")
    try:
        value = loads_bounded(meta[key], key)
    except EpisodeValidationError as exc:
        raise EpisodeValidationError(key, f"must be a JSON string: {exc.reason}") from None
    if not isinstance(value, dict) or not value:
        raise EpisodeValidationError(key, "must be a non-empty JSON object")
    return value


def control_rate_hz(text: str) -> float:
    """The value of ``control_rate_hz`` metadata: decimal text (``30``, ``29.97``, ``1e3``) of a rate in (0, 1e6] Hz."""
    if not _DECIMAL.fullmatch(text):
        raise EpisodeValidationError("control_rate_hz", f"{text[:40]!r} is not a decimal number like '30' or '29.97'")
    rate = float(text)
    if not 0 < rate <= MAX_RATE_HZ:
        raise EpisodeValidationError("control_rate_hz", f"{text!r} must be a rate in (0, {MAX_RATE_HZ:g}] Hz")
    return rate


def _check_task(text: str) -> None:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise EpisodeValidationError("task", "must be UTF-8 text (it holds a lone surrogate)") from None
    if not text.strip():
        raise EpisodeValidationError("task", "must not be empty or only whitespace")
    if size > MAX_TASK_BYTES:
        raise EpisodeValidationError("task", f"is {size} bytes of UTF-8; at most {MAX_TASK_BYTES}")
    bad = next((c for c in text if not c.isprintable() and c not in "\n\t"), None)
    if bad is not None:
        raise EpisodeValidationError("task", f"holds control character {bad!r}; only printable text, newlines and tabs")


def _check_names(names: dict, arrays: Mapping[str, np.ndarray]) -> None:
    for array, labels in names.items():
        field = f"names.{str(array)[:60]}"
        if array not in arrays:
            raise EpisodeValidationError(field, f"names an array the episode does not have; it has {sorted(arrays)}")
        shape = arrays[array].shape
        if len(shape) != 2 or _is_camera_clock(array):
            raise EpisodeValidationError(field, f"names label the feature axis of 2-D arrays; {array!r} has shape {shape}")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise EpisodeValidationError(field, "must be a list of strings")
        if len(labels) != shape[1]:
            raise EpisodeValidationError(field, f"has {len(labels)} names for {shape[1]} features ({array} shape {shape})")
        for label in labels:
            if not 0 < len(label) <= MAX_NAME_CHARS or not label.isprintable():
                raise EpisodeValidationError(field, f"{label[:40]!r} is not a name: 1-{MAX_NAME_CHARS} printable characters")
        if len(set(labels)) != len(labels):
            raise EpisodeValidationError(field, "holds a name twice; names must be unique per array")


def _check_cameras(cameras: dict, arrays: Mapping[str, np.ndarray]) -> None:
    clocks = camera_clocks(arrays)
    for camera, spec in cameras.items():
        field, array = f"cameras.{str(camera)[:60]}", f"{IMAGE_PREFIX}{camera}"
        if array not in arrays or _is_camera_clock(array):
            raise EpisodeValidationError(field, f"describes camera {camera!r}, which has no array {array!r} in the episode")
        if not isinstance(spec, dict) or not {"codec", "width", "height"} <= set(spec) <= {"codec", "width", "height", "rate_hz"}:
            raise EpisodeValidationError(field, "must be an object with codec, width, height and optionally rate_hz")
        codec = spec["codec"]
        if not isinstance(codec, str) or codec not in CAMERA_CODECS:
            raise EpisodeValidationError(
                field, f"codec {str(codec)[:40]!r} is not one of {sorted(CAMERA_CODECS)} (encoded streams such as h264/av1 are not in schema 1.1)"
            )
        for key in ("width", "height"):
            if type(spec[key]) is not int or spec[key] < 1:
                raise EpisodeValidationError(field, f"{key} must be a positive integer")
        expected = (spec["height"], spec["width"], CAMERA_CODECS[codec])
        if arrays[array].shape[1:] != expected:
            raise EpisodeValidationError(
                field, f"{codec} frames of {spec['width']}x{spec['height']} are (N, {', '.join(map(str, expected))}); {array} has shape {arrays[array].shape}"
            )
        if "rate_hz" in spec:
            rate = spec["rate_hz"]
            if type(rate) not in (int, float) or not 0 < rate <= MAX_RATE_HZ:
                raise EpisodeValidationError(field, f"rate_hz must be a number in (0, {MAX_RATE_HZ:g}]")
            timestamps = clocks.get(array, arrays["timestamp"])
            _check_rate(field, float(rate), timestamps, f"{array}{CAMERA_TIMESTAMP_SUFFIX}" if array in clocks else "control timestamps")


def _validate_v1_1(arrays: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> None:
    """Schema 1.1 metadata, each optional: task, control_rate_hz, names, cameras (docs/protocol.md)."""
    if "task" in meta:
        _check_task(meta["task"])
    if "control_rate_hz" in meta:
        _check_rate("control_rate_hz", control_rate_hz(meta["control_rate_hz"]), arrays["timestamp"], "timestamps")
    if "names" in meta:
        _check_names(_bounded_json(meta, "names"), arrays)
    if "cameras" in meta:
        _check_cameras(_bounded_json(meta, "cameras"), arrays)
