"""
In-memory test doubles shared by the unit tests (in the spirit of
C{treq.testing}): a thread runner that holds work until told, and the record
of a response as a client saw it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.web.test.requesthelper import DummyRequest


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


def settle(d: Deferred[Any], *pumps: Any) -> Any:
    """
    Pump in-memory connections (StubTreq, RequestTraversalAgent: anything with
    C{flush()}) until C{d} fires; return its result or raise its failure.
    """
    results: list[Any] = []
    d.addBoth(results.append)
    for _ in range(50):
        if results:
            break
        for pump in pumps:
            pump.flush()
    assert results, "request never completed"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def make_request(
    peer: str = "203.0.113.7",
    headers: Sequence[tuple[bytes, bytes]] = (),
    secure: bool = False,
) -> DummyRequest:
    """A DummyRequest from C{peer} (IPv4, IPv6 or "unix") with C{headers} in order."""
    request = DummyRequest([b""])
    if peer == "unix":
        request.client = UNIXAddress(b"/run/pingated.sock")
    elif ":" in peer:
        request.client = IPv6Address("TCP", peer, 40000)
    else:
        request.client = IPv4Address("TCP", peer, 40000)
    for name, value in headers:
        request.requestHeaders.addRawHeader(name, value)
    request.isSecure = lambda: secure  # type: ignore[method-assign]
    return request
