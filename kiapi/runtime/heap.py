"""The C heap: handing free pages back to the OS, and how many malloc arenas there are.

glibc keeps memory freed by a thread in that thread's arena; a burst of large requests leaves
each arena at its high-water mark until something trims it. ``trim()`` (``malloc_trim``) is
thread-safe and cheap (milliseconds); callers run it when the server goes quiet, so a server
at rest holds only its live memory. ``malloc_trim`` cannot shrink the *top* of a thread's
arena, though (glibc only trims the main heap's top), so ``kiapi serve`` limits glibc to one
arena (``KIAPI_MALLOC_ARENAS``, see ``bench/malloc_arenas.py`` for what it costs). Elsewhere
than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _find_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)  # glibc only (not musl)


_malloc_trim = _find_malloc_trim()
M_ARENA_MAX = -8  # mallopt parameter (malloc.h)


def can_trim() -> bool:
    return _malloc_trim is not None


def trim() -> None:
    """Return every arena's free pages to the OS (a no-op without glibc)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def limit_arenas(count: int) -> bool:
    """At most ``count`` malloc arenas (0: glibc's default, 8 per core). Call it before the
    threads that allocate start; returns whether glibc took the setting."""
    if count <= 0 or _malloc_trim is None:  # _malloc_trim found: this is glibc
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_ARENA_MAX, count))
