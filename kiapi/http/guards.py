"""Request guards that run before routing: the bearer token and the body size limit.

Both are plain ASGI middlewares placed just inside Connexion's exception middleware, so what
they raise (:class:`Unauthorized`, :class:`PayloadTooLarge`) becomes a response in the one place
that maps errors (``kiapi.http.errors``), and nothing behind them (routing, validation, the
handlers) runs for a request they refuse.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiapi.runtime.errors import PayloadTooLarge, Unauthorized


class BearerAuth:
    """Every HTTP request whose path is not public needs ``Authorization: Bearer <token>``.

    The token is compared in constant time (:func:`hmac.compare_digest`); the answer for a
    missing and for a wrong token differs only in the RFC 6750 ``error`` of the challenge.
    """

    def __init__(self, app: ASGIApp, *, token: str, is_public: Callable[[str], bool]) -> None:
        if not token:
            raise ValueError("BearerAuth needs a non-empty token")
        self.app = app
        self._token = token.encode()
        self._is_public = is_public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._is_public(scope["path"]):
            self._check(Headers(scope=scope).get("authorization"))
        await self.app(scope, receive, send)

    def _check(self, header: str | None) -> None:
        scheme, _, credentials = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise Unauthorized("this endpoint needs a bearer token")
        if not hmac.compare_digest(credentials.strip().encode(), self._token):
            raise Unauthorized("the bearer token is not valid", error="invalid_token")


class BodyLimit:
    """Request bodies above ``max_bytes`` -> 413, from ``Content-Length`` before anything is read,
    and by counting while a chunked body (no length) streams.

    A chunked body within the limit is read here and handed on with its ``Content-Length``:
    Connexion's body validators take a request without one for a request without a body.
    ``exempt(scope)`` names requests another cap governs: uploads stream to disk under
    ``KIAPI_MAX_UPLOAD_MB`` (``kiapi.http.multipart``), which also removes the partial file.
    """

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, exempt: Callable[[Scope], bool] = lambda _s: False
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self._exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_large(f"the request body ({declared} bytes)")
            await self.app(scope, receive, send)
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked(receive)
            if body is None:
                return  # the client went away mid-body: no one to answer
            await self.app(_with_length(scope, len(body)), _replay(body, receive), send)
        else:
            await self.app(scope, receive, send)

    async def _read_chunked(self, receive: Receive) -> bytes | None:
        """The whole body, or None if the client disconnects first."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large("the request body")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, what: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"{what} is over the limit of {self.max_bytes} bytes",
            hint="send less per request, or raise KIAPI_MAX_BODY_MB",
        )


def _with_length(scope: Scope, length: int) -> Scope:
    headers = [
        (name, value)
        for name, value in scope["headers"]
        if name.lower() not in (b"content-length", b"transfer-encoding")
    ]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


def _replay(body: bytes, receive: Receive) -> Receive:
    """The whole body in one message, then the connection's own messages (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
