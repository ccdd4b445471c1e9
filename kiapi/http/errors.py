"""The one place where errors become HTTP responses.

* :class:`~kiapi.runtime.errors.KiapiError` -> its own ``status``, ``body()`` and ``headers()``.
* Connexion's :class:`ProblemException` (unknown route 404, 405, 415 raised by Connexion
  itself) and Starlette's ``HTTPException`` -> the same status with a ``{"detail": ...}`` body,
  the shape the contract uses for every error.

Anything else is a bug: Connexion's default handler logs it and answers 500.

The handlers are coroutines: Connexion runs plain functions in a thread pool (a thread hop per
error response).
"""

from __future__ import annotations

import json
from typing import Any

from connexion import AsyncApp
from connexion.exceptions import ProblemException
from connexion.lifecycle import ConnexionRequest, ConnexionResponse
from starlette.exceptions import HTTPException

from kiapi.runtime.errors import KiapiError
from kiapi.specs import allowed_methods


def json_error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
    return ConnexionResponse(
        status_code=status,
        mimetype="application/json",
        content_type="application/json",
        body=json.dumps(body).encode(),
        headers=headers or {},
    )


def _headers(request: ConnexionRequest, status: int, headers: dict[str, str]) -> dict[str, str]:
    """405 answers list every method of the resource (Connexion's list only one API's)."""
    headers = {k: v for k, v in headers.items() if k.lower() != "allow"}
    if status == 405:
        headers["Allow"] = ", ".join(allowed_methods(request.scope["path"]))
    return headers


async def kiapi_error(_request: ConnexionRequest, exc: KiapiError) -> ConnexionResponse:
    return json_error(exc.status, exc.body(), exc.headers())


async def problem_error(request: ConnexionRequest, exc: ProblemException) -> ConnexionResponse:
    headers = _headers(request, exc.status, dict(exc.headers or {}))
    return json_error(exc.status, {"detail": exc.detail or exc.title}, headers)


async def http_error(request: ConnexionRequest, exc: HTTPException) -> ConnexionResponse:
    headers = _headers(request, exc.status_code, dict(exc.headers or {}))
    return json_error(exc.status_code, {"detail": exc.detail}, headers)


def install_error_handlers(app: AsyncApp) -> None:
    app.add_error_handler(KiapiError, kiapi_error)
    app.add_error_handler(ProblemException, problem_error)
    app.add_error_handler(HTTPException, http_error)
