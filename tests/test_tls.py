"""
Issue 8, in memory: certificate files, SNI selection, TLS floor, reload swap,
the HTTP->HTTPS redirect resource and the TLS configuration keys.
"""

from __future__ import annotations

import datetime
import os
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from OpenSSL import SSL
from tls_certs import NOW, Pki, cert_pem, common_name, key_pem, make_leaf
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.test.requesthelper import DummyRequest

from pingated.config import ConfigError, parse_config
from pingated.redirect_http import RedirectToHttps, split_host
from pingated.tls import (
    CertificateFileError,
    ReloadableServerTLS,
    TLSServerEndpoint,
    build_certificate_set,
    certificate_names,
    name_matches,
    parse_certificate,
    parse_ssl_string,
    read_certificate,
    self_signed,
)


@pytest.fixture
def pki(tmp_path: Any) -> Pki:
    return Pki.create(str(tmp_path))


# What Twisted's connection creator looks at on the protocol (for ALPN).
_FAKE_TLS_PROTOCOL: Any = SimpleNamespace(factory=SimpleNamespace(wrappedFactory=Factory()))


def _handshake(
    creator: Any, server_name: bytes | None, max_version: int | None = None,
    ciphers: bytes | None = None,
) -> x509.Certificate:
    """A TLS handshake in memory; returns the certificate the server presented."""
    server = creator.serverConnectionForTLS(_FAKE_TLS_PROTOCOL)
    server.set_accept_state()
    client_context = SSL.Context(SSL.TLS_METHOD)
    if max_version is not None:
        client_context.set_max_proto_version(max_version)
    if ciphers is not None:
        client_context.set_cipher_list(ciphers)
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    if server_name is not None:
        client.set_tlsext_host_name(server_name)
    for _ in range(20):
        for connection in (client, server):
            try:
                connection.do_handshake()
            except SSL.WantReadError:
                pass
        moved = False
        for source, target in ((client, server), (server, client)):
            try:
                data = source.bio_read(65536)
            except SSL.WantReadError:
                continue
            target.bio_write(data)
            moved = True
        if not moved:
            break
    peer = client.get_peer_certificate(as_cryptography=True)
    assert peer is not None, "handshake did not complete"
    return peer


# --- certificate files ------------------------------------------------------


def test_fullchain_leaf_is_found_whatever_the_order(pki: Pki) -> None:
    """The leaf is the certificate matching the key; the rest is sent as the chain."""
    cert, key = make_leaf(pki.intermediate, ["a.test"])
    chain_first = cert_pem(pki.intermediate.cert) + cert_pem(cert)
    loaded = parse_certificate(chain_first, key_pem(key))
    assert loaded.leaf == cert
    assert loaded.chain == (pki.intermediate.cert,)
    assert loaded.names == ("a.test",)
    assert "BEGIN" not in repr(loaded)


def test_mismatched_key_is_refused(pki: Pki) -> None:
    """A key that belongs to no certificate in the file is named as the problem."""
    cert, _ = make_leaf(pki.intermediate, ["a.test"])
    _, other_key = make_leaf(pki.intermediate, ["b.test"])
    with pytest.raises(CertificateFileError) as caught:
        parse_certificate(cert_pem(cert), key_pem(other_key))
    assert (caught.value.field, caught.value.problem) == ("key_file", "does not match cert_file")


def test_unreadable_and_garbage_files(pki: Pki, tmp_path: Any) -> None:
    """Missing files, non-PEM files and keys in the cert slot each get their own reason."""
    files = pki.issue("a", ["a.test"])
    with pytest.raises(CertificateFileError) as caught:
        read_certificate(str(tmp_path / "nope.pem"), files.key)
    assert caught.value.field == "cert_file"
    assert "cannot read" in caught.value.problem
    assert "No such file" in caught.value.problem
    with pytest.raises(CertificateFileError) as caught:
        read_certificate(files.key, files.key)
    assert caught.value.field == "cert_file"
    assert "no valid PEM certificate" in caught.value.problem
    with pytest.raises(CertificateFileError) as caught:
        read_certificate(files.cert, files.cert)
    assert caught.value.field == "key_file"
    assert "no valid PEM private key" in caught.value.problem


def test_names_from_san_then_cn(pki: Pki) -> None:
    """SAN DNS names and IPs are the certificate's names; CN only without a SAN."""
    cert, _ = make_leaf(pki.intermediate, ["A.Test", "*.wild.test"], ips=["127.0.0.1"])
    assert certificate_names(cert) == ("a.test", "*.wild.test", "127.0.0.1")
    stand_in = self_signed(["x.test"], NOW, datetime.timedelta(days=1))
    assert stand_in.names == ("x.test",)


def test_name_matching() -> None:
    """Wildcards cover exactly one label, as browsers do."""
    assert name_matches("a.test", "A.TEST.")
    assert name_matches("*.wild.test", "x.wild.test")
    assert not name_matches("*.wild.test", "wild.test")
    assert not name_matches("*.wild.test", "x.y.wild.test")
    assert not name_matches("a.test", "b.test")


# --- SNI, TLS floor, reload ---------------------------------------------------


def _set(pki: Pki, min_version: str = "1.2") -> tuple[Any, int, int, int]:
    a = parse_certificate(*_pems(pki, ["a.test"]))
    b = parse_certificate(*_pems(pki, ["b.test"]))
    w = parse_certificate(*_pems(pki, ["*.wild.test"]))
    return build_certificate_set([a, b, w], min_version), a.serial, b.serial, w.serial


def _pems(pki: Pki, names: list[str]) -> tuple[bytes, bytes]:
    cert, key = make_leaf(pki.intermediate, names)
    return cert_pem(cert) + cert_pem(pki.intermediate.cert), key_pem(key)


def test_sni_picks_the_certificate_by_name(pki: Pki) -> None:
    """Each name gets its certificate; no name or an unknown name gets the first."""
    certificates, a, b, w = _set(pki)
    creator = ReloadableServerTLS(certificates)
    assert _handshake(creator, b"a.test").serial_number == a
    assert _handshake(creator, b"b.test").serial_number == b
    assert _handshake(creator, b"B.TEST").serial_number == b
    assert _handshake(creator, b"x.wild.test").serial_number == w
    assert _handshake(creator, None).serial_number == a
    assert _handshake(creator, b"unknown.test").serial_number == a


def test_min_version_13_refuses_tls12_clients(pki: Pki) -> None:
    """min_version 1.3 refuses a TLS 1.2-only client; the 1.2 default accepts it."""
    default, a, _, _ = _set(pki, "1.2")
    old_client = _handshake(ReloadableServerTLS(default), b"a.test", SSL.TLS1_2_VERSION)
    assert old_client.serial_number == a
    strict, _, _, _ = _set(pki, "1.3")
    with pytest.raises(SSL.Error):
        _handshake(ReloadableServerTLS(strict), b"a.test", SSL.TLS1_2_VERSION)


def test_weak_tls12_suites_are_refused(pki: Pki) -> None:
    """CBC and static-RSA suites are not offered; ECDHE with AES-GCM is."""
    certificates, a, _, _ = _set(pki)
    creator = ReloadableServerTLS(certificates)
    strong = _handshake(creator, b"a.test", SSL.TLS1_2_VERSION, b"ECDHE-ECDSA-AES128-GCM-SHA256")
    assert strong.serial_number == a
    for weak in (b"ECDHE-ECDSA-AES128-SHA", b"ECDHE-ECDSA-AES256-SHA384", b"AES128-GCM-SHA256"):
        with pytest.raises(SSL.Error):
            _handshake(creator, b"a.test", SSL.TLS1_2_VERSION, weak)


def test_swap_changes_new_connections_only(pki: Pki) -> None:
    """After swap, new connections get the new certificate; one made before keeps its own."""
    old = build_certificate_set([parse_certificate(*_pems(pki, ["a.test"]))], "1.2")
    creator = ReloadableServerTLS(old)
    early = creator.serverConnectionForTLS(_FAKE_TLS_PROTOCOL)
    new_certificate = parse_certificate(*_pems(pki, ["a.test"]))
    creator.swap(build_certificate_set([new_certificate], "1.2"))
    assert _handshake(creator, b"a.test").serial_number == new_certificate.serial
    assert early.get_context() is not creator.current.options.getContext()


def test_endpoint_wraps_listener_in_tls(pki: Pki) -> None:
    """listen_tls endpoints hand the TCP listener a TLS-wrapping factory."""
    reactor = MemoryReactor()
    creator = ReloadableServerTLS(
        build_certificate_set([parse_certificate(*_pems(pki, ["a.test"]))], "1.2")
    )
    endpoint = TLSServerEndpoint(TCP4ServerEndpoint(reactor, 8443), creator, Clock())
    endpoint.listen(Factory())
    port, factory, _, _ = reactor.tcpServers[0]
    assert port == 8443
    assert isinstance(factory, TLSMemoryBIOFactory)


def test_ssl_string_is_read_by_twisteds_parser(pki: Pki) -> None:
    """An ssl: string yields its port, interface, leaf and extraCertChain."""
    files = pki.issue("s", ["s.test"])
    parsed = parse_ssl_string(
        f"ssl:8443:interface=127.0.0.1:privateKey={files.key}:certKey={files.cert}"
        f":extraCertChain={files.chain}"
    )
    assert (parsed.port, parsed.interface) == (8443, "127.0.0.1")
    assert parsed.certificate.serial == files.serial
    assert parsed.certificate.chain == (pki.intermediate.cert,)


# --- configuration ------------------------------------------------------------


def _config(tmp_path: Any, tls: str, server: str = "") -> str:
    from harness import TEST_SECRET, pin_hash

    return (
        f'[server]\nlisten = ["tcp:3060"]\n{server}\n'
        f'[gate]\npin_hash = "{pin_hash()}"\nsecret = "{TEST_SECRET}"\n'
        '[upstream]\nurl = "http://127.0.0.1:3050"\n'
        f"{tls}\n"
    )


def _error(text: str, path: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, path)
    return str(caught.value)


def test_config_certificate_problems_are_one_line(pki: Pki, tmp_path: Any) -> None:
    """Bad paths and key/cert mismatches name the file, the key and the problem."""
    path = str(tmp_path / "gate.toml")
    a = pki.issue("a", ["a.test"])
    b = pki.issue("b", ["b.test"])
    missing = _error(
        _config(tmp_path, f'[[tls.certificate]]\ncert_file = "missing.pem"\nkey_file = "{a.key}"'),
        path,
    )
    assert missing == (
        f"{path}: tls.certificate[0].cert_file: cannot read "
        f"{tmp_path / 'missing.pem'}: No such file or directory"
    )
    mismatch = _error(
        _config(
            tmp_path,
            f'[[tls.certificate]]\ncert_file = "{a.fullchain}"\nkey_file = "{a.key}"\n'
            f'[[tls.certificate]]\ncert_file = "{a.fullchain}"\nkey_file = "{b.key}"',
        ),
        path,
    )
    assert mismatch == f"{path}: tls.certificate[1].key_file: does not match cert_file"
    assert "\n" not in missing + mismatch


def test_config_tls_keys(pki: Pki, tmp_path: Any) -> None:
    """min_version, listen_tls without certificates and [tls.acme] rules."""
    path = str(tmp_path / "gate.toml")
    a = pki.issue("a", ["a.test"])
    cert = f'[[tls.certificate]]\ncert_file = "{a.fullchain}"\nkey_file = "{a.key}"\n'
    config = parse_config(_config(tmp_path, "[tls]\nmin_version = \"1.3\"\n" + cert), path)
    assert config.tls_min_version == "1.3"
    assert config.tls_certificates[0].cert_file == a.fullchain
    assert "tls.min_version" in _error(_config(tmp_path, '[tls]\nmin_version = "1.1"'), path)
    assert "tls.certificate: is required" in _error(
        _config(tmp_path, "", 'listen_tls = ["tcp:8443"]'), path
    )
    acme = '[tls.acme]\ndirectory = "https://127.0.0.1:14000/dir"\nhosts = ["a.test"]\n'
    assert "tls.acme: needs server.redirect_http" in _error(
        _config(tmp_path, acme, 'listen_tls = ["tcp:8443"]'), path
    )
    assert "tls.acme: needs server.listen_tls" in _error(
        _config(tmp_path, acme, 'redirect_http = ["tcp:8080"]'), path
    )
    both = 'listen_tls = ["tcp:8443"]\nredirect_http = ["tcp:8080"]'
    parsed = parse_config(
        _config(tmp_path, acme + 'renew_before = "10d"\nemail = "me@a.test"\n'
                'ca_file = "' + pki.ca_file + '"', both),
        path,
    )
    assert parsed.acme is not None
    assert (parsed.acme.hosts, parsed.acme.renew_before) == (("a.test",), 10 * 86400)
    wildcard = acme.replace('"a.test"', '"*.a.test"')
    assert "wildcard" in _error(_config(tmp_path, wildcard, both), path)
    no_ca = acme + f'ca_file = "{tmp_path / "none.pem"}"'
    assert "tls.acme.ca_file: cannot read" in _error(_config(tmp_path, no_ca, both), path)


def test_config_ssl_string_with_mismatched_key(pki: Pki, tmp_path: Any) -> None:
    """An ssl: endpoint string whose key is not the certificate's is refused at start."""
    a = pki.issue("a", ["a.test"])
    b = pki.issue("b", ["b.test"])
    text = _config(tmp_path, "").replace(
        'listen = ["tcp:3060"]', f'listen = ["ssl:8443:privateKey={b.key}:certKey={a.cert}"]'
    )
    message = _error(text, str(tmp_path / "gate.toml"))
    assert "server.listen" in message
    assert "do not match" in message


# --- HTTP -> HTTPS redirect -----------------------------------------------------


def _redirect(host: str | None, uri: bytes = b"/path?q=1", known: tuple[str, ...] = ("a.test",),
              challenges: dict[str, str] | None = None) -> tuple[int, dict[bytes, Any], bytes]:
    resource = RedirectToHttps(lambda h: h in known, (challenges or {}).get)
    request = DummyRequest([])
    request.uri = uri
    request.path = uri.split(b"?")[0]
    if host is not None:
        request.requestHeaders.setRawHeaders(b"host", [host.encode("latin-1")])
    body = resource.render(request)
    headers = dict(request.responseHeaders.getAllRawHeaders())
    return request.responseCode or 200, headers, body


def test_redirect_keeps_host_and_uri_drops_port() -> None:
    """A known host goes to https://<host as sent><uri> with 301, the port dropped."""
    status, headers, _ = _redirect("A.test:8080", b"/path?q=1&b=%2F")
    assert status == 301
    assert headers[b"Location"] == [b"https://A.test/path?q=1&b=%2F"]


def test_redirect_refuses_unknown_and_garbled_hosts() -> None:
    """No open redirect: unknown hosts get 404, garbled or missing ones 400."""
    assert _redirect("evil.test")[0] == 404
    assert _redirect(None)[0] == 400
    for bad in ("evil.test/@a.test", "a.test:80x", "a.test\\x", "a.test@evil", "[::1"):
        status, headers, _ = _redirect(bad)
        assert status in (400, 404), bad
        assert b"Location" not in headers


def test_redirect_absolute_form_keeps_only_path() -> None:
    """An absolute-form request target cannot smuggle another host into Location."""
    status, headers, _ = _redirect("a.test", b"http://evil.test/x?y")
    assert status == 301
    assert headers[b"Location"] == [b"https://a.test/x?y"]


def test_acme_challenge_is_served_for_pending_tokens() -> None:
    """/.well-known/acme-challenge/<token> answers the key authorization, else 404."""
    challenges = {"tok": "tok.thumb"}
    status, _, body = _redirect("any.test", b"/.well-known/acme-challenge/tok", (), challenges)
    assert (status, body) == (200, b"tok.thumb")
    other = _redirect("a.test", b"/.well-known/acme-challenge/other", challenges=challenges)
    assert other[0] == 404


def test_split_host() -> None:
    """Host parsing keeps the host as sent and drops only a numeric port."""
    assert split_host(b"a.test:443") == ("a.test", "a.test")
    assert split_host(b"[::1]:8080") == ("[::1]", "[::1]")
    assert split_host(b"A.Test.") == ("A.Test.", "a.test")
    assert split_host(b"") is None
    assert split_host(b"a b") is None
    assert split_host("é.test".encode()) is None


def test_certificate_files_are_not_world_readable_in_repr(pki: Pki) -> None:
    """The key never reaches logs through a repr."""
    files = pki.issue("r", ["r.test"])
    loaded = read_certificate(files.fullchain, files.key)
    assert "r.test" in repr(loaded)
    assert "PRIVATE" not in repr(loaded)
    assert common_name(loaded.leaf) == "r.test"
    assert os.path.basename(loaded.source) == "r.fullchain.pem"
