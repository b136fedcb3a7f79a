# -*- test-case-name: tests.test_demo -*-
"""
A bundled demo upstream to put behind the gate.

C{make run} needs something to proxy to, and checking the gate by hand needs
an upstream that shows what actually arrived: the request headers, a raw
echo of any request, a server-sent-events stream, a WebSocket echo, cookies,
a large streamed body and arbitrary status codes.  Each of those exercises
one path of the proxy and the WebSocket bridge, so a person (or a test) can
see at a glance whether the gate passes it through intact.

Run it alone with C{python -m pingated.demo --port 3050}.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorCore,
    IReactorTCP,
    IReactorTime,
)
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

DEFAULT_PORT = 3050
DEFAULT_INTERFACE = "127.0.0.1"

#: How much of an echoed body is returned as text; the rest is only hashed.
ECHO_BODY_PREVIEW = 64 * 1024

#: Default size of C{/big} and the size of each write, so a slow client
#: exerts backpressure in steps the proxy will see.
BIG_DEFAULT_SIZE = 1024 * 1024
BIG_CHUNK_SIZE = 64 * 1024
_CHUNK = b"x" * BIG_CHUNK_SIZE

#: Subprotocols the WebSocket echo accepts, in order of preference.
WEBSOCKET_SUBPROTOCOLS = ("chat", "echo")

_HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pingated demo</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; line-height: 1.4; }}
h1 {{ font-size: 1.6rem; }}
table {{ border-collapse: collapse; width: 100%; font-size: 0.9rem; }}
td, th {{ border: 1px solid #ccc; padding: 0.2rem 0.4rem; text-align: left;
          vertical-align: top; word-break: break-all; }}
#sse-clock {{ font-family: monospace; font-size: 1.2rem; }}
#ws-log {{ font-family: monospace; background: #f4f4f4; min-height: 6rem;
           max-height: 16rem; overflow-y: auto; padding: 0.4rem; white-space: pre-wrap; }}
</style>
</head>
<body>
<h1>It works &mdash; you are behind pingated</h1>
<p>This page is served by the bundled demo upstream
(<code>python -m pingated.demo</code>).</p>

<h2>Live clock (server-sent events from <code>/sse</code>)</h2>
<p id="sse-clock">connecting&hellip;</p>

<h2>WebSocket echo (<code>/ws</code>)</h2>
<p>
<input id="ws-input" type="text" size="40" value="hello" aria-label="message">
<button id="ws-send" type="button" disabled>Send</button>
<span id="ws-state">connecting&hellip;</span>
</p>
<div id="ws-log" aria-live="polite"></div>

<h2>Request headers this upstream received</h2>
<table id="headers">
<thead><tr><th>Name</th><th>Value</th></tr></thead>
<tbody>
{header_rows}
</tbody>
</table>

<script>
(function () {{
  "use strict";
  var clock = document.getElementById("sse-clock");
  if (window.EventSource) {{
    var events = new EventSource("/sse");
    events.onmessage = function (e) {{ clock.textContent = e.data; }};
    events.onerror = function () {{ clock.textContent = "reconnecting\\u2026"; }};
  }} else {{
    clock.textContent = "EventSource is not supported by this browser";
  }}

  var input = document.getElementById("ws-input");
  var send = document.getElementById("ws-send");
  var log = document.getElementById("ws-log");
  var state = document.getElementById("ws-state");
  function note(text) {{
    var line = document.createElement("div");
    line.textContent = text;
    log.appendChild(line);
    log.scrollTop = log.scrollHeight;
  }}
  var url = (location.protocol==='https:'?'wss:':'ws:')+'//'+location.host+'/ws';
  var ws = new WebSocket(url, ["chat", "echo"]);
  ws.binaryType = "arraybuffer";
  ws.onopen = function () {{
    state.textContent = "open" + (ws.protocol ? " (" + ws.protocol + ")" : "");
    send.disabled = false;
  }};
  ws.onmessage = function (e) {{
    if (typeof e.data === "string") {{
      note("\\u2190 " + e.data);
    }} else {{
      note("\\u2190 [binary " + e.data.byteLength + " bytes]");
    }}
  }};
  ws.onclose = function (e) {{
    state.textContent = "closed " + e.code + (e.reason ? " " + e.reason : "");
    send.disabled = true;
  }};
  function sendMessage() {{
    if (ws.readyState !== WebSocket.OPEN) {{ return; }}
    ws.send(input.value);
    note("\\u2192 " + input.value);
  }}
  send.addEventListener("click", sendMessage);
  input.addEventListener("keydown", function (e) {{
    if (e.key === "Enter") {{ sendMessage(); }}
  }});
}})();
</script>
</body>
</html>
"""


class _Leaf(Resource):
    """A twisted.web resource that handles its whole subtree itself."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]


class BadParameter(ValueError):
    """A query parameter the client sent cannot be used; answered with a 400."""


def _query_value(request: IRequest, name: bytes) -> bytes | None:
    values: list[bytes] | None = (request.args or {}).get(name)
    if not values:
        return None
    return values[-1]


def _int_parameter(request: IRequest, name: bytes, minimum: int) -> int | None:
    raw = _query_value(request, name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadParameter(f"{name.decode('ascii')} must be an integer") from None
    if value < minimum:
        raise BadParameter(f"{name.decode('ascii')} must be at least {minimum}")
    return value


def _float_parameter(request: IRequest, name: bytes, default: float, minimum: float) -> float:
    raw = _query_value(request, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadParameter(f"{name.decode('ascii')} must be a number") from None
    if not minimum <= value < float("inf"):
        raise BadParameter(f"{name.decode('ascii')} must be at least {minimum}")
    return value


def _bad_request(request: IRequest, problem: BadParameter) -> bytes:
    request.setResponseCode(400)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return f"bad request: {problem}\n".encode()


def _header_pairs(request: IRequest) -> list[tuple[str, str]]:
    """
    The request headers as (name, value) pairs, values exactly as received.

    twisted.web keeps headers in a dict keyed by name, so names come out in
    canonical capitalisation, in the order each name first appeared, with a
    repeated name's values grouped together.
    """
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, values in request.requestHeaders.getAllRawHeaders()
        for value in values
    ]


class DemoPage(_Leaf):
    """C{GET /}: a page proving the gate let you through and showing what arrived."""

    def render_GET(self, request: IRequest) -> bytes:
        rows = "\n".join(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(value)}</td></tr>"
            for name, value in _header_pairs(request)
        )
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return _HTML_TEMPLATE.format(header_rows=rows).encode("utf-8")


class EchoResource(_Leaf):
    """
    C{ANY /echo...}: describe the request back as JSON.

    The query string and header values are returned byte-for-byte (decoded as
    latin-1), so a test can tell whether the proxy rewrote anything.
    """

    def render(self, request: IRequest) -> bytes:
        _, _, query = request.uri.partition(b"?")
        digest = hashlib.sha256()
        length = 0
        preview = b""
        content = request.content
        if content is not None:
            content.seek(0)
            while chunk := content.read(BIG_CHUNK_SIZE):
                digest.update(chunk)
                if length < ECHO_BODY_PREVIEW:
                    preview += chunk[: ECHO_BODY_PREVIEW - length]
                length += len(chunk)
        described = {
            "method": request.method.decode("latin-1"),
            "path": request.path.decode("latin-1"),
            "query": query.decode("latin-1"),
            "headers": [list(pair) for pair in _header_pairs(request)],
            "body_length": length,
            "body_sha256": digest.hexdigest(),
            "body": preview.decode("utf-8", errors="replace"),
        }
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(described, indent=2).encode("utf-8") + b"\n"


class _ClockStream:
    """One C{/sse} response: an event now, then one per interval until done."""

    def __init__(
        self, request: Request, clock: IReactorTime, interval: float, count: int | None
    ) -> None:
        self._request = request
        self._clock = clock
        self._interval = interval
        self._remaining = count
        self._call: IDelayedCall | None = None
        self._done = False

    def start(self) -> None:
        # Fires on our own finish() and errbacks when the client goes away;
        # either way the timer must stop.
        request_finished: Deferred[None] = self._request.notifyFinish()
        request_finished.addBoth(self._stop)
        self._tick()

    def _tick(self) -> None:
        self._call = None
        if self._done:
            return
        now = datetime.fromtimestamp(self._clock.seconds(), tz=UTC)
        self._request.write(f"data: {now.isoformat(timespec='milliseconds')}\n\n".encode())
        if self._remaining is not None:
            self._remaining -= 1
            if self._remaining <= 0:
                self._done = True
                self._request.finish()
                return
        self._call = self._clock.callLater(self._interval, self._tick)

    def _stop(self, result: Failure | None) -> None:
        self._done = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class ServerSentClock(_Leaf):
    """
    C{GET /sse}: the current time as server-sent events, once per second.

    Proves the proxy streams without buffering.  C{?interval=} (seconds) and
    C{?count=} make it quick and finite for tests.
    """

    def __init__(self, clock: IReactorTime) -> None:
        super().__init__()
        self._clock = clock

    def render_GET(self, request: Request) -> bytes | int:
        try:
            interval = _float_parameter(request, b"interval", 1.0, minimum=0.01)
            count = _int_parameter(request, b"count", minimum=1)
        except BadParameter as problem:
            return _bad_request(request, problem)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        if request.method == b"HEAD":
            return b""
        _ClockStream(request, self._clock, interval, count).start()
        return NOT_DONE_YET


class SetCookies(_Leaf):
    """C{GET /set-cookies}: two Set-Cookie headers, to check the proxy keeps both."""

    def render_GET(self, request: IRequest) -> bytes:
        request.responseHeaders.addRawHeader(b"set-cookie", b"a=1; Path=/")
        request.responseHeaders.addRawHeader(b"set-cookie", b"b=2; Path=/; HttpOnly")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"set cookies a=1 and b=2 (HttpOnly)\n"


@implementer(IPushProducer)
class _RepeatedBytesProducer:
    """
    Writes C{size} bytes of C{b"x"} to a request, stopping whenever paused.

    A push producer: the transport pauses us when its buffer fills, so a
    slow client (or a proxy honouring backpressure) holds at most a chunk or
    two of this body in memory.
    """

    def __init__(self, request: Request, size: int) -> None:
        self._request = request
        self._remaining = size
        self._paused = False
        self._stopped = False
        self._finished = False
        self._producing = False

    def start(self) -> None:
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._request.registerProducer(self, True)
        self._produce()

    def _produce(self) -> None:
        # A write can synchronously pause us or (with some consumers) resume
        # us; the flag keeps that from re-entering the loop.
        if self._producing:
            return
        self._producing = True
        try:
            while not (self._paused or self._stopped) and self._remaining > 0:
                size = min(BIG_CHUNK_SIZE, self._remaining)
                self._remaining -= size
                self._request.write(_CHUNK if size == BIG_CHUNK_SIZE else _CHUNK[:size])
            if self._remaining == 0 and not (self._stopped or self._finished):
                self._finished = True
                self._request.unregisterProducer()
                self._request.finish()
        finally:
            self._producing = False

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._produce()

    def stopProducing(self) -> None:
        self._stopped = True


class BigBody(_Leaf):
    """C{GET /big?size=N}: N bytes (default 1 MiB), streamed with backpressure."""

    def render_GET(self, request: Request) -> bytes | int:
        try:
            size = _int_parameter(request, b"size", minimum=0)
        except BadParameter as problem:
            return _bad_request(request, problem)
        if size is None:
            size = BIG_DEFAULT_SIZE
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(size).encode("ascii"))
        if request.method == b"HEAD" or size == 0:
            return b""
        _RepeatedBytesProducer(request, size).start()
        return NOT_DONE_YET


class StatusCode(_Leaf):
    """C{GET /status/<code>}: answer with that status, to test error pass-through."""

    def render_GET(self, request: IRequest) -> bytes | int:
        postpath = request.postpath
        try:
            if len(postpath) != 1 or not postpath[0].isdigit():
                raise ValueError
            code = int(postpath[0])
            if not 200 <= code <= 599:
                raise ValueError
        except ValueError:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"use /status/<code> with a code from 200 to 599\n"
        request.setResponseCode(code)
        if code in (204, 304):
            # Returning b"" would make twisted.web add "Content-Length: 0",
            # which these responses must not carry; finishing here does not.
            request.finish()
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"status {code}\n".encode("ascii")


def parse_close_command(text: str) -> tuple[int, str] | None:
    """
    Recognise C{close:<code>:<reason>}, the message that asks the echo to close.

    Returns the code and reason when the code may be put on the wire, else
    L{None} (and the message is echoed like any other).  Lets a test drive
    close-code forwarding through the bridge from the client side.
    """
    prefix, sep, rest = text.partition(":")
    if prefix != "close" or not sep:
        return None
    raw_code, _, reason = rest.partition(":")
    try:
        code = int(raw_code)
    except ValueError:
        return None
    # 1005, 1006 and 1015 only describe a close locally, never in a frame.
    wire_codes = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
    if code not in wire_codes and not 3000 <= code <= 4999:
        return None
    if len(reason.encode("utf-8")) > 123:
        return None
    return code, reason


class EchoWebSocketProtocol(WebSocketServerProtocol):
    """
    C{/ws}: echo every message back unchanged, text as text and binary as binary.

    Picks the first of L{WEBSOCKET_SUBPROTOCOLS} the client offered, so the
    bridge's subprotocol negotiation can be checked end to end.
    """

    def onConnect(self, request: ConnectionRequest) -> str | None:
        offered: Sequence[str] = request.protocols or []
        for protocol in WEBSOCKET_SUBPROTOCOLS:
            if protocol in offered:
                return protocol
        return None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            command = parse_close_command(payload.decode("utf-8"))
            if command is not None:
                code, reason = command
                if code == 1000 or 3000 <= code <= 4999:
                    self.sendClose(code=code, reason=reason)
                else:
                    # sendClose refuses the 1xxx codes a server may still send.
                    self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"))
                return
        self.sendMessage(payload, isBinary)  # type: ignore[no-untyped-call]


def build_websocket_resource(reactor: IReactorCore) -> IResource:
    """The C{/ws} echo as a twisted.web resource, sharing the HTTP site's port."""
    factory = WebSocketServerFactory(reactor=reactor)
    factory.protocol = EchoWebSocketProtocol
    return cast(IResource, WebSocketResource(factory))


def build_demo_resource(clock: IReactorTime, reactor: IReactorCore) -> IResource:
    """
    The whole demo upstream as one resource tree, ready for a L{Site}.

    C{clock} drives the C{/sse} timer (a L{twisted.internet.task.Clock} in
    tests); C{reactor} is handed to autobahn so it never imports the global
    reactor itself.
    """
    children: dict[bytes, object] = {
        b"": DemoPage(),
        b"echo": EchoResource(),
        b"sse": ServerSentClock(clock),
        b"ws": build_websocket_resource(reactor),
        b"set-cookies": SetCookies(),
        b"big": BigBody(),
        b"status": StatusCode(),
    }
    root = Resource()
    for name, child in children.items():
        root.putChild(name, cast(IResource, child))
    return root


def main(argv: list[str] | None = None) -> int:
    """C{python -m pingated.demo}: serve the demo upstream until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m pingated.demo",
        description="Serve the pingated demo upstream (headers, echo, SSE, WebSocket).",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port to listen on")
    parser.add_argument(
        "--interface", default=DEFAULT_INTERFACE, help="address to bind (default: %(default)s)"
    )
    options = parser.parse_args(argv)

    # The one place in this module allowed to use the global reactor.
    from twisted.internet import reactor as global_reactor

    resource = build_demo_resource(
        cast(IReactorTime, global_reactor), cast(IReactorCore, global_reactor)
    )
    site = Site(resource)
    # Site is an un-parametrised ServerFactory, which mypy-zope can't match.
    cast(IReactorTCP, global_reactor).listenTCP(
        options.port,
        site,  # type: ignore[arg-type]
        interface=options.interface,
    )
    print(f"demo upstream on http://{options.interface}:{options.port}/", flush=True)
    cast(IReactorCore, global_reactor).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
