# -*- test-case-name: tests.test_loginpage -*-
"""
The PIN page and the few static files it needs.

The page is self-contained: its stylesheet (C{static/pad.css}) is inlined,
its only script (C{static/pad.js}) and the optional logo come from the gate
itself, and nothing is loaded from anywhere else.  Without JavaScript it is
a plain labelled form posting C{pin} and C{next}; C{pad.js} turns it into
dots and a 3x4 keypad.  Nothing on it hints at what sits behind the gate.

Static files are served with a content hash in their URL (C{?v=}), so they
can be cached for a year and still change the moment pingated is upgraded
or the logo is replaced.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from collections.abc import Mapping
from importlib import resources

import attrs
from twisted.web.iweb import IRequest

from pingated.responses import json_body

#: Types of the files the gate serves itself; anything else is not served.
CONTENT_TYPES: Mapping[str, str] = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".ico": "image/x-icon",
}

#: A year: the URLs carry the content hash, so a changed file gets a new URL.
IMMUTABLE_CACHE = b"public, max-age=31536000, immutable"

# An SVG logo opened directly must not be able to run anything in our origin.
ASSET_CSP = b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"


@attrs.frozen
class StaticAsset:
    """One file the gate serves itself, with what HTTP caching needs."""

    body: bytes
    content_type: str
    digest: str = attrs.field(init=False)

    @digest.default
    def _digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    @property
    def version(self) -> str:
        """Short content hash put in the URL so long caching stays correct."""
        return self.digest[:16]

    @property
    def etag(self) -> bytes:
        """A strong validator for conditional requests."""
        return f'"{self.digest[:32]}"'.encode("ascii")


def content_type_for(name: str) -> str | None:
    """The Content-Type for a file name, or None when we do not serve that kind."""
    return CONTENT_TYPES.get(os.path.splitext(name)[1].lower())


def load_static_assets() -> dict[str, StaticAsset]:
    """The files shipped in C{pingated/static}, read once at import."""
    assets: dict[str, StaticAsset] = {}
    folder = resources.files("pingated").joinpath("static")
    if not folder.is_dir():
        return assets
    for entry in folder.iterdir():
        kind = content_type_for(entry.name)
        if kind is None or not entry.is_file():
            continue
        assets[entry.name] = StaticAsset(entry.read_bytes(), kind)
    return assets


def load_logo(path: str) -> StaticAsset | None:
    """
    The operator's logo as a servable asset, or None when unset.

    Raises C{OSError} when the file cannot be read; configuration checking
    has already refused unknown types and oversized files.
    """
    if not path:
        return None
    kind = content_type_for(path)
    if kind is None or not kind.startswith("image/"):
        return None
    with open(path, "rb") as f:
        return StaticAsset(f.read(), kind)


def _strip_comments(css: str) -> str:
    # The page carries the stylesheet on every load: its comments stay in the file.
    return re.sub(r"/\*.*?\*/\n?", "", css, flags=re.S)


STATIC_ASSETS = load_static_assets()
BASE_CSS = (
    _strip_comments(STATIC_ASSETS["pad.css"].body.decode("utf-8"))
    if "pad.css" in STATIC_ASSETS
    else ""
)


def asset_url(base: str, name: str, asset: StaticAsset) -> str:
    """The cache-busting URL of C{asset} served as C{base/name}."""
    return f"{base}/{name}?v={asset.version}"


def serve_asset(request: IRequest, asset: StaticAsset | None) -> bytes:
    """
    Answer with C{asset}: long-cached, typed, with an ETag (304 when it matches).

    Unknown files get 404 JSON, so nothing about the file system is revealed.
    """
    if asset is None:
        return json_body(request, 404, {"error": "not found"})
    headers = request.responseHeaders
    headers.setRawHeaders(b"cache-control", [IMMUTABLE_CACHE])
    headers.setRawHeaders(b"etag", [asset.etag])
    headers.setRawHeaders(b"content-security-policy", [ASSET_CSP])
    headers.setRawHeaders(b"x-content-type-options", [b"nosniff"])
    headers.setRawHeaders(b"cross-origin-resource-policy", [b"same-origin"])
    matches = b",".join(request.requestHeaders.getRawHeaders(b"if-none-match", []))
    if asset.etag in matches or matches.strip() == b"*":
        request.setResponseCode(304)
        headers.removeHeader(b"content-type")
        return b""
    request.setResponseCode(200)
    headers.setRawHeaders(b"content-type", [asset.content_type.encode("ascii")])
    headers.setRawHeaders(b"content-length", [str(len(asset.body)).encode("ascii")])
    return asset.body


@attrs.frozen
class LoginPageState:
    """What the page must show for one request."""

    action: str
    next: str
    title: str = "Sign in"
    error: str = ""
    extra_css: str = ""
    #: Where C{pad.js} and friends are served (C{<prefix>/static}).
    static_base: str = "/.pingated/static"
    #: The logo's URL (with its version), or "" for no logo.
    logo_url: str = ""


# Icons are inline SVG so the page needs no icon font and no image request.
_BACKSPACE_ICON = (
    '<svg viewBox="0 0 24 24" aria-hidden="true" focusable="false">'
    '<path d="M21 5H9l-6 7 6 7h12a1 1 0 0 0 1-1V6a1 1 0 0 0-1-1z"/>'
    '<path d="M17 9.5l-5 5M12 9.5l5 5"/></svg>'
)
_ENTER_ICON = (
    '<svg viewBox="0 0 24 24" aria-hidden="true" focusable="false">'
    '<path d="M5 12h14M13 6l6 6-6 6"/></svg>'
)


def _keypad() -> str:
    keys = [f'<button type="button" class="key" data-key="{d}">{d}</button>' for d in "123456789"]
    keys.append(
        '<button type="button" class="key key-fn" data-key="Backspace" '
        f'aria-label="Delete last digit">{_BACKSPACE_ICON}</button>'
    )
    keys.append('<button type="button" class="key" data-key="0">0</button>')
    keys.append(
        '<button type="submit" class="key key-go" data-key="Enter" '
        f'aria-label="Unlock">{_ENTER_ICON}</button>'
    )
    return "\n".join(keys)


_KEYPAD = _keypad()


def render_login_page(state: LoginPageState) -> bytes:
    """The complete login page for C{state}, as UTF-8 bytes."""
    esc = html.escape
    title = esc(state.title)
    extra = f"\n<style>{_css_text(state.extra_css)}</style>" if state.extra_css else ""
    logo = f'<img class="logo" src="{esc(state.logo_url)}" alt="">\n' if state.logo_url else ""
    script = ""
    pad_js = STATIC_ASSETS.get("pad.js")
    if pad_js is not None:
        script = f'<script src="{esc(asset_url(state.static_base, "pad.js", pad_js))}"></script>'
    shake = " shake" if state.error else ""
    # No favicon request: it would reach the protected app and fail.
    icon = state.logo_url or "data:,"
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1, viewport-fit=cover">
<meta name="robots" content="noindex, nofollow">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="{esc(icon)}">
<title>{title}</title>
<style>{_css_text(BASE_CSS)}</style>{extra}
</head>
<body class="pingated-login">
<main class="gate{shake}">
{logo}<h1 id="title">{title}</h1>
<form id="pin-form" method="post" action="{esc(state.action)}" autocomplete="off">
<input type="hidden" name="next" value="{esc(state.next)}">
<div class="plain plain-field">
<label for="pin">PIN</label>
<input type="password" id="pin" name="pin" inputmode="numeric" autocomplete="current-password"
 aria-describedby="error" required autofocus>
</div>
<div class="entry" id="entry" hidden>
<p class="prompt" id="prompt">Enter PIN</p>
<div class="dots" id="dots" aria-hidden="true"></div>
<p class="sr-only" id="count" aria-live="polite" aria-atomic="true"></p>
</div>
<p class="error" id="error" role="alert" aria-live="assertive">{esc(state.error)}</p>
<div class="pad" id="pad" role="group" aria-labelledby="prompt" aria-describedby="error" hidden>
{_KEYPAD}
</div>
<button type="submit" class="plain plain-submit">Unlock</button>
</form>
</main>
{script}
</body>
</html>
"""
    return page.encode("utf-8")


def _css_text(css: str) -> str:
    # A stylesheet cannot close the <style> element it is placed in.
    return css.replace("</", "<\\/")
