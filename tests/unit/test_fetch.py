"""Image URLs and SSRF: which addresses are refused, however the host is spelled, on every
redirect hop; the byte, time and content-type caps. A loopback server stands in for the
internal service an attacker would aim at."""

import ipaddress
import socket

import pytest

from kiapi.runtime.errors import BadRequest
from kiapi.runtime.fetch import fetch_image_bytes, non_public
from tests.support import ImageServer, png_bytes

PNG = png_bytes((5, 5))


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "a "),  # reserved (Python 3.11 files it under private)
        ("100.64.0.1", "non-public"),  # carrier-grade NAT
        ("255.255.255.255", "private"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
        ("2002:a9fe:a9fe::", "link-local"),  # 6to4 around 169.254.169.254
        ("64:ff9b::a00:1", "private"),  # NAT64 around 10.0.0.1
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo client 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address, reason):
    refusal = non_public(ipaddress.ip_address(address))
    assert refusal is not None and reason in refusal, refusal


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_are_allowed(address):
    assert non_public(ipaddress.ip_address(address)) is None


@pytest.fixture(scope="module")
def server():
    pages = {
        "/cat.png": PNG,
        "/hop": ("redirect", "/cat.png"),
        "/to-other-loopback": ("redirect", "http://127.0.0.2:{port}/cat.png"),
        "/page.html": ("typed", "text/html; charset=utf-8", b"<html>not an image</html>"),
        "/binary": ("typed", "application/octet-stream", PNG),
        "/slow.png": ("drip", PNG, 0.05),
    }
    with ImageServer(pages) as srv:
        port = srv.server.server_port
        pages["/to-other-loopback"] = ("redirect", f"http://127.0.0.2:{port}/cat.png")
        pages["/loop"] = ("redirect", "/loop")
        yield srv


def fetch(url, **kwargs):
    kwargs.setdefault("max_bytes", 10**6)
    kwargs.setdefault("timeout_s", 5.0)
    return fetch_image_bytes(url, **kwargs)


def refused(url, *fragments, **kwargs):
    with pytest.raises(BadRequest) as err:
        fetch(url, **kwargs)
    for fragment in fragments:
        assert fragment in err.value.detail, err.value.detail
    return err.value


def only_first_loopback(ip):
    """A stand-in rule for a redirect test: 127.0.0.1 plays a public host, 127.0.0.2 not."""
    return None if str(ip) == "127.0.0.1" else "an internal address"


def test_the_loopback_server_is_refused_by_default_and_reachable_when_allowed(server):
    err = refused(server.url("/cat.png"), "127.0.0.1", "loopback")
    assert "KIAPI_ALLOW_PRIVATE_URLS" in err.hint
    assert fetch(server.url("/cat.png"), refuse=None) == PNG


@pytest.mark.parametrize(
    "host", ["localhost", "2130706433", "0x7f000001", "017700000001", "127.1", "[::1]"]
)
def test_every_spelling_of_loopback_is_refused(server, host):
    port = server.server.server_port
    refused(f"http://{host}:{port}/cat.png", "loopback")


def test_dotted_octal_is_not_even_a_valid_url(server):
    refused(f"http://0177.0.0.1:{server.server.server_port}/cat.png", "Invalid IPv4", refuse=None)


@pytest.mark.parametrize("host", ["2130706433", "017700000001", "0x7f000001", "127.1"])
def test_odd_spellings_reach_the_address_they_resolve_to_when_allowed(server, host):
    # The refusal above is about the address, not the spelling: allowed, they fetch.
    port = server.server.server_port
    assert fetch(f"http://{host}:{port}/cat.png", refuse=None) == PNG


def test_ipv4_mapped_ipv6_literal_is_refused(server):
    refused(f"http://[::ffff:127.0.0.1]:{server.server.server_port}/cat.png", "loopback")


def test_every_redirect_hop_is_checked(server):
    assert fetch(server.url("/hop"), refuse=only_first_loopback) == PNG
    refused(server.url("/to-other-loopback"), "127.0.0.2", refuse=only_first_loopback)


def test_a_name_resolving_to_any_refused_address_is_refused(server):
    port = server.server.server_port

    def two_addresses(host, port_, type=0):  # noqa: A002 - getaddrinfo's keyword
        infos = socket.getaddrinfo("127.0.0.1", port_, type=type)
        return infos + socket.getaddrinfo("10.0.0.1", port_, type=type)

    url = f"http://images.example:{port}/cat.png"
    message = refused(
        url,
        "images.example, internal",
        refuse=lambda ip: None if ip.is_loopback else "internal",
        resolver=two_addresses,
    )
    assert "10.0.0.1" not in message.detail  # the refusal does not map the network for the client


def test_the_checked_address_is_the_one_connected_to(server):
    """A name is resolved once: the connection goes to the vetted address (no rebinding)."""
    port = server.server.server_port
    calls = []

    def rebinding(host, port_, type=0):  # noqa: A002
        calls.append(host)
        return socket.getaddrinfo("127.0.0.1", port_, type=type)

    rule = lambda ip: None if str(ip) == "127.0.0.1" else "internal"  # noqa: E731
    assert fetch(f"http://rebind.example:{port}/cat.png", refuse=rule, resolver=rebinding) == PNG
    assert calls == ["rebind.example"]


def test_redirect_loops_and_bad_schemes_are_400(server):
    refused(server.url("/loop"), "redirects more than", refuse=None)
    refused("file:///etc/passwd", "could not fetch")
    refused("ftp://example.com/x.png", "could not fetch")


def test_non_image_content_is_400_but_octet_stream_is_accepted(server):
    refused(server.url("/page.html"), "text/html", refuse=None)
    assert fetch(server.url("/binary"), refuse=None) == PNG


def test_byte_and_time_caps(server):
    refused(server.url("/cat.png"), f"over {len(PNG) - 1}", refuse=None, max_bytes=len(PNG) - 1)
    refused(server.url("/slow.png"), "took over", refuse=None, timeout_s=0.5)
