"""The Episode record: round trip, canonical bytes, and one rejection per kind of bad record."""

import json
import struct
import uuid

import numpy as np
import pytest

from sim.episode import Episode, EpisodeValidationError, encode_safetensors, parse_safetensors
from tests.conftest import make_episode_arrays

META = {"robot_id": "robot-1", "robot_model": "ant", "source": "real", "policy_version": "v3"}


def make(**overrides) -> Episode:
    arrays = make_episode_arrays()
    arrays.update({k: v for k, v in overrides.items() if k in arrays})
    meta = {**META, **{k: v for k, v in overrides.items() if k not in arrays}}
    return Episode.create(**arrays, **meta)


def raw(arrays_overrides=None, meta_overrides=None, drop=()) -> tuple[dict, dict]:
    ep = make()
    arrays = {**ep.arrays(), **(arrays_overrides or {})}
    meta = {**ep.metadata, **(meta_overrides or {})}
    for key in drop:
        arrays.pop(key, None)
        meta.pop(key, None)
    return arrays, meta


def test_round_trip_is_bit_exact_and_bytes_are_canonical():
    ep = make(hardware={"motor": "x"}, extras={"qpos": np.ones((6, 4))})
    data = ep.to_bytes()
    back = Episode.from_bytes(data)
    assert back.equals(ep)
    assert back.json_metadata("hardware") == {"motor": "x"}
    assert back.extras["qpos"].dtype == np.float32
    # the same episode built with metadata in another order gives the same bytes
    shuffled = Episode(**{k: getattr(ep, k) for k in ep.arrays() if k != "qpos"}, metadata=dict(reversed(ep.metadata.items())), extras=ep.extras)
    assert shuffled.to_bytes() == data


def test_readable_by_the_safetensors_library(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "ep.safetensors"
    path.write_bytes(make().to_bytes())
    with safe_open(str(path), "np") as f:
        assert f.metadata()["robot_id"] == "robot-1"
        assert f.get_tensor("action").shape == (5, 2)


@pytest.mark.parametrize(
    "arrays_overrides, meta_overrides, drop, field, words",
    [
        (None, None, ("reward",), "reward", "missing required array"),
        ({"extra_thing": np.zeros(5, np.float32)}, None, (), "extra_thing", "unknown array"),
        ({"reward": np.zeros(5, np.float64)}, None, (), "reward", "expected dtype float32"),
        ({"action": np.zeros(10, np.float32)}, None, (), "action", "expected 2 dimensions"),
        ({"observation": np.zeros((5, 3), np.float32)}, None, (), "observation", "expected T+1"),
        ({"reward": np.array([0, np.nan, 0, 0, 0], np.float32)}, None, (), "reward", "NaN or Inf"),
        ({"observation": np.full((6, 3), np.inf, np.float32)}, None, (), "observation", "NaN or Inf"),
        ({"timestamp": np.array([0, 1, 1, 2, 3, 4], np.float64)}, None, (), "timestamp", "strictly increasing"),
        ({"terminated": np.array([1, 0, 0, 0, 1], bool)}, None, (), "terminated", "before the last step"),
        ({"terminated": np.array([0, 0, 0, 1, 0], bool)}, None, (), "terminated", "before the last step"),  # one step early: once taken
        ({"truncated": np.array([0, 0, 0, 1, 0], bool)}, None, (), "truncated", "before the last step"),
        ({"qpos": np.zeros((3, 2), np.float32)}, None, (), "qpos", "leading axis"),
        ({"qpos": np.zeros((6, 0), np.float32)}, None, (), "qpos", "has no values in its rows"),  # once stored; its Minari export crashed the process
        ({"image.front": np.zeros((5, 4, 4, 3), np.float32)}, None, (), "image.front", "expected dtype uint8"),
        (None, {"schema_version": "2"}, (), "schema_version", "unknown schema version"),
        (None, {"source": "dream"}, (), "source", "is not one of"),
        (None, {"episode_id": "not-a-uuid"}, (), "episode_id", "not a UUID"),
        (None, None, ("robot_id",), "robot_id", "missing required metadata"),
        (None, {"colour": "red"}, (), "colour", "unknown metadata key"),
        (None, {"hardware": "{not json"}, (), "hardware", "JSON"),
        (None, {"robot_id": ""}, (), "robot_id", "non-empty"),
    ],
)
def test_bad_records_are_rejected_naming_the_field(arrays_overrides, meta_overrides, drop, field, words):
    arrays, meta = raw(arrays_overrides, meta_overrides, drop)
    with pytest.raises(EpisodeValidationError) as err:
        Episode.from_bytes(encode_safetensors(arrays, meta))
    assert err.value.field == field
    assert words in str(err.value)


def test_create_rejects_zero_steps():
    arrays = make_episode_arrays()
    arrays.update(action=np.zeros((0, 2)), reward=np.zeros(0), terminated=np.zeros(0, bool), truncated=np.zeros(0, bool))
    arrays.update(observation=np.zeros((1, 3)), timestamp=np.zeros(1))
    with pytest.raises(EpisodeValidationError, match="at least one step"):
        Episode.create(**arrays, **META)


def test_extension_metadata_and_user_keys_are_kept():
    ep = make(**{"x.site": "lab-2", "model_version": "wm-abc"})
    assert Episode.from_bytes(ep.to_bytes()).metadata["x.site"] == "lab-2"


def _header(header: dict, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize(
    "data, field, words",
    [
        (b"abc", "<file>", "not a safetensors file"),
        (struct.pack("<Q", 10**9) + b"{}", "<header>", "exceeds"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "<header>", "not valid JSON"),
        (_header([1, 2]), "<header>", "JSON object"),
        (_header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "a", "does not match"),
        (_header({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "a", "unsupported dtype"),
        (_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "<file>", "trailing bytes"),
        (
            _header(
                {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                b"\0" * 8,
            ),
            "b",
            "overlaps",
        ),
        (_header({"__metadata__": {"a": 1}}), "<metadata>", "strings to strings"),
        (_header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "a", "bad shape"),
    ],
)
def test_malformed_files_are_rejected_before_use(data, field, words):
    with pytest.raises(EpisodeValidationError) as err:
        parse_safetensors(data)
    assert err.value.field == field
    assert words in str(err.value)


def test_truncated_file_is_rejected():
    data = make().to_bytes()
    with pytest.raises(EpisodeValidationError, match="does not match|trailing|exceeds"):
        Episode.from_bytes(data[:-7])


def test_episode_ids_default_to_fresh_uuids():
    a, b = make(), make()
    assert a.episode_id != b.episode_id
    uuid.UUID(a.episode_id)


@pytest.mark.parametrize("episode_id", ["00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"])
def test_a_new_episode_is_not_made_under_the_nil_or_the_max_uuid_yet_one_stored_before_still_reads(episode_id):
    with pytest.raises(EpisodeValidationError, match="unique across the whole fleet") as refused:
        make(episode_id=episode_id)
    assert refused.value.field == "episode_id"
    stored = Episode(**make_episode_arrays(), metadata={**make().metadata, "episode_id": episode_id})
    assert Episode.from_bytes(stored.to_bytes()).equals(stored)  # a record stored before the rule reads and re-encodes
    make(episode_id=str(uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, "robots/arm-01"), "7")))  # a uuid5 of the robot's own is fine


def test_a_header_over_the_limit_is_told_apart_from_a_truncated_body():
    """A 1.9 MB calibration value was once refused as "declared header length ... exceeds the body", which the body did hold."""
    from fleet.server.errors import from_validation

    big = (2 << 20) + 8
    with pytest.raises(EpisodeValidationError, match="header too large") as held:
        parse_safetensors(struct.pack("<Q", big) + b" " * big)
    assert from_validation(held.value).error == "bad_header"
    with pytest.raises(EpisodeValidationError, match="exceeds the body") as cut:
        parse_safetensors(struct.pack("<Q", 64) + b"{}")
    assert from_validation(cut.value).error == "not_safetensors"


def test_the_schema_1_tables_of_protocol_md_are_the_validators():
    """docs/protocol.md, "Episode schema 1": a client is written from it alone (a probe guessed float64 rewards and float32
    timestamps from docs that never said), so every array and key the validator knows is there, with its dtype, rank and
    leading length, nothing else is, and the example header is what the canonical encoding writes."""
    import re
    from pathlib import Path

    from sim import episode as schema

    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    section = doc.split("\n## Episode schema 1\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| `")]
    arrays = {name: row for row in rows if len(row) == 5 for name in re.findall(r"`([^`]+)`", row[0])}
    keys = {name: row for row in rows if len(row) == 3 for name in re.findall(r"`([^`]+)`", row[0])}
    dtype_names = {np.dtype(v): k for k, v in schema._SAFETENSORS_DTYPES.items()}

    for name, (dtype, ndim, length) in schema.REQUIRED_ARRAYS.items():
        _, documented, shape, required, _ = arrays[name]
        axes = [a for a in shape.strip("()").split(",") if a.strip()]
        assert (documented, len(axes), axes[0], required) == (f"`{dtype_names[dtype]}`", ndim, length, "required"), name
    for name, dtype in {**schema.OPTIONAL_ARRAYS, f"{schema.IMAGE_PREFIX}NAME": np.dtype(np.uint8)}.items():
        _, documented, shape, required, _ = arrays[name]
        assert (documented, shape.startswith("(T or T+1"), required) == (f"`{dtype_names[dtype]}`", True, "optional"), name
    assert set(arrays) == {*schema.REQUIRED_ARRAYS, *schema.OPTIONAL_ARRAYS, f"{schema.IMAGE_PREFIX}NAME"}

    assert {k for k, row in keys.items() if row[1] == "required"} == set(schema.REQUIRED_METADATA)
    assert {k for k, row in keys.items() if row[1] == "optional"} == {*schema.OPTIONAL_METADATA, f"{schema.USER_METADATA_PREFIX}NAME"}
    assert {k for k, row in keys.items() if row[1] == "schema 1.1"} == set(schema.V1_1_METADATA)
    assert set(re.findall(r"`([^`]+)`", keys["source"][2])) == set(schema.SOURCES)
    for key in (*schema.JSON_METADATA, *schema.PLAIN_TEXT_METADATA):
        assert ("JSON text" if key in schema.JSON_METADATA else "printable text") in keys[key][2], key

    example = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))
    meta = example["__metadata__"]
    ep = Episode.create(
        **make_episode_arrays(num_steps=2, obs_dim=2, act_dim=1), robot_id=meta["robot_id"], robot_model=meta["robot_model"],
        source=meta["source"], policy_version=meta["policy_version"], episode_id=meta["episode_id"],
    )  # fmt: skip
    data = ep.to_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert json.loads(data[8 : 8 + length]) == example


def test_a_cast_to_the_schema_that_would_change_what_was_measured_is_refused_naming_the_field():
    """The recorder, Episode.create and the importers cast to the schema's dtypes silently: int64 encoder ticks over 2^24
    moved by up to a tick, a finite float64 over float32's range became inf and was refused as "NaN or Inf", an
    intervention flag of 2 became True. An ordinary float64 reading still narrows to float32 (the schema's precision)."""
    import re

    from fleet.agent.recorder import EpisodeRecorder

    base = make_episode_arrays(num_steps=3, obs_dim=2, act_dim=1)
    meta = {"robot_id": "r", "robot_model": "m", "source": "real"}
    ticks = np.full((4, 2), 1 << 24, np.int64)
    assert Episode.create(**{**base, "observation": ticks}, **meta).observation[0, 0] == 1 << 24  # exact up to 2^24
    with pytest.raises(EpisodeValidationError, match=re.escape("'observation': holds the integer 16777217, which float32 cannot hold exactly")):
        Episode.create(**{**base, "observation": ticks + 1}, **meta)
    far = base["observation"].astype(np.float64)
    far[2, 1] = 1e39
    with pytest.raises(EpisodeValidationError, match=r"'observation': holds 1e\+39, beyond float32's range .* at index \[2, 1\]: rescale it"):
        Episode.create(**{**base, "observation": far}, **meta)
    with pytest.raises(EpisodeValidationError, match=r"'intervention': is a flag, true or false, but holds 2"):
        Episode.create(**base, **meta, extras={"intervention": np.array([0, 2, 1, 0])})
    fine = Episode.create(**{**base, "observation": base["observation"].astype(np.float64) * 1e3}, **meta, extras={"intervention": np.array([0, 1, 1, 0])})
    assert fine.observation.dtype == np.float32 and fine.extras["intervention"].dtype == np.bool_
    recorder = EpisodeRecorder(robot_id="r", robot_model="m")
    with pytest.raises(TypeError, match="observation is a dict .*concatenate its fields"):
        recorder.reset({"joints": [0.0, 1.0], "gripper": 1.0}, 0.0)
    recorder.reset(np.array([30_000_000, 1], np.int64), 0.0)  # the recorder keeps what it is given: the check sees the ticks
    recorder.step(np.zeros(1), 0.0, np.array([30_000_001, 1], np.int64), False, True, 0.1)
    with pytest.raises(EpisodeValidationError, match="holds the integer 30000001"):
        recorder.finish()
    buffer = np.zeros(2)  # a driver that updates one buffer in place: each step's reading as it was (all were the last one)
    recorder.reset(buffer, 0.0)
    for t in range(1, 4):
        buffer[:] = t
        recorder.step(np.zeros(1), 0.0, buffer, t == 3, False, 0.1 * t)
    assert recorder.finish().observation[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    exact = Episode.create(**{**base, "observation": np.full((4, 2), 1 << 25, np.int64)}, **meta)  # 2^25 is a float32: taken
    assert exact.observation[0, 0] == 1 << 25
