"""
Tests for the LLM route (contract section 4a): L{pingated.llm}.

The integration tests run the real C{twistd pingated} process in front of
L{fake_openai}, an OpenAI-compatible server that only accepts the master key,
and cover every bullet of 4a.  The unit tests drive the pieces in memory.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fake_openai import ScriptedUpstream, openai_routes
from harness import Gate, Response, base_config, free_port, pin_hash
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request

from pingated.config import LlmConfig, parse_config
from pingated.gate import GateContext
from pingated.llm import (
    KeyMasker,
    LlmResource,
    LlmRoute,
    mask_headers,
    normalize_origin,
    remove_client_keys,
    strip_prefix,
)
from pingated.pins import PinVerifier
from pingated.sessions import RevocationStore, SessionManager
from pingated.threads import run_inline
from pingated.throttle import Throttle

MASTER_KEY = "sk-master-7f3a9c21e4b84d06a5c1"
ALLOWED = "https://chat.example.com"


@pytest.fixture(scope="module")
def shared_openai() -> Iterator[ScriptedUpstream]:
    """One fake OpenAI server for the module (reset before each test)."""
    upstream = ScriptedUpstream(openai_routes(MASTER_KEY)).start()
    yield upstream
    upstream.stop()


@pytest.fixture
def fake_openai(shared_openai: ScriptedUpstream) -> ScriptedUpstream:
    with shared_openai.lock:
        shared_openai.requests.clear()
    shared_openai.release.clear()
    shared_openai.released_in_time = None
    return shared_openai


def llm_settings(upstream: str, **extra: Any) -> dict[str, Any]:
    settings = {
        "enabled": True,
        "path": "/api/llm",
        "upstream": upstream,
        "master_key": MASTER_KEY,
        "allowed_origins": [ALLOWED],
    }
    settings.update(extra)
    return settings


@pytest.fixture(scope="module")
def llm_gate(
    tmp_path_factory: Any, upstream_url: str, shared_openai: ScriptedUpstream
) -> Iterator[Gate]:
    """One real gate process with the LLM route for the module; stopped by pid at the end."""
    workdir = tmp_path_factory.mktemp("llm-gate")
    port = free_port()
    config = base_config(str(workdir / "state"), port, upstream_url)
    config["llm"] = llm_settings(shared_openai.url)
    gate = Gate(str(workdir), config, port)
    try:
        yield gate.start()
    finally:
        gate.stop()


_COOKIES: dict[tuple[str, int], str] = {}


def _cookie(gate: Gate) -> str:
    """A session cookie for C{gate}, logging in once per gate (argon2 is slow by design)."""
    key = (gate.workdir, gate.port)
    if key not in _COOKIES:
        _COOKIES[key] = f"pingated={gate.login()}"
    return _COOKIES[key]


def _no_key(response: Response) -> None:
    """The master key appears nowhere in what the client received."""
    blob = response.body + b"".join(f"{k}: {v}".encode() for k, v in response.headers)
    assert MASTER_KEY.encode() not in blob


# --- forwarding ------------------------------------------------------------------


def test_path_and_query_forwarded_byte_for_byte(
    llm_gate: Gate, fake_openai: ScriptedUpstream
) -> None:
    """<llm.path>/<rest>?<query> reaches <llm.upstream>/<rest>?<query> unchanged."""
    cookie = _cookie(llm_gate)
    query = "b=2&a=1&a=%2F&empty=&flag"
    response = llm_gate.request("GET", f"/api/llm/v1/models?{query}", headers={"Cookie": cookie})
    assert response.status == 200, response.body
    assert response.json()["data"][0]["id"] == "fake-gpt"
    (seen,) = fake_openai.seen("/v1/models")
    assert seen.target == f"/v1/models?{query}"
    # The gate's cookie is not passed on; other cookies would be.
    assert "pingated=" not in (seen.header("cookie") or "")
    _no_key(response)


def test_route_boundary_is_a_whole_segment(llm_gate: Gate, fake_openai: ScriptedUpstream) -> None:
    """/api/llmx is not the LLM route: it goes to the normal upstream, without the key."""
    cookie = _cookie(llm_gate)
    response = llm_gate.request("GET", "/api/llmx/echo", headers={"Cookie": cookie})
    assert fake_openai.requests == []
    assert MASTER_KEY.encode() not in response.body


def test_post_completion(llm_gate: Gate, fake_openai: ScriptedUpstream) -> None:
    """A non-streamed chat completion works end to end with the injected key."""
    body = json.dumps({"model": "fake-gpt", "messages": [{"role": "user", "content": "hi"}]})
    response = llm_gate.request(
        "POST",
        "/api/llm/v1/chat/completions",
        body.encode(),
        {"Cookie": _cookie(llm_gate), "Content-Type": "application/json"},
    )
    assert response.status == 200, response.body
    assert response.json()["choices"][0]["message"]["content"] == "Hello from the fake model."
    (seen,) = fake_openai.seen("/v1/chat/completions")
    assert json.loads(seen.body)["messages"][0]["content"] == "hi"


# --- session ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"},  # a browser navigation
        {"Accept": "application/json"},
        {"Cookie": "pingated=forged.value.here", "Accept": "text/html"},
    ],
)
def test_no_session_is_401_json_never_a_redirect(
    llm_gate: Gate, fake_openai: ScriptedUpstream, headers: dict[str, str]
) -> None:
    """Without a valid session: 401 JSON (even for a navigation), nothing forwarded."""
    response = llm_gate.request("GET", "/api/llm/v1/models", headers=headers)
    assert response.status == 401
    assert response.header("location") is None
    assert response.json() == {"error": "login required", "login": "/.pingated/login"}
    assert fake_openai.requests == []


# --- Origin ----------------------------------------------------------------------


def test_foreign_origin_is_refused_and_nothing_forwarded(
    llm_gate: Gate, fake_openai: ScriptedUpstream
) -> None:
    """An Origin that is neither the gate's nor allowed: 403, no CORS headers, no request."""
    cookie = _cookie(llm_gate)
    for origin in ("https://evil.example.net", "null", f"https://127.0.0.1:{llm_gate.port}"):
        response = llm_gate.request(
            "POST",
            "/api/llm/v1/chat/completions",
            b'{"model": "fake-gpt", "messages": []}',
            {"Cookie": cookie, "Origin": origin, "Content-Type": "application/json"},
        )
        assert response.status == 403, origin
        assert not [k for k, _ in response.headers if k.lower().startswith("access-control-")]
    assert fake_openai.requests == []


def test_allowed_origin_gets_credentials_cors(
    llm_gate: Gate, fake_openai: ScriptedUpstream
) -> None:
    """An allowed cross-origin caller gets ACAO=<origin> + ACAC; the upstream's '*' is gone."""
    response = llm_gate.request(
        "GET", "/api/llm/v1/models", headers={"Cookie": _cookie(llm_gate), "Origin": ALLOWED}
    )
    assert response.status == 200
    assert response.all("access-control-allow-origin") == [ALLOWED]
    assert response.all("access-control-allow-credentials") == ["true"]
    assert "origin" in (response.header("vary") or "").lower()
    # Even the 401 for a missing session is readable by the allowed page.
    response = llm_gate.request("GET", "/api/llm/v1/models", headers={"Origin": ALLOWED})
    assert response.status == 401
    assert response.all("access-control-allow-origin") == [ALLOWED]


def test_own_origin_and_no_origin_are_accepted(
    llm_gate: Gate, fake_openai: ScriptedUpstream
) -> None:
    """The gate's own origin (and requests without Origin, e.g. curl) pass."""
    cookie = _cookie(llm_gate)
    own = llm_gate.request(
        "GET", "/api/llm/v1/models", headers={"Cookie": cookie, "Origin": llm_gate.url}
    )
    assert own.status == 200
    assert own.all("access-control-allow-origin") == [llm_gate.url]
    plain = llm_gate.request("GET", "/api/llm/v1/models", headers={"Cookie": cookie})
    assert plain.status == 200
    # The upstream's wildcard CORS header never reaches anyone.
    assert plain.header("access-control-allow-origin") is None


# --- the key ---------------------------------------------------------------------


def test_client_credentials_replaced_by_master_key(
    llm_gate: Gate, fake_openai: ScriptedUpstream
) -> None:
    """Every client Authorization (and API-key header) is removed; only the master key goes up."""
    response = llm_gate.request(
        "GET",
        "/api/llm/v1/echo",
        headers={
            "Cookie": _cookie(llm_gate),
            "Authorization": "Bearer sk-client-supplied",
            "X-Api-Key": "client-key",
            "x_litellm_api_key": "client-key-2",
        },
    )
    assert response.status == 200
    (seen,) = fake_openai.seen("/v1/echo")
    assert seen.all("authorization") == [f"Bearer {MASTER_KEY}"]
    names = {k.lower() for k, _ in seen.headers}
    assert not names & {"x-api-key", "x_litellm_api_key", "x-litellm-api-key"}


def test_reflected_key_is_masked(llm_gate: Gate, fake_openai: ScriptedUpstream) -> None:
    """An upstream echoing Authorization back (header and body) does not leak the key."""
    response = llm_gate.request("GET", "/api/llm/v1/echo", headers={"Cookie": _cookie(llm_gate)})
    assert response.status == 200
    _no_key(response)
    masked = "Bearer " + "*" * len(MASTER_KEY)
    assert response.header("x-echo-authorization") == masked
    assert masked in response.body.decode()
    # Same length: Content-Length still matches the body.
    assert int(response.header("content-length") or -1) == len(response.body)
    # Also when the key is split across many small chunks.
    response = llm_gate.request(
        "GET", "/api/llm/v1/slow-echo", headers={"Cookie": _cookie(llm_gate)}
    )
    assert response.status == 200
    _no_key(response)
    assert json.loads(response.body) == {"auth": masked}


def test_key_not_in_logs_or_error_pages(gate_factory: Any) -> None:
    """An unreachable LLM upstream: 502 without the key; the key never reaches the log."""
    gate = gate_factory(llm=llm_settings(f"http://127.0.0.1:{free_port()}"))
    cookie = _cookie(gate)
    for accept in ("text/html", "application/json"):
        response = gate.request(
            "GET", "/api/llm/v1/models", headers={"Cookie": cookie, "Accept": accept}
        )
        assert response.status == 502
        _no_key(response)
    gate.stop()
    assert gate.process is not None
    with open(gate.process.log_path, encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "502" in log  # the failures were logged ...
    assert MASTER_KEY not in log  # ... without the key


# --- preflight -------------------------------------------------------------------


def test_preflight_for_allowed_origin(llm_gate: Gate, fake_openai: ScriptedUpstream) -> None:
    """OPTIONS from an allowed origin: answered by the gate (no cookie needed), 204 + CORS."""
    response = llm_gate.request(
        "OPTIONS",
        "/api/llm/v1/chat/completions",
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        },
    )
    assert response.status == 204
    assert response.header("access-control-allow-origin") == ALLOWED
    assert response.header("access-control-allow-credentials") == "true"
    assert "POST" in (response.header("access-control-allow-methods") or "")
    assert response.header("access-control-allow-headers") == "content-type, authorization"
    assert response.header("vary") == "Origin"
    assert response.body == b""
    assert fake_openai.requests == []


def test_preflight_for_other_origin_is_403_without_cors(
    llm_gate: Gate, fake_openai: ScriptedUpstream
) -> None:
    """OPTIONS from any other origin: 403 and not a single CORS header."""
    response = llm_gate.request(
        "OPTIONS",
        "/api/llm/v1/chat/completions",
        headers={
            "Origin": "https://evil.example.net",
            "Access-Control-Request-Method": "POST",
            "Cookie": _cookie(llm_gate),
        },
    )
    assert response.status == 403
    assert not [k for k, _ in response.headers if k.lower().startswith("access-control-")]
    assert fake_openai.requests == []


# --- streaming -------------------------------------------------------------------


def test_streamed_completion_arrives_chunk_by_chunk(
    llm_gate: Gate, fake_openai: ScriptedUpstream
) -> None:
    """
    The first SSE event reaches the client while the upstream is still holding
    back the rest (it waits for this test's go-ahead before sending more).
    """
    cookie = _cookie(llm_gate)
    conn = http.client.HTTPConnection("127.0.0.1", llm_gate.port, timeout=30)
    try:
        body = json.dumps({"model": "fake-gpt", "stream": True, "messages": []})
        conn.request(
            "POST",
            "/api/llm/v1/chat/completions",
            body=body,
            headers={"Cookie": cookie, "Content-Type": "application/json", "Origin": ALLOWED},
        )
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-type", "").startswith("text/event-stream")
        assert response.getheader("access-control-allow-origin") == ALLOWED
        first = b""
        while b"\n\n" not in first:
            piece = response.read1(65536)
            assert piece, "stream ended before the first event"
            first += piece
        # The upstream has not sent its last chunk yet: it is waiting for us.
        assert fake_openai.released_in_time is None
        assert b'"Hello"' in first
        fake_openai.release.set()
        rest = response.read()
    finally:
        conn.close()
    assert fake_openai.released_in_time is True
    text = (first + rest).decode()
    assert text.rstrip().endswith("data: [DONE]")
    contents = [
        json.loads(line[6:])["choices"][0]["delta"]["content"]
        for line in text.splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(contents) == "Hello from the fake model."
    assert MASTER_KEY not in text


def test_llm_route_disabled_is_plain_proxy(
    gate_factory: Any, fake_openai: ScriptedUpstream
) -> None:
    """With llm.enabled = false there is no route: the path belongs to the main upstream."""
    gate = gate_factory(llm=llm_settings(fake_openai.url, enabled=False))
    response = gate.request("GET", "/api/llm/v1/models", headers={"Cookie": _cookie(gate)})
    assert fake_openai.requests == []
    assert MASTER_KEY.encode() not in response.body


# --- unit tests --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        ("https://Chat.Example.com", "https://chat.example.com"),
        ("https://chat.example.com:443", "https://chat.example.com"),
        ("http://chat.example.com:80/", "http://chat.example.com"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("null", None),
        ("file://", None),
        ("https://chat.example.com/path", None),
        ("https://user@chat.example.com", None),
        ("https://chat.example.com:99999", None),
        ("", None),
    ],
)
def test_normalize_origin(origin: str, expected: str | None) -> None:
    """Origins compare in canonical form; anything else is never allowed."""
    assert normalize_origin(origin) == expected


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (b"/api/llm/v1/models", b"/v1/models"),
        (b"/api/llm/v1/chat?a=1&a=2", b"/v1/chat?a=1&a=2"),
        (b"/api/llm", b"/"),
        (b"/api/llm?x", b"/?x"),
        (b"/api/llm/", b"/"),
        (b"http://gate.example.com/api/llm/v1/x?q=1", b"/v1/x?q=1"),
        (b"/api/llmx", None),
        (b"/other", None),
    ],
)
def test_strip_prefix(uri: bytes, expected: bytes | None) -> None:
    """The route prefix comes off whole segments only; the query is untouched."""
    assert strip_prefix(uri, b"/api/llm") == expected


@given(st.binary(max_size=60), st.binary(max_size=60), st.lists(st.integers(0, 200), max_size=8))
def test_key_masker_any_split(before: bytes, after: bytes, cuts: list[int]) -> None:
    """However the stream is chunked, the secret never survives and nothing else changes."""
    secret = b"sk-secret-key"
    stream = before + secret + after + secret
    masker = KeyMasker(secret)
    points = sorted({min(c, len(stream)) for c in cuts})
    out = b""
    start = 0
    for point in [*points, len(stream)]:
        out += masker.feed(stream[start:point])
        start = point
    out += masker.flush()
    assert secret not in out
    assert len(out) == len(stream)
    assert out == stream.replace(secret, b"*" * len(secret))


def test_key_masker_holds_only_possible_prefixes() -> None:
    """An SSE event ending in a newline is passed on whole, not held back."""
    masker = KeyMasker(b"sk-abc")
    assert masker.feed(b"data: x\n\n") == b"data: x\n\n"
    assert masker.feed(b"partial s") == b"partial "
    assert masker.feed(b"k-") == b""
    assert masker.feed(b"xyz") == b"sk-xyz"
    assert masker.feed(b"sk-abc!") == b"******!"


def test_remove_client_keys_and_mask_headers() -> None:
    """All spellings of client key headers go; a reflected key in a header is masked."""
    headers = Headers(
        {
            b"Authorization": [b"Bearer a"],
            b"X_Api_Key": [b"b"],
            b"x-litellm-api-key": [b"c"],
            b"X-Other": [b"kept"],
        }
    )
    remove_client_keys(headers)
    assert [n.lower() for n, _ in headers.getAllRawHeaders()] == [b"x-other"]
    response = Headers({b"X-Echo": [b"Bearer sk-1"], b"X-Fine": [b"ok"]})
    mask_headers(response, b"sk-1")
    assert response.getRawHeaders(b"x-echo") == [b"Bearer ****"]
    assert response.getRawHeaders(b"x-fine") == [b"ok"]


class _Recorder(Resource):
    """Stands in for the LLM proxy: records what would be sent upstream."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, list[bytes]]] = []

    def render(self, request: Request) -> bytes:
        self.seen.append(
            (request.uri, request.path, request.requestHeaders.getRawHeaders(b"authorization", []))
        )
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"access-control-allow-origin", b"*")
        return b'{"echo": "Bearer ' + MASTER_KEY.encode() + b'"}'


class _Fallback(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return b"fallback"


def _unit_route(tmp_path: Any) -> tuple[StubTreq, _Recorder, SessionManager]:
    text = f"""
[server]
state_dir = "{tmp_path}"
[gate]
pin_hash = "{pin_hash()}"
secret = "{"s" * 40}"
[upstream]
url = "http://127.0.0.1:1"
"""
    config = parse_config(text, "unit.toml")
    clock = Clock()
    clock.advance(1_800_000_000)
    sessions = SessionManager(
        secret=config.gate.secret,
        previous_secrets=(),
        ttl=3600,
        clock=clock,
        revocations=RevocationStore.load(str(tmp_path), run_inline, clock.seconds()),
    )
    context = GateContext(
        gate=config.gate,
        sessions=sessions,
        verifier=PinVerifier(config.gate.pin_hash, run_inline),
        throttle=Throttle(config.gate.throttle, clock),
        trusted=config.server.trusted_proxies,
        clock=clock,
        started=clock.seconds(),
    )
    recorder = _Recorder()
    llm = LlmResource(
        LlmConfig(enabled=True, master_key=MASTER_KEY, allowed_origins=(ALLOWED,)),
        context,
        recorder,
    )
    return StubTreq(LlmRoute("/api/llm", llm, _Fallback())), recorder, sessions


def test_unit_wrapper_alone(tmp_path: Any) -> None:
    """LlmResource composes with any inner resource: key injected, CORS owned, key masked."""
    stub, recorder, sessions = _unit_route(tmp_path)
    _, cookie = sessions.issue()
    response = stub.get(
        "http://gate.test/api/llm/v1/models?x=1",
        headers={"Cookie": f"pingated={cookie}", "Origin": ALLOWED, "Authorization": "x"},
    )
    stub.flush()
    result = _done(response)
    body = _done(stub.content(result))
    assert result.code == 200
    assert recorder.seen == [(b"/v1/models?x=1", b"/v1/models", [f"Bearer {MASTER_KEY}".encode()])]
    assert result.headers.getRawHeaders(b"access-control-allow-origin") == [ALLOWED.encode()]
    assert MASTER_KEY.encode() not in body
    other = _done(stub.get("http://gate.test/elsewhere"))
    assert _done(stub.content(other)) == b"fallback"


def test_unit_preflight_needs_no_session(tmp_path: Any) -> None:
    """The preflight is answered without a cookie and without touching the inner resource."""
    stub, recorder, _ = _unit_route(tmp_path)
    result = _done(
        stub.request(
            "OPTIONS",
            "http://gate.test/api/llm/v1/chat/completions",
            headers={"Origin": ALLOWED, "Access-Control-Request-Headers": "content-type"},
        )
    )
    assert result.code == 204
    assert result.headers.getRawHeaders(b"access-control-allow-headers") == [b"content-type"]
    assert recorder.seen == []
    bad = _done(
        stub.request(
            "OPTIONS",
            "http://gate.test/api/llm/v1/chat/completions",
            headers={"Origin": ALLOWED, "Access-Control-Request-Headers": "a\x01b"},
        )
    )
    assert bad.headers.getRawHeaders(b"access-control-allow-headers") is None


def _done(d: Any) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "deferred has not fired"
    value = results[0]
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value


def test_config_rejects_bad_llm_settings(tmp_path: Any) -> None:
    """Bad origins, a path that would swallow the site, a key with spaces: one clear line."""
    base = f"""
[server]
state_dir = "{tmp_path}"
[gate]
pin_hash = "{pin_hash()}"
secret = "{"s" * 40}"
[upstream]
url = "http://127.0.0.1:1"
[llm]
enabled = true
"""
    cases = {
        'master_key = "sk-1"\nallowed_origins = ["https://ok.example.com/path"]': (
            "llm.allowed_origins"
        ),
        'master_key = "sk-1"\npath = "/"': "llm.path",
        'master_key = "sk-1"\npath = "/.pingated/llm"': "llm.path",
        'master_key = "sk 1"': "llm.master_key",
    }
    from pingated.config import ConfigError

    for extra, key in cases.items():
        with pytest.raises(ConfigError) as caught:
            parse_config(base + extra, "x.toml")
        assert f"x.toml: {key}:" in str(caught.value)
        assert "sk 1" not in str(caught.value)
