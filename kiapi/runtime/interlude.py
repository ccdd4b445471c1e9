"""Safe points inside a long step where the worker may run other queued work.

A decode step of several streams runs every layer of the model once (tens of milliseconds);
a request for another, already resident model that arrives meanwhile would otherwise wait for
the whole step. Engine code calls :func:`checkpoint` where nothing of its own is in flight
(between two layers: no kernel running, no scratch buffer in use, every array it still needs
held by itself); the worker sets the handler, with :func:`handling`, only for the length of a
step, and the handler decides whether anything runs (see ``Worker._interlude``).

Worker thread only: the handler is thread-local, so a checkpoint reached on any other thread,
or outside a step, does nothing. A handler must not re-enter: it runs with the handler unset.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()


def checkpoint() -> None:
    """Let the worker run queued work here, if a step on this thread asked for it."""
    handler = getattr(_local, "handler", None)
    if handler is None:
        return
    _local.handler = None  # no nesting: work run here reaches no checkpoint of its own
    try:
        handler()
    finally:
        _local.handler = handler


@contextmanager
def handling(handler: Callable[[], None]) -> Iterator[None]:
    """Within this block, :func:`checkpoint` on this thread calls ``handler``."""
    previous = getattr(_local, "handler", None)
    _local.handler = handler
    try:
        yield
    finally:
        _local.handler = previous
