"""
Issue 8 end to end: the real C{twistd -n pingated} process serving TLS with
throwaway certificates made here -- SNI, an C{ssl:} endpoint string, Secure
cookies over TLS, the HTTP->HTTPS redirect listener, SIGHUP certificate swaps
that keep open connections, and refusal to start on bad certificate files.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import time
from typing import Any

import pytest
from conftest import GateFactory
from harness import TEST_PIN, TWISTD, Gate, free_port, wait_for_port
from tls_certs import CertFiles, Pki, common_name, peer_certificate

HTML = {"Accept": "text/html"}


class LoopbackHTTPS(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 while sending C{name} as SNI and Host (no DNS needed)."""

    def __init__(self, name: str, port: int, context: ssl.SSLContext, timeout: float = 10) -> None:
        super().__init__(name, port, context=context, timeout=timeout)
        self._tls_context = context

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._tls_context.wrap_socket(raw, server_hostname=self.host)

    def peer_serial(self) -> int:
        assert isinstance(self.sock, ssl.SSLSocket)
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        from cryptography import x509

        return x509.load_der_x509_certificate(der).serial_number

    def fetch(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
        self.request(method, path, body=body, headers=headers or {})
        response = self.getresponse()
        return response.status, response.getheaders(), response.read()


def _header(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


def _wait_for_log(gate: Gate, needle: str, count: int = 1, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = gate.log()
        if text.count(needle) >= count:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not seen {count}x in the gate log:\n{gate.log()}")


@pytest.fixture
def pki(tmp_path: Any) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    return Pki.create(str(directory))


def _tls_gate(gate_factory: GateFactory, pki: Pki, upstream_url: str,
              ssl_files: CertFiles | None = None, **extra: Any) -> tuple[Gate, dict[str, int]]:
    a = pki.issue("a", ["a.test"])
    b = pki.issue("b", ["b.test", "www.b.test"])
    ports = {"tls": free_port(), "redirect": free_port(), "ssl": free_port()}
    changes: dict[str, Any] = {
        "server": {
            "listen_tls": [f"tcp:{ports['tls']}:interface=127.0.0.1"],
            "redirect_http": [f"tcp:{ports['redirect']}:interface=127.0.0.1"],
        },
        "tls": {
            "certificate": [
                {"cert_file": a.fullchain, "key_file": a.key},
                {"cert_file": b.fullchain, "key_file": b.key},
            ]
        },
        "site": [{"host": "app.test", "upstream": upstream_url}],
    }
    gate = gate_factory(start=False, **changes, **extra)
    if ssl_files is not None:
        gate.config["server"]["listen"].append(
            f"ssl:{ports['ssl']}:interface=127.0.0.1:privateKey={ssl_files.key}"
            f":certKey={ssl_files.cert}:extraCertChain={ssl_files.chain}"
        )
        gate.write_config(gate.config)
    gate.start()
    assert gate.process is not None
    wait_for_port(ports["tls"], proc=gate.process.proc)
    return gate, ports


def test_tls_sni_ssl_string_secure_cookie(
    gate_factory: GateFactory, pki: Pki, upstream_url: str
) -> None:
    """SNI picks each name's certificate (chain included); ssl: strings serve; Secure cookies."""
    s = pki.issue("s", ["s.test"])
    gate, ports = _tls_gate(gate_factory, pki, upstream_url, ssl_files=s)
    verifying = pki.client_context()  # trusts only the root: the chain must be sent
    assert common_name(peer_certificate(ports["tls"], "a.test", verifying)) == "a.test"
    assert common_name(peer_certificate(ports["tls"], "b.test", verifying)) == "b.test"
    assert common_name(peer_certificate(ports["tls"], "www.b.test", verifying)) == "b.test"
    lenient = pki.client_context()
    lenient.check_hostname = False
    assert common_name(peer_certificate(ports["tls"], None, lenient)) == "a.test"
    assert common_name(peer_certificate(ports["tls"], "other.test", lenient)) == "a.test"
    assert peer_certificate(ports["ssl"], "s.test", verifying).serial_number == s.serial

    # Secure cookie and HSTS over TLS, then the proxy works on the same connection.
    conn = LoopbackHTTPS("b.test", ports["tls"], verifying)
    try:
        status, headers, _ = conn.fetch("GET", "/.pingated/login", headers=HTML)
        assert status == 200
        assert _header(headers, "Strict-Transport-Security")
        status, headers, _ = conn.fetch(
            "POST", "/.pingated/login", f"pin={TEST_PIN}&next=/echo".encode(),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert status == 303
        set_cookie = next(v for v in _header(headers, "Set-Cookie") if v.startswith("pingated="))
        assert "secure" in [part.strip().lower() for part in set_cookie.split(";")]
        cookie = set_cookie.split(";", 1)[0]
        status, _, body = conn.fetch("GET", "/echo?x=1", headers={"Cookie": cookie})
        assert status == 200
        sent = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert sent["x-forwarded-proto"] == "https"
    finally:
        conn.close()

    # The ssl: string listener is TLS too (Secure cookie).
    conn = LoopbackHTTPS("s.test", ports["ssl"], verifying)
    try:
        status, headers, _ = conn.fetch(
            "POST", "/.pingated/login", f"pin={TEST_PIN}&next=/".encode(),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert status == 303
        assert any("Secure" in v for v in _header(headers, "Set-Cookie"))
    finally:
        conn.close()

    # Plain HTTP on the same gate: no Secure flag.
    plain = gate.request("POST", "/.pingated/login", f"pin={TEST_PIN}&next=/".encode(),
                         {"Content-Type": "application/x-www-form-urlencoded"})
    assert "secure" not in (plain.set_cookie("pingated") or "secure").lower()
    assert "DeprecationWarning" not in gate.log()


def _plain(port: int, method: str, path: str, host: str | None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(method, path, skip_host=True)
    if host is not None:
        conn.putheader("Host", host)
    conn.endheaders()
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_redirect_listener(gate_factory: GateFactory, pki: Pki, upstream_url: str) -> None:
    """301 to https://<host><uri> for known hosts, port dropped; unknown hosts get no redirect."""
    _, ports = _tls_gate(gate_factory, pki, upstream_url)
    port = ports["redirect"]
    response = _plain(port, "GET", "/some/page?a=1&b=2", f"www.b.test:{port}")
    assert response.status == 301
    assert response.getheader("Location") == "https://www.b.test/some/page?a=1&b=2"
    response = _plain(port, "POST", "/x", "app.test")
    assert response.status == 301
    assert response.getheader("Location") == "https://app.test/x"
    for host in ("evil.test", "a.test.evil.test", None):
        response = _plain(port, "GET", "/", host)
        assert response.status in (400, 404), host
        assert response.getheader("Location") is None
    response = _plain(port, "GET", "/.well-known/acme-challenge/unknown", "a.test")
    assert response.status == 404


def _https_serial(port: int, name: str, pki: Pki) -> int:
    return peer_certificate(port, name, pki.client_context()).serial_number


def test_sighup_swaps_certificates_and_keeps_connections(
    gate_factory: GateFactory, pki: Pki, upstream_url: str
) -> None:
    """New serial for fresh clients, same pid, an open TLS connection keeps working; bad -> kept."""
    s = pki.issue("s", ["s.test"])
    gate, ports = _tls_gate(gate_factory, pki, upstream_url, ssl_files=s)
    assert gate.process is not None
    pid = gate.process.pid
    old_a = _https_serial(ports["tls"], "a.test", pki)
    open_conn = LoopbackHTTPS("a.test", ports["tls"], pki.client_context())
    try:
        assert open_conn.fetch("GET", "/.pingated/health")[0] == 200
        assert open_conn.peer_serial() == old_a

        new_a = pki.issue("a", ["a.test"])  # same paths, new key and serial
        new_s = pki.issue("s", ["s.test"])
        gate.process.signal(1)  # SIGHUP
        _wait_for_log(gate, "configuration reloaded")
        assert _https_serial(ports["tls"], "a.test", pki) == new_a.serial
        assert _https_serial(ports["ssl"], "s.test", pki) == new_s.serial
        assert gate.process.pid == pid and gate.process.proc.poll() is None

        # The connection opened before the swap is still up, on its old certificate.
        assert open_conn.fetch("GET", "/.pingated/health")[0] == 200
        assert open_conn.peer_serial() == old_a

        # A broken new certificate (key from another pair) is refused; the current one stays.
        b = pki.issue("b2", ["b.test"])
        with open(b.key, "rb") as f, open(new_a.key, "wb") as g:
            g.write(f.read())
        gate.process.signal(1)
        text = _wait_for_log(gate, "reload refused")
        assert "tls.certificate[0].key_file: does not match cert_file" in text
        assert _https_serial(ports["tls"], "a.test", pki) == new_a.serial
        assert open_conn.fetch("GET", "/.pingated/health")[0] == 200
    finally:
        open_conn.close()


@pytest.mark.parametrize("problem", ["missing", "mismatch", "ssl-mismatch"])
def test_bad_certificates_refuse_to_start(
    gate_factory: GateFactory, pki: Pki, problem: str
) -> None:
    """Missing files or a key that is not the certificate's: exit non-zero with one line."""
    a = pki.issue("a", ["a.test"])
    b = pki.issue("b", ["b.test"])
    tls_port = free_port()
    if problem == "ssl-mismatch":
        gate = gate_factory(start=False)
        gate.config["server"]["listen"].append(
            f"ssl:{tls_port}:interface=127.0.0.1:privateKey={b.key}:certKey={a.cert}"
        )
        expected = "server.listen"
    else:
        key_file = b.key if problem == "mismatch" else a.key
        cert_file = a.fullchain if problem == "mismatch" else os.path.join(pki.directory, "no.pem")
        gate = gate_factory(
            start=False,
            server={"listen_tls": [f"tcp:{tls_port}:interface=127.0.0.1"]},
            tls={"certificate": [{"cert_file": cert_file, "key_file": key_file}]},
        )
        expected = (
            "tls.certificate[0].key_file: does not match cert_file"
            if problem == "mismatch"
            else f"tls.certificate[0].cert_file: cannot read {cert_file}: No such file"
        )
    gate.write_config(gate.config)
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "pingated", "--config", gate.config_path],
        capture_output=True, text=True, timeout=60, cwd=gate.workdir,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, (result.stdout, result.stderr)
    assert lines[0].startswith(gate.config_path + ": ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
