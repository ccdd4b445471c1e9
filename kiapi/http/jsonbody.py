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

import json
import re
import typing as t

from kiapi.runtime.errors import PayloadTooLarge, RequestInvalid

MAX_JSON_VALUES = 100_000
"""Most values (numbers, strings, booleans, nulls, arrays, objects) one JSON body may hold."""

_STRING_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*')  # a string's bytes up to its closing quote
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


class ValueCounter:
    """Counts the values of a JSON text fed to it chunk by chunk: an upper bound (one more
    than the true count per empty array or object; any count for invalid JSON).
    :meth:`feed` raises :class:`PayloadTooLarge` once it passes ``limit``."""

    def __init__(self, limit: int = MAX_JSON_VALUES) -> None:
        self.limit = limit
        self.values = 1  # the top-level value
        self._in_string = False
        self._escaped = False  # a chunk ended on a backslash inside a string

    def feed(self, chunk: bytes) -> None:
        pos, end = 0, len(chunk)
        while pos < end:
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                    pos += 1
                    continue
                pos = _STRING_REST.match(chunk, pos).end()
                if pos == end:
                    break
                if chunk[pos] == 0x5C:  # a backslash as the chunk's last byte
                    self._escaped = True
                else:  # the closing quote
                    self._in_string = False
                pos += 1
            else:
                quote = chunk.find(b'"', pos)
                stop = end if quote < 0 else quote
                self.values += (
                    chunk.count(b",", pos, stop)
                    + chunk.count(b"[", pos, stop)
                    + chunk.count(b"{", pos, stop)
                )
                if quote < 0:
                    break
                self._in_string = True
                pos = quote + 1
        if self.values > self.limit:
            raise PayloadTooLarge(
                f"the JSON body holds more than {self.limit} values",
                hint=f"send at most {self.limit} JSON values per request (split the request)",
            )


def _invalid(msg: str, loc: list[t.Any] | None = None) -> RequestInvalid:
    return RequestInvalid([{"loc": ["body", *(loc or [])], "msg": msg, "type": "json_invalid"}])


def _not_json(name: str) -> t.NoReturn:
    raise _invalid(f"{name} is not a JSON number")


def parse(raw: bytes, encoding: str = "utf-8") -> t.Any:
    """The parsed body, or :class:`RequestInvalid`. Runs on any thread."""
    try:
        text: bytes | str = (
            raw if encoding.lower().replace("_", "-") == "utf-8" else raw.decode(encoding)
        )
        return json.loads(text, parse_constant=_not_json)
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
    bytes hold a ``\\uD8..``-``\\uDF..`` escape (a substring search, fast on any body)."""
    if (b"\\ud" in raw or b"\\uD" in raw) and _ESCAPED_SURROGATE.search(raw):
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
