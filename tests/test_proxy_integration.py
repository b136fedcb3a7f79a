"""
The proxy end to end: a real C{twistd pingated} process in front of small
upstreams started by the test on 127.0.0.1, driven by raw stdlib clients.

Covers contract section 4 and issue #3: bodies streamed both ways with
backpressure and bounded memory (300 MB each way, no temp file), SSE chunks
delivered at once, aborts in both directions, timeouts and limits, HEAD,
204/304, Expect: 100-continue, encodings and repeated headers passed
untouched, trusted proxies, preserve_host and HTTPS upstreams verified
against a throwaway CA.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import http.client
import json
import os
import re
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from harness import TEST_PIN, Gate, base_config, free_port

BIG = 300 * 1024 * 1024
BLOCK = bytes(range(256)) * 4096  # 1 MiB, not all one byte value
RSS_LIMIT_KB = 150 * 1024


# --------------------------------------------------------------------------
# A multi-behaviour upstream, one thread per connection.


class Upstream(BaseHTTPRequestHandler):
    """Each path is one upstream behaviour the proxy must cope with."""

    protocol_version = "HTTP/1.1"
    server: UpstreamServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.dispatch()

    def do_HEAD(self) -> None:
        self.dispatch()

    def do_POST(self) -> None:
        self.dispatch()

    def do_PUT(self) -> None:
        self.dispatch()

    def dispatch(self) -> None:
        parts = urlsplit(self.path)
        self.query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        handler = getattr(self, "path_" + parts.path.strip("/").replace("-", "_"), None)
        if handler is None:
            self.send_error(404)
            return
        handler()

    # -- helpers --------------------------------------------------------

    def answer(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def body_chunks(self) -> Iterator[bytes]:
        """The request body, chunked or by length, as it arrives."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                while size:
                    data = self.rfile.read1(min(size, 1 << 20))
                    if not data:
                        return
                    size -= len(data)
                    yield data
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length", "0"))
            while remaining:
                data = self.rfile.read1(min(remaining, 1 << 20))
                if not data:
                    return
                remaining -= len(data)
                yield data

    # -- behaviours -------------------------------------------------------

    def path_sink(self) -> None:
        """Read the body, slowly for the first C{slow} seconds; report what arrived."""
        slow = float(self.query.get("slow", "0"))
        record = self.server.record
        record["headers"] = dict(self.headers.items())
        total = 0
        crc = 0
        started = None
        try:
            for data in self.body_chunks():
                if started is None:
                    started = time.monotonic()
                    record["first_byte_at"] = started
                total += len(data)
                crc = zlib.crc32(data, crc)
                if time.monotonic() - started < slow:
                    time.sleep(0.02)
        except OSError:
            self.close_connection = True
            return
        finally:
            record["done_at"] = time.monotonic()
            record["total"] = total
        body = json.dumps({"received": total, "crc": crc}).encode()
        self.answer(200, body, [("Content-Type", "application/json")])

    def path_source(self) -> None:
        """C{size} bytes of BLOCK pattern with a Content-Length."""
        size = int(self.query.get("size", str(BIG)))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if self.command == "HEAD":
            return
        sent = 0
        with contextlib.suppress(OSError):
            while sent < size:
                piece = BLOCK[: min(len(BLOCK), size - sent)]
                self.wfile.write(piece)
                sent += len(piece)
        self.server.record["source_sent"] = sent

    def path_sse(self) -> None:
        """C{n} events, one every C{interval} s, each stamped with the send time."""
        count = int(self.query.get("n", "10"))
        interval = float(self.query.get("interval", "0.1"))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for i in range(count):
            time.sleep(interval)
            event = f"id: {i}\ndata: {time.monotonic_ns()}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def path_die_length(self) -> None:
        """Promise 1 MB, send 100 KB, then drop the connection."""
        self.send_response(200)
        self.send_header("Content-Length", str(1024 * 1024))
        self.end_headers()
        self.wfile.write(b"d" * 100_000)
        self.wfile.flush()
        self.close_hard()

    def path_die_chunked(self) -> None:
        """Chunked body that stops without its last chunk."""
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"5\r\nhello\r\n")
        self.wfile.flush()
        time.sleep(0.2)
        self.close_hard()

    def close_hard(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def path_stall(self) -> None:
        """Never answer; wait until the proxy gives up on us."""
        with contextlib.suppress(OSError):
            self.connection.settimeout(30)
            while self.connection.recv(65536):
                pass
        self.server.record["stall_closed_at"] = time.monotonic()
        self.close_connection = True

    def path_forever(self) -> None:
        """Stream chunks until the proxy hangs up; record when that happened."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                self.wfile.write(b"400\r\n" + b"f" * 1024 + b"\r\n")
                self.wfile.flush()
                time.sleep(0.02)
        except OSError:
            self.server.record["forever_closed_at"] = time.monotonic()
        self.close_connection = True

    def path_canned(self) -> None:
        """A gzip body with repeated headers and two cookies."""
        body = gzip.compress(b"compressed hello " * 100)
        self.answer(
            200,
            body,
            [
                ("Content-Type", "text/plain"),
                ("Content-Encoding", "gzip"),
                ("X-Multi", "one"),
                ("X-Multi", "two"),
                ("Set-Cookie", "a=1; Path=/"),
                ("Set-Cookie", "b=2; Path=/; HttpOnly"),
                ("X-Accel-Buffering", "no"),
            ],
        )

    def path_status(self) -> None:
        code = int(self.query["code"])
        self.send_response(code)
        self.send_header("ETag", '"v1"')
        self.end_headers()

    def path_headers(self) -> None:
        """Echo the request line target and headers as JSON (repeats kept)."""
        body = json.dumps({"target": self.path, "headers": list(self.headers.items())}).encode()
        self.answer(200, body, [("Content-Type", "application/json")])


class UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True
    record: dict[str, Any]


@contextlib.contextmanager
def serve(tls: ssl.SSLContext | None = None) -> Iterator[UpstreamServer]:
    server = UpstreamServer(("127.0.0.1", 0), Upstream)
    server.record = {}
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with serve() as server:
        yield server


def url(server: UpstreamServer, scheme: str = "http", host: str = "127.0.0.1") -> str:
    return f"{scheme}://{host}:{server.server_address[1]}"


def make_gate(
    gate_factory: Callable[..., Gate], upstream_url: str, upstream: dict[str, Any] | None = None,
    **changes: Any,
) -> Gate:
    """A gate whose [upstream] table gets C{upstream} (the factory's own keyword is the URL)."""
    gate = gate_factory(upstream=upstream_url, start=False, **changes)
    gate.config["upstream"].update(upstream or {})
    gate.write_config(gate.config)
    return gate.start()


@pytest.fixture(scope="module")
def shared_gate(tmp_path_factory: Any, upstream: UpstreamServer) -> Iterator[Gate]:
    """One gate for the tests that need no special configuration (saves start-ups)."""
    workdir = tmp_path_factory.mktemp("proxy-gate")
    port = free_port()
    config = base_config(str(workdir / "state"), port, url(upstream))
    config["upstream"].update({"idle_timeout": 2, "max_request_body": "400MB"})
    gate = Gate(str(workdir), config, port)
    try:
        yield gate.start()
    finally:
        gate.stop()


@pytest.fixture
def gate(shared_gate: Gate, upstream: UpstreamServer) -> Gate:
    upstream.record.clear()
    return shared_gate


@pytest.fixture
def cookie(gate: Gate) -> str:
    return cookie_header(gate)


# --------------------------------------------------------------------------
# clients and process observation


def cookie_header(gate: Gate) -> str:
    return f"pingated={gate.login()}"


def raw_connect(gate: Gate, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read up to the end of a response head; return (head, bytes already read after it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def file_fds(pid: int) -> set[str]:
    """Regular files (and anonymous temp files) the process has open."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("/") and not target.startswith("/dev/"):
                found.add(target)
    return found


class Watcher:
    """Samples a process's RSS and newly opened files every 20 ms during a transfer."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline_files = file_fds(pid)
        self.peak_kb = rss_kb(pid)
        self.new_files: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak_kb = max(self.peak_kb, rss_kb(self.pid))
                self.new_files |= file_fds(self.pid) - self.baseline_files
            self._stop.wait(0.02)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def gate_pid(gate: Gate) -> int:
    assert gate.process is not None
    return gate.process.pid


def expected_crc(size: int) -> int:
    crc = 0
    for _ in range(size // len(BLOCK)):
        crc = zlib.crc32(BLOCK, crc)
    return crc


def connection(gate: Gate, timeout: float = 30) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", gate.port, timeout=timeout)


def wait_for(predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not true after {timeout}s")


# --------------------------------------------------------------------------
# streaming both ways


def test_300mb_upload_streams_with_bounded_memory(
    gate: Gate, cookie: str, upstream: UpstreamServer
) -> None:
    """
    A 300 MB upload reaches a slow upstream while the client is still
    sending; the gate's RSS stays under 150 MB and it opens no temp file.
    """
    conn = connection(gate, timeout=120)
    with Watcher(gate_pid(gate)) as watcher:
        conn.putrequest("POST", "/sink?slow=1.5")
        conn.putheader("Cookie", cookie)
        conn.putheader("Content-Length", str(BIG))
        conn.endheaders()
        for _ in range(BIG // len(BLOCK)):
            conn.send(BLOCK)
        finished_sending = time.monotonic()
        response = conn.getresponse()
        result = json.loads(response.read())
    conn.close()
    assert response.status == 200
    assert result == {"received": BIG, "crc": expected_crc(BIG)}
    first = upstream.record["first_byte_at"]
    assert first < finished_sending, "upstream saw nothing before the client finished"
    # The upstream read slowly for 1.5 s: with backpressure, the client
    # cannot have finished much before the upstream sped up.
    assert finished_sending - first > 1.0
    assert watcher.peak_kb < RSS_LIMIT_KB, f"RSS peaked at {watcher.peak_kb} kB"
    assert not watcher.new_files, f"gate opened files: {watcher.new_files}"
    assert upstream.record["headers"]["Content-Length"] == str(BIG)


def test_300mb_download_with_slow_client_bounded_memory(gate: Gate, cookie: str) -> None:
    """
    A 300 MB download to a client that reads slowly at first: the upstream is
    paused instead of the gate buffering; RSS < 150 MB, no temp file.
    """
    conn = connection(gate, timeout=120)
    with Watcher(gate_pid(gate)) as watcher:
        conn.request("GET", f"/source?size={BIG}", headers={"Cookie": cookie})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Length") == str(BIG)
        total = 0
        crc = 0
        started = time.monotonic()
        while data := response.read1(1 << 20):
            total += len(data)
            crc = zlib.crc32(data, crc)
            if time.monotonic() - started < 1.5:
                time.sleep(0.02)
    conn.close()
    assert total == BIG
    assert crc == expected_crc(BIG)
    assert watcher.peak_kb < RSS_LIMIT_KB, f"RSS peaked at {watcher.peak_kb} kB"
    assert not watcher.new_files, f"gate opened files: {watcher.new_files}"


def test_chunked_upload_is_streamed(gate: Gate, cookie: str, upstream: UpstreamServer) -> None:
    """A chunked upload (no Content-Length) arrives whole; the upstream gets it chunked."""
    conn = connection(gate)
    blocks = [BLOCK] * 5
    conn.request("PUT", "/sink", body=iter(blocks), headers={"Cookie": cookie},
                 encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 200
    assert json.loads(response.read())["received"] == 5 * len(BLOCK)
    assert upstream.record["headers"].get("Transfer-Encoding") == "chunked"


def test_sse_events_reach_the_client_within_50ms(gate: Gate, cookie: str) -> None:
    """Each server-sent event is delivered the moment the upstream writes it."""
    sock = raw_connect(gate)
    sock.sendall(
        f"GET /sse?n=10&interval=0.1 HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n"
        f"Cookie: {cookie}\r\n\r\n".encode()
    )
    head, buffer = read_head(sock)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"x-accel-buffering: no" in head.lower()
    delays = []
    with sock:
        while len(delays) < 10:
            stamps = re.findall(rb"data: (\d+)\n\n", buffer)
            if stamps:
                delays += [(time.monotonic_ns() - int(s)) / 1e6 for s in stamps]
                buffer = buffer[buffer.rfind(b"\n\n") + 2 :]
                continue
            data = sock.recv(65536)
            assert data, "stream ended early"
            buffer += data
    assert len(delays) == 10
    assert max(delays) < 50, f"event delays (ms): {delays}"


# --------------------------------------------------------------------------
# aborts


@pytest.mark.parametrize("path", ["/die-length", "/die-chunked"])
def test_upstream_dying_mid_body_aborts_the_client(gate: Gate, cookie: str, path: str) -> None:
    """A truncated upstream body is never passed off as a complete response."""
    conn = connection(gate, timeout=10)
    conn.request("GET", path, headers={"Cookie": cookie})
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        response.read()
    conn.close()


def test_client_leaving_mid_response_drops_the_upstream(
    gate: Gate, cookie: str, upstream: UpstreamServer
) -> None:
    """The upstream connection is closed when the client goes away."""
    sock = raw_connect(gate)
    sock.sendall(f"GET /forever HTTP/1.1\r\nHost: t\r\nCookie: {cookie}\r\n\r\n".encode())
    head, _ = read_head(sock)
    assert head.startswith(b"HTTP/1.1 200")
    sock.recv(65536)
    left = time.monotonic()
    sock.close()
    closed = wait_for(lambda: upstream.record.get("forever_closed_at"), timeout=5)
    assert closed - left < 5


def test_client_leaving_mid_upload_drops_the_upstream(
    gate: Gate, cookie: str, upstream: UpstreamServer
) -> None:
    """An upload cut short by the client is cut short upstream too."""
    sock = raw_connect(gate)
    sock.sendall(
        f"POST /sink HTTP/1.1\r\nHost: t\r\nCookie: {cookie}\r\n"
        f"Content-Length: {10 * len(BLOCK)}\r\n\r\n".encode()
    )
    sock.sendall(BLOCK)
    wait_for(lambda: upstream.record.get("first_byte_at"), timeout=5)
    sock.close()
    wait_for(lambda: upstream.record.get("done_at"), timeout=5)
    assert upstream.record["total"] < 10 * len(BLOCK)


# --------------------------------------------------------------------------
# timeouts and limits


def test_idle_upstream_gives_504(gate: Gate, cookie: str, upstream: UpstreamServer) -> None:
    """No byte within idle_timeout (2 s here): 504, JSON for an API client."""
    started = time.monotonic()
    response = gate.request("GET", "/stall", headers={"Cookie": cookie})
    assert response.status == 504
    assert 1.5 < time.monotonic() - started < 8
    assert response.header("content-type") == "application/json"
    assert "error" in response.json()
    assert "Traceback" not in response.body.decode()
    wait_for(lambda: upstream.record.get("stall_closed_at"), timeout=5)


def test_idle_upstream_gives_html_504_to_browsers(gate: Gate, cookie: str) -> None:
    """A browser navigation gets the short HTML page instead."""
    response = gate.request("GET", "/stall", headers={"Cookie": cookie, "Accept": "text/html"})
    assert response.status == 504
    assert response.header("content-type", ).startswith("text/html")
    assert b"<h1>" in response.body


def test_unreachable_upstream_gives_502(gate_factory: Callable[..., Gate]) -> None:
    """Connection refused and connect timeout both give 502."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        # Fill the accept queue so further SYNs are dropped: connecting hangs.
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        hanging = make_gate(gate_factory, f"http://127.0.0.1:{port}", {"connect_timeout": 1})
        cookie = cookie_header(hanging)
        started = time.monotonic()
        response = hanging.request("GET", "/x", headers={"Cookie": cookie})
        assert response.status == 502
        assert 0.5 < time.monotonic() - started < 8
        for filler in fillers:
            filler.close()
    refused = make_gate(gate_factory, f"http://127.0.0.1:{free_port()}")
    response = refused.request("GET", "/x", headers={"Cookie": cookie_header(refused)})
    assert response.status == 502
    assert response.json()["error"]


@pytest.fixture
def small_gate(gate_factory: Callable[..., Gate], upstream: UpstreamServer) -> Gate:
    upstream.record.clear()
    return make_gate(gate_factory, url(upstream), {"max_request_body": "1MB"})


def test_declared_body_over_limit_gives_413_before_100_continue(small_gate: Gate) -> None:
    """Content-Length over max_request_body: 413 at once, no 100 Continue, nothing upstream."""
    cookie = cookie_header(small_gate)
    sock = raw_connect(small_gate)
    sock.sendall(
        f"POST /sink HTTP/1.1\r\nHost: t\r\nCookie: {cookie}\r\nContent-Length: 5000000\r\n"
        "Expect: 100-continue\r\n\r\n".encode()
    )
    head, _ = read_head(sock)
    sock.close()
    assert head.startswith(b"HTTP/1.1 413")
    assert b"connection: close" in head.lower()


def test_declared_body_over_limit_is_readable_without_expect(
    small_gate: Gate, upstream: UpstreamServer
) -> None:
    """A client that sends the body anyway still gets to read the 413."""
    cookie = cookie_header(small_gate)
    response = small_gate.request("POST", "/sink", b"z" * 3_000_000, {"Cookie": cookie})
    assert response.status == 413
    assert response.json() == {"error": "request body too large"}
    assert "first_byte_at" not in upstream.record


def test_chunked_body_crossing_limit_gives_413(
    small_gate: Gate, upstream: UpstreamServer
) -> None:
    """A chunked upload is cut off with 413 when it crosses max_request_body."""
    cookie = cookie_header(small_gate)
    conn = connection(small_gate)
    chunks = [b"c" * 65536] * 40  # 2.5 MB
    conn.request("POST", "/sink", body=iter(chunks), headers={"Cookie": cookie},
                 encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413
    response.read()
    conn.close()
    assert upstream.record.get("done_at") is None or upstream.record.get("headers") is not None


def test_expect_100_continue(gate: Gate, cookie: str) -> None:
    """100 Continue comes once the request is accepted; a refused one gets its answer instead."""
    sock = raw_connect(gate)
    sock.sendall(
        f"POST /sink HTTP/1.1\r\nHost: t\r\nCookie: {cookie}\r\nContent-Length: 11\r\n"
        "Expect: 100-continue\r\n\r\n".encode()
    )
    head, rest = read_head(sock)
    assert head == b"HTTP/1.1 100 Continue"
    sock.sendall(b"hello world")
    head, rest = read_head(sock) if not rest else (rest.partition(b"\r\n\r\n")[0], b"")
    assert head.startswith(b"HTTP/1.1 200")
    sock.close()

    sock = raw_connect(gate)
    sock.sendall(
        b"POST /sink HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"
    )
    head, _ = read_head(sock)
    sock.close()
    assert head.startswith(b"HTTP/1.1 401")


# --------------------------------------------------------------------------
# fidelity


def test_head_204_304_framing_on_one_connection(gate: Gate, cookie: str) -> None:
    """HEAD keeps the upstream's Content-Length; 204/304 carry no body; keep-alive survives."""
    conn = connection(gate)
    headers = {"Cookie": cookie}
    conn.request("HEAD", "/source?size=12345", headers=headers)
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Length") == "12345"
    assert response.read() == b""
    for code in (204, 304):
        conn.request("GET", f"/status?code={code}", headers=headers)
        response = conn.getresponse()
        assert response.status == code
        assert response.getheader("Transfer-Encoding") is None
        assert response.getheader("ETag") == '"v1"'
        assert response.read() == b""
    conn.request("GET", "/source?size=10", headers=headers)
    response = conn.getresponse()
    assert response.read() == BLOCK[:10]
    conn.close()


def test_encodings_and_repeated_headers_pass_untouched(gate: Gate, cookie: str) -> None:
    """gzip bytes arrive as sent; repeated headers and Set-Cookies are all kept."""
    response = gate.request("GET", "/canned", headers={"Cookie": cookie,
                                                       "Accept-Encoding": "gzip"})
    assert response.status == 200
    assert response.header("content-encoding") == "gzip"
    assert gzip.decompress(response.body) == b"compressed hello " * 100
    assert response.all("x-multi") == ["one", "two"]
    assert response.all("set-cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]
    assert response.header("x-accel-buffering") == "no"


def _upstream_headers(gate: Gate, headers: dict[str, str],
                      target: str = "/headers") -> tuple[str, dict[str, list[str]]]:
    response = gate.request("GET", target, headers=headers)
    assert response.status == 200
    data = response.json()
    seen: dict[str, list[str]] = {}
    for name, value in data["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return data["target"], seen


def test_request_rewriting(gate: Gate, cookie: str) -> None:
    """Query byte for byte, hop-by-hop headers dropped, the gate cookie removed, others kept."""
    target, seen = _upstream_headers(
        gate,
        {"Cookie": f"{cookie}; other=1", "Connection": "keep-alive, X-Hop", "X-Hop": "1",
         "Te": "trailers", "X-Keep": "yes", "Accept-Encoding": "gzip"},
        "/headers?b=2&a=1&b=1&c",
    )
    assert target == "/headers?b=2&a=1&b=1&c"
    assert seen["cookie"] == ["other=1"]
    assert "x-hop" not in seen and "te" not in seen
    assert seen["x-keep"] == ["yes"]
    assert seen["accept-encoding"] == ["gzip"]


def test_forwarded_headers_believed_from_trusted_peers(gate: Gate, cookie: str) -> None:
    """Loopback is trusted by default: the client's X-Forwarded-For is extended."""
    _, seen = _upstream_headers(gate, {"Cookie": cookie, "X-Forwarded-For": "203.0.113.9",
                                       "X-Forwarded-Proto": "https"})
    assert seen["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    assert seen["x-real-ip"] == ["203.0.113.9"]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["host"] == [f"127.0.0.1:{gate.config['upstream']['url'].rsplit(':', 1)[1]}"]


def test_forwarded_headers_ignored_from_untrusted_peers(
    gate_factory: Callable[..., Gate], upstream: UpstreamServer
) -> None:
    """Without loopback in trusted_proxies, forged X-Forwarded-* are replaced, not extended."""
    strict = make_gate(gate_factory, url(upstream), {"preserve_host": True},
                       server={"trusted_proxies": ["10.0.0.0/8"]})
    cookie = cookie_header(strict)
    _, seen = _upstream_headers(strict, {"Cookie": cookie, "X-Forwarded-For": "203.0.113.9",
                                         "X-Real-IP": "203.0.113.9",
                                         "X-Forwarded-Proto": "https",
                                         "X-Forwarded-Host": "evil.example",
                                         "Host": "app.example:8080"})
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-real-ip"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["app.example:8080"]
    # preserve_host: the upstream sees the Host the client used.
    assert seen["host"] == ["app.example:8080"]


# --------------------------------------------------------------------------
# HTTPS upstreams


def _make_pki(directory: str) -> tuple[str, ssl.SSLContext]:
    """A throwaway CA and a server certificate for "localhost"; returns (CA file, server ctx)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("proxy test CA"))
        .issuer_name(name("proxy test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = os.path.join(directory, "ca.pem")
    with open(ca_file, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    cert_file = os.path.join(directory, "server.pem")
    with open(cert_file, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file)
    return ca_file, context


def test_https_upstream_verified_against_custom_ca(
    gate_factory: Callable[..., Gate], tmp_path: Any
) -> None:
    """Trusted CA and matching name: proxied; unknown CA or wrong name: 502."""
    ca_file, context = _make_pki(str(tmp_path))
    with serve(tls=context) as tls_upstream:
        good = make_gate(gate_factory, url(tls_upstream, "https", "localhost"),
                         {"ca_file": ca_file})
        response = good.request("GET", "/headers", headers={"Cookie": cookie_header(good)})
        assert response.status == 200
        assert response.json()["target"] == "/headers"

        unknown_ca = make_gate(gate_factory, url(tls_upstream, "https", "localhost"))
        response = unknown_ca.request("GET", "/headers",
                                      headers={"Cookie": cookie_header(unknown_ca)})
        assert response.status == 502

        wrong_name = make_gate(gate_factory, url(tls_upstream, "https", "127.0.0.1"),
                               {"ca_file": ca_file})
        response = wrong_name.request("GET", "/headers",
                                      headers={"Cookie": cookie_header(wrong_name)})
        assert response.status == 502


def test_streaming_upload_through_a_tls_listener(
    gate_factory: Callable[..., Gate], upstream: UpstreamServer, tmp_path: Any
) -> None:
    """Uploads stream, with backpressure, when the client reaches the gate over TLS too."""
    ca_file, _ = _make_pki(str(tmp_path))
    pem = str(tmp_path / "server.pem")
    upstream.record.clear()
    gate = gate_factory(upstream=url(upstream), start=False)
    gate.port = free_port()
    gate.config["server"]["listen"] = [
        f"ssl:{gate.port}:interface=127.0.0.1:privateKey={pem}:certKey={pem}"
    ]
    gate.write_config(gate.config)
    gate.start()
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False  # the certificate names "localhost"; we dial 127.0.0.1

    conn = http.client.HTTPSConnection("127.0.0.1", gate.port, timeout=30, context=context)
    conn.request("POST", "/.pingated/login", f"pin={TEST_PIN}&next=/",
                 {"Content-Type": "application/x-www-form-urlencoded"})
    response = conn.getresponse()
    response.read()
    cookie = response.getheader("Set-Cookie", "").split(";", 1)[0]
    assert response.status == 303 and cookie.startswith("pingated=")

    size = 24 * len(BLOCK)
    conn.putrequest("POST", "/sink?slow=1")
    conn.putheader("Cookie", cookie)
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    for _ in range(24):
        conn.send(BLOCK)
    finished_sending = time.monotonic()
    response = conn.getresponse()
    assert json.loads(response.read()) == {"received": size, "crc": expected_crc(size)}
    conn.close()
    assert upstream.record["first_byte_at"] < finished_sending
