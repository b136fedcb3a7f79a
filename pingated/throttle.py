# -*- test-case-name: tests.test_throttle -*-
"""
Brute-force protection for the PIN.

Failures are counted per client address (sliding window, then a lockout that
doubles for repeat offenders) and across all addresses (a global budget per
window), so an attacker with any number of addresses is still bound by the
global limit: with the defaults a 6-digit PIN takes over a year on average
(see docs/security.md and tests/test_throttle.py).

Checks that are still running count against both limits, so a burst of
concurrent guesses cannot slip past the limit while argon2 is busy.  Time
comes from an injected clock (tests use L{twisted.internet.task.Clock}), and
the counters are saved to C{state_dir} off the reactor thread, so a restart
does not hand an attacker a fresh budget.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pingated.config import ThrottleConfig
from pingated.threads import RunInThread

log = Logger(namespace="pingated.throttle")

STATE_FILE = "throttle.json"
_FORMAT_VERSION = 1

# Escalated lockouts double up to this cap (or the configured lockout, if longer).
MAX_LOCKOUT = 86400
# How long an address's escalation is remembered after its last failure or
# lockout; after a quiet day a repeat offender starts from the base lockout.
ESCALATION_MEMORY = 86400
# Expired addresses are swept at most this often (the sweep is O(addresses)).
_PRUNE_INTERVAL = 60.0


def throttle_key(ip: str) -> str:
    """
    The unit an address is counted under.

    IPv6 addresses count per /64 (one customer's allocation, which an attacker
    can cycle through freely); IPv4-mapped IPv6 counts as the IPv4 address.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


@attrs.define
class _AddressState:
    failures: deque[float] = attrs.field(factory=deque)
    locked_until: float = 0.0
    lockouts: int = 0
    last_failure: float = 0.0


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@attrs.define
class ThrottleStore:
    """
    The file in C{state_dir} that keeps the throttle's counters across restarts.

    Writes are whole snapshots (atomic rename), coalesced so that at most one
    is running and one more is pending however fast failures arrive.
    """

    path: str
    run_in_thread: RunInThread
    _saving: bool = False
    _dirty: bool = False
    _snapshot: Callable[[], str] | None = None
    _idle_waiters: list[Callable[[], None]] = attrs.field(factory=list)

    def read(self) -> dict[str, Any] | None:
        """The saved snapshot; None when absent or unreadable (logged, never fatal)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            log.warn("ignoring unreadable throttle state in {path}", path=self.path)
            return None
        if not isinstance(data, dict) or data.get("version") != _FORMAT_VERSION:
            log.warn("ignoring throttle state of an unknown format in {path}", path=self.path)
            return None
        return data

    def check_writable(self) -> None:
        """Fail at start (OSError) rather than on the first failed login."""
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        _write_file(self.path + ".tmp", "")
        os.unlink(self.path + ".tmp")

    def save(self, snapshot: Callable[[], str]) -> None:
        """Write C{snapshot()} soon, off the reactor; calls made meanwhile coalesce."""
        self._snapshot = snapshot
        if self._saving:
            self._dirty = True
            return
        self._saving = True
        text = snapshot()
        self.run_in_thread(_write_file, self.path, text).addErrback(self._failed).addBoth(
            self._done
        )

    @property
    def saving(self) -> bool:
        """True while a write is running or queued."""
        return self._saving

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call C{callback} once nothing is left to write (at once if idle)."""
        if not self._saving:
            callback()
        else:
            self._idle_waiters.append(callback)

    def _failed(self, failure: Failure) -> None:
        log.failure("could not save throttle state to {path}", failure, path=self.path)

    def _done(self, _: object) -> None:
        self._saving = False
        if self._dirty and self._snapshot is not None:
            self._dirty = False
            self.save(self._snapshot)
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter()


def _write_file(path: str, text: str) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@attrs.define
class Throttle:
    """
    Decides whether a login attempt from an address may even be checked.

    The gate asks L{retry_after} first (a number means: answer 429 with that
    Retry-After, do not check the PIN), calls L{begin} when a check starts and
    L{record_failure} or L{record_success} when it ends.
    """

    config: ThrottleConfig
    clock: IReactorTime
    store: ThrottleStore | None = None
    _addresses: dict[str, _AddressState] = attrs.field(factory=dict)
    _global_failures: deque[float] = attrs.field(factory=deque)
    _pending: dict[str, int] = attrs.field(factory=dict)
    _global_pending: int = 0
    _last_prune: float | None = None

    @classmethod
    def load(
        cls,
        state_dir: str,
        config: ThrottleConfig,
        clock: IReactorTime,
        run_in_thread: RunInThread,
    ) -> Throttle:
        """The throttle with the counters saved in C{state_dir}; called once at start."""
        store = ThrottleStore(os.path.join(state_dir, STATE_FILE), run_in_thread)
        store.check_writable()
        throttle = cls(config, clock, store)
        data = store.read()
        if data is not None:
            throttle._restore(data)
        return throttle

    # --- the questions the gate asks -------------------------------------

    def retry_after(self, ip: str) -> int | None:
        """Seconds until C{ip} may try again, or None when it may try now."""
        now = self.clock.seconds()
        key = throttle_key(ip)
        state = self._addresses.get(key)
        in_flight = self._pending.get(key, 0)
        if state is not None:
            if state.locked_until > now:
                return max(1, math.ceil(state.locked_until - now))
            self._expire(state.failures, now, self.config.window)
            if len(state.failures) + in_flight >= self.config.max_failures:
                # Checks still running will use up this address's budget.
                return 1
        elif in_flight >= self.config.max_failures:
            return 1
        self._expire(self._global_failures, now, self.config.global_window)
        if len(self._global_failures) >= self.config.global_max_failures:
            oldest = self._global_failures[-self.config.global_max_failures]
            return max(1, math.ceil(oldest + self.config.global_window - now))
        if len(self._global_failures) + self._global_pending >= self.config.global_max_failures:
            return 1
        return None

    def begin(self, ip: str) -> None:
        """A PIN check for C{ip} has started; it counts until it ends."""
        key = throttle_key(ip)
        self._pending[key] = self._pending.get(key, 0) + 1
        self._global_pending += 1

    def record_failure(self, ip: str) -> int | None:
        """Count a wrong PIN; returns the lockout in seconds if this one triggered it."""
        key = throttle_key(ip)
        self._end(key)
        now = self.clock.seconds()
        self._global_failures.append(now)
        state = self._addresses.setdefault(key, _AddressState())
        self._expire(state.failures, now, self.config.window)
        state.failures.append(now)
        state.last_failure = now
        locked: int | None = None
        if len(state.failures) >= self.config.max_failures:
            state.lockouts += 1
            # Repeat offenders wait twice as long each time, capped at a day.
            cap = max(self.config.lockout, MAX_LOCKOUT)
            lockout = min(self.config.lockout * 2 ** min(state.lockouts - 1, 32), cap)
            state.locked_until = now + lockout
            state.failures.clear()
            locked = int(lockout)
        self._prune(now)
        self._save()
        return locked

    def record_success(self, ip: str) -> None:
        """A right PIN clears that address's history (the global count stays)."""
        key = throttle_key(ip)
        self._end(key)
        if self._addresses.pop(key, None) is not None:
            self._save()

    # --- bookkeeping -------------------------------------------------------

    def __len__(self) -> int:
        """How many addresses are being tracked (for metrics and tests)."""
        return len(self._addresses)

    def snapshot(self) -> dict[str, Any]:
        """Everything that must survive a restart, as JSON-ready data."""
        return {
            "version": _FORMAT_VERSION,
            "global_failures": list(self._global_failures),
            "addresses": {
                key: {
                    "failures": list(state.failures),
                    "locked_until": state.locked_until,
                    "lockouts": state.lockouts,
                    "last_failure": state.last_failure,
                }
                for key, state in self._addresses.items()
            },
        }

    def _restore(self, data: dict[str, Any]) -> None:
        now = self.clock.seconds()
        global_failures = data.get("global_failures")
        if isinstance(global_failures, list):
            times = sorted(t for t in map(_number, global_failures) if t is not None)
            self._global_failures = deque(times[-self.config.global_max_failures * 2 :])
        addresses = data.get("addresses")
        if isinstance(addresses, dict):
            for key, entry in addresses.items():
                state = _restore_address(entry)
                if state is not None and isinstance(key, str):
                    self._addresses[key] = state
        self._expire(self._global_failures, now, self.config.global_window)
        self._last_prune = None
        self._prune(now)

    def _end(self, key: str) -> None:
        count = self._pending.get(key, 0)
        if count > 1:
            self._pending[key] = count - 1
        else:
            self._pending.pop(key, None)
        self._global_pending = max(0, self._global_pending - 1)

    def _prune(self, now: float) -> None:
        if self._last_prune is not None and now - self._last_prune < _PRUNE_INTERVAL:
            return
        self._last_prune = now
        memory = max(ESCALATION_MEMORY, self.config.window)
        stale = [
            key
            for key, state in self._addresses.items()
            if now - max(state.locked_until, state.last_failure) >= memory
        ]
        for key in stale:
            del self._addresses[key]

    def _save(self) -> None:
        if self.store is not None:
            self.store.save(lambda: json.dumps(self.snapshot(), separators=(",", ":")))

    @staticmethod
    def _expire(events: deque[float], now: float, window: int) -> None:
        while events and events[0] <= now - window:
            events.popleft()


def _restore_address(entry: object) -> _AddressState | None:
    if not isinstance(entry, dict):
        return None
    failures = entry.get("failures")
    times = (
        sorted(t for t in map(_number, failures) if t is not None)
        if isinstance(failures, list)
        else []
    )
    locked_until = _number(entry.get("locked_until")) or 0.0
    last_failure = _number(entry.get("last_failure")) or (times[-1] if times else 0.0)
    lockouts = entry.get("lockouts")
    if isinstance(lockouts, bool) or not isinstance(lockouts, int) or lockouts < 0:
        lockouts = 0
    return _AddressState(
        failures=deque(times[-64:]),
        locked_until=locked_until,
        lockouts=min(lockouts, 64),
        last_failure=last_failure,
    )
