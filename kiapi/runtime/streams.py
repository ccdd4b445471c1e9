"""A one-way channel from the worker thread to one request's event loop.

The worker calls :meth:`Channel.put` (never blocks: the event is handed to the loop with
``call_soon_threadsafe``); the request's coroutine awaits :meth:`Channel.get`. Events are
tuples, ``(kind, payload)``; the runner that feeds a channel decides the kinds (chat: text
``delta`` events, then the job's future says how it ended). A channel whose reader is gone
keeps accepting events (they are dropped with it); it is never a reason to stop the worker.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import Any


class Channel:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(self, event: tuple[str, Any]) -> None:
        """Any thread."""
        with suppress(RuntimeError):  # the loop is closed: no one will read this
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def get(self) -> tuple[str, Any]:
        """The request's event loop."""
        return await self._queue.get()

    def get_nowait(self) -> tuple[str, Any] | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
