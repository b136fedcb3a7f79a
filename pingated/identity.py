# -*- test-case-name: tests.test_identity -*-
"""
Trusted identity headers for header-SSO apps (Open WebUI, Grafana auth.proxy).

A wrapper resource: it removes every client-sent copy of the configured
header names (case-insensitively, underscore spellings included) and sets
the configured values, then hands the request on.  Without the removal,
anybody could claim to be anybody.

The same request headers are what the WebSocket bridge copies into the
upstream handshake, so an upgrade carries the identity too.  The forward-auth
answer (C{/verify}) returns the headers with L{set_identity_response_headers}
so nginx, Traefik or Caddy can copy them upstream themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from pingated.headers import normalized


def strip_identity(headers: Headers, identity: Sequence[tuple[str, str]]) -> None:
    """
    Remove every copy of the identity header names from C{headers}.

    Matching ignores case and treats C{_} as C{-}: servers that map headers
    to variables (CGI, WSGI, PHP) read C{X_Trusted_User} as C{X-Trusted-User}.
    """
    if not identity:
        return
    owned = {normalized(name.encode("latin-1")) for name, _ in identity}
    for raw_name, _ in list(headers.getAllRawHeaders()):
        if normalized(raw_name) in owned:
            headers.removeHeader(raw_name)


def apply_identity(headers: Headers, identity: Sequence[tuple[str, str]]) -> None:
    """Remove spoofed copies of the identity headers from C{headers}, then set ours."""
    if not identity:
        return
    strip_identity(headers, identity)
    for name, value in identity:
        headers.addRawHeader(name.encode("latin-1"), value.encode("utf-8"))


def set_identity_response_headers(headers: Headers, identity: Sequence[tuple[str, str]]) -> None:
    """
    Put the identity headers into a response (the forward-auth answer), replacing
    any of the same name, so a front proxy can copy them to the app.
    """
    for name, value in identity:
        headers.setRawHeaders(name.encode("latin-1"), [value.encode("utf-8")])


class IdentityResource(Resource):
    """
    Sets the configured identity headers on every request passing through.

    With C{anonymous=True} it only removes client-sent copies: that is the
    chain for public paths reached without a session, which must not be
    logged in as the owner by a header-SSO app.
    """

    isLeaf = True

    def __init__(
        self,
        wrapped: IResource,
        identity: Sequence[tuple[str, str]],
        anonymous: bool = False,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.wrapped = wrapped
        self.identity = tuple(identity)
        self.anonymous = anonymous

    def render(self, request: IRequest) -> Any:
        """Rewrite the identity headers in place and pass the request on."""
        if self.anonymous:
            strip_identity(request.requestHeaders, self.identity)
        else:
            apply_identity(request.requestHeaders, self.identity)
        return self.wrapped.render(request)
