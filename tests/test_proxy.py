"""
Tests for L{pingated.proxy} and L{pingated.agents}, in memory: a real
L{GateSite}/L{GateChannel} on a L{StringTransport}, a fake Agent whose
answers the test controls, and a L{Clock} for the idle timeout.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from pingated.agents import CachingAgent, tls_policy
from pingated.config import UpstreamConfig
from pingated.proxy import ProxyResource, upstream_url
from pingated.server import GateSite
from pingated.streaming import StreamingRequest

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


class FakeResponse:
    """Just enough of IResponse for the proxy."""

    def __init__(self, code: int, headers: dict[bytes, list[bytes]], length: Any) -> None:
        self.code = code
        self.phrase = b"OK"
        self.headers = Headers(headers)
        self.length = length
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(StringTransport())


class FakeAgent:
    """Records requests; each returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bytes, Headers, Any, Deferred[Any]]] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((method, uri, headers or Headers(), bodyProducer, d))
        return d


class Setup:
    def __init__(self, **upstream: Any) -> None:
        self.clock = Clock()
        self.agent = FakeAgent()
        config = UpstreamConfig(url="http://up.internal:8080/base", **upstream)
        self.resource = ProxyResource(self.agent, config, LOOPBACK, self.clock)
        site = GateSite(self.resource, reactor=self.clock, request_factory=StreamingRequest,
                        stream_body=lambda target: True)
        self.channel = site.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.7", 5555))
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def out(self) -> bytes:
        return self.transport.value()


@pytest.fixture
def setup() -> Setup:
    return Setup(idle_timeout=30, max_request_body=1000)


def test_upstream_url_keeps_query_bytes() -> None:
    """Base path joined, query kept byte for byte."""
    assert upstream_url("http://u/base/", b"/a?b=2&a=1&b=1") == b"http://u/base/a?b=2&a=1&b=1"


def test_request_headers_sent_upstream(setup: Setup) -> None:
    """Hop-by-hop and Expect dropped, Host replaced, X-Forwarded-* from the untrusted peer."""
    setup.send(b"GET /p?q=1 HTTP/1.1\r\nHost: gate.example\r\nConnection: X-Hop\r\nX-Hop: 1\r\n"
               b"X-Forwarded-For: 1.2.3.4\r\nX-Keep: a\r\nX-Keep: b\r\n\r\n")
    method, uri, headers, producer, _ = setup.agent.calls[0]
    assert (method, uri, producer) == (b"GET", b"http://up.internal:8080/base/p?q=1", None)
    assert headers.getRawHeaders(b"host") == [b"up.internal:8080"]
    assert not headers.hasHeader(b"x-hop")
    assert not headers.hasHeader(b"connection")
    assert headers.getRawHeaders(b"x-keep") == [b"a", b"b"]
    assert headers.getRawHeaders(b"x-forwarded-for") == [b"198.51.100.7"]
    assert headers.getRawHeaders(b"x-real-ip") == [b"198.51.100.7"]
    assert headers.getRawHeaders(b"x-forwarded-host") == [b"gate.example"]


def test_preserve_host() -> None:
    """preserve_host sends the client's Host."""
    setup = Setup(preserve_host=True)
    setup.send(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert setup.agent.calls[0][2].getRawHeaders(b"host") == [b"app.example"]


def test_response_streamed_with_headers_and_length(setup: Setup) -> None:
    """Status, repeated headers and Content-Length pass; chunks are written as they come."""
    setup.send(b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")
    d = setup.agent.calls[0][4]
    response = FakeResponse(201, {b"Set-Cookie": [b"a=1", b"b=2"], b"Server": [b"up"]}, 6)
    d.callback(response)
    response.protocol.dataReceived(b"abc")
    assert setup.out().endswith(b"\r\n\r\nabc")
    response.protocol.dataReceived(b"def")
    response.protocol.connectionLost(Failure(ResponseDone()))
    out = setup.out().lower()
    assert out.startswith(b"http/1.1 201")
    assert out.count(b"set-cookie:") == 2
    assert b"content-length: 6" in out
    assert b"server: up" in out and b"pingated" not in out
    assert out.endswith(b"abcdef")


def test_head_keeps_upstream_length(setup: Setup) -> None:
    """HEAD: the upstream's Content-Length header is passed, no body."""
    setup.send(b"HEAD / HTTP/1.1\r\nHost: g\r\n\r\n")
    response = FakeResponse(200, {b"Content-Length": [b"12345"]}, 0)
    setup.agent.calls[0][4].callback(response)
    response.protocol.connectionLost(Failure(ResponseDone()))
    out = setup.out().lower()
    assert b"content-length: 12345" in out
    assert b"transfer-encoding" not in out
    assert out.endswith(b"\r\n\r\n")


def test_upstream_refused_gives_502(setup: Setup) -> None:
    """A connection error is a 502 with a small JSON body."""
    setup.send(b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")
    setup.agent.calls[0][4].errback(Failure(ConnectionRefusedError()))
    out = setup.out()
    assert out.startswith(b"HTTP/1.1 502")
    assert out.endswith(b'{"error": "upstream unreachable"}\n')
    assert setup.resource.errors == {502: 1}


def test_idle_upstream_gives_504(setup: Setup) -> None:
    """No byte for idle_timeout: the pending request is cancelled, 504."""
    setup.send(b"GET / HTTP/1.1\r\nHost: g\r\nAccept: text/html\r\n\r\n")
    d = setup.agent.calls[0][4]
    setup.clock.advance(29)
    assert setup.out() == b""
    setup.clock.advance(1)
    assert d.called
    out = setup.out()
    assert out.startswith(b"HTTP/1.1 504")
    assert b"text/html" in out


def test_activity_postpones_the_idle_timeout(setup: Setup) -> None:
    """Bytes moving keep a slow stream alive; silence then ends it by aborting the client."""
    setup.send(b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")
    response = FakeResponse(200, {}, UNKNOWN_LENGTH)
    setup.agent.calls[0][4].callback(response)
    for _ in range(5):
        setup.clock.advance(20)
        response.protocol.dataReceived(b"tick")
    assert not response.protocol.transport.disconnecting
    setup.clock.advance(30)
    # The body transport was stopped; the body then fails and the client is aborted.
    response.protocol.connectionLost(Failure(ConnectionLost()))
    assert setup.transport.disconnecting


def test_upstream_dying_mid_body_aborts_client(setup: Setup) -> None:
    """A truncated body is never finished as if complete."""
    setup.send(b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")
    response = FakeResponse(200, {}, 100)
    setup.agent.calls[0][4].callback(response)
    response.protocol.dataReceived(b"partial")
    response.protocol.connectionLost(Failure(ConnectionLost()))
    assert setup.transport.disconnecting
    assert not setup.out().endswith(b"0\r\n\r\n")


def test_client_gone_cancels_pending_request(setup: Setup) -> None:
    """The client leaving before the answer cancels the upstream request."""
    setup.send(b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")
    d = setup.agent.calls[0][4]
    setup.channel.connectionLost(Failure(ConnectionLost()))
    assert d.called  # cancelled: the proxy's errback saw CancelledError
    assert setup.out() == b""


def test_client_gone_stops_the_upstream_body(setup: Setup) -> None:
    """The client leaving mid-response stops the upstream transport."""
    setup.send(b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")
    response = FakeResponse(200, {}, UNKNOWN_LENGTH)
    setup.agent.calls[0][4].callback(response)
    response.protocol.dataReceived(b"x")
    body_transport = response.protocol.transport
    setup.channel.connectionLost(Failure(ConnectionLost()))
    assert body_transport.producerState == "stopped"


def test_declared_body_over_limit_gives_413(setup: Setup) -> None:
    """Content-Length over max_request_body: 413, nothing sent upstream."""
    setup.send(b"POST / HTTP/1.1\r\nHost: g\r\nContent-Length: 1001\r\n\r\n")
    assert setup.out().startswith(b"HTTP/1.1 413")
    assert setup.agent.calls == []


def test_chunked_body_crossing_limit_gives_413(setup: Setup) -> None:
    """The upstream request is cancelled and the client told 413."""
    setup.send(b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n")
    _, _, _, producer, d = setup.agent.calls[0]
    assert producer.length is UNKNOWN_LENGTH
    setup.send(b"3e8\r\n" + b"a" * 1000 + b"\r\n")
    assert not setup.out()
    assert not d.called
    setup.send(b"1\r\nb\r\n")
    assert d.called  # cancelled
    assert setup.out().startswith(b"HTTP/1.1 413")


def test_caching_agent_reuses_endpoints() -> None:
    """One endpoint per upstream origin, not one per request."""
    agent = CachingAgent(Clock())
    from twisted.web.client import URI

    first = agent._getEndpoint(URI.fromBytes(b"http://u:1/a"))
    assert agent._getEndpoint(URI.fromBytes(b"http://u:1/b?c")) is first
    assert agent._getEndpoint(URI.fromBytes(b"http://u:2/")) is not first


def test_tls_policy_refuses_a_file_without_certificates(tmp_path: Any) -> None:
    """A CA bundle with no PEM certificate is a clear error."""
    bad = tmp_path / "ca.pem"
    bad.write_text("nothing here\n")
    with pytest.raises(ValueError, match="no PEM certificates"):
        tls_policy(str(bad))


def test_spooled_chunked_body_over_limit_gives_413() -> None:
    """Without streaming (a plain twisted.web request), the spooled size is checked too."""
    clock = Clock()
    agent = FakeAgent()
    resource = ProxyResource(agent, UpstreamConfig(url="http://u", max_request_body=4),
                             LOOPBACK, clock)
    site = GateSite(resource, reactor=clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nabcde\r\n0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413")
    assert agent.calls == []
