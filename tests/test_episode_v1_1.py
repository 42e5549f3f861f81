"""Episode schema 1.1: names, control rate, task, cameras with their own clock; schema 1 unchanged."""

import json

import numpy as np
import pytest

from sim.episode import Episode, EpisodeValidationError
from tests.conftest import make_episode_arrays, tampered_bytes

META = {"robot_id": "robot-1", "robot_model": "arm", "source": "real", "policy_version": "v3"}
NAMES = {"observation": ["shoulder", "elbow", "wrist"], "action": ["shoulder_cmd", "elbow_cmd"]}


def camera(frames: int = 3, rate_hz: float = 10.0, h: int = 4, w: int = 6) -> dict:
    """A wrist camera at 10 Hz beside 20 Hz control (T = 5 steps, 0 .. 0.25 s)."""
    rng = np.random.default_rng(1)
    return {
        "image.wrist": rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8),
        "image.wrist.timestamp": np.arange(frames, dtype=np.float64) / rate_hz,
    }


def make_v1_1(extras=None, **meta) -> Episode:
    """A valid 1.1 episode with every new field (overridable)."""
    fields = {"names": NAMES, "control_rate_hz": "20", "task": "pick up the red cube ✓",
              "cameras": {"wrist": {"codec": "raw-rgb8", "width": 6, "height": 4, "rate_hz": 10}}}  # fmt: skip
    fields.update(meta)
    fields = {k: v for k, v in fields.items() if v is not None}
    return Episode.create(**make_episode_arrays(), **META, extras=camera() if extras is None else extras, **fields)


def test_a_full_1_1_record_round_trips_bit_exact():
    ep = make_v1_1()
    assert ep.metadata["schema_version"] == "1.1"
    back = Episode.from_bytes(ep.to_bytes())
    assert back.equals(ep) and back.to_bytes() == ep.to_bytes()
    assert back.json_metadata("names") == NAMES and back.metadata["task"] == "pick up the red cube ✓"
    assert back.extras["image.wrist"].shape == (3, 4, 6, 3)
    assert list(back.camera_clocks()) == ["image.wrist"]


def test_1_1_with_only_schema_1_content_and_schema_1_records_stay_valid():
    arrays = make_episode_arrays()
    plain = Episode.create(**arrays, **META)
    assert plain.metadata["schema_version"] == "1"
    only_v1 = Episode.create(**arrays, **META, schema_version="1.1", extras={"image.front": np.zeros((6, 2, 2, 3), np.uint8)})
    assert Episode.from_bytes(only_v1.to_bytes()).equals(only_v1)
    # in schema 1, image.X.timestamp is just another image, as before 1.1
    legacy = Episode.create(**arrays, **META, schema_version="1", extras={"image.a.timestamp": np.zeros((5, 2), np.uint8)})
    assert Episode.from_bytes(legacy.to_bytes()).metadata["schema_version"] == "1"


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"schema_version": "2"}, "schema_version", "this build reads '1' and '1.1'"),
        ({"names": "[1, 2"}, "names", "must be a JSON string"),
        ({"names": "[]"}, "names", "non-empty JSON object"),
        ({"names": json.dumps({"observation": ["a", "b"]})}, "names.observation", "2 names for 3 features"),
        ({"names": json.dumps({"observation": ["a", "a", "b"]})}, "names.observation", "unique"),
        ({"names": json.dumps({"observation": ["a", "", "b"]})}, "names.observation", "is not a name"),
        ({"names": json.dumps({"observation": [1, 2, 3]})}, "names.observation", "list of strings"),
        ({"names": json.dumps({"reward": ["r"]})}, "names.reward", "2-D arrays"),
        ({"names": json.dumps({"qpos": ["a"]})}, "names.qpos", "does not have"),
        ({"names": "[" * 40 + "]" * 40}, "names", "nested deeper"),
        ({"names": '{"observation": ["a", "b", "c"], "observation": ["d", "e", "f"]}'}, "names", "'observation' appears more than once"),
        ({"names": json.dumps({"observation": ["x" * 70000, "b", "c"]})}, "names", "longer than 65536 bytes"),
        ({"cameras": '{"wrist": {"codec": "raw-rgb8", "width": 6, "height": 4, "rate_hz": NaN}}'}, "cameras", "NaN is not a JSON number"),
        ({"names": '{"observation": ["a", "b", "c"], "scale": -Infinity}'}, "names", "-Infinity is not a JSON number"),
        ({"names": '{"observation": ["a", "b", "c"], "scale": -1e999}'}, "names", "-1e999 is past the range of a double"),
        ({"control_rate_hz": "fast"}, "control_rate_hz", "not a decimal number"),
        ({"control_rate_hz": "nan"}, "control_rate_hz", "not a decimal number"),
        ({"control_rate_hz": "0"}, "control_rate_hz", "must be a rate in"),
        ({"control_rate_hz": "1e9"}, "control_rate_hz", "must be a rate in"),
        ({"control_rate_hz": "30"}, "control_rate_hz", "disagrees with the timestamps"),
        ({"task": " \n"}, "task", "empty"),
        ({"task": "x" * 4097}, "task", "at most 4096"),
        ({"task": "go\x1b[2J"}, "task", "control character"),
        ({"task": "bad \ud800"}, "task", "UTF-8"),
        ({"cameras": json.dumps({"left": {"codec": "raw-rgb8", "width": 6, "height": 4}})}, "cameras.left", "no array 'image.left'"),
        ({"cameras": json.dumps({"wrist": {"codec": "h264", "width": 6, "height": 4}})}, "cameras.wrist", "h264/av1 are not in schema 1.1"),
        ({"cameras": json.dumps({"wrist": {"codec": "raw-rgb8", "width": 4, "height": 4}})}, "cameras.wrist", "has shape (3, 4, 6, 3)"),
        ({"cameras": json.dumps({"wrist": {"codec": "raw-gray8", "width": 6, "height": 4}})}, "cameras.wrist", "has shape"),
        ({"cameras": json.dumps({"wrist": {"codec": "raw-rgb8", "width": 6}})}, "cameras.wrist", "codec, width, height"),
        ({"cameras": json.dumps({"wrist": {"codec": "raw-rgb8", "width": 6, "height": True}})}, "cameras.wrist", "positive integer"),
        ({"cameras": json.dumps({"wrist": {"codec": "raw-rgb8", "width": 6, "height": 4, "rate_hz": 20}})}, "cameras.wrist", "disagrees"),
        ({"cameras": json.dumps({"wrist": {"codec": "raw-rgb8", "width": 6, "height": 4, "rate_hz": -1}})}, "cameras.wrist", "rate_hz must be"),
    ],
)
def test_bad_1_1_metadata_is_refused_naming_the_field(change, field, words):
    data = tampered_bytes(make_v1_1(), meta=change)
    with pytest.raises(EpisodeValidationError) as info:
        Episode.from_bytes(data)
    assert info.value.field == field and words in info.value.reason, info.value


def test_a_producer_cannot_write_nan_into_json_metadata():
    """Python's json writes NaN where standard JSON has none: the record is refused where it is made, naming the key."""
    arrays = {k: v for k, v in make_v1_1().arrays().items() if k in ("observation", "action", "reward", "terminated", "truncated", "timestamp")}
    with pytest.raises(EpisodeValidationError) as info:
        Episode.create(**arrays, **META, hardware={"gain": float("nan")})
    assert info.value.field == "hardware" and "NaN or Infinity" in info.value.reason
    with pytest.raises(EpisodeValidationError) as info:  # as JSON text: a number Python reads as inf
        Episode.create(**arrays, **META, hardware='{"gain": 1e999}')
    assert info.value.field == "hardware" and "1e999 is past the range of a double" in info.value.reason


@pytest.mark.parametrize(
    "arrays, drop, field, words",
    [
        ({"image.wrist.timestamp": np.array([0.0, 0.2, 0.1])}, (), "image.wrist.timestamp", "strictly increasing"),
        ({"image.wrist.timestamp": np.array([0.0, 0.1, 0.3])}, (), "image.wrist.timestamp", "outside the episode's time span"),
        ({"image.wrist.timestamp": np.array([-0.1, 0.1, 0.2])}, (), "image.wrist.timestamp", "outside the episode's time span"),
        ({"image.wrist.timestamp": np.array([0.0, np.nan, 0.2])}, (), "image.wrist.timestamp", "NaN"),
        ({"image.wrist.timestamp": np.array([0.0, 0.1, 0.2], np.float32)}, (), "image.wrist.timestamp", "expected dtype float64"),
        ({"image.wrist.timestamp": np.zeros((3, 1))}, (), "image.wrist.timestamp", "dimensions, got shape"),
        ({"image.wrist.timestamp": np.array([0.0, 0.1])}, (), "image.wrist", "the 2 frames of image.wrist.timestamp"),
        ({"image.back.timestamp": np.array([0.0])}, (), "image.back.timestamp", "no array 'image.back'"),
    ],
)
def test_bad_camera_clocks_are_refused_naming_the_array(arrays, drop, field, words):
    data = tampered_bytes(make_v1_1(cameras=None), arrays=arrays, drop=drop)
    with pytest.raises(EpisodeValidationError) as info:
        Episode.from_bytes(data)
    assert info.value.field == field and words in info.value.reason, info.value


def test_1_1_keys_in_a_schema_1_record_say_to_set_the_version():
    data = tampered_bytes(Episode.create(**make_episode_arrays(), **META), meta={"task": "pick"})
    with pytest.raises(EpisodeValidationError, match="set schema_version to '1.1'") as info:
        Episode.from_bytes(data)
    assert info.value.field == "task"


def test_rate_tolerance_and_cameras_faster_than_control():
    assert make_v1_1(control_rate_hz="21.5").metadata["control_rate_hz"] == "21.5"  # within 10 %
    fast = camera(frames=16, rate_hz=60.0)  # 60 Hz: more frames than control steps
    ep = make_v1_1(extras=fast, cameras={"wrist": {"codec": "raw-rgb8", "width": 6, "height": 4, "rate_hz": 60}})
    assert Episode.from_bytes(ep.to_bytes()).extras["image.wrist"].shape[0] == 16
    per_step = make_v1_1(extras={"image.top": np.zeros((6, 2, 2, 1), np.uint8)}, cameras={"top": {"codec": "raw-gray8", "width": 2, "height": 2, "rate_hz": 20.0}})
    assert per_step.camera_clocks() == {}


def _fuzz_settings():
    from hypothesis import HealthCheck, settings

    return settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


def test_any_1_1_field_value_gives_an_episode_or_a_schema_error():
    """Arbitrary JSON for names/cameras and arbitrary text for task/control_rate_hz: never another exception."""
    from hypothesis import given
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    likely = st.fixed_dictionaries({}, optional={"observation": st.lists(st.text(max_size=4), max_size=4), "wrist": st.dictionaries(
        st.sampled_from(["codec", "width", "height", "rate_hz", "x"]), st.sampled_from(["raw-rgb8", "h264", 6, 4, 10, -1, 1e308, True, None]))})  # fmt: skip
    base = make_v1_1()

    @_fuzz_settings()
    @given(key=st.sampled_from(["names", "cameras", "task", "control_rate_hz"]), value=values | likely, text=st.text(max_size=40))
    def check(key, value, text):
        field = text if key in ("task", "control_rate_hz") else json.dumps(value)
        try:
            Episode.from_bytes(tampered_bytes(base, meta={key: field}))
        except EpisodeValidationError as exc:
            assert exc.field.split(".")[0] == key

    check()
