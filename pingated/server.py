# -*- test-case-name: tests.test_proxy -*-
"""
The HTTP server side: twisted.web's Site, tuned for a proxy.

Sets TCP_NODELAY so streamed chunks (SSE tokens) leave at once instead of
waiting on Nagle, never shows tracebacks, and keeps access logging off the
hot path unless asked for.

The channel is also stricter than twisted.web about request framing,
because whatever it lets through is forwarded to an upstream whose parser
may disagree (request smuggling): folded header lines, any
Transfer-Encoding but C{chunked} (and any on HTTP/1.0), a second Host and
request targets that are not a path get 400; too-large headers get 431; a
client that has not finished its headers within C{header_timeout} gets 408
(slowloris).  Twisted itself already refuses Content-Length together with
Transfer-Encoding, repeated Content-Length and malformed lengths or chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


class GateChannel(HTTPChannel):
    """
    An HTTP/1.1 channel whose writes are not delayed by Nagle's algorithm and
    that refuses ambiguous or slow request headers before any resource sees them.
    """

    # Seconds from a request's first byte to the end of its headers; set for
    # each connection by GateSite.buildProtocol.  None or 0: no limit.
    header_timeout: float | None = None
    _header_timer: IDelayedCall | None = None
    _awaiting_request_line = True

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass  # UNIX sockets have no Nagle

    def dataReceived(self, data: bytes) -> None:
        """Start the header clock on the first byte of a request."""
        if (
            self._header_timer is None
            and self.header_timeout
            and self.line_mode
            and not self._handlingRequest
        ):
            self._header_timer = self.callLater(  # type: ignore[no-untyped-call]
                self.header_timeout, self._headers_too_slow
            )
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def lineReceived(self, line: bytes) -> None:
        """Refuse folded lines, non-path targets and oversized headers; parse the rest."""
        if self._awaiting_request_line:
            if line:
                self._awaiting_request_line = False
                parts = line.split(b" ")
                if len(parts) == 3 and not (
                    parts[1].startswith(b"/") or (parts[1] == b"*" and parts[0] == b"OPTIONS")
                ):
                    # absolute-form or authority-form: we are not a forward proxy.
                    self._refuse(400)
                    return
        elif line[:1] in (b" ", b"\t"):
            # obs-fold (RFC 9112 section 5.2): refused rather than guessed at.
            self._refuse(400)
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse(431)
            return
        super().lineReceived(line)  # type: ignore[no-untyped-call]

    def headerReceived(self, line: bytes) -> bool:
        """One header line: framing headers must be unambiguous."""
        name, sep, value = line.partition(b":")
        lowered = name.lower()
        if sep and lowered == b"transfer-encoding":
            if value.strip(b" \t").lower() != b"chunked" or self._version != b"HTTP/1.1":
                self._refuse(400)
                return False
        elif sep and lowered == b"host" and self.requests:
            if self.requests[-1].requestHeaders.hasHeader(b"host"):
                self._refuse(400)
                return False
        return bool(super().headerReceived(line))  # type: ignore[no-untyped-call]

    def allHeadersReceived(self) -> None:
        """The headers are complete in time: stop the header clock."""
        self._cancel_header_timer()
        super().allHeadersReceived()  # type: ignore[no-untyped-call]

    def allContentReceived(self) -> None:
        """The next line on this connection is the next request's first."""
        self._awaiting_request_line = True
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def lineLengthExceeded(self, line: bytes) -> None:
        """One line longer than C{MAX_LENGTH}: 414 for the request line, else 431."""
        self._refuse(414 if self._awaiting_request_line else 431)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's own refusals (Content-Length with Transfer-Encoding, bad
        # chunks, ...) get the same complete answer as ours.
        self._refuse(400)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_header_timer()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self._refuse(408)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            if self._header_timer.active():
                self._header_timer.cancel()
            self._header_timer = None

    def _refuse(self, status: int) -> None:
        """Answer with a bare status and close: nothing of the request is used."""
        self._cancel_header_timer()
        if self.transport is None or getattr(self.transport, "disconnecting", False):
            return
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            % (status, _REASONS[status])
        )
        self.loseConnection()  # type: ignore[no-untyped-call]


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
        stream_body: Callable[[bytes], bool] | None = None,
        header_timeout: float | None = 30.0,
        request_done: Callable[[Any], object] | None = None,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            resource, requestFactory=request_factory, reactor=reactor
        )
        self.access_log = access_log
        # Called once per answered request (metrics, access lines): see tap.py.
        self.request_done = request_done
        # server.header_timeout; may change on SIGHUP (new connections use it).
        self.header_timeout = header_timeout
        # Which request targets get their body streamed (pingated.streaming)
        # instead of spooled: everything but the gate's own form pages.
        self.stream_body = stream_body

    def buildProtocol(self, addr: IAddress | None) -> Any:
        """A L{GateChannel} that enforces this site's current header timeout."""
        channel = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        if isinstance(channel, GateChannel):
            channel.header_timeout = self.header_timeout
        return channel

    def log(self, request: Any) -> None:
        """Access lines only when enabled: one log write per request costs throughput."""
        if self.request_done is not None:
            self.request_done(request)
        if self.access_log:
            super().log(request)
