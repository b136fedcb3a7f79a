"""
Tests for several apps behind one gate: C{[[site]]} routing by Host, per-site
settings, and one login for many subdomains (C{gate.cookie_domain}).

Routing rules are driven in memory (L{MemoryGate} from C{test_verify}); the
last tests run the real C{twistd -n pingated} process with Host headers.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import GateFactory
from harness import TEST_PIN, Gate
from test_verify import HTML, MemoryGate, memory_gates

from pingated.app import match_site
from pingated.config import ConfigError, SiteConfig, UpstreamConfig

SITES = """
[upstream]
url = "http://default.invalid"

[[site]]
host = "a.example.test"
upstream = "http://a.invalid"

[[site]]
host = "b.example.test"
upstream = "http://b.invalid"
preserve_host = true
public_paths = ["/api/health", "/static/"]
[site.identity]
headers = { "X-WEBAUTH-USER" = "admin" }

[[site]]
host = "*.example.test"
upstream = "http://wild.invalid"

[[site]]
host = "*.deep.example.test"
upstream = "http://deep.invalid"
"""


@pytest.fixture
def make_gate(tmp_path: Any) -> Any:
    """In-memory gates, as in C{test_verify}."""
    return memory_gates(str(tmp_path))


@pytest.fixture
def sites(make_gate: Any) -> MemoryGate:
    gate: MemoryGate = make_gate(SITES, cookie_domain=".example.test")
    return gate


def _upstream(gate: MemoryGate, host: str, path: str = "/x?q=1", **headers: str) -> Any:
    answer = gate.request(
        "GET", f"http://127.0.0.1{path}", {"Host": host, **headers}, gate.cookie()
    )
    assert answer.code == 200, (host, answer)
    return answer.json()


@pytest.mark.parametrize(
    ("host", "upstream"),
    [
        ("a.example.test", "http://a.invalid"),
        ("A.Example.TEST:8443", "http://a.invalid"),
        ("a.example.test.", "http://a.invalid"),
        ("b.example.test", "http://b.invalid"),
        ("c.example.test", "http://wild.invalid"),
        ("x.y.example.test", "http://wild.invalid"),
        ("q.deep.example.test", "http://deep.invalid"),
        ("example.test", "http://default.invalid"),
        ("other.test", "http://default.invalid"),
        ("127.0.0.1:3060", "http://default.invalid"),
    ],
)
def test_routed_by_host(sites: MemoryGate, host: str, upstream: str) -> None:
    """Exact names first, then the longest matching wildcard, else [upstream]."""
    seen = _upstream(sites, host)
    assert seen["upstream"] == upstream
    assert seen["uri"] == "/x?q=1"


def test_trusted_forwarded_host_routes_untrusted_does_not(make_gate: Any) -> None:
    """A front proxy's X-Forwarded-Host picks the site; from anybody else it is ignored."""
    trusted = make_gate(SITES)
    seen = _upstream(trusted, "127.0.0.1", **{"X-Forwarded-Host": "b.example.test"})
    assert seen["upstream"] == "http://b.invalid"
    untrusted = make_gate(SITES, server='trusted_proxies = ["10.0.0.0/8"]')
    seen = _upstream(untrusted, "127.0.0.1", **{"X-Forwarded-Host": "b.example.test"})
    assert seen["upstream"] == "http://default.invalid"


def test_per_site_preserve_host_and_identity(sites: MemoryGate) -> None:
    """b keeps the client's Host and gets its own identity header; a gets neither."""
    b = _upstream(sites, "b.example.test", **{"X-WEBAUTH-USER": "mallory"})
    assert b["headers"]["host"] == ["b.example.test"]
    assert b["headers"]["x-webauth-user"] == ["admin"]
    a = _upstream(sites, "a.example.test", **{"X-WEBAUTH-USER": "mallory"})
    assert a["headers"]["host"] == ["a.invalid"]
    # a has no identity of its own (and no global one): the name is not the gate's.
    assert a["headers"]["x-webauth-user"] == ["mallory"]


def test_public_paths_per_site(sites: MemoryGate) -> None:
    """A site's public_paths are served without a session, only on that site."""
    for path in ("/api/health", "/api/health/deep", "/static/app.css"):
        public = sites.request("GET", f"http://127.0.0.1{path}", {"Host": "b.example.test"})
        assert public.code == 200, path
        assert public.json()["upstream"] == "http://b.invalid"
    for host, path in [
        ("b.example.test", "/api/healthz"),
        ("b.example.test", "/api/health/../admin"),
        ("b.example.test", "/static/%2e%2e/admin"),
        ("b.example.test", "/"),
        ("a.example.test", "/api/health"),
    ]:
        refused = sites.request("GET", f"http://127.0.0.1{path}", {"Host": host})
        assert refused.code == 401, (host, path)


def test_without_upstream_unknown_hosts_get_404_but_gate_pages(make_gate: Any) -> None:
    """No [upstream]: unknown hosts get 404, yet the gate's pages answer on every host."""
    gate = make_gate(SITES.replace('[upstream]\nurl = "http://default.invalid"\n', ""))
    assert gate.config.upstream is None
    missing = gate.request("GET", "http://127.0.0.1/x", {"Host": "other.test"}, gate.cookie())
    assert missing.code == 404
    assert missing.json() == {"error": "unknown host"}
    assert gate.request("GET", "http://127.0.0.1/x", {"Host": "a.example.test"},
                        gate.cookie()).code == 200
    # A central login host (gate.login_url) need not be a [[site]].
    login = gate.request(
        "GET", "http://127.0.0.1/.pingated/login", {"Host": "auth.other.test", **HTML}
    )
    assert login.code == 200
    assert b"<form" in login.body
    health = gate.request("GET", "http://127.0.0.1/.pingated/health", {"Host": "other.test"})
    assert health.code == 200
    verify = gate.request(
        "GET", "http://127.0.0.1/.pingated/verify",
        {"Host": "pingated_gate", "X-Original-URL": "http://a.example.test/"}, gate.cookie(),
    )
    assert verify.code == 200


def test_cookie_for_one_subdomain_accepted_on_another(sites: MemoryGate) -> None:
    """Logging in on a.example.test with cookie_domain=.example.test unlocks b.example.test."""
    login = sites.request(
        "POST",
        "http://127.0.0.1/.pingated/login",
        {"Host": "a.example.test", "Content-Type": "application/x-www-form-urlencoded"},
        data=f"pin={TEST_PIN}&next=http%3A%2F%2Fb.example.test%2Fdash%3Fx%3D1".encode(),
    )
    assert login.code == 303
    # next may be any URL inside the cookie domain ...
    assert login.header("location") == "http://b.example.test/dash?x=1"
    set_cookie = login.header("set-cookie") or ""
    assert "Domain=.example.test" in set_cookie
    value = set_cookie.split(";", 1)[0].split("=", 1)[1]
    seen = sites.request("GET", "http://127.0.0.1/dash", {"Host": "b.example.test"}, value)
    assert seen.code == 200
    assert seen.json()["upstream"] == "http://b.invalid"
    verify = sites.request(
        "GET", "http://127.0.0.1/.pingated/verify",
        {"X-Original-URL": "https://c.example.test/"}, value,
    )
    assert verify.code == 200


@pytest.mark.parametrize(
    "next_url",
    ["https://evil.test/", "https://example.test.evil.test/", "https://evilexample.test/",
     "//b.example.test/", "javascript:alert(1)"],
)
def test_next_outside_cookie_domain_falls_back(sites: MemoryGate, next_url: str) -> None:
    """... and nothing outside it."""
    from urllib.parse import quote

    login = sites.request(
        "POST",
        "http://127.0.0.1/.pingated/login",
        {"Host": "a.example.test", "Content-Type": "application/x-www-form-urlencoded"},
        data=f"pin={TEST_PIN}&next={quote(next_url, safe='')}".encode(),
    )
    assert login.code == 303
    assert login.header("location") == "/"


def test_match_site_order() -> None:
    """Exact beats wildcard, the longest wildcard beats a shorter one, a bare domain is no match."""
    up = UpstreamConfig(url="http://x.invalid")
    sites = (
        SiteConfig("*.example.test", up),
        SiteConfig("*.a.example.test", up),
        SiteConfig("b.a.example.test", up),
    )
    assert match_site(sites, "b.a.example.test") is sites[2]
    assert match_site(sites, "c.a.example.test") is sites[1]
    assert match_site(sites, "z.example.test") is sites[0]
    assert match_site(sites, "example.test") is None
    assert match_site(sites, "xexample.test") is None


@pytest.mark.parametrize(
    ("gate_keys", "sites_toml", "key"),
    [
        ({"cookie_domain": "example test"}, "", "gate.cookie_domain"),
        ({"cookie_domain": ".example.test;x=1"}, "", "gate.cookie_domain"),
        ({"cookie_domain": "localhost"}, "", "gate.cookie_domain"),
        (
            {"cookie_domain": ".example.test", "login_url": "https://auth.other.test/.pingated/login"},
            "",
            "gate.login_url",
        ),
        ({"login_url": "ftp://auth.example.test/"}, "", "gate.login_url"),
        ({}, '[[site]]\nhost = "a.example.test"\nupstream = "http://a"\n'
             '[[site]]\nhost = "A.example.test"\nupstream = "http://b"\n', "site[1].host"),
        ({}, '[[site]]\nhost = "*"\nupstream = "http://a"\n', "site[0].host"),
        ({}, '[[site]]\nhost = "a..b"\nupstream = "http://a"\n', "site[0].host"),
        ({}, '[[site]]\nhost = "a.test"\nupstream = "http://a"\npublic_paths = ["api"]\n',
         "site[0].public_paths"),
    ],
)
def test_config_refuses(
    make_gate: Any, gate_keys: dict[str, str], sites_toml: str, key: str
) -> None:
    """Bad forward-auth/site settings are refused at start with one line naming the key."""
    with pytest.raises(ConfigError) as caught:
        make_gate('[upstream]\nurl = "http://app.invalid"\n' + sites_toml, **gate_keys)
    assert caught.value.key == key
    assert str(caught.value).startswith(f"test.toml: {key}: ")


def test_config_accepts_login_host_inside_cookie_domain(make_gate: Any) -> None:
    """A central login host inside cookie_domain (or equal to it) is fine."""
    for login in ("https://auth.example.test/.pingated/login", "https://example.test/login"):
        gate = make_gate(cookie_domain=".Example.test", login_url=login)
        assert gate.config.gate.cookie_domain == ".example.test"


# --- the real process ----------------------------------------------------------


def _echo(gate: Gate, host: str, cookie: str | None, path: str = "/x?q=1") -> Any:
    headers = {"Cookie": f"pingated={cookie}"} if cookie else {}
    response = gate.request("GET", path, headers=headers, host=host)
    return response


def test_real_gate_sites_wildcard_and_shared_cookie(
    gate_factory: GateFactory, upstream_url: str
) -> None:
    """
    twistd with two sites, a wildcard and a default: each Host reaches its
    upstream (told apart by base path on the demo echo), and a cookie issued
    for a.example.test is accepted on b.example.test.
    """
    gate = gate_factory(
        gate={"cookie_domain": ".example.test"},
        site=[
            {"host": "a.example.test", "upstream": f"{upstream_url}/echo/a"},
            {"host": "b.example.test", "upstream": f"{upstream_url}/echo/b"},
            {"host": "*.apps.example.test", "upstream": f"{upstream_url}/echo/wild",
             "public_paths": ["/open"]},
        ],
        upstream=f"{upstream_url}/echo/default",
    )
    cookie = gate.login(host="a.example.test")
    login = gate.request(
        "POST", "/.pingated/login", f"pin={TEST_PIN}&next=/".encode(),
        {"Content-Type": "application/x-www-form-urlencoded"}, host="a.example.test",
    )
    assert "Domain=.example.test" in (login.set_cookie("pingated") or "")
    for host, base in [
        ("a.example.test", "/echo/a"),
        ("b.example.test", "/echo/b"),
        ("one.apps.example.test", "/echo/wild"),
        ("two.three.apps.example.test:8080", "/echo/wild"),
        ("apps.example.test", "/echo/default"),
        ("unknown.test", "/echo/default"),
    ]:
        response = _echo(gate, host, cookie)
        assert response.status == 200, (host, response.status, response.body[:200])
        seen = json.loads(response.body)
        assert seen["path"] == f"{base}/x", host
        assert seen["query"] == "q=1"
    # No cookie: refused everywhere except the wildcard site's public path.
    assert _echo(gate, "b.example.test", None).status == 401
    assert _echo(gate, "one.apps.example.test", None).status == 401
    public = _echo(gate, "one.apps.example.test", None, "/open/file")
    assert public.status == 200
    assert json.loads(public.body)["path"] == "/echo/wild/open/file"
