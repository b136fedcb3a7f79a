# -*- test-case-name: tests.test_security_pins -*-
"""
PIN hashing and verification with argon2id.

Argon2 is slow on purpose, so verification never runs on the reactor: it
goes to a small thread pool, and when that pool is saturated new attempts are
refused at once (L{VerifierBusy}) instead of queueing without bound, so a
login flood cannot delay proxied traffic.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet.defer import Deferred

from pingated.threads import RunInThread

_HASHER = PasswordHasher()
T = TypeVar("T")


def low_priority(run_in_thread: RunInThread) -> RunInThread:
    """
    A L{RunInThread} whose work runs at a lower CPU priority (nice +10).

    For the threads that verify PINs: argon2 is slow on purpose and spreads
    over every core, and the scheduler must prefer the reactor thread that
    serves proxied traffic.  Linux sets niceness per thread, and the threads
    argon2 starts for its lanes inherit it.  Elsewhere this is a no-op.
    """

    def run(f: Callable[..., T], *args: Any) -> Deferred[T]:
        return run_in_thread(_deprioritised, f, *args)

    return run


_PIN_NICENESS = 10


def _deprioritised(f: Callable[..., T], *args: Any) -> T:
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < _PIN_NICENESS:
            os.setpriority(os.PRIO_PROCESS, tid, _PIN_NICENESS)
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: run at normal priority
    return f(*args)


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
        # Keypad shapes, counting patterns and culturally common choices.
        "135790",
        "246810",
        "147852",
        "258369",
        "369258",
        "741852",
        "852963",
        "963852",
        "123654",
        "147369",
        "159357",
        "951753",
        "753951",
        "142536",
        "123789",
        "102938",
        "010203",
        "520520",
        "521521",
        "131420",
        "007007",
        "100000",
        "200000",
        "123000",
        "111222",
        "1234567",
        "12345678",
        "password",
        "qwerty",
        "abc123",
        "letmein",
    }
)


_ASCENDING = "0123456789"
_DESCENDING = "9876543210"


def weak_pin_reason(pin: str) -> str | None:
    """
    Why C{pin} is too easy to guess, or None when it is acceptable.

    The daemon only ever sees the hash, so this check lives in C{hash-pin}.
    The rules catch what people pick when asked for a PIN (one digit
    repeated, runs, repeated or mirrored blocks, the most common PINs) while
    refusing well under 1% of 6-digit PINs, so the brute-force estimate in
    docs/security.md still holds for an attacker who knows the rules.
    """
    if len(pin) < 6:
        return "must be at least 6 characters"
    if len(set(pin)) == 1:
        return "must not be one repeated character"
    if pin.lower() in _COMMON_PINS:
        return "is one of the most common PINs"
    if pin in (pin + pin)[1:-1]:
        # A string is a repetition of a shorter block exactly when it occurs
        # inside itself doubled, minus the ends ("123123" in "23123123123").
        return "must not be a short repeated pattern"
    if pin.isdigit():
        cycles = len(pin) // 10 + 2
        if pin in _ASCENDING * cycles or pin in _DESCENDING * cycles:
            return "must not be an ascending or descending run"
        if pin == pin[::-1]:
            return "must not read the same backwards"
        if len(pin) % 2 == 0 and pin[0::2] == pin[1::2]:
            return "must not be doubled digits"
    return None
