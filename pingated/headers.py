# -*- test-case-name: tests.test_headers -*-
"""
Header rewriting between the client and the upstream.

Pure functions over L{Headers} so each rule (hop-by-hop removal, the gate's
cookie, identity headers, X-Forwarded-*) is unit-tested without a network.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from twisted.web.http_headers import Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def end_to_end(headers: Headers, also_drop: Iterable[bytes] = ()) -> list[tuple[bytes, bytes]]:
    """
    The (name, value) pairs that may cross the proxy, order and repeats kept.

    Drops the hop-by-hop set, anything C{Connection} names, and C{also_drop}.
    """
    drop = set(HOP_BY_HOP) | _connection_tokens(headers) | {n.lower() for n in also_drop}
    result = []
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in drop or lower.startswith(b"proxy-"):
            continue
        for value in values:
            result.append((name, value))
    return result


def strip_cookie(cookie_header: bytes, cookie_name: bytes) -> bytes:
    """The Cookie header without the gate's own cookie (other cookies untouched)."""
    kept = []
    for part in cookie_header.split(b";"):
        name = part.split(b"=", 1)[0].strip()
        if name == cookie_name:
            continue
        if part.strip():
            kept.append(part.strip())
    return b"; ".join(kept)


def remove_cookie(headers: Headers, cookie_name: bytes) -> None:
    """Drop one cookie from every Cookie header in C{headers}, and empty headers with it."""
    cookies = headers.getRawHeaders(b"cookie")
    if not cookies:
        return
    kept = [value for value in (strip_cookie(c, cookie_name) for c in cookies) if value]
    if kept:
        headers.setRawHeaders(b"cookie", kept)
    else:
        headers.removeHeader(b"cookie")


def header_variants(name: str) -> set[bytes]:
    """
    All spellings a server might read as the same header.

    Some servers (WSGI/CGI-style) map C{X-Trusted_User} and C{X-Trusted-User}
    to one variable, so both are removed from the client's request.
    """
    lower = name.lower()
    return {lower.encode("latin-1"), lower.replace("-", "_").encode("latin-1")}


def identity_header_names(identity: Sequence[tuple[str, str]]) -> set[bytes]:
    """Lower-cased header names (and their underscore variants) the gate owns."""
    names: set[bytes] = set()
    for name, _ in identity:
        names |= header_variants(name)
    return names


def normalized(name: bytes) -> bytes:
    """Lower-case, underscores as dashes: how spoofed identity copies are recognised."""
    return name.lower().replace(b"_", b"-")
