"""uvicorn's HTTP protocol with a header-read deadline.

uvicorn arms its keep-alive timer only after a response, so a connection that never sends a
complete request head stays open forever: 1,100 idle connections exhausted the descriptors
(``ulimit -n 1024``) and ``/health`` failed. Here every connection must finish its request head
within ``header_timeout_s`` of opening (or of the previous response), else it is closed.
"""

from __future__ import annotations

import asyncio


def protocol_with_header_deadline(header_timeout_s: float):
    """A uvicorn ``http`` protocol class (httptools) that enforces the deadline, or ``"auto"``
    when httptools is not installed (uvicorn's h11 protocol then runs without one)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is in the lock
        return "auto"

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            if not self.transport.is_closing() and (
                self.cycle is None or self.cycle.response_complete
            ):
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol
