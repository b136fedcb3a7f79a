"""
Socket.IO end to end through the gate: the real python-socketio server
(aiohttp) runs behind the gate as its own process, and the real
python-socketio client connects in front: long-polling first (plain HTTP
through the proxy), then the upgrade to a WebSocket (through the bridge).

Run as a script (`python tests/test_websocket_socketio.py serve PORT`) this
file is that server.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

SERVER_SCRIPT = os.path.abspath(__file__)


def serve(port: int) -> None:
    """The Socket.IO upstream: echoes events and says which transport carried them."""
    import socketio
    from aiohttp import web

    # A short ping interval ends each idle long-poll quickly, so a client's
    # disconnect (which waits for its pending poll) takes a second, not 25.
    sio = socketio.AsyncServer(
        async_mode="aiohttp", cors_allowed_origins="*", ping_interval=1, ping_timeout=10
    )
    app = web.Application()
    sio.attach(app)

    # The engine.io transport of every HTTP request that reached this
    # server, in order: proves the client long-polled before upgrading.
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> Any:
        seen.append(request.query.get("transport", "?"))
        return await handler(request)

    app.middlewares.append(record)

    @sio.event
    async def transports_seen(sid: str, data: Any = None) -> list[str]:
        return seen

    @sio.event
    async def echo(sid: str, data: Any) -> dict[str, Any]:
        # The ack answers on the same transport the event came in on.
        return {"data": data, "transport": sio.transport(sid)}

    @sio.event
    async def broadcast(sid: str, data: Any) -> None:
        await sio.emit("news", data, to=sid)

    web.run_app(app, host="127.0.0.1", port=port, print=None, shutdown_timeout=0.5)


@pytest.fixture
def socketio_upstream(tmp_path: Any) -> Iterator[str]:
    """The Socket.IO server as a separate process on loopback, stopped by pid."""
    from harness import ManagedProcess, free_port, wait_for_port

    port = free_port()
    process = ManagedProcess(
        [sys.executable, SERVER_SCRIPT, "serve", str(port)], str(tmp_path / "socketio.log")
    )
    try:
        try:
            wait_for_port(port, proc=process.proc)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"socket.io server did not start: {e}\n{process.log()}") from e
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


def browser_like_client(gate_url: str, cookie: str | None) -> Any:
    """
    A Socket.IO client that, like a browser, sends the session cookie on every
    request (each long-poll and the upgrade), not only on the first one.
    """
    import aiohttp
    import socketio
    from yarl import URL

    jar = aiohttp.CookieJar(unsafe=True)  # unsafe: allow cookies for 127.0.0.1
    if cookie is not None:
        jar.update_cookies({"pingated": cookie}, URL(gate_url))
    session = aiohttp.ClientSession(cookie_jar=jar)
    return socketio.AsyncClient(reconnection=False, http_session=session, handle_sigint=False)


async def _close(client: Any) -> None:
    # abort: do not wait for the pending long-poll to time out (engine.io
    # waits ping_interval + ping_timeout for it, directly as through the gate).
    read_loop = client.eio.read_loop_task
    await client.eio.disconnect(abort=True)
    await client.eio.http.close()
    if read_loop is not None:
        await asyncio.wait([read_loop], timeout=5)


async def _until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def test_socketio_polling_then_websocket_upgrade(
    gate_factory: Any, socketio_upstream: str
) -> None:
    """The client connects by long-polling, upgrades to WebSocket, and events flow both ways."""
    gate = gate_factory(upstream=socketio_upstream)
    cookie = gate.login()

    async def scenario() -> None:
        client = browser_like_client(gate.url, cookie)
        news: asyncio.Queue[Any] = asyncio.Queue()
        client.on("news", news.put_nowait)
        await client.connect(gate.url, transports=["polling", "websocket"], wait_timeout=15)
        try:
            # Connected over polling; the upgrade to WebSocket follows by itself.
            assert await _until(lambda: client.transport() == "websocket", 15)
            seen = await client.call("transports_seen", timeout=15)
            assert seen[0] == "polling" and "websocket" in seen, seen
            answer = await client.call("echo", {"text": "héllo", "n": 1}, timeout=15)
            assert answer == {"data": {"text": "héllo", "n": 1}, "transport": "websocket"}
            blob = bytes(range(256)) * 64
            answer = await client.call("echo", blob, timeout=15)
            assert answer["data"] == blob
            await client.emit("broadcast", "from the server")
            assert await asyncio.wait_for(news.get(), 15) == "from the server"
        finally:
            await _close(client)

    asyncio.run(asyncio.wait_for(scenario(), 45))


def test_socketio_long_polling_only(gate_factory: Any, socketio_upstream: str) -> None:
    """Engine.IO long-polling alone (plain HTTP through the proxy) carries events too."""
    gate = gate_factory(upstream=socketio_upstream)
    cookie = gate.login()

    async def scenario() -> None:
        client = browser_like_client(gate.url, cookie)
        await client.connect(gate.url, transports=["polling"], wait_timeout=15)
        try:
            assert client.transport() == "polling"
            answer = await client.call("echo", "over polling", timeout=15)
            assert answer == {"data": "over polling", "transport": "polling"}
        finally:
            await _close(client)

    asyncio.run(asyncio.wait_for(scenario(), 45))


def test_socketio_without_session_is_refused(gate_factory: Any, socketio_upstream: str) -> None:
    """Without the gate cookie, neither polling nor the WebSocket reaches Socket.IO."""
    import socketio

    gate = gate_factory(upstream=socketio_upstream)

    async def scenario() -> None:
        for transports in (["polling"], ["websocket"]):
            client = browser_like_client(gate.url, None)
            with pytest.raises(socketio.exceptions.ConnectionError):
                await client.connect(gate.url, transports=transports, wait_timeout=10)
            await _close(client)

    asyncio.run(asyncio.wait_for(scenario(), 30))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} serve PORT")
