"""
Tests for L{pingated.verify}: C{<prefix>/verify}, the forward-auth route
nginx, Traefik and Caddy call before serving a request (contract 3a).

Everything runs in memory: the whole resource tree from L{build_root},
driven by L{StubTreq} (whose client address is 127.0.0.1, a trusted proxy
by default), with a L{Clock} and upstreams that are in-memory resources.
The real nginx/Caddy front proxies are in C{test_forward_auth.py}.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import pytest
from harness import TEST_SECRET, pin_hash
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent, IRequest
from twisted.web.resource import Resource

from pingated.app import Runtime, build_root
from pingated.config import Config, UpstreamConfig, parse_config
from pingated.sessions import RevocationStore, SessionManager
from pingated.threads import run_inline
from pingated.throttle import Throttle
from pingated.verify import build_url

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}

# What Traefik's forwardAuth sends for a browser opening
# https://app.example.test/dash?a=1&b=2 (the call itself goes to the gate's
# own address).
TRAEFIK = {
    "Host": "127.0.0.1:3060",
    "X-Forwarded-Method": "GET",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "app.example.test",
    "X-Forwarded-Uri": "/dash?a=1&b=2",
    "X-Forwarded-For": "203.0.113.7",
    **HTML,
}
TRAEFIK_NEXT = "https://app.example.test/dash?a=1&b=2"


class NamedUpstream(Resource):
    """An upstream that says who it is and what reached it, as JSON."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def render(self, request: IRequest) -> bytes:
        headers = {
            k.decode("latin-1").lower(): [v.decode("latin-1") for v in vs]
            for k, vs in request.requestHeaders.getAllRawHeaders()
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {"upstream": self.name, "uri": request.uri.decode("latin-1"), "headers": headers}
        ).encode()


@attrs.define
class Answer:
    """A fully read in-memory response."""

    code: int
    headers: dict[str, list[str]]
    body: bytes
    length: Any = None
    """The declared body length (Content-Length), or UNKNOWN_LENGTH when chunked."""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class MemoryGate:
    """
    The gate's whole resource tree for one TOML config, in memory.

    C{request()} drives it like a client at 127.0.0.1 and pumps every
    in-memory connection (the client's and the proxy's) until done.
    """

    def __init__(self, state_dir: str, toml: str, server: str = "", **gate_keys: str) -> None:
        gate_extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in gate_keys.items())
        text = (
            f"[server]\nstate_dir = {json.dumps(state_dir)}\n{server}\n"
            f"[gate]\npin_hash = {json.dumps(pin_hash())}\n"
            f"secret = {json.dumps(TEST_SECRET)}\n{gate_extra}\n{toml}"
        )
        self.config: Config = parse_config(text, "test.toml")
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.agents: dict[str, RequestTraversalAgent] = {}
        revocations = RevocationStore.load(state_dir, run_inline, self.clock.seconds())
        self.runtime = Runtime(
            reactor=self.clock,
            clock=self.clock,
            run_in_thread=run_inline,
            agent_for=self.agent_for,
            revocations=revocations,
            throttle=Throttle(self.config.gate.throttle, self.clock),
            started=self.clock.seconds(),
        )
        self.sessions = SessionManager(
            TEST_SECRET.encode(), (), 3600, self.clock, revocations
        )
        self.stub = StubTreq(build_root(self.config, self.runtime))

    def agent_for(self, upstream: UpstreamConfig) -> IAgent:
        agent = self.agents.get(upstream.url)
        if agent is None:
            agent = self.agents[upstream.url] = RequestTraversalAgent(NamedUpstream(upstream.url))
        return agent

    def cookie(self) -> str:
        """A valid session cookie value, as a login would issue it."""
        return self.sessions.issue()[1]

    def _settle(self, d: Any) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(20):
            if results:
                break
            for agent in self.agents.values():
                agent.flush()
            self.stub.flush()
        assert results, "no answer"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        cookie: str | None = None,
        data: bytes | None = None,
    ) -> Answer:
        hdrs = dict(headers or {})
        if cookie is not None:
            hdrs["Cookie"] = f"pingated={cookie}"
        response = self._settle(
            self.stub.request(method, url, headers=hdrs, data=data, allow_redirects=False)
        )
        body = self._settle(self.stub.content(response))
        found = {
            k.decode("latin-1").lower(): [v.decode("latin-1") for v in vs]
            for k, vs in response.original.headers.getAllRawHeaders()
        }
        return Answer(response.code, found, body, response.original.length)


@pytest.fixture
def make_gate(tmp_path: Any) -> Any:
    """C{make_gate(toml="...", server="...", **gate_keys)}: a L{MemoryGate}."""
    return memory_gates(str(tmp_path))


def memory_gates(tmp_dir: str) -> Any:
    """A factory of L{MemoryGate}s keeping their state under C{tmp_dir}."""
    count = [0]

    def make(
        toml: str = '[upstream]\nurl = "http://app.invalid"\n', server: str = "", **gate_keys: str
    ) -> MemoryGate:
        count[0] += 1
        state = os.path.join(tmp_dir, f"state{count[0]}")
        return MemoryGate(state, toml, server, **gate_keys)

    return make


IDENTITY = """
[upstream]
url = "http://app.invalid"
[identity]
headers = { "X-Trusted-User-Email" = "me@example.test", "X-Role" = "admin" }
"""


def _next_of(location: str) -> str | None:
    values = parse_qs(urlsplit(location).query).get("next")
    return values[0] if values else None


# --- a valid session --------------------------------------------------------


@pytest.mark.parametrize(
    "style",
    [
        {"X-Original-URL": "https://app.example.test/x?y=1"},
        {"X-Original-URI": "/x?y=1", "X-Original-Host": "app.example.test"},
        {k: v for k, v in TRAEFIK.items() if k != "Host"},
    ],
    ids=["nginx-url", "nginx-uri", "traefik-caddy"],
)
def test_valid_session_200_empty_with_identity_headers(
    make_gate: Any, style: dict[str, str]
) -> None:
    """A valid session gets 200, an empty body and the [identity] headers (for auth_request_set)."""
    gate = make_gate(IDENTITY)
    answer = gate.request("GET", "http://127.0.0.1/.pingated/verify", style, gate.cookie())
    assert answer.code == 200
    assert answer.body == b""
    # Declared empty (not chunked), so front proxies reuse the connection.
    assert answer.length == 0
    assert answer.header("x-trusted-user-email") == "me@example.test"
    assert answer.header("x-role") == "admin"
    assert answer.header("x-pingated-login") is None
    assert answer.header("location") is None


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_every_method_is_answered(make_gate: Any, method: str) -> None:
    """nginx's auth subrequest keeps the visitor's method: verify must answer each, not 405."""
    gate = make_gate()
    ok = gate.request(method, "http://127.0.0.1/.pingated/verify", cookie=gate.cookie())
    assert ok.code == 200
    assert ok.body == b""
    refused = gate.request(
        method, "http://127.0.0.1/.pingated/verify", {"X-Original-URI": "/api"}
    )
    assert refused.code == 401


def test_tampered_or_missing_cookie_is_no_session(make_gate: Any) -> None:
    """Only a valid signature counts: a changed cookie is refused like none at all."""
    gate = make_gate()
    cookie = gate.cookie()
    tampered = cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")
    nginx = {"X-Original-URL": "http://app.example.test/"}
    assert gate.request("GET", "http://127.0.0.1/.pingated/verify", nginx, tampered).code == 401
    assert gate.request("GET", "http://127.0.0.1/.pingated/verify", nginx).code == 401
    assert gate.request("GET", "http://127.0.0.1/.pingated/verify", nginx, cookie).code == 200


# --- nginx: 401 + X-Pingated-Login -------------------------------------------


def test_nginx_original_url_gives_401_with_login_header(make_gate: Any) -> None:
    """nginx style, no session: 401 and X-Pingated-Login = login URL with next=original URL."""
    gate = make_gate()
    answer = gate.request(
        "GET",
        "http://127.0.0.1/.pingated/verify",
        {"X-Original-URL": "https://app.example.test/x?y=1&y=2", **HTML},
    )
    assert answer.code == 401
    login = answer.header("x-pingated-login")
    assert login == (
        "https://app.example.test/.pingated/login?next="
        "https%3A%2F%2Fapp.example.test%2Fx%3Fy%3D1%26y%3D2"
    )
    assert answer.header("location") is None
    # No body: nginx ignores it, and an empty one lets it keep the connection.
    assert answer.body == b""
    assert answer.length == 0
    assert answer.header("cache-control") == "no-store"


@pytest.mark.parametrize(
    ("headers", "expected_next"),
    [
        (
            {"X-Original-URI": "/p?q=1", "X-Original-Host": "app.example.test:8443",
             "X-Forwarded-Proto": "https"},
            "https://app.example.test:8443/p?q=1",
        ),
        ({"X-Original-URI": "/p", "Host": "app.example.test"}, "http://app.example.test/p"),
    ],
    ids=["x-original-host", "host"],
)
def test_nginx_original_uri_with_host(
    make_gate: Any, headers: dict[str, str], expected_next: str
) -> None:
    """X-Original-URI is joined with X-Original-Host (or Host) and the proxy's scheme."""
    gate = make_gate()
    answer = gate.request("GET", "http://127.0.0.1/.pingated/verify", headers)
    assert answer.code == 401
    login = answer.header("x-pingated-login") or ""
    assert _next_of(login) == expected_next
    assert login.startswith(expected_next.split("/p")[0] + "/.pingated/login?")


# --- Traefik / Caddy: 302 for navigations, 401 JSON otherwise ----------------


def test_traefik_headers_navigation_gets_302_to_login(make_gate: Any) -> None:
    """Traefik's X-Forwarded-Method/Proto/Host/Uri: a browser is sent to the login page."""
    gate = make_gate()
    answer = gate.request("GET", "http://127.0.0.1:3060/.pingated/verify", TRAEFIK)
    assert answer.code == 302
    assert answer.header("location") == (
        "https://app.example.test/.pingated/login?next="
        "https%3A%2F%2Fapp.example.test%2Fdash%3Fa%3D1%26b%3D2"
    )
    assert answer.header("x-pingated-login") is None
    assert answer.length == 0


@pytest.mark.parametrize(
    "changes",
    [{"X-Forwarded-Method": "POST"}, {"Accept": "application/json"}, {"Accept": "*/*"}],
    ids=["original-post", "json", "any"],
)
def test_traefik_non_navigation_gets_401_json(make_gate: Any, changes: dict[str, str]) -> None:
    """The original method decides (Traefik calls verify with GET); API calls get 401 JSON."""
    gate = make_gate()
    answer = gate.request(
        "GET", "http://127.0.0.1:3060/.pingated/verify", {**TRAEFIK, **changes}
    )
    assert answer.code == 401
    body = answer.json()
    assert body["error"] == "login required"
    assert _next_of(body["login"]) == TRAEFIK_NEXT
    assert answer.header("location") is None


def test_login_url_and_cookie_domain(make_gate: Any) -> None:
    """A central login page gets next=original URL when it lies inside cookie_domain."""
    gate = make_gate(
        login_url="https://auth.example.test/.pingated/login", cookie_domain=".example.test"
    )
    answer = gate.request("GET", "http://127.0.0.1:3060/.pingated/verify", TRAEFIK)
    assert answer.code == 302
    assert answer.header("location") == (
        "https://auth.example.test/.pingated/login?next="
        "https%3A%2F%2Fapp.example.test%2Fdash%3Fa%3D1%26b%3D2"
    )
    outside = gate.request(
        "GET",
        "http://127.0.0.1:3060/.pingated/verify",
        {**TRAEFIK, "X-Forwarded-Host": "app.elsewhere.test"},
    )
    assert outside.header("location") == "https://auth.example.test/.pingated/login"
    nginx = gate.request(
        "GET",
        "http://127.0.0.1/.pingated/verify",
        {"X-Original-URL": "http://b.example.test/z"},
    )
    assert nginx.header("x-pingated-login") == (
        "https://auth.example.test/.pingated/login?next=http%3A%2F%2Fb.example.test%2Fz"
    )


@pytest.mark.parametrize(
    "base",
    [
        {"X-Original-URL": "http://app.example.test/ws"},
        {k: v for k, v in TRAEFIK.items()},
        {k: v for k, v in TRAEFIK.items() if k != "Accept"},
    ],
    ids=["nginx", "traefik-navigation", "traefik-api"],
)
def test_upgrade_headers_change_nothing(make_gate: Any, base: dict[str, str]) -> None:
    """A WebSocket handshake passing through the proxy gets the same verdict as without."""
    gate = make_gate(IDENTITY)
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    url = "http://127.0.0.1/.pingated/verify"
    for cookie in (None, gate.cookie()):
        plain = gate.request("GET", url, base, cookie)
        upgraded = gate.request("GET", url, {**base, **upgrade}, cookie)
        assert upgraded.code == plain.code
        assert upgraded.body == plain.body
        for name in ("location", "x-pingated-login", "x-trusted-user-email"):
            assert upgraded.header(name) == plain.header(name)
    assert gate.request("GET", url, {**base, **upgrade}, gate.cookie()).code == 200


# --- what is believed ----------------------------------------------------------


def test_untrusted_caller_original_headers_ignored(make_gate: Any) -> None:
    """From outside trusted_proxies, X-Original-* / X-Forwarded-* choose nothing."""
    gate = make_gate(server='trusted_proxies = ["10.0.0.0/8"]')
    nginx = gate.request(
        "GET", "http://127.0.0.1/.pingated/verify", {"X-Original-URL": "https://evil.test/x"}
    )
    assert nginx.code == 401
    assert nginx.header("x-pingated-login") == "/.pingated/login"
    traefik = gate.request("GET", "http://127.0.0.1/.pingated/verify", TRAEFIK)
    assert traefik.code == 302
    assert traefik.header("location") == "/.pingated/login"


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Original-URL": "javascript:alert(1)"},
        {"X-Original-URL": "https://user@evil.test/"},
        {"X-Original-URL": "https://app.example.test\\@evil.test/"},
        {"X-Original-URI": "//evil.test/x", "Host": "app.example.test"},
        {"X-Original-URI": "x", "Host": "app.example.test"},
        {"X-Original-URI": "/x", "Host": "a b.test"},
        {"X-Original-URI": "/x", "Host": ""},
        {**TRAEFIK, "X-Forwarded-Host": "app.example.test:80x"},
        {**TRAEFIK, "X-Forwarded-Host": "evil.test/x?"},
        {**TRAEFIK, "X-Forwarded-Uri": "/a\x01b"},
    ],
)
def test_implausible_original_request_gives_login_without_next(
    make_gate: Any, headers: dict[str, str]
) -> None:
    """A malformed original URL is not put into a Location: the plain login page instead."""
    gate = make_gate()
    answer = gate.request("GET", "http://127.0.0.1/.pingated/verify", headers)
    location = answer.header("x-pingated-login") or answer.header("location")
    assert location == "/.pingated/login"


def test_build_url_encodes_what_a_header_cannot_carry() -> None:
    """Spaces, quotes and non-ASCII bytes in a raw URI are percent-encoded, the rest kept."""
    assert build_url("HTTPS", "App.Example.test", "/a b/\"q\"?x=%41&y=\u00e9") == (
        "https://app.example.test/a%20b/%22q%22?x=%41&y=%E9"
    )
    assert build_url("http", "[::1]:8080", "/") == "http://[::1]:8080/"
    assert build_url("http", "host", "/\\evil") == "http://host/%5Cevil"
    assert build_url("ftp", "host", "/") is None


def test_identity_headers_follow_the_original_host(make_gate: Any) -> None:
    """Each [[site]]'s identity headers are answered for its host; others get the global ones."""
    gate = make_gate(
        IDENTITY
        + """
[[site]]
host = "grafana.example.test"
upstream = "http://grafana.invalid"
[site.identity]
headers = { "X-WEBAUTH-USER" = "admin" }

[[site]]
host = "*.apps.example.test"
upstream = "http://apps.invalid"
"""
    )
    url = "http://127.0.0.1/.pingated/verify"
    grafana = gate.request(
        "GET", url, {"X-Original-URL": "https://grafana.example.test/d"}, gate.cookie()
    )
    assert grafana.code == 200
    assert grafana.header("x-webauth-user") == "admin"
    assert grafana.header("x-trusted-user-email") is None
    wildcard = gate.request(
        "GET", url, {**TRAEFIK, "X-Forwarded-Host": "one.apps.example.test:443"}, gate.cookie()
    )
    # A site without its own identity table inherits [identity].
    assert wildcard.header("x-trusted-user-email") == "me@example.test"
    assert wildcard.header("x-webauth-user") is None
    other = gate.request("GET", url, {"X-Original-URL": "https://x.test/"}, gate.cookie())
    assert other.header("x-trusted-user-email") == "me@example.test"


def test_custom_prefix(make_gate: Any) -> None:
    """verify and the login URL it gives follow gate.prefix."""
    gate = make_gate(prefix="/auth")
    answer = gate.request("GET", "http://127.0.0.1/auth/verify", TRAEFIK)
    assert answer.code == 302
    assert (answer.header("location") or "").startswith("https://app.example.test/auth/login?next=")
    assert gate.request("GET", "http://127.0.0.1/auth/verify", cookie=gate.cookie()).code == 200
