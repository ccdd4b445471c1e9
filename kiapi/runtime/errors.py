"""The closed set of errors kiapi reports to clients.

Each class carries its HTTP status and a stable ``code`` (the machine-readable name clients
see in OpenAI-style error bodies); the HTTP layer maps :class:`KiapiError` to a response in
exactly one place (``kiapi.http.errors``), using ``status``, ``code``, :meth:`KiapiError.body`
and :meth:`KiapiError.headers` — never the class name. Anything that is not a ``KiapiError`` is a
bug and surfaces as a 500.
"""

from __future__ import annotations

import reprlib
from typing import Any, ClassVar

_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 5
_REPR.maxlevel = 3
_REPR.maxlong = 40

EXCERPT_CHARS = 80


def excerpt(value: Any) -> str:
    """A repr of ``value`` of at most ~``EXCERPT_CHARS`` characters, whatever its size: how a
    message quotes anything a request sent (error bodies never echo the input back)."""
    text = _REPR.repr(value)
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


class KiapiError(Exception):
    """Base of every client-visible error. Not raised directly: raise a subclass."""

    status: ClassVar[int]
    code: ClassVar[str]

    def __init__(
        self,
        detail: str,
        *,
        hint: str | None = None,
        job_id: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.hint = hint
        self.job_id = job_id  # the job concerned, when there is one
        self.param = param  # the request field at fault, when there is one

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"detail": self.detail}
        if self.hint:
            body["hint"] = self.hint
        if self.job_id:
            body["job_id"] = self.job_id
        return body

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(KiapiError):
    """A well-formed request that makes no sense: unknown model, empty input, wrong modality."""

    status = 400
    code = "bad_request"


class UnknownModel(BadRequest):
    """A model name, alias or repo id the catalog does not know."""

    code = "model_not_found"


class Unauthorized(KiapiError):
    """No valid ``Authorization: Bearer <token>`` where ``KIAPI_AUTH_TOKEN`` requires one."""

    status = 401
    code = "invalid_api_key"

    def __init__(self, detail: str, *, error: str | None = None) -> None:
        super().__init__(detail, hint="send the header 'Authorization: Bearer <KIAPI_AUTH_TOKEN>'")
        self.error = error  # RFC 6750 error code, when credentials were sent but are wrong

    def headers(self) -> dict[str, str]:
        challenge = 'Bearer realm="kiapi"'
        if self.error:
            challenge += f', error="{self.error}"'
        return {"WWW-Authenticate": challenge}


class NotFound(KiapiError):
    """An id (job, file) that does not exist (any more)."""

    status = 404
    code = "not_found"


class JobCanceled(KiapiError):
    """The job a caller was waiting for was canceled (``DELETE /v1/jobs/{id}``): before it ran,
    or, for a job that runs in steps (a chat completion), while it ran."""

    status = 409
    code = "job_canceled"

    def __init__(self, job_id: str, *, while_running: bool = False) -> None:
        when = "while it ran" if while_running else "before it ran"
        super().__init__(f"job {job_id} was canceled {when}", job_id=job_id)


class PayloadTooLarge(KiapiError):
    """A body or upload above its configured cap."""

    status = 413
    code = "payload_too_large"


class RequestInvalid(KiapiError):
    """Schema violations, reported FastAPI-style: ``{"detail": [{loc, msg, type}, ...]}``."""

    status = 422
    code = "invalid_request"

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors

    def body(self) -> dict[str, Any]:
        return {"detail": self.errors}


class Unavailable(KiapiError):
    """The server cannot take this request now; ``hint`` says how to fix it."""

    status = 503
    code = "unavailable"

    def __init__(self, detail: str, *, hint: str | None = None, retry_after_s: int | None = None):
        super().__init__(detail, hint=hint)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


class ModelNotSetUp(Unavailable):
    """The model is in the catalog but its weights are not on this machine."""

    code = "model_not_set_up"


class BudgetExceeded(Unavailable):
    """The model does not fit in the memory budget (even after evicting idle models)."""

    code = "budget_exceeded"


class Overloaded(Unavailable):
    """The worker queue is full."""

    code = "overloaded"


class ClientGone(KiapiError):
    """The client disconnected while waiting for its job. No one receives this answer; 499 (the
    status nginx logs for it) marks it in logs. A queued job is canceled, a running one ends in
    its record."""

    status = 499
    code = "client_gone"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"the client disconnected while waiting for {job_id}", job_id=job_id)


class SyncTimeout(KiapiError):
    """A sync request waited longer than the sync timeout; the job keeps running."""

    status = 504
    code = "sync_timeout"

    def __init__(self, job_id: str, waited_s: float) -> None:
        super().__init__(
            f"job {job_id} did not finish within {waited_s:g} s; it keeps running",
            hint=f"poll GET /v1/jobs/{job_id} for its status and result",
            job_id=job_id,
        )


class Forbidden(KiapiError):
    """A request the server refuses whoever sends it: a ``Host`` it does not serve (DNS
    rebinding) or a cross-site ``Origin`` on a server without a token."""

    status = 403
    code = "forbidden"


class UnsupportedMediaType(KiapiError):
    """A body in an encoding or content type the operation does not take."""

    status = 415
    code = "unsupported_media_type"
