# -*- test-case-name: tests.test_theme -*-
"""
Theme CSS injected into the upstream's HTML pages (contract section 4b).

L{ThemeResource} wraps the proxy.  For every response whose Content-Type is
C{text/html} it inserts C{<style>CSS</style>} just before C{</head>}, or at
the start of the document (after a leading doctype, so the page does not
drop into quirks mode) when there is no C{</head>}.  Everything else --
other content types, event streams, WebSocket upgrades, 204/304 and
partial (206) answers -- passes through untouched.  A HEAD answer gets the
headers the GET would get (Content-Length grown by the style element, or
dropped with the coding), so the two agree.

Compression: for a browser navigation (C{Accept: text/html}) the upstream is
asked for an uncompressed page (C{Accept-Encoding: identity}), so the page
keeps its Content-Length (corrected by the size of the style element).  For
other requests the client's Accept-Encoding is narrowed to the codings the
gate can decode (gzip, deflate, and br when the optional C{brotli} module is
installed), and a compressed HTML answer is decompressed, injected and sent
uncompressed with chunked framing.  An HTML answer in a coding the gate
cannot decode is passed through unthemed rather than broken.

Streaming: the page is held only until C{</head>} (or a C{<body} tag, which
proves there is none) is seen, or at most L{SEARCH_LIMIT} bytes; from then
on each chunk is written as it arrives.
"""

from __future__ import annotations

import importlib
import re
import zlib
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest, _IRequestEncoder
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

from pingated.responsefilter import install_response_filter

log = Logger(namespace="pingated.theme")

#: How much of a page is held while looking for C{</head>}.  Real heads are a
#: few KB; past this the page is treated as having none.
SEARCH_LIMIT = 64 * 1024

_CLOSE_HEAD = re.compile(rb"</head\s*>", re.IGNORECASE)
_OPEN_BODY = re.compile(rb"<body[\s>/]", re.IGNORECASE)
_LEADING_DOCTYPE = re.compile(rb"^(?:\xef\xbb\xbf)?\s*<!doctype[^>]*>", re.IGNORECASE)
# Longest text a match can span, so a search resumes a little before where
# the previous one stopped (a tag split across two chunks is still found).
_OVERLAP = 16

_NO_BODY_CODES = frozenset({204, 304})


def _brotli() -> Any:
    """The optional C{brotli} module, or None."""
    try:
        return importlib.import_module("brotli")
    except ImportError:
        return None


BROTLI = _brotli()


def style_element(css: str) -> bytes:
    """
    C{<style>css</style>} as bytes safe to put into any ASCII-compatible page.

    The CSS cannot close its own element (C{</} is escaped), and non-ASCII
    characters become CSS escapes so the bytes mean the same thing whatever
    charset the page declares.
    """
    safe = css.replace("</", "<\\/")
    ascii_css = "".join(ch if ord(ch) < 128 else f"\\{ord(ch):06x}" for ch in safe)
    return b"<style>" + ascii_css.encode("ascii") + b"</style>"


def is_html(headers: Headers) -> bool:
    """True when the (first) Content-Type is C{text/html}, whatever its parameters."""
    values = headers.getRawHeaders(b"content-type")
    if not values:
        return False
    return values[0].split(b";", 1)[0].strip().lower() == b"text/html"


def decodable_codings() -> tuple[bytes, ...]:
    """The content codings the theme filter can undo on this machine."""
    base: tuple[bytes, ...] = (b"gzip", b"x-gzip", b"deflate")
    return (*base, b"br") if BROTLI is not None else base


def narrow_accept_encoding(value: bytes) -> bytes:
    """
    C{Accept-Encoding} without codings the gate could not decode.

    Keeps order and q-values; a wildcard is dropped (it would allow zstd and
    friends).  Returns C{identity} when nothing usable is left.
    """
    allowed = {*decodable_codings(), b"identity"}
    kept = []
    for item in value.split(b","):
        coding = item.split(b";", 1)[0].strip().lower()
        if coding in allowed:
            kept.append(item.strip())
    return b", ".join(kept) if kept else b"identity"


class HeadInjector:
    """
    Inserts the style element into a streamed HTML document.

    L{feed} returns what may be sent now; it returns nothing while the
    position is not yet known, and everything once it is.
    """

    def __init__(self, style: bytes, limit: int = SEARCH_LIMIT) -> None:
        self.style = style
        self.limit = limit
        self.done = False
        self._held = b""
        self._searched = 0

    def feed(self, data: bytes) -> bytes:
        """Accept the next chunk of the (decoded) document."""
        if self.done:
            return data
        self._held += data
        start = max(0, self._searched - _OVERLAP)
        close = _CLOSE_HEAD.search(self._held, start)
        if close is not None:
            return self._release(close.start())
        if _OPEN_BODY.search(self._held, start) is not None or len(self._held) >= self.limit:
            # A body already started (or a head this long) means no </head>.
            return self._release(None)
        self._searched = len(self._held)
        return b""

    def finish(self) -> bytes:
        """The document ended: inject at the start if nothing was found."""
        if self.done:
            return b""
        return self._release(None)

    def _release(self, position: int | None) -> bytes:
        held, self._held = self._held, b""
        self.done = True
        if position is None:
            doctype = _LEADING_DOCTYPE.match(held)
            position = doctype.end() if doctype else 0
        return held[:position] + self.style + held[position:]


class _Decoder:
    """Undoes one content coding, chunk by chunk."""

    def __init__(self, coding: bytes) -> None:
        self.coding = coding
        self._brotli: Any = None
        self._zlib: Any = None
        self._raw_fallback = coding == b"deflate"
        if coding == b"br":
            self._brotli = BROTLI.Decompressor()
        else:
            # 32 + MAX_WBITS: accept a gzip or zlib header automatically.
            self._zlib = zlib.decompressobj(32 + zlib.MAX_WBITS)

    def decode(self, data: bytes) -> bytes:
        """Decompress one chunk; raises on corrupt input."""
        if not data:
            return b""
        if self._brotli is not None:
            return bytes(self._brotli.process(data))
        try:
            out = self._zlib.decompress(data)
        except zlib.error:
            if not self._raw_fallback:
                raise
            # Some servers send "deflate" as a raw stream without the zlib
            # header; that shows at the very first bytes.
            self._raw_fallback = False
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
            out = self._zlib.decompress(data)
        self._raw_fallback = False
        return bytes(out)

    def flush(self) -> bytes:
        """Whatever the decompressor still holds at the end of the body."""
        if self._zlib is not None:
            return bytes(self._zlib.flush())
        return b""


@implementer(_IRequestEncoder)
class ThemeFilter:
    """
    The response filter for one request: decides at the first write whether
    the response is HTML it can theme, then decodes and injects.
    """

    def __init__(self, request: IRequest, style: bytes) -> None:
        self.request = request
        self.style = style
        self._decided = False
        self._finished = False
        self._active = False
        self._broken = False
        self._decoder: _Decoder | None = None
        self._injector = HeadInjector(style)

    def _decide(self) -> None:
        self._decided = True
        request = self.request
        headers = request.responseHeaders
        code = getattr(request, "code", 200)
        if (
            code in _NO_BODY_CODES
            or code < 200
            or code == 206
            or headers.hasHeader(b"content-range")
            or not is_html(headers)
        ):
            return
        codings = [
            c.strip().lower()
            for value in headers.getRawHeaders(b"content-encoding", [])
            for c in value.split(b",")
            if c.strip() and c.strip().lower() != b"identity"
        ]
        if len(codings) > 1 or (codings and codings[0] not in decodable_codings()):
            log.debug(
                "page not themed: cannot decode content-encoding {codings}",
                codings=b", ".join(codings).decode("latin-1"),
            )
            return
        self._active = True
        headers.removeHeader(b"content-md5")
        if codings:
            self._decoder = _Decoder(b"gzip" if codings[0] == b"x-gzip" else codings[0])
            headers.removeHeader(b"content-encoding")
            headers.removeHeader(b"content-length")
            _weaken_etag(headers)
            return
        lengths = headers.getRawHeaders(b"content-length")
        if lengths:
            try:
                length = int(lengths[0])
            except ValueError:
                headers.removeHeader(b"content-length")
            else:
                # Exactly one style element is added, wherever it lands.
                new_length = length + len(self.style)
                headers.setRawHeaders(b"content-length", [str(new_length).encode("ascii")])
        _weaken_etag(headers)

    def encode(self, data: bytes) -> bytes:
        """One chunk of the upstream body on its way to the client."""
        if not self._decided:
            self._decide()
        if self._active and self.request.method == b"HEAD":
            return b""
        if not self._active or self._finished or self._broken:
            return data if not self._broken else b""
        if self._decoder is not None:
            try:
                data = self._decoder.decode(data)
            except Exception as e:
                self._fail(e)
                return b""
        return self._injector.feed(data)

    def finish(self) -> bytes:
        """The body ended: flush the decoder and the injector."""
        if not self._decided:
            self._decide()
        if not self._active or self._finished or self._broken or self.request.method == b"HEAD":
            self._finished = True
            return b""
        self._finished = True
        tail = b""
        if self._decoder is not None:
            try:
                tail = self._decoder.flush()
            except Exception as e:
                self._fail(e)
                return b""
        return self._injector.feed(tail) + self._injector.finish()

    def _fail(self, error: Exception) -> None:
        # A corrupt compressed page cannot be fixed; cut the client off so a
        # truncated page is not taken for a complete one.
        self._broken = True
        log.info("cannot decode upstream page: {why}", why=str(error) or type(error).__name__)
        channel: Any = getattr(self.request, "channel", None)
        transport = getattr(channel, "transport", None)
        abort: Callable[[], None] | None = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()


def _weaken_etag(headers: Headers) -> None:
    """The body is no longer byte-for-byte the upstream's: a strong ETag would lie."""
    values = headers.getRawHeaders(b"etag")
    if not values:
        return
    headers.setRawHeaders(
        b"etag", [v if v.strip().startswith(b"W/") else b"W/" + v.strip() for v in values]
    )


def _is_upgrade(request: IRequest) -> bool:
    upgrade = b",".join(request.requestHeaders.getRawHeaders(b"upgrade", []))
    return bool(upgrade.strip())


def _accepts_html(request: IRequest) -> bool:
    accept = b",".join(request.requestHeaders.getRawHeaders(b"accept", []))
    return b"text/html" in accept.lower()


class ThemeResource(Resource):
    """
    Wraps the proxy and themes the HTML it returns with C{css}.

    Knows nothing of sessions or identity; an empty C{css} makes it a no-op,
    so whether theming happens is purely a matter of configuration.
    """

    isLeaf = True

    def __init__(self, wrapped: IResource, css: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.wrapped = wrapped
        self.css = css
        self.style = style_element(css) if css else b""

    def render(self, request: IRequest) -> Any:
        """Adjust Accept-Encoding, install the filter, pass the request on."""
        if self.style and not _is_upgrade(request):
            headers = request.requestHeaders
            if _accepts_html(request):
                # A page: ask for it uncompressed, so nothing must be decoded
                # and its Content-Length can be kept (plus the style).
                headers.setRawHeaders(b"accept-encoding", [b"identity"])
            else:
                offered = headers.getRawHeaders(b"accept-encoding")
                if offered:
                    headers.setRawHeaders(
                        b"accept-encoding", [narrow_accept_encoding(b",".join(offered))]
                    )
            install_response_filter(request, ThemeFilter(request, self.style))
        return self.wrapped.render(request)
