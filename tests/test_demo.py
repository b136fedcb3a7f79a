"""
Tests for L{pingated.demo}, the bundled upstream the gate is demonstrated with.

Everything but the WebSocket echo is driven in memory: L{StubTreq} for whole
requests, L{DummyRequest} plus L{Clock} where time or backpressure matters.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.test.requesthelper import DummyRequest

from pingated.demo import (
    BigBody,
    ServerSentClock,
    StatusCode,
    build_demo_resource,
    main,
    parse_close_command,
)


def _fired(d: Deferred[Any]) -> Any:
    """The result of a Deferred that must already have fired."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def resource(clock: Clock) -> IResource:
    return build_demo_resource(clock, clock)


@pytest.fixture
def stub(resource: IResource) -> StubTreq:
    return StubTreq(resource)


def test_page_is_self_contained_html(stub: StubTreq) -> None:
    """C{GET /} is a page with a title, escaped headers and the SSE/WS widgets."""
    response = _fired(stub.get("http://demo.test/", headers={"X-Probe": "<b>&amp;</b>"}))
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    page = _fired(stub.content(response)).decode("utf-8")
    assert "<title>pingated demo</title>" in page
    assert "</head>" in page
    assert "It works &mdash; you are behind pingated" in page
    for element in ("ws-input", "ws-send", "ws-log", "sse-clock", "headers"):
        assert f'id="{element}"' in page
    assert "(location.protocol==='https:'?'wss:':'ws:')+'//'+location.host+'/ws'" in page
    assert 'new EventSource("/sse")' in page
    assert "&lt;b&gt;&amp;amp;&lt;/b&gt;" in page
    assert "<b>&amp;</b>" not in page
    # No external assets: nothing is loaded from another origin.
    assert "src=" not in page
    assert "href=" not in page


def test_echo_describes_request_exactly(stub: StubTreq) -> None:
    """C{/echo} reports method, path, the raw query, headers and the body's hash."""
    body = b"hello \xff world" * 10000
    response = _fired(
        stub.request(
            "PATCH",
            b"http://demo.test/echo/some/path?a=1&a=2&b=%20",
            data=body,
            headers={"X-Twice": ["one", "two"], "Content-Type": "application/octet-stream"},
        )
    )
    assert response.code == 200
    echoed = json.loads(_fired(stub.content(response)))
    assert echoed["method"] == "PATCH"
    assert echoed["path"] == "/echo/some/path"
    assert echoed["query"] == "a=1&a=2&b=%20"
    assert ["X-Twice", "one"] in echoed["headers"]
    assert ["X-Twice", "two"] in echoed["headers"]
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert len(echoed["body"]) == 64 * 1024
    assert echoed["body"].startswith("hello \ufffd world")


def test_echo_without_body_or_query(stub: StubTreq) -> None:
    """A bare C{GET /echo} has an empty query and the hash of no bytes."""
    response = _fired(stub.get("http://demo.test/echo"))
    echoed = json.loads(_fired(stub.content(response)))
    assert echoed["method"] == "GET"
    assert echoed["query"] == ""
    assert echoed["body_length"] == 0
    assert echoed["body_sha256"] == hashlib.sha256(b"").hexdigest()
    assert echoed["body"] == ""


def test_set_cookies_sends_two_headers(stub: StubTreq) -> None:
    """Both cookies arrive as separate Set-Cookie headers."""
    response = _fired(stub.get("http://demo.test/set-cookies"))
    assert response.code == 200
    assert response.headers.getRawHeaders("set-cookie") == [
        "a=1; Path=/",
        "b=2; Path=/; HttpOnly",
    ]


@pytest.mark.parametrize("code", [204, 304])
def test_status_without_body(stub: StubTreq, code: int) -> None:
    """C{/status/204} and C{/status/304} answer with no body and no Content-Length."""
    response = _fired(stub.get(f"http://demo.test/status/{code}"))
    assert response.code == code
    assert _fired(stub.content(response)) == b""
    request = DummyRequest([str(code).encode("ascii")])
    assert StatusCode().render(request) == NOT_DONE_YET
    assert request.responseCode == code
    assert request.written == []
    assert request.finished == 1
    assert request.responseHeaders.getRawHeaders(b"content-length") is None


def test_status_with_body(stub: StubTreq) -> None:
    """Other codes come with a short text body."""
    response = _fired(stub.get("http://demo.test/status/503"))
    assert response.code == 503
    assert _fired(stub.content(response)) == b"status 503\n"


@pytest.mark.parametrize(
    "path", ["/status/abc", "/status/99", "/status/600", "/status/+204", "/status", "/status/200/x"]
)
def test_status_rejects_nonsense(stub: StubTreq, path: str) -> None:
    """A code that is not a usable HTTP status is a 404."""
    response = _fired(stub.get(f"http://demo.test{path}"))
    assert response.code == 404


def test_big_body_length(stub: StubTreq) -> None:
    """C{/big?size=N} sends exactly N bytes of C{x} with a matching Content-Length."""
    response = _fired(stub.get("http://demo.test/big?size=200000"))
    assert response.code == 200
    # Twisted's client moves Content-Length from the headers to .length.
    assert response.length == 200000
    assert _fired(stub.content(response)) == b"x" * 200000


def test_big_body_rejects_bad_size(stub: StubTreq) -> None:
    """A negative or non-numeric size is a 400, not a traceback."""
    for size in ("-1", "lots"):
        response = _fired(stub.get(f"http://demo.test/big?size={size}"))
        assert response.code == 400


class _PausingRequest(DummyRequest):  # type: ignore[misc]
    """A request whose transport fills up after every write, like a slow client."""

    def __init__(self) -> None:
        super().__init__([])
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        super().write(data)
        self.producer.pauseProducing()


def test_big_body_respects_backpressure() -> None:
    """The producer writes one 64 KB chunk per resume, and finishes at the end."""
    request = _PausingRequest()
    request.args = {b"size": [b"150000"]}
    assert BigBody().render(request) == NOT_DONE_YET
    assert [len(chunk) for chunk in request.written] == [65536]
    producer = request.producer
    producer.resumeProducing()
    assert [len(chunk) for chunk in request.written] == [65536, 65536]
    assert not request.finished
    producer.resumeProducing()
    assert [len(chunk) for chunk in request.written] == [65536, 65536, 150000 - 131072]
    assert request.finished == 1
    assert request.producer is None


def test_big_body_stops_when_client_leaves() -> None:
    """A disconnect stops the producer: no more writes, no finish."""
    request = _PausingRequest()
    request.args = {b"size": [b"1000000"]}
    BigBody().render(request)
    producer = request.producer
    request.processingFailed(Failure(ConnectionError("gone")))
    producer.resumeProducing()
    assert len(request.written) == 1
    assert not request.finished


def _sse_request(args: dict[bytes, list[bytes]] | None = None) -> DummyRequest:
    request = DummyRequest([])
    request.args = args or {}
    return request


def test_sse_ticks_every_second(clock: Clock) -> None:
    """C{/sse} sends an event at once, then one per second from the injected clock."""
    request = _sse_request()
    assert ServerSentClock(clock).render(request) == NOT_DONE_YET
    headers = request.responseHeaders
    assert headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    assert headers.getRawHeaders(b"cache-control") == [b"no-cache"]
    assert headers.getRawHeaders(b"x-accel-buffering") == [b"no"]
    assert request.written == [b"data: 1970-01-01T00:00:00.000+00:00\n\n"]
    clock.advance(0.5)
    assert len(request.written) == 1
    clock.advance(0.5)
    assert request.written[1] == b"data: 1970-01-01T00:00:01.000+00:00\n\n"
    clock.advance(1)
    assert len(request.written) == 3
    assert not request.finished


def test_sse_stops_timer_on_disconnect(clock: Clock) -> None:
    """When the client goes away the timer is cancelled and nothing more is written."""
    request = _sse_request()
    ServerSentClock(clock).render(request)
    assert len(clock.getDelayedCalls()) == 1
    request.processingFailed(Failure(ConnectionError("gone")))
    assert clock.getDelayedCalls() == []
    clock.advance(5)
    assert len(request.written) == 1


def test_sse_interval_and_count(clock: Clock) -> None:
    """C{?interval=0.1&count=3} sends three events 0.1 s apart, then finishes."""
    request = _sse_request({b"interval": [b"0.1"], b"count": [b"3"]})
    ServerSentClock(clock).render(request)
    clock.advance(0.1)
    assert not request.finished
    clock.advance(0.1)
    assert [event[:29] for event in request.written] == [
        b"data: 1970-01-01T00:00:00.000",
        b"data: 1970-01-01T00:00:00.100",
        b"data: 1970-01-01T00:00:00.200",
    ]
    assert request.finished == 1
    assert clock.getDelayedCalls() == []


def test_sse_through_stub_treq(stub: StubTreq, clock: Clock) -> None:
    """The whole tree serves C{/sse} with a finite count as one complete body."""
    response = _fired(stub.get("http://demo.test/sse?interval=0.1&count=2"))
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    body = stub.content(response)
    clock.advance(0.1)
    stub.flush()
    assert _fired(body).count(b"data: ") == 2


@pytest.mark.parametrize("query", [b"0", b"-1", b"nan", b"soon"])
def test_sse_rejects_bad_interval(clock: Clock, query: bytes) -> None:
    """An unusable interval is a 400 and starts no timer."""
    request = _sse_request({b"interval": [query]})
    body = ServerSentClock(clock).render(request)
    assert request.responseCode == 400
    assert body.startswith(b"bad request")
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("close:4000:bye", (4000, "bye")),
        ("close:1000:", (1000, "")),
        ("close:1001:going:away", (1001, "going:away")),
        ("close:1005:never on the wire", None),
        ("close:2000:reserved", None),
        ("close:abc:x", None),
        ("close", None),
        ("closed:4000:x", None),
        ("close:4000:" + "x" * 124, None),
        ("hello", None),
    ],
)
def test_parse_close_command(text: str, expected: tuple[int, str] | None) -> None:
    """Only well-formed commands with codes allowed on the wire are recognised."""
    assert parse_close_command(text) == expected


def test_main_rejects_bad_port() -> None:
    """A non-numeric port is an argparse error before any reactor is touched."""
    with pytest.raises(SystemExit) as raised:
        main(["--port", "eighty"])
    assert raised.value.code == 2


class _EchoClient(WebSocketClientProtocol):  # type: ignore[misc]
    """Records what the demo's WebSocket echo sends back."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[str | None] = Deferred()
        self.closed: Deferred[tuple[bool, int | None, str | None]] = Deferred()
        self.messages: DeferredQueue[tuple[bytes, bool]] = DeferredQueue()

    def onOpen(self) -> None:
        self.opened.callback(self.websocket_protocol_in_use)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.put((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed.callback((wasClean, code, reason))


@pytest_twisted.inlineCallbacks
def test_websocket_echo_live() -> Generator[Deferred[Any], Any, None]:
    """Over a real socket: subprotocol choice, text and binary echo, scripted close."""
    from twisted.internet import reactor

    port = reactor.listenTCP(0, Site(build_demo_resource(reactor, reactor)), interface="127.0.0.1")
    client: _EchoClient | None = None
    try:
        address = port.getHost()
        factory = WebSocketClientFactory(
            f"ws://127.0.0.1:{address.port}/ws",
            protocols=["x-other", "echo", "chat"],
            reactor=reactor,
        )
        connected: Deferred[_EchoClient] = Deferred()

        def build(addr: object) -> _EchoClient:
            protocol = _EchoClient()
            protocol.factory = factory
            connected.callback(protocol)
            return protocol

        factory.buildProtocol = build
        reactor.connectTCP("127.0.0.1", address.port, factory, timeout=5)
        client = yield connected
        subprotocol = yield client.opened
        assert subprotocol == "chat"

        client.sendMessage("héllo".encode(), isBinary=False)
        assert (yield client.messages.get()) == ("héllo".encode(), False)
        client.sendMessage(b"\x00\xff\x10", isBinary=True)
        assert (yield client.messages.get()) == (b"\x00\xff\x10", True)

        client.sendMessage(b"close:4000:bye", isBinary=False)
        was_clean, code, reason = yield client.closed
        assert (was_clean, code, reason) == (True, 4000, "bye")
    finally:
        if client is not None and client.transport is not None and not client.closed.called:
            client.transport.abortConnection()
            yield client.closed
        yield port.stopListening()
