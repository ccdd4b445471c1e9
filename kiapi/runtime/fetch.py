"""Fetching a client-supplied URL without letting the client reach what it should not (SSRF).

The check sits where connections are made, not where URLs are parsed: :class:`GuardedBackend`
is the network backend of the HTTP client, so every connection — the first request and every
redirect hop — resolves its host once, refuses it if *any* address is not allowed, and connects
to the address it checked (no second lookup a DNS rebinding could answer differently). Host
spellings such as ``2130706433``, ``0177.0.0.1`` or ``[::ffff:127.0.0.1]`` therefore meet the
same rule as ``127.0.0.1``: the resolver turns them into the address that is checked.

:func:`non_public` is the default rule: only globally routable unicast addresses. IPv6 forms
that carry an IPv4 address (IPv4-mapped, 6to4, Teredo, NAT64) are judged by that address.
Proxies from the environment are ignored (a proxy would make the connection on our behalf).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Any

import httpcore
import httpx

from kiapi.runtime.errors import BadRequest, excerpt

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Refusal = Callable[[IPAddress], str | None]
Resolver = Callable[..., list[tuple[Any, ...]]]

MAX_REDIRECTS = 5
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, Teredo client, NAT64)."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def non_public(ip: IPAddress) -> str | None:
    """Why ``ip`` may not be fetched, or None for a public unicast address."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        reason = non_public(inner)
        return f"{reason} (inside {ip})" if reason else None
    for reason, flagged in (
        ("an unspecified", ip.is_unspecified),
        ("a loopback", ip.is_loopback),
        ("a link-local", ip.is_link_local),
        ("a multicast", ip.is_multicast),
        ("a private", ip.is_private),
        ("a reserved", ip.is_reserved),
        ("a non-public", not ip.is_global),
    ):
        if flagged:
            return f"{reason} address"
    return None


def resolve(host: str, port: int, resolver: Resolver = socket.getaddrinfo) -> list[IPAddress]:
    """Every address ``host`` resolves to, in the resolver's order, without duplicates."""
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise BadRequest(f"the image URL's host {excerpt(host)} does not resolve: {exc}") from None
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in found:
            found.append(ip)
    return found


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's synchronous network backend, connecting only to addresses ``refuse`` allows.

    ``refuse(ip)`` returns why ``ip`` is refused, or None; ``refuse=None`` allows everything
    (``KIAPI_ALLOW_PRIVATE_URLS``). A refused host raises :class:`BadRequest`, which passes
    through httpx unchanged.
    """

    def __init__(
        self, refuse: Refusal | None = non_public, resolver: Resolver = socket.getaddrinfo
    ):
        self.refuse = refuse
        self.resolver = resolver

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        addresses = resolve(host, port, self.resolver)
        if self.refuse is not None:
            for ip in addresses:
                reason = self.refuse(ip)
                if reason:
                    raise BadRequest(
                        f"the image URL (or a redirect it gave) points at {host}, "
                        f"{reason}; kiapi fetches only public addresses",
                        hint="set KIAPI_ALLOW_PRIVATE_URLS=true to let image URLs reach "
                        "private and local addresses",
                    )
        error: Exception = httpcore.ConnectError(f"{host} has no address")
        for ip in addresses:
            try:
                return super().connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error


class GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport, with its connection pool built on a :class:`GuardedBackend`."""

    def __init__(self, backend: GuardedBackend) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False), network_backend=backend
        )


def is_image_media_type(content_type: str | None) -> bool:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return not media_type or media_type.startswith("image/") or media_type.endswith("octet-stream")


def fetch_image_bytes(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    refuse: Refusal | None = non_public,
    resolver: Resolver = socket.getaddrinfo,
) -> bytes:
    """GET ``url`` (redirects followed, each hop checked) and return at most ``max_bytes``.

    400 for: a refused address, a non-200 answer, a body that is not an image by its
    Content-Type, more than ``max_bytes`` (by Content-Length or while reading), or longer than
    ``timeout_s`` in all. Blocking: callers run it off the event loop.
    """
    deadline = time.monotonic() + timeout_s
    transport = GuardedTransport(GuardedBackend(refuse, resolver))
    try:
        with (
            httpx.Client(
                transport=transport,
                follow_redirects=True,
                max_redirects=MAX_REDIRECTS,
                timeout=timeout_s,
                trust_env=False,
            ) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise BadRequest(f"fetching the image URL gave HTTP {response.status_code}")
            content_type = response.headers.get("content-type")
            if not is_image_media_type(content_type):
                raise BadRequest(f"the image URL serves {excerpt(content_type)}, not an image")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise BadRequest(f"the image URL serves {declared} bytes, over {max_bytes}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise BadRequest(f"the image URL serves more than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise BadRequest(f"fetching the image URL took over {timeout_s:g} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TooManyRedirects:
        raise BadRequest(f"the image URL redirects more than {MAX_REDIRECTS} times") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise BadRequest(f"could not fetch the image URL: {exc}") from None
