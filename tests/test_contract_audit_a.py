"""
Regression tests from the black-box audit of CONTRACT.md sections 1, 2, 3,
3a, 5, 6 and 7 against the real daemon and CLI.

Each test pins a promise the audit checked (or a deviation it fixed): a port
that cannot be listened on refuses the start with one line, C{hash-pin} never
prints a traceback for undecodable stdin, the login POST survives hostile
bodies, the gate's own routes answer wrong methods with small JSON, and the
security log lines keep their fail2ban form.
"""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
import time

import pytest
from conftest import GateFactory
from harness import PINGATED, TEST_PIN, TWISTD, Gate, base_config

from pingated.cli import main

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
LOGIN = "/.pingated/login"


# --- section 1: starting it ---------------------------------------------------


def test_port_in_use_refuses_to_start_with_one_line(tmp_path: object) -> None:
    """
    A listen endpoint that cannot listen (port taken) must not leave a
    process running without its listener: exit 1, one line naming the file
    and server.listen, no traceback on stderr.
    """
    workdir = str(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gate = Gate(workdir, base_config(workdir + "/state", port, "http://127.0.0.1:9"), port)
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "pingated", "--config", gate.config_path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=workdir,
            start_new_session=True,
        )
        try:
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(gate.config_path + ": server.listen: cannot listen on ")
    assert f"tcp:{port}:interface=127.0.0.1" in lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_hash_pin_undecodable_stdin_is_one_line(errors: str) -> None:
    """Non-UTF-8 bytes on stdin: exit 1 with one line, whatever the stdin error mode."""
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\n"), "utf-8", errors)
    out, err = io.StringIO(), io.StringIO()
    assert main(["hash-pin"], out=out, err=err, stdin=stdin) == 1
    assert out.getvalue() == ""
    assert err.getvalue() == "pingated hash-pin: the PIN is not valid UTF-8 text\n"


def test_hash_pin_undecodable_stdin_real_process() -> None:
    """The installed command (tty-less stdin) prints one line, never a traceback."""
    result = subprocess.run(
        [PINGATED, "hash-pin"],
        input=b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\n",
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        "pingated hash-pin: the PIN is not valid UTF-8 text"
    ]


def test_python_m_pingated_is_the_same_command() -> None:
    """C{python -m pingated gen-secret} prints a 256-bit URL-safe secret."""
    result = subprocess.run(
        [sys.executable, "-m", "pingated", "gen-secret"], capture_output=True, timeout=60
    )
    assert result.returncode == 0
    secret = result.stdout.decode().strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", secret)


# --- sections 3, 5, 7: the gate's routes, the cookie, the logs -----------------


def _assert_back_to_login(gate: Gate, body: bytes, headers: dict[str, str]) -> None:
    response = gate.request("POST", LOGIN, body, headers)
    assert response.status == 303, (body[:40], response.status)
    location = response.header("location") or ""
    assert location.startswith(LOGIN + "?") and "error=" in location
    assert response.cookie("pingated") is None


def test_login_post_hostile_bodies_go_back_to_login(gate: Gate) -> None:
    """Missing PIN, empty body, JSON, huge or non-UTF-8 PIN: 303 back with an error, no cookie."""
    _assert_back_to_login(gate, b"next=/", FORM)
    _assert_back_to_login(gate, b"", FORM)
    _assert_back_to_login(
        gate, b'{"pin": "%s"}' % TEST_PIN.encode(), {"Content-Type": "application/json"}
    )
    _assert_back_to_login(gate, b"pin=" + b"1" * 60_000, FORM)
    # A successful login in between resets the per-address failure count.
    gate.login()
    _assert_back_to_login(gate, b"pin=%ff%fe%fd&next=/", FORM)
    _assert_back_to_login(gate, b"pin=\xff\xfe&next=/", FORM)
    # The right PIN with a non-UTF-8 next still logs in, to the safe default.
    response = gate.request("POST", LOGIN, f"pin={TEST_PIN}&next=%ff%fe".encode(), FORM)
    assert response.status == 303 and response.header("location") == "/"
    assert response.cookie("pingated")
    assert "Traceback" not in gate.log()


def test_gate_routes_wrong_methods_head_and_logout(gate: Gate) -> None:
    """Contract 3: small JSON for wrong methods/unknown pages, HEAD has no body, logout GET+POST."""
    for path in ("/.pingated/health", "/.pingated/metrics", "/.pingated/logout", LOGIN):
        response = gate.request("PUT", path, b"x")
        assert response.status == 405, path
        assert response.header("content-type") == "application/json"
        assert response.json() == {"error": "method not allowed"}
    for path in ("/.pingated/nope", "/.pingated/", "/.pingated/health/x"):
        response = gate.request("GET", path)
        assert response.status == 404 and response.json() == {"error": "not found"}
    head = gate.request("HEAD", "/.pingated/health")
    assert head.status == 200 and head.body == b""
    health = gate.request("GET", "/.pingated/health")
    assert health.status == 200 and health.json()["status"] == "ok"

    for method in ("GET", "POST"):
        cookie = gate.login()
        session = {"Cookie": f"pingated={cookie}"}
        assert gate.request("GET", "/.pingated/verify", headers=session).status == 200
        response = gate.request(
            method, "/.pingated/logout", b"" if method == "POST" else None, session
        )
        assert response.status == 303
        assert response.header("location") == LOGIN
        cleared = response.set_cookie("pingated") or ""
        assert "Max-Age=0" in cleared
        # Revoked server-side: the old value no longer works.
        assert gate.request("GET", "/.pingated/verify", headers=session).status == 401
    log = gate.log()
    for secret in (TEST_PIN, cookie):
        assert secret not in log


def test_metrics_forbidden_outside_allow(gate_factory: GateFactory) -> None:
    """Addresses outside metrics.allow get 403 (a small JSON body), HEAD too."""
    gate = gate_factory(metrics={"allow": ["10.0.0.0/8"]})
    response = gate.request("GET", "/.pingated/metrics")
    assert response.status == 403 and response.json() == {"error": "forbidden"}
    assert gate.request("HEAD", "/.pingated/metrics").status == 403


def test_untrusted_forwarded_proto_no_secure_and_log_lines(gate_factory: GateFactory) -> None:
    """
    X-Forwarded-Proto from an untrusted peer does not make the cookie Secure
    (contract 5); wrong PINs and throttling log the exact section-7 lines.
    """
    gate = gate_factory(
        server={"trusted_proxies": []},
        gate={"throttle": {"max_failures": 2, "window": "10m", "lockout": "15m"}},
    )
    response = gate.request(
        "POST",
        LOGIN,
        f"pin={TEST_PIN}&next=/".encode(),
        {**FORM, "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"},
    )
    set_cookie = response.set_cookie("pingated") or ""
    assert response.status == 303 and set_cookie
    attributes = [part.strip().lower() for part in set_cookie.split(";")[1:]]
    assert "secure" not in attributes
    assert {"httponly", "samesite=lax", "path=/"} <= set(attributes)

    for _ in range(2):
        assert gate.request("POST", LOGIN, b"pin=000001&next=/", FORM).status == 303
    throttled = gate.request("POST", LOGIN, f"pin={TEST_PIN}&next=/".encode(), FORM)
    assert throttled.status == 429
    assert throttled.cookie("pingated") is None
    retry_after = throttled.header("retry-after")
    assert retry_after is not None and retry_after.isdigit()

    deadline = time.monotonic() + 10
    while "throttled ip=" not in gate.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in gate.log().splitlines() if "pingated[security]" in line]
    failed = [line for line in lines if " login-failed " in line]
    assert len(failed) == 2
    for line in failed:
        assert line.endswith("pingated[security] login-failed ip=127.0.0.1 path=/.pingated/login")
    throttle_lines = [line for line in lines if " throttled " in line]
    assert throttle_lines
    assert re.search(
        r"pingated\[security\] throttled ip=127\.0\.0\.1 retry_after=\d+$", throttle_lines[0]
    )
    assert TEST_PIN not in gate.log()


def _raw_exchange(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send raw bytes, then read until the gate closes the connection."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head + body)
        received = b""
        while True:
            try:
                data = conn.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
    return received


def test_big_bodies_to_gate_pages_get_413_before_being_read(gate: Gate) -> None:
    """
    The gate's own pages spool their (tiny) bodies, so a big one is refused
    with 413 at once, declared or chunked, instead of filling memory or disk.
    """
    declared = _raw_exchange(
        gate.port,
        b"POST /.pingated/login HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 1000000000\r\n\r\n",
        b"pin=" + b"1" * 1000,
    )
    assert declared.startswith(b"HTTP/1.1 413 "), declared[:80]
    chunk = b"1" * 70_000
    chunked = _raw_exchange(
        gate.port,
        b"POST /.pingated/login HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"%x\r\npin=%s\r\n0\r\n\r\n" % (len(chunk) + 4, chunk),
    )
    assert chunked.startswith(b"HTTP/1.1 413 "), chunked[:80]
    # Small forms still work on the same gate.
    assert gate.login()
