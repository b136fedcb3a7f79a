"""
In-memory security tests of the gate's pages (L{pingated.gate}) as built by
L{pingated.app.build_root}: throttling as the login handler applies it,
the bounded PIN verifier, security headers and HSTS, and the log lines
fail2ban reads.

Driven with L{StubTreq} (its peer is 127.0.0.1); time is a L{Clock}; PIN
checks run inline or through a hand-driven fake thread, so the tests can
hold checks "in flight".  A cheap argon2 hash keeps each check fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from argon2 import PasswordHasher
from doubles import HeldThreads, SeenResponse, settle
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from pingated.app import Runtime, build_root
from pingated.config import Config, parse_config
from pingated.sessions import RevocationStore
from pingated.threads import RunInThread, run_inline
from pingated.throttle import Throttle

PIN = "274915"
CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PIN_HASH = CHEAP.hash(PIN)
SECRET = "security-test-secret-0123456789abcdefghijkl"
START = 1_700_000_000.0
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class CountingUpstream(Resource):
    """Counts what reaches it: nothing refused by the gate may."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    def render(self, request: IRequest) -> bytes:
        self.hits += 1
        request.setHeader(b"content-type", b"text/plain")
        return b"upstream"


@attrs.define
class MemoryGate:
    """A whole gate tree with fakes for time, threads and the upstream."""

    root: IResource
    clock: Clock
    config: Config
    throttle: Throttle
    upstream: CountingUpstream
    upstream_agent: RequestTraversalAgent
    client: StubTreq | None = None

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        data: bytes | dict[str, str] | None = None,
        wait: bool = True,
    ) -> Deferred[SeenResponse] | SeenResponse:
        """One request; with C{wait=False} the Deferred (the check may be in flight)."""
        client = StubTreq(self.root)
        self.client = client
        d: Deferred[Any] = client.request(
            method,
            "http://gate.test" + path,
            headers={k: [v] for k, v in (headers or {}).items()},
            data=data,
            allow_redirects=False,
        )

        def read(response: Any) -> Deferred[SeenResponse]:
            names = {
                name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
                for name, values in response.headers.getAllRawHeaders()
            }
            return response.content().addCallback(
                lambda body: SeenResponse(response.code, names, body)
            )

        d.addCallback(read)
        if not wait:
            return d
        return settle(d, client, self.upstream_agent)

    def get(self, path: str, **headers: str) -> SeenResponse:
        answer = self.request("GET", path, headers=headers)
        assert isinstance(answer, SeenResponse)
        return answer

    def login(self, pin: str, **headers: str) -> SeenResponse:
        answer = self.request(
            "POST", "/.pingated/login", headers={**FORM, **headers}, data={"pin": pin, "next": "/"}
        )
        assert isinstance(answer, SeenResponse)
        return answer


def config_text(trusted: str = '["127.0.0.1/32"]', gate: str = "", throttle: str = "") -> str:
    """A small valid configuration; C{gate} and C{throttle} add keys to those tables."""
    return f"""
[server]
listen = ["tcp:0:interface=127.0.0.1"]
trusted_proxies = {trusted}
state_dir = "state"

[gate]
pin_hash = "{PIN_HASH}"
secret = "{SECRET}"
{gate}

[gate.throttle]
{throttle}

[upstream]
url = "http://upstream.test:3050"
"""


def make_gate(
    tmp_path: Path,
    text: str | None = None,
    verify_in_thread: RunInThread | None = None,
) -> MemoryGate:
    """Build the tree from config text, with inline threads unless told otherwise."""
    config = parse_config(text or config_text(), str(tmp_path / "pingated.toml"))
    clock = Clock()
    clock.advance(START)
    upstream = CountingUpstream()
    agent = RequestTraversalAgent(upstream)
    throttle = Throttle(config.gate.throttle, clock)
    runtime = Runtime(
        reactor=clock,
        clock=clock,
        run_in_thread=run_inline,
        agent_for=lambda _: agent,
        revocations=RevocationStore.load(config.server.state_dir, run_inline, START),
        throttle=throttle,
        started=START,
        verify_in_thread=verify_in_thread,
    )
    return MemoryGate(build_root(config, runtime), clock, config, throttle, upstream, agent)


@pytest.fixture
def security_log() -> Iterator[list[str]]:
    """The formatted lines logged in the pingated.security namespace during the test."""
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "pingated.security":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


class CountingHasher:
    """Wraps argon2 verification to count how many PINs were really checked."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import pingated.pins as pins

        self.calls = 0
        real = pins._verify

        def counted(pin_hash: str, pin: str) -> bool:
            self.calls += 1
            return real(pin_hash, pin)

        monkeypatch.setattr(pins, "_verify", counted)


# --- throttling through the login handler ---------------------------------------


def test_locked_out_client_gets_429_and_the_pin_is_not_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, security_log: list[str]
) -> None:
    """After max_failures, even the right PIN gets 429 + Retry-After without an argon2 call."""
    gate = make_gate(tmp_path)
    hasher = CountingHasher(monkeypatch)
    for _ in range(5):
        assert gate.login("000001").code == 303
    assert hasher.calls == 5
    answer = gate.login(PIN)
    assert answer.code == 429
    assert answer.header("retry-after") == "900"
    assert "set-cookie" not in answer.headers
    assert hasher.calls == 5  # not even checked
    assert b"Too many attempts" in answer.body
    # JSON clients get JSON.
    answer = gate.request("POST", "/.pingated/login", data=b"{}")
    assert isinstance(answer, SeenResponse)
    assert answer.code == 429
    assert json.loads(answer.body) == {"error": "too many attempts", "retry_after": 900}
    assert (
        security_log[:5]
        == ["pingated[security] login-failed ip=127.0.0.1 path=/.pingated/login"] * 5
    )
    assert security_log[5] == "pingated[security] throttled ip=127.0.0.1 retry_after=900"
    assert security_log[6] == "pingated[security] throttled ip=127.0.0.1 retry_after=900"
    # The lockout expires and the right PIN works again.
    gate.clock.advance(900)
    assert gate.login(PIN).code == 303


def test_forged_forwarded_for_from_untrusted_peer_changes_nothing(
    tmp_path: Path, security_log: list[str]
) -> None:
    """With no trusted proxy, X-Forwarded-For / X-Real-IP cannot pick a fresh address."""
    gate = make_gate(tmp_path, config_text(trusted="[]"))
    for n in range(5):
        answer = gate.login(
            "000001", **{"X-Forwarded-For": f"198.51.100.{n}", "X-Real-IP": f"192.0.2.{n}"}
        )
        assert answer.code == 303
    answer = gate.login(PIN, **{"X-Forwarded-For": "198.51.100.77"})
    assert answer.code == 429
    assert all("ip=127.0.0.1 " in line for line in security_log)


def test_right_pin_resets_the_count(tmp_path: Path) -> None:
    """Four wrong, one right, four wrong: never locked out."""
    gate = make_gate(tmp_path)
    for _ in range(4):
        gate.login("000001")
    assert gate.login(PIN).code == 303
    for _ in range(4):
        assert gate.login("000001").code == 303
    assert gate.login(PIN).code == 303


def test_global_limit_engages_across_many_addresses(tmp_path: Path) -> None:
    """Addresses from a trusted proxy each fail once; the global budget still runs out."""
    gate = make_gate(tmp_path, config_text(throttle="global_max_failures = 10"))
    for n in range(10):
        assert gate.login("000001", **{"X-Forwarded-For": f"203.0.113.{n}"}).code == 303
    answer = gate.login(PIN, **{"X-Forwarded-For": "198.51.100.200"})
    assert answer.code == 429
    assert answer.header("retry-after") == "3600"
    gate.clock.advance(3600)
    assert gate.login(PIN, **{"X-Forwarded-For": "198.51.100.200"}).code == 303


def test_login_page_shows_the_lockout(tmp_path: Path) -> None:
    """GET of the PIN page tells a locked-out visitor how long to wait."""
    gate = make_gate(tmp_path)
    for _ in range(5):
        gate.login("000001")
    page = gate.get("/.pingated/login", Accept="text/html")
    assert page.code == 200
    assert b"Try again in 15 minutes" in page.body


# --- bounded PIN verification -----------------------------------------------------


def test_saturated_verifier_answers_503_at_once(tmp_path: Path) -> None:
    """With max_pending checks in flight, the next login gets 503 + Retry-After, unqueued."""
    threads = HeldThreads()
    gate = make_gate(
        tmp_path,
        config_text(throttle="max_failures = 100\nglobal_max_failures = 100"),
        verify_in_thread=threads,
    )
    pending = [
        gate.request(
            "POST",
            "/.pingated/login",
            headers={**FORM, "X-Forwarded-For": f"203.0.113.{n}"},
            data={"pin": "000001"},
            wait=False,
        )
        for n in range(8)
    ]
    assert gate.client is not None
    gate.client.flush()
    assert len(threads.calls) == 8
    busy = gate.login(PIN, **{"X-Forwarded-For": "198.51.100.1"})
    assert busy.code == 503
    assert busy.header("retry-after") == "1"
    assert len(threads.calls) == 8  # nothing queued behind the running checks
    # Proxied traffic does not wait for the PIN checks either.
    cookie_gate_answer = gate.get("/", Cookie="pingated=nothing")
    assert cookie_gate_answer.code == 401
    threads.release()
    for d in pending:
        assert isinstance(d, Deferred)
    # Once the checks finish, logins are accepted again.
    answer = gate.request("POST", "/.pingated/login", headers=FORM, data={"pin": PIN}, wait=False)
    assert isinstance(answer, Deferred)
    assert gate.client is not None
    gate.client.flush()
    threads.release()
    result = settle(answer, gate.client, gate.upstream_agent)
    assert result.code == 303


def test_checks_in_flight_count_against_the_limit(tmp_path: Path) -> None:
    """Five concurrent guesses from one address use up its budget before any finishes."""
    threads = HeldThreads()
    gate = make_gate(tmp_path, verify_in_thread=threads)
    for _ in range(5):
        gate.request("POST", "/.pingated/login", headers=FORM, data={"pin": "1"}, wait=False)
        assert gate.client is not None
        gate.client.flush()
    assert len(threads.calls) == 5
    answer = gate.login(PIN)
    assert answer.code == 429
    assert answer.header("retry-after") == "1"
    assert len(threads.calls) == 5
    threads.release()
    assert gate.login(PIN).code == 429
    assert gate.throttle.retry_after("127.0.0.1") == 900


# --- security headers ----------------------------------------------------------------


def _assert_security_headers(answer: SeenResponse) -> None:
    csp = answer.header("content-security-policy")
    assert csp is not None
    directives = dict(
        [*part.strip().split(" ", 1), ""][:2] for part in csp.split(";") if part.strip()
    )
    assert directives["frame-ancestors"] == "'none'"
    assert directives["default-src"] == "'none'"
    script = directives.get("script-src", directives["default-src"])
    assert "'unsafe-inline'" not in script and "'unsafe-eval'" not in script
    assert answer.header("x-frame-options") == "DENY"
    assert answer.header("x-content-type-options") == "nosniff"
    assert answer.header("referrer-policy") == "no-referrer"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/.pingated/login"),
        ("GET", "/.pingated/health"),
        ("GET", "/.pingated/no-such-page"),
        ("GET", "/.pingated/logout"),
        ("POST", "/.pingated/login"),
    ],
)
def test_gate_pages_carry_security_headers(tmp_path: Path, method: str, path: str) -> None:
    """Every answer under the prefix (pages, redirects, errors) gets the headers."""
    gate = make_gate(tmp_path)
    answer = gate.request(method, path, headers={"Accept": "text/html", **FORM}, data=b"pin=1")
    assert isinstance(answer, SeenResponse)
    _assert_security_headers(answer)
    assert answer.header("strict-transport-security") is None  # plain HTTP


def test_login_page_has_no_inline_script(tmp_path: Path) -> None:
    """The CSP forbids inline script, so the page must not rely on any."""
    gate = make_gate(tmp_path)
    page = gate.get("/.pingated/login", Accept="text/html").body.decode()
    import re

    for tag in re.findall(r"<script\b[^>]*>", page):
        assert "src=" in tag, tag
    assert not re.search(r"\son[a-z]+\s*=", page, re.IGNORECASE)
    assert "javascript:" not in page.lower()


def test_hsts_only_over_https(tmp_path: Path) -> None:
    """HSTS is sent when the visitor came over TLS (here: via a trusted proxy) and not otherwise."""
    gate = make_gate(tmp_path)
    plain = gate.get("/.pingated/login")
    assert plain.header("strict-transport-security") is None
    secure = gate.get("/.pingated/login", **{"X-Forwarded-Proto": "https"})
    assert secure.header("strict-transport-security") == "max-age=31536000"


def test_hsts_not_believed_from_untrusted_proxy(tmp_path: Path) -> None:
    """A client cannot claim HTTPS for itself."""
    gate = make_gate(tmp_path, config_text(trusted="[]"))
    answer = gate.get("/.pingated/login", **{"X-Forwarded-Proto": "https"})
    assert answer.header("strict-transport-security") is None


def test_hsts_configurable(tmp_path: Path) -> None:
    """gate.hsts_max_age / hsts_include_subdomains shape the header; hsts = false drops it."""
    gate = make_gate(
        tmp_path, config_text(gate='hsts_max_age = "1d"\nhsts_include_subdomains = true')
    )
    answer = gate.get("/.pingated/health", **{"X-Forwarded-Proto": "https"})
    assert answer.header("strict-transport-security") == "max-age=86400; includeSubDomains"
    off = make_gate(tmp_path, config_text(gate="hsts = false"))
    answer = off.get("/.pingated/login", **{"X-Forwarded-Proto": "https"})
    assert answer.header("strict-transport-security") is None
    _assert_security_headers(answer)


def test_hsts_over_direct_tls(tmp_path: Path) -> None:
    """A request that arrived over TLS itself (isSecure) gets HSTS, no proxy involved."""
    from twisted.web.test.requesthelper import DummyRequest

    from pingated.gate import GateHeaders

    gate = make_gate(tmp_path, config_text(trusted="[]"))
    seen: list[Any] = []

    class Page(Resource):
        isLeaf = True

        def render(self, request: IRequest) -> bytes:
            seen.append(request)
            return b"ok"

    # GateHeaders needs the context only for config and is_https.
    context = _context_of(gate)
    wrapper = GateHeaders(Page(), context)
    request = DummyRequest([b""])
    request.isSecure = lambda: True  # type: ignore[method-assign]
    wrapper.render(request)
    assert request.responseHeaders.getRawHeaders(b"strict-transport-security") == [
        b"max-age=31536000"
    ]


def _context_of(gate: MemoryGate) -> Any:
    from pingated.gate import GateContext

    def find(resource: Any, depth: int = 0) -> Any:
        if depth > 6:
            return None
        for value in vars(resource).values():
            if isinstance(value, GateContext):
                return value
            if isinstance(value, Resource):
                found = find(value, depth + 1)
                if found is not None:
                    return found
        return None

    context = find(gate.root)
    assert context is not None
    return context


def test_security_header_values_parse() -> None:
    """The constant itself: names unique and values plain ASCII."""
    from pingated.gate import SECURITY_HEADERS

    names = [name.lower() for name, _ in SECURITY_HEADERS]
    assert len(names) == len(set(names))
    for _, value in SECURITY_HEADERS:
        value.decode("ascii")
        assert b"\r" not in value and b"\n" not in value
