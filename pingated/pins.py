# -*- test-case-name: tests.test_pins -*-
"""
PIN hashing and verification with argon2id.

Argon2 is slow on purpose, so verification never runs on the reactor: it
goes to a small thread pool, and when that pool is saturated new attempts are
refused at once (L{VerifierBusy}) instead of queueing without bound, so a
login flood cannot delay proxied traffic.
"""

from __future__ import annotations

import itertools

import attrs
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet.defer import Deferred

from pingated.threads import RunInThread

_HASHER = PasswordHasher()


class VerifierBusy(Exception):
    """Too many PIN checks are already running; the caller should answer 503."""


def hash_pin(pin: str) -> str:
    """An argon2id hash for the config's C{gate.pin_hash}."""
    return _HASHER.hash(pin)


def _verify(pin_hash: str, pin: str) -> bool:
    try:
        return _HASHER.verify(pin_hash, pin)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


@attrs.define(repr=False)
class PinVerifier:
    """Checks PINs against one hash, at most C{max_pending} at a time."""

    pin_hash: str
    run_in_thread: RunInThread
    max_pending: int = 8
    _pending: int = 0

    def __repr__(self) -> str:
        return f"PinVerifier(pending={self._pending})"

    @property
    def pending(self) -> int:
        """How many checks are running or queued now."""
        return self._pending

    def verify(self, pin: str) -> Deferred[bool]:
        """Fires True for the right PIN; fails with L{VerifierBusy} when saturated."""
        if self._pending >= self.max_pending:
            raise VerifierBusy()
        if not pin or len(pin) > 128:
            # Nothing to hash: refuse without spending a thread on it.
            d: Deferred[bool] = Deferred()
            d.callback(False)
            return d
        self._pending += 1

        def done(result: bool) -> bool:
            self._pending -= 1
            return result

        def failed(failure: object) -> bool:
            self._pending -= 1
            return False

        return self.run_in_thread(_verify, self.pin_hash, pin).addCallbacks(done, failed)


_COMMON_PINS = frozenset(
    {
        "123456",
        "654321",
        "111111",
        "000000",
        "121212",
        "112233",
        "123123",
        "696969",
        "159753",
        "147258",
        "789456",
        "123321",
        "666666",
        "112358",
        "102030",
        "131313",
        "101010",
        "121314",
        "202020",
        "222333",
        "100200",
        "010101",
        "555555",
        "777777",
        "888888",
        "999999",
        "1234567",
        "12345678",
        "password",
        "qwerty",
        "abc123",
        "letmein",
    }
)


def weak_pin_reason(pin: str) -> str | None:
    """
    Why C{pin} is too easy to guess, or None when it is acceptable.

    The daemon only ever sees the hash, so this check lives in C{hash-pin}.
    """
    if len(pin) < 6:
        return "must be at least 6 characters"
    if len(set(pin)) == 1:
        return "must not be one repeated character"
    if pin.isdigit():
        steps = {int(b) - int(a) for a, b in itertools.pairwise(pin)}
        if steps in ({1}, {-1}, {9, -1}, {-9, 1}):
            return "must not be an ascending or descending run"
        half = len(pin) // 2
        if len(pin) % 2 == 0 and pin[:half] == pin[half:] and len(set(pin[:half])) <= 2:
            return "must not be a short repeated pattern"
    if pin.lower() in _COMMON_PINS:
        return "is one of the most common PINs"
    return None
