"""Give memory back when the server goes quiet.

Uploads, downloads and request bodies are handled on the event loop and Starlette's thread
pool; glibc keeps what those threads freed in their arenas. :class:`ReleaseWhenQuiet` counts
requests in flight and, once none has been for ``quiet_s`` after some activity, calls
``release`` (by default :func:`kiapi.runtime.heap.trim`) once. The worker has its own quiet
hook for what only it may touch (MLX's buffer cache); this one covers the whole process.

Only the event loop thread touches the counters; ``release`` runs on the loop (it takes
milliseconds, and by definition no request is waiting).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kiapi.runtime import heap

log = logging.getLogger(__name__)


class ReleaseWhenQuiet:
    def __init__(
        self, app, *, quiet_s: float = 1.0, release: Callable[[], None] = heap.trim
    ) -> None:
        self.app = app
        self.quiet_s = quiet_s
        self.release = release
        self.in_flight = 0
        self.generation = 0  # bumped by every request: a timer from before it is stale
        self.releases = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        self.generation += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                generation = self.generation
                asyncio.get_running_loop().call_later(self.quiet_s, self._quiet, generation)

    def _quiet(self, generation: int) -> None:
        if self.in_flight or generation != self.generation:
            return  # a request came since this timer was armed
        try:
            self.release()
            self.releases += 1
        except Exception:  # giving memory back must never break serving
            log.exception("releasing memory when quiet failed")
