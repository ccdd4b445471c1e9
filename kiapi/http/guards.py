"""Request guards that run before routing: the bearer token and the body size limit.

Both are plain ASGI middlewares placed just inside Connexion's exception middleware, so what
they raise (:class:`Unauthorized`, :class:`PayloadTooLarge`) becomes a response in the one place
that maps errors (``kiapi.http.errors``), and nothing behind them (routing, validation, the
handlers) runs for a request they refuse.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiapi.runtime.errors import Forbidden, PayloadTooLarge, Unauthorized, UnsupportedMediaType

LOOPBACK_NAMES = ("localhost",)
JOIN_INLINE_BYTES = 1024 * 1024
"""A chunked body larger than this is joined on a worker thread."""


def has_body(scope: Scope) -> bool:
    """True when the request announces a body (a non-zero Content-Length, or chunked)."""
    headers = Headers(scope=scope)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return True
    try:
        return int(headers.get("content-length", "0")) > 0
    except ValueError:
        return False


def split_host(value: str) -> str:
    """The host part of a ``Host`` header or an origin's netloc, lower case, without port or
    IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_ip(host: str, test: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]):
    try:
        return test(ipaddress.ip_address(host))
    except ValueError:
        return False


class HostAllowList:
    """Which ``Host`` values a token-less server answers: loopback addresses, ``localhost`` and
    ``*.localhost`` (RFC 6761: they never leave the machine), the bound host, and ``extra``
    (``KIAPI_ALLOWED_HOSTS``: names, ``.example.com`` for a domain and its subdomains, ``*``
    for any). Bound to every interface (``0.0.0.0``, ``::``), any IP literal is the server's
    own address (a rebinding page cannot send one: its Host is its own name)."""

    def __init__(self, bound_host: str, extra: Iterable[str] = ()) -> None:
        bound = split_host(bound_host)
        self.any_ip = _is_ip(bound, lambda ip: ip.is_unspecified)
        self.names = {*LOOPBACK_NAMES, bound} | {e.lower() for e in extra if not e.startswith(".")}
        self.suffixes = tuple(e.lower() for e in extra if e.startswith("."))

    def allows(self, host: str) -> bool:
        host = split_host(host)
        if "*" in self.names or host in self.names or host.endswith(".localhost"):
            return True
        if host.endswith(self.suffixes) or any(host == s[1:] for s in self.suffixes):
            return True
        return _is_ip(host, lambda ip: ip.is_loopback or self.any_ip)


class BrowserGuard:
    """On a server without a token, refuses what a web page could make a browser send.

    * DNS rebinding: a ``Host`` the server does not serve (:class:`HostAllowList`) -> 403.
    * Cross-site requests (CSRF, a page reading answers): an ``Origin`` other than the
      server's own (the request's ``Host``) and not in ``KIAPI_ALLOWED_ORIGINS`` -> 403.
      Requests without ``Origin`` (curl, SDKs, same-origin GETs) pass.
    """

    def __init__(
        self, app: ASGIApp, *, hosts: HostAllowList, allowed_origins: Iterable[str] = ()
    ) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host = headers.get("host", "")
            if not self.hosts.allows(host):
                raise Forbidden(
                    "this server does not answer requests for this Host",
                    hint="use http://127.0.0.1 or localhost, or add the name to "
                    "KIAPI_ALLOWED_HOSTS (or set KIAPI_AUTH_TOKEN)",
                )
            origin = headers.get("origin")
            if origin is not None and not self._same_site(origin, host):
                raise Forbidden(
                    "cross-origin requests are refused on a server without a token",
                    hint="add the page's origin to KIAPI_ALLOWED_ORIGINS, or set KIAPI_AUTH_TOKEN",
                )
        await self.app(scope, receive, send)

    def _same_site(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self.origins or "*" in self.origins:
            return True
        netloc = urlsplit(origin).netloc
        return bool(netloc) and netloc == host.strip().lower()


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
    """Compressed bodies (any ``Content-Encoding`` but identity) -> 415 naming the encoding; a
    body without a ``Content-Type`` -> 415 (Connexion would hand the handler raw bytes).
    Request bodies above ``max_bytes`` -> 413, from ``Content-Length`` before anything is read,
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
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise UnsupportedMediaType(
                f"Content-Encoding {encoding[:40]!r} is not supported; send the body uncompressed",
                hint="drop the Content-Encoding header and compression",
            )
        content_type = headers.get("content-type")
        if content_type is None and has_body(scope):
            raise UnsupportedMediaType(
                "the request has a body but no Content-Type",
                hint="send Content-Type: application/json (or multipart/form-data for uploads)",
            )
        if content_type is not None:
            scope = _with_lowercase_media_type(scope, content_type)
        if self._exempt(scope):
            await self.app(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_large(f"the request body ({declared} bytes)")
            await self.app(scope, receive, send)
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked(receive)
            if body is None:
                return  # the client went away mid-body: no one to answer
            await self.app(_with_length(scope, len(body)), replay_body(body, receive), send)
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
                if size > JOIN_INLINE_BYTES:  # a memcpy without the GIL, off the loop
                    return await run_in_threadpool(b"".join, chunks)
                return b"".join(chunks)

    def _too_large(self, what: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"{what} is over the limit of {self.max_bytes} bytes",
            hint="send less per request, or raise KIAPI_MAX_BODY_MB",
        )


def _with_lowercase_media_type(scope: Scope, content_type: str) -> Scope:
    """``scope`` with the media type of each Content-Type header in lower case (parameters
    kept as sent).

    Media types are case-insensitive (RFC 9110, 8.3.1), but Connexion matches the body's
    validator and schema by the header's exact text: ``Application/JSON`` passed its 415 check
    and then reached the handler unvalidated, without a parsed body (a 500)."""
    media_type = content_type.partition(";")[0]
    if media_type == media_type.lower():
        return scope
    headers = [
        (name, _lower_media_type(value) if name.lower() == b"content-type" else value)
        for name, value in scope["headers"]
    ]
    return {**scope, "headers": headers}


def _lower_media_type(value: bytes) -> bytes:
    media_type, sep, parameters = value.partition(b";")
    return media_type.lower() + sep + parameters


def _with_length(scope: Scope, length: int) -> Scope:
    headers = [
        (name, value)
        for name, value in scope["headers"]
        if name.lower() not in (b"content-length", b"transfer-encoding")
    ]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


def replay_body(body: bytes, receive: Receive) -> Receive:
    """The whole body in one message, then the connection's own messages (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
