"""
In-memory tests of the whole resource tree L{pingated.app.build_root} makes:
the gate's pages, the auth wrapper and the proxy, driven with L{StubTreq}.

The upstream is a tiny resource that echoes what it received as JSON,
reached through L{RequestTraversalAgent}; time is a L{Clock}; PIN checks and
revocation writes run inline.  No sockets, no threads, no real time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import pytest
from argon2 import PasswordHasher
from doubles import SeenResponse, settle
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from pingated.app import Runtime, build_root
from pingated.config import Config, ThrottleConfig, UpstreamConfig, parse_config
from pingated.sessions import RevocationStore
from pingated.threads import run_inline
from pingated.throttle import Throttle

PIN = "246810"
PIN_HASH = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PIN)
SECRET = "gate-unit-test-secret-0123456789abcdefghij"
START = 1_700_000_000.0


class EchoUpstream(Resource):
    """Answers every request with JSON describing it (method, uri, headers)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def render(self, request: IRequest) -> bytes:
        """Record the request and echo it back, with two Set-Cookie headers."""
        headers = [
            [name.decode("latin-1").lower(), value.decode("latin-1")]
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        record = {
            "method": request.method.decode("ascii"),
            "uri": request.uri.decode("latin-1"),
            "headers": headers,
        }
        self.seen.append(record)
        request.setHeader(b"content-type", b"application/json")
        request.responseHeaders.addRawHeader(b"set-cookie", b"up1=a; Path=/")
        request.responseHeaders.addRawHeader(b"set-cookie", b"up2=b; Path=/; HttpOnly")
        return json.dumps(record).encode("utf-8")


class Response(SeenResponse):
    """What a client saw, with the body readable as JSON."""

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


@attrs.define
class GateUnderTest:
    """One built tree plus the fakes around it."""

    root: IResource
    upstream: EchoUpstream
    upstream_agent: RequestTraversalAgent
    clock: Clock
    config: Config
    state_dir: Path

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        data: dict[str, str] | bytes | None = None,
    ) -> Response:
        """One request through a fresh client (no cookie jar carried over)."""
        client = StubTreq(self.root)
        d: Deferred[Any] = client.request(
            method,
            "http://gate.test" + path,
            headers={k: [v] for k, v in (headers or {}).items()},
            data=data,
            allow_redirects=False,
        )
        response = settle(d, client, self.upstream_agent)
        body = settle(response.content(), client, self.upstream_agent)
        names = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in response.headers.getAllRawHeaders()
        }
        return Response(response.code, names, body)

    def login(self, pin: str = PIN, next_target: str = "/", **headers: str) -> Response:
        """POST the login form."""
        return self.request(
            "POST", "/.pingated/login", headers=headers, data={"pin": pin, "next": next_target}
        )

    def cookie(self, **headers: str) -> str:
        """Log in and return the session cookie value."""
        response = self.login(**headers)
        assert response.code == 303
        return _cookie_value(response)


def _set_cookies(response: Response, name: str = "pingated") -> list[str]:
    return [c for c in response.headers.get("set-cookie", []) if c.startswith(name + "=")]


def _cookie_value(response: Response, name: str = "pingated") -> str:
    (cookie,) = _set_cookies(response, name)
    return cookie.split(";", 1)[0].split("=", 1)[1]


def _flags(set_cookie: str) -> dict[str, str]:
    flags = {}
    for part in set_cookie.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        flags[key.lower()] = value
    return flags


def _config_text(trusted: str, extra_gate: str = "", extra: str = "") -> str:
    return f"""
[server]
listen = ["tcp:0:interface=127.0.0.1"]
trusted_proxies = {trusted}
state_dir = "state"

[gate]
pin_hash = "{PIN_HASH}"
secret = "{SECRET}"
session_ttl = "1h"
{extra_gate}

[upstream]
url = "http://upstream.test:3050"

[identity]
headers = {{ "X-Trusted-User" = "owner@example.com" }}
{extra}
"""


def build_gate(
    tmp_path: Path, trusted: str = '["127.0.0.1/32", "::1/128"]', extra_gate: str = ""
) -> GateUnderTest:
    """A tree built from a parsed config with fakes for time, threads and the upstream."""
    config_file = tmp_path / "pingated.toml"
    config = parse_config(_config_text(trusted, extra_gate), str(config_file))
    clock = Clock()
    clock.advance(START)
    upstream = EchoUpstream()
    upstream_agent = RequestTraversalAgent(upstream)

    def agent_for(upstream_config: UpstreamConfig) -> RequestTraversalAgent:
        assert upstream_config.url == "http://upstream.test:3050"
        return upstream_agent

    revocations = RevocationStore.load(config.server.state_dir, run_inline, clock.seconds())
    runtime = Runtime(
        reactor=clock,
        clock=clock,
        run_in_thread=run_inline,
        agent_for=agent_for,
        revocations=revocations,
        throttle=Throttle(config.gate.throttle, clock),
        started=clock.seconds(),
    )
    root = build_root(config, runtime)
    return GateUnderTest(root, upstream, upstream_agent, clock, config, tmp_path / "state")


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[GateUnderTest]:
    """The default gate: loopback is a trusted proxy (as StubTreq's peer is 127.0.0.1)."""
    yield build_gate(tmp_path)


@pytest.fixture
def untrusted_gate(tmp_path: Path) -> GateUnderTest:
    """A gate that trusts no proxy at all, so StubTreq's 127.0.0.1 is a plain client."""
    return build_gate(tmp_path, trusted="[]")


# -- no session -------------------------------------------------------------------


def test_browser_navigation_redirects_to_login(gate: GateUnderTest) -> None:
    """GET with Accept text/html and no cookie: 302 to the login page with next=path+query."""
    response = gate.request(
        "GET", "/app/page?x=1&x=2&y=%2F", headers={"Accept": "text/html,application/xhtml+xml"}
    )
    assert response.code == 302
    location = response.header("location")
    assert location is not None
    parts = urlsplit(location)
    assert parts.path == "/.pingated/login"
    assert not parts.netloc
    assert parse_qs(parts.query) == {"next": ["/app/page?x=1&x=2&y=%2F"]}
    assert gate.upstream.seen == []


def test_head_navigation_redirects(gate: GateUnderTest) -> None:
    """HEAD counts as a navigation too."""
    response = gate.request("HEAD", "/", headers={"Accept": "text/html"})
    assert response.code == 302


@pytest.mark.parametrize(
    ("method", "headers", "data"),
    [
        ("GET", {}, None),
        ("GET", {"Accept": "application/json"}, None),
        ("GET", {"Accept": "*/*", "X-Requested-With": "XMLHttpRequest"}, None),
        ("POST", {"Content-Type": "application/json", "Accept": "text/html"}, b'{"a": 1}'),
        ("PUT", {"Accept": "text/html"}, b"x"),
        ("DELETE", {}, None),
        (
            "GET",
            {"Accept": "text/html", "Upgrade": "websocket", "Connection": "Upgrade"},
            None,
        ),
    ],
)
def test_non_navigation_gets_401_json(
    gate: GateUnderTest, method: str, headers: dict[str, str], data: bytes | None
) -> None:
    """API calls, XHR, POST, WebSocket upgrades: 401 with the contract's small JSON body."""
    response = gate.request(method, "/api/thing", headers=headers, data=data)
    assert response.code == 401
    assert response.header("content-type") == "application/json"
    assert response.json() == {"error": "login required", "login": "/.pingated/login"}
    assert gate.upstream.seen == []


@pytest.mark.parametrize(
    "cookie",
    [
        "pingated=",
        "pingated=garbage",
        "pingated=1.abc.1.99999999999.sig",
        "other=1",
    ],
)
def test_bad_cookie_is_no_session(gate: GateUnderTest, cookie: str) -> None:
    """A missing, empty or forged cookie is no session."""
    response = gate.request("GET", "/api", headers={"Cookie": cookie})
    assert response.code == 401


def test_login_page(gate: GateUnderTest) -> None:
    """The PIN page is a self-contained HTML form carrying the safe next."""
    response = gate.request("GET", "/.pingated/login?next=%2Fapp%3Fx%3D1")
    assert response.code == 200
    assert response.header("content-type") == "text/html; charset=utf-8"
    assert b'name="pin"' in response.body
    assert b'value="/app?x=1"' in response.body
    assert response.header("x-frame-options") == "DENY"
    hostile = gate.request("GET", "/.pingated/login?next=%2F%2Fevil.com")
    assert b"evil.com" not in hostile.body


def test_health(gate: GateUnderTest) -> None:
    """Health needs no session."""
    gate.clock.advance(42)
    response = gate.request("GET", "/.pingated/health")
    assert response.code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["uptime_seconds"] == 42


# -- login ------------------------------------------------------------------------


def test_login_right_pin(gate: GateUnderTest) -> None:
    """Right PIN: 303 to next with the session cookie and its contract flags (plain http)."""
    response = gate.login(next_target="/app?x=1")
    assert response.code == 303
    assert response.header("location") == "/app?x=1"
    (set_cookie,) = _set_cookies(response)
    flags = _flags(set_cookie)
    assert "httponly" in flags
    assert flags["samesite"].lower() == "lax"
    assert flags["path"] == "/"
    assert flags["max-age"] == "3600"
    assert "secure" not in flags
    assert "domain" not in flags
    assert gate.config.gate.secret.decode() not in set_cookie


def test_login_hostile_next(gate: GateUnderTest) -> None:
    """A hostile next is replaced by / after a right PIN."""
    for hostile in ("//evil.com", "https://evil.com", "/\\evil.com", "javascript:alert(1)"):
        response = gate.login(next_target=hostile)
        assert response.code == 303
        assert response.header("location") == "/"


def test_login_secure_from_trusted_proxy(gate: GateUnderTest) -> None:
    """X-Forwarded-Proto: https from a trusted proxy makes the cookie Secure (and adds HSTS)."""
    response = gate.login(**{"X-Forwarded-Proto": "https"})
    assert response.code == 303
    (set_cookie,) = _set_cookies(response)
    assert "secure" in _flags(set_cookie)
    assert response.header("strict-transport-security") is not None


def test_login_forwarded_proto_ignored_from_untrusted(untrusted_gate: GateUnderTest) -> None:
    """The same header from an untrusted peer changes nothing."""
    response = untrusted_gate.login(**{"X-Forwarded-Proto": "https"})
    assert response.code == 303
    (set_cookie,) = _set_cookies(response)
    assert "secure" not in _flags(set_cookie)


def test_login_cookie_domain(tmp_path: Path) -> None:
    """With cookie_domain set, the cookie carries Domain."""
    gate = build_gate(tmp_path, extra_gate='cookie_domain = ".example.com"')
    (set_cookie,) = _set_cookies(gate.login())
    assert _flags(set_cookie)["domain"] == ".example.com"


def test_login_wrong_pin(gate: GateUnderTest) -> None:
    """Wrong PIN: 303 back to the login page with an error, next kept, no cookie."""
    response = gate.login(pin="135790", next_target="/app?x=1")
    assert response.code == 303
    assert _set_cookies(response) == []
    location = response.header("location")
    assert location is not None
    parts = urlsplit(location)
    assert parts.path == "/.pingated/login"
    assert parse_qs(parts.query) == {"next": ["/app?x=1"], "error": ["pin"]}
    page = gate.request("GET", location)
    assert b"Wrong PIN" in page.body


@pytest.mark.parametrize("pin", ["", " ", "2468100", "x" * 200])
def test_login_odd_pins(gate: GateUnderTest, pin: str) -> None:
    """Empty, padded and oversized PINs are just wrong."""
    response = gate.login(pin=pin)
    assert response.code == 303
    assert _set_cookies(response) == []


def test_login_throttled(gate: GateUnderTest) -> None:
    """After max_failures wrong PINs: 429 with Retry-After, even for the right PIN."""
    for _ in range(gate.config.gate.throttle.max_failures):
        assert gate.login(pin="135790").code == 303
    response = gate.login(pin=PIN)
    assert response.code == 429
    assert int(response.header("retry-after") or 0) > 0
    assert _set_cookies(response) == []
    gate.clock.advance(gate.config.gate.throttle.lockout + 1)
    assert gate.login(pin=PIN).code == 303


# -- with a session -----------------------------------------------------------------


def test_cookie_lets_request_through(gate: GateUnderTest) -> None:
    """A valid cookie: proxied, the query byte for byte, upstream Set-Cookies intact."""
    cookie = gate.cookie()
    response = gate.request("GET", "/api/x?b=2&a=1&b=%2F", headers={"Cookie": f"pingated={cookie}"})
    assert response.code == 200
    seen = response.json()
    assert seen["uri"] == "/api/x?b=2&a=1&b=%2F"
    assert response.headers["set-cookie"] == ["up1=a; Path=/", "up2=b; Path=/; HttpOnly"]


def _upstream_headers(response: Response) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        headers.setdefault(name, []).append(value)
    return headers


def test_gate_cookie_stripped_before_upstream(gate: GateUnderTest) -> None:
    """The upstream never sees the gate's cookie; other cookies reach it."""
    cookie = gate.cookie()
    response = gate.request(
        "GET", "/", headers={"Cookie": f"theme=dark; pingated={cookie}; lang=en"}
    )
    assert response.code == 200
    seen = _upstream_headers(response)
    assert seen["cookie"] == ["theme=dark; lang=en"]
    assert cookie not in response.body.decode()


def test_only_gate_cookie_removes_header(gate: GateUnderTest) -> None:
    """When the gate's cookie was the only one, no Cookie header goes upstream."""
    cookie = gate.cookie()
    response = gate.request("GET", "/", headers={"Cookie": f"pingated={cookie}"})
    assert "cookie" not in _upstream_headers(response)


def test_identity_and_forwarding_headers_upstream(untrusted_gate: GateUnderTest) -> None:
    """Identity headers replace client copies; forwarding headers come from the real peer."""
    gate = untrusted_gate
    cookie = gate.cookie()
    response = gate.request(
        "GET",
        "/",
        headers={
            "Cookie": f"pingated={cookie}",
            "X-Trusted-User": "mallory@evil.com",
            "X_Trusted_User": "mallory@evil.com",
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Proto": "https",
            "X-Real-IP": "6.6.6.6",
            "Connection": "X-Hop",
            "X-Hop": "1",
        },
    )
    seen = _upstream_headers(response)
    assert seen["x-trusted-user"] == ["owner@example.com"]
    assert "x_trusted_user" not in seen
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-real-ip"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["host"] == ["upstream.test:3050"]
    assert "x-hop" not in seen
    assert "mallory" not in response.body.decode()


def test_trusted_proxy_forwarding_headers(gate: GateUnderTest) -> None:
    """From a trusted peer the chain is extended and the client address believed."""
    cookie = gate.cookie()
    response = gate.request(
        "GET",
        "/",
        headers={
            "Cookie": f"pingated={cookie}",
            "X-Forwarded-For": "198.51.100.9",
            "X-Forwarded-Proto": "https",
        },
    )
    seen = _upstream_headers(response)
    assert seen["x-forwarded-for"] == ["198.51.100.9, 127.0.0.1"]
    assert seen["x-real-ip"] == ["198.51.100.9"]
    assert seen["x-forwarded-proto"] == ["https"]


def test_expired_cookie(gate: GateUnderTest) -> None:
    """After session_ttl the cookie is no session."""
    cookie = gate.cookie()
    gate.clock.advance(3599)
    assert gate.request("GET", "/", headers={"Cookie": f"pingated={cookie}"}).code == 200
    gate.clock.advance(1)
    assert gate.request("GET", "/", headers={"Cookie": f"pingated={cookie}"}).code == 401


def test_tampered_cookie(gate: GateUnderTest) -> None:
    """A cookie with its expiry pushed out is no session."""
    cookie = gate.cookie()
    version, sid, issued, expires, signature = cookie.split(".")
    forged = ".".join([version, sid, issued, str(int(expires) + 10**6), signature])
    assert gate.request("GET", "/", headers={"Cookie": f"pingated={forged}"}).code == 401


# -- logout -----------------------------------------------------------------------------


def test_logout_revokes(gate: GateUnderTest, tmp_path: Path) -> None:
    """Logout clears the cookie, revokes it server-side (on disk too), 303 to login."""
    cookie = gate.cookie()
    assert gate.request("GET", "/", headers={"Cookie": f"pingated={cookie}"}).code == 200
    response = gate.request("POST", "/.pingated/logout", headers={"Cookie": f"pingated={cookie}"})
    assert response.code == 303
    assert response.header("location") == "/.pingated/login"
    (cleared,) = _set_cookies(response)
    assert cleared.startswith("pingated=;")
    assert _flags(cleared)["max-age"] == "0"
    # The old cookie, replayed, no longer works.
    assert gate.request("GET", "/", headers={"Cookie": f"pingated={cookie}"}).code == 401
    sid = cookie.split(".")[1]
    assert sid in (gate.state_dir / "revoked-sessions.jsonl").read_text()
    # A restart (same state_dir) still refuses it; another session still works.
    other = gate.cookie()
    restarted = build_gate(tmp_path)
    assert restarted.request("GET", "/", headers={"Cookie": f"pingated={cookie}"}).code == 401
    assert restarted.request("GET", "/", headers={"Cookie": f"pingated={other}"}).code == 200


def test_logout_without_session(gate: GateUnderTest) -> None:
    """Logout with no session still clears the cookie and redirects."""
    response = gate.request("GET", "/.pingated/logout")
    assert response.code == 303
    assert response.header("location") == "/.pingated/login"
    (cleared,) = _set_cookies(response)
    assert _flags(cleared)["max-age"] == "0"


def test_unknown_gate_page(gate: GateUnderTest) -> None:
    """Unknown pages under the prefix: small JSON 404, never proxied, no traceback."""
    response = gate.request("GET", "/.pingated/nope")
    assert response.code == 404
    assert response.header("content-type") == "application/json"
    assert b"Traceback" not in response.body
    assert gate.upstream.seen == []


def test_pin_verifier_survives_rebuilds(tmp_path: Path) -> None:
    """
    A SIGHUP rebuild keeps the one PIN verifier (only its hash changes), so the
    bound on PIN checks in flight cannot be doubled by reloading mid-flood.
    """
    clock = Clock()
    runtime = Runtime(
        reactor=clock,
        clock=clock,
        run_in_thread=run_inline,
        agent_for=lambda upstream: RequestTraversalAgent(EchoUpstream()),
        revocations=RevocationStore.load(str(tmp_path / "state"), run_inline, 0),
        throttle=Throttle(ThrottleConfig(), clock),
        started=0,
    )
    first = runtime.pin_verifier("hash-one")
    first._pending = first.max_pending
    second = runtime.pin_verifier("hash-two")
    assert second is first
    assert second.pin_hash == "hash-two"
    assert second.pending == second.max_pending
