"""The streaming JSON value counter and the body parser (:mod:`kiapi.http.jsonbody`)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiapi.http import sliced_json
from kiapi.http.jsonbody import ValueCounter, parse
from kiapi.runtime.errors import PayloadTooLarge, RequestInvalid

# Strings full of what makes string-skipping hard: quotes, backslashes, commas, brackets.
tricky_text = st.text(alphabet=st.sampled_from('ab,[]{}"\\\n\u00e9\U0001f600:'), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | tricky_text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(tricky_text, inner, max_size=5),
    max_leaves=40,
)


def true_count(value) -> tuple[int, int]:
    """(values, empty containers) of a parsed JSON value (keys are not values)."""
    if isinstance(value, list):
        counts = [true_count(v) for v in value]
        return 1 + sum(c[0] for c in counts), (not value) + sum(c[1] for c in counts)
    if isinstance(value, dict):
        counts = [true_count(v) for v in value.values()]
        return 1 + sum(c[0] for c in counts), (not value) + sum(c[1] for c in counts)
    return 1, 0


def counted(raw: bytes, cuts: list[int]) -> int:
    counter = ValueCounter(limit=10**9)
    start = 0
    for cut in sorted(c % (len(raw) + 1) for c in cuts):
        counter.feed(raw[start:cut])
        start = max(start, cut)
    counter.feed(raw[start:])
    return counter.values


@settings(max_examples=300, derandomize=True)
@given(json_values, st.lists(st.integers(min_value=0), max_size=8), st.booleans())
def test_the_count_is_exact_up_to_empty_containers_however_the_body_is_cut(value, cuts, ascii):
    raw = json.dumps(value, ensure_ascii=ascii).encode()
    values, empties = true_count(value)
    count = counted(raw, cuts)
    assert values <= count <= values + empties
    assert count == counted(raw, [])  # chunking never changes the count


@pytest.mark.parametrize("cut", range(1, 9))
def test_a_chunk_may_end_inside_an_escape(cut):
    raw = b'["a\\\\",[1,2],"\\"x,\\u00e9"]'
    assert counted(raw, [cut, cut + 1]) == counted(raw, []) == 6  # list, "a\\", [1, 2], "\"x,é"


def test_escaped_quotes_in_an_open_string_are_skipped_in_one_pass():
    # a pattern that retried at every escaped quote was quadratic on this chunk
    counter = ValueCounter()
    counter.feed(b'["' + b'\\",' * 200_000)
    assert counter.values == 2
    counter.feed(b'", 1]')
    assert counter.values == 3


def test_more_values_than_the_limit_is_413():
    counter = ValueCounter(limit=10)
    with pytest.raises(PayloadTooLarge, match="more than 10 values"):
        counter.feed(json.dumps(list(range(20))).encode())


@pytest.mark.parametrize(
    "raw", [b'{"n": ' + b"9" * 5000 + b"}", b"[NaN]", b"[Infinity]", b'"\xff"', b"[" * 100_000]
)
def test_what_python_cannot_hold_is_422(raw):
    with pytest.raises(RequestInvalid):
        parse(raw)


# -- the sliced parser: json.loads's values and errors, a bounded slice per C call ----------
def _both(text: str, slice_chars: int):
    try:
        expected = ("ok", json.loads(text))
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        expected = ("error", type(exc))
    try:
        got = ("ok", sliced_json.loads(text, slice_chars=slice_chars))
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        got = ("error", type(exc))
    return expected, got


@settings(max_examples=400, derandomize=True)
@given(
    json_values,
    st.sampled_from([8, 9, 13, 64]),
    st.sampled_from([None, 0, 1]),
    st.booleans(),
)
def test_sliced_parse_equals_json_loads(value, slice_chars, indent, ascii):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii)
    assert sliced_json.loads(text, slice_chars=slice_chars) == json.loads(text)


@settings(max_examples=400, derandomize=True)
@given(
    st.text(alphabet=st.sampled_from('[]{}",:\\ 0123456789.eE-+tfnulrasNI\nu'), max_size=30),
    st.sampled_from([8, 11]),
)
def test_sliced_parse_accepts_and_refuses_what_json_loads_does(text, slice_chars):
    expected, got = _both(text, slice_chars)
    assert got[0] == expected[0], (text, expected, got)
    if got[0] == "ok":
        assert got == expected


@pytest.mark.parametrize("shift", range(14))
def test_escapes_and_surrogate_pairs_cut_at_any_place_decode_whole(shift):
    text = json.dumps(["x" * shift + '\U0001f600\\"\n\u00e9' * 5 + "\\\\" * 7])
    assert sliced_json.loads(text, slice_chars=8) == json.loads(text)


def test_long_strings_whitespace_and_escape_runs():
    text = "[" + " " * 100 + json.dumps("a" * 300 + "\\" * 41 + '"' * 9) + "\n" * 50 + "]"
    assert sliced_json.loads(text, slice_chars=16) == json.loads(text)
    # pieces growing from FIRST_PIECE_CHARS to the slice, escapes and pairs across their cuts
    text = json.dumps({"k": ("\U0001f600 \\" + "x" * 97) * 300, "z": "\n" * 5000})
    assert sliced_json.loads(text, slice_chars=4096) == json.loads(text)


def test_sliced_errors_keep_the_position():
    text = '{"a": [1, 2,, 3]}'
    with pytest.raises(json.JSONDecodeError) as exc:
        sliced_json.loads(text, slice_chars=8)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    assert (exc.value.pos, exc.value.msg) == (expected.value.pos, expected.value.msg)


def test_numbers_nesting_and_constants_are_bounded():
    with pytest.raises(ValueError, match="more than 4400 characters"):
        sliced_json.loads("[" + "1" * 5000 + "]")
    with pytest.raises(RecursionError):
        sliced_json.loads("[" * 2000 + "]" * 2000)
    with pytest.raises(RequestInvalid):
        parse(b"[NaN]" + b" " * (2 * 1024 * 1024))  # a big body: the sliced parser


def test_big_bodies_parse_as_small_ones_do():
    value = {"input": ["word " * 50_000 + "\u00e9\U0001f600"] * 8, "n": [1.5, -2, None, True]}
    raw = json.dumps(value, ensure_ascii=False).encode()
    assert len(raw) > 1024 * 1024  # the sliced path
    assert parse(raw) == value
    assert parse(b"\xef\xbb\xbf" + raw) == value  # a UTF-8 BOM, as json.loads takes it
    assert parse(json.dumps(value).encode("utf-16")) == value
