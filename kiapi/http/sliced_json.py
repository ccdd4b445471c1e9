"""``json.loads`` in slices: the same values and errors, but no single C call longer than a
bounded slice of the text, so a thread parsing a large body gives the GIL back every few
milliseconds and the event loop keeps answering.

``json.loads`` is one C call for the whole document: it holds the GIL for as long as the
text takes (measured here: 44 ms for one 16 MB string, 117 ms for 16 MB of escapes, 150 ms
for 100,000 floats), and every other thread, the event loop included, waits. Here containers
are walked in Python (between bytecodes the interpreter hands the GIL over every
``sys.getswitchinterval()``); scalars go to json's own C scanner, strings in pieces of at most
:data:`SLICE_CHARS` characters (cut where no escape is split; a surrogate pair split between
two pieces is rejoined), numbers only when at most :data:`MAX_NUMBER_CHARS` long, whitespace
in runs of at most :data:`SLICE_CHARS`.

Errors are ``json.JSONDecodeError`` (with the position) as ``json.loads`` raises them, and
``ValueError`` for a number Python refuses; ``parse_constant`` is called for ``NaN`` and
``Infinity`` as json does. It is slower than ``json.loads`` in total CPU (a Python step per
value): use it for large bodies only.
"""

from __future__ import annotations

import json
import re
import typing as t
from json.decoder import scanstring
from json.scanner import make_scanner

SLICE_CHARS = 256 * 1024
"""Most characters one C call reads: a string piece, a whitespace run."""

FIRST_PIECE_CHARS = 1024
"""The first piece of a string with escapes; the next ones grow fourfold to SLICE_CHARS."""

MAX_NUMBER_CHARS = 4400
"""A longer number is refused before its digits are converted (Python's own limit for int
digits is 4300)."""

MAX_DEPTH = 1000
"""Most nested arrays and objects (``json.loads`` stops near the recursion limit, 1000)."""

_WS_CHARS = (" ", "\t", "\n", "\r")
_NUMBER_CHARS = re.compile(f"[-+0-9.eE]{{0,{MAX_NUMBER_CHARS + 1}}}")


def loads(
    text: str,
    parse_constant: t.Callable[[str], t.Any] | None = None,
    *,
    slice_chars: int = SLICE_CHARS,
) -> t.Any:
    """The value of JSON ``text``, as ``json.loads(text, parse_constant=...)`` gives it.
    ``slice_chars`` (at least 8) is :data:`SLICE_CHARS` but for tests of the slicing."""
    if slice_chars < 8:
        raise ValueError("slice_chars must be at least 8")
    decoder = (
        json.JSONDecoder(parse_constant=parse_constant) if parse_constant else json.JSONDecoder()
    )
    return _Parser(text, make_scanner(decoder), slice_chars).document()


class _Parser:
    def __init__(
        self, text: str, scan: t.Callable[[str, int], tuple[t.Any, int]], slice_chars: int
    ) -> None:
        self.text = text
        self.scan = scan
        self.slice = slice_chars
        self._ws = re.compile(f"[ \t\n\r]{{0,{slice_chars}}}")

    def error(self, msg: str, pos: int) -> json.JSONDecodeError:
        return json.JSONDecodeError(msg, self.text, pos)

    def ws(self, idx: int) -> int:
        char = self.text[idx : idx + 1]
        if char and char not in " \t\n\r":
            return idx
        if char == " " and self.text[idx + 1 : idx + 2] not in _WS_CHARS:
            return idx + 1  # ", " and ": " as json.dumps writes them
        while True:
            end = self._ws.match(self.text, idx).end()
            if end - idx < self.slice:
                return end
            idx = end

    def document(self) -> t.Any:
        text, n = self.text, len(self.text)
        stack: list[list | dict] = []  # the open containers, innermost last
        keys: list[str | None] = []  # for each open object, the key whose value comes next
        idx = self.ws(0)
        while True:
            value, idx, opened = self.value(idx, len(stack))
            if opened is not None:  # a non-empty container: its first value comes next
                stack.append(opened)
                if isinstance(opened, dict):
                    key, idx = self.key(idx)
                    keys.append(key)
                else:
                    keys.append(None)
                continue
            while True:  # attach the value, then close every container that ends here
                if not stack:
                    idx = self.ws(idx)
                    if idx != n:
                        raise self.error("Extra data", idx)
                    return value
                top = stack[-1]
                if isinstance(top, list):
                    top.append(value)
                else:
                    top[keys[-1]] = value
                idx = self.ws(idx)
                char = text[idx : idx + 1]
                if char == ",":
                    idx = self.ws(idx + 1)
                    if isinstance(top, dict):
                        keys[-1], idx = self.key(idx)
                    break
                if char != ("]" if isinstance(top, list) else "}"):
                    raise self.error("Expecting ',' delimiter", idx)
                idx += 1
                value = stack.pop()
                keys.pop()

    def value(self, idx: int, depth: int) -> tuple[t.Any, int, list | dict | None]:
        """The value at ``idx`` and the index after it; or, for a container with items, the
        empty container (third) and the index of its first item."""
        text = self.text
        char = text[idx : idx + 1]
        if char in ("[", "{"):
            if depth >= MAX_DEPTH:
                raise RecursionError("JSON nested too deeply")
            inner = self.ws(idx + 1)
            closer = "]" if char == "[" else "}"
            if text.startswith(closer, inner):
                return ([] if char == "[" else {}), inner + 1, None
            return None, inner, [] if char == "[" else {}
        if char == '"':
            value, end = self.string(idx)
            return value, end, None
        if char and char in "-0123456789" and self.number_chars(idx) > MAX_NUMBER_CHARS:
            raise ValueError(f"a number of more than {MAX_NUMBER_CHARS} characters")
        try:
            value, end = self.scan(text, idx)
        except StopIteration:
            raise self.error("Expecting value", idx) from None
        return value, end, None

    def number_chars(self, idx: int) -> int:
        """How long the number at ``idx`` is, counted up to ``MAX_NUMBER_CHARS + 1``."""
        return _NUMBER_CHARS.match(self.text, idx).end() - idx

    def key(self, idx: int) -> tuple[str, int]:
        """An object's key at ``idx`` and the index of its value."""
        if not self.text.startswith('"', idx):
            raise self.error("Expecting property name enclosed in double quotes", idx)
        key, idx = self.string(idx)
        idx = self.ws(idx)
        if not self.text.startswith(":", idx):
            raise self.error("Expecting ':' delimiter", idx)
        return key, self.ws(idx + 1)

    def string(self, start: int) -> tuple[str, int]:
        """The string whose opening quote is at ``start`` and the index after its closing
        quote, decoded at most ``slice_chars`` characters per C call.

        A string whose closing quote comes before any backslash is json's ``scanstring`` on
        the text (it stops at that quote). Any other is decoded in pieces, each copied out and
        closed by a sentinel quote: the first piece short (strings with escapes are short
        too, as a rule), each next one four times longer, up to ``slice_chars``."""
        text, n = self.text, len(self.text)
        quote = text.find('"', start + 1, start + 1 + self.slice)
        if quote >= 0 and text.find("\\", start + 1, quote) < 0:
            value, end = self._scan_string(start, start + 1)
            return value, end
        parts: list[str] = []
        pos, size = start + 1, min(FIRST_PIECE_CHARS, self.slice)
        while True:
            if n - pos <= size:  # the rest of the text is one piece: scanstring stops in it
                value, end = self._scan_string(start, pos)
                parts.append(value)
                return _join(parts), end
            cut = _safe_cut(text, pos, pos + size)
            try:
                value, end = scanstring(text[pos:cut] + '"', 0, True)  # closed by a sentinel
            except json.JSONDecodeError as exc:
                raise self.error(exc.msg, pos + exc.pos) from None
            parts.append(value)
            if end <= cut - pos:  # the string's own closing quote came before the sentinel
                return _join(parts), pos + end
            pos, size = cut, min(size * 4, self.slice)

    def _scan_string(self, start: int, pos: int) -> tuple[str, int]:
        try:
            return scanstring(self.text, pos, True)
        except json.JSONDecodeError as exc:
            at = start if "Unterminated" in exc.msg else exc.pos
            raise self.error(exc.msg, at) from None


def _safe_cut(text: str, pos: int, cut: int) -> int:
    """``cut``, or an index just before it, where no escape of the string is split. An escape
    that crosses ``cut`` starts in the 5 characters before it; a backslash run's escapes start
    at its first backslash and every second one after it."""
    last = text.rfind("\\", cut - 6, cut)
    if last < 0:
        return cut
    run_start = pos + len(text[pos : last + 1].rstrip("\\"))
    return run_start + (last - run_start) // 2 * 2


def _join(parts: list[str]) -> str:
    """The pieces of one string; a surrogate pair that two pieces split (``\\ud83d`` ending
    one, ``\\ude00`` starting the next) becomes the one character json makes of it."""
    for i in range(len(parts) - 1):
        head, tail = parts[i], parts[i + 1]
        if head and tail and "\ud800" <= head[-1] <= "\udbff" and "\udc00" <= tail[0] <= "\udfff":
            pair = 0x10000 + ((ord(head[-1]) - 0xD800) << 10) + (ord(tail[0]) - 0xDC00)
            parts[i], parts[i + 1] = head[:-1], chr(pair) + tail[1:]
    return parts[0] if len(parts) == 1 else "".join(parts)
