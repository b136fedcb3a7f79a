# -*- test-case-name: tests.test_verify -*-
"""
Forward-auth: C{<prefix>/verify} for a front proxy that asks before it serves.

nginx (C{auth_request}), Traefik (C{forwardAuth}) and Caddy (C{forward_auth})
each send the visitor's headers (cookies included) to this route and proxy
the request themselves when the answer is 2xx.  The route therefore has to
learn what the visitor originally asked for from headers the proxy adds, and
answer in the shape that proxy understands:

  - nginx only honours 2xx/401/403 from an auth subrequest, so it gets a 401
    carrying the login URL in C{X-Pingated-Login} and turns that into a
    redirect itself (see C{etc/nginx/}).
  - Traefik and Caddy copy a non-2xx answer to the visitor as it is, so they
    get the same 302 / 401 JSON a protected page would give.

Headers describing the original request are only believed from
C{server.trusted_proxies}: otherwise anybody could choose the URL a login
page sends people on to.  Upgrade/Connection headers (a WebSocket handshake
passing through the front proxy) are deliberately ignored: the verdict is
the same with or without them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode, urlsplit

import attrs
from twisted.web.iweb import IRequest

from pingated.config import IPNetwork
from pingated.forwarding import (
    host_without_port,
    is_trusted,
    peer_ip,
    request_host,
    request_scheme,
)
from pingated.redirects import safe_next
from pingated.responses import json_body

if TYPE_CHECKING:
    from pingated.gate import GateContext

LOGIN_HEADER = b"X-Pingated-Login"

# nginx's auth_request subrequest keeps the visitor's method (Traefik and
# Caddy use GET), so verify must answer every method a visitor may use.
VERIFY_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

# A host as it may appear in a URL authority: a DNS name or IPv4 address, or
# a bracketed IPv6 address, with an optional port.  Anything else (spaces,
# "@", "/", control characters) is refused rather than put into a Location.
_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.\-_]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$"
)

# Characters left as they are when a raw request URI is made into a URL; the
# rest (space, quotes, backslash, non-ASCII bytes) are percent-encoded so the
# URL survives being put into a header and through L{safe_next}.
_URI_SAFE = "".join(
    chr(c) for c in range(0x21, 0x7F) if chr(c) not in ' "<>\\^`{|}'
)


@attrs.frozen
class OriginalRequest:
    """What the front proxy says the visitor asked for."""

    url: str
    """The absolute http(s) URL, or C{""} when unknown or not believed."""

    host: str
    """C{host[:port]} of that URL (C{""} when unknown)."""

    method: str
    """The visitor's method (the proxy may call verify with GET regardless)."""

    from_nginx: bool
    """nginx style (C{X-Original-URI}/C{X-Original-URL}): answer 401, not 302."""

    @property
    def scheme(self) -> str:
        """C{http} or C{https}; C{""} when the URL is unknown."""
        return self.url.split("://", 1)[0] if self.url else ""


def _first(request: IRequest, name: bytes) -> str | None:
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    return str(values[0].decode("latin-1").strip())


def _first_token(request: IRequest, name: bytes) -> str | None:
    # X-Forwarded-Host/Proto may carry one entry per hop; the first is the visitor's.
    value = _first(request, name)
    if value is None:
        return None
    return value.split(",")[0].strip() or None


def _encode_uri(uri: str) -> str | None:
    """A raw request URI made safe for a URL; None when it is not a path."""
    if not uri.startswith("/") or uri.startswith("//"):
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        return None
    return quote(uri.encode("latin-1"), safe=_URI_SAFE)


def build_url(scheme: str, host: str, uri: str) -> str | None:
    """C{scheme://host/uri} when every part is plausible, else None."""
    scheme = scheme.lower()
    if scheme not in ("http", "https") or not _HOST.match(host):
        return None
    path = _encode_uri(uri)
    if path is None:
        return None
    return f"{scheme}://{host.lower()}{path}"


def _from_absolute(url: str) -> tuple[str, str] | None:
    """(url, host) for an absolute C{X-Original-URL}, or None if it is not one."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    uri = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    built = build_url(parts.scheme, parts.netloc, uri)
    if built is None:
        return None
    return built, parts.netloc.lower()


def original_request(request: IRequest, trusted: Sequence[IPNetwork]) -> OriginalRequest:
    """
    Read the original request from the proxy's headers (contract section 3a).

    The style (nginx or not) is told from which headers are present; their
    values are used only when the caller is a trusted proxy.
    """
    headers = request.requestHeaders
    from_nginx = bool(headers.hasHeader(b"x-original-url") or headers.hasHeader(b"x-original-uri"))
    own_method = request.method.decode("latin-1")
    unknown = OriginalRequest("", "", own_method, from_nginx)
    if not is_trusted(peer_ip(request), trusted):
        return unknown
    scheme = request_scheme(request, trusted)
    if from_nginx:
        method = _first(request, b"x-original-method") or own_method
        absolute = _first(request, b"x-original-url")
        if absolute is not None:
            found = _from_absolute(absolute)
        else:
            host = _first(request, b"x-original-host") or _first(request, b"host") or ""
            url = build_url(scheme, host, _first(request, b"x-original-uri") or "")
            found = (url, host.lower()) if url else None
    elif headers.hasHeader(b"x-forwarded-uri"):
        method = _first(request, b"x-forwarded-method") or own_method
        host = _first_token(request, b"x-forwarded-host") or _first(request, b"host") or ""
        url = build_url(scheme, host, _first(request, b"x-forwarded-uri") or "")
        found = (url, host.lower()) if url else None
    else:
        return unknown
    if found is None:
        return attrs.evolve(unknown, method=method.upper())
    return OriginalRequest(found[0], found[1], method.upper(), from_nginx)


def _with_next(base: str, next_target: str | None) -> str:
    if not next_target:
        return base
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}{urlencode({'next': next_target})}"


def login_location(context: GateContext, original: OriginalRequest) -> str:
    """
    Where the visitor must go to log in, with C{next} = the original URL.

    Without C{gate.login_url} the login page is the gate's own page on the
    original host (the front proxy routes C{<prefix>/} there), as an absolute
    URL.  With it, C{next} is kept only when the login page will accept it:
    on the login host or inside C{cookie_domain}.
    """
    gate = context.gate
    if gate.login_url:
        login_host = urlsplit(gate.login_url).netloc
        keep = original.url and safe_next(original.url, login_host, gate.cookie_domain) == (
            original.url
        )
        return _with_next(gate.login_url, original.url if keep else None)
    if original.url:
        base = f"{original.scheme}://{original.host}{gate.prefix}/login"
        return _with_next(base, original.url)
    return f"{gate.prefix}/login"


def _is_navigation(request: IRequest, method: str) -> bool:
    # A browser navigation; Upgrade/Connection are not looked at on purpose.
    if method not in ("GET", "HEAD"):
        return False
    accept = b",".join(request.requestHeaders.getRawHeaders(b"accept", []))
    return b"text/html" in accept.lower()


def verify(context: GateContext, request: IRequest) -> bytes:
    """
    Answer one forward-auth call (contract section 3a).

    Valid session: 200, empty body, the identity headers of the site the
    original host belongs to (so the proxy can copy them upstream).  No
    session: 401 + C{X-Pingated-Login} for nginx, 302 to the login page for
    a browser navigation, 401 JSON for anything else.
    """
    trusted = context.trusted
    original = original_request(request, trusted)
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    if context.current_session(request) is not None:
        host = original.host or request_host(request, trusted)
        for name, value in context.identity_for(host_without_port(host).rstrip(".")):
            request.responseHeaders.setRawHeaders(
                name.encode("latin-1"), [value.encode("utf-8")]
            )
        return _empty(request, 200)
    location = login_location(context, original)
    if original.from_nginx:
        # nginx reads only the headers of an auth answer; a body would
        # stop it from reusing the connection.
        request.responseHeaders.setRawHeaders(LOGIN_HEADER, [location.encode("utf-8")])
        return _empty(request, 401)
    if _is_navigation(request, original.method):
        request.responseHeaders.setRawHeaders(b"location", [location.encode("utf-8")])
        return _empty(request, 302)
    return json_body(request, 401, {"error": "login required", "login": location})


def _empty(request: IRequest, status: int) -> bytes:
    """
    An answer without a body, declared as such: nginx and Go (Traefik, Caddy)
    keep the connection to the gate open only when they know the body is
    empty (an unframed or chunked empty body costs a new connection per
    request).
    """
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-length", [b"0"])
    return b""
