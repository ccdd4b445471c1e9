"""The one place where errors become HTTP responses.

* :class:`~kiapi.runtime.errors.KiapiError` -> its own ``status``, ``body()`` and ``headers()``.
* Connexion's :class:`ProblemException` (unknown route 404, 405, 415 raised by Connexion
  itself) and Starlette's ``HTTPException`` -> the same status with a ``{"detail": ...}`` body,
  the shape the contract uses for every error.
* On the paths of a spec whose ``error_style`` is ``openai`` (``/v1/embeddings``,
  ``/v1/models``) the same errors take OpenAI's envelope instead:
  ``{"error": {"message", "type", "param", "code", ...}}`` (:func:`openai_body`), so OpenAI
  clients raise their usual exceptions with kiapi's message.

Anything else is a bug: Connexion's default handler logs it and answers 500.

The handlers are coroutines: Connexion runs plain functions in a thread pool (a thread hop per
error response).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from connexion import AsyncApp
from connexion.exceptions import ProblemException
from connexion.lifecycle import ConnexionRequest, ConnexionResponse
from starlette.exceptions import HTTPException

from kiapi.runtime.errors import KiapiError, RequestInvalid
from kiapi.specs import allowed_methods, source_of


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


def openai_style(request: ConnexionRequest) -> bool:
    source = source_of(request.scope["path"])
    return source is not None and source.error_style == "openai"


def openai_type(status: int) -> str:
    """OpenAI's error ``type`` for a status."""
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_body(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    hint: str | None = None,
    job_id: str | None = None,
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "message": message,
        "type": openai_type(status),
        "param": param,
        "code": code,
    }
    if hint:
        error["hint"] = hint
    if job_id:
        error["job_id"] = job_id
    return {"error": error}


def status_code_name(status: int) -> str | None:
    """``method_not_allowed`` for 405, and so on."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return None


def _first_field(exc: KiapiError) -> str | None:
    """The request field a 422 is about: the first error's location below the body."""
    if exc.param is not None or not isinstance(exc, RequestInvalid) or not exc.errors:
        return exc.param
    loc = [str(part) for part in exc.errors[0].get("loc", ()) if part != "body"]
    return ".".join(loc) or None


def openai_error_body(exc: KiapiError) -> dict[str, Any]:
    """A kiapi error in OpenAI's envelope (also the error event of a chat stream)."""
    return openai_body(
        exc.status,
        exc.detail,
        code=exc.code,
        param=_first_field(exc),
        hint=exc.hint,
        job_id=exc.job_id,
    )


async def kiapi_error(request: ConnexionRequest, exc: KiapiError) -> ConnexionResponse:
    if openai_style(request):
        return json_error(exc.status, openai_error_body(exc), exc.headers())
    return json_error(exc.status, exc.body(), exc.headers())


def _detail_body(request: ConnexionRequest, status: int, detail: Any) -> dict[str, Any]:
    if openai_style(request):
        return openai_body(status, str(detail), code=status_code_name(status))
    return {"detail": detail}


async def problem_error(request: ConnexionRequest, exc: ProblemException) -> ConnexionResponse:
    headers = _headers(request, exc.status, dict(exc.headers or {}))
    return json_error(
        exc.status, _detail_body(request, exc.status, exc.detail or exc.title), headers
    )


async def http_error(request: ConnexionRequest, exc: HTTPException) -> ConnexionResponse:
    headers = _headers(request, exc.status_code, dict(exc.headers or {}))
    return json_error(exc.status_code, _detail_body(request, exc.status_code, exc.detail), headers)


def install_error_handlers(app: AsyncApp) -> None:
    app.add_error_handler(KiapiError, kiapi_error)
    app.add_error_handler(ProblemException, problem_error)
    app.add_error_handler(HTTPException, http_error)
