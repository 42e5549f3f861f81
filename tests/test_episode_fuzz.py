"""Property-based: any bytes a client can send give a valid Episode or an EpisodeValidationError,
never another exception (hypothesis over raw bytes, over arbitrary JSON headers, and over
single-byte corruptions of a valid file)."""

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.episode import Episode, EpisodeValidationError
from tests.conftest import make_episode_arrays

VALID = Episode.create(**make_episode_arrays(num_steps=4, seed=1), robot_id="r0", robot_model="toy", source="sim").to_bytes()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=30,
)
tensor_entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F64", "I64", "BOOL", "U8", "X"]) | json_values,
     "shape": st.lists(st.integers(min_value=-2, max_value=2**64), max_size=10),
     "data_offsets": st.lists(st.integers(min_value=-2, max_value=2**64), max_size=3)}  # fmt: skip
)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])  # deterministic: the same cases every run


def parses_or_refuses(data: bytes) -> None:
    try:
        Episode.from_bytes(data)
    except EpisodeValidationError as exc:
        assert isinstance(exc.field, str) and exc.reason  # the field may be a tensor's name, "" included
    # any other exception fails the test


@FUZZ
@given(st.binary(max_size=512))
def test_any_bytes(data):
    parses_or_refuses(data)


@FUZZ
@given(st.dictionaries(st.text(max_size=10), json_values | tensor_entries, max_size=5), st.binary(max_size=64))
def test_any_json_header(header, body):
    text = json.dumps(header).encode()
    parses_or_refuses(struct.pack("<Q", len(text)) + text + body)


@FUZZ
@given(st.integers(min_value=0, max_value=len(VALID) - 1), st.integers(min_value=0, max_value=255))
def test_any_single_byte_corruption_of_a_valid_file(position, value):
    data = bytearray(VALID)
    data[position] = value
    parses_or_refuses(bytes(data))


@pytest.mark.parametrize("nesting", [33, 1_000, 200_000])
def test_deep_nesting_is_refused_not_a_recursion_error(nesting):
    text = b"[" * nesting + b"]" * nesting
    with pytest.raises(EpisodeValidationError, match="nested deeper"):
        Episode.from_bytes(struct.pack("<Q", len(text)) + text)
