# -*- test-case-name: tests.test_tls -*-
"""
Native TLS: certificates read from files, chosen by SNI, swapped on reload.

Every TLS listener (C{listen_tls} entries and C{ssl:} strings in C{listen})
is a plain TCP listener wrapped in L{TLSMemoryBIOFactory} whose connection
creator is a L{ReloadableServerTLS}.  A reload builds new
L{CertificateOptions} off the reactor thread and swaps them in: connections
already open keep the OpenSSL connection (and certificate) they started
with, new connections get the new certificate, and nothing stops listening.

Certificates are parsed with C{cryptography} and handed to Twisted's
L{CertificateOptions}, which keeps Twisted's cipher list and TLS 1.2 floor
(raised to 1.3 by C{[tls] min_version = "1.3"}).  SNI uses Twisted's own
C{contextForServerName} hook; an unknown or missing name gets the first
certificate (the default), which is what browsers hitting an IP expect.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.defer import Deferred, execute
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from zope.interface import implementer

from pingated.config import Config, ConfigError
from pingated.redirect_http import RedirectToHttps
from pingated.threads import RunInThread

log = Logger(namespace="pingated")

MIN_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}

# Twisted's default list without its tail of non-forward-secret (static RSA)
# and CBC suites: TLS 1.3 suites, then ECDHE/DHE with AES-GCM or ChaCha20
# (Mozilla's "intermediate" profile).  DHE is only used with dhParameters.
CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(
    "TLS13-AES-256-GCM-SHA384:TLS13-CHACHA20-POLY1305-SHA256:TLS13-AES-128-GCM-SHA256:"
    "ECDH+AESGCM:ECDH+CHACHA20:DH+AESGCM:DH+CHACHA20:!aNULL:!MD5:!DSS"
)

ServableKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_SERVABLE_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


class CertificateFileError(Exception):
    """
    A certificate or key file that cannot be served.

    C{field} is C{"cert_file"} or C{"key_file"}: the config key to blame, so
    the operator reads one line naming the file and what is wrong with it.
    """

    def __init__(self, field: str, problem: str, index: int | None = None) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem
        self.index = index


@attrs.frozen(repr=False)
class LoadedCertificate:
    """A parsed certificate chain with its key; the key never shows in a repr."""

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: ServableKey
    names: tuple[str, ...]
    source: str = ""

    @property
    def serial(self) -> int:
        """The leaf's serial number (what tests and logs use to tell certificates apart)."""
        return self.leaf.serial_number

    @property
    def not_after(self) -> datetime.datetime:
        """When the leaf expires (UTC)."""
        return self.leaf.not_valid_after_utc

    def __repr__(self) -> str:
        return f"LoadedCertificate(names={self.names!r}, serial={self.serial:x})"


def _read(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CertificateFileError(field, f"cannot read {path}: {e.strerror}") from None


def _public_der(key: Any) -> bytes:
    return cast(
        bytes,
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names (and IP addresses) a certificate is for: its SAN, else its CN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    names: list[str] = []
    if san is not None:
        names.extend(name.lower().rstrip(".") for name in san.get_values_for_type(x509.DNSName))
        names.extend(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    if not names:
        for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = attribute.value
            if isinstance(value, str) and value:
                names.append(value.lower().rstrip("."))
    return tuple(dict.fromkeys(names))


def parse_certificate(
    cert_pem: bytes, key_pem: bytes, cert_file: str = "cert_file", key_file: str = "key_file"
) -> LoadedCertificate:
    """
    Parse a PEM chain and its key; the leaf is the certificate the key belongs to.

    Raises L{CertificateFileError} naming the field at fault.  The chain's
    other certificates keep their order and are sent after the leaf.
    """
    try:
        certificates = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise CertificateFileError(
            "cert_file", f"{cert_file} holds no valid PEM certificate"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertificateFileError(
            "key_file", f"{key_file} is encrypted; give an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateFileError(
            "key_file", f"{key_file} holds no valid PEM private key"
        ) from None
    if not isinstance(key, _SERVABLE_KEYS):
        raise CertificateFileError("key_file", f"{key_file} holds an unusable key type")
    public = _public_der(key.public_key())
    for index, candidate in enumerate(certificates):
        if _public_der(candidate.public_key()) == public:
            chain = tuple(certificates[:index] + certificates[index + 1 :])
            return LoadedCertificate(
                leaf=candidate,
                chain=chain,
                key=key,
                names=certificate_names(candidate),
                source=cert_file,
            )
    raise CertificateFileError("key_file", "does not match cert_file")


def read_certificate(cert_file: str, key_file: str) -> LoadedCertificate:
    """Read and check a certificate chain file and its key file (blocking: file I/O)."""
    cert_pem = _read(cert_file, "cert_file")
    key_pem = _read(key_file, "key_file")
    return parse_certificate(cert_pem, key_pem, cert_file, key_file)


def self_signed(
    names: Sequence[str], now: datetime.datetime, lifetime: datetime.timedelta
) -> LoadedCertificate:
    """
    A throwaway certificate for C{names}, served until ACME delivers a real one.

    Without it a C{listen_tls} endpoint configured only for ACME could not
    start before the first issuance (which needs the gate running to answer
    the HTTP-01 challenge).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in names]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return LoadedCertificate(
        leaf=cert, chain=(), key=key, names=tuple(names), source="(self-signed fallback)"
    )


def name_matches(pattern: str, host: str) -> bool:
    """Certificate name matching: exact, or C{*.example.com} for exactly one more label."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return host == pattern


def _options(
    certificate: LoadedCertificate,
    min_version: str,
    for_name: Callable[[bytes | None], SSL.Context | None] | None = None,
    dh_parameters: Any = None,
) -> CertificateOptions:
    # cryptography objects go straight to pyOpenSSL (pyOpenSSL's own X509/PKey
    # wrappers are deprecated); Twisted's annotations predate that.
    return CertificateOptions(
        privateKey=cast(Any, certificate.key),
        certificate=cast(Any, certificate.leaf),
        extraCertChain=cast(Any, list(certificate.chain)),
        raiseMinimumTo=MIN_VERSIONS[min_version],
        acceptableCiphers=CIPHERS,
        dhParameters=dh_parameters,
        contextForServerName=for_name,
    )


@attrs.frozen
class CertificateSet:
    """
    Certificates served on one set of listeners, the first being the default.

    C{options} is what new connections are made from; its SNI callback picks
    another certificate's context when the client names one of its hosts.
    """

    certificates: tuple[LoadedCertificate, ...]
    options: CertificateOptions

    def names(self) -> tuple[str, ...]:
        """Every name any certificate in the set covers."""
        return tuple(name for cert in self.certificates for name in cert.names)


def build_certificate_set(
    certificates: Sequence[LoadedCertificate], min_version: str, dh_parameters: Any = None
) -> CertificateSet:
    """
    Contexts for C{certificates} with SNI; the first certificate is the default.

    Exact names win over wildcards; among equals the earlier certificate wins.
    """
    if not certificates:
        raise ValueError("a certificate set needs at least one certificate")
    exact: dict[str, SSL.Context] = {}
    wildcard: dict[str, SSL.Context] = {}
    for certificate in certificates:
        context = _options(certificate, min_version, dh_parameters=dh_parameters).getContext()
        for name in certificate.names:
            if name.startswith("*."):
                wildcard.setdefault(name[2:], context)
            else:
                exact.setdefault(name, context)

    def for_name(server_name: bytes | None) -> SSL.Context | None:
        if not server_name:
            return None  # no SNI: stay on the default certificate
        name = server_name.decode("ascii", "replace").lower().rstrip(".")
        found = exact.get(name)
        if found is None:
            found = wildcard.get(name.partition(".")[2])
        return found  # None: unknown name, stay on the default

    options = _options(certificates[0], min_version, for_name, dh_parameters)
    return CertificateSet(certificates=tuple(certificates), options=options)


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """
    Makes each new TLS server connection from whatever certificate set is current.

    L{swap} replaces the set; connections already made keep theirs, which is
    how a SIGHUP renews certificates without dropping anyone.
    """

    def __init__(self, current: CertificateSet) -> None:
        self.current = current

    def swap(self, new: CertificateSet) -> None:
        """Serve C{new} to every connection accepted from now on."""
        self.current = new

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A server-side OpenSSL connection from the current set."""
        return self.current.options.serverConnectionForTLS(tlsProtocol)


@implementer(IStreamServerEndpoint)
@attrs.define
class TLSServerEndpoint:
    """Any stream server endpoint (usually TCP) with TLS added on top."""

    inner: IStreamServerEndpoint
    creator: ReloadableServerTLS
    clock: IReactorTime

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Listen on the inner endpoint, wrapping every connection in TLS."""
        wrapped = TLSMemoryBIOFactory(self.creator, False, protocolFactory, clock=self.clock)
        return self.inner.listen(wrapped)


@implementer(IStreamServerEndpoint)
@attrs.define
class _TCPPort:
    """Listens on a TCP port with the parameters an C{ssl:} string gave."""

    reactor: Any
    port: int
    backlog: int
    interface: str

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return execute(
            self.reactor.listenTCP,
            self.port,
            protocolFactory,
            backlog=self.backlog,
            interface=self.interface,
        )


@attrs.frozen
class SslString:
    """What Twisted's parser made of an C{ssl:} endpoint string."""

    port: int
    backlog: int
    interface: str
    certificate: LoadedCertificate
    dh_parameters: Any


class _CaptureListenSSL:
    """Stands in for the reactor so Twisted's own parser reads an C{ssl:} string for us."""

    captured: tuple[int, Any, int, str] | None = None

    def listenSSL(
        self,
        port: int,
        factory: object,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> None:
        self.captured = (port, contextFactory, backlog, interface)


def is_ssl_string(description: str) -> bool:
    """Whether a C{server.listen} entry is an C{ssl:} endpoint string."""
    return description.split(":", 1)[0].strip().lower() == "ssl"


def parse_ssl_string(description: str) -> SslString:
    """
    Read an C{ssl:} string's port, interface and certificate (blocking: file I/O).

    Twisted's parser does the parsing (so every documented option keeps its
    meaning); we keep the certificate so it can be re-read on SIGHUP and
    served with our TLS floor.
    """
    capture = _CaptureListenSSL()
    serverFromString(capture, description).listen(Factory())
    assert capture.captured is not None
    port, options, backlog, interface = capture.captured
    leaf = options.certificate.to_cryptography()
    key = options.privateKey.to_cryptography_key()
    chain = tuple(extra.to_cryptography() for extra in options.extraCertChain)
    certificate = LoadedCertificate(
        leaf=leaf, chain=chain, key=key, names=certificate_names(leaf), source=description
    )
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise CertificateFileError("privateKey", "does not match certKey")
    return SslString(port, backlog, interface, certificate, options.dhParameters)


@attrs.frozen
class SslListener:
    """An C{ssl:} string's socket parameters and its (reloadable) certificate."""

    port: int
    backlog: int
    interface: str
    certificates: CertificateSet


@attrs.frozen
class TlsMaterial:
    """Everything one configuration serves over TLS, built off the reactor thread."""

    sni: CertificateSet | None
    ssl_strings: Mapping[str, SslListener]

    def _sets(self) -> list[CertificateSet]:
        sets = [self.sni] if self.sni else []
        return sets + [listener.certificates for listener in self.ssl_strings.values()]

    def names(self) -> tuple[str, ...]:
        """All certificate names, for the HTTP->HTTPS redirect's host check."""
        return tuple(name for each in self._sets() for name in each.names())

    def certificates(self) -> tuple[LoadedCertificate, ...]:
        """Every certificate served, for expiry warnings in the log."""
        return tuple(cert for each in self._sets() for cert in each.certificates)


def load_material(
    listen: Iterable[str],
    configured: Iterable[tuple[str, str]],
    extra: Sequence[LoadedCertificate],
    min_version: str,
) -> TlsMaterial:
    """
    Read every certificate the configuration names and build fresh contexts.

    C{configured} are C{(cert_file, key_file)} pairs for C{listen_tls} (the
    first is the default), C{extra} certificates obtained elsewhere (ACME)
    follow them.  Blocking; raises L{CertificateFileError} (with the index of
    the offending pair in C{.index}) or whatever Twisted's C{ssl:} parser
    raises.
    """
    loaded: list[LoadedCertificate] = []
    for index, (cert_file, key_file) in enumerate(configured):
        try:
            loaded.append(read_certificate(cert_file, key_file))
        except CertificateFileError as e:
            raise CertificateFileError(e.field, e.problem, index) from None
    loaded.extend(extra)
    sni = build_certificate_set(loaded, min_version) if loaded else None
    ssl_strings = {}
    for description in listen:
        if is_ssl_string(description):
            parsed = parse_ssl_string(description)
            certificates = build_certificate_set(
                [parsed.certificate], min_version, parsed.dh_parameters
            )
            ssl_strings[description] = SslListener(
                parsed.port, parsed.backlog, parsed.interface, certificates
            )
    return TlsMaterial(sni=sni, ssl_strings=ssl_strings)


class TlsListeners:
    """
    The TLS side of the gate's listeners, with one reloadable creator each.

    C{listen_tls} endpoints share one SNI set; each C{ssl:} string has its
    own.  L{apply} swaps them all at once after a successful reload.
    """

    def __init__(self, reactor: Any, material: TlsMaterial) -> None:
        self.reactor = reactor
        self.material = material
        self.sni = ReloadableServerTLS(material.sni) if material.sni else None
        self.ssl_strings = {
            description: ReloadableServerTLS(listener.certificates)
            for description, listener in material.ssl_strings.items()
        }

    def sni_endpoint(self, description: str) -> IStreamServerEndpoint:
        """A C{listen_tls} entry: a TCP endpoint string served with the SNI set."""
        if self.sni is None:
            raise ValueError("listen_tls needs at least one certificate")
        inner = serverFromString(self.reactor, description)
        return TLSServerEndpoint(inner, self.sni, self.reactor)

    def ssl_endpoint(self, description: str) -> IStreamServerEndpoint:
        """An C{ssl:} entry of C{listen}, whose certificate reloads like the rest."""
        listener = self.material.ssl_strings[description]
        inner = _TCPPort(self.reactor, listener.port, listener.backlog, listener.interface)
        return TLSServerEndpoint(inner, self.ssl_strings[description], self.reactor)

    def apply(self, material: TlsMaterial) -> None:
        """Serve C{material} to new connections; open ones are untouched."""
        if self.sni is not None and material.sni is not None:
            self.sni.swap(material.sni)
        for description, creator in self.ssl_strings.items():
            new = material.ssl_strings.get(description)
            if new is not None:
                creator.swap(new.certificates)
        self.material = material

    def names(self) -> tuple[str, ...]:
        """Names of every certificate being served now."""
        return self.material.names()


def load_gate_material(config: Config, now: datetime.datetime) -> tuple[TlsMaterial, list[str]]:
    """
    Everything C{config} serves over TLS, read fresh from disk (blocking).

    Raises L{ConfigError} (one line naming the key) for a certificate that
    cannot be served; returns notes worth logging (e.g. an ACME stand-in).
    """
    notes: list[str] = []
    extra: list[LoadedCertificate] = []
    if config.acme is not None:
        from pingated.acme import current_certificate

        acme_certificate, note = current_certificate(config.acme, config.server.state_dir, now)
        extra.append(acme_certificate)
        if note:
            hosts = ", ".join(config.acme.hosts)
            notes.append(f"{note}: serving a self-signed stand-in for {hosts}")
    try:
        material = load_material(
            config.server.listen,
            [(cert.cert_file, cert.key_file) for cert in config.tls_certificates],
            extra,
            config.tls_min_version,
        )
    except CertificateFileError as e:
        if e.index is None:
            raise ConfigError(config.path, "server.listen", e.problem) from None
        raise ConfigError(
            config.path, f"tls.certificate[{e.index}].{e.field}", e.problem
        ) from None
    except Exception as e:  # Twisted's ssl: parser raises many kinds; all mean "refuse"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            config.path, "server.listen", f"cannot load certificate: {reason}"
        ) from None
    for certificate in material.certificates():
        if certificate.not_after <= now:
            notes.append(
                f"certificate {certificate.source} for {', '.join(certificate.names)} "
                f"expired {certificate.not_after:%Y-%m-%d %H:%M} UTC"
            )
    return material, notes


class GateTls:
    """
    The TLS side of one gate: TLS listeners, the redirect listener, ACME, reloads.

    C{tap.GateService} asks it for endpoints and resources at start and calls
    L{load} (in a thread) and L{apply} (on the reactor) on SIGHUP; a new ACME
    certificate goes through the same two steps.
    """

    def __init__(self, config: Config, reactor: Any, run_in_thread: RunInThread) -> None:
        from pingated.acme import AcmeManager, ChallengeStore

        self.config = config
        self.reactor = reactor
        self.run_in_thread = run_in_thread
        self.challenges = ChallengeStore()
        material, notes = self.load(config)
        for note in notes:
            log.warn("tls: {note}", note=note)
        self.listeners = TlsListeners(reactor, material)
        self.acme: AcmeManager | None = None
        if config.acme is not None:
            self.acme = AcmeManager(
                config.acme,
                config.server.state_dir,
                reactor,
                run_in_thread,
                self.reload_certificates,
                self.challenges,
            )

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.UTC)

    def load(self, config: Config) -> tuple[TlsMaterial, list[str]]:
        """Read C{config}'s certificates (blocking); raises L{ConfigError}."""
        return load_gate_material(config, self._now())

    def listen_endpoint(self, description: str) -> IStreamServerEndpoint:
        """A C{server.listen} entry: C{ssl:} strings get reloadable TLS, others as written."""
        if is_ssl_string(description):
            return self.listeners.ssl_endpoint(description)
        endpoint: IStreamServerEndpoint = serverFromString(self.reactor, description)
        return endpoint

    def sni_endpoint(self, description: str) -> IStreamServerEndpoint:
        """A C{server.listen_tls} entry."""
        return self.listeners.sni_endpoint(description)

    def redirect_resource(self) -> IResource:
        """What C{server.redirect_http} listeners serve."""
        return RedirectToHttps(self.host_allowed, self.challenges.lookup)

    def host_allowed(self, host: str) -> bool:
        """Whether the redirect may send visitors to C{https://host}: a site or cert name."""
        if any(site.matches(host) for site in self.config.sites):
            return True
        return any(name_matches(name, host) for name in self.listeners.names())

    def start(self) -> None:
        """Start ACME checks (the first one at once)."""
        if self.acme is not None:
            self.acme.start()

    def stop(self) -> None:
        """Stop ACME timers."""
        if self.acme is not None:
            self.acme.stop()

    def apply(self, config: Config, material: TlsMaterial, notes: Sequence[str]) -> None:
        """A reload succeeded: serve the new certificates to new connections."""
        from pingated.acme import AcmeManager

        for note in notes:
            log.warn("tls: {note}", note=note)
        for key in ("listen_tls", "redirect_http"):
            if getattr(config.server, key) != getattr(self.config.server, key):
                log.warn("server.{key} changed: restart pingated to apply new listeners", key=key)
        self.listeners.apply(material)
        self.config = config
        if config.acme is None:
            if self.acme is not None:
                self.acme.stop()
                self.acme = None
        elif self.acme is None:
            self.acme = AcmeManager(
                config.acme,
                config.server.state_dir,
                self.reactor,
                self.run_in_thread,
                self.reload_certificates,
                self.challenges,
            )
            self.acme.start()
        elif config.acme != self.acme.config:
            self.acme.update(config.acme)
        else:
            self.acme.check()

    def reload_certificates(self) -> Deferred[None]:
        """Re-read certificate files (after ACME stored a new one) and swap them in."""
        config = self.config
        loading: Deferred[tuple[TlsMaterial, list[str]]] = self.run_in_thread(self.load, config)

        def swap(loaded: tuple[TlsMaterial, list[str]]) -> None:
            material, notes = loaded
            for note in notes:
                log.warn("tls: {note}", note=note)
            self.listeners.apply(material)
            log.info("tls: certificates reloaded")

        def refuse(failure: Failure) -> None:
            log.error(
                "tls: certificate reload refused, keeping the old certificates: {why}",
                why=str(failure.value),
            )

        return loading.addCallbacks(swap, refuse)
