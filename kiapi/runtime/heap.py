"""Handing free C-heap pages back to the operating system (glibc's ``malloc_trim``).

glibc keeps memory freed by a thread in that thread's arena; a burst of large requests leaves
each arena at its high-water mark until something trims it. ``trim()`` is thread-safe and cheap
(milliseconds); callers run it when the server goes quiet, so a server at rest holds only its
live memory. Elsewhere than glibc it does nothing.
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


def can_trim() -> bool:
    return _malloc_trim is not None


def trim() -> None:
    """Return every arena's free pages to the OS (a no-op without glibc)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
