# -*- test-case-name: tests.test_identity -*-
"""
Trusted identity headers for header-SSO apps (Open WebUI, Grafana auth.proxy).

A wrapper resource: it removes every client-sent copy of the configured
header names (case-insensitively, underscore spellings included) and sets
the configured values, then hands the request on.  Without the removal,
anybody could claim to be anybody.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from pingated.headers import normalized


def apply_identity(headers: Headers, identity: Sequence[tuple[str, str]]) -> None:
    """Remove spoofed copies of the identity headers from C{headers}, then set ours."""
    if not identity:
        return
    owned = {normalized(name.encode("latin-1")) for name, _ in identity}
    for raw_name, _ in list(headers.getAllRawHeaders()):
        if normalized(raw_name) in owned:
            headers.removeHeader(raw_name)
    for name, value in identity:
        headers.addRawHeader(name.encode("latin-1"), value.encode("utf-8"))


class IdentityResource(Resource):
    """Sets the configured identity headers on every request passing through."""

    isLeaf = True

    def __init__(self, wrapped: IResource, identity: Sequence[tuple[str, str]]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.wrapped = wrapped
        self.identity = tuple(identity)

    def render(self, request: IRequest) -> Any:
        """Rewrite the identity headers in place and pass the request on."""
        apply_identity(request.requestHeaders, self.identity)
        return self.wrapped.render(request)
