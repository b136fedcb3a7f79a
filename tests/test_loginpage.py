"""
The PIN page's HTML, its static files and their serving, in memory.

The page is rendered directly (L{render_login_page}) and through the whole
resource tree from L{pingated.app.build_root} driven by L{StubTreq}: the
CSP it is served with must allow everything it uses, the static files must
be typed, long-cached and cache-busted, and the logo configured in
C{gate.logo_file} must be validated at start and served.  The browser tests
(C{tests/test_browser.py}) show the same page working in chromium.
"""

from __future__ import annotations

import html.parser
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import pytest
from argon2 import PasswordHasher
from doubles import SeenResponse, settle
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from pingated.app import Runtime, build_root
from pingated.config import ConfigError, UpstreamConfig, parse_config
from pingated.loginpage import (
    BASE_CSS,
    STATIC_ASSETS,
    LoginPageState,
    StaticAsset,
    content_type_for,
    render_login_page,
    serve_asset,
)
from pingated.sessions import RevocationStore
from pingated.threads import run_inline
from pingated.throttle import Throttle

PIN_HASH = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("1357")
SECRET = "loginpage-test-secret-0123456789abcdefghij"
REPO = Path(__file__).resolve().parent.parent
LOGO_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8">'
    b'<rect width="8" height="8"/></svg>'
)


class _Page(html.parser.HTMLParser):
    """Collects the elements of a rendered page (tag, attributes) in order, and its text."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(source)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, **wanted: str) -> list[dict[str, str | None]]:
        return [
            a
            for t, a in self.elements
            if t == tag and all(a.get(k.rstrip("_")) == v for k, v in wanted.items())
        ]

    def by_id(self, element_id: str) -> dict[str, str | None]:
        (found,) = [a for _, a in self.elements if a.get("id") == element_id]
        return found


def _render(**changes: Any) -> str:
    state = LoginPageState(action="/.pingated/login", next="/")
    return render_login_page(attrs.evolve(state, **changes)).decode("utf-8")


# -- the HTML -----------------------------------------------------------------------


def test_plain_form_posts_pin_and_next_to_the_login_route() -> None:
    """Without JavaScript the page is a labelled form with the POST contract's fields."""
    page = _Page(_render(action="/gate/login", next="/app?x=1&y=2"))
    (form,) = page.find("form")
    assert form["method"] == "post" and form["action"] == "/gate/login"
    (next_field,) = page.find("input", name="next")
    assert next_field["type"] == "hidden" and next_field["value"] == "/app?x=1&y=2"
    pin = page.by_id("pin")
    assert pin["name"] == "pin" and pin["type"] == "password"
    assert pin["inputmode"] == "numeric"
    assert "required" in pin and "autofocus" in pin
    assert page.find("label", for_="pin")
    assert [b for b in page.find("button", type="submit") if "plain-submit" in (b["class"] or "")]


def test_keypad_is_twelve_labelled_buttons_hidden_until_the_script_runs() -> None:
    """1-9, Delete, 0, Unlock in reading order, with names a screen reader can say."""
    page = _Page(_render())
    pad = page.by_id("pad")
    assert "hidden" in pad and pad["role"] == "group"
    assert "hidden" in page.by_id("entry")
    keys = [a for t, a in page.elements if t == "button" and a.get("data-key")]
    assert [k["data-key"] for k in keys] == [*"123456789", "Backspace", "0", "Enter"]
    assert keys[9]["aria-label"] == "Delete last digit"
    assert keys[11]["aria-label"] == "Unlock" and keys[11]["type"] == "submit"
    assert all(k["type"] == "button" for k in keys[:11])
    assert page.by_id("count")["aria-live"] == "polite"
    assert page.by_id("dots")["aria-hidden"] == "true"


def test_no_inline_script_and_nothing_external() -> None:
    """CSP-compatible: the only script is a same-origin file; no URL leaves the gate."""
    source = _render(static_base="/gate/static")
    page = _Page(source)
    scripts = page.find("script")
    assert len(scripts) == 1
    src = scripts[0]["src"]
    assert src is not None
    assert src == f"/gate/static/pad.js?v={STATIC_ASSETS['pad.js'].version}"
    assert re.search(r"<script>|<script [^>]*>[^<]", source) is None
    assert re.search(r"\son[a-z]+=", source) is None  # no inline event handlers
    assert "http:" not in source and "https:" not in source
    urls = [a.get(k) for _, a in page.elements for k in ("src", "href", "action") if a.get(k)]
    assert urls
    for url in urls:
        assert url is not None
        assert url.startswith("data:") or (url.startswith("/") and not url.startswith("//"))
    assert not page.find("link", rel="stylesheet")  # the CSP has no style-src 'self'
    assert "@import" not in source and "url(" not in source
    (icon,) = page.find("link", rel="icon")
    assert icon["href"] == "data:,"  # no favicon request to the protected app


def test_error_is_announced_and_shakes() -> None:
    """An error is in an alert region and turns on the shake; no error, no shake."""
    calm = _Page(_render())
    assert calm.by_id("error")["role"] == "alert"
    assert "shake" not in (calm.find("main")[0]["class"] or "")
    page = _Page(_render(error="Too many attempts. Try again in 15 minutes."))
    assert "shake" in (page.find("main")[0]["class"] or "").split()
    assert "Too many attempts. Try again in 15 minutes." in page.text
    assert "@keyframes pg-shake" in BASE_CSS
    assert "prefers-reduced-motion" in BASE_CSS


def test_everything_shown_is_escaped() -> None:
    """Title, next, error and action cannot inject markup."""
    nasty = '"><script>alert(1)</script>'
    source = _render(title=nasty, next=nasty, error=nasty, action="/x" + nasty)
    assert "<script>alert" not in source
    page = _Page(source)
    assert page.find("input", name="next")[0]["value"] == nasty
    assert len(page.find("script")) == 1


def test_title_logo_and_theme_css() -> None:
    """gate.title names the page; the logo is shown; [theme] CSS comes after the base CSS."""
    source = _render(
        title="Family NAS",
        logo_url="/.pingated/logo?v=abc",
        extra_css=".pingated-login { --pg-accent: red; } </style><script>x</script>",
    )
    page = _Page(source)
    assert "Family NAS" in page.text
    assert re.search(r"<title>Family NAS</title>", source)
    (logo,) = page.find("img")
    assert logo["src"] == "/.pingated/logo?v=abc" and logo["alt"] == ""
    assert page.find("link", rel="icon")[0]["href"] == "/.pingated/logo?v=abc"
    assert source.index("--pg-accent: #3b82f6") < source.index("--pg-accent: red")
    assert "</style><script>x" not in source


def test_page_reveals_nothing_about_the_upstream() -> None:
    """Only the title, a PIN prompt and a keypad: no host names, versions or paths."""
    page = _Page(_render())
    words = " ".join(t.strip() for t in page.text if t.strip() and "{" not in t)
    assert words == "Sign in Sign in PIN Enter PIN 1 2 3 4 5 6 7 8 9 0 Unlock"
    assert page.find("meta", name="robots")[0]["content"] == "noindex, nofollow"


def test_static_files_are_shipped_and_typed() -> None:
    """pad.js and pad.css are in the package (package_data) with the right types."""
    assert STATIC_ASSETS["pad.js"].content_type == "text/javascript; charset=utf-8"
    assert STATIC_ASSETS["pad.css"].content_type == "text/css; charset=utf-8"
    assert content_type_for("a.SVG") == "image/svg+xml"
    assert content_type_for("x.py") is None
    asset = StaticAsset(b"abc", "text/plain")
    assert asset.version == asset.digest[:16] and len(asset.version) == 16
    assert asset.etag == f'"{asset.digest[:32]}"'.encode()


def test_pad_script_keeps_digits_out_of_the_page() -> None:
    """The script draws dots and counts; it never writes the digits into the document."""
    script = STATIC_ASSETS["pad.js"].body.decode("utf-8")
    assert "innerHTML" not in script and "eval(" not in script
    assert "digits entered" in script
    for key in ("Backspace", "Enter", "Escape"):
        assert f'"{key}"' in script


def test_serve_asset_sets_length_and_answers_conditional_requests() -> None:
    """Content-Length for the body; 304 without a body or type for a matching ETag."""
    asset = StaticAsset(b"body { }", "text/css; charset=utf-8")
    request = DummyRequest([b"x.css"])
    assert serve_asset(request, asset) == b"body { }"
    assert request.responseHeaders.getRawHeaders(b"content-length") == [b"8"]
    conditional = DummyRequest([b"x.css"])
    conditional.requestHeaders.setRawHeaders(b"if-none-match", [b'"other", ' + asset.etag])
    assert serve_asset(conditional, asset) == b""
    assert conditional.responseCode == 304
    assert not conditional.responseHeaders.hasHeader(b"content-type")
    missing = DummyRequest([b"nope"])
    serve_asset(missing, None)
    assert missing.responseCode == 404


# -- served by the real resource tree ----------------------------------------------


@attrs.define
class Tree:
    """The resource tree for one config, and a way to ask it things."""

    root: Resource
    agent: RequestTraversalAgent

    def get(self, path: str, method: str = "GET", **headers: str) -> SeenResponse:
        client = StubTreq(self.root)
        d: Deferred[Any] = client.request(
            method,
            "http://gate.test" + path,
            headers={k.replace("_", "-"): [v] for k, v in headers.items()},
            allow_redirects=False,
        )
        response = settle(d, client)
        body = settle(response.content(), client)
        names = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in response.headers.getAllRawHeaders()
        }
        return SeenResponse(response.code, names, body)


def _config_text(gate_extra: str = "", extra: str = "") -> str:
    return f"""
[server]
state_dir = "state"
[gate]
pin_hash = "{PIN_HASH}"
secret = "{SECRET}"
{gate_extra}
[upstream]
url = "http://upstream.test:3050"
{extra}
"""


def _tree(tmp_path: Path, gate_extra: str = "", extra: str = "") -> Tree:
    config = parse_config(_config_text(gate_extra, extra), str(tmp_path / "pingated.toml"))
    clock = Clock()
    clock.advance(1_700_000_000)
    agent = RequestTraversalAgent(Resource())

    def agent_for(upstream: UpstreamConfig) -> RequestTraversalAgent:
        return agent

    runtime = Runtime(
        reactor=clock,
        clock=clock,
        run_in_thread=run_inline,
        agent_for=agent_for,
        revocations=RevocationStore.load(config.server.state_dir, run_inline, clock.seconds()),
        throttle=Throttle(config.gate.throttle, clock),
        started=clock.seconds(),
    )
    return Tree(build_root(config, runtime), agent)


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    """A gate with the default configuration."""
    yield _tree(tmp_path)


def _csp(response: SeenResponse) -> dict[str, str]:
    policy = response.header("content-security-policy") or ""
    parts = (p.strip().split(None, 1) for p in policy.split(";") if p.strip())
    return {p[0]: (p[1] if len(p) > 1 else "") for p in parts}


def test_login_page_csp_allows_what_the_page_uses(tree: Tree) -> None:
    """Inline styles and same-origin script only; nothing else may load."""
    response = tree.get("/.pingated/login?next=/x", accept="text/html")
    assert response.code == 200
    assert response.header("content-type") == "text/html; charset=utf-8"
    csp = _csp(response)
    assert csp["script-src"] == "'self'"
    assert "'unsafe-inline'" in csp["style-src"]
    assert csp["default-src"] == "'none'"
    page = _Page(response.body.decode("utf-8"))
    (script,) = page.find("script")
    assert (script["src"] or "").startswith("/.pingated/static/pad.js?v=")


@pytest.mark.parametrize("name", sorted(STATIC_ASSETS))
def test_static_files_are_served_long_cached(tree: Tree, name: str) -> None:
    """Typed, immutable for a year, with an ETag that yields 304."""
    asset = STATIC_ASSETS[name]
    response = tree.get(f"/.pingated/static/{name}?v={asset.version}")
    assert response.code == 200
    assert response.body == asset.body
    assert response.header("content-type") == asset.content_type
    assert response.header("cache-control") == "public, max-age=31536000, immutable"
    assert response.header("x-content-type-options") == "nosniff"
    etag = response.header("etag")
    assert etag == asset.etag.decode()
    again = tree.get(f"/.pingated/static/{name}", if_none_match=etag)
    assert again.code == 304 and again.body == b""
    head = tree.get(f"/.pingated/static/{name}", method="HEAD")
    assert head.code == 200 and head.body == b""


@pytest.mark.parametrize(
    "path",
    [
        "/.pingated/static/nope.js",
        "/.pingated/static/..%2Fgate.py",
        "/.pingated/static/",
        "/.pingated/static/../loginpage.py",
        "/.pingated/logo",
    ],
)
def test_unknown_static_paths_are_404(tree: Tree, path: str) -> None:
    """Only the shipped files (and a configured logo) are served."""
    response = tree.get(path)
    assert response.code == 404
    assert b"pingated" not in response.body and b"Traceback" not in response.body


def test_static_files_follow_a_custom_prefix(tmp_path: Path) -> None:
    """With gate.prefix = "/auth" the page points at /auth/static/pad.js, which exists."""
    tree = _tree(tmp_path, 'prefix = "/auth"')
    page = _Page(tree.get("/auth/login").body.decode("utf-8"))
    (script,) = page.find("script")
    src = script["src"] or ""
    assert src.startswith("/auth/static/pad.js?v=")
    assert tree.get(urlsplit(src).path).code == 200


def test_logo_is_shown_and_served(tmp_path: Path) -> None:
    """gate.logo_file (relative to the config file) is linked with its hash and served."""
    (tmp_path / "logo.svg").write_bytes(LOGO_SVG)
    tree = _tree(tmp_path, 'title = "Family NAS"\nlogo_file = "logo.svg"')
    page = _Page(tree.get("/.pingated/login").body.decode("utf-8"))
    (logo,) = page.find("img")
    src = logo["src"] or ""
    version = StaticAsset(LOGO_SVG, "image/svg+xml").version
    assert src == f"/.pingated/logo?v={version}"
    assert "Family NAS" in page.text
    response = tree.get(src)
    assert response.code == 200 and response.body == LOGO_SVG
    assert response.header("content-type") == "image/svg+xml"
    assert response.header("cache-control") == "public, max-age=31536000, immutable"
    # An SVG opened directly must not run script in the gate's origin.
    assert "sandbox" in _csp(response)


def test_theme_css_reaches_the_login_page(tmp_path: Path) -> None:
    """[theme] css_file restyles the page (after the base CSS)."""
    (tmp_path / "theme.css").write_text(".pingated-login { --pg-accent: #123456; }")
    tree = _tree(tmp_path, extra='[theme]\ncss_file = "theme.css"')
    body = tree.get("/.pingated/login").body.decode("utf-8")
    assert body.index("--pg-accent: #3b82f6") < body.index("--pg-accent: #123456")


def test_wrong_pin_comes_back_with_next_and_shakes(tree: Tree) -> None:
    """The redirect after a wrong PIN carries error=pin and next; that page shakes."""
    client = StubTreq(tree.root)
    d = client.post(
        "http://gate.test/.pingated/login",
        data={"pin": "0000", "next": "/deep?x=1"},
        allow_redirects=False,
    )
    response = settle(d, client)
    assert response.code == 303
    location = response.headers.getRawHeaders(b"location")[0].decode()
    again = _Page(tree.get(location).body.decode("utf-8"))
    assert "shake" in (again.find("main")[0]["class"] or "").split()
    assert "Wrong PIN. Try again." in again.text
    assert again.find("input", name="next")[0]["value"] == "/deep?x=1"


# -- configuration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("logo.txt", b"x", "gate.logo_file: must be an image"),
        ("missing.png", None, "gate.logo_file: cannot read"),
        ("huge.png", b"\0" * (512 * 1024 + 1), "gate.logo_file:"),
    ],
)
def test_bad_logo_refuses_to_start(
    tmp_path: Path, name: str, content: bytes | None, problem: str
) -> None:
    """A logo that could not be served is one clear line at start."""
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        parse_config(_config_text(f'logo_file = "{name}"'), str(tmp_path / "pingated.toml"))
    message = str(caught.value)
    assert problem in message
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "pingated.toml") + ": ")


def test_logo_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    """Like every other file key."""
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    config = parse_config(_config_text('logo_file = "logo.png"'), str(tmp_path / "pingated.toml"))
    assert config.gate.logo_file == str(tmp_path / "logo.png")


# -- documentation ------------------------------------------------------------------


def test_readme_shows_the_screenshot_taken_by_the_browser_tests() -> None:
    """docs/screenshots/login.png is a PNG and the README displays it."""
    shot = REPO / "docs" / "screenshots" / "login.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "docs/screenshots/login.png" in (REPO / "README.md").read_text()


def test_configuration_docs_cover_the_page() -> None:
    """gate.title, gate.logo_file and the theme variables are documented."""
    docs = (REPO / "docs" / "configuration.md").read_text()
    for needle in ("logo_file", "title", "--pg-accent", ".pingated-login"):
        assert needle in docs
