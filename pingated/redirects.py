# -*- test-case-name: tests.test_redirects -*-
"""
Which C{next} targets a login may redirect to.

An open redirect on a login page is a phishing tool, so the rule is an
allow-list: a plain same-site path, or an absolute http(s) URL on the
request's own host or inside C{cookie_domain}.  Everything else becomes C{/}.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from pingated.forwarding import host_without_port

FALLBACK = "/"


def _has_forbidden_characters(text: str) -> bool:
    # Control characters, whitespace, backslashes and anything non-ASCII
    # (look-alike slashes, RTL marks) never appear in a URL we produced.
    return any(ord(c) <= 0x20 or ord(c) >= 0x7F or c == "\\" for c in text)


def _collapses_to_double_slash(path: str) -> bool:
    # "/.//evil" or "/a/..//evil" become "//evil" once a browser or an
    # upstream removes dot segments (RFC 3986 5.2.4), and "//evil" is a host.
    kept: list[str] = []
    for segment in path.split("/"):
        if segment == ".":
            continue
        if segment == "..":
            if len(kept) > 1:
                kept.pop()
            continue
        kept.append(segment)
    return "/".join(kept).startswith("//")


def host_in_domain(host: str, cookie_domain: str) -> bool:
    """True when C{host} is C{cookie_domain} itself or a name below it."""
    domain = cookie_domain.lower().lstrip(".")
    host = host.lower().rstrip(".")
    if not domain or not host:
        return False
    return host == domain or host.endswith("." + domain)


def safe_next(raw: str | None, request_host: str, cookie_domain: str = "") -> str:
    """
    C{raw} if it is safe to redirect to after login, otherwise C{/}.

    C{request_host} is the Host the visitor used; absolute URLs must point at
    it, or inside C{cookie_domain} when one login covers many subdomains.
    """
    if not raw or len(raw) > 4096 or _has_forbidden_characters(raw):
        return FALLBACK
    decoded = unquote(raw)
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c == "\\" for c in decoded):
        return FALLBACK
    if raw.startswith("/"):
        if raw.startswith("//") or decoded.startswith(("//", "/\\")):
            return FALLBACK
        if _collapses_to_double_slash(decoded.split("?", 1)[0].split("#", 1)[0]):
            return FALLBACK
        parts = urlsplit(raw)
        if parts.scheme or parts.netloc:
            return FALLBACK
        return raw
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018  (an invalid port raises here)
    except ValueError:
        return FALLBACK
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return FALLBACK
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        return FALLBACK
    if not raw.lower().startswith(parts.scheme + "://"):
        return FALLBACK
    host = parts.hostname.lower()
    own_host = host_without_port(request_host).strip("[]")
    if host == own_host or (cookie_domain and host_in_domain(host, cookie_domain)):
        return raw
    return FALLBACK
