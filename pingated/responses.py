# -*- test-case-name: tests.test_gate -*-
"""
The small error answers the gate gives itself (401, 403, 404, 413, 502, 504...).

Browsers get a short HTML page, everything else a small JSON object; neither
ever carries a traceback or a secret.
"""

from __future__ import annotations

import html
import json
from typing import Any

from twisted.web.iweb import IRequest


def wants_html(request: IRequest) -> bool:
    """True for a browser navigation: GET/HEAD asking for text/html."""
    if request.method not in (b"GET", b"HEAD"):
        return False
    accept = b",".join(request.requestHeaders.getRawHeaders(b"accept", []))
    return b"text/html" in accept.lower()


def json_body(request: IRequest, status: int, payload: dict[str, Any]) -> bytes:
    """Set status and JSON content type; return the encoded body."""
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    body = json.dumps(payload).encode("utf-8") + b"\n"
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    return body


def html_body(request: IRequest, status: int, title: str, message: str) -> bytes:
    """Set status and HTML content type; return a minimal self-contained page."""
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/html; charset=utf-8"])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    page = (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body></html>\n"
    ).encode()
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(page)).encode()])
    return page


def error_body(request: IRequest, status: int, title: str, message: str) -> bytes:
    """HTML for browsers, JSON otherwise; for errors raised by the gate itself."""
    if wants_html(request):
        return html_body(request, status, title, message)
    return json_body(request, status, {"error": message})


def write_error(request: IRequest, status: int, title: str, message: str) -> None:
    """Write a complete error response to a request still waiting for one."""
    body = error_body(request, status, title, message)
    if request.method != b"HEAD":
        request.write(body)
    request.finish()
