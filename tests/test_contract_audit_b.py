"""
Regression tests from the contract audit of sections 4, 4a and 4b.

Each test pins a deviation the audit found against the real daemon (or a
promise no other test exercised end to end), so it cannot come back.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import GateFactory
from harness import Gate
from twisted.web.test.requesthelper import DummyRequest

from pingated.gate import MAX_SESSION_COOKIES, session_cookies


def _raw(gate: Gate, request: bytes, timeout: float = 10.0) -> bytes:
    """Send C{request} as bytes (repeated headers, odd URIs) and read to EOF."""
    with socket.create_connection(("127.0.0.1", gate.port), timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk


def _split(response: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """Status, headers (lower-cased names) and de-chunked body of a raw response."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if b"chunked" in b",".join(headers.get(b"transfer-encoding", [])).lower():
        out = b""
        while body:
            size_line, _, rest = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += rest[:size]
            body = rest[size + 2 :]
        body = out
    return status, headers, body


def _echo(response: bytes) -> Any:
    status, _, body = _split(response)
    assert status == 200, response[:300]
    return json.loads(body)


def test_session_cookies_lists_every_value_in_every_header() -> None:
    """Unit: all same-named gate cookies are found, across Cookie headers, capped."""
    request = DummyRequest([b"/"])
    request.requestHeaders.setRawHeaders(
        b"cookie", [b"a=1; pingated=one; b=2", b"pingated=two", b"xpingated=no; pingated"]
    )
    assert session_cookies(request, "pingated") == [b"one", b"two"]
    request.requestHeaders.setRawHeaders(b"cookie", [b"; ".join([b"pingated=x"] * 50)])
    assert len(session_cookies(request, "pingated")) == MAX_SESSION_COOKIES


def test_a_valid_cookie_next_to_a_stale_one_is_a_session(gate: Gate) -> None:
    """
    Contract 4: a request carrying a valid session is proxied.  Browsers send
    every cookie of the name (e.g. a stale host-only one after cookie_domain
    changed); the last one used to win, so valid-then-stale was refused.
    All copies are removed upstream; other cookies pass.
    """
    cookie = gate.login().encode("ascii")
    for headers in (
        [b"a=1; pingated=" + cookie + b"; b=2", b"pingated=stale; c=3"],
        [b"a=1; pingated=stale; pingated=" + cookie + b"; b=2", b"c=3"],
    ):
        request = b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        request += b"".join(b"Cookie: " + h + b"\r\n" for h in headers) + b"\r\n"
        seen = _echo(_raw(gate, request))
        cookies = [v for k, v in seen["headers"] if k.lower() == "cookie"]
        assert cookies == ["a=1; b=2", "c=3"]
    only_stale = (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCookie: pingated=stale\r\n\r\n"
    )
    assert _split(_raw(gate, only_stale))[0] == 401


def test_custom_methods_and_odd_queries_reach_upstream_verbatim(gate: Gate) -> None:
    """Contract 4: every method proxied; query strings byte for byte."""
    cookie = gate.login().encode("ascii")
    query = b"a=%zz&b&&c=&a=2&a=1&%26=%3D+x;y"
    for method in (b"PROPFIND", b"MKCOL", b"PATCH", b"DELETE", b"OPTIONS"):
        request = (
            method + b" /echo?" + query + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Cookie: pingated=" + cookie + b"\r\nContent-Length: 5\r\n\r\nhello"
        )
        seen = _echo(_raw(gate, request))
        assert seen["method"] == method.decode()
        assert seen["path"] == "/echo"
        assert seen["query"] == query.decode()
        assert seen["body"] == "hello"


def test_themed_head_has_the_content_length_of_the_themed_get(
    gate_factory: GateFactory, tmp_path: Any
) -> None:
    """
    Contract 4b: Content-Length stays correct.  HEAD used to carry the
    upstream's length while GET carried length + style element.
    """
    css = tmp_path / "theme.css"
    css.write_text("body{color:red}", encoding="utf-8")
    gate = gate_factory(theme={"css_file": str(css)})
    cookie = gate.login()
    headers = {"Cookie": f"pingated={cookie}", "Accept": "text/html"}
    get = gate.request("GET", "/", headers=headers)
    head = gate.request("HEAD", "/", headers=headers)
    assert get.status == head.status == 200
    assert b"<style>body{color:red}</style></head>" in get.body
    assert get.header("content-length") == str(len(get.body))
    assert head.header("content-length") == get.header("content-length")
    assert head.body == b""


class _HopHandler(http.server.BaseHTTPRequestHandler):
    """An upstream whose response names a custom header in Connection."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Connection", "keep-alive, X-Hop-Secret")
        self.send_header("X-Hop-Secret", "1")
        self.send_header("Keep-Alive", "timeout=5")
        self.send_header("Proxy-Authenticate", "Basic")
        self.send_header("X-End-To-End", "kept")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def hop_upstream() -> Iterator[str]:
    """The upstream above on a free loopback port, stopped at teardown."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HopHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_headers_named_by_upstream_connection_are_not_forwarded(
    gate_factory: GateFactory, hop_upstream: str
) -> None:
    """
    Contract 4: hop-by-hop headers, including those Connection names, are
    not forwarded.  Twisted's client hid the response's Connection header,
    so the headers it named used to reach the client.
    """
    gate = gate_factory(upstream=hop_upstream)
    cookie = gate.login()
    response = gate.request("GET", "/x", headers={"Cookie": f"pingated={cookie}"})
    assert response.status == 200
    assert response.body == b"ok"
    assert response.header("x-end-to-end") == "kept"
    for name in ("x-hop-secret", "keep-alive", "proxy-authenticate"):
        assert response.header(name) is None, name
