# -*- test-case-name: tests.test_proxy -*-
"""
The HTTP server side: twisted.web's Site, tuned for a proxy.

Sets TCP_NODELAY so streamed chunks (SSE tokens) leave at once instead of
waiting on Nagle, never shows tracebacks, and keeps access logging off the
hot path unless asked for.
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site


class GateChannel(HTTPChannel):
    """An HTTP/1.1 channel whose writes are not delayed by Nagle's algorithm."""

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass  # UNIX sockets have no Nagle


class GateSite(Site):
    """The Site serving the gate; one per process, shared by every listener."""

    displayTracebacks = False
    protocol = GateChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        reactor: Any = None,
        request_factory: type[Request] = Request,
        access_log: bool = False,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            resource, requestFactory=request_factory, reactor=reactor
        )
        self.access_log = access_log

    def log(self, request: Any) -> None:
        """Access lines only when enabled: one log write per request costs throughput."""
        if self.access_log:
            super().log(request)
