"""Connexion handlers: one module per spec (``specs/<name>.json`` -> ``kiapi.handlers.<name>``),
one function per operationId. Handlers stay thin: they translate between HTTP and the runtime."""

from __future__ import annotations

import typing as t

from connexion.context import receive as request_receive
from connexion.context import scope as request_scope

from kiapi.http.validation import PARSED_BODY
from kiapi.runtime.core import Runtime

JOB_ID_HEADER = "X-Kiapi-Job-Id"  # the job(s) that answered a request, for logs and /v1/jobs
JOB_COUNT_HEADER = "X-Kiapi-Job-Count"
MAX_HEADER_JOB_IDS = 8  # keeps response headers short whatever the number of inputs


def job_headers(job_ids: list[str]) -> dict[str, str]:
    """The jobs of a request for its response headers: up to ``MAX_HEADER_JOB_IDS`` ids
    (comma-separated) and, when there are more, their count; GET /v1/jobs lists them all."""
    headers = {JOB_ID_HEADER: ",".join(job_ids[:MAX_HEADER_JOB_IDS])}
    if len(job_ids) > MAX_HEADER_JOB_IDS:
        headers[JOB_COUNT_HEADER] = str(len(job_ids))
    return headers


def json_body() -> t.Any:
    """The current request's JSON body, parsed once by the body validator (off the event loop
    when large). Handlers of JSON operations call this instead of taking a ``body`` argument:
    Connexion would parse the body again, on the event loop."""
    return request_scope.get(PARSED_BODY)


def runtime() -> Runtime:
    """The process's runtime, from the lifespan state of the current request."""
    return request_scope["state"]["runtime"]


async def client_disconnected() -> None:
    """Return once the client of the current request has disconnected.

    Only for a request whose body has been read (validation reads it before the handler runs):
    it consumes the connection's remaining messages, and the next one is the disconnect.
    """
    receive = request_receive._get_current_object()
    while (await receive())["type"] != "http.disconnect":
        pass
