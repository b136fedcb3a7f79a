"""
Tests for L{pingated.throttle}: per-address lockout with escalation, the
global limit, in-flight checks, persistence in C{state_dir}, and the
expected brute-force time the defaults promise (contract section 2,
docs/security.md).

Time is a L{Clock}; state-file writes run inline or through a hand-driven
fake, so nothing here sleeps or starts a thread.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from doubles import HeldThreads
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from pingated.config import ConfigError, ThrottleConfig, parse_config
from pingated.pins import weak_pin_reason
from pingated.threads import run_inline
from pingated.throttle import (
    ESCALATION_MEMORY,
    MAX_LOCKOUT,
    STATE_FILE,
    Throttle,
    ThrottleStore,
    throttle_key,
)

START = 1_700_000_000.0
YEAR = 365 * 86400


def _clock() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


def _fail(throttle: Throttle, ip: str) -> int | None:
    """One full wrong-PIN attempt the way the gate makes it."""
    assert throttle.retry_after(ip) is None, f"{ip} was not allowed to try"
    throttle.begin(ip)
    return throttle.record_failure(ip)


# --- per-address limit -------------------------------------------------------


def test_lockout_after_max_failures() -> None:
    """The fifth wrong PIN locks the address out for C{lockout} seconds."""
    clock = _clock()
    throttle = Throttle(ThrottleConfig(), clock)
    for _ in range(4):
        assert _fail(throttle, "203.0.113.7") is None
    assert _fail(throttle, "203.0.113.7") == 900
    assert throttle.retry_after("203.0.113.7") == 900
    clock.advance(600)
    assert throttle.retry_after("203.0.113.7") == 300
    # Another address is not affected.
    assert throttle.retry_after("203.0.113.8") is None


def test_lockout_expires() -> None:
    """Once the lockout is over the address may try again."""
    clock = _clock()
    throttle = Throttle(ThrottleConfig(lockout=60), clock)
    for _ in range(5):
        _fail(throttle, "203.0.113.7")
    clock.advance(59)
    assert throttle.retry_after("203.0.113.7") == 1
    clock.advance(1)
    assert throttle.retry_after("203.0.113.7") is None


def test_failures_outside_window_do_not_count() -> None:
    """Four failures, a pause longer than C{window}, four more: no lockout."""
    clock = _clock()
    throttle = Throttle(ThrottleConfig(), clock)
    for _ in range(4):
        _fail(throttle, "203.0.113.7")
    clock.advance(601)
    for _ in range(4):
        assert _fail(throttle, "203.0.113.7") is None
    assert throttle.retry_after("203.0.113.7") is None


def test_repeat_offenders_wait_twice_as_long_up_to_a_day() -> None:
    """Each further lockout doubles, capped at MAX_LOCKOUT."""
    clock = _clock()
    throttle = Throttle(ThrottleConfig(), clock)
    seen = []
    for _ in range(10):
        for _ in range(4):
            _fail(throttle, "203.0.113.7")
        seen.append(_fail(throttle, "203.0.113.7"))
        clock.advance(seen[-1] or 0)
    assert seen[:4] == [900, 1800, 3600, 7200]
    assert max(s or 0 for s in seen) == MAX_LOCKOUT == 86400
    assert seen[-1] == MAX_LOCKOUT


def test_escalation_is_forgotten_after_a_quiet_day() -> None:
    """An address that stays quiet for ESCALATION_MEMORY starts from the base lockout."""
    clock = _clock()
    throttle = Throttle(ThrottleConfig(), clock)
    for _ in range(5):
        _fail(throttle, "203.0.113.7")
    clock.advance(900 + ESCALATION_MEMORY + 1)
    _fail(throttle, "198.51.100.1")  # any failure sweeps stale entries
    assert len(throttle) == 1
    for _ in range(4):
        _fail(throttle, "203.0.113.7")
    assert _fail(throttle, "203.0.113.7") == 900


def test_right_pin_resets_the_address() -> None:
    """record_success clears the count (but not the global budget)."""
    clock = _clock()
    throttle = Throttle(ThrottleConfig(global_max_failures=6), clock)
    for _ in range(4):
        _fail(throttle, "203.0.113.7")
    throttle.begin("203.0.113.7")
    throttle.record_success("203.0.113.7")
    for _ in range(2):
        assert _fail(throttle, "203.0.113.7") is None
    # 6 wrong PINs in total: the global budget is spent even so.
    assert throttle.retry_after("198.51.100.1") is not None


def test_ipv6_counts_per_64() -> None:
    """Cycling through a /64 does not give an IPv6 attacker fresh budgets."""
    clock = _clock()
    throttle = Throttle(ThrottleConfig(), clock)
    for host in range(1, 6):
        _fail(throttle, f"2001:db8:1:2::{host}")
    assert throttle.retry_after("2001:db8:1:2::99") == 900
    assert throttle.retry_after("2001:db8:1:3::1") is None
    assert throttle_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert throttle_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert throttle_key("unix") == "unix"


# --- global limit ------------------------------------------------------------


def test_global_limit_across_many_addresses() -> None:
    """50 wrong PINs from 50 addresses lock everybody out until the window has room."""
    clock = _clock()
    throttle = Throttle(ThrottleConfig(), clock)
    for n in range(50):
        _fail(throttle, f"10.0.{n // 256}.{n % 256}")
        clock.advance(10)
    # A brand-new address is refused: the global budget is spent.
    retry = throttle.retry_after("192.0.2.200")
    assert retry is not None
    # The first failure happened 500 s ago; it leaves the 1 h window in 3100 s.
    assert retry == 3600 - 500
    clock.advance(retry - 1)
    assert throttle.retry_after("192.0.2.200") == 1
    clock.advance(1)
    assert throttle.retry_after("192.0.2.200") is None


def test_in_flight_checks_count() -> None:
    """Checks still running count, so a concurrent burst cannot overshoot either limit."""
    clock = _clock()
    throttle = Throttle(ThrottleConfig(max_failures=3, global_max_failures=5), clock)
    for _ in range(3):
        assert throttle.retry_after("203.0.113.7") is None
        throttle.begin("203.0.113.7")
    assert throttle.retry_after("203.0.113.7") == 1
    for n in range(2):
        throttle.begin(f"198.51.100.{n}")
    assert throttle.retry_after("192.0.2.1") == 1
    # They all fail: now a real lockout and a spent global budget.
    for _ in range(3):
        throttle.record_failure("203.0.113.7")
    assert throttle.retry_after("203.0.113.7") == 900
    for n in range(2):
        throttle.record_failure(f"198.51.100.{n}")
    assert throttle.retry_after("192.0.2.1") == 3600


def test_success_ends_the_in_flight_check() -> None:
    """A right PIN releases its slot: the address is free again at once."""
    clock = _clock()
    throttle = Throttle(ThrottleConfig(max_failures=1), clock)
    throttle.begin("203.0.113.7")
    assert throttle.retry_after("203.0.113.7") == 1
    throttle.record_success("203.0.113.7")
    assert throttle.retry_after("203.0.113.7") is None


# --- the promise in docs/security.md ----------------------------------------


def test_defaults_make_a_six_digit_pin_take_over_a_year() -> None:
    """
    Expected brute-force time for an attacker with unlimited addresses.

    Per-address limits do not matter to such an attacker; the global budget
    does.  The PINs `hash-pin` refuses are excluded from the space (an
    attacker who knows our rules skips them), and on average half of what
    is left must be tried.  If anyone loosens the defaults below the
    promise, this fails.
    """
    defaults = ThrottleConfig()
    allowed = sum(1 for n in range(10**6) if weak_pin_reason(f"{n:06d}") is None)
    assert allowed > 990_000  # the weak-PIN rules remove under 1%
    expected_guesses = allowed / 2
    guesses_per_second = defaults.global_max_failures / defaults.global_window
    expected_seconds = expected_guesses / guesses_per_second
    assert expected_seconds >= YEAR, f"{expected_seconds / YEAR:.2f} years"
    # The figure docs/security.md quotes.
    assert round(expected_seconds / 86400) in range(410, 420)


def test_simulated_attack_gets_no_more_than_the_global_rate() -> None:
    """
    Simulate the attack the figure assumes: every second a fresh address
    tries, as many checks in flight as the gate allows (8).  Over two
    simulated days it gets at most global_max_failures per global_window.
    """
    defaults = ThrottleConfig()
    clock = _clock()
    throttle = Throttle(defaults, clock)
    in_flight: list[str] = []
    checked = 0
    for second in range(2 * 86400):
        ip = f"10.{second // 65536 % 256}.{second // 256 % 256}.{second % 256}"
        while len(in_flight) < 8 and throttle.retry_after(ip) is None:
            throttle.begin(ip)
            in_flight.append(ip)
            checked += 1
        # Checks finish within the second.
        for done in in_flight:
            throttle.record_failure(done)
        in_flight.clear()
        clock.advance(1)
    windows = 2 * 86400 / defaults.global_window
    assert checked <= defaults.global_max_failures * (windows + 1)
    assert checked >= defaults.global_max_failures * (windows - 1)  # the sim is not vacuous


# --- persistence ---------------------------------------------------------------


def test_counters_survive_a_restart(tmp_path: Path) -> None:
    """A lockout and partial counts are read back by the next process."""
    clock = _clock()
    throttle = Throttle.load(str(tmp_path), ThrottleConfig(), clock, run_inline)
    for _ in range(5):
        _fail(throttle, "203.0.113.7")
    for _ in range(3):
        _fail(throttle, "198.51.100.1")
    clock.advance(100)

    again = Throttle.load(str(tmp_path), ThrottleConfig(), clock, run_inline)
    assert again.retry_after("203.0.113.7") == 800
    assert again.retry_after("198.51.100.1") is None
    _fail(again, "198.51.100.1")
    assert _fail(again, "198.51.100.1") == 900  # 3 saved + 2 new = 5
    assert again.retry_after("192.0.2.1") is None


def test_global_budget_survives_a_restart(tmp_path: Path) -> None:
    """Restarting the daemon does not hand out a fresh global budget."""
    clock = _clock()
    config = ThrottleConfig(global_max_failures=3)
    throttle = Throttle.load(str(tmp_path), config, clock, run_inline)
    for n in range(3):
        _fail(throttle, f"10.0.0.{n}")
    again = Throttle.load(str(tmp_path), config, clock, run_inline)
    assert again.retry_after("10.9.9.9") == 3600


def test_success_is_saved_too(tmp_path: Path) -> None:
    """A reset by the right PIN is not undone by a restart."""
    clock = _clock()
    throttle = Throttle.load(str(tmp_path), ThrottleConfig(), clock, run_inline)
    for _ in range(4):
        _fail(throttle, "203.0.113.7")
    throttle.begin("203.0.113.7")
    throttle.record_success("203.0.113.7")
    again = Throttle.load(str(tmp_path), ThrottleConfig(), clock, run_inline)
    assert len(again) == 0


def test_expired_state_is_dropped_on_load(tmp_path: Path) -> None:
    """Entries older than the windows and escalation memory are not carried forever."""
    clock = _clock()
    throttle = Throttle.load(str(tmp_path), ThrottleConfig(), clock, run_inline)
    for _ in range(5):
        _fail(throttle, "203.0.113.7")
    clock.advance(900 + ESCALATION_MEMORY + 1)
    again = Throttle.load(str(tmp_path), ThrottleConfig(), clock, run_inline)
    assert len(again) == 0
    assert again.snapshot()["global_failures"] == []


def test_state_file_is_private(tmp_path: Path) -> None:
    """The state file is readable by pingated's user only."""
    clock = _clock()
    throttle = Throttle.load(str(tmp_path / "state"), ThrottleConfig(), clock, run_inline)
    _fail(throttle, "203.0.113.7")
    mode = os.stat(tmp_path / "state" / STATE_FILE).st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"version": 99}',
        b'{"version": 1, "global_failures": "x", "addresses": []}',
        b'{"version": 1, "global_failures": [1e999, "a", null, true],'
        b' "addresses": {"1.2.3.4": {"failures": "x", "locked_until": "soon", "lockouts": -3},'
        b' "5.6.7.8": 7}}',
    ],
)
def test_damaged_state_file_starts_empty(tmp_path: Path, content: bytes) -> None:
    """A damaged file never stops the gate from starting; it is rewritten on the next save."""
    (tmp_path / STATE_FILE).write_bytes(content)
    clock = _clock()
    throttle = Throttle.load(str(tmp_path), ThrottleConfig(), clock, run_inline)
    assert throttle.retry_after("1.2.3.4") is None
    _fail(throttle, "1.2.3.4")
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert saved["version"] == 1
    assert list(saved["addresses"]) == ["1.2.3.4"]


def test_unwritable_state_dir_fails_at_start(tmp_path: Path) -> None:
    """An unusable state_dir is an OSError at load (tap turns it into a ConfigError)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        Throttle.load(str(blocker / "state"), ThrottleConfig(), _clock(), run_inline)


def test_writes_are_coalesced_and_off_the_caller(tmp_path: Path) -> None:
    """Many failures while a write runs cause one more write, with the latest state."""
    threads = HeldThreads()
    store = ThrottleStore(str(tmp_path / STATE_FILE), threads)
    clock = _clock()
    throttle = Throttle(ThrottleConfig(max_failures=100), clock, store)
    _fail(throttle, "10.0.0.1")
    assert len(threads.calls) == 1
    assert not (tmp_path / STATE_FILE).exists()  # nothing written on the caller's thread
    for _ in range(20):
        _fail(throttle, "10.0.0.1")
    assert len(threads.calls) == 1
    idle: list[bool] = []
    store.when_idle(lambda: idle.append(True))
    threads.run_one()
    assert len(threads.calls) == 1  # exactly one follow-up write
    assert not idle
    threads.run_one()
    assert idle == [True]
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert len(saved["addresses"]["10.0.0.1"]["failures"]) == 21


def test_failed_write_is_logged_not_raised(tmp_path: Path) -> None:
    """A full disk must not break logins: the error is logged and the next save retries."""

    def broken(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        d.errback(OSError(28, "No space left on device"))
        return d

    store = ThrottleStore(str(tmp_path / STATE_FILE), broken)
    throttle = Throttle(ThrottleConfig(), _clock(), store)
    assert _fail(throttle, "10.0.0.1") is None
    assert not store.saving


# --- configuration -------------------------------------------------------------


def _config(throttle: str) -> str:
    from argon2 import PasswordHasher

    pin_hash = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("246810")
    return (
        f'[gate]\npin_hash = "{pin_hash}"\nsecret = "{"s" * 40}"\n'
        f"[gate.throttle]\n{throttle}\n"
        '[upstream]\nurl = "http://127.0.0.1:1"\n'
    )


@pytest.mark.parametrize("key", ["window", "lockout", "global_window"])
def test_zero_windows_are_refused(key: str) -> None:
    """A zero window or lockout would switch the protection off silently."""
    with pytest.raises(ConfigError) as e:
        parse_config(_config(f"{key} = 0"), "t.toml")
    assert str(e.value) == f"t.toml: gate.throttle.{key}: must be at least 1 second"


def test_throttle_defaults_match_the_contract() -> None:
    """Contract section 2: 5 per 10 min, 15 min lockout, 50 per hour globally."""
    config = parse_config(_config(""), "t.toml")
    assert config.gate.throttle == ThrottleConfig(
        max_failures=5, window=600, lockout=900, global_max_failures=50, global_window=3600
    )
