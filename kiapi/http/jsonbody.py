"""Reading a JSON request body in time proportional to its bytes, never its structure.

* :class:`ValueCounter` counts the body's JSON values (outside strings: one per comma and per
  array or object) as its chunks arrive, on the event loop but a chunk at a time (a C regex
  skips each string), and refuses the body as soon as it holds more than ``MAX_JSON_VALUES``:
  what a schema check costs grows with the values, so the count is bounded before any parse.
* :func:`parse` turns the bytes into Python values; what the JSON text cannot mean in Python
  (integers past Python's digit limit, ``NaN``/``Infinity``, which are not JSON, invalid UTF-8,
  lone surrogates) is a :class:`RequestInvalid` naming where it is.
"""

from __future__ import annotations

import codecs
import json
import re
import typing as t

from kiapi.http import sliced_json
from kiapi.runtime.errors import PayloadTooLarge, RequestInvalid

MAX_JSON_VALUES = 100_000
"""Most values (numbers, strings, booleans, nulls, arrays, objects) one JSON body may hold."""

_STRING_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)  # a string's bytes to its quote
# A string from its opening quote: closed, or open to the chunk's end (group 1: b"\\" when the
# chunk ends on an escape's backslash, b"" otherwise). It always matches where it starts, so a
# scan is one linear pass whatever the chunk holds (no retry at every escaped quote).
_STRING_OR_OPEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|(\\?)\Z)', re.DOTALL)
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


class ValueCounter:
    """Counts the values of a JSON text fed to it chunk by chunk: an upper bound (one more
    than the true count per empty array or object; any count for invalid JSON).
    :meth:`feed` raises :class:`PayloadTooLarge` once it passes ``limit``.

    Each chunk costs a few C-level passes (its strings split out: at quotes when the chunk
    holds no backslash, else by a regex; ``bytes.count`` counts the separators in what is
    left), never a Python step per value: it runs on the event loop while the body arrives."""

    def __init__(self, limit: int = MAX_JSON_VALUES) -> None:
        self.limit = limit
        self.values = 1  # the top-level value
        self._in_string = False
        self._escaped = False  # a chunk ended on a backslash inside a string

    def feed(self, chunk: bytes) -> None:
        if b"\\" not in chunk and not self._escaped:
            # no escapes: quotes alone delimit strings (memchr-speed splits, the usual case)
            parts = chunk.split(b'"')
            outside = b"".join(parts[1::2] if self._in_string else parts[0::2])
            self._in_string ^= len(parts) % 2 == 0  # an odd number of quotes toggles
        else:
            pos = self._finish_string(chunk) if self._in_string else 0
            # [outside, tail?, outside, tail?, ..., outside]: split in C, no Python per value
            parts = _STRING_OR_OPEN.split(chunk[pos:] if pos else chunk)
            if len(parts) > 1 and parts[-2] is not None:  # the last string is still open
                self._in_string, self._escaped = True, parts[-2] == b"\\"
            outside = b"".join(parts[0::2])
        self.values += outside.count(b",") + outside.count(b"[") + outside.count(b"{")
        if self.values > self.limit:
            raise PayloadTooLarge(
                f"the JSON body holds more than {self.limit} values",
                hint=f"send at most {self.limit} JSON values per request (split the request)",
            )

    def _finish_string(self, chunk: bytes) -> int:
        """Skip the rest of an open string; where its closing quote ends (or the chunk)."""
        pos = 0
        end = len(chunk)
        if self._escaped and pos < end:
            self._escaped = False
            pos += 1
        if pos >= end:
            return end
        pos = _STRING_REST.match(chunk, pos).end()
        if pos == end:
            return end
        if chunk[pos] == 0x5C:  # a backslash as the chunk's last byte
            self._escaped = True
            return end
        self._in_string = False  # the closing quote
        return pos + 1


def _invalid(msg: str, loc: list[t.Any] | None = None) -> RequestInvalid:
    return RequestInvalid([{"loc": ["body", *(loc or [])], "msg": msg, "type": "json_invalid"}])


def _not_json(name: str) -> t.NoReturn:
    raise _invalid(f"{name} is not a JSON number")


SLICED_ABOVE_BYTES = 1024 * 1024
SLICED_ABOVE_VALUES = 10_000
"""Bodies larger than this, or holding more values, are decoded and parsed in slices
(:mod:`kiapi.http.sliced_json`): ``json.loads`` holds the GIL for the whole body, ~3 ms per MB
of text and ~1.5 us per number here, and the event loop waits that long."""

DECODE_SLICE_BYTES = 1024 * 1024


def parse(raw: bytes, encoding: str = "utf-8", values: int = 0) -> t.Any:
    """The parsed body, or :class:`RequestInvalid`. Runs on any thread; ``values``: the
    body's value count (:class:`ValueCounter`), which decides with its size how to parse."""
    try:
        if encoding.lower().replace("_", "-") == "utf-8":
            encoding = json.detect_encoding(raw)  # as json.loads does: BOMs, UTF-16/32
        if len(raw) <= SLICED_ABOVE_BYTES and values <= SLICED_ABOVE_VALUES:
            return json.loads(raw.decode(encoding), parse_constant=_not_json)
        return sliced_json.loads(_decode_sliced(raw, encoding), parse_constant=_not_json)
    except RecursionError:
        raise _invalid("JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise RequestInvalid(
            [
                {
                    "loc": ["body", exc.pos],
                    "msg": f"JSON decode error: {exc.msg}",
                    "type": "json_invalid",
                }
            ]
        ) from None
    except (UnicodeDecodeError, LookupError) as exc:
        raise _invalid(f"body is not valid {encoding}: {str(exc)[:200]}") from None
    except ValueError as exc:  # an integer past Python's digit limit
        raise _invalid(f"a number in the body is too large: {str(exc)[:120]}") from None


def _decode_sliced(raw: bytes, encoding: str) -> str:
    """``raw.decode(encoding)``, a slice per C call (each hands the GIL back)."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    view = memoryview(raw)
    parts = [
        decoder.decode(view[start : start + DECODE_SLICE_BYTES])
        for start in range(0, len(raw), DECODE_SLICE_BYTES)
    ]
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


def lone_surrogates(value: t.Any, loc: tuple = ()) -> t.Iterator[list[t.Any]]:
    """The location of every string in a parsed JSON value (keys included) that holds a lone
    surrogate: JSON's ``\\ud800`` escapes parse to Python strings no UTF-8 encoder (tokenizer,
    file system, log) accepts."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            yield list(loc)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from lone_surrogates(key, loc)
            yield from lone_surrogates(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from lone_surrogates(item, (*loc, index))


def check_surrogates(raw: bytes, body: t.Any) -> None:
    """422 naming every string with a lone surrogate; the parsed value is walked only when the
    bytes hold a ``\\uD8..``-``\\uDF..`` escape, searched for a slice per C call."""
    slices = range(0, len(raw), DECODE_SLICE_BYTES)
    # each search reads 5 bytes past its slice: an escape across two slices is found
    if any(_ESCAPED_SURROGATE.search(raw, i, i + DECODE_SLICE_BYTES + 5) for i in slices):
        errors = [
            {
                "loc": ["body", *loc],
                "msg": "lone surrogate: not valid Unicode text",
                "type": "string_unicode",
            }
            for loc in lone_surrogates(body)
        ]
        if errors:
            raise RequestInvalid(errors[:20])
