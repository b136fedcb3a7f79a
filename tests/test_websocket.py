"""
The WebSocket bridge (pingated.websocket): pure rules in memory, and the
bridge itself end to end against the real twistd process.

Integration tests drive the gate with the `websockets` asyncio client.  The
upstream is either the demo upstream's /ws echo, or a recording upstream
(a `websockets` server inside the test's own event loop) that remembers
every TCP accept, handshake request and close frame, so a test can prove
what did, or did not, reach the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest
from harness import (
    TEST_SECRET,
    Gate,
    ManagedProcess,
    base_config,
    deep_update,
    free_port,
    pin_hash,
    wait_for_port,
)
from twisted.web.test.requesthelper import DummyRequest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pingated.config import ConfigError, UpstreamConfig, WebSocketConfig, parse_config
from pingated.websocket import (
    normalize_origin,
    origin_allowed,
    send_close,
    websocket_target,
    wire_close,
)

LOOPBACK = ("127.0.0.1/32",)


def run(coro: Awaitable[Any], timeout: float = 30.0) -> Any:
    """Run one test coroutine with a hard bound on its time."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


# --------------------------------------------------------------------------
# Pure rules
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://Example.COM", "https://example.com"),
        ("https://example.com:443", "https://example.com"),
        ("http://example.com:80/", "http://example.com"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:3060", "http://[::1]:3060"),
        ("null", None),
        ("", None),
        ("file://", None),
        ("https://example.com/path", None),
        ("https://user@example.com", None),
        ("https://example.com:99999", None),
        ("javascript:alert(1)", None),
    ],
)
def test_normalize_origin(text: str, expected: str | None) -> None:
    """Origins compare by scheme, host and effective port only; junk is no origin."""
    assert normalize_origin(text) == expected


def _request(headers: dict[bytes, bytes], uri: bytes = b"/ws") -> DummyRequest:
    request = DummyRequest(uri.split(b"/")[1:])
    request.uri = uri
    request.path = uri.split(b"?")[0]
    request.isSecure = lambda: False  # type: ignore[method-assign]
    for name, value in headers.items():
        request.requestHeaders.addRawHeader(name, value)
    return request


def _trusted() -> Any:
    import ipaddress

    return tuple(ipaddress.ip_network(n) for n in LOOPBACK)


def test_origin_same_as_gate_allowed_sibling_refused() -> None:
    """The gate's own origin passes; a sibling subdomain (CSWSH) does not."""
    own = _request({b"host": b"app.example.com", b"origin": b"http://app.example.com"})
    sibling = _request({b"host": b"app.example.com", b"origin": b"http://evil.example.com"})
    other_port = _request({b"host": b"app.example.com", b"origin": b"http://app.example.com:81"})
    assert origin_allowed(own, _trusted(), ())
    assert not origin_allowed(sibling, _trusted(), ())
    assert not origin_allowed(other_port, _trusted(), ())


def test_origin_allow_list_and_absent_origin() -> None:
    """Configured origins pass (normalised); no Origin (not a browser) passes; null fails."""
    listed = _request({b"host": b"gate", b"origin": b"HTTPS://App.Example.com:443"})
    absent = _request({b"host": b"gate"})
    null = _request({b"host": b"gate", b"origin": b"null"})
    twice = _request({b"host": b"gate"})
    twice.requestHeaders.setRawHeaders(b"origin", [b"http://gate", b"http://gate"])
    allowed = ("https://app.example.com",)
    assert origin_allowed(listed, _trusted(), allowed)
    assert not origin_allowed(listed, _trusted(), ())
    assert origin_allowed(absent, _trusted(), ())
    assert not origin_allowed(null, _trusted(), allowed)
    assert not origin_allowed(twice, _trusted(), ())


def test_origin_https_from_trusted_proxy() -> None:
    """Behind a trusted TLS front proxy the gate's origin is https://<forwarded host>."""
    request = _request(
        {
            b"host": b"127.0.0.1:3060",
            b"x-forwarded-proto": b"https",
            b"x-forwarded-host": b"app.example.com",
            b"origin": b"https://app.example.com",
        }
    )
    request.client = _address("127.0.0.1")
    assert origin_allowed(request, _trusted(), ())
    request.client = _address("203.0.113.9")  # untrusted: its X-Forwarded-* are ignored
    assert not origin_allowed(request, _trusted(), ())


def _address(host: str) -> Any:
    from twisted.internet.address import IPv4Address

    return IPv4Address("TCP", host, 40000)


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (None, None, (None, None)),
        (1000, b"", (1000, None)),
        (1001, b"bye", (1001, b"bye")),
        (1011, b"x" * 200, (1011, b"x" * 123)),
        (4000, b"app", (4000, b"app")),
        (1005, b"", (1000, None)),
        (1006, b"", (1000, None)),
        (1015, b"", (1000, None)),
    ],
)
def test_wire_close(
    code: int | None, reason: bytes | None, expected: tuple[int | None, bytes | None]
) -> None:
    """1005/1006/1015 never reach the wire; valid codes and reasons pass unchanged."""
    assert wire_close(code, reason) == expected


class _FakeLeg:
    """Records how send_close tried to close it."""

    def __init__(self, state: int) -> None:
        self.state = state
        self.calls: list[tuple[str, Any, Any]] = []

    def sendClose(self, code: int | None = None, reason: str | None = None) -> None:
        if code is not None and code != 1000 and not 3000 <= code <= 4999:
            raise AssertionError("autobahn would refuse this code")
        self.calls.append(("sendClose", code, reason))

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None) -> None:
        self.calls.append(("sendCloseFrame", code, reasonUtf8))


def test_send_close_uses_the_right_autobahn_call() -> None:
    """sendClose for 1000/3000-4999, sendCloseFrame for other codes; nothing once closing."""
    from autobahn.websocket.protocol import WebSocketProtocol

    open_state = WebSocketProtocol.STATE_OPEN
    leg = _FakeLeg(open_state)
    send_close(leg, 4001, b"bye")  # type: ignore[arg-type]
    send_close(leg, 1011, b"upstream")  # type: ignore[arg-type]
    send_close(leg, 1000, None)  # type: ignore[arg-type]
    send_close(leg, None, None)  # type: ignore[arg-type]
    assert leg.calls == [
        ("sendClose", 4001, "bye"),
        ("sendCloseFrame", 1011, b"upstream"),
        ("sendClose", 1000, None),
        ("sendCloseFrame", None, None),
    ]
    closing = _FakeLeg(WebSocketProtocol.STATE_CLOSING)
    send_close(closing, 1001, b"")  # type: ignore[arg-type]
    assert closing.calls == []


def test_websocket_target_follows_the_proxy_rules() -> None:
    """Same path and query, hop-by-hop and handshake headers dropped, X-Forwarded-* set."""
    request = _request(
        {
            b"host": b"gate.example.com",
            b"upgrade": b"websocket",
            b"connection": b"Upgrade, X-Hop",
            b"x-hop": b"secret-hop",
            b"sec-websocket-key": b"dGhlIHNhbXBsZSBub25jZQ==",
            b"sec-websocket-version": b"13",
            b"sec-websocket-extensions": b"permessage-deflate",
            b"sec-websocket-protocol": b"chat, echo",
            b"origin": b"http://gate.example.com",
            b"cookie": b"a=1",
            b"x-app": b"\xc3\xa9t\xc3\xa9",
        },
        uri=b"/sock/x?b=2&a=1&a=%20",
    )
    request.client = _address("198.51.100.7")
    upstream = UpstreamConfig(url="http://127.0.0.1:3050/base")
    target = websocket_target(request, upstream, _trusted())
    headers = {name.lower(): value for name, value in target.headers}
    assert target.resource == "/base/sock/x?b=2&a=1&a=%20"
    assert (target.host, target.port, target.secure) == ("127.0.0.1", 3050, False)
    assert target.host_header == ("127.0.0.1", 3050)
    assert target.protocols == ("chat", "echo")
    assert target.origin == "http://gate.example.com"
    assert headers["x-forwarded-for"] == "198.51.100.7"
    assert headers["x-forwarded-host"] == "gate.example.com"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["cookie"] == "a=1"
    assert headers["x-app"] == "été"
    for dropped in (
        "upgrade",
        "connection",
        "x-hop",
        "host",
        "origin",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    ):
        assert dropped not in headers


def test_websocket_target_wss_and_preserve_host() -> None:
    """https upstreams become wss on 443; preserve_host sends the client's Host."""
    request = _request({b"host": b"app.example.com:8443"})
    target = websocket_target(
        request, UpstreamConfig(url="https://backend.internal", preserve_host=True), _trusted()
    )
    assert (target.secure, target.host, target.port) == (True, "backend.internal", 443)
    assert target.host_header == ("app.example.com", 8443)
    assert target.url == "wss://backend.internal:443/ws"


def _config_text(websocket: str) -> str:
    return (
        '[server]\nlisten = ["tcp:3060:interface=127.0.0.1"]\n'
        f'[gate]\npin_hash = "{pin_hash()}"\nsecret = "{TEST_SECRET}"\n'
        '[upstream]\nurl = "http://127.0.0.1:3050"\n' + websocket
    )


def test_config_defaults_and_keys() -> None:
    """[websocket] is optional (16 MB, own origin only); both keys parse."""
    default = parse_config(_config_text(""), "t.toml")
    assert default.websocket == WebSocketConfig((), 16 * 1024**2)
    config = parse_config(
        _config_text(
            '[websocket]\nallowed_origins = ["https://app.example.com/"]\n'
            'max_message_size = "4MB"\n'
        ),
        "t.toml",
    )
    assert config.websocket.allowed_origins == ("https://app.example.com",)
    assert config.websocket.max_message_size == 4 * 1024**2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('allowed_origins = ["app.example.com"]', "t.toml: websocket.allowed_origins: "),
        ('allowed_origins = ["https://a.example/x"]', "t.toml: websocket.allowed_origins: "),
        ('max_message_size = "lots"', "t.toml: websocket.max_message_size: "),
        ("max_message_size = 10", "t.toml: websocket.max_message_size: must be at least 1KB"),
        ("origins = []", "t.toml: websocket.origins: unknown key"),
    ],
)
def test_config_errors(text: str, message: str) -> None:
    """Bad [websocket] values are refused with one line naming the key."""
    with pytest.raises(ConfigError) as caught:
        parse_config(_config_text("[websocket]\n" + text + "\n"), "t.toml")
    assert str(caught.value).startswith(message)


# --------------------------------------------------------------------------
# Integration: fixtures
# --------------------------------------------------------------------------


def _start_gate(workdir: str, upstream_url: str, **changes: Any) -> Gate:
    os.makedirs(workdir, exist_ok=True)
    port = free_port()
    config = base_config(os.path.join(workdir, "state"), port, upstream_url)
    deep_update(config, changes)
    return Gate(workdir, config, port).start()


@pytest.fixture(scope="module")
def demo_gate(tmp_path_factory: Any, upstream_url: str) -> Iterator[Gate]:
    """A gate in front of the demo upstream, with an allowed extra origin and a 5 MB limit."""
    gate = _start_gate(
        str(tmp_path_factory.mktemp("wsdemo")),
        upstream_url,
        websocket={"allowed_origins": ["https://app.example.com"], "max_message_size": "5MB"},
    )
    try:
        yield gate
    finally:
        gate.stop()


@pytest.fixture(scope="module")
def demo_cookie(demo_gate: Gate) -> str:
    """One session for all the demo-gate tests."""
    return demo_gate.login()


@pytest.fixture(scope="module")
def recorder_port() -> int:
    """Where each test's recording upstream listens (the gate is started once)."""
    return free_port()


@pytest.fixture(scope="module")
def rec_gate(tmp_path_factory: Any, recorder_port: int) -> Iterator[Gate]:
    """A gate in front of the recording upstream, with identity headers."""
    gate = _start_gate(
        str(tmp_path_factory.mktemp("wsrec")),
        f"http://127.0.0.1:{recorder_port}",
        identity={"headers": {"X-Trusted-User": "me@example.com"}},
        upstream={"connect_timeout": "3s"},
    )
    try:
        yield gate
    finally:
        gate.stop()


@pytest.fixture(scope="module")
def rec_cookie(rec_gate: Gate) -> str:
    """One session for all the recording-gate tests."""
    return rec_gate.login()


def ws_url(gate: Gate, path: str = "/ws") -> str:
    """The gate's ws:// URL for C{path}."""
    return f"ws://127.0.0.1:{gate.port}{path}"


def gate_connect(
    gate: Gate, path: str, cookie: str | None, headers: dict[str, str] | None = None, **kw: Any
) -> Any:
    """A `websockets` client connection through the gate, with the session cookie."""
    extra = dict(headers or {})
    if cookie is not None:
        extra["Cookie"] = f"pingated={cookie}"
    kw.setdefault("open_timeout", 15)
    kw.setdefault("close_timeout", 10)
    kw.setdefault("ping_interval", None)
    kw.setdefault("max_size", None)
    return connect(ws_url(gate, path), additional_headers=extra, **kw)


async def refused(gate: Gate, path: str, cookie: str | None, **kw: Any) -> Any:
    """Open a socket that must be refused; return the HTTP response."""
    with pytest.raises(InvalidStatus) as caught:
        async with gate_connect(gate, path, cookie, **kw):
            pass
    return caught.value.response


class Recorder:
    """
    The recording upstream: counts TCP accepts, keeps every handshake request
    and every close frame it received.  Behaviour is chosen by path:
    /forbidden -> 403, /missing -> 404, /greet speaks first, /flood sends
    64 KB messages until told to stop, /sink never reads; else echo.
    """

    def __init__(self, port: int, tls: Any = None) -> None:
        self.port = port
        self.tls = tls
        self.accepted = 0
        self.requests: list[Any] = []
        self.closes: list[tuple[int | None, str | None]] = []
        self.closed = asyncio.Event()
        self.flood_bytes = 0
        self.stop_flood = asyncio.Event()
        self.server: Any = None

    async def __aenter__(self) -> Recorder:
        recorder = self

        class Counting(ServerConnection):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                recorder.accepted += 1
                super().connection_made(transport)

        self.server = await serve(
            self._handler,
            "127.0.0.1",
            self.port,
            process_request=self._process_request,
            create_connection=Counting,
            max_size=None,
            ping_interval=None,
            compression=None,
            close_timeout=2,
            ssl=self.tls,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop_flood.set()
        self.server.close()
        await self.server.wait_closed()

    def _process_request(self, connection: ServerConnection, request: Any) -> Any:
        self.requests.append(request)
        if request.path == "/forbidden":
            return connection.respond(403, "no\n")
        if request.path == "/missing":
            return connection.respond(404, "nothing here\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request else ""
        try:
            if path == "/greet":
                await ws.send("hello-first")
            if path == "/flood":
                chunk = b"f" * 65536
                while not self.stop_flood.is_set():
                    await ws.send(chunk)
                    self.flood_bytes += len(chunk)
            elif path == "/sink":
                await ws.wait_closed()
            else:
                async for message in ws:
                    await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            rcvd = ws.protocol.close_rcvd
            self.closes.append((rcvd.code, rcvd.reason) if rcvd else (None, None))
            self.closed.set()


def fd_count(gate: Gate) -> int:
    """Open file descriptors of the gate process (sockets included)."""
    assert gate.process is not None
    return len(os.listdir(f"/proc/{gate.process.pid}/fd"))


async def settle_fds(gate: Gate, baseline: int, timeout: float = 15.0) -> int:
    """Wait until the gate's fd count is back to C{baseline} (or the time is up)."""
    deadline = time.monotonic() + timeout
    count = fd_count(gate)
    while count > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        count = fd_count(gate)
    return count


# --------------------------------------------------------------------------
# Integration: refusals
# --------------------------------------------------------------------------


def test_refused_without_session_and_upstream_never_contacted(
    rec_gate: Gate, recorder_port: int
) -> None:
    """No (or a forged) session: 401 JSON, and the upstream sees no TCP connection at all."""

    async def scenario() -> None:
        async with Recorder(recorder_port) as recorder:
            response = await refused(rec_gate, "/ws", None)
            assert response.status_code == 401
            assert b'"login required"' in response.body
            forged = await refused(rec_gate, "/ws", "forged.value.here")
            assert forged.status_code == 401
            await asyncio.sleep(0.3)  # give a wrongly started upstream leg time to show
            assert recorder.accepted == 0
            assert recorder.requests == []

    run(scenario())


def test_cross_origin_refused_403_before_upstream(
    rec_gate: Gate, rec_cookie: str, recorder_port: int
) -> None:
    """A valid session from a foreign page (CSWSH) is refused 403; upstream untouched."""

    async def scenario() -> None:
        async with Recorder(recorder_port) as recorder:
            for origin in ("http://evil.example", f"http://127.0.0.1:{rec_gate.port + 1}", "null"):
                response = await refused(rec_gate, "/ws", rec_cookie, origin=origin)
                assert response.status_code == 403, origin
                assert b"origin not allowed" in response.body
            await asyncio.sleep(0.3)
            assert recorder.accepted == 0

    run(scenario())


def test_own_and_listed_origins_accepted(demo_gate: Gate, demo_cookie: str) -> None:
    """The gate's own origin and the configured one open; a sibling subdomain does not."""

    async def scenario() -> None:
        for origin in (f"http://127.0.0.1:{demo_gate.port}", "https://app.example.com"):
            async with gate_connect(demo_gate, "/ws", demo_cookie, origin=origin) as ws:
                await ws.send("hi")
                assert await ws.recv() == "hi"
        response = await refused(demo_gate, "/ws", demo_cookie, origin="https://evil.example.com")
        assert response.status_code == 403

    run(scenario())


def test_upstream_refusal_is_mirrored(rec_gate: Gate, rec_cookie: str, recorder_port: int) -> None:
    """Upstream 403/404 reach the client as 403/404; an unreachable upstream is 502."""

    async def scenario() -> None:
        async with Recorder(recorder_port):
            forbidden = await refused(rec_gate, "/forbidden", rec_cookie)
            missing = await refused(rec_gate, "/missing", rec_cookie)
        assert forbidden.status_code == 403
        assert b"upstream refused the WebSocket handshake (403)" in forbidden.body
        assert missing.status_code == 404
        # The recorder is gone: nothing listens on its port now.
        gone = await refused(rec_gate, "/ws", rec_cookie)
        assert gone.status_code == 502
        assert b"upstream unreachable" in gone.body
        assert b"Traceback" not in gone.body

    run(scenario())


def test_malformed_handshake_refused_by_gate(
    rec_gate: Gate, rec_cookie: str, recorder_port: int
) -> None:
    """A broken upgrade (version, key, method) is refused with small JSON, never upstream."""
    good = {
        "Cookie": f"pingated={rec_cookie}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }

    async def scenario() -> None:
        async with Recorder(recorder_port) as recorder:
            cases = [
                ("GET", {"Sec-WebSocket-Version": "99"}, 400),
                ("GET", {"Sec-WebSocket-Key": "short"}, 400),
                ("POST", {}, 405),
            ]
            for method, change, status in cases:
                response = await asyncio.to_thread(
                    rec_gate.request, method, "/ws", None, {**good, **change}
                )
                assert response.status == status, (change, response.status)
                assert response.header("content-type") == "application/json"
                assert b"Traceback" not in response.body
                assert "error" in response.json()
            version = await asyncio.to_thread(
                rec_gate.request, "GET", "/ws", None, {**good, "Sec-WebSocket-Version": "99"}
            )
            assert version.header("sec-websocket-version") == "13"
            await asyncio.sleep(0.3)
            assert recorder.accepted == 0

    run(scenario())


# --------------------------------------------------------------------------
# Integration: the bridge
# --------------------------------------------------------------------------


def test_text_and_binary_echo_all_byte_values(demo_gate: Gate, demo_cookie: str) -> None:
    """Text stays text, binary stays binary, every byte value survives both ways."""

    async def scenario() -> None:
        async with gate_connect(demo_gate, "/ws?x=1", demo_cookie) as ws:
            every_byte = bytes(range(256))
            await ws.send(every_byte)
            echoed = await ws.recv()
            assert isinstance(echoed, bytes) and echoed == every_byte
            text = "".join(chr(c) for c in range(256)) + " \u2603 \U0001f600"
            await ws.send(text)
            echoed_text = await ws.recv()
            assert isinstance(echoed_text, str) and echoed_text == text
            await ws.send(b"")
            assert await ws.recv() == b""
            # A fragmented message arrives whole.
            await ws.send([b"frag", b"ment", b"ed"])
            assert await ws.recv() == b"fragmented"
            # Ping/pong: the pong comes back through the bridge.
            pong = await ws.ping(b"are you there")
            await asyncio.wait_for(pong, 10)

    run(scenario())


def test_subprotocol_selected_by_upstream(demo_gate: Gate, demo_cookie: str) -> None:
    """The client's offer goes upstream and the upstream's choice comes back."""

    async def scenario() -> None:
        cases: list[tuple[list[str] | None, str | None]] = [
            (["echo", "chat"], "chat"),  # the demo prefers chat
            (["echo"], "echo"),
            (["x-unknown"], None),
            (None, None),
        ]
        for offered, chosen in cases:
            async with gate_connect(
                demo_gate, "/ws", demo_cookie, subprotocols=offered
            ) as ws:
                assert ws.subprotocol == chosen, offered
                await ws.send("ok")
                assert await ws.recv() == "ok"

    run(scenario())


def test_close_codes_from_upstream_reach_client(demo_gate: Gate, demo_cookie: str) -> None:
    """The upstream's close code and reason reach the browser, 1xxx codes included."""

    async def scenario() -> None:
        cases = ((4001, "bye now"), (1011, "upstream broke"), (1000, ""), (1001, "gone"))
        for code, reason in cases:
            async with gate_connect(demo_gate, "/ws", demo_cookie) as ws:
                await ws.send(f"close:{code}:{reason}")
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                rcvd = ws.protocol.close_rcvd
                assert rcvd is not None
                assert (rcvd.code, rcvd.reason) == (code, reason)

    run(scenario())


def test_close_codes_from_client_reach_upstream(
    rec_gate: Gate, rec_cookie: str, recorder_port: int
) -> None:
    """The browser's close code and reason reach the upstream unchanged."""

    async def scenario() -> None:
        async with Recorder(recorder_port) as recorder:
            for code, reason in ((4002, "done here"), (1000, "normal"), (1001, "tab closed")):
                recorder.closed.clear()
                async with gate_connect(rec_gate, "/ws", rec_cookie) as ws:
                    await ws.send("x")
                    assert await ws.recv() == "x"
                    await ws.close(code, reason)
                await asyncio.wait_for(recorder.closed.wait(), 10)
                assert recorder.closes[-1] == (code, reason)

    run(scenario())


def test_handshake_headers_sent_upstream(
    rec_gate: Gate, rec_cookie: str, recorder_port: int
) -> None:
    """Path and query byte for byte; gate cookie gone; identity set; X-Forwarded-* set."""

    async def scenario() -> None:
        async with Recorder(recorder_port) as recorder:
            headers = {
                "Cookie": f"theme=dark; pingated={rec_cookie}; lang=en",
                "X-Trusted-User": "attacker@example.com",
                "X-Trusted_User": "attacker@example.com",
                "X-Forwarded-For": "203.0.113.99",
                "X-App-Header": "kept",
            }
            async with connect(
                ws_url(rec_gate, "/app/sock?b=2&a=1&a=%20x"),
                additional_headers=headers,
                origin=f"http://127.0.0.1:{rec_gate.port}",
                open_timeout=15,
                ping_interval=None,
            ) as ws:
                await ws.send("x")
                assert await ws.recv() == "x"
        request = recorder.requests[-1]
        got = request.headers
        assert request.path == "/app/sock?b=2&a=1&a=%20x"
        assert got.get_all("X-Trusted-User") == ["me@example.com"]
        assert "X-Trusted_User" not in got
        assert "pingated=" not in got["Cookie"]
        assert "theme=dark" in got["Cookie"] and "lang=en" in got["Cookie"]
        assert got["X-App-Header"] == "kept"
        assert got["X-Forwarded-For"] == "203.0.113.99, 127.0.0.1"  # loopback is trusted
        assert got["X-Forwarded-Proto"] == "http"
        assert got["X-Forwarded-Host"] == f"127.0.0.1:{rec_gate.port}"
        assert got["Host"] == f"127.0.0.1:{recorder_port}"
        assert got["Origin"] == f"http://127.0.0.1:{rec_gate.port}"
        assert rec_cookie not in str(got)

    run(scenario())


def test_upstream_may_speak_first(rec_gate: Gate, rec_cookie: str, recorder_port: int) -> None:
    """A message the upstream sends right after its handshake is not lost."""

    async def scenario() -> None:
        async with Recorder(recorder_port):
            async with gate_connect(rec_gate, "/greet", rec_cookie) as ws:
                assert await ws.recv() == "hello-first"
                await ws.send("then echo")
                assert await ws.recv() == "then echo"

    run(scenario())


def test_4mb_message_and_size_limit(demo_gate: Gate, demo_cookie: str) -> None:
    """A 4 MB message passes whole; one over max_message_size (5 MB here) closes with 1009."""

    async def scenario() -> None:
        big = os.urandom(4 * 1024 * 1024)
        async with gate_connect(demo_gate, "/ws", demo_cookie) as ws:
            await ws.send(big)
            assert await ws.recv() == big
            text = "é" * (2 * 1024 * 1024)  # 4 MB of UTF-8
            await ws.send(text)
            assert await ws.recv() == text
        async with gate_connect(demo_gate, "/ws", demo_cookie) as ws:
            await ws.send(b"x" * (6 * 1024 * 1024))
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            rcvd = ws.protocol.close_rcvd
            assert rcvd is not None and rcvd.code == 1009

    run(scenario())


def test_client_drop_closes_upstream_and_leaks_nothing(
    rec_gate: Gate, rec_cookie: str, recorder_port: int
) -> None:
    """A browser that vanishes (no close frame) makes the gate close the upstream with 1001."""

    async def scenario() -> None:
        async with Recorder(recorder_port) as recorder:
            # Warm up (first connection) so the baseline holds no lazily-created fds.
            async with gate_connect(rec_gate, "/ws", rec_cookie) as ws:
                await ws.send("warm")
                await ws.recv()
            await asyncio.wait_for(recorder.closed.wait(), 10)
            baseline = await settle_fds(rec_gate, 0, timeout=0.5)
            recorder.closed.clear()
            clients = []
            for _ in range(5):
                ws = await gate_connect(rec_gate, "/ws", rec_cookie)
                await ws.send("x")
                assert await ws.recv() == "x"
                clients.append(ws)
            assert fd_count(rec_gate) >= baseline + 10
            count_before = len(recorder.closes)
            for ws in clients:
                ws.transport.abort()  # TCP gone, no close frame
            deadline = time.monotonic() + 15
            while len(recorder.closes) < count_before + 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert recorder.closes[count_before:] == [(1001, "client went away")] * 5
            assert await settle_fds(rec_gate, baseline) <= baseline

    run(scenario())


def test_upstream_drop_closes_client_1011(tmp_path: Any) -> None:
    """An upstream that dies (no close frame) makes the gate close the browser with 1011."""
    port = free_port()
    upstream = ManagedProcess(
        [sys.executable, "-m", "pingated.demo", "--port", str(port), "--interface", "127.0.0.1"],
        str(tmp_path / "upstream.log"),
    )
    gate: Gate | None = None
    try:
        wait_for_port(port, proc=upstream.proc)
        gate = _start_gate(str(tmp_path / "gate"), f"http://127.0.0.1:{port}")
        cookie = gate.login()

        async def scenario() -> None:
            assert gate is not None
            baseline = fd_count(gate)
            async with gate_connect(gate, "/ws", cookie) as ws:
                await ws.send("alive")
                assert await ws.recv() == "alive"
                os.kill(upstream.pid, signal.SIGKILL)  # the process we started, by pid
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 15)
                rcvd = ws.protocol.close_rcvd
                assert rcvd is not None
                assert (rcvd.code, rcvd.reason) == (1011, "upstream connection lost")
            assert await settle_fds(gate, baseline) <= baseline

        run(scenario())
    finally:
        if gate is not None:
            gate.stop()
        upstream.stop()


def test_slow_client_pauses_upstream(rec_gate: Gate, rec_cookie: str, recorder_port: int) -> None:
    """
    Backpressure, upstream -> browser: while the browser reads nothing, the
    upstream can only push what fits in socket buffers, not an unbounded stream
    into the gate's memory.
    """

    async def scenario() -> None:
        async with Recorder(recorder_port) as recorder:
            # The client reads nothing: max_queue=1 keeps its own buffering small.
            async with gate_connect(rec_gate, "/flood", rec_cookie, max_queue=1) as ws:
                await asyncio.sleep(2)
                stalled_at = recorder.flood_bytes
                await asyncio.sleep(0.7)
                assert recorder.flood_bytes - stalled_at <= 2 * 65536  # it stopped
                assert recorder.flood_bytes < 48 * 1024 * 1024, recorder.flood_bytes
                # Reading again resumes the stream.
                for _ in range(200):
                    await ws.recv()
                await asyncio.sleep(0.5)
                assert recorder.flood_bytes > stalled_at
                recorder.stop_flood.set()
                ws.transport.abort()

    run(scenario())


def test_slow_upstream_pauses_client(rec_gate: Gate, rec_cookie: str, recorder_port: int) -> None:
    """Backpressure, browser -> upstream: an upstream that stops reading stalls the sender."""

    async def scenario() -> None:
        async with Recorder(recorder_port):
            async with gate_connect(rec_gate, "/sink", rec_cookie, write_limit=65536) as ws:
                sent = 0
                chunk = b"s" * 65536

                async def flood() -> None:
                    nonlocal sent
                    while True:
                        await ws.send(chunk)
                        sent += len(chunk)

                task = asyncio.ensure_future(flood())
                await asyncio.sleep(2)
                stalled_at = sent
                await asyncio.sleep(0.7)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task
                assert sent - stalled_at <= 2 * 65536
                assert sent < 48 * 1024 * 1024, sent
                ws.transport.abort()

    run(scenario())


def test_upgrade_on_a_reused_keep_alive_connection(demo_gate: Gate, demo_cookie: str) -> None:
    """A browser may upgrade a connection it already used for plain requests."""
    import socket

    from websockets.client import ClientProtocol
    from websockets.uri import parse_uri

    with socket.create_connection(("127.0.0.1", demo_gate.port), timeout=10) as sock:
        cookie = f"pingated={demo_cookie}"
        sock.sendall(
            f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{demo_gate.port}\r\n"
            f"Cookie: {cookie}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        headers, _, body = head.partition(b"\r\n\r\n")
        assert headers.startswith(b"HTTP/1.1 200")
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in headers.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        while len(body) < length:
            body += sock.recv(65536)
        # Same TCP connection: now the upgrade, framed by websockets' sans-I/O client.
        client = ClientProtocol(parse_uri(f"ws://127.0.0.1:{demo_gate.port}/ws"))
        request = client.connect()
        request.headers["Cookie"] = cookie
        client.send_request(request)
        for data in client.data_to_send():
            sock.sendall(data)
        while client.handshake_exc is None and client.state.name == "CONNECTING":
            client.receive_data(sock.recv(65536))
        assert client.handshake_exc is None
        response = client.events_received()[0]
        assert response.status_code == 101
        client.send_text(b"same connection")
        for data in client.data_to_send():
            sock.sendall(data)
        events: list[Any] = []
        while not events:
            client.receive_data(sock.recv(65536))
            events = client.events_received()
        assert events[0].data == b"same connection"


def test_gate_keeps_serving_http_next_to_websockets(demo_gate: Gate, demo_cookie: str) -> None:
    """An open bridge does not disturb plain requests on other connections."""

    async def scenario() -> None:
        async with gate_connect(demo_gate, "/ws", demo_cookie) as ws:
            response = await asyncio.to_thread(
                demo_gate.request, "GET", "/echo", None, {"Cookie": f"pingated={demo_cookie}"}
            )
            assert response.status == 200
            await ws.send("still here")
            assert await ws.recv() == "still here"

    run(scenario())


def _make_pki(directory: str) -> tuple[str, Any]:
    """A throwaway CA and a certificate for "localhost"; returns (CA file, server context)."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("websocket test CA"))
        .issuer_name(name("websocket test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day)
        .not_valid_after(now + day)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day)
        .not_valid_after(now + day)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = os.path.join(directory, "ca.pem")
    with open(ca_file, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    server_file = os.path.join(directory, "server.pem")
    with open(server_file, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_file)
    return ca_file, context


def test_wss_upstream_verified_like_https(tmp_path: Any) -> None:
    """https upstream -> wss leg, verified with upstream.ca_file; unknown CA or name -> 502."""
    ca_file, context = _make_pki(str(tmp_path))
    port = free_port()
    good = _start_gate(
        str(tmp_path / "good"), f"https://localhost:{port}", upstream={"ca_file": ca_file}
    )
    unknown_ca = _start_gate(str(tmp_path / "unknown"), f"https://localhost:{port}")
    wrong_name = _start_gate(
        str(tmp_path / "name"), f"https://127.0.0.1:{port}", upstream={"ca_file": ca_file}
    )
    try:
        cookies = {gate.port: gate.login() for gate in (good, unknown_ca, wrong_name)}

        async def scenario() -> None:
            async with Recorder(port, tls=context) as recorder:
                async with gate_connect(good, "/secure?q=1", cookies[good.port]) as ws:
                    await ws.send(b"over tls")
                    assert await ws.recv() == b"over tls"
                assert recorder.requests[-1].path == "/secure?q=1"
                for gate in (unknown_ca, wrong_name):
                    response = await refused(gate, "/secure", cookies[gate.port])
                    assert response.status_code == 502

        run(scenario())
    finally:
        for gate in (good, unknown_ca, wrong_name):
            gate.stop()
