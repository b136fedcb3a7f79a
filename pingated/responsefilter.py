# -*- test-case-name: tests.test_theme -*-
"""
Response filters: how a wrapper resource rewrites a response it does not write.

The feature wrappers (theme, LLM) sit in front of the proxy, which writes
the upstream's status, headers and body straight to the request.  To change
that output without the proxy knowing, a wrapper installs a filter through
twisted.web's own hook for this, the request encoder that
L{twisted.web.server.EncodingResourceWrapper} uses for gzip: the request
passes every C{write()} through C{encode()} and calls C{finish()} before it
ends.  The first call happens before the response headers are sent, so a
filter can still change them then (drop Content-Length, add CORS headers).

Filters compose: one installed after another sees the data first, and its
output goes through the earlier one.
"""

from __future__ import annotations

from typing import Protocol

from twisted.web.iweb import IRequest, _IRequestEncoder
from twisted.web.server import Request
from zope.interface import implementer


class ResponseFilter(Protocol):
    """What a wrapper supplies: body bytes in, body bytes out; C{finish} flushes."""

    def encode(self, data: bytes) -> bytes:
        """Transform one body chunk; may hold bytes back (return less)."""

    def finish(self) -> bytes:
        """The response is ending: return whatever is still held back."""


@implementer(_IRequestEncoder)
class _Chain:
    """Two filters in a row: C{first} sees the data, then C{then}."""

    def __init__(self, first: ResponseFilter, then: ResponseFilter) -> None:
        self.first = first
        self.then = then

    def encode(self, data: bytes) -> bytes:
        return self.then.encode(self.first.encode(data))

    def finish(self) -> bytes:
        tail = self.then.encode(self.first.finish())
        return tail + self.then.finish()


def install_response_filter(request: IRequest, response_filter: ResponseFilter) -> bool:
    """
    Route everything later written to C{request} through C{response_filter}.

    Returns False (and installs nothing) for a request that is not a
    L{twisted.web.server.Request}, which has no such hook: callers fall back
    to leaving the response alone.
    """
    if not isinstance(request, Request):
        return False
    existing = request._encoder
    installed: ResponseFilter = response_filter
    if existing is not None:
        installed = _Chain(response_filter, existing)
    request._encoder = installed  # type: ignore[assignment]
    return True
