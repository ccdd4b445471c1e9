"""One observation per HTTP request: the access log line and the request metrics.

:class:`ObserveRequests` sits outside everything else, so it sees the final status of every
request, errors included. The line (logger ``kiapi.access``) carries method, path, status,
duration and the job id(s) the handler named in ``X-Kiapi-Job-Id``; with
``KIAPI_LOG_FORMAT=json`` each of those is its own field (see :mod:`kiapi.logs`). The metrics
go to the runtime's :class:`~kiapi.runtime.metrics.Metrics`, labelled with the operationId
(``unmatched`` for paths no spec defines, so label values stay a closed set).
"""

from __future__ import annotations

import logging
import time

from kiapi.specs import operation_id

access_log = logging.getLogger("kiapi.access")

MAX_LOGGED_CHARS = 2000


def log_safe(text: str) -> str:
    """Request-controlled text for a text log line: control characters (CR, LF, ESC, ...),
    backslashes and non-ASCII escaped, so it can never start a line of its own or forge one;
    at most ``MAX_LOGGED_CHARS``. (JSON lines need nothing: the encoder escapes.)"""
    if len(text) > MAX_LOGGED_CHARS:
        text = text[:MAX_LOGGED_CHARS] + "..."
    return text.encode("unicode_escape").decode("ascii")


JOB_HEADER = b"x-kiapi-job-id"
UNMATCHED = "unmatched"


class ObserveRequests:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        seen = {"status": 500, "job": None}  # 500 unless a response starts

        async def observed_send(message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == JOB_HEADER:
                        seen["job"] = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self._record(scope, seen["status"], seen["job"], time.perf_counter() - started)

    @staticmethod
    def _record(scope, status: int, job: str | None, seconds: float) -> None:
        method, path = scope["method"], scope["path"]
        operation = operation_id(method, path) or UNMATCHED
        runtime = (scope.get("state") or {}).get("runtime")
        if runtime is not None:
            runtime.metrics.request_done(operation, method, status, seconds)
        duration_ms = round(seconds * 1000, 2)
        access_log.info(
            "%s %s %d %.1fms%s",
            log_safe(method),
            log_safe(path),
            status,
            duration_ms,
            f" job={job}" if job else "",
            extra={
                "method": method,
                "path": path[:MAX_LOGGED_CHARS],
                "status": status,
                "duration_ms": duration_ms,
                "operation": operation,
                "job_id": job,
            },
        )
