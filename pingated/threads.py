# -*- test-case-name: tests.test_pins -*-
"""
How blocking work (argon2, small file writes) leaves the reactor thread.

Code below C{tap.py} receives a L{RunInThread} instead of touching a thread
pool, so unit tests can run the work synchronously and deterministically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class RunInThread(Protocol):
    """Run C{f(*args)} somewhere that may block and give back a Deferred of its result."""

    def __call__(self, f: Callable[..., T], *args: Any) -> Deferred[T]: ...


def thread_runner(reactor: IReactorFromThreads, pool: ThreadPool) -> RunInThread:
    """A L{RunInThread} that uses C{pool}, delivering results on the reactor thread."""

    def run(f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(reactor, pool, f, *args)

    return run


def run_inline(f: Callable[..., T], *args: Any) -> Deferred[T]:
    """A L{RunInThread} for tests: runs at once, on the calling thread."""
    return maybeDeferred(f, *args)
