"""
Tests for L{pingated.sessions}: signed session cookies and revocations that
survive a restart (contract section 5).

Time is a L{Clock}; file writes run inline (L{run_inline}) so every test is
synchronous and deterministic.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from pingated.sessions import RevocationStore, Session, SessionManager
from pingated.threads import run_inline

SECRET = b"session-test-secret-0123456789abcdef012345"
OTHER = b"another-secret-entirely-0123456789abcdef012"
TTL = 3600
START = 1_700_000_000.0


def _clock(now: float = START) -> Clock:
    clock = Clock()
    clock.advance(now)
    return clock


def _store(tmp_path: Path, clock: Clock) -> RevocationStore:
    return RevocationStore.load(str(tmp_path / "state"), run_inline, clock.seconds())


def _manager(
    tmp_path: Path,
    clock: Clock,
    secret: bytes = SECRET,
    previous: tuple[bytes, ...] = (),
    store: RevocationStore | None = None,
) -> SessionManager:
    return SessionManager(
        secret=secret,
        previous_secrets=previous,
        ttl=TTL,
        clock=clock,
        revocations=store if store is not None else _store(tmp_path, clock),
    )


def test_issue_and_check_roundtrip(tmp_path: Path) -> None:
    """A freshly issued cookie proves exactly the session it was issued for."""
    clock = _clock()
    manager = _manager(tmp_path, clock)
    session, value = manager.issue()
    assert session.issued == int(START)
    assert session.expires == int(START) + TTL
    assert len(session.sid) >= 16
    assert manager.check(value) == session
    assert manager.check(value.encode("ascii")) == session


def test_every_session_is_unique(tmp_path: Path) -> None:
    """Ids (and so cookie values) never repeat, even within one clock tick."""
    manager = _manager(tmp_path, _clock())
    issued = [manager.issue() for _ in range(200)]
    assert len({session.sid for session, _ in issued}) == 200
    assert len({value for _, value in issued}) == 200


def test_cookie_is_cookie_safe(tmp_path: Path) -> None:
    """The value needs no quoting in a Set-Cookie header and stays short."""
    _, value = _manager(tmp_path, _clock()).issue()
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    assert set(value) <= allowed
    assert len(value) < 256


def _tampered(value: str) -> list[tuple[str, str]]:
    """Each field of C{v.sid.issued.expires.sig} changed in turn, plus framing damage."""
    version, sid, issued, expires, signature = value.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    other_sid = ("B" if sid[0] != "B" else "C") + sid[1:]
    return [
        ("version", ".".join(["2", sid, issued, expires, signature])),
        ("sid", ".".join([version, other_sid, issued, expires, signature])),
        ("issued", ".".join([version, sid, str(int(issued) - 1), expires, signature])),
        ("expires", ".".join([version, sid, issued, str(int(expires) + 86400), signature])),
        ("signature", ".".join([version, sid, issued, expires, flipped])),
        ("signature-last-char", value[:-1] + ("A" if value[-1] != "A" else "B")),
        ("signature-truncated", value[:-1]),
        ("signature-missing", ".".join([version, sid, issued, expires, ""])),
        ("signature-dropped", ".".join([version, sid, issued, expires])),
        ("extra-field", value + ".x"),
        ("prefix", "x" + value),
        ("suffix", value + "="),
        ("case", value.upper()),
        ("empty", ""),
        ("dots", "...."),
        ("spaces", value.replace(".", " ")),
    ]


@pytest.mark.parametrize(
    "field",
    [name for name, _ in _tampered("1.sid.1.2.sig")],
)
def test_tampered_values_refused(tmp_path: Path, field: str) -> None:
    """Any change to any field of the cookie, or its framing, is no session."""
    manager = _manager(tmp_path, _clock())
    _, value = manager.issue()
    tampered = dict(_tampered(value))[field]
    assert tampered != value
    assert manager.check(tampered) is None


@pytest.mark.parametrize(
    "value",
    [None, b"\xff\xfe", "x" * 300, "1." + "a" * 300 + ".1.2.sig", "1.a.b.c.d", "1.a.-1.5.x"],
)
def test_junk_refused(tmp_path: Path, value: str | bytes | None) -> None:
    """Absent, non-ASCII, oversized or malformed values are no session (and never raise)."""
    assert _manager(tmp_path, _clock()).check(value) is None


def test_forged_with_known_layout(tmp_path: Path) -> None:
    """Knowing the layout is useless without the secret: a self-made cookie fails."""
    manager = _manager(tmp_path, _clock())
    forger = _manager(tmp_path / "forger", _clock(), secret=OTHER)
    _, forged = forger.issue()
    assert manager.check(forged) is None


def test_expired(tmp_path: Path) -> None:
    """Valid until just before C{expires}; no session from then on."""
    clock = _clock()
    manager = _manager(tmp_path, clock)
    session, value = manager.issue()
    clock.advance(TTL - 1)
    assert manager.check(value) == session
    clock.advance(1)
    assert manager.check(value) is None
    clock.advance(86400 * 365)
    assert manager.check(value) is None


def test_previous_secrets_verify_only(tmp_path: Path) -> None:
    """After rotation old cookies still work, and new cookies use the new secret."""
    clock = _clock()
    store = _store(tmp_path, clock)
    before = _manager(tmp_path, clock, secret=SECRET, store=store)
    session, old_cookie = before.issue()
    rotated = _manager(tmp_path, clock, secret=OTHER, previous=(SECRET,), store=store)
    assert rotated.check(old_cookie) == session
    _, new_cookie = rotated.issue()
    assert rotated.check(new_cookie) is not None
    # Signed with the new secret, not the previous one.
    assert before.check(new_cookie) is None


def test_removed_secret_refused(tmp_path: Path) -> None:
    """A cookie signed by a secret no longer configured at all is no session."""
    clock = _clock()
    store = _store(tmp_path, clock)
    _, old_cookie = _manager(tmp_path, clock, secret=SECRET, store=store).issue()
    after = _manager(tmp_path, clock, secret=OTHER, previous=(), store=store)
    assert after.check(old_cookie) is None


def test_revocation(tmp_path: Path) -> None:
    """Revoking ends that session at once, and only that one."""
    clock = _clock()
    manager = _manager(tmp_path, clock)
    session, value = manager.issue()
    other, other_value = manager.issue()
    done = manager.revoke(session)
    assert done.called
    assert manager.check(value) is None
    assert manager.check(other_value) == other
    assert manager.revocations.is_revoked(session.sid)
    assert len(manager.revocations) == 1


def test_revocation_survives_reload(tmp_path: Path) -> None:
    """A new store loaded from the same state_dir (a restart) still refuses the cookie."""
    clock = _clock()
    manager = _manager(tmp_path, clock)
    session, value = manager.issue()
    _, kept_value = manager.issue()
    manager.revoke(session)

    restarted = _manager(tmp_path, clock, store=_store(tmp_path, clock))
    assert restarted.revocations is not manager.revocations
    assert restarted.check(value) is None
    assert restarted.check(kept_value) is not None
    # And once more: compaction on load must not lose it.
    again = _manager(tmp_path, clock, store=_store(tmp_path, clock))
    assert again.check(value) is None


def test_revocation_file_permissions(tmp_path: Path) -> None:
    """The state directory and revocation file are private to the daemon's user."""
    clock = _clock()
    manager = _manager(tmp_path, clock)
    session, _ = manager.issue()
    manager.revoke(session)
    state = tmp_path / "state"
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "revoked-sessions.jsonl").st_mode) & 0o077 == 0


def test_torn_and_garbage_lines_tolerated(tmp_path: Path) -> None:
    """A crash mid-append or a damaged file loses only the damaged lines; the start goes on."""
    state = tmp_path / "state"
    state.mkdir()
    future = int(START) + 1000
    good = [json.dumps({"sid": f"good{i}", "expires": future}) for i in range(3)]
    junk = [
        "not json at all",
        "",
        "[]",
        "null",
        "42",
        '"a string"',
        '{"sid": "nosuchkey"}',
        '{"expires": 5}',
        '{"sid": "badexp", "expires": "soon"}',
        '{"sid": "nan", "expires": NaN}',
        '{"sid": "inf", "expires": Infinity}',
        '{"sid": "huge", "expires": 1e400}',
    ]
    body = "\n".join([good[0], *junk, good[1], good[2]]).encode() + b"\n"
    body += b"\xff\xfe\x80 binary junk\n"
    body += b'{"sid": "torn", "exp'  # no newline: the last write was cut short
    (state / "revoked-sessions.jsonl").write_bytes(body)

    store = RevocationStore.load(str(state), run_inline, START)
    assert all(store.is_revoked(f"good{i}") for i in range(3))
    assert not store.is_revoked("torn")
    assert len(store) == 3
    # The store keeps working after the damage.
    store.revoke(Session("later", int(START), future))
    assert RevocationStore.load(str(state), run_inline, START).is_revoked("later")


def test_expired_revocations_compacted(tmp_path: Path) -> None:
    """Loading drops revocations of sessions that have expired anyway, on disk too."""
    clock = _clock()
    manager = _manager(tmp_path, clock)
    sessions = [manager.issue()[0] for _ in range(3)]
    for session in sessions:
        manager.revoke(session)
    path = tmp_path / "state" / "revoked-sessions.jsonl"
    assert len(path.read_text().splitlines()) == 3
    longer = Session("long-lived", int(START), int(START) + 10 * TTL)
    manager.revoke(longer)

    clock.advance(TTL)  # the three ordinary sessions have now expired
    store = _store(tmp_path, clock)
    assert len(store) == 1
    assert store.is_revoked("long-lived")
    assert not any(store.is_revoked(s.sid) for s in sessions)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["sid"] for line in lines] == ["long-lived"]
    assert not (tmp_path / "state" / "revoked-sessions.jsonl.tmp").exists()


def test_missing_state_dir_created(tmp_path: Path) -> None:
    """A first start creates state_dir (and an empty store)."""
    state = tmp_path / "a" / "b"
    store = RevocationStore.load(str(state), run_inline, START)
    assert len(store) == 0
    assert state.is_dir()


def test_repr_has_no_secret(tmp_path: Path) -> None:
    """The manager's repr never shows a secret."""
    manager = _manager(tmp_path, _clock(), previous=(OTHER,))
    assert SECRET.decode() not in repr(manager)
    assert OTHER.decode() not in repr(manager)
