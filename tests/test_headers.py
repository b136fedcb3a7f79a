"""
Tests for header rewriting between the client and the upstream:
L{pingated.headers}, L{pingated.identity} and the proxy's
L{upstream_headers}/L{forwarded_headers} (contract section 4).

All in memory on L{DummyRequest}s: hop-by-hop removal, the gate's cookie,
identity headers that a client cannot spoof, and X-Forwarded-* that a
client cannot forge unless it is a trusted proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import pytest
from doubles import make_request
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from pingated.config import IPNetwork, UpstreamConfig
from pingated.headers import (
    end_to_end,
    header_variants,
    identity_header_names,
    normalized,
    strip_cookie,
)
from pingated.identity import IdentityResource, apply_identity
from pingated.proxy import forwarded_headers, upstream_headers, upstream_url

TRUSTED: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in ("127.0.0.1/32", "::1/128"))
UPSTREAM = UpstreamConfig(url="http://127.0.0.1:3050")


def _names(pairs: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    return [name.lower() for name, _ in pairs]


def _headers(*pairs: tuple[bytes, bytes]) -> Headers:
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    return headers


# -- hop-by-hop ---------------------------------------------------------------


def test_hop_by_hop_removed() -> None:
    """The RFC 9110 hop-by-hop set never crosses the proxy; end-to-end headers do."""
    headers = _headers(
        (b"Connection", b"keep-alive"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Checksum"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Accept", b"text/html"),
        (b"Authorization", b"Bearer app-token"),
        (b"X-Custom", b"1"),
    )
    kept = end_to_end(headers)
    assert _names(kept) == [b"accept", b"authorization", b"x-custom"]


def test_headers_named_by_connection_removed() -> None:
    """Every token of every Connection header is dropped too, case-insensitively."""
    headers = _headers(
        (b"Connection", b"close, X-Secret-Hop"),
        (b"connection", b" x-other-hop ,,"),
        (b"X-Secret-Hop", b"1"),
        (b"X-OTHER-HOP", b"2"),
        (b"X-Kept", b"3"),
    )
    assert end_to_end(headers) == [(b"X-Kept", b"3")]


def test_any_proxy_header_removed() -> None:
    """Every C{Proxy-*} header is for the hop, not the application."""
    headers = _headers((b"Proxy-Foo", b"1"), (b"proxy-bar", b"2"), (b"Proxyish", b"3"))
    assert end_to_end(headers) == [(b"Proxyish", b"3")]


def test_end_to_end_keeps_order_and_repeats() -> None:
    """Repeated headers (several Set-Cookie) stay separate and in order."""
    headers = _headers(
        (b"Set-Cookie", b"a=1; Path=/"),
        (b"Set-Cookie", b"b=2, c=3; Expires=Wed, 21 Oct 2015 07:28:00 GMT"),
        (b"Set-Cookie", b"d=4"),
    )
    assert [value for _, value in end_to_end(headers)] == [
        b"a=1; Path=/",
        b"b=2, c=3; Expires=Wed, 21 Oct 2015 07:28:00 GMT",
        b"d=4",
    ]


def test_end_to_end_also_drop() -> None:
    """Callers can drop more names (the proxy drops Host and forwarding headers)."""
    headers = _headers((b"Host", b"x"), (b"X-Forwarded-For", b"1.2.3.4"), (b"X-A", b"1"))
    assert end_to_end(headers, also_drop=[b"HOST", b"x-forwarded-for"]) == [(b"X-A", b"1")]


# -- the gate's cookie ----------------------------------------------------------


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        (b"pingated=abc.def", b""),
        (b"a=1; pingated=abc; b=2", b"a=1; b=2"),
        (b"pingated=abc;a=1", b"a=1"),
        (b"a=1;pingated=x;pingated=y;b=2", b"a=1; b=2"),
        (b"a=1; pingated_other=2; xpingated=3", b"a=1; pingated_other=2; xpingated=3"),
        (b"a=pingated=1", b"a=pingated=1"),
        (b" pingated =abc; a=1 ", b"a=1"),
        (b"a=1", b"a=1"),
        (b"", b""),
        (b"a=1;;b=2", b"a=1; b=2"),
    ],
)
def test_strip_cookie(cookie: bytes, expected: bytes) -> None:
    """Only the gate's own cookie is removed; other cookies (and look-alikes) pass."""
    assert strip_cookie(cookie, b"pingated") == expected


# -- identity -------------------------------------------------------------------


def test_identity_replaces_client_copies() -> None:
    """Every client copy (any case, underscore spellings) goes; then ours are set."""
    headers = _headers(
        (b"X-Trusted-User-Email", b"attacker@evil.com"),
        (b"x-trusted-user-email", b"attacker2@evil.com"),
        (b"X-TRUSTED-USER-EMAIL", b"attacker3@evil.com"),
        (b"X_Trusted_User_Email", b"attacker4@evil.com"),
        (b"x-trusted_user-email", b"attacker5@evil.com"),
        (b"X-Other", b"kept"),
    )
    apply_identity(headers, [("X-Trusted-User-Email", "me@example.com")])
    assert headers.getRawHeaders(b"x-trusted-user-email") == [b"me@example.com"]
    assert headers.getRawHeaders(b"x_trusted_user_email") is None
    assert headers.getRawHeaders(b"x-trusted_user-email") is None
    assert headers.getRawHeaders(b"x-other") == [b"kept"]
    everything = b" ".join(v for _, vs in headers.getAllRawHeaders() for v in vs)
    assert b"attacker" not in everything


def test_identity_several_headers_and_utf8() -> None:
    """Several identity headers are all set; values are sent as UTF-8."""
    headers = _headers((b"X-User", b"mallory"))
    apply_identity(headers, [("X-User", "jos\u00e9"), ("X-Groups", "admin")])
    assert headers.getRawHeaders(b"x-user") == ["jos\u00e9".encode()]
    assert headers.getRawHeaders(b"x-groups") == [b"admin"]


def test_identity_empty_is_noop() -> None:
    """No identity configured: client headers are left alone."""
    headers = _headers((b"X-User", b"someone"))
    apply_identity(headers, [])
    assert headers.getRawHeaders(b"x-user") == [b"someone"]


class _Recorder(Resource):
    """Stands in for the proxy behind the identity wrapper."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[tuple[bytes, list[bytes]]]] = []

    def render(self, request: Any) -> bytes:
        """Remember the headers the wrapped resource was given."""
        self.seen.append(list(request.requestHeaders.getAllRawHeaders()))
        return b"ok"


def test_identity_resource() -> None:
    """The wrapper rewrites the request's headers before the wrapped resource sees them."""
    inner = _Recorder()
    wrapper = IdentityResource(inner, [("X-WEBAUTH-USER", "admin")])
    request = make_request(headers=[(b"x-webauth-user", b"root"), (b"X_WEBAUTH_USER", b"root")])
    assert wrapper.render(request) == b"ok"
    (seen,) = inner.seen
    values = [(name.lower(), vs) for name, vs in seen if b"webauth" in name.lower()]
    assert values == [(b"x-webauth-user", [b"admin"])]


def test_header_name_helpers() -> None:
    """Variants and normalisation agree on what counts as the same header."""
    assert header_variants("X-Trusted-User") == {b"x-trusted-user", b"x_trusted_user"}
    assert identity_header_names([("X-A", "1"), ("X-B", "2")]) == {
        b"x-a",
        b"x_a",
        b"x-b",
        b"x_b",
    }
    assert normalized(b"X_Trusted_User") == normalized(b"x-trusted-user") == b"x-trusted-user"


# -- forwarding headers sent upstream ------------------------------------------


def _as_dict(pairs: Sequence[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in pairs}


def test_forwarded_from_untrusted_peer_ignores_client_values() -> None:
    """An untrusted client cannot inject addresses, scheme or host."""
    request = make_request(
        "203.0.113.7",
        [
            (b"Host", b"gate.example:8080"),
            (b"X-Forwarded-For", b"1.2.3.4"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"evil.com"),
            (b"X-Real-IP", b"5.6.7.8"),
        ],
    )
    assert _as_dict(forwarded_headers(request, TRUSTED)) == {
        b"x-forwarded-for": b"203.0.113.7",
        b"x-forwarded-proto": b"http",
        b"x-forwarded-host": b"gate.example:8080",
        b"x-real-ip": b"203.0.113.7",
    }


def test_forwarded_from_trusted_peer_appends() -> None:
    """A trusted front proxy's chain is kept and its own address appended."""
    request = make_request(
        "127.0.0.1",
        [
            (b"Host", b"internal:3060"),
            (b"X-Forwarded-For", b"198.51.100.9, 10.0.0.2"),
            (b"X-Forwarded-For", b"10.0.0.3"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"site.example"),
        ],
    )
    assert _as_dict(forwarded_headers(request, TRUSTED)) == {
        b"x-forwarded-for": b"198.51.100.9, 10.0.0.2, 10.0.0.3, 127.0.0.1",
        b"x-forwarded-proto": b"https",
        b"x-forwarded-host": b"site.example",
        b"x-real-ip": b"10.0.0.3",
    }


def test_forwarded_over_tls() -> None:
    """A direct TLS client is reported as https."""
    request = make_request("2001:db8::7", [(b"Host", b"site")], secure=True)
    forwarded = _as_dict(forwarded_headers(request, TRUSTED))
    assert forwarded[b"x-forwarded-proto"] == b"https"
    assert forwarded[b"x-forwarded-for"] == b"2001:db8::7"


def _upstream(request: DummyRequest, upstream: UpstreamConfig = UPSTREAM) -> Headers:
    return upstream_headers(request, upstream, TRUSTED)  # type: ignore[arg-type]


def test_upstream_headers_untrusted() -> None:
    """Client forwarding headers are replaced (one value each), not passed along."""
    request = make_request(
        "203.0.113.7",
        [
            (b"Host", b"gate.example"),
            (b"X-Forwarded-For", b"1.2.3.4"),
            (b"x-forwarded-for", b"5.6.7.8"),
            (b"X-Real-IP", b"9.9.9.9"),
            (b"X-Forwarded-Proto", b"https"),
            (b"Forwarded", b"for=1.2.3.4;proto=https"),
            (b"Accept", b"*/*"),
        ],
    )
    headers = _upstream(request)
    assert not headers.hasHeader(b"forwarded")
    assert headers.getRawHeaders(b"x-forwarded-for") == [b"203.0.113.7"]
    assert headers.getRawHeaders(b"x-real-ip") == [b"203.0.113.7"]
    assert headers.getRawHeaders(b"x-forwarded-proto") == [b"http"]
    assert headers.getRawHeaders(b"x-forwarded-host") == [b"gate.example"]
    assert headers.getRawHeaders(b"host") == [b"127.0.0.1:3050"]
    assert headers.getRawHeaders(b"accept") == [b"*/*"]


def test_upstream_headers_hop_by_hop_and_length() -> None:
    """Hop-by-hop headers, and Content-Length (the Agent frames the body), are not copied."""
    request = make_request(
        headers=[
            (b"Host", b"gate"),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"X-Hop", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Authorization", b"Basic eA=="),
            (b"Upgrade", b"h2c"),
            (b"TE", b"trailers"),
            (b"Content-Length", b"5"),
            (b"Cookie", b"a=1"),
        ]
    )
    headers = _upstream(request)
    names = {name.lower() for name, _ in headers.getAllRawHeaders()}
    for hop in (b"connection", b"x-hop", b"keep-alive", b"proxy-authorization", b"upgrade", b"te"):
        assert hop not in names
    assert b"content-length" not in names
    assert headers.getRawHeaders(b"cookie") == [b"a=1"]


def test_upstream_headers_preserve_host() -> None:
    """C{preserve_host = true} sends the client's Host upstream."""
    request = make_request(headers=[(b"Host", b"app.example:8443")])
    preserved = UpstreamConfig(url="http://127.0.0.1:3050", preserve_host=True)
    assert _upstream(request, preserved).getRawHeaders(b"host") == [b"app.example:8443"]
    assert _upstream(request).getRawHeaders(b"host") == [b"127.0.0.1:3050"]


def test_upstream_headers_keep_repeats() -> None:
    """End-to-end repeated headers reach the upstream intact and in order."""
    request = make_request(headers=[(b"X-Multi", b"1"), (b"X-Multi", b"2"), (b"X-Multi", b"3")])
    assert _upstream(request).getRawHeaders(b"x-multi") == [b"1", b"2", b"3"]


@pytest.mark.parametrize(
    ("base", "uri", "expected"),
    [
        ("http://u:1", b"/a?x=1&x=2&y", b"http://u:1/a?x=1&x=2&y"),
        ("http://u:1/", b"/a?b=%2F%20+&&c", b"http://u:1/a?b=%2F%20+&&c"),
        ("http://u:1/base", b"/a?z=1&a=2", b"http://u:1/base/a?z=1&a=2"),
        ("http://u:1", b"http://gate/x?q=1", b"http://u:1/x?q=1"),
    ],
)
def test_upstream_url_query_byte_for_byte(base: str, uri: bytes, expected: bytes) -> None:
    """The query string reaches the upstream exactly as sent (repeats, order, encoding)."""
    assert upstream_url(base, uri) == expected
