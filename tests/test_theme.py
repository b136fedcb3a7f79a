"""
Tests for theme CSS injection (contract section 4b): L{pingated.theme}.

Integration tests run the real gate in front of a scripted upstream that
serves plain, compressed, head-less, streamed and non-HTML answers; unit
tests check the injector and filter in memory.
"""

from __future__ import annotations

import gzip
import http.client
import importlib
import signal
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from fake_openai import Recorded, Reply, ScriptedUpstream
from harness import Gate, base_config, free_port
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.web.resource import Resource
from twisted.web.server import Request

from pingated.responsefilter import install_response_filter
from pingated.theme import (
    HeadInjector,
    ThemeResource,
    narrow_accept_encoding,
    style_element,
)

CSS = 'body { background: #123456; }\n.x::after { content: "\u2713 </style>"; }\n'
STYLE = style_element(CSS)

PAGE = (
    b"<!doctype html>\n<html><head><meta charset=utf-8><title>t</title></HEAD>"
    b"<body><p>hello</p></body></html>\n"
)
THEMED_PAGE = PAGE.replace(b"</HEAD>", STYLE + b"</HEAD>")
NO_HEAD = b"<!DOCTYPE html>\n<p>no head here</p>\n"
FRAGMENT = b"<p>a fragment</p>"
JSON_BODY = b'{"html": "<html><head></head></html>"}\n'
SSE_BODY = [b"data: <head></head>\n\n", b"data: two\n\n"]
HTML = ("Content-Type", "text/html; charset=utf-8")

try:
    brotli: Any = importlib.import_module("brotli")
except ImportError:  # pragma: no cover - brotli is in the test extras
    brotli = None


def _html_routes() -> dict[str, Any]:
    def plain(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        return Reply(200, [HTML, ("ETag", '"v1"')], PAGE)

    def gzipped(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        # Compressed whatever the request asked for: a misbehaving upstream.
        return Reply(200, [HTML, ("Content-Encoding", "gzip")], gzip.compress(PAGE))

    def deflated(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        return Reply(200, [HTML, ("Content-Encoding", "deflate")], zlib.compress(PAGE))

    def raw_deflated(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        body = packer.compress(PAGE) + packer.flush()
        return Reply(200, [HTML, ("Content-Encoding", "deflate")], body)

    def brotlied(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        return Reply(200, [HTML, ("Content-Encoding", "br")], brotli.compress(PAGE))

    def gzip_chunked(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        data = gzip.compress(PAGE * 50)
        return Reply(
            200,
            [HTML, ("Content-Encoding", "gzip")],
            iter([data[i : i + 97] for i in range(0, len(data), 97)]),
        )

    def no_head(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        return Reply(200, [HTML], NO_HEAD)

    def fragment(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        return Reply(200, [("Content-Type", "text/html")], FRAGMENT)

    def as_json(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        return Reply(200, [("Content-Type", "application/json")], JSON_BODY)

    def gzip_json(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        return Reply(
            200,
            [("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
            gzip.compress(JSON_BODY),
        )

    def events(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        return Reply(200, [("Content-Type", "text/event-stream")], iter(SSE_BODY))

    def streamed(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        def parts() -> Iterator[bytes]:
            yield b"<html><head><title>s</title>"
            yield b"</head><body><p>first</p>\n"
            upstream.wait_for_release()
            yield b"<p>second</p></body></html>\n"

        return Reply(200, [HTML], parts())

    return {
        "/plain": plain,
        "/gzip": gzipped,
        "/deflate": deflated,
        "/raw-deflate": raw_deflated,
        "/br": brotlied,
        "/gzip-chunked": gzip_chunked,
        "/no-head": no_head,
        "/fragment": fragment,
        "/json": as_json,
        "/gzip-json": gzip_json,
        "/events": events,
        "/stream": streamed,
    }


@pytest.fixture(scope="module")
def html_upstream() -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream(_html_routes()).start()
    yield upstream
    upstream.stop()


@pytest.fixture
def pages(html_upstream: ScriptedUpstream) -> ScriptedUpstream:
    with html_upstream.lock:
        html_upstream.requests.clear()
    html_upstream.release.clear()
    html_upstream.released_in_time = None
    return html_upstream


def _start_gate(workdir: Any, upstream: str, css_path: str) -> Gate:
    port = free_port()
    config = base_config(str(workdir / "state"), port, upstream)
    config["theme"] = {"css_file": css_path}
    return Gate(str(workdir), config, port)


@pytest.fixture(scope="module")
def themed(tmp_path_factory: Any, html_upstream: ScriptedUpstream) -> Iterator[tuple[Gate, str]]:
    """A real gate with a theme in front of the scripted HTML upstream, and a session."""
    workdir = tmp_path_factory.mktemp("theme-gate")
    css_path = workdir / "theme.css"
    css_path.write_text(CSS, encoding="utf-8")
    gate = _start_gate(workdir, html_upstream.url, str(css_path))
    try:
        gate.start()
        yield gate, f"pingated={gate.login()}"
    finally:
        gate.stop()


BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8", "Accept-Encoding": "gzip, br"}
FETCH = {"Accept": "*/*", "Accept-Encoding": "gzip, deflate, br, zstd"}


def _get(themed: tuple[Gate, str], path: str, headers: dict[str, str]) -> Any:
    gate, cookie = themed
    return gate.request("GET", path, headers={**headers, "Cookie": cookie})


def test_plain_page_gets_style_before_head_close(
    themed: tuple[Gate, str], pages: ScriptedUpstream
) -> None:
    """The style element lands just before </head>; Content-Length grows by its size."""
    response = _get(themed, "/plain", BROWSER)
    assert response.status == 200
    assert response.body == THEMED_PAGE
    assert int(response.header("content-length")) == len(THEMED_PAGE)
    assert response.header("content-encoding") is None
    assert response.header("etag") == 'W/"v1"'
    # A navigation asks the upstream for an uncompressed page.
    (seen,) = pages.seen("/plain")
    assert seen.all("accept-encoding") == ["identity"]


def test_non_navigation_accept_encoding_is_narrowed(
    themed: tuple[Gate, str], pages: ScriptedUpstream
) -> None:
    """Other requests may still be compressed, but only in codings the gate can undo."""
    response = _get(themed, "/plain", FETCH)
    assert response.body == THEMED_PAGE
    (seen,) = pages.seen("/plain")
    offered = [c.strip() for c in (seen.header("accept-encoding") or "").split(",")]
    assert "zstd" not in offered
    assert "gzip" in offered


@pytest.mark.parametrize("path", ["/gzip", "/deflate", "/raw-deflate", "/br"])
@pytest.mark.parametrize("headers", [BROWSER, FETCH], ids=["navigation", "fetch"])
def test_compressed_page_is_decoded_and_themed(
    themed: tuple[Gate, str], pages: ScriptedUpstream, path: str, headers: dict[str, str]
) -> None:
    """A compressed page is decompressed, themed, and sent with a correct length."""
    if path == "/br" and brotli is None:
        pytest.skip("brotli is not installed (it is in the test extras)")
    response = _get(themed, path, headers)
    assert response.status == 200
    assert response.header("content-encoding") is None
    assert response.body == THEMED_PAGE
    length = response.header("content-length")
    assert length is None or int(length) == len(response.body)


def test_chunked_gzip_page(themed: tuple[Gate, str], pages: ScriptedUpstream) -> None:
    """A gzip stream split into small chunks decodes the same."""
    response = _get(themed, "/gzip-chunked", FETCH)
    expected = (PAGE * 50).replace(b"</HEAD>", STYLE + b"</HEAD>", 1)
    assert response.body == expected


def test_page_without_head_gets_style_at_start(
    themed: tuple[Gate, str], pages: ScriptedUpstream
) -> None:
    """No </head>: the style goes at the start (after a doctype, to keep standards mode)."""
    response = _get(themed, "/no-head", BROWSER)
    assert response.body == b"<!DOCTYPE html>" + STYLE + b"\n<p>no head here</p>\n"
    assert int(response.header("content-length")) == len(response.body)
    response = _get(themed, "/fragment", FETCH)
    assert response.body == STYLE + FRAGMENT


@pytest.mark.parametrize("path", ["/json", "/gzip-json"])
def test_other_content_types_untouched(
    themed: tuple[Gate, str], pages: ScriptedUpstream, path: str
) -> None:
    """JSON (even compressed, even containing '<head>') passes byte for byte."""
    response = _get(themed, path, {"Accept": "application/json", "Accept-Encoding": "gzip"})
    if path == "/json":
        assert response.body == JSON_BODY
    else:
        assert response.header("content-encoding") == "gzip"
        assert gzip.decompress(response.body) == JSON_BODY
    assert int(response.header("content-length")) == len(response.body)
    assert STYLE not in response.body


def test_event_stream_untouched(themed: tuple[Gate, str], pages: ScriptedUpstream) -> None:
    """An event stream is not HTML: passed through exactly."""
    response = _get(themed, "/events", {"Accept": "text/event-stream"})
    assert response.body == b"".join(SSE_BODY)


def test_streamed_page_not_held_past_head(
    themed: tuple[Gate, str], pages: ScriptedUpstream
) -> None:
    """Once </head> has been seen, the page flows: the first part arrives before the rest exists."""
    gate, cookie = themed
    conn = http.client.HTTPConnection("127.0.0.1", gate.port, timeout=30)
    try:
        conn.request("GET", "/stream", headers={**BROWSER, "Cookie": cookie})
        response = conn.getresponse()
        received = b""
        while b"first" not in received:
            piece = response.read1(65536)
            assert piece, "page ended early"
            received += piece
        assert pages.released_in_time is None  # the upstream is still waiting for us
        pages.release.set()
        received += response.read()
    finally:
        conn.close()
    assert received == (
        b"<html><head><title>s</title>" + STYLE + b"</head><body><p>first</p>\n"
        b"<p>second</p></body></html>\n"
    )


def test_login_page_is_themed(themed: tuple[Gate, str]) -> None:
    """The gate's own PIN page carries the theme too."""
    gate, _ = themed
    response = gate.request("GET", "/.pingated/login")
    assert response.status == 200
    assert b"background: #123456" in response.body


def test_theme_reread_on_sighup(tmp_path: Any, html_upstream: ScriptedUpstream) -> None:
    """Editing the CSS file and sending SIGHUP changes pages and the login page, no restart."""
    css_path = tmp_path / "theme.css"
    css_path.write_text("body { color: #aaaaaa; }", encoding="utf-8")
    gate = _start_gate(tmp_path, html_upstream.url, str(css_path))
    try:
        gate.start()
        cookie = f"pingated={gate.login()}"
        first = gate.request("GET", "/plain", headers={**BROWSER, "Cookie": cookie})
        assert b"#aaaaaa" in first.body
        css_path.write_text("body { color: #bbbbbb; }", encoding="utf-8")
        assert gate.process is not None
        pid = gate.process.pid
        gate.process.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while True:
            page = gate.request("GET", "/plain", headers={**BROWSER, "Cookie": cookie})
            if b"#bbbbbb" in page.body or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert b"#bbbbbb" in page.body and b"#aaaaaa" not in page.body
        assert int(page.header("content-length")) == len(page.body)
        login = gate.request("GET", "/.pingated/login")
        assert b"#bbbbbb" in login.body
        # A theme that cannot be read on reload: refused, the old one stays.
        css_path.unlink()
        gate.process.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reload refused" not in gate.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "theme.css" in gate.log()
        page = gate.request("GET", "/plain", headers={**BROWSER, "Cookie": cookie})
        assert b"#bbbbbb" in page.body
        assert gate.process.pid == pid and gate.process.proc.poll() is None
    finally:
        gate.stop()


# --- unit tests --------------------------------------------------------------------


def test_style_element_is_ascii_and_cannot_close_itself() -> None:
    """Non-ASCII becomes CSS escapes; '</' inside the CSS cannot end the element."""
    element = style_element(CSS)
    element.decode("ascii")
    assert element.count(b"</style>") == 1 and element.endswith(b"</style>")
    assert b"\\002713" in element


def _feed_all(chunks: list[bytes], limit: int = 64 * 1024) -> bytes:
    injector = HeadInjector(b"<style>S</style>", limit)
    return b"".join(injector.feed(c) for c in chunks) + injector.finish()


@given(st.lists(st.integers(0, len(PAGE)), max_size=10))
def test_injector_same_result_for_any_chunking(cuts: list[int]) -> None:
    """Where the upstream splits its chunks (even inside '</head>') changes nothing."""
    points = sorted(set(cuts))
    chunks = [PAGE[a:b] for a, b in zip([0, *points], [*points, len(PAGE)], strict=True)]
    assert _feed_all(chunks) == PAGE.replace(b"</HEAD>", b"<style>S</style></HEAD>")


def test_injector_releases_at_head_close_and_stops_holding() -> None:
    """Output is held only until </head>; after that every chunk goes straight out."""
    injector = HeadInjector(b"<S>")
    assert injector.feed(b"<html><head><title>x") == b""
    assert injector.feed(b"</title></he") == b""
    assert injector.feed(b"ad><body>") == b"<html><head><title>x</title><S></head><body>"
    assert injector.feed(b"more") == b"more"
    assert injector.finish() == b""


def test_injector_gives_up_at_body_or_limit() -> None:
    """A <body> before any </head>, or a too-long head, means: inject at the start now."""
    injector = HeadInjector(b"<S>")
    assert injector.feed(b"<!doctype html><title>x</title><body>hi") == (
        b"<!doctype html><S><title>x</title><body>hi"
    )
    small = HeadInjector(b"<S>", limit=10)
    assert small.feed(b"<html><head>0123456789") == b"<S><html><head>0123456789"


def test_narrow_accept_encoding() -> None:
    """Only codings the gate can decode are offered upstream."""
    narrowed = narrow_accept_encoding(b"zstd, gzip;q=0.9, deflate, *;q=0.1, br")
    assert b"zstd" not in narrowed and b"*" not in narrowed
    assert narrowed.startswith(b"gzip;q=0.9, deflate")
    assert narrow_accept_encoding(b"zstd") == b"identity"


class _Page(Resource):
    isLeaf = True

    def __init__(self, status: int, content_type: bytes, body: bytes) -> None:
        super().__init__()
        self.status = status
        self.content_type = content_type
        self.body = body
        self.seen_encoding: list[bytes] | None = None

    def render(self, request: Request) -> bytes:
        self.seen_encoding = request.requestHeaders.getRawHeaders(b"accept-encoding")
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", self.content_type)
        return self.body


def _done(d: Any) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "deferred has not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


@pytest.mark.parametrize(
    ("status", "content_type", "themed_expected"),
    [
        (200, b"text/html; charset=utf-8", True),
        (404, b"TEXT/HTML", True),
        (200, b"text/plain", False),
        (200, b"application/xhtml+xml", False),
        (206, b"text/html", False),
    ],
)
def test_wrapper_alone(status: int, content_type: bytes, themed_expected: bool) -> None:
    """ThemeResource composes with any resource; only text/html bodies change."""
    page = _Page(status, content_type, PAGE)
    stub = StubTreq(ThemeResource(page, "b{}"))
    result = _done(stub.get("http://gate.test/", headers={"Accept": "text/html"}))
    body = _done(stub.content(result))
    assert (b"<style>b{}</style>" in body) is themed_expected
    assert result.length == len(body)


def test_wrapper_leaves_websocket_upgrades_alone() -> None:
    """An upgrade request is passed on without touching Accept-Encoding or the response."""
    page = _Page(200, b"text/html", PAGE)
    stub = StubTreq(ThemeResource(page, "b{}"))
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Accept-Encoding": "zstd"}
    result = _done(stub.get("http://gate.test/ws", headers=headers))
    assert _done(stub.content(result)) == PAGE
    assert page.seen_encoding is not None and b"zstd" in page.seen_encoding


def test_empty_css_is_a_no_op() -> None:
    """No CSS configured: the wrapper changes nothing at all."""
    page = _Page(200, b"text/html", PAGE)
    stub = StubTreq(ThemeResource(page, ""))
    result = _done(stub.get("http://gate.test/", headers={"Accept-Encoding": "zstd"}))
    assert _done(stub.content(result)) == PAGE
    assert page.seen_encoding is not None and b"zstd" in page.seen_encoding


class _Shout:
    """A second response filter, to check how filters compose."""

    def __init__(self, request: Any) -> None:
        self.request = request

    def encode(self, data: bytes) -> bytes:
        # It adds a byte at the end, so the length is no longer known.
        self.request.responseHeaders.removeHeader(b"content-length")
        return data.upper()

    def finish(self) -> bytes:
        return b"!"


class _InstallsShout(Resource):
    isLeaf = True

    def __init__(self, wrapped: Resource) -> None:
        super().__init__()
        self.wrapped = wrapped

    def render(self, request: Request) -> Any:
        assert install_response_filter(request, _Shout(request))
        return self.wrapped.render(request)


def test_response_filters_compose() -> None:
    """An inner wrapper's filter runs first; the outer one sees its output (and its flush)."""
    page = _Page(200, b"text/html", b"<head></head>x")
    stub = StubTreq(_InstallsShout(ThemeResource(page, "b{}")))
    result = _done(stub.get("http://gate.test/"))
    assert _done(stub.content(result)) == b"<HEAD><STYLE>B{}</STYLE></HEAD>X!"


def test_install_needs_a_real_request() -> None:
    """A request without twisted.web's encoder hook is left alone (and says so)."""
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b""])
    assert install_response_filter(request, _Shout(request)) is False
