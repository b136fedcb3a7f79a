# -*- test-case-name: tests.test_proxy -*-
"""
The streaming HTTP reverse proxy: the resource at the end of the wrapper chain.

Built on L{twisted.web.client.Agent} with a persistent connection pool.
Response bodies are written to the client as each chunk arrives, and the
upstream transport is registered as the request's producer so a slow client
pauses the upstream instead of the gate buffering the body.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pingated.config import IPNetwork, UpstreamConfig
from pingated.forwarding import client_ip, is_trusted, peer_ip, request_host, request_scheme
from pingated.headers import end_to_end
from pingated.metrics import UpstreamMetrics, upstream_error_kind
from pingated.responses import error_body, write_error
from pingated.streaming import StreamingBody

log = Logger(namespace="pingated.proxy")

_NO_BODY_CODES = frozenset({204, 304})

# Headers the proxy sets itself from what it knows about the client.
_FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip")


def upstream_url(base: str, uri: bytes) -> bytes:
    """The upstream URL for a request URI: base path + path + query, query byte for byte."""
    if not uri.startswith(b"/"):
        # Absolute-form request target ("GET http://host/x HTTP/1.1"): keep path and query.
        parts = urlsplit(uri)
        uri = (parts.path or b"/") + (b"?" + parts.query if parts.query else b"")
    return base.rstrip("/").encode("ascii") + uri


def forwarded_headers(request: Request, trusted: Sequence[IPNetwork]) -> list[tuple[bytes, bytes]]:
    """X-Forwarded-For/Proto/Host and X-Real-IP, believing the client only if trusted."""
    peer = peer_ip(request)
    chain = []
    if is_trusted(peer, trusted):
        chain = [
            hop.strip()
            for value in request.requestHeaders.getRawHeaders(b"x-forwarded-for", [])
            for hop in value.split(b",")
            if hop.strip()
        ]
    chain.append(peer.encode("ascii"))
    return [
        (b"X-Forwarded-For", b", ".join(chain)),
        (b"X-Forwarded-Proto", request_scheme(request, trusted).encode("ascii")),
        (b"X-Forwarded-Host", request_host(request, trusted).encode("latin-1")),
        (b"X-Real-IP", client_ip(request, trusted).encode("ascii")),
    ]


def upstream_headers(
    request: Request, upstream: UpstreamConfig, trusted: Sequence[IPNetwork]
) -> Headers:
    """The headers sent upstream: end-to-end client headers plus forwarding facts."""
    headers = Headers()
    drop = {b"host", b"content-length", b"expect", *_FORWARDED}
    if not is_trusted(peer_ip(request), trusted):
        # RFC 7239 Forwarded says the same as X-Forwarded-*: only a trusted
        # proxy may make such claims to the upstream.
        drop.add(b"forwarded")
    for name, value in end_to_end(request.requestHeaders, also_drop=drop):
        headers.addRawHeader(name, value)
    if upstream.preserve_host:
        host = request.requestHeaders.getRawHeaders(b"host", [b""])[0]
    else:
        host = urlsplit(upstream.url).netloc.encode("ascii")
    headers.setRawHeaders(b"host", [host])
    for name, value in forwarded_headers(request, trusted):
        headers.setRawHeaders(name, [value])
    return headers


def _declared_length(request: Request) -> int | None:
    values = request.requestHeaders.getRawHeaders(b"content-length")
    if not values:
        return None
    try:
        return int(values[0])
    except ValueError:
        return None


def _spooled_length(request: Request) -> int | None:
    content: Any = request.content
    if content is None or not _has_body(request):
        return None
    size = content.seek(0, 2)
    content.seek(0, 0)
    return int(size)


def _has_body(request: Request) -> bool:
    headers = request.requestHeaders
    return bool(headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding"))


def body_producer(request: Request) -> IBodyProducer | None:
    """
    What the Agent sends as the request body, or None for a bodiless request.

    A request class that streams its body (see L{pingated.streaming}) offers
    C{body_producer}; otherwise the body twisted.web already spooled is sent.
    """
    streaming: IBodyProducer | None = getattr(request, "body_producer", None)
    if streaming is not None:
        return streaming
    if not _has_body(request):
        return None
    content: Any = request.content
    content.seek(0, 0)
    return FileBodyProducer(content)


class _BodyForwarder(Protocol):
    """Copies the upstream body to the client chunk by chunk, with backpressure."""

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.exchange.body_transport = self.transport
        if not self.exchange.client_gone:
            self.exchange.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.exchange.touch()
        if not self.exchange.client_gone:
            self.exchange.request.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.exchange.body_done(reason)


class _Exchange:
    """One proxied request/response pair, tracking timers and who went away first."""

    def __init__(self, resource: ProxyResource, request: Request) -> None:
        self.resource = resource
        self.request = request
        self.clock = resource.clock
        self.client_gone = False
        self.timed_out = False
        self.too_large = False
        self.response_started = False
        self.pending: Deferred[IResponse] | None = None
        self.body_transport: Any = None
        self.idle_call: IDelayedCall | None = None
        self.last_activity = 0.0
        self.sent_at = 0.0

    def start(self) -> None:
        request = self.request
        upstream = self.resource.upstream
        url = upstream_url(upstream.url, request.uri)
        headers = upstream_headers(request, upstream, self.resource.trusted)
        producer = body_producer(request)
        if isinstance(producer, StreamingBody):
            producer.set_limit(upstream.max_request_body, self._body_too_large)
            producer.on_progress = self.touch
        self.touch()
        self.sent_at = self.last_activity
        request.notifyFinish().addErrback(self._client_lost)
        self.pending = self.resource.agent.request(request.method, url, headers, producer)
        self.pending.addCallbacks(self._got_response, self._request_failed)

    # Idle timer: no byte either way for idle_timeout seconds.  Bytes only
    # record the time; the one timer re-arms itself for the remainder when it
    # fires early, so a busy stream costs no timer operation per chunk.
    def touch(self) -> None:
        """Note activity; called for every chunk that moves."""
        self.last_activity = self.clock.seconds()
        if self.idle_call is None and self.resource.upstream.idle_timeout > 0:
            self.idle_call = self.clock.callLater(
                self.resource.upstream.idle_timeout, self._idle_check
            )

    def _stop_timer(self) -> None:
        if self.idle_call is not None and self.idle_call.active():
            self.idle_call.cancel()
        self.idle_call = None

    def _idle_check(self) -> None:
        timeout = self.resource.upstream.idle_timeout
        quiet = self.clock.seconds() - self.last_activity
        if quiet < timeout:
            self.idle_call = self.clock.callLater(timeout - quiet, self._idle_check)
            return
        self.idle_call = None
        self._idle()

    def _idle(self) -> None:
        self.timed_out = True
        if self.pending is not None and not self.response_started:
            self.pending.cancel()
        elif self.body_transport is not None:
            # Headers already went out: all we can do is cut the client off too.
            self.body_transport.stopProducing()

    def _body_too_large(self) -> None:
        """A chunked upload crossed C{max_request_body}."""
        if self.client_gone:
            return
        if self.pending is not None and not self.response_started:
            self.too_large = True
            self.pending.cancel()
            return
        # The answer is already on its way: cut both legs.
        if self.body_transport is not None:
            self.body_transport.stopProducing()
        _abort(self.request)

    def _client_lost(self, failure: Failure) -> None:
        self.client_gone = True
        self._stop_timer()
        if self.pending is not None and not self.response_started:
            self.pending.cancel()
        elif self.body_transport is not None:
            self.body_transport.stopProducing()

    def _got_response(self, response: IResponse) -> None:
        self.response_started = True
        self.pending = None
        self.touch()
        if self.resource.metrics is not None:
            self.resource.metrics.response(self.last_activity - self.sent_at)
        if self.client_gone:
            response.deliverBody(_Discard())
            return
        request = self.request
        request.setResponseCode(response.code, response.phrase)
        headers = request.responseHeaders
        headers.removeHeader(b"server")
        headers.removeHeader(b"date")
        for name, value in end_to_end(response.headers):
            headers.addRawHeader(name, value)
        # The client parser keeps Content-Length to itself; restore it so the
        # client gets the same framing (and download progress) as directly.
        if (
            isinstance(response.length, int)
            and response.code not in _NO_BODY_CODES
            and request.method != b"HEAD"
        ):
            headers.setRawHeaders(b"content-length", [str(response.length).encode("ascii")])
        response.deliverBody(_BodyForwarder(self))

    def body_done(self, reason: Failure) -> None:
        self._stop_timer()
        if self.client_gone:
            return
        request = self.request
        request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
            return
        # The upstream died mid-body (or went idle): never pass a truncated
        # body off as complete, abort the client connection instead.
        log.info(
            "upstream body failed for {method} {uri}: {why}",
            method=request.method.decode("latin-1"),
            uri=request.path.decode("latin-1"),
            why=reason.getErrorMessage(),
        )
        if self.resource.metrics is not None:
            self.resource.metrics.error("idle_timeout" if self.timed_out else "body_interrupted")
        _abort(request)

    def _request_failed(self, failure: Failure) -> None:
        self._stop_timer()
        self.pending = None
        if self.client_gone:
            return
        if self.too_large:
            status, title, message = 413, "Payload Too Large", "request body too large"
        elif self.timed_out:
            status, title, message = 504, "Gateway Timeout", "upstream did not answer in time"
        else:
            status, title, message = _classify(failure)
        log.info(
            "upstream error {status} for {method}: {why}",
            status=status,
            method=self.request.method.decode("latin-1"),
            why=_reason(failure),
        )
        self.resource.on_upstream_error(status)
        if self.resource.metrics is not None and not self.too_large:
            kind = "idle_timeout" if self.timed_out else upstream_error_kind(failure)
            self.resource.metrics.error(kind)
        write_error(self.request, status, title, message)


def _abort(request: Request) -> None:
    """Drop the client connection at once: a truncated answer must not look complete."""
    channel: Any = getattr(request, "channel", None)
    transport: Any = channel.transport if channel is not None else None
    if transport is None:
        return
    if hasattr(transport, "abortConnection"):
        transport.abortConnection()
    else:
        transport.loseConnection()


class _Discard(Protocol):
    """Swallows a body nobody is waiting for, so the connection can be reused or closed."""

    def dataReceived(self, data: bytes) -> None:
        pass


def _reason(failure: Failure) -> str:
    if failure.check(ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed):
        reasons = getattr(failure.value, "reasons", [])
        if reasons:
            return "; ".join(r.getErrorMessage() for r in reasons)
    return failure.getErrorMessage()


def _classify(failure: Failure) -> tuple[int, str, str]:
    if failure.check(neterror.TimeoutError, CancelledError):
        return 502, "Bad Gateway", "upstream connection timed out"
    if failure.check(RequestGenerationFailed):
        return 502, "Bad Gateway", "request could not be sent upstream"
    return 502, "Bad Gateway", "upstream unreachable"


class ProxyResource(Resource):
    """
    Forwards every request it renders to one upstream.

    The last link of the wrapper chain: it knows nothing of sessions, themes
    or identity; wrappers in front of it have already adjusted the request.
    """

    isLeaf = True

    def __init__(
        self,
        agent: IAgent,
        upstream: UpstreamConfig,
        trusted: Sequence[IPNetwork],
        clock: IReactorTime,
        websocket: Resource | None = None,
        metrics: UpstreamMetrics | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.agent = agent
        # Latency and error counters for this upstream (pingated.metrics).
        self.metrics = metrics
        self.upstream = upstream
        self.trusted = tuple(trusted)
        self.clock = clock
        self.websocket = websocket
        self.errors: dict[int, int] = {}

    def on_upstream_error(self, status: int) -> None:
        """Count upstream failures by status (read by metrics)."""
        self.errors[status] = self.errors.get(status, 0) + 1

    def render(self, request: Request) -> bytes | int:
        """Start the upstream exchange; the answer is written as it arrives."""
        if _is_websocket_upgrade(request):
            if self.websocket is not None:
                return self.websocket.render(request)  # type: ignore[no-any-return]
            return _finish_now(request, 501, "Not Implemented", "WebSocket is not supported")
        declared = _declared_length(request)
        if declared is None and getattr(request, "body_producer", None) is None:
            # A body twisted.web already spooled (not streamed): its real size.
            declared = _spooled_length(request)
        if declared is not None and declared > self.upstream.max_request_body:
            return _finish_now(request, 413, "Payload Too Large", "request body too large")
        request.defaultContentType = None  # type: ignore[attr-defined]
        _Exchange(self, request).start()
        return NOT_DONE_YET


def _is_websocket_upgrade(request: Request) -> bool:
    upgrade = b",".join(request.requestHeaders.getRawHeaders(b"upgrade", [])).lower()
    return b"websocket" in upgrade


def _finish_now(request: Request, status: int, title: str, message: str) -> bytes:
    body = error_body(request, status, title, message)
    return b"" if request.method == b"HEAD" else body
