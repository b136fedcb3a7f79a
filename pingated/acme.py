# -*- test-case-name: tests.test_acme -*-
"""
Certificates from an ACME CA (Let's Encrypt, or pebble in tests) via HTTP-01.

The protocol is certbot's C{acme} library, which is blocking (C{requests}),
so every exchange with the CA runs through a L{RunInThread}.  The decisions
-- when to check, whether to renew, what to do after a failure -- run on the
reactor with an injected clock, so tests drive them with C{task.Clock}.

Files live under C{<state_dir>/acme/}: C{account.key} (the ACME account),
and C{<first host>/fullchain.pem} + C{privkey.pem} (the certificate).  A
new certificate reaches listeners through C{on_certificate}, which reloads
TLS contexts in place: no restart, no dropped connection.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any, Protocol, cast

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pingated.config import AcmeConfig
from pingated.threads import RunInThread
from pingated.tls import CertificateFileError, LoadedCertificate, read_certificate, self_signed

log = Logger(namespace="pingated")

FALLBACK_LIFETIME = datetime.timedelta(days=7)
FIRST_RETRY = 300.0


class ChallengeStore:
    """
    HTTP-01 answers waiting for the CA: token -> key authorization.

    Written by the ACME thread, read by the reactor thread serving
    C{/.well-known/acme-challenge/<token>}; hence the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[str, str] = {}

    def publish(self, token: str, answer: str) -> None:
        """Serve C{answer} for C{token} until withdrawn."""
        with self._lock:
            self._answers[token] = answer

    def withdraw(self, token: str) -> None:
        """Stop serving C{token}."""
        with self._lock:
            self._answers.pop(token, None)

    def lookup(self, token: str) -> str | None:
        """The answer for C{token}, if a validation is in progress."""
        with self._lock:
            return self._answers.get(token)


@attrs.frozen
class AcmePaths:
    """Where one ACME configuration keeps its files under C{state_dir}."""

    root: str
    hosts: tuple[str, ...]

    @classmethod
    def of(cls, config: AcmeConfig, state_dir: str) -> AcmePaths:
        """The paths for C{config}'s hosts."""
        return cls(os.path.join(state_dir, "acme"), config.hosts)

    @property
    def account_key(self) -> str:
        """The ACME account's private key (created on first use)."""
        return os.path.join(self.root, "account.key")

    @property
    def certificate_dir(self) -> str:
        """The directory named after the first host."""
        return os.path.join(self.root, self.hosts[0])

    @property
    def fullchain(self) -> str:
        """Leaf first, then the CA's chain, as the CA sent them."""
        return os.path.join(self.certificate_dir, "fullchain.pem")

    @property
    def privkey(self) -> str:
        """The certificate's key (mode 0600)."""
        return os.path.join(self.certificate_dir, "privkey.pem")


class Issuer(Protocol):
    """Obtains a certificate for C{config.hosts}; blocking; returns C{(fullchain, key)} PEMs."""

    def __call__(
        self, config: AcmeConfig, paths: AcmePaths, challenges: ChallengeStore
    ) -> tuple[bytes, bytes]: ...


class AcmeError(Exception):
    """The CA refused or failed to issue; C{str()} is one line for the log."""


def load_stored(paths: AcmePaths) -> LoadedCertificate | None:
    """The stored certificate, or None when there is none yet (blocking: file I/O)."""
    if not os.path.exists(paths.fullchain):
        return None
    return read_certificate(paths.fullchain, paths.privkey)


def renewal_reason(
    certificate: LoadedCertificate | None, config: AcmeConfig, now: datetime.datetime
) -> str | None:
    """Why a new certificate is needed now, or None when the stored one will do."""
    if certificate is None:
        return "no certificate yet"
    missing = [host for host in config.hosts if host not in certificate.names]
    if missing:
        return f"certificate does not cover {', '.join(missing)}"
    remaining = certificate.not_after - now
    if remaining <= datetime.timedelta(seconds=config.renew_before):
        return f"certificate expires {certificate.not_after:%Y-%m-%d %H:%M} UTC (renew_before)"
    return None


def current_certificate(
    config: AcmeConfig, state_dir: str, now: datetime.datetime
) -> tuple[LoadedCertificate, str | None]:
    """
    What C{listen_tls} serves for the ACME hosts right now (blocking).

    The stored certificate when it is usable, else a self-signed stand-in
    (and the reason, to be logged) so the listener can start and the first
    HTTP-01 validation can happen.
    """
    paths = AcmePaths.of(config, state_dir)
    try:
        stored = load_stored(paths)
    except CertificateFileError as e:
        stored = None
        problem: str | None = f"stored ACME certificate unusable ({e.problem})"
    else:
        problem = None if stored is not None else "no ACME certificate yet"
    if stored is not None:
        return stored, None
    return self_signed(config.hosts, now, FALLBACK_LIFETIME), problem


def _write_private(path: str, data: bytes, mode: int) -> None:
    """Replace C{path} atomically (temp file + rename) so readers never see half a file."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def store_certificate(paths: AcmePaths, fullchain: bytes, key: bytes) -> LoadedCertificate:
    """Check a new certificate, then write it (key first) into C{state_dir}; blocking."""
    from pingated.tls import parse_certificate

    certificate = parse_certificate(fullchain, key, "(issued certificate)", "(new key)")
    _write_private(paths.privkey, key, 0o600)
    _write_private(paths.fullchain, fullchain, 0o644)
    return certificate


def _account_key(paths: AcmePaths) -> Any:
    try:
        with open(paths.account_key, "rb") as f:
            return serialization.load_pem_private_key(f.read(), password=None)
    except FileNotFoundError:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(paths.account_key, pem, 0o600)
        return key


def _describe_failure(error: Exception) -> str:
    from acme import errors

    if isinstance(error, errors.ValidationError):
        reasons = []
        for authzr in error.failed_authzrs:
            detail = "; ".join(
                str(c.error.detail or c.error.typ) for c in authzr.body.challenges if c.error
            )
            reasons.append(f"{authzr.body.identifier.value}: {detail}")
        return "validation failed: " + ", ".join(reasons)
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def issue_certificate(
    config: AcmeConfig, paths: AcmePaths, challenges: ChallengeStore
) -> tuple[bytes, bytes]:
    """
    Run one ACME order with HTTP-01 for C{config.hosts} (blocking; run in a thread).

    The account key is created on first use and reused; a fresh certificate
    key is made for every order.  Raises L{AcmeError} with one line.
    """
    from acme import challenges as acme_challenges
    from acme import client, crypto_util, errors, messages
    from josepy.jwa import ES256, RS256, JWASignature
    from josepy.jwk import JWK, JWKEC, JWKRSA

    account_key = _account_key(paths)
    if isinstance(account_key, ec.EllipticCurvePrivateKey):
        jwk: JWK = JWKEC(key=account_key)
        alg: JWASignature = ES256
    else:
        jwk = JWKRSA(key=account_key)
        alg = RS256
    verify: Any = config.ca_file or True
    network = client.ClientNetwork(
        jwk, alg=alg, verify_ssl=cast(bool, verify), user_agent="pingated", timeout=30
    )
    published: list[str] = []
    try:
        directory = client.ClientV2.get_directory(config.directory, network)
        acme = client.ClientV2(directory, network)
        registration = messages.NewRegistration.from_data(
            email=config.email or None, terms_of_service_agreed=True
        )
        try:
            acme.new_account(registration)
        except errors.ConflictError as existing:
            acme.query_registration(
                messages.RegistrationResource(uri=existing.location, body=messages.Registration())
            )
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        order = acme.new_order(crypto_util.make_csr(key_pem, list(config.hosts)))
        for authorization in order.authorizations:
            if authorization.body.status == messages.STATUS_VALID:
                continue  # the CA remembers an earlier validation
            offered = [
                c for c in authorization.body.challenges
                if isinstance(c.chall, acme_challenges.HTTP01)
            ]
            if not offered:
                raise AcmeError(
                    f"the CA offers no http-01 challenge for {authorization.body.identifier.value}"
                )
            challenge = offered[0]
            response, validation = challenge.chall.response_and_validation(network.key)
            token = challenge.chall.encode("token")
            challenges.publish(token, validation)
            published.append(token)
            acme.answer_challenge(challenge, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=90)
        order = acme.poll_and_finalize(order, deadline)
        fullchain = order.fullchain_pem
        if not fullchain:
            raise AcmeError("the CA finished the order without a certificate")
        return fullchain.encode("ascii"), key_pem
    except AcmeError:
        raise
    except Exception as e:
        raise AcmeError(_describe_failure(e)) from None
    finally:
        for token in published:
            challenges.withdraw(token)
        network.session.close()


@attrs.frozen
class _Decision:
    reason: str | None
    certificate: LoadedCertificate | None


class AcmeManager:
    """
    Keeps the ACME certificate fresh: obtains it when missing, renews it in time.

    A check runs at start, after every reload (L{update}) and on a timer:
    at C{check_interval}, or earlier when the renewal point
    (C{not_after - renew_before}) comes sooner.  Failures are logged and
    retried with a doubling delay (5 minutes up to C{check_interval}), so a
    misconfigured gate does not hammer the CA's rate limits.
    """

    def __init__(
        self,
        config: AcmeConfig,
        state_dir: str,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        on_certificate: Callable[[], object],
        challenges: ChallengeStore,
        issuer: Issuer = issue_certificate,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.on_certificate = on_certificate
        self.challenges = challenges
        self.issuer = issuer
        self.retry_delay = FIRST_RETRY
        self._call: IDelayedCall | None = None
        self._running: Deferred[None] | None = None
        self._again = False
        self._stopped = True

    def start(self) -> None:
        """Begin checking (the first check happens at once, on the next reactor turn)."""
        self._stopped = False
        self._schedule(0)

    def stop(self) -> None:
        """No more checks; one already talking to the CA finishes on its own."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def update(self, config: AcmeConfig) -> None:
        """A reload: use C{config} and check again (new hosts get a new certificate)."""
        self.config = config
        self.retry_delay = FIRST_RETRY
        self.check()

    def _schedule(self, delay: float) -> None:
        if self._stopped:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self.clock.callLater(delay, self.check)

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    def check(self) -> Deferred[None]:
        """Renew now if needed; the Deferred fires when this check is over."""
        if self._running is not None:
            self._again = True
            return self._running
        config, paths = self.config, AcmePaths.of(self.config, self.state_dir)
        deciding: Deferred[_Decision] = self.run_in_thread(self._decide, config, paths, self._now())
        running: Deferred[None] = deciding.addCallback(self._act, config, paths)
        running.addErrback(self._failed)
        running.addBoth(self._finished)
        if not running.called:
            self._running = running
        return running

    @staticmethod
    def _decide(config: AcmeConfig, paths: AcmePaths, now: datetime.datetime) -> _Decision:
        try:
            stored = load_stored(paths)
        except CertificateFileError as e:
            return _Decision(f"stored certificate unusable ({e.problem})", None)
        return _Decision(renewal_reason(stored, config, now), stored)

    def _act(self, decision: _Decision, config: AcmeConfig, paths: AcmePaths) -> Deferred[None]:
        if decision.reason is None:
            assert decision.certificate is not None
            self._schedule(self._next_check(decision.certificate))
            self.retry_delay = FIRST_RETRY
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        log.info(
            "acme: requesting a certificate for {hosts} from {directory}: {reason}",
            hosts=", ".join(config.hosts),
            directory=config.directory,
            reason=decision.reason,
        )
        issuing: Deferred[LoadedCertificate] = self.run_in_thread(
            self._obtain, config, paths
        )
        return issuing.addCallback(self._obtained, config)

    def _obtain(self, config: AcmeConfig, paths: AcmePaths) -> LoadedCertificate:
        fullchain, key = self.issuer(config, paths, self.challenges)
        try:
            return store_certificate(paths, fullchain, key)
        except CertificateFileError as e:
            raise AcmeError(f"the CA sent an unusable certificate ({e.problem})") from None

    def _obtained(self, certificate: LoadedCertificate, config: AcmeConfig) -> None:
        log.info(
            "acme: new certificate for {hosts}, serial {serial:x}, valid until {until} UTC",
            hosts=", ".join(certificate.names),
            serial=certificate.serial,
            until=f"{certificate.not_after:%Y-%m-%d %H:%M}",
        )
        self.retry_delay = FIRST_RETRY
        self._schedule(self._next_check(certificate))
        self.on_certificate()

    def _failed(self, failure: Failure) -> None:
        if failure.check(AcmeError):
            why = str(failure.value)
        else:
            why = f"{type(failure.value).__name__}: {failure.value}"
        log.error(
            "acme: could not obtain a certificate for {hosts}: {why}; retrying in {delay:.0f}s",
            hosts=", ".join(self.config.hosts),
            why=why,
            delay=self.retry_delay,
        )
        self._schedule(self.retry_delay)
        self.retry_delay = min(self.retry_delay * 2, float(self.config.check_interval))

    def _finished(self, result: object) -> None:
        self._running = None
        if self._again and not self._stopped:
            self._again = False
            self.check()

    def _next_check(self, certificate: LoadedCertificate) -> float:
        renew_at = certificate.not_after - datetime.timedelta(seconds=self.config.renew_before)
        until_renewal = (renew_at - self._now()).total_seconds()
        return max(60.0, min(float(self.config.check_interval), until_renewal))
