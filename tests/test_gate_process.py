"""
Issue 2 end to end: the real C{twistd -n pingated} process in front of the
real demo upstream, driven over HTTP on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import GateFactory
from harness import TEST_PIN, TEST_SECRET, TWISTD, Gate, free_port, wait_for_port

HTML = {"Accept": "text/html,application/xhtml+xml"}


def _cookie_header(value: str) -> dict[str, str]:
    return {"Cookie": f"pingated={value}"}


def test_health(gate: Gate) -> None:
    """The health route answers 200 JSON without a session."""
    response = gate.request("GET", "/.pingated/health")
    assert response.status == 200
    assert response.json()["status"] == "ok"


def test_browser_navigation_without_session_redirects_to_login(gate: Gate) -> None:
    """A browser GET without a session is sent to the login page with next=path?query."""
    response = gate.request("GET", "/some/page?a=1&b=2", headers=HTML)
    assert response.status == 302
    assert response.header("Location") == "/.pingated/login?next=%2Fsome%2Fpage%3Fa%3D1%26b%3D2"


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET", {"Accept": "application/json"}),
        ("GET", {}),
        ("POST", {"Accept": "text/html", "Content-Type": "application/json"}),
        ("GET", {"Accept": "text/html", "Upgrade": "websocket", "Connection": "Upgrade"}),
    ],
)
def test_other_requests_without_session_get_401_json(
    gate: Gate, method: str, headers: dict[str, str]
) -> None:
    """API calls, POSTs and upgrades without a session get 401 JSON, never a redirect."""
    body = b"{}" if method == "POST" else None
    response = gate.request(method, "/echo", body=body, headers=headers)
    assert response.status == 401
    assert response.json() == {"error": "login required", "login": "/.pingated/login"}


def test_login_page_is_served(gate: Gate) -> None:
    """GET login shows a form that works without JavaScript and keeps next."""
    response = gate.request("GET", "/.pingated/login?next=/x%3Fy%3D1", headers=HTML)
    assert response.status == 200
    page = response.body.decode()
    assert 'method="post"' in page and 'action="/.pingated/login"' in page
    assert 'name="pin"' in page
    assert 'value="/x?y=1"' in page
    assert response.header("X-Frame-Options") == "DENY"


def test_login_sets_cookie_and_proxies(gate: Gate) -> None:
    """The right PIN gives a 303 to next with a cookie that then opens the upstream."""
    response = gate.request(
        "POST",
        "/.pingated/login",
        f"pin={TEST_PIN}&next=/echo?q=1".encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 303
    assert response.header("Location") == "/echo?q=1"
    set_cookie = response.set_cookie("pingated")
    assert set_cookie is not None
    flags = [f.strip().lower() for f in set_cookie.split(";")[1:]]
    assert "httponly" in flags
    assert "samesite=lax" in flags
    assert "path=/" in flags
    assert f"max-age={30 * 86400}" in flags
    assert "secure" not in flags
    assert not any(f.startswith("domain=") for f in flags)
    cookie = response.cookie("pingated")
    assert cookie
    echoed = gate.request("GET", "/echo?q=1", headers=_cookie_header(cookie))
    assert echoed.status == 200
    assert echoed.json()["query"] == "q=1"


def test_cookie_is_secure_behind_trusted_https_proxy(gate: Gate) -> None:
    """X-Forwarded-Proto: https from a trusted proxy (loopback) makes the cookie Secure."""
    response = gate.request(
        "POST",
        "/.pingated/login",
        f"pin={TEST_PIN}&next=/".encode(),
        {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Forwarded-Proto": "https",
        },
    )
    assert response.status == 303
    set_cookie = response.set_cookie("pingated") or ""
    assert "secure" in [f.strip().lower() for f in set_cookie.split(";")]


def test_cookie_domain_is_set(gate_factory: GateFactory) -> None:
    """cookie_domain becomes the cookie's Domain attribute."""
    gate = gate_factory(gate={"cookie_domain": ".example.test"})
    response = gate.request(
        "POST",
        "/.pingated/login",
        f"pin={TEST_PIN}&next=/".encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
        host="a.example.test",
    )
    assert "domain=.example.test" in (response.set_cookie("pingated") or "").lower()


def test_wrong_pin_redirects_back_without_cookie(gate: Gate) -> None:
    """A wrong PIN sends the visitor back to the login page with an error, no cookie."""
    response = gate.request(
        "POST",
        "/.pingated/login",
        b"pin=999999&next=/wanted",
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 303
    location = response.header("Location") or ""
    assert location.startswith("/.pingated/login?")
    assert "error=pin" in location
    assert "next=%2Fwanted" in location
    assert response.cookie("pingated") is None
    page = gate.request("GET", location, headers=HTML)
    assert "Wrong PIN" in page.body.decode()
    assert "login-failed ip=127.0.0.1 path=/.pingated/login" in _wait_for_log(gate, "login-failed")


def _wait_for_log(gate: Gate, needle: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = gate.log()
        if needle in text:
            return text
        time.sleep(0.05)
    return gate.log()


def test_unsafe_next_falls_back_to_root(gate: Gate) -> None:
    """An off-site next is never followed after login."""
    response = gate.request(
        "POST",
        "/.pingated/login",
        f"pin={TEST_PIN}&next=//evil.example/".encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 303
    assert response.header("Location") == "/"


def test_tampered_cookie_is_no_session(gate: Gate) -> None:
    """Any change to the cookie value means no session."""
    cookie = gate.login()
    payload, _, signature = cookie.rpartition(".")
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    parts = payload.split(".")
    longer = ".".join([*parts[:3], str(int(parts[3]) + 86400)]) + "." + signature
    for bad in (f"{payload}.{flipped}", longer, cookie + "x", "garbage", ""):
        response = gate.request("GET", "/echo", headers=_cookie_header(bad))
        assert response.status == 401, bad


def test_expired_cookie_is_no_session(gate_factory: GateFactory) -> None:
    """A cookie past session_ttl is refused."""
    gate = gate_factory(gate={"session_ttl": 2})
    cookie = gate.login()
    assert gate.request("GET", "/echo", headers=_cookie_header(cookie)).status == 200
    time.sleep(2.5)
    assert gate.request("GET", "/echo", headers=_cookie_header(cookie)).status == 401


def test_logout_revokes_and_revocation_survives_restart(gate: Gate) -> None:
    """Logout clears the cookie and revokes the session, also after a restart."""
    cookie = gate.login()
    other = gate.login()
    response = gate.request("POST", "/.pingated/logout", headers=_cookie_header(cookie))
    assert response.status == 303
    assert response.header("Location") == "/.pingated/login"
    cleared = response.set_cookie("pingated") or ""
    assert "max-age=0" in cleared.lower()
    assert gate.request("GET", "/echo", headers=_cookie_header(cookie)).status == 401
    gate.restart()
    assert gate.request("GET", "/echo", headers=_cookie_header(cookie)).status == 401
    assert gate.request("GET", "/echo", headers=_cookie_header(other)).status == 200


def test_secret_rotation_keeps_sessions(gate: Gate) -> None:
    """Old secret moved to previous_secrets + SIGHUP: existing sessions keep working."""
    cookie = gate.login()
    config = gate.config
    config["gate"]["previous_secrets"] = [TEST_SECRET]
    config["gate"]["secret"] = "a-brand-new-secret-0123456789abcdef0123456789"
    gate.write_config(config)
    assert gate.process is not None
    gate.process.signal(signal.SIGHUP)
    _wait_for_log(gate, "configuration reloaded")
    assert gate.request("GET", "/echo", headers=_cookie_header(cookie)).status == 200
    # Once the old secret is dropped entirely, its cookies die.
    config["gate"]["previous_secrets"] = []
    gate.write_config(config)
    gate.process.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if gate.request("GET", "/echo", headers=_cookie_header(cookie)).status == 401:
            break
        time.sleep(0.1)
    assert gate.request("GET", "/echo", headers=_cookie_header(cookie)).status == 401


def test_bad_reload_keeps_old_config(gate: Gate) -> None:
    """A broken config on SIGHUP is logged and the running gate keeps working."""
    cookie = gate.login()
    with open(gate.config_path, "w") as f:
        f.write("[gate]\nsecret = 'short'\n")
    assert gate.process is not None
    gate.process.signal(signal.SIGHUP)
    log = _wait_for_log(gate, "reload refused")
    assert "reload refused" in log
    assert gate.request("GET", "/echo", headers=_cookie_header(cookie)).status == 200


def test_proxy_rewrites_headers(gate: Gate) -> None:
    """Gate cookie stripped, other cookies kept, hop-by-hop dropped, X-Forwarded-* set."""
    cookie = gate.login()
    response = gate.request(
        "GET",
        "/echo/path?b=2&a=1&a=3&sp=%20x",
        headers={
            "Cookie": f"theme=dark; pingated={cookie}; lang=en",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "X-Custom": "kept",
        },
    )
    assert response.status == 200
    echoed = response.json()
    headers = {name.lower(): value for name, value in echoed["headers"]}
    assert echoed["query"] == "b=2&a=1&a=3&sp=%20x"
    assert echoed["path"].startswith("/echo/path")
    assert headers["cookie"] == "theme=dark; lang=en"
    assert cookie not in json.dumps(echoed)
    for dropped in ("x-drop-me", "keep-alive", "te", "proxy-authorization"):
        assert dropped not in headers
    assert headers["x-custom"] == "kept"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{gate.port}"


def test_set_cookies_pass_intact(gate: Gate) -> None:
    """Several Set-Cookie headers from the upstream reach the client separately."""
    cookie = gate.login()
    response = gate.request("GET", "/set-cookies", headers=_cookie_header(cookie))
    assert response.status == 200
    assert sorted(response.all("set-cookie")) == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]


def test_identity_headers_replace_client_copies(gate_factory: GateFactory) -> None:
    """[identity] headers are set and client-sent copies never reach the upstream."""
    gate = gate_factory(identity={"headers": {"X-Trusted-User-Email": "me@example.com"}})
    cookie = gate.login()
    response = gate.request(
        "GET",
        "/echo",
        headers={
            **_cookie_header(cookie),
            "X-Trusted-User-Email": "attacker@evil.test",
            "x-trusted-user-email": "attacker2@evil.test",
        },
    )
    values = [v for k, v in response.json()["headers"] if k.lower() == "x-trusted-user-email"]
    assert values == ["me@example.com"]


def test_upstream_down_gives_502(gate_factory: GateFactory) -> None:
    """An unreachable upstream gives a short 502, never a traceback."""
    gate = gate_factory(upstream=f"http://127.0.0.1:{free_port()}")
    cookie = gate.login()
    response = gate.request("GET", "/", headers={**HTML, **_cookie_header(cookie)})
    assert response.status == 502
    assert b"Traceback" not in response.body
    assert b"<html" in response.body
    api = gate.request("GET", "/api", headers=_cookie_header(cookie))
    assert api.status == 502
    assert api.json()["error"]


def test_streamed_upstream_events_arrive(gate: Gate) -> None:
    """SSE through the gate: events arrive as a stream, not buffered to the end."""
    import http.client

    cookie = gate.login()
    conn = http.client.HTTPConnection("127.0.0.1", gate.port, timeout=10)
    conn.request("GET", "/sse?interval=0.2&count=3", headers=_cookie_header(cookie))
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/event-stream")
    first = response.fp.readline()
    assert first.startswith(b"data:") or first.strip().isalnum()
    conn.close()


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"gate": {"secret": "too-short"}}, "gate.secret: must be at least 32 bytes"),
        ({"gate": {"pin_hash": "not-a-hash"}}, "gate.pin_hash"),
        ({"server": {"listen": ["tcp:notaport"]}}, "server.listen"),
        ({"upstream": {"url": "ftp://127.0.0.1/"}}, "upstream.url"),
    ],
)
def test_bad_config_refuses_to_start(
    gate_factory: GateFactory, changes: dict[str, object], key: str
) -> None:
    """twistd exits non-zero with one line naming the file and key; nothing listens."""
    gate = gate_factory(start=False, **changes)
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "pingated", "--config", gate.config_path],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=gate.workdir,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]]
    assert lines[0].startswith(gate.config_path + ": ")
    assert key in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_secret_refuses_to_start(gate_factory: GateFactory) -> None:
    """No secret at all is refused with the key named."""
    gate = gate_factory(start=False)
    del gate.config["gate"]["secret"]
    gate.write_config(gate.config)
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "pingated", "--config", gate.config_path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "gate.secret: is required" in result.stderr


def _run_shipped_example(venv_bin: str, tmp_path: object) -> None:
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "etc", "pingated.toml"), encoding="utf-8") as f:
        text = f.read().replace("tcp:3060:", f"tcp:{port}:")
    workdir = str(tmp_path)
    etc = os.path.join(workdir, "etc")
    os.makedirs(etc, exist_ok=True)
    config = os.path.join(etc, "pingated.toml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(text)
    proc = subprocess.Popen(
        [os.path.join(venv_bin, "twistd"), "-n", "--pidfile=", "pingated", "--config", config],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    try:
        wait_for_port(port, timeout=30, proc=proc)  # type: ignore[arg-type]
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/.pingated/health", timeout=5) as r:
            assert json.load(r)["status"] == "ok"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.slow
def test_plain_and_editable_install_in_fresh_venv(tmp_path: object) -> None:
    """
    `twistd pingated` works after `pip install .` into a fresh venv, and after
    a strict editable install (the twisted/plugins folder is not a package).
    """
    import pathlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = pathlib.Path(str(tmp_path))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", root], check=True, timeout=600)
    site = next((venv / "lib").glob("python*/site-packages"))
    assert (site / "twisted" / "plugins" / "pingated_plugin.py").exists()
    assert not (site / "twisted" / "plugins" / "__init__.py").exists() or (
        # Twisted itself ships twisted/plugins/__init__.py; ours must not replace it.
        "pingated" not in (site / "twisted" / "plugins" / "__init__.py").read_text()
    )
    _run_shipped_example(str(venv / "bin"), base / "plain")
    subprocess.run(
        [*pip, "install", "--no-deps", "--config-settings", "editable_mode=strict", "-e", root],
        check=True,
        timeout=600,
    )
    _run_shipped_example(str(venv / "bin"), base / "editable")
