"""
Tests for L{pingated.streaming}: request bodies processed from the headers
on and streamed with backpressure, driven through a real L{GateChannel} on
an in-memory transport and a L{Clock}.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from pingated.server import GateSite
from pingated.streaming import (
    EARLY_BUFFER_LIMIT,
    LINGER_SECONDS,
    StreamingBody,
    StreamingRequest,
    outside_prefix,
)


class Recorder(Resource):
    """Remembers each request it renders; answers only when told to."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []
        self.immediate: bytes | None = None

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        if self.immediate is not None:
            request.setResponseCode(401)
            return self.immediate
        return NOT_DONE_YET


class Consumer:
    """An IConsumer that keeps what it is given."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def resource() -> Recorder:
    return Recorder()


@pytest.fixture
def transport(clock: Clock, resource: Recorder) -> StringTransport:
    site = GateSite(resource, reactor=clock, request_factory=StreamingRequest,
                    stream_body=lambda target: outside_prefix("/.pingated", target))
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    transport.channel = channel  # type: ignore[attr-defined]
    return transport


def feed(transport: StringTransport, data: bytes) -> None:
    transport.channel.dataReceived(data)  # type: ignore[attr-defined]


def fired(d: Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    d.addBoth(results.append)
    return results


def test_outside_prefix() -> None:
    """Only the gate's own pages keep the buffered body."""
    assert outside_prefix("/.pingated", b"/upload?x=1")
    assert outside_prefix("/.pingated", b"/.pingatedx/login")
    assert not outside_prefix("/.pingated", b"/.pingated/login?next=/")
    assert not outside_prefix("/.pingated", b"/.pingated")


def test_processing_starts_at_headers_and_body_streams(
    transport: StringTransport, resource: Recorder
) -> None:
    """render() runs before any body byte; chunks reach the consumer as they come."""
    feed(transport, b"POST /up?a=1&a=2 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    assert len(resource.requests) == 1
    request = resource.requests[0]
    assert request.method == b"POST"
    assert request.path == b"/up"
    assert request.args == {b"a": [b"1", b"2"]}
    producer = request.body_producer
    assert isinstance(producer, StreamingBody)
    assert producer.length == 10
    consumer = Consumer()
    done = fired(producer.startProducing(consumer))
    feed(transport, b"hello")
    assert consumer.data == [b"hello"]
    assert done == []
    feed(transport, b"world")
    assert consumer.data == [b"hello", b"world"]
    assert done == [None]
    # The answer, then a second request on the same connection still works.
    request.write(b"ok")
    request.finish()
    assert b"HTTP/1.1 200 OK" in transport.value()
    feed(transport, b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(resource.requests) == 2
    assert resource.requests[1].body_producer is None


def test_gate_pages_and_bodiless_requests_are_buffered(
    transport: StringTransport, resource: Recorder
) -> None:
    """The login form is parsed the usual way, after the whole body."""
    feed(transport, b"POST /.pingated/login HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 7\r\n\r\n")
    assert resource.requests == []
    feed(transport, b"pin=123")
    request = resource.requests[0]
    assert request.body_producer is None
    assert request.args[b"pin"] == [b"123"]


def test_early_body_is_buffered_then_pauses_the_client(
    transport: StringTransport, resource: Recorder
) -> None:
    """Before the upstream is ready a little is held; past the limit the client is paused."""
    size = EARLY_BUFFER_LIMIT * 3
    feed(transport, b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    producer = resource.requests[0].body_producer
    feed(transport, b"a" * (EARLY_BUFFER_LIMIT + 1))
    assert transport.producerState == "paused"
    consumer = Consumer()
    producer.startProducing(consumer)
    assert b"".join(consumer.data) == b"a" * (EARLY_BUFFER_LIMIT + 1)
    assert transport.producerState == "producing"


def test_upstream_backpressure_pauses_the_client(
    transport: StringTransport, resource: Recorder
) -> None:
    """pauseProducing from the upstream stops reading the client, and resume restarts it."""
    feed(transport, b"PUT /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    producer = resource.requests[0].body_producer
    consumer = Consumer()
    done = fired(producer.startProducing(consumer))
    producer.pauseProducing()
    assert transport.producerState == "paused"
    # Something else resuming the transport behind our back is undone on the next chunk.
    transport.resumeProducing()
    feed(transport, b"3\r\nabc\r\n")
    assert transport.producerState == "paused"
    producer.resumeProducing()
    assert transport.producerState == "producing"
    feed(transport, b"0\r\n\r\n")
    assert b"".join(consumer.data) == b"abc"
    assert done == [None]


def test_expect_continue_sent_only_when_upstream_wants_the_body(
    transport: StringTransport, resource: Recorder
) -> None:
    """100 Continue goes out from startProducing, not at header time."""
    feed(transport, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                    b"Expect: 100-continue\r\n\r\n")
    assert transport.value() == b""
    request = resource.requests[0]
    assert not request.requestHeaders.hasHeader(b"expect")
    request.body_producer.startProducing(Consumer())
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_refused_request_gets_no_continue_and_closes(
    transport: StringTransport, resource: Recorder, clock: Clock
) -> None:
    """An immediate answer: no 100, Connection: close, body discarded, then closed."""
    resource.immediate = b"no"
    feed(transport, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                    b"Expect: 100-continue\r\n\r\n")
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 401")
    assert b"100 Continue" not in out
    assert b"connection: close" in out.lower()
    feed(transport, b"x" * 50)  # discarded while lingering
    assert not transport.disconnecting
    clock.advance(LINGER_SECONDS)
    assert transport.disconnecting


def test_early_answer_drained_body_then_closed(
    transport: StringTransport, resource: Recorder
) -> None:
    """If the rest of the body arrives while lingering, the connection closes normally."""
    resource.immediate = b"no"
    feed(transport, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
    feed(transport, b"abcd")
    assert transport.disconnecting


def test_limit_reported_once(transport: StringTransport, resource: Recorder) -> None:
    """A chunked body crossing the limit calls on_limit once and stops forwarding."""
    feed(transport, b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    producer = resource.requests[0].body_producer
    calls: list[int] = []
    producer.set_limit(5, lambda: calls.append(1))
    consumer = Consumer()
    producer.startProducing(consumer)
    feed(transport, b"4\r\nabcd\r\n")
    feed(transport, b"4\r\nefgh\r\n")
    feed(transport, b"4\r\nijkl\r\n")
    assert calls == [1]
    assert producer.over_limit
    assert consumer.data == [b"abcd"]


def test_client_disconnect_fails_the_body(
    transport: StringTransport, resource: Recorder
) -> None:
    """The upstream side learns the body will never complete."""
    feed(transport, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    producer = resource.requests[0].body_producer
    done = fired(producer.startProducing(Consumer()))
    feed(transport, b"abc")
    transport.channel.connectionLost(Failure(ConnectionError("gone")))  # type: ignore[attr-defined]
    assert len(done) == 1 and isinstance(done[0], Failure)


def test_stop_producing_drops_the_rest(transport: StringTransport, resource: Recorder) -> None:
    """After the upstream leg is gone nothing more is written to it."""
    feed(transport, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    producer = resource.requests[0].body_producer
    consumer = Consumer()
    done = fired(producer.startProducing(consumer))
    producer.pauseProducing()
    producer.stopProducing()
    assert transport.producerState == "producing"
    feed(transport, b"abcdefghij")
    assert consumer.data == []
    assert done == []
