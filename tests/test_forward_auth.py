"""
Forward-auth end to end: Debian's real nginx and Caddy, running the example
files shipped in C{etc/}, in front of the real demo upstream, asking a real
C{twistd -n pingated} gate (contract 3a).

Each front proxy runs from a private temp directory with its own config,
pid file, logs and temp paths, on loopback ports chosen at run time.  The
shipped files are copied unchanged except for addresses:

  - nginx: C{listen 80} -> C{127.0.0.1:<port>}, the gate's and the app's
    C{127.0.0.1:3060}/C{127.0.0.1:3050} -> the test's ports;
  - Caddy: the same two addresses, the admin port, and the site address
    C{app.example.com} -> C{http://app.example.com:<port>} bound to
    127.0.0.1 (no certificate can be obtained in a test).

Traefik is not packaged in Debian; its path is tested by calling verify
with exactly the headers its forwardAuth middleware sends, as the shipped
C{etc/traefik/pingated.yml} configures it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import websocket
from harness import (
    TEST_PIN,
    Gate,
    ManagedProcess,
    Response,
    base_config,
    deep_update,
    free_port,
    wait_for_port,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETC = os.path.join(ROOT, "etc")
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
IDENTITY = {"X-Trusted-User-Email": "me@example.test"}


def _require(binary: str) -> str:
    path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{binary} is not installed: run `make system-deps` (Debian package {binary})")
    return path


def _gate(tmp: str, upstream: str) -> Gate:
    port = free_port()
    os.makedirs(tmp, exist_ok=True)
    config = base_config(os.path.join(tmp, "state"), port, upstream)
    deep_update(config, {"identity": {"headers": IDENTITY}})
    return Gate(tmp, config, port)


class Front:
    """A running front proxy on 127.0.0.1:C{port}, stopped by pid."""

    def __init__(
        self, name: str, port: int, process: ManagedProcess, workdir: str, host: str
    ) -> None:
        self.name = name
        self.port = port
        self.process = process
        self.workdir = workdir
        self.host = host
        """The Host header the site answers to (sent with every request)."""

    @property
    def origin(self) -> str:
        return f"http://{self.host}"

    def request(
        self, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        gate = Gate.__new__(Gate)  # only its stdlib request helper is used
        gate.port = self.port
        return Gate.request(gate, method, path, body, headers, host=self.host)

    def websocket(self, path: str, cookie: str | None = None) -> websocket.WebSocket:
        """A WebSocket to C{path} through the front proxy (connects to 127.0.0.1)."""
        options: dict[str, Any] = {"timeout": 10, "host": self.host, "origin": self.origin}
        if cookie is not None:
            options["cookie"] = f"pingated={cookie}"
        return websocket.create_connection(f"ws://127.0.0.1:{self.port}{path}", **options)

    def stop(self) -> None:
        self.process.stop()


def _substitute(text: str, replacements: list[tuple[str, str]]) -> str:
    for old, new in replacements:
        assert old in text, f"shipped example no longer contains {old!r}"
        text = text.replace(old, new)
    return text


# --- nginx ------------------------------------------------------------------------


def start_nginx(workdir: str, gate_port: int, upstream_port: int) -> Front:
    """nginx with the three shipped files, as Debian's layout includes them."""
    nginx = _require("nginx")
    port = free_port()
    layout = {
        "conf.d/pingated.conf": [("127.0.0.1:3060", f"127.0.0.1:{gate_port}")],
        "snippets/pingated-auth.conf": [],
        "sites-available/pingated-example.conf": [
            ("listen 80;", f"listen 127.0.0.1:{port};"),
            ("127.0.0.1:3050", f"127.0.0.1:{upstream_port}"),
        ],
    }
    for relative, replacements in layout.items():
        with open(os.path.join(ETC, "nginx", relative), encoding="utf-8") as f:
            text = _substitute(f.read(), replacements)
        target = os.path.join(workdir, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
    temp = {name: os.path.join(workdir, "tmp", name)
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        os.makedirs(path, exist_ok=True)
    # Workers would switch to an unprivileged user that cannot enter the
    # pytest temp directory; as root, keep them root (this nginx only
    # listens on loopback and lives for the test).
    user = "user root root;\n" if os.geteuid() == 0 else ""
    main_conf = f"""
{user}worker_processes 1;
error_log {workdir}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {temp['client_body']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};
    # As in Debian's /etc/nginx/nginx.conf:
    include conf.d/*.conf;
    include sites-available/*.conf;
}}
"""
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w", encoding="utf-8") as f:
        f.write(main_conf)
    argv = [nginx, "-c", conf, "-p", workdir + "/", "-e", os.path.join(workdir, "error.log"),
            "-g", f"daemon off; pid {workdir}/nginx.pid;"]
    process = ManagedProcess(argv, os.path.join(workdir, "nginx.out"), cwd=workdir)
    front = Front("nginx", port, process, workdir, f"127.0.0.1:{port}")
    try:
        wait_for_port(port, proc=process.proc)
    except Exception:
        process.stop()
        raise
    return front


def start_caddy(workdir: str, gate_port: int, upstream_port: int) -> Front:
    """Caddy with the shipped Caddyfile (addresses substituted, see module docstring)."""
    caddy = _require("caddy")
    port = free_port()
    admin = free_port()
    with open(os.path.join(ETC, "caddy", "Caddyfile"), encoding="utf-8") as f:
        text = _substitute(f.read(), [
            ("localhost:2019", f"127.0.0.1:{admin}"),
            ("127.0.0.1:3060", f"127.0.0.1:{gate_port}"),
            ("127.0.0.1:3050", f"127.0.0.1:{upstream_port}"),
            ("\napp.example.com {\n", f"\nhttp://app.example.com:{port} {{\n\tbind 127.0.0.1\n"),
        ])
    caddyfile = os.path.join(workdir, "Caddyfile")
    with open(caddyfile, "w", encoding="utf-8") as f:
        f.write(text)
    env = {
        "HOME": workdir,
        "XDG_DATA_HOME": os.path.join(workdir, "data"),
        "XDG_CONFIG_HOME": os.path.join(workdir, "config"),
    }
    argv = [caddy, "run", "--config", caddyfile, "--adapter", "caddyfile",
            "--pidfile", os.path.join(workdir, "caddy.pid")]
    process = ManagedProcess(argv, os.path.join(workdir, "caddy.out"), cwd=workdir, env=env)
    front = Front("caddy", port, process, workdir, f"app.example.com:{port}")
    try:
        wait_for_port(port, timeout=30, proc=process.proc)
    except Exception:
        process.stop()
        raise
    return front


@pytest.fixture(scope="module", params=["nginx", "caddy"])
def stack(request: Any, tmp_path_factory: Any, upstream_url: str) -> Iterator[tuple[Front, Gate]]:
    """A real gate and a real front proxy running the shipped example in front of it."""
    workdir = str(tmp_path_factory.mktemp(request.param))
    gate = _gate(os.path.join(workdir, "gate"), upstream_url)
    upstream_port = urlsplit(upstream_url).port
    assert upstream_port is not None
    front: Front | None = None
    try:
        gate.start()
        front_dir = os.path.join(workdir, request.param)
        os.makedirs(front_dir)
        starter = start_nginx if request.param == "nginx" else start_caddy
        front = starter(front_dir, gate.port, upstream_port)
        yield front, gate
    finally:
        if front is not None:
            front.stop()
        gate.stop()


def _diagnose(front: Front, gate: Gate) -> str:
    parts = [f"--- {front.name} ---", front.process.log()]
    error_log = os.path.join(front.workdir, "error.log")
    if os.path.exists(error_log):
        with open(error_log, encoding="utf-8", errors="replace") as f:
            parts.append(f.read()[-3000:])
    parts += ["--- gate ---", gate.log()[-3000:]]
    return "\n".join(parts)


def _log_in(front: Front, next_url: str) -> Response:
    body = f"pin={TEST_PIN}&next={quote(next_url, safe='')}".encode()
    return front.request(
        "POST", "/.pingated/login", body,
        {"Content-Type": "application/x-www-form-urlencoded", **HTML},
    )


def test_unauthenticated_browser_is_sent_to_the_login_page(stack: tuple[Front, Gate]) -> None:
    """No session: a browser navigation is redirected to the PIN page, which is served."""
    front, gate = stack
    response = front.request("GET", "/echo?a=1&a=2", headers=HTML)
    assert response.status == 302, _diagnose(front, gate)
    location = response.header("Location") or ""
    expected_next = f"{front.origin}/echo?a=1&a=2"
    assert location == (
        f"{front.origin}/.pingated/login?next={quote(expected_next, safe='')}"
    )
    page = front.request("GET", location[len(front.origin):], headers=HTML)
    assert page.status == 200
    assert b"<form" in page.body
    assert b'name="pin"' in page.body


def test_unauthenticated_api_call_gets_401_json(stack: tuple[Front, Gate]) -> None:
    """No session, not a navigation: 401 JSON naming the login page; the app is not reached."""
    front, _ = stack
    response = front.request("GET", "/echo", headers={"Accept": "application/json"})
    assert response.status == 401
    body = response.json()
    assert body["error"] == "login required"
    assert body["login"].startswith(f"{front.origin}/.pingated/login")
    post = front.request("POST", "/echo", b"{}", {"Content-Type": "application/json", **HTML})
    assert post.status == 401


def test_log_in_through_the_proxy_then_reach_the_app(stack: tuple[Front, Gate]) -> None:
    """PIN through the front proxy -> cookie -> back to the original URL -> upstream content."""
    front, gate = stack
    target = f"{front.origin}/echo?x=1"
    login = _log_in(front, target)
    assert login.status == 303, _diagnose(front, gate)
    assert login.header("Location") == target
    cookie = login.cookie("pingated")
    assert cookie
    response = front.request(
        "GET", "/echo?x=1",
        headers={"Cookie": f"pingated={cookie}; other=1", **HTML,
                 "X-Trusted-User-Email": "mallory@evil.test"},
    )
    assert response.status == 200, _diagnose(front, gate)
    seen = response.json()
    assert seen["path"] == "/echo"
    assert seen["query"] == "x=1"
    emails = [v for k, v in seen["headers"] if k.lower() == "x-trusted-user-email"]
    # The gate's identity header, copied from the verify answer; the
    # client's forged copy never reaches the app.
    assert emails == ["me@example.test"]
    page = front.request("GET", "/", headers={"Cookie": f"pingated={cookie}", **HTML})
    assert page.status == 200
    assert b"you are behind pingated" in page.body
    # A tampered cookie is no session.
    bad = front.request("GET", "/echo", headers={"Cookie": f"pingated={cookie}x", **HTML})
    assert bad.status == 302


def test_websocket_through_the_proxy(stack: tuple[Front, Gate]) -> None:
    """A WebSocket to the app passes the auth check with a session and is refused without."""
    front, _ = stack
    cookie = _log_in(front, "/").cookie("pingated")
    assert cookie
    ws = front.websocket("/ws", cookie)
    try:
        ws.send("hello through the gate")
        assert ws.recv() == "hello through the gate"
        ws.send_binary(b"\x00\x01\xff")
        assert ws.recv() == b"\x00\x01\xff"
    finally:
        ws.close()
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        front.websocket("/ws")
    assert refused.value.status_code == 401


def test_client_cannot_choose_the_original_url(stack: tuple[Front, Gate]) -> None:
    """Forged X-Original-* / X-Forwarded-* from the visitor do not change the login target."""
    front, _ = stack
    forged = {
        "X-Original-URL": "https://evil.test/x",
        "X-Original-URI": "/evil",
        "X-Original-Host": "evil.test",
        "X-Forwarded-Host": "evil.test",
        "X-Forwarded-Uri": "/evil",
        "X-Forwarded-Proto": "https",
        **HTML,
    }
    response = front.request("GET", "/real", headers=forged)
    assert response.status == 302
    location = response.header("Location") or ""
    assert location.startswith(f"{front.origin}/.pingated/login?")
    assert parse_qs(urlsplit(location).query)["next"] == [f"{front.origin}/real"]


def test_verify_is_not_reachable_from_outside_nginx(stack: tuple[Front, Gate]) -> None:
    """nginx's auth location is internal; Caddy's answers like any gate page (no secret in it)."""
    front, _ = stack
    response = front.request("GET", "/.pingated/verify", headers=HTML)
    if front.name == "nginx":
        assert response.status == 404
    else:
        assert response.status in (302, 401)


def _closed_connections(port: int) -> int:
    """TCP connections to or from 127.0.0.1:C{port} now in TIME_WAIT (i.e. closed recently)."""
    with open("/proc/net/tcp", encoding="ascii") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    hex_port = f"{port:04X}"
    return sum(
        1 for row in rows
        if row[3] == "06" and hex_port in (row[1].split(":")[1], row[2].split(":")[1])
    )


def test_connections_to_the_gate_are_reused(stack: tuple[Front, Gate]) -> None:
    """
    Every protected request makes an auth call; the shipped config must reuse
    connections for it (STYLE.md: keepalive upstream, HTTP/1.1, empty
    Connection), not open and close one per request.
    """
    front, gate = stack
    cookie = _log_in(front, "/").cookie("pingated")
    before = _closed_connections(gate.port)
    for _ in range(20):
        response = front.request("GET", "/echo", headers={"Cookie": f"pingated={cookie}"})
        assert response.status == 200
    assert _closed_connections(gate.port) - before <= 3


def test_nginx_snippet_follows_the_keepalive_note() -> None:
    """Both gate locations repeat HTTP/1.1 + empty Connection and use the keepalive upstream."""
    with open(os.path.join(ETC, "nginx", "conf.d", "pingated.conf"), encoding="utf-8") as f:
        assert re.search(r"upstream pingated_gate \{[^}]*\bkeepalive \d+;", f.read())
    with open(os.path.join(ETC, "nginx", "snippets", "pingated-auth.conf"), encoding="utf-8") as f:
        snippet = f.read()
    for start in ("location = /.pingated/verify {", "location /.pingated/ {"):
        block = snippet[snippet.index(start):]
        block = block[: block.index("\n}")]
        assert "proxy_pass http://pingated_gate;" in block, start
        assert "proxy_http_version 1.1;" in block, start
        assert 'proxy_set_header Connection "";' in block, start


# --- Traefik ------------------------------------------------------------------------


def _traefik_middleware() -> dict[str, Any]:
    """The forwardAuth settings of the shipped Traefik file (read without a YAML library)."""
    with open(os.path.join(ETC, "traefik", "pingated.yml"), encoding="utf-8") as f:
        text = f.read()
    address = re.search(r'^\s+address:\s*"([^"]+)"', text, re.M)
    assert address is not None
    def listed(key: str) -> list[str]:
        block = re.search(rf"^\s+{key}:\n((?:\s+- .+\n)+)", text, re.M)
        assert block is not None, key
        return re.findall(r'- "([^"]+)"', block.group(1))
    return {
        "address": address.group(1),
        "authRequestHeaders": listed("authRequestHeaders"),
        "authResponseHeaders": listed("authResponseHeaders"),
        "text": text,
    }


@pytest.fixture(scope="module")
def plain_gate(tmp_path_factory: Any, upstream_url: str) -> Iterator[Gate]:
    gate = _gate(str(tmp_path_factory.mktemp("traefik-gate")), upstream_url)
    try:
        yield gate.start()
    finally:
        gate.stop()


def _as_traefik(gate: Gate, method: str, url: str, client: dict[str, str]) -> Response:
    """What Traefik's forwardAuth sends for a visitor request C{method url}."""
    middleware = _traefik_middleware()
    address = urlsplit(middleware["address"])
    original = urlsplit(url)
    allowed = {h.lower() for h in middleware["authRequestHeaders"]}
    headers = {k: v for k, v in client.items() if k.lower() in allowed}
    headers.update({
        "X-Forwarded-Method": method,
        "X-Forwarded-Proto": original.scheme,
        "X-Forwarded-Host": original.netloc,
        "X-Forwarded-Uri": original.path + (f"?{original.query}" if original.query else ""),
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Port": str(original.port or (443 if original.scheme == "https" else 80)),
    })
    # Traefik always calls the configured address with GET.
    return gate.request("GET", address.path, headers=headers)


def test_traefik_shipped_file_points_at_verify() -> None:
    """The shipped middleware calls <prefix>/verify and forwards what verify needs."""
    middleware = _traefik_middleware()
    assert middleware["address"] == "http://127.0.0.1:3060/.pingated/verify"
    assert {"Accept", "Cookie"} <= set(middleware["authRequestHeaders"])
    assert not [h for h in middleware["authRequestHeaders"] if h.lower().startswith("x-original")]
    assert middleware["authResponseHeaders"] == list(IDENTITY)
    assert "PathPrefix(`/.pingated/`)" in middleware["text"]


def test_traefik_headers_302_to_login(plain_gate: Gate) -> None:
    """Traefik's X-Forwarded-Method/Proto/Host/Uri, no session: 302 to the login page with next."""
    target = "https://app.example.test/dash/?tab=2&q=a%20b"
    response = _as_traefik(plain_gate, "GET", target, {**HTML, "X-Original-URL": "https://evil.test/"})
    assert response.status == 302
    assert response.header("Location") == (
        "https://app.example.test/.pingated/login?next=" + quote(target, safe="")
    )
    assert response.body == b""
    api = _as_traefik(plain_gate, "POST", target, {"Accept": "application/json"})
    assert api.status == 401
    assert api.json()["login"] == response.header("Location")


def test_traefik_headers_with_session_and_websocket(plain_gate: Gate) -> None:
    """With a session: 200, empty body, the authResponseHeaders identity; Upgrade ignored."""
    cookie = plain_gate.login()
    client = {"Cookie": f"pingated={cookie}", "Accept": "*/*"}
    ok = _as_traefik(plain_gate, "GET", "https://app.example.test/ws", client)
    assert ok.status == 200
    assert ok.body == b""
    assert ok.header("X-Trusted-User-Email") == "me@example.test"
    upgrade = plain_gate.request(
        "GET", "/.pingated/verify",
        headers={**client, "Upgrade": "websocket", "Connection": "Upgrade",
                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13",
                 "X-Forwarded-Method": "GET", "X-Forwarded-Proto": "https",
                 "X-Forwarded-Host": "app.example.test", "X-Forwarded-Uri": "/ws"},
    )
    assert upgrade.status == 200
    assert upgrade.body == b""


def test_traefik_login_url_and_cookie_domain(tmp_path: Any, upstream_url: str) -> None:
    """With a central login host, Traefik's 302 goes there, next = the original URL."""
    gate = _gate(str(tmp_path / "gate"), upstream_url)
    deep_update(gate.config, {"gate": {
        "cookie_domain": ".example.test",
        "login_url": "https://auth.example.test/.pingated/login",
    }})
    gate.write_config(gate.config)
    try:
        gate.start()
        response = _as_traefik(gate, "GET", "https://b.example.test/x", HTML)
        assert response.status == 302
        assert response.header("Location") == (
            "https://auth.example.test/.pingated/login?next=https%3A%2F%2Fb.example.test%2Fx"
        )
        # The central login page sends the visitor back there after the PIN.
        login = gate.request(
            "POST", "/.pingated/login",
            f"pin={TEST_PIN}&next={quote('https://b.example.test/x', safe='')}".encode(),
            {"Content-Type": "application/x-www-form-urlencoded"}, host="auth.example.test",
        )
        assert login.status == 303
        assert login.header("Location") == "https://b.example.test/x"
        assert "Domain=.example.test" in (login.set_cookie("pingated") or "")
    finally:
        gate.stop()


@pytest.mark.parametrize(
    "relative",
    [
        "nginx/conf.d/pingated.conf",
        "nginx/snippets/pingated-auth.conf",
        "nginx/sites-available/pingated-example.conf",
        "caddy/Caddyfile",
        "traefik/pingated.yml",
    ],
)
def test_docs_show_the_shipped_files(relative: str) -> None:
    """docs/forward-auth.md's copy-paste blocks are the shipped files, verbatim."""
    with open(os.path.join(ROOT, "docs", "forward-auth.md"), encoding="utf-8") as f:
        doc = f.read()
    with open(os.path.join(ETC, relative), encoding="utf-8") as f:
        shipped = f.read().strip("\n")
    assert f"\n{shipped}\n```" in doc, f"docs/forward-auth.md is out of date for etc/{relative}"
    assert f"etc/{relative}" in doc
