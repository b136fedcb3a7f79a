"""
Request framing the gate must refuse rather than forward: request smuggling
shapes, oversized headers and slow-header clients (L{pingated.server}).

Each shape is tried twice: in memory against L{GateChannel} on a
L{StringTransport} with a L{Clock} (fast, exact), and against the real
C{twistd pingated} process with a valid session cookie in front of a
counting upstream, which proves nothing refused ever reaches the upstream.

What twisted.web already refuses on its own (verified, kept here so a
Twisted upgrade cannot quietly change it): Content-Length together with
Transfer-Encoding, repeated Content-Length (equal or not), non-digit
lengths, unknown codings, bad chunk sizes.  What pingated adds: obs-fold,
Transfer-Encoding other than exactly C{chunked} or on HTTP/1.0, a second
Host, non-path request targets, 431 for large headers and the header timeout.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from pingated.server import GateChannel, GateSite

HEAD = b"Host: gate.test\r\n"

# name -> (raw request after the request line's method/target, expected status)
SHAPES: dict[str, tuple[bytes, int]] = {
    "content-length-and-chunked": (
        b"POST /echo HTTP/1.1\r\n" + HEAD + b"Content-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
        400,
    ),
    "chunked-and-content-length": (
        b"POST /echo HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    ),
    "duplicate-content-length-differing": (
        b"POST /echo HTTP/1.1\r\n" + HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    ),
    "duplicate-content-length-equal": (
        b"POST /echo HTTP/1.1\r\n" + HEAD + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
    ),
    "content-length-list": (
        b"POST /echo HTTP/1.1\r\n" + HEAD + b"Content-Length: 5, 5\r\n\r\nhello",
        400,
    ),
    "content-length-signed": (
        b"POST /echo HTTP/1.1\r\n" + HEAD + b"Content-Length: +5\r\n\r\nhello",
        400,
    ),
    "obs-fold": (
        b"GET /echo HTTP/1.1\r\n" + HEAD + b"X-Folded: a\r\n b\r\n\r\n",
        400,
    ),
    "obs-fold-transfer-encoding": (
        b"POST /echo HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "obs-fold-tab": (
        b"GET /echo HTTP/1.1\r\n" + HEAD + b"X-Folded: a\r\n\tb\r\n\r\n",
        400,
    ),
    "transfer-encoding-identity": (
        b"POST /echo HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: identity\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        400,
    ),
    "transfer-encoding-list": (
        b"POST /echo HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "transfer-encoding-twice": (
        b"POST /echo HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "transfer-encoding-space-before-colon": (
        b"POST /echo HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding : chunked\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        400,
    ),
    "transfer-encoding-on-http-1.0": (
        b"POST /echo HTTP/1.0\r\n" + HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "bad-chunk-size": (
        b"POST /echo HTTP/1.1\r\n"
        + HEAD
        + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "two-hosts": (
        b"GET /echo HTTP/1.1\r\n" + HEAD + b"Host: other.test\r\n\r\n",
        400,
    ),
    "absolute-form-target": (
        b"GET http://evil.test/echo HTTP/1.1\r\n" + HEAD + b"\r\n",
        400,
    ),
    "authority-form-target": (
        b"CONNECT evil.test:443 HTTP/1.1\r\n" + HEAD + b"\r\n",
        400,
    ),
    "header-without-colon": (
        b"GET /echo HTTP/1.1\r\n" + HEAD + b"Bogus\r\n\r\n",
        400,
    ),
    "nul-in-header": (
        b"GET /echo HTTP/1.1\r\n" + HEAD + b"X-A: a\x00b\r\n\r\n",
        400,
    ),
    "too-many-header-bytes": (
        b"GET /echo HTTP/1.1\r\n"
        + HEAD
        + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 200) for i in range(100))
        + b"\r\n",
        431,
    ),
    "one-huge-header": (
        b"GET /echo HTTP/1.1\r\n" + HEAD + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n",
        431,
    ),
    "huge-request-line": (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n" + HEAD + b"\r\n", 414),
}

# These reach the resource: the positive controls that keep the refusals honest.
ACCEPTED: dict[str, bytes] = {
    "plain-get": b"GET /echo?a=1 HTTP/1.1\r\n" + HEAD + b"\r\n",
    "content-length": b"POST /echo HTTP/1.1\r\n" + HEAD + b"Content-Length: 5\r\n\r\nhello",
    "chunked": b"POST /echo HTTP/1.1\r\n"
    + HEAD
    + b"Transfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "chunked-tab": b"POST /echo HTTP/1.1\r\n"
    + HEAD
    + b"Transfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
    "http-1.0": b"GET /echo HTTP/1.0\r\n\r\n",
}


# --- in memory -----------------------------------------------------------------------


class Counting(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes]] = []

    def render(self, request: IRequest) -> bytes:
        self.seen.append((request.uri, request.content.read()))
        return b"ok"


def _connect(
    header_timeout: float | None = 5.0,
) -> tuple[GateChannel, StringTransport, Counting, Clock]:
    clock = Clock()
    resource = Counting()
    site = GateSite(resource, reactor=clock, header_timeout=header_timeout)
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = site.buildProtocol(address)
    assert isinstance(channel, GateChannel)
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    return channel, transport, resource, clock


def _status(raw: bytes) -> int:
    first = raw.split(b"\r\n", 1)[0]
    return int(first.split(b" ")[1])


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_refused_in_memory(name: str) -> None:
    """Each shape gets its status, the connection is closed and nothing is dispatched."""
    raw, expected = SHAPES[name]
    channel, transport, resource, _ = _connect()
    channel.dataReceived(raw)
    assert resource.seen == []
    assert _status(transport.value()) == expected
    assert transport.value().endswith(b"Content-Length: 0\r\n\r\n")
    assert transport.disconnecting


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_ordinary_requests_still_work(name: str) -> None:
    """Valid framing (including chunked and HTTP/1.0) reaches the resource."""
    channel, transport, resource, _ = _connect()
    channel.dataReceived(ACCEPTED[name])
    assert len(resource.seen) == 1, transport.value()
    assert _status(transport.value()) == 200


def test_options_star_is_not_refused() -> None:
    """C{OPTIONS *} is the one non-path target HTTP allows (Twisted answers it itself)."""
    channel, transport, _, _ = _connect()
    channel.dataReceived(b"OPTIONS * HTTP/1.1\r\n" + HEAD + b"\r\n")
    assert _status(transport.value()) == 200


def test_byte_by_byte_delivery_is_refused_the_same() -> None:
    """Splitting a smuggling attempt into single bytes changes nothing."""
    raw, _ = SHAPES["obs-fold-transfer-encoding"]
    channel, transport, resource, _ = _connect()
    for i in range(len(raw)):
        if transport.disconnecting:
            break
        channel.dataReceived(raw[i : i + 1])
    assert resource.seen == []
    assert _status(transport.value()) == 400


def test_keep_alive_second_request_checked_too() -> None:
    """The checks apply to every request on a persistent connection, not just the first."""
    channel, transport, resource, _ = _connect()
    channel.dataReceived(ACCEPTED["plain-get"] + SHAPES["absolute-form-target"][0])
    assert len(resource.seen) == 1
    assert transport.value().count(b"HTTP/1.1 ") == 2
    assert b"HTTP/1.1 400 Bad Request" in transport.value()
    assert transport.disconnecting


def test_slow_headers_get_408() -> None:
    """A client still sending headers after header_timeout is answered 408 and dropped."""
    channel, transport, resource, clock = _connect(header_timeout=5)
    channel.dataReceived(b"GET /echo HTTP/1.1\r\n")
    for _ in range(4):
        clock.advance(1)
        channel.dataReceived(b"X-Slow: 1\r\n")  # data keeps the idle timeout happy
    assert not transport.disconnecting
    clock.advance(1)
    assert _status(transport.value()) == 408
    assert transport.disconnecting
    assert resource.seen == []


def test_header_clock_starts_with_each_request() -> None:
    """A keep-alive connection idle between requests is not cut by the header timeout."""
    channel, transport, resource, clock = _connect(header_timeout=5)
    channel.dataReceived(ACCEPTED["plain-get"])
    clock.advance(30)  # idle, waiting for the next request
    assert not transport.disconnecting
    channel.dataReceived(ACCEPTED["plain-get"])
    assert len(resource.seen) == 2
    assert not transport.disconnecting
    assert clock.getDelayedCalls() == [] or all(
        call.getTime() > clock.seconds() + 5 for call in clock.getDelayedCalls()
    )


def test_header_timeout_zero_disables() -> None:
    """header_timeout = 0 leaves only Twisted's idle timeout."""
    channel, transport, _, clock = _connect(header_timeout=0)
    channel.dataReceived(b"GET /echo HTTP/1.1\r\n")
    for _ in range(50):
        clock.advance(1)
        channel.dataReceived(b"X-Slow: 1\r\n")
    assert not transport.disconnecting


# --- against the real process ------------------------------------------------------


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    server: Any

    def _answer(self) -> None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
        self.server.seen.append((self.command, self.path, body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_POST = do_PUT = do_OPTIONS = do_CONNECT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def counting_upstream() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A stdlib upstream on loopback that records every request reaching it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.seen  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def _exchange(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send C{raw}, read until the gate closes (or C{timeout})."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            received += chunk
        return received


def _with_cookie(raw: bytes, cookie: str) -> bytes:
    line, rest = raw.split(b"\r\n", 1)
    return line + b"\r\nCookie: pingated=" + cookie.encode() + b"\r\nConnection: close\r\n" + rest


def test_real_gate_forwards_nothing_it_refuses(
    gate_factory: Any, counting_upstream: tuple[str, list[Any]]
) -> None:
    """Every shape, with a valid session, against twistd: refused, upstream never hit."""
    url, seen = counting_upstream
    gate = gate_factory(upstream=url, server={"header_timeout": 2})
    cookie = gate.login()
    # Positive control: the same cookie and framing otherwise do reach the upstream.
    answer = _exchange(gate.port, _with_cookie(ACCEPTED["chunked"], cookie))
    assert _status(answer) == 200, answer[:200]
    assert seen == [("POST", "/echo", b"hello")]
    seen.clear()
    for name, (raw, expected) in SHAPES.items():
        answer = _exchange(gate.port, _with_cookie(raw, cookie))
        assert answer == b"" or _status(answer) == expected, (name, answer[:200])
        assert seen == [], name
    # The gate survived all of it.
    answer = _exchange(gate.port, _with_cookie(ACCEPTED["plain-get"], cookie))
    assert _status(answer) == 200
    assert [path for _, path, _ in seen] == ["/echo?a=1"]


def test_real_gate_drops_slow_header_clients(
    gate_factory: Any, counting_upstream: tuple[str, list[Any]]
) -> None:
    """A slowloris client trickling header lines is answered 408 and closed after header_timeout."""
    url, seen = counting_upstream
    seen.clear()
    gate = gate_factory(upstream=url, server={"header_timeout": 1})
    cookie = gate.login()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", gate.port), timeout=10) as sock:
        sock.sendall(
            b"GET /echo HTTP/1.1\r\nHost: gate.test\r\nCookie: pingated="
            + cookie.encode()
            + b"\r\n"
        )
        received = b""
        for _ in range(40):
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.25)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            received += chunk
            if not chunk or b"\r\n\r\n" in received:
                break
    elapsed = time.monotonic() - started
    assert _status(received) == 408, received
    assert elapsed < 8
    assert seen == []
