"""
Tests for L{pingated.forwarding}: who the client is and how it reached us.

X-Forwarded-* and X-Real-IP are believed only from C{trusted_proxies}; from
anyone else they are ignored, so a forged header cannot change the address
the throttle counts, the logs show, or the scheme the cookie flags follow.
"""

from __future__ import annotations

import ipaddress

import pytest
from doubles import make_request
from twisted.web.test.requesthelper import DummyRequest

from pingated.config import IPNetwork
from pingated.forwarding import (
    client_ip,
    host_without_port,
    is_trusted,
    peer_ip,
    request_host,
    request_scheme,
)

TRUSTED: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n) for n in ("127.0.0.1/32", "::1/128", "10.0.0.0/8")
)


XFF = b"X-Forwarded-For"


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        # untrusted peers: every forwarding header is ignored
        ("203.0.113.7", [], "203.0.113.7"),
        ("203.0.113.7", [(XFF, b"1.2.3.4")], "203.0.113.7"),
        ("203.0.113.7", [(b"X-Real-IP", b"1.2.3.4")], "203.0.113.7"),
        ("203.0.113.7", [(XFF, b"10.0.0.1"), (b"X-Real-IP", b"127.0.0.1")], "203.0.113.7"),
        ("2001:db8::7", [(XFF, b"1.2.3.4")], "2001:db8::7"),
        # trusted peer without headers: the peer itself
        ("127.0.0.1", [], "127.0.0.1"),
        ("::1", [], "::1"),
        # trusted peer: rightmost untrusted hop of X-Forwarded-For
        ("127.0.0.1", [(XFF, b"198.51.100.9")], "198.51.100.9"),
        ("127.0.0.1", [(XFF, b"6.6.6.6, 198.51.100.9")], "198.51.100.9"),
        ("127.0.0.1", [(XFF, b"6.6.6.6,198.51.100.9, 10.1.2.3")], "198.51.100.9"),
        ("127.0.0.1", [(XFF, b"6.6.6.6"), (XFF, b"198.51.100.9")], "198.51.100.9"),
        ("10.0.0.5", [(XFF, b"127.0.0.1, 198.51.100.9, 10.0.0.4")], "198.51.100.9"),
        # a client prepending fake entries (even trusted-looking ones) gains nothing
        ("127.0.0.1", [(XFF, b"127.0.0.1, 10.0.0.1, 198.51.100.9")], "198.51.100.9"),
        ("127.0.0.1", [(XFF, b"garbage, 198.51.100.9")], "198.51.100.9"),
        ("127.0.0.1", [(XFF, b"<script>, 198.51.100.9")], "198.51.100.9"),
        # an unparsable hop stops the walk: fall back to X-Real-IP, then the peer
        ("127.0.0.1", [(XFF, b"198.51.100.9, garbage")], "127.0.0.1"),
        ("127.0.0.1", [(XFF, b"198.51.100.9, unknown"), (b"X-Real-IP", b"192.0.2.1")], "192.0.2.1"),
        # only trusted hops: the leftmost one
        ("127.0.0.1", [(XFF, b"10.0.0.9, 10.0.0.8")], "10.0.0.9"),
        # IPv6 entries, bracketed or not
        ("::1", [(XFF, b"2001:db8::5")], "2001:db8::5"),
        ("127.0.0.1", [(XFF, b"[2001:db8::5]")], "2001:db8::5"),
        ("127.0.0.1", [(XFF, b"[2001:db8::5]:4711")], "2001:db8::5"),
        ("127.0.0.1", [(XFF, b"2001:DB8:0:0::5")], "2001:db8::5"),
        # X-Real-IP from a trusted peer when there is no X-Forwarded-For
        ("127.0.0.1", [(b"X-Real-IP", b"192.0.2.1")], "192.0.2.1"),
        ("127.0.0.1", [(b"X-Real-IP", b" 192.0.2.1 ")], "192.0.2.1"),
        ("127.0.0.1", [(b"X-Real-IP", b"not-an-ip")], "127.0.0.1"),
        ("127.0.0.1", [(b"X-Real-IP", b"2001:db8::9")], "2001:db8::9"),
        # IPv4-mapped IPv6 peers are matched as IPv4
        ("::ffff:127.0.0.1", [(XFF, b"198.51.100.9")], "198.51.100.9"),
        ("::ffff:203.0.113.7", [(XFF, b"198.51.100.9")], "203.0.113.7"),
        # a UNIX socket is a local front proxy
        ("unix", [(XFF, b"198.51.100.9")], "198.51.100.9"),
    ],
)
def test_client_ip(peer: str, headers: list[tuple[bytes, bytes]], expected: str) -> None:
    """The visitor's address per the trust rules."""
    assert client_ip(make_request(peer, headers), TRUSTED) == expected


def test_no_trusted_proxies_means_peer_always() -> None:
    """With an empty trusted list even loopback headers are ignored."""
    request = make_request("127.0.0.1", [(XFF, b"198.51.100.9"), (b"X-Real-IP", b"192.0.2.1")])
    assert client_ip(request, ()) == "127.0.0.1"


def test_peer_ip() -> None:
    """The raw TCP peer, IPv4-mapped addresses unwrapped."""
    assert peer_ip(make_request("203.0.113.7")) == "203.0.113.7"
    assert peer_ip(make_request("2001:db8::1")) == "2001:db8::1"
    assert peer_ip(make_request("::ffff:203.0.113.7")) == "203.0.113.7"
    assert peer_ip(make_request("unix")) == "unix"
    bare = DummyRequest([b""])
    assert peer_ip(bare) == "unknown"


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("127.0.0.1", True),
        ("10.200.1.1", True),
        ("::1", True),
        ("11.0.0.1", False),
        ("2001:db8::1", False),
        ("unix", True),
        ("unknown", False),
        ("", False),
        ("127.0.0.1.evil", False),
    ],
)
def test_is_trusted(ip: str, expected: bool) -> None:
    """Membership in the trusted networks; anything unparsable is untrusted."""
    assert is_trusted(ip, TRUSTED) is expected


@pytest.mark.parametrize(
    ("peer", "headers", "secure", "expected"),
    [
        ("203.0.113.7", [], False, "http"),
        ("203.0.113.7", [], True, "https"),
        ("203.0.113.7", [(b"X-Forwarded-Proto", b"https")], False, "http"),
        ("2001:db8::7", [(b"X-Forwarded-Proto", b"https")], False, "http"),
        ("127.0.0.1", [(b"X-Forwarded-Proto", b"https")], False, "https"),
        ("127.0.0.1", [(b"X-Forwarded-Proto", b"HTTPS")], False, "https"),
        ("127.0.0.1", [(b"X-Forwarded-Proto", b"https, http")], False, "https"),
        ("::1", [(b"X-Forwarded-Proto", b"https")], False, "https"),
        ("127.0.0.1", [(b"X-Forwarded-Proto", b"http")], True, "https"),
        ("127.0.0.1", [(b"X-Forwarded-Proto", b"gopher")], False, "http"),
        ("127.0.0.1", [], False, "http"),
    ],
)
def test_request_scheme(
    peer: str, headers: list[tuple[bytes, bytes]], secure: bool, expected: str
) -> None:
    """TLS on our socket means https; X-Forwarded-Proto counts only from trusted peers."""
    assert request_scheme(make_request(peer, headers, secure), TRUSTED) == expected


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("203.0.113.7", [(b"Host", b"site:8443")], "site:8443"),
        ("203.0.113.7", [(b"Host", b"site"), (b"X-Forwarded-Host", b"evil.com")], "site"),
        (
            "127.0.0.1",
            [(b"Host", b"internal"), (b"X-Forwarded-Host", b"site.example")],
            "site.example",
        ),
        ("127.0.0.1", [(b"X-Forwarded-Host", b"a.example, b.example")], "a.example"),
        ("203.0.113.7", [], ""),
    ],
)
def test_request_host(peer: str, headers: list[tuple[bytes, bytes]], expected: str) -> None:
    """X-Forwarded-Host replaces Host only from a trusted peer."""
    assert request_host(make_request(peer, headers), TRUSTED) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM:8443", "example.com"),
        ("[::1]:80", "[::1]"),
        ("[::1]", "[::1]"),
        (" site ", "site"),
        ("", ""),
    ],
)
def test_host_without_port(host: str, expected: str) -> None:
    """Ports are dropped and names lower-cased; IPv6 literals keep their brackets."""
    assert host_without_port(host) == expected
