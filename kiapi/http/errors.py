"""The one place where errors become HTTP responses.

* :class:`~kiapi.runtime.errors.KiapiError` -> its own ``status``, ``body()`` and ``headers()``.
* Connexion's :class:`ProblemException` (unknown route 404, 405, 415 raised by Connexion
  itself) and Starlette's ``HTTPException`` -> the same status with a ``{"detail": ...}`` body,
  the shape the contract uses for every error.

Anything else is a bug: Connexion's default handler logs it and answers 500.
"""

from __future__ import annotations

import json
from typing import Any

from connexion import AsyncApp
from connexion.exceptions import ProblemException
from connexion.lifecycle import ConnexionRequest, ConnexionResponse
from starlette.exceptions import HTTPException

from kiapi.runtime.errors import KiapiError


def json_error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
    return ConnexionResponse(
        status_code=status,
        mimetype="application/json",
        content_type="application/json",
        body=json.dumps(body).encode(),
        headers=headers or {},
    )


def kiapi_error(_request: ConnexionRequest, exc: KiapiError) -> ConnexionResponse:
    return json_error(exc.status, exc.body(), exc.headers())


def problem_error(_request: ConnexionRequest, exc: ProblemException) -> ConnexionResponse:
    headers = dict(exc.headers or {})
    return json_error(exc.status, {"detail": exc.detail or exc.title}, headers)


def http_error(_request: ConnexionRequest, exc: HTTPException) -> ConnexionResponse:
    return json_error(exc.status_code, {"detail": exc.detail}, dict(exc.headers or {}))


def install_error_handlers(app: AsyncApp) -> None:
    app.add_error_handler(KiapiError, kiapi_error)
    app.add_error_handler(ProblemException, problem_error)
    app.add_error_handler(HTTPException, http_error)
