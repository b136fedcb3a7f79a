"""
Tests for trusted identity headers (contract section 4, C{[identity]}):
L{pingated.identity}.

The spoofing tests run the real gate: whatever copies of an identity header
a client sends, in any case or with underscores, the upstream sees exactly
the configured value -- on plain requests and on the WebSocket handshake --
and an anonymous visitor on a public path sees none at all.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from harness import Gate, base_config, free_port
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from pingated.headers import normalized
from pingated.identity import (
    IdentityResource,
    apply_identity,
    set_identity_response_headers,
    strip_identity,
)

EMAIL = "owner@example.com"
IDENTITY = {"X-Trusted-User-Email": EMAIL, "X-Trusted-User-Name": "Owner Ü"}
SPOOFS = {
    "X-Trusted-User-Email": "attacker@evil.example",
    "x-trusted-user-email": "attacker2@evil.example",
    "X_Trusted_User_Email": "attacker3@evil.example",
    "x_trusted-user_email": "attacker4@evil.example",
}


PUBLIC_HOST = "app.test"
WS_HOST = "ws.test"


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[HandshakeRecorder]:
    recorder = HandshakeRecorder()
    yield recorder
    recorder.stop()


@pytest.fixture(scope="module")
def identity_gate(
    tmp_path_factory: Any, upstream_url: str, ws_upstream: HandshakeRecorder
) -> Iterator[Gate]:
    """
    One real gate for the module: the demo upstream with the identity headers,
    C{app.test} with a public path, C{ws.test} in front of the handshake recorder.
    """
    workdir = tmp_path_factory.mktemp("identity-gate")
    port = free_port()
    config = base_config(str(workdir / "state"), port, upstream_url)
    config["identity"] = {"headers": IDENTITY}
    config["site"] = [
        {"host": PUBLIC_HOST, "upstream": upstream_url, "public_paths": ["/echo"]},
        {"host": WS_HOST, "upstream": ws_upstream.url},
    ]
    gate = Gate(str(workdir), config, port)
    try:
        yield gate.start()
    finally:
        gate.stop()


_SESSIONS: dict[str, str] = {}


def _login(gate: Gate) -> str:
    if gate.workdir not in _SESSIONS:
        _SESSIONS[gate.workdir] = gate.login()
    return _SESSIONS[gate.workdir]


def _identity_seen(echo: dict[str, Any]) -> list[tuple[str, str]]:
    """The echoed headers that a server could read as an identity header."""
    wanted = {normalized(n.encode()) for n in IDENTITY}
    return [(k, v) for k, v in echo["headers"] if normalized(k.encode()) in wanted]


def _spoof_request(gate: Gate, path: str, cookie: str | None, host: str | None = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", gate.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host or f"127.0.0.1:{gate.port}")
        if cookie:
            conn.putheader("Cookie", f"pingated={cookie}")
        for name, value in SPOOFS.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_spoofed_identity_never_reaches_upstream(identity_gate: Gate) -> None:
    """Client copies (any case, underscores) are removed; the configured values are set once."""
    status, body = _spoof_request(identity_gate, "/echo", _login(identity_gate))
    assert status == 200
    seen = sorted((k.lower(), v) for k, v in _identity_seen(json.loads(body)))
    # The demo echo shows header bytes as latin-1: the name went up as UTF-8.
    name = IDENTITY["X-Trusted-User-Name"].encode("utf-8").decode("latin-1")
    assert seen == [("x-trusted-user-email", EMAIL), ("x-trusted-user-name", name)]
    assert "attacker" not in body.decode()


def test_anonymous_public_path_gets_no_identity(identity_gate: Gate) -> None:
    """A public path reached without a session must not be logged in as the owner."""
    status, body = _spoof_request(identity_gate, "/echo", None, host=PUBLIC_HOST)
    assert status == 200
    assert _identity_seen(json.loads(body)) == []
    # The same path with a session does carry the identity.
    status, body = _spoof_request(identity_gate, "/echo", _login(identity_gate), host=PUBLIC_HOST)
    assert status == 200
    assert EMAIL in [v for _, v in _identity_seen(json.loads(body))]
    assert "attacker" not in body.decode()


# --- the WebSocket handshake ---------------------------------------------------------

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HandshakeRecorder:
    """
    A loopback upstream that accepts one WebSocket handshake and records its
    headers (it never sends a frame; the test only looks at the handshake).
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.headers: list[tuple[str, str]] = []
        self.got = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(4096)
                    if not data:
                        break
                    head += data
                lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
                self.headers = [
                    (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)
                ]
                key = next(v for k, v in self.headers if k.lower() == "sec-websocket-key")
                accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest())
                conn.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                )
                self.got.set()

    def stop(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_websocket_handshake_carries_identity(
    identity_gate: Gate, ws_upstream: HandshakeRecorder
) -> None:
    """The upgrade sent upstream has the configured identity and none of the client's copies."""
    gate = identity_gate
    cookie = _login(gate)
    client = socket.create_connection(("127.0.0.1", gate.port), timeout=10)
    try:
        key = base64.b64encode(b"0123456789abcdef").decode()
        lines = [
            "GET /ws HTTP/1.1",
            f"Host: {WS_HOST}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            f"Cookie: pingated={cookie}",
            *(f"{k}: {v}" for k, v in SPOOFS.items()),
        ]
        client.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = client.recv(4096)
            if not data:
                break
            answer += data
    finally:
        client.close()
    if b" 501 " in answer.split(b"\r\n")[0]:
        pytest.skip("this build has no WebSocket bridge yet (501)")
    assert answer.startswith(b"HTTP/1.1 101"), answer
    assert ws_upstream.got.wait(10)
    seen = [
        (k.lower(), v)
        for k, v in ws_upstream.headers
        if normalized(k.encode()) in {normalized(n.encode()) for n in IDENTITY}
    ]
    assert ("x-trusted-user-email", EMAIL) in seen
    assert len([k for k, _ in seen if k == "x-trusted-user-email"]) == 1
    assert not [v for _, v in seen if "attacker" in v]


# --- unit tests --------------------------------------------------------------------


def test_strip_and_apply() -> None:
    """Every spelling goes; the configured header is added exactly once."""
    identity = [("X-Trusted-User-Email", EMAIL)]
    headers = Headers()
    for name, value in SPOOFS.items():
        headers.addRawHeader(name.encode(), value.encode())
    headers.addRawHeader(b"X-Other", b"kept")
    apply_identity(headers, identity)
    assert headers.getRawHeaders(b"x-trusted-user-email") == [EMAIL.encode()]
    names = [normalized(n) for n, _ in headers.getAllRawHeaders()]
    assert names.count(b"x-trusted-user-email") == 1
    strip_identity(headers, identity)
    assert [n.lower() for n, _ in headers.getAllRawHeaders()] == [b"x-other"]


def test_values_are_utf8() -> None:
    """A non-ASCII display name is sent as UTF-8 bytes."""
    headers = Headers()
    apply_identity(headers, [("X-Trusted-User-Name", "Zoë")])
    assert headers.getRawHeaders(b"x-trusted-user-name") == ["Zoë".encode()]


class _Seen(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[tuple[bytes, list[bytes]]] = []

    def render(self, request: Any) -> bytes:
        self.headers = list(request.requestHeaders.getAllRawHeaders())
        return b"ok"


@pytest.mark.parametrize("anonymous", [False, True])
def test_resource_alone(anonymous: bool) -> None:
    """IdentityResource wraps anything; the anonymous variant only strips."""
    inner = _Seen()
    resource = IdentityResource(inner, [("X-Trusted-User-Email", EMAIL)], anonymous=anonymous)
    request = DummyRequest([b""])
    request.requestHeaders.addRawHeader(b"X_Trusted_User_Email", b"spoof")
    assert resource.render(request) == b"ok"
    values = [v for n, vs in inner.headers if normalized(n) == b"x-trusted-user-email" for v in vs]
    assert values == ([] if anonymous else [EMAIL.encode()])


def test_response_headers_for_verify() -> None:
    """The forward-auth answer can carry the identity for nginx/Traefik/Caddy to copy."""
    headers = Headers({b"X-Trusted-User-Email": [b"stale"]})
    set_identity_response_headers(headers, [("X-Trusted-User-Email", EMAIL)])
    assert headers.getRawHeaders(b"x-trusted-user-email") == [EMAIL.encode()]
