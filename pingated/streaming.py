# -*- test-case-name: tests.test_streaming -*-
"""
Request bodies streamed to the upstream as they arrive.

C{twisted.web} reads a whole request body (into memory, then a temporary
file above 100 KB) before it calls C{render()}: a 300 MB upload would sit
on the gate's disk and reach the upstream only after the client finished.
L{StreamingRequest} instead starts processing as soon as the headers are in
and offers the body as L{StreamingBody}, an L{IBodyProducer} the upstream
client consumes chunk by chunk:

* each chunk goes straight to the upstream connection (no temp file, no
  whole-body buffer); when the upstream socket is full the client socket
  stops being read (backpressure), so memory stays bounded;
* C{Expect: 100-continue} is answered only when the upstream actually asks
  for the body, so a refused request (401, 413) never makes the client send
  it;
* a chunked body that crosses the size limit is reported once to whoever
  set the limit (the proxy answers 413 or aborts);
* a response that completes before the body was fully received closes the
  connection after a short, bounded "lingering" drain (as nginx does), so the
  client can read the answer instead of getting a reset.

Requests for the gate's own pages (login forms) and bodiless requests keep
twisted.web's normal buffered path: the site's C{stream_body(path)} predicate
decides.  A resource that reads C{request.content} of a streamed request
sees an empty body; use C{request.body_producer} instead.
"""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from typing import Any
from urllib.parse import parse_qs

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

#: Body bytes held while nobody consumes them yet (the upstream connection is
#: still being set up); past this the client socket is paused.
EARLY_BUFFER_LIMIT = 64 * 1024
# Largest body the gate's own pages accept (the login form is a few bytes).
GATE_BODY_LIMIT = 64 * 1024

#: After answering before the body was fully received, how long the rest of
#: it is read and thrown away before the connection is closed (nginx's
#: lingering close): long enough for a client that does not use
#: C{Expect: 100-continue} to finish sending and then read the answer.
LINGER_SECONDS = 5.0

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@implementer(IBodyProducer)
class StreamingBody:
    """
    The body of a L{StreamingRequest}, produced for the upstream as it arrives.

    The request feeds it (L{received}, L{complete}, L{lost}); the upstream
    client consumes it through the L{IBodyProducer} methods.  Pause and
    resume from the consumer pause and resume reading the client's socket.
    """

    def __init__(
        self, request: StreamingRequest, length: int | None, expect_continue: bool
    ) -> None:
        self.request = request
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self.expect_continue = expect_continue
        self.bytes_received = 0
        self.limit: int | None = None
        self.on_limit: Callable[[], None] | None = None
        self.on_progress: Callable[[], None] | None = None
        self._early: list[bytes] = []
        self._early_size = 0
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] | None = None
        self._complete = False
        self._failure: Failure | None = None
        self._stopped = False
        self._over_limit = False
        self._consumer_paused = False
        self._buffer_paused = False

    # -- configuration by whoever forwards the body -------------------------

    def set_limit(self, limit: int, on_limit: Callable[[], None]) -> None:
        """Call C{on_limit} once if more than C{limit} bytes arrive (chunked bodies)."""
        self.limit = limit
        self.on_limit = on_limit
        if self.bytes_received > limit:
            self._exceeded()

    @property
    def over_limit(self) -> bool:
        """Whether the body crossed the limit (and was cut off)."""
        return self._over_limit

    # -- fed by the request -------------------------------------------------

    def received(self, data: bytes) -> None:
        """A chunk of body arrived from the client."""
        if not data or self._stopped or self._over_limit:
            return
        self.bytes_received += len(data)
        if self.limit is not None and self.bytes_received > self.limit:
            self._exceeded()
            return
        if self.on_progress is not None:
            self.on_progress()
        consumer = self._consumer
        if consumer is None:
            self._early.append(data)
            self._early_size += len(data)
            if self._early_size > EARLY_BUFFER_LIMIT and not self._buffer_paused:
                self._buffer_paused = True
                self.request.pause_reading()
            return
        consumer.write(data)
        if self._consumer_paused:
            # Something else (the channel, when the client's receive window
            # reopened) resumed reading behind our back: pause again.
            self.request.pause_reading()

    def complete(self) -> None:
        """The client sent the whole body."""
        if self._complete:
            return
        self._complete = True
        if self._buffer_paused or self._consumer_paused:
            self._buffer_paused = self._consumer_paused = False
            self.request.resume_reading()
        done, self._done = self._done, None
        if done is not None and not self._stopped and not self._over_limit:
            done.callback(None)

    def lost(self, reason: Failure) -> None:
        """The client connection went away before the body was complete."""
        if self._complete or self._failure is not None:
            return
        self._failure = reason
        done, self._done = self._done, None
        if done is not None and not self._stopped:
            done.errback(reason)

    # -- IBodyProducer ------------------------------------------------------

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """The upstream is ready for the body: send what arrived, then the rest as it comes."""
        self._consumer = consumer
        request = self.request
        if (
            self.expect_continue
            and self.bytes_received == 0
            and not self._complete
            and not request.startedWriting
            and not request.finished
        ):
            request.send_continue()
        if self._early:
            consumer.write(b"".join(self._early))
            self._early = []
            self._early_size = 0
        if self._buffer_paused:
            self._buffer_paused = False
            if not self._consumer_paused:
                request.resume_reading()
        if self._failure is not None:
            return fail(self._failure)
        if self._complete:
            return succeed(None)
        self._done = Deferred(self._cancel)
        return self._done

    def pauseProducing(self) -> None:
        """The upstream socket is full: stop reading the client."""
        if not self._consumer_paused:
            self._consumer_paused = True
            if not self._complete:
                self.request.pause_reading()

    def resumeProducing(self) -> None:
        """The upstream socket drained: read the client again."""
        if self._consumer_paused:
            self._consumer_paused = False
            if not self._complete and not self._buffer_paused:
                self.request.resume_reading()

    def stopProducing(self) -> None:
        """The upstream leg is gone: drop the rest of the body and never fire C{_done}."""
        self._stopped = True
        self._done = None
        self._early = []
        if self._consumer_paused or self._buffer_paused:
            self._consumer_paused = self._buffer_paused = False
            self.request.resume_reading()

    def _cancel(self, d: Deferred[None]) -> None:
        self._stopped = True
        self._done = None

    def _exceeded(self) -> None:
        if self._over_limit:
            return
        self._over_limit = True
        self._early = []
        self._done = None
        if self.on_limit is not None:
            self.on_limit()


class StreamingRequest(server.Request):
    """
    A request whose body is streamed instead of spooled (see the module doc).

    Processing starts from L{gotLength}, i.e. as soon as the headers are in,
    when the site's C{stream_body(path)} says so and the request has a body.
    """

    body_producer: StreamingBody | None = None
    _body_pending = False
    _cleanup_waiting = False
    _reading_paused = False
    _lingering: IDelayedCall | None = None

    # -- decisions at header time -------------------------------------------

    _refused = False

    def _refuse_too_large(self) -> None:
        """413 and close, without ever processing the request (gate pages only)."""
        self._refused = True
        body = b'{"error": "request body too large"}\n'
        transport: Any = self.channel.transport
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        transport.loseConnection()

    def _wants_streaming(self, length: int | None) -> bool:
        if length == 0:
            return False
        channel: Any = self.channel
        predicate = getattr(channel.site, "stream_body", None)
        if predicate is None:
            return False
        return bool(predicate(channel._path))

    def gotLength(self, length: int | None) -> None:
        """Headers are complete: either spool as usual, or start processing now."""
        if not self._wants_streaming(length):
            # Spooled bodies are the gate's own pages (a login form is a few
            # bytes): anything big is refused before it fills memory or disk.
            if length is not None and length > GATE_BODY_LIMIT:
                self._refuse_too_large()
                return
            super().gotLength(length)  # type: ignore[no-untyped-call]
            return
        channel: Any = self.channel
        self.content = BytesIO()
        self.method = channel._command
        self.uri = channel._path
        self.clientproto = channel._version
        path, _, query = self.uri.partition(b"?")
        self.path = path
        self.args = parse_qs(query, keep_blank_values=True) if query else {}
        # The channel would answer 100 Continue on its own right after this
        # method; the body producer does it only when the upstream wants it.
        expects = self.requestHeaders.getRawHeaders(b"expect", [])
        expect_continue = any(v.strip().lower() == b"100-continue" for v in expects)
        if expect_continue and self.clientproto == b"HTTP/1.1":
            self.requestHeaders.removeHeader(b"expect")
        else:
            expect_continue = False
        self.body_producer = StreamingBody(self, length, expect_continue)
        self._body_pending = True
        self.process()  # type: ignore[no-untyped-call]

    # -- the body, as the channel decodes it --------------------------------

    def handleContentChunk(self, data: bytes) -> None:
        """A decoded body chunk: forward it, or drain it after an early answer."""
        producer = self.body_producer
        if producer is None:
            if self._refused:
                return
            if self.content is not None and self.content.tell() + len(data) > GATE_BODY_LIMIT:
                self._refuse_too_large()
                return
            super().handleContentChunk(data)  # type: ignore[no-untyped-call]
            return
        if self.finished or self._disconnected:
            return  # lingering after an early answer: discard
        producer.received(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """The body is complete (the channel calls this after the last chunk)."""
        producer = self.body_producer
        if producer is None:
            super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]
            return
        self._body_pending = False
        self._stop_lingering()
        producer.complete()
        if self._cleanup_waiting:
            self._cleanup_waiting = False
            super()._cleanup()  # type: ignore[misc,no-untyped-call]

    # -- answering before the body was fully read ----------------------------

    def write(self, data: bytes) -> None:
        """Answering while the client still sends: close the connection afterwards."""
        if self._body_pending and not self.startedWriting and not self._disconnected:
            channel: Any = self.channel
            channel.persistent = False
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        super().write(data)  # type: ignore[no-untyped-call]

    def _cleanup(self) -> None:
        if not self._body_pending:
            super()._cleanup()  # type: ignore[misc,no-untyped-call]
            return
        # The channel expects this request to stay first in its queue until
        # the body has been decoded; hand it back only then (requestReceived)
        # or never, if the connection is dropped first.
        self._cleanup_waiting = True
        notifications, self.notifications = self.notifications, []
        for d in notifications:
            d.callback(None)
        self._start_lingering()

    def _start_lingering(self) -> None:
        self.resume_reading()
        channel: Any = getattr(self, "channel", None)
        transport = channel.transport if channel is not None else None
        if transport is None:
            return
        # Nothing more will be written: send FIN once the answer is flushed,
        # keep reading (and discarding) so the client is not reset before it
        # reads the answer, and give up after a bounded time.
        # (Plain TCP only: under TLS a bare TCP half-close would skip the
        # TLS close; there the timer below ends the connection instead.)
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is not None and not channel.isSecure():
            lose_write()
        self._lingering = channel.callLater(LINGER_SECONDS, self._abort)

    def _stop_lingering(self) -> None:
        if self._lingering is not None and self._lingering.active():
            self._lingering.cancel()
        self._lingering = None

    def _abort(self) -> None:
        self._stop_lingering()
        channel: Any = getattr(self, "channel", None)
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        """The client went away: tell the body producer, stop lingering."""
        self._stop_lingering()
        if self.body_producer is not None and self._body_pending:
            self._body_pending = False
            self.body_producer.lost(reason)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    # -- flow control on the client socket ------------------------------------

    def pause_reading(self) -> None:
        """Stop reading the client's socket (the body has nowhere to go yet)."""
        channel: Any = getattr(self, "channel", None)
        if channel is None or channel.transport is None:
            return
        self._reading_paused = True
        channel.transport.pauseProducing()

    def resume_reading(self) -> None:
        """Read the client's socket again, unless the channel itself wants it paused."""
        if not self._reading_paused:
            return
        self._reading_paused = False
        channel: Any = getattr(self, "channel", None)
        if channel is None or channel.transport is None:
            return
        if channel._waitingForTransport and not channel._handlingRequest:
            # The client is not reading our answer; the channel resumes it.
            return
        channel.transport.resumeProducing()

    def send_continue(self) -> None:
        """C{100 Continue}: the upstream is ready, the client may send its body."""
        channel: Any = getattr(self, "channel", None)
        if channel is not None and channel.transport is not None:
            channel.transport.write(_CONTINUE)



def outside_prefix(prefix: str, target: bytes) -> bool:
    """
    Whether a request target lies outside the gate's own pages.

    Compared on the raw target exactly as the site root routes it, so a body
    is streamed exactly when the request will not reach the gate's forms.
    """
    raw = prefix.encode("ascii")
    path = target.split(b"?", 1)[0]
    return not (path == raw or path.startswith(raw + b"/"))
