"""
Throwaway certificates for the TLS and ACME tests, made with C{cryptography}.

A root CA, an intermediate signed by it, and leaf certificates signed by the
intermediate: a client that trusts only the root can verify a leaf only if
the server also sends the intermediate, so the tests see chain handling too.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from collections.abc import Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def key_pem(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@attrs.define
class Authority:
    """A CA that can sign certificates."""

    cert: x509.Certificate
    key: Any

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.issuer_name(self.cert.subject).sign(self.key, hashes.SHA256())


def make_root(name: str = "pingated test root") -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return Authority(builder.sign(key, hashes.SHA256()), key)


def make_intermediate(root: Authority, name: str = "pingated test intermediate") -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=300))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
            critical=False,
        )
    )
    return Authority(root.sign(builder), key)


def make_leaf(
    issuer: Authority,
    names: Sequence[str],
    days: float = 90,
    ips: Sequence[str] = (),
    key: Any = None,
    now: datetime.datetime = NOW,
) -> tuple[x509.Certificate, Any]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0] if names else ips[0]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    return issuer.sign(builder), key


@attrs.define
class CertFiles:
    """One leaf on disk: C{cert} (leaf only), C{chain} (intermediate), C{fullchain}, C{key}."""

    cert: str
    chain: str
    fullchain: str
    key: str
    serial: int


@attrs.define
class Pki:
    """A root + intermediate in C{directory}, issuing leaves as files."""

    directory: str
    root: Authority
    intermediate: Authority
    ca_file: str

    @classmethod
    def create(cls, directory: str) -> Pki:
        root = make_root()
        intermediate = make_intermediate(root)
        ca_file = os.path.join(directory, "ca.pem")
        with open(ca_file, "wb") as f:
            f.write(cert_pem(root.cert))
        return cls(directory, root, intermediate, ca_file)

    def issue(self, label: str, names: Sequence[str], ips: Sequence[str] = (),
              days: float = 90) -> CertFiles:
        cert, key = make_leaf(self.intermediate, names, days=days, ips=ips)
        return self.write(label, cert, key)

    def write(self, label: str, cert: x509.Certificate, key: Any) -> CertFiles:
        base = os.path.join(self.directory, label)
        files = CertFiles(
            cert=base + ".cert.pem",
            chain=base + ".chain.pem",
            fullchain=base + ".fullchain.pem",
            key=base + ".key.pem",
            serial=cert.serial_number,
        )
        chain = cert_pem(self.intermediate.cert)
        for path, data in (
            (files.cert, cert_pem(cert)),
            (files.chain, chain),
            (files.fullchain, cert_pem(cert) + chain),
            (files.key, key_pem(key)),
        ):
            temporary = path + ".tmp"
            with open(temporary, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        return files

    def client_context(self) -> ssl.SSLContext:
        """A client that trusts only the root (so the server must send the intermediate)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        return context


def peer_certificate(port: int, server_hostname: str | None, context: ssl.SSLContext,
                     timeout: float = 10.0) -> x509.Certificate:
    """The certificate a TLS server on 127.0.0.1:C{port} presents for C{server_hostname}."""
    with socket.create_connection(("127.0.0.1", port), timeout) as raw, \
            context.wrap_socket(raw, server_hostname=server_hostname) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def no_verify_context() -> ssl.SSLContext:
    """A client that accepts any certificate (to look at self-signed stand-ins)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
