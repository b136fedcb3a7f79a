"""
In-memory test doubles shared by the unit tests (in the spirit of
C{treq.testing}): a thread runner that holds work until told, and the record
of a response as a client saw it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred


class HeldThreads:
    """A RunInThread whose calls wait until the test lets them run (checks stay in flight)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((d, f, args))
        return d

    def run_one(self) -> None:
        """Run the oldest held call and deliver its result."""
        d, f, args = self.calls.pop(0)
        d.callback(f(*args))

    def release(self) -> None:
        """Run every held call, oldest first."""
        calls, self.calls = self.calls, []
        for d, f, args in calls:
            d.callback(f(*args))


@attrs.define
class SeenResponse:
    """What a client saw: status, headers (lower-cased names) and body."""

    code: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header C{name}, if any."""
        values = self.headers.get(name.lower())
        return values[0] if values else None
