# -*- test-case-name: tests.test_sessions -*-
"""
Signed session cookies and their server-side revocation.

A cookie is C{1.<id>.<issued>.<expires>.<hmac>}: self-contained so that a
check costs one HMAC and a set lookup, and revocable because logout records
the id in a store that survives restarts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pingated.threads import RunInThread

_VERSION = "1"
log = Logger(namespace="pingated.sessions")


@attrs.frozen
class Session:
    """One signed-in visitor, as recovered from a valid cookie."""

    sid: str
    issued: int
    expires: int


def _sign(secret: bytes, payload: str) -> str:
    digest = hmac.new(secret, payload.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@attrs.define
class RevocationStore:
    """
    Ids of sessions ended by logout, kept until the session would have expired.

    Lookups hit memory only; each revocation is appended to a file in
    C{state_dir} off the reactor thread, and the file is compacted on load.
    """

    path: str
    run_in_thread: RunInThread
    _revoked: dict[str, int] = attrs.field(factory=dict)

    @classmethod
    def load(cls, state_dir: str, run_in_thread: RunInThread, now: float) -> RevocationStore:
        """Read (and compact) the store; called once at start, before listening."""
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        path = os.path.join(state_dir, "revoked-sessions.jsonl")
        revoked: dict[str, int] = {}
        try:
            # errors="replace": a damaged byte spoils its own line, not the start.
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        sid, expires = str(entry["sid"]), int(entry["expires"])
                    except (ValueError, KeyError, TypeError, OverflowError):
                        continue  # a torn last line after a crash loses nothing else
                    if expires > now:
                        revoked[sid] = expires
        except FileNotFoundError:
            pass
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for sid, expires in revoked.items():
                f.write(json.dumps({"sid": sid, "expires": expires}) + "\n")
        os.replace(tmp, path)
        return cls(path, run_in_thread, revoked)

    def is_revoked(self, sid: str) -> bool:
        """True when a logout ended this session."""
        return sid in self._revoked

    def revoke(self, session: Session) -> Deferred[None]:
        """Effective immediately in memory; the Deferred fires once it is on disk."""
        self._revoked[session.sid] = session.expires
        line = json.dumps({"sid": session.sid, "expires": session.expires}) + "\n"
        return self.run_in_thread(self._append, line)

    def _append(self, line: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def __len__(self) -> int:
        return len(self._revoked)


@attrs.define(repr=False)
class SessionManager:
    """
    Issues and checks session cookies.

    C{secret} signs; C{previous_secrets} only verify, so rotating a secret
    does not log anybody out.
    """

    secret: bytes
    previous_secrets: Sequence[bytes]
    ttl: int
    clock: IReactorTime
    revocations: RevocationStore

    def __repr__(self) -> str:
        return f"SessionManager(ttl={self.ttl})"

    def issue(self) -> tuple[Session, str]:
        """A fresh session and the cookie value that carries it."""
        now = int(self.clock.seconds())
        session = Session(secrets.token_urlsafe(16), now, now + self.ttl)
        payload = f"{_VERSION}.{session.sid}.{session.issued}.{session.expires}"
        return session, f"{payload}.{_sign(self.secret, payload)}"

    def check(self, value: str | bytes | None) -> Session | None:
        """The session a cookie value proves, or None for anything not valid now."""
        if value is None:
            return None
        if isinstance(value, bytes):
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                return None
        if len(value) > 256:
            return None
        payload, _, signature = value.rpartition(".")
        parts = payload.split(".")
        if len(parts) != 4 or parts[0] != _VERSION:
            return None
        if not any(
            hmac.compare_digest(_sign(key, payload), signature)
            for key in (self.secret, *self.previous_secrets)
        ):
            return None
        _, sid, issued_text, expires_text = parts
        if not (issued_text.isdigit() and expires_text.isdigit()):
            return None
        session = Session(sid, int(issued_text), int(expires_text))
        if session.expires <= self.clock.seconds():
            return None
        if self.revocations.is_revoked(session.sid):
            return None
        return session

    def revoke(self, session: Session) -> Deferred[None]:
        """End a session everywhere, now and after restarts."""
        return self.revocations.revoke(session)
