"""
Scripted loopback upstreams for the LLM, theme and identity tests.

L{ScriptedUpstream} is a small threaded HTTP/1.1 server (stdlib only, so it
cannot share a bug with the gate's Twisted code) that records every request
it receives and answers from a table of route functions.  L{openai_routes}
makes it an OpenAI-compatible server that only accepts one API key, and
whose streamed completion waits, between its first and last chunk, for the
test to say the first chunk has arrived at the client -- so a gate that held
the stream back would deadlock the test instead of passing it.

Runs in the test process on 127.0.0.1 only; L{ScriptedUpstream.stop} ends it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: How long a streaming route waits for the test's go-ahead before giving up.
RELEASE_TIMEOUT = 20.0


class Recorded:
    """One request as the upstream received it."""

    def __init__(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None


class Reply:
    """What a route wants to send: status, headers, and a body (bytes or chunks)."""

    def __init__(
        self,
        status: int = 200,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | Iterator[bytes] = b"",
    ) -> None:
        self.status = status
        self.headers = headers or []
        self.body = body


Route = Callable[["ScriptedUpstream", Recorded], Reply]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        recorded = Recorded(self.command, self.path, list(self.headers.items()), body)
        upstream = self.server.upstream
        with upstream.lock:
            upstream.requests.append(recorded)
        route = upstream.routes.get(recorded.path) or upstream.routes.get("*")
        reply = route(upstream, recorded) if route else Reply(404, [], b"no such route\n")
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        if isinstance(reply.body, bytes):
            if not any(n.lower() == "content-length" for n, _ in reply.headers):
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)
            self.wfile.flush()
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for chunk in reply.body:
            if chunk:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    upstream: ScriptedUpstream


class ScriptedUpstream:
    """A loopback HTTP server answering from C{routes}; records what it got."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.released_in_time: bool | None = None
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.upstream = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ScriptedUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.release.set()
        self._thread.join(5)

    def seen(self, path: str) -> list[Recorded]:
        """Requests received for C{path} (without query)."""
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def wait_for_release(self) -> bool:
        """Block a streaming route until the test calls C{release.set()}."""
        released = self.release.wait(RELEASE_TIMEOUT)
        self.released_in_time = released
        return released


# --- an OpenAI-compatible server ------------------------------------------------

MODEL = "fake-gpt"
WORDS = ["Hello", " from", " the", " fake", " model", "."]


def _json(status: int, payload: Any, extra: list[tuple[str, str]] | None = None) -> Reply:
    headers = [("Content-Type", "application/json"), *(extra or [])]
    return Reply(status, headers, json.dumps(payload).encode() + b"\n")


def openai_routes(master_key: str) -> dict[str, Route]:
    """Routes of a minimal OpenAI-compatible API that only accepts C{master_key}."""
    # The upstream's own (too liberal) CORS policy, as LiteLLM sends it: the
    # gate must replace it with its own.
    cors = [("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Credentials", "true")]

    def authorized(request: Recorded) -> bool:
        return request.all("authorization") == [f"Bearer {master_key}"]

    def unauthorized() -> Reply:
        return _json(401, {"error": {"message": "invalid api key", "type": "auth"}}, cors)

    def models(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        if not authorized(request):
            return unauthorized()
        return _json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]}, cors)

    def completions(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        if not authorized(request):
            return unauthorized()
        try:
            payload = json.loads(request.body or b"{}")
        except ValueError:
            return _json(400, {"error": {"message": "bad json"}}, cors)
        if not payload.get("stream"):
            message = {"role": "assistant", "content": "".join(WORDS)}
            return _json(
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "model": MODEL,
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                },
                cors,
            )

        def events() -> Iterator[bytes]:
            for index, word in enumerate(WORDS):
                chunk = {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "model": MODEL,
                    "choices": [{"index": 0, "delta": {"content": word}}],
                }
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                if index == 0:
                    # Hold the rest until the client has seen this one.
                    upstream.wait_for_release()
            yield b"data: [DONE]\n\n"

        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), *cors]
        return Reply(200, headers, events())

    def echo(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        # A careless upstream that reflects everything, the key included.
        auth = request.header("authorization") or ""
        return _json(
            200,
            {"headers": request.headers, "target": request.target},
            [("X-Echo-Authorization", auth), *cors],
        )

    def slow_echo(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        # The same, streamed in small pieces so the key straddles chunk borders.
        auth = (request.header("authorization") or "").encode()

        def pieces() -> Iterator[bytes]:
            text = b'{"auth": "' + auth + b'"}\n'
            for i in range(0, len(text), 3):
                yield text[i : i + 3]
                time.sleep(0.002)

        return Reply(200, [("Content-Type", "application/json")], pieces())

    return {
        "/v1/models": models,
        "/v1/chat/completions": completions,
        "/v1/echo": echo,
        "/v1/slow-echo": slow_echo,
    }
