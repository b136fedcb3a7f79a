"""
Issue 8, ACME end to end: the real gate obtains, serves and renews a
certificate from Debian's C{pebble} test CA on loopback, with real HTTP-01
validation.

C{pebble-challtestsrv} serves only as pebble's DNS (every name -> 127.0.0.1),
and pebble's C{httpPort} is the gate's C{redirect_http} port, so pebble
fetches C{http://a.test:<port>/.well-known/acme-challenge/<token>} from the
gate itself.  Both processes are stopped by pid at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import stat
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from conftest import GateFactory
from harness import Gate, ManagedProcess, free_port, wait_for_port
from tls_certs import Pki, common_name, peer_certificate

pytestmark = pytest.mark.skipif(
    not (shutil.which("pebble") and shutil.which("pebble-challtestsrv")),
    reason="Debian's pebble is not installed (make system-deps)",
)


@attrs.define
class Pebble:
    """A running pebble and what a client needs to use it."""

    directory: str
    ca_file: str
    http_port: int
    management: str
    context: ssl.SSLContext

    def root_ca(self, path: str) -> str:
        """Pebble's issuing root (new at every start), written to C{path}."""
        with urllib.request.urlopen(f"{self.management}/roots/0", context=self.context) as r:
            data = r.read()
        with open(path, "wb") as f:
            f.write(data)
        return path


@pytest.fixture
def pebble(tmp_path: Any) -> Iterator[Pebble]:
    work = tmp_path / "pebble"
    work.mkdir()
    pki = Pki.create(str(work))
    server = pki.issue("pebble", ["localhost"], ips=["127.0.0.1"])
    acme_port, management_port, http_port = free_port(), free_port(), free_port()
    dns_port, dns_management = free_port(), free_port()
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{acme_port}",
            "managementListenAddress": f"127.0.0.1:{management_port}",
            "certificate": server.fullchain,
            "privateKey": server.key,
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
    }
    config_path = work / "pebble.json"
    config_path.write_text(json.dumps(config))
    dns = ManagedProcess(
        [
            "pebble-challtestsrv",
            "-dns01", f"127.0.0.1:{dns_port}",
            "-management", f"127.0.0.1:{dns_management}",
            "-defaultIPv4", "127.0.0.1",
            "-defaultIPv6", "",
            "-http01", "", "-https01", "", "-tlsalpn01", "",
        ],
        str(work / "challtestsrv.log"),
    )
    ca = None
    try:
        ca = ManagedProcess(
            ["pebble", "-config", str(config_path), "-dnsserver", f"127.0.0.1:{dns_port}",
             "-strict=false"],
            str(work / "pebble.log"),
            env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"},
        )
        wait_for_port(acme_port, proc=ca.proc)
        wait_for_port(management_port, proc=ca.proc)
        yield Pebble(
            directory=f"https://127.0.0.1:{acme_port}/dir",
            ca_file=pki.ca_file,
            http_port=http_port,
            management=f"https://127.0.0.1:{management_port}",
            context=pki.client_context(),
        )
    finally:
        if ca is not None:
            ca.stop()
        dns.stop()


def _served(port: int, name: str, context: ssl.SSLContext) -> Any:
    return peer_certificate(port, name, context)


def _wait_for_issuer(port: int, name: str, prefix: str, not_serial: int | None = None,
                     timeout: float = 45.0) -> Any:
    lenient = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    lenient.check_hostname = False
    lenient.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while True:
        cert = _served(port, name, lenient)
        issuer = cert.issuer.rfc4514_string()
        if prefix in issuer and cert.serial_number != not_serial:
            return cert
        if time.monotonic() > deadline:
            raise AssertionError(f"still served {issuer} serial {cert.serial_number:x}")
        time.sleep(0.2)


def test_acme_obtains_serves_and_renews(
    gate_factory: GateFactory, pebble: Pebble, tmp_path: Any
) -> None:
    """No certificate at start -> obtained via HTTP-01 and served; forced renewal -> new serial."""
    tls_port = free_port()
    acme = {
        "directory": pebble.directory,
        "email": "admin@a.test",
        "hosts": ["a.test", "www.a.test"],
        "ca_file": pebble.ca_file,
    }
    gate: Gate = gate_factory(
        server={
            "listen_tls": [f"tcp:{tls_port}:interface=127.0.0.1"],
            "redirect_http": [f"tcp:{pebble.http_port}:interface=127.0.0.1"],
        },
        tls={"acme": acme},
    )
    assert gate.process is not None
    pid = gate.process.pid
    wait_for_port(tls_port, proc=gate.process.proc)

    first = _wait_for_issuer(tls_port, "a.test", "Pebble")
    # Verified against pebble's root: the gate serves leaf + intermediate for both names.
    root = pebble.root_ca(str(tmp_path / "pebble-root.pem"))
    verifying = ssl.create_default_context(cafile=root)
    for name in ("a.test", "www.a.test"):
        assert _served(tls_port, name, verifying).serial_number == first.serial_number
    assert common_name(first) == "a.test"

    state = os.path.join(gate.workdir, "state", "acme")
    privkey = os.path.join(state, "a.test", "privkey.pem")
    assert os.path.exists(os.path.join(state, "a.test", "fullchain.pem"))
    assert stat.S_IMODE(os.stat(privkey).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(state, "account.key")).st_mode) == 0o600
    assert "acme: new certificate for a.test, www.a.test" in gate.log()

    # The redirect listener that answered pebble still redirects browsers.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", pebble.http_port, timeout=10)
    conn.request("GET", "/x?y=1", headers={"Host": f"www.a.test:{pebble.http_port}"})
    response = conn.getresponse()
    assert (response.status, response.getheader("Location")) == (301, "https://www.a.test/x?y=1")
    conn.close()

    # Force a renewal: renew_before longer than the certificate's life, then SIGHUP.
    gate.config["tls"]["acme"]["renew_before"] = "36500d"
    gate.write_config(gate.config)
    gate.process.signal(1)
    renewed = _wait_for_issuer(tls_port, "a.test", "Pebble", not_serial=first.serial_number)
    assert renewed.serial_number != first.serial_number
    assert _served(tls_port, "www.a.test", verifying).serial_number == renewed.serial_number
    assert gate.process.pid == pid and gate.process.proc.poll() is None
    assert gate.log().count("acme: new certificate") == 2
    assert "Traceback" not in gate.log()


def test_acme_failure_is_one_line_and_keeps_serving(
    gate_factory: GateFactory, pebble: Pebble
) -> None:
    """Validation that cannot succeed is logged in one line; the stand-in keeps serving."""
    tls_port = free_port()
    gate: Gate = gate_factory(
        server={
            "listen_tls": [f"tcp:{tls_port}:interface=127.0.0.1"],
            # Not pebble's httpPort: the CA finds nobody answering its challenge.
            "redirect_http": [f"tcp:{free_port()}:interface=127.0.0.1"],
        },
        tls={"acme": {"directory": pebble.directory, "hosts": ["a.test"],
                      "ca_file": pebble.ca_file}},
    )
    assert gate.process is not None
    wait_for_port(tls_port, proc=gate.process.proc)
    deadline = time.monotonic() + 45
    while "acme: could not obtain" not in gate.log():
        assert time.monotonic() < deadline, gate.log()
        time.sleep(0.2)
    line = next(x for x in gate.log().splitlines() if "acme: could not obtain" in x)
    assert "acme: could not obtain a certificate for a.test: validation failed: a.test:" in line
    assert line.endswith("retrying in 300s")
    assert "Traceback" not in gate.log()
    stand_in = _wait_for_issuer(tls_port, "a.test", "CN=a.test")
    assert stand_in.issuer == stand_in.subject
