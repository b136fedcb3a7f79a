# -*- test-case-name: tests.test_throttle -*-
"""
Brute-force protection for the PIN.

Failures are counted per client address (sliding window, then a lockout) and
across all addresses (a global budget per window), so an attacker with many
addresses is still bound by the global limit.  Time comes from an injected
clock so the rules are tested with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import math
from collections import deque

import attrs
from twisted.internet.interfaces import IReactorTime

from pingated.config import ThrottleConfig


@attrs.define
class _AddressState:
    failures: deque[float] = attrs.field(factory=deque)
    locked_until: float = 0.0
    lockouts: int = 0


@attrs.define
class Throttle:
    """Decides whether a login attempt from an address may even be checked."""

    config: ThrottleConfig
    clock: IReactorTime
    _addresses: dict[str, _AddressState] = attrs.field(factory=dict)
    _global_failures: deque[float] = attrs.field(factory=deque)

    def retry_after(self, ip: str) -> int | None:
        """Seconds until C{ip} may try again, or None when it may try now."""
        now = self.clock.seconds()
        state = self._addresses.get(ip)
        if state is not None and state.locked_until > now:
            return max(1, math.ceil(state.locked_until - now))
        self._expire(self._global_failures, now, self.config.global_window)
        if len(self._global_failures) >= self.config.global_max_failures:
            oldest = self._global_failures[0]
            return max(1, math.ceil(oldest + self.config.global_window - now))
        return None

    def record_failure(self, ip: str) -> int | None:
        """Count a wrong PIN; returns the lockout in seconds if this one triggered it."""
        now = self.clock.seconds()
        self._global_failures.append(now)
        state = self._addresses.setdefault(ip, _AddressState())
        self._expire(state.failures, now, self.config.window)
        state.failures.append(now)
        if len(state.failures) >= self.config.max_failures:
            state.lockouts += 1
            # Repeat offenders wait twice as long each time, capped at a day.
            lockout = min(self.config.lockout * 2 ** (state.lockouts - 1), 86400)
            state.locked_until = now + lockout
            state.failures.clear()
            return int(lockout)
        return None

    def record_success(self, ip: str) -> None:
        """A right PIN clears that address's history."""
        self._addresses.pop(ip, None)

    @staticmethod
    def _expire(events: deque[float], now: float, window: int) -> None:
        while events and events[0] <= now - window:
            events.popleft()
