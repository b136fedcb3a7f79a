"""
Tests for L{pingated.pins}: the weak-PIN rules C{hash-pin} enforces, the
bounded verifier, and the lowered CPU priority of the verifying threads.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from argon2 import PasswordHasher
from doubles import HeldThreads
from twisted.internet.defer import Deferred

from pingated import cli
from pingated.pins import PinVerifier, VerifierBusy, low_priority, weak_pin_reason
from pingated.threads import run_inline

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.mark.parametrize(
    ("pin", "reason"),
    [
        ("", "must be at least 6 characters"),
        ("12345", "must be at least 6 characters"),
        ("9x8y7", "must be at least 6 characters"),
        ("000000", "must not be one repeated character"),
        ("7777777777", "must not be one repeated character"),
        ("aaaaaa", "must not be one repeated character"),
        ("123456", "is one of the most common PINs"),
        ("654321", "is one of the most common PINs"),
        ("147258", "is one of the most common PINs"),
        ("159753", "is one of the most common PINs"),
        ("PASSWORD", "is one of the most common PINs"),
        ("234567", "must not be an ascending or descending run"),
        ("876543", "must not be an ascending or descending run"),
        ("890123", "must not be an ascending or descending run"),
        ("210987", "must not be an ascending or descending run"),
        ("0123456789", "must not be an ascending or descending run"),
        ("456456", "must not be a short repeated pattern"),
        ("121212", "is one of the most common PINs"),
        ("373737", "must not be a short repeated pattern"),
        ("12341234", "must not be a short repeated pattern"),
        ("abcabc", "must not be a short repeated pattern"),
        ("135531", "must not read the same backwards"),
        ("4800084", "must not read the same backwards"),
        ("335577", "must not be doubled digits"),
    ],
)
def test_weak_pins_refused_with_a_reason(pin: str, reason: str) -> None:
    """Each trivial shape is refused, with a reason an operator understands."""
    assert weak_pin_reason(pin) == reason


@pytest.mark.parametrize(
    "pin",
    ["274915", "835201", "4711x9", "correct horse", "90210455", "103958", "a1b2c3d4", "ñandú-42"],
)
def test_ordinary_pins_accepted(pin: str) -> None:
    """PINs without an obvious pattern pass."""
    assert weak_pin_reason(pin) is None


def test_rules_refuse_under_one_percent_of_six_digit_pins() -> None:
    """
    The rules must stay a sliver: the brute-force estimate in docs/security.md
    (and tests/test_throttle.py) counts only the PINs they accept.  Sampled
    here (every 7th PIN) to stay fast; the throttle test enumerates all.
    """
    sample = [f"{n:06d}" for n in range(0, 10**6, 7)]
    refused = sum(1 for pin in sample if weak_pin_reason(pin) is not None)
    assert 0 < refused / len(sample) < 0.01


@pytest.mark.parametrize("pin", ["12345", "111111", "123123", "246810"])
def test_hash_pin_refuses_weak_without_echoing(pin: str) -> None:
    """The CLI refuses, says why and how to override, and never prints the PIN."""
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["hash-pin"], out=out, err=err, stdin=io.StringIO(pin + "\n"))
    assert code == 1
    assert out.getvalue() == ""
    assert "--allow-weak" in err.getvalue()
    assert pin not in err.getvalue()


def test_hash_pin_allow_weak_hashes_anyway() -> None:
    """--allow-weak is the explicit override (the daemon never sees the PIN)."""
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["hash-pin", "--allow-weak"], out=out, err=err, stdin=io.StringIO("1234\n"))
    assert code == 0, err.getvalue()
    assert PasswordHasher().verify(out.getvalue().strip(), "1234")


def test_verifier_refuses_beyond_max_pending() -> None:
    """The 9th concurrent check raises VerifierBusy at once; slots free up as checks end."""
    held = HeldThreads()
    verifier = PinVerifier(CHEAP.hash("274915"), held)
    results: list[bool] = []
    for _ in range(8):
        verifier.verify("000000").addCallback(results.append)
    assert verifier.pending == 8
    with pytest.raises(VerifierBusy):
        verifier.verify("274915")
    assert len(held.calls) == 8
    held.release()
    assert results == [False] * 8
    assert verifier.pending == 0
    right: list[bool] = []
    verifier.verify("274915").addCallback(right.append)
    held.release()
    assert right == [True]


def test_verifier_skips_hashing_empty_and_huge_pins() -> None:
    """Empty or absurdly long input is refused without spending a thread."""
    held = HeldThreads()
    verifier = PinVerifier(CHEAP.hash("274915"), held)
    for pin in ("", "9" * 129):
        results: list[bool] = []
        verifier.verify(pin).addCallback(results.append)
        assert results == [False]
    assert held.calls == []


def test_verifier_repr_hides_the_hash() -> None:
    """The hash allows offline guessing: it never shows up in a repr."""
    pin_hash = CHEAP.hash("274915")
    assert pin_hash not in repr(PinVerifier(pin_hash, run_inline))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux")
def test_low_priority_lowers_only_the_worker_thread() -> None:
    """Work run through low_priority runs at nice >= 10; the calling thread is untouched."""
    seen: list[int] = []

    def in_thread(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        box: list[Any] = []
        worker = threading.Thread(target=lambda: box.append(f(*args)))
        worker.start()
        worker.join()
        d.callback(box[0])
        return d

    def probe() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = probe()
    low_priority(in_thread)(probe).addCallback(seen.append)
    assert seen and seen[0] >= 10
    assert probe() == before
