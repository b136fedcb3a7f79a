# -*- test-case-name: tests.test_tls -*-
"""
The plain-HTTP listener (C{server.redirect_http}): 301 to HTTPS, and ACME HTTP-01.

Every request is answered with C{301 https://<host><uri>} (Host as the
client sent it, port dropped) -- but only for hosts this gate serves: a
site's host or a name on one of its certificates.  Anything else gets 404,
so the listener can never be used to bounce visitors to a host an attacker
chose.  C{/.well-known/acme-challenge/<token>} is answered from the ACME
client's pending challenges, whatever the host, because that is where the
certificate authority looks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from pingated.responses import error_body

CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"

HostCheck = Callable[[str], bool]
ChallengeLookup = Callable[[str], str | None]


def split_host(raw: bytes) -> tuple[str, str] | None:
    """
    C{(host as sent without port, lowercase host)} from a Host header, or None.

    Only printable ASCII without spaces, slashes or other URL delimiters is
    accepted, so the host can be put into a Location header verbatim.
    """
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text or any(c in text for c in " \t\r\n/\\?#@%\"'<>`{}|^") or not text.isprintable():
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and text[end + 1] != ":"):
            return None
        host = text[: end + 1]
    else:
        host, _, port = text.partition(":")
        if port and not port.isdigit():
            return None
    if not host:
        return None
    return host, host.lower().rstrip(".")


class RedirectToHttps(Resource):
    """Answers every request on a plain-HTTP listener; see the module docstring."""

    isLeaf = True

    def __init__(self, host_allowed: HostCheck, challenge: ChallengeLookup) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.host_allowed = host_allowed
        self.challenge = challenge

    def render(self, request: IRequest) -> Any:
        """301 to HTTPS for known hosts; the HTTP-01 answer for pending tokens."""
        request.responseHeaders.setRawHeaders(b"server", [b"pingated"])
        path = request.path
        if path.startswith(CHALLENGE_PREFIX):
            return self._challenge(request, path[len(CHALLENGE_PREFIX) :])
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        parts = split_host(hosts[0]) if len(hosts) == 1 else None
        if parts is None:
            return error_body(request, 400, "Bad Request", "missing or invalid Host header")
        as_sent, normalized = parts
        if not self.host_allowed(normalized):
            return error_body(request, 404, "Not Found", "unknown host")
        uri = request.uri
        if not uri.startswith(b"/"):
            # absolute-form request target: keep only its path and query
            uri = b"/" + uri.split(b"://", 1)[-1].partition(b"/")[2]
        location = b"https://" + as_sent.encode("ascii") + uri
        request.setResponseCode(301)
        request.setHeader(b"location", location)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"Moved to HTTPS\n"

    def _challenge(self, request: IRequest, token: bytes) -> bytes:
        answer = None
        try:
            text = token.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if text and "/" not in text:
            answer = self.challenge(text)
        if answer is None:
            return error_body(request, 404, "Not Found", "no such challenge")
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"cache-control", b"no-store")
        return answer.encode("ascii")
