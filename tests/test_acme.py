"""
Issue 8, ACME decisions in memory: when certificates are obtained and renewed,
what happens after failures, where files go -- with C{task.Clock} and a fake
issuer standing in for the CA (the real CA exchange is in test_acme_pebble).
"""

from __future__ import annotations

import datetime
import os
import stat
from typing import Any

import pytest
from tls_certs import NOW, Pki, cert_pem, key_pem, make_leaf
from twisted.internet.task import Clock

from pingated.acme import (
    AcmeError,
    AcmeManager,
    AcmePaths,
    ChallengeStore,
    current_certificate,
    renewal_reason,
)
from pingated.config import AcmeConfig
from pingated.threads import run_inline
from pingated.tls import read_certificate

DAY = 86400.0


class FakeIssuer:
    """Mints certificates from the test PKI; can be told to fail."""

    def __init__(self, pki: Pki, days: float = 90) -> None:
        self.pki = pki
        self.days = days
        self.clock: Clock | None = None
        self.calls: list[tuple[str, ...]] = []
        self.failures = 0

    def __call__(
        self, config: AcmeConfig, paths: AcmePaths, challenges: ChallengeStore
    ) -> tuple[bytes, bytes]:
        self.calls.append(config.hosts)
        if self.failures:
            self.failures -= 1
            raise AcmeError("validation failed: a.test: connection refused")
        now = NOW
        if self.clock is not None:  # the CA's idea of "now" follows the test's clock
            now = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)
        cert, key = make_leaf(self.pki.intermediate, list(config.hosts), days=self.days, now=now)
        return cert_pem(cert) + cert_pem(self.pki.intermediate.cert), key_pem(key)


@pytest.fixture
def pki(tmp_path: Any) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    return Pki.create(str(directory))


def _config(**changes: Any) -> AcmeConfig:
    values: dict[str, Any] = {
        "directory": "https://127.0.0.1:14000/dir",
        "hosts": ("a.test", "www.a.test"),
        "renew_before": int(30 * DAY),
        "check_interval": int(DAY / 2),
    }
    values.update(changes)
    return AcmeConfig(**values)


def _manager(
    tmp_path: Any, issuer: FakeIssuer, config: AcmeConfig | None = None
) -> tuple[AcmeManager, Clock, list[int]]:
    clock = Clock()
    clock.advance(NOW.timestamp())
    issuer.clock = clock
    reloads: list[int] = []
    manager = AcmeManager(
        config or _config(),
        str(tmp_path / "state"),
        clock,
        run_inline,
        lambda: reloads.append(1),
        ChallengeStore(),
        issuer,
    )
    return manager, clock, reloads


def _stored(tmp_path: Any, config: AcmeConfig | None = None) -> Any:
    paths = AcmePaths.of(config or _config(), str(tmp_path / "state"))
    return read_certificate(paths.fullchain, paths.privkey)


def test_obtains_on_start_when_missing(tmp_path: Any, pki: Pki) -> None:
    """No stored certificate: the first check obtains one, stores it, reloads listeners."""
    issuer = FakeIssuer(pki)
    manager, clock, reloads = _manager(tmp_path, issuer)
    manager.start()
    assert issuer.calls == []  # the first check waits for the reactor to run
    clock.advance(0)
    assert issuer.calls == [("a.test", "www.a.test")]
    assert reloads == [1]
    stored = _stored(tmp_path)
    assert stored.names == ("a.test", "www.a.test")
    paths = AcmePaths.of(_config(), str(tmp_path / "state"))
    assert stat.S_IMODE(os.stat(paths.privkey).st_mode) == 0o600
    assert paths.fullchain.endswith(os.path.join("state", "acme", "a.test", "fullchain.pem"))
    # Valid for 90 days, renewing 30 days before: nothing to do at the next checks.
    clock.advance(DAY / 2)
    assert len(issuer.calls) == 1


def test_renews_on_the_timer_before_expiry(tmp_path: Any, pki: Pki) -> None:
    """A stored certificate is renewed when the clock reaches not_after - renew_before."""
    issuer = FakeIssuer(pki, days=40)
    manager, clock, reloads = _manager(tmp_path, issuer)
    manager.start()
    clock.advance(0)
    first = _stored(tmp_path).serial
    assert len(issuer.calls) == 1
    for _ in range(19):  # 9.5 days of twice-daily checks: still 30+ days left
        clock.advance(DAY / 2)
    assert len(issuer.calls) == 1
    for _ in range(3):
        clock.advance(DAY / 2)
    assert len(issuer.calls) == 2
    assert _stored(tmp_path).serial != first
    assert reloads == [1, 1]


def test_failures_are_retried_with_backoff(tmp_path: Any, pki: Pki) -> None:
    """A CA failure keeps the old state, retries after 5 min, then 10 min, then succeeds."""
    issuer = FakeIssuer(pki)
    issuer.failures = 2
    manager, clock, reloads = _manager(tmp_path, issuer)
    manager.start()
    clock.advance(0)
    assert len(issuer.calls) == 1 and reloads == []
    clock.advance(299)
    assert len(issuer.calls) == 1
    clock.advance(1)
    assert len(issuer.calls) == 2
    clock.advance(599)
    assert len(issuer.calls) == 2
    clock.advance(1)
    assert len(issuer.calls) == 3
    assert reloads == [1]


def test_new_hosts_after_reload_get_a_new_certificate(tmp_path: Any, pki: Pki) -> None:
    """update() with a host the stored certificate lacks obtains a new one at once."""
    issuer = FakeIssuer(pki)
    manager, clock, _ = _manager(tmp_path, issuer)
    manager.start()
    clock.advance(0)
    manager.update(_config())  # same hosts: nothing to do
    assert len(issuer.calls) == 1
    manager.update(_config(hosts=("a.test", "www.a.test", "b.a.test")))
    assert issuer.calls[-1] == ("a.test", "www.a.test", "b.a.test")


def test_forced_renewal_by_renew_before(tmp_path: Any, pki: Pki) -> None:
    """A renew_before longer than the remaining lifetime renews on the next check."""
    issuer = FakeIssuer(pki)
    manager, clock, _ = _manager(tmp_path, issuer)
    manager.start()
    clock.advance(0)
    manager.update(_config(renew_before=int(3650 * DAY)))
    assert len(issuer.calls) == 2


def test_stop_cancels_the_timer(tmp_path: Any, pki: Pki) -> None:
    """After stop() nothing is scheduled."""
    issuer = FakeIssuer(pki)
    manager, clock, _ = _manager(tmp_path, issuer)
    manager.start()
    manager.stop()
    clock.advance(DAY)
    assert issuer.calls == []
    assert clock.getDelayedCalls() == []


def test_renewal_reason(pki: Pki) -> None:
    """Missing, not covering the hosts, or expiring soon: each says why."""
    cert, key = make_leaf(pki.intermediate, ["a.test", "www.a.test"], days=10)
    from pingated.tls import parse_certificate

    loaded = parse_certificate(cert_pem(cert), key_pem(key))
    assert renewal_reason(None, _config(), NOW) == "no certificate yet"
    assert "does not cover b.test" in (
        renewal_reason(loaded, _config(hosts=("a.test", "b.test")), NOW) or ""
    )
    assert "expires" in (renewal_reason(loaded, _config(), NOW) or "")
    assert renewal_reason(loaded, _config(renew_before=int(5 * DAY)), NOW) is None


def test_current_certificate_falls_back_to_self_signed(tmp_path: Any, pki: Pki) -> None:
    """Before the first issuance (or with a broken store) a stand-in covers the hosts."""
    config = _config()
    state = str(tmp_path / "state")
    stand_in, note = current_certificate(config, state, NOW)
    assert stand_in.names == ("a.test", "www.a.test")
    assert stand_in.leaf.issuer == stand_in.leaf.subject
    assert note == "no ACME certificate yet"
    paths = AcmePaths.of(config, state)
    os.makedirs(paths.certificate_dir)
    cert, key = make_leaf(pki.intermediate, ["a.test", "www.a.test"])
    _, other = make_leaf(pki.intermediate, ["x.test"])
    with open(paths.fullchain, "wb") as f:
        f.write(cert_pem(cert))
    with open(paths.privkey, "wb") as f:
        f.write(key_pem(other))
    _, note = current_certificate(config, state, NOW)
    assert note is not None and "does not match" in note
    with open(paths.privkey, "wb") as f:
        f.write(key_pem(key))
    stored, note = current_certificate(config, state, NOW)
    assert (stored.serial, note) == (cert.serial_number, None)


def test_challenge_store() -> None:
    """Tokens are served while published and gone once withdrawn."""
    store = ChallengeStore()
    store.publish("t", "t.k")
    assert store.lookup("t") == "t.k"
    store.withdraw("t")
    assert store.lookup("t") is None
    store.withdraw("t")


def test_lifetime_constants_are_sane() -> None:
    """The stand-in lives long enough to bridge a CA outage but not for years."""
    from pingated.acme import FALLBACK_LIFETIME

    assert datetime.timedelta(days=1) <= FALLBACK_LIFETIME <= datetime.timedelta(days=30)
