"""
Property-based tests of session cookie parsing (L{SessionManager.check}):
at least 10,000 generated cookie values (4,000 text, 3,000 bytes, 3,000
forgeries of a real cookie), none of which may raise or be
accepted, plus a smaller run through the whole gate over HTTP, where no
cookie may cause anything but a refusal (never a 500).

Hypothesis runs with no deadline (the machine is shared) and no example
database (CI starts clean anyway); each test counts the examples it really
ran, so a silently shrunken run cannot pass.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import string
from pathlib import Path
from typing import TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from pingated.sessions import RevocationStore, Session, SessionManager
from pingated.threads import run_inline

SECRET = b"hypothesis-cookie-secret-0123456789abcdef"
PREVIOUS = b"hypothesis-previous-secret-0123456789abcd"
NOW = 1_700_000_000
BATCH = 10
T = TypeVar("T")


def examples(count: int) -> settings:
    """C{count} examples, no deadline, no example database."""
    return settings(
        max_examples=count,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def _manager(tmp_path: Path) -> SessionManager:
    clock = Clock()
    clock.advance(NOW)
    return SessionManager(
        secret=SECRET,
        previous_secrets=(PREVIOUS,),
        ttl=3600,
        clock=clock,
        revocations=RevocationStore.load(str(tmp_path / "state"), run_inline, NOW),
    )


def _sign(key: bytes, payload: str) -> str:
    digest = hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


COOKIE_ALPHABET = string.ascii_letters + string.digits + "-_.=+/%;, \"'\\\t\x00\x7f"


def batches(values: st.SearchStrategy[T]) -> st.SearchStrategy[list[T]]:
    """BATCH values per example: Hypothesis's per-example cost dominates otherwise."""
    return st.lists(values, min_size=BATCH, max_size=BATCH)


def test_random_text_is_never_a_session(tmp_path: Path) -> None:
    """4,000 arbitrary strings (any Unicode, cookie-ish characters weighted in)."""
    manager = _manager(tmp_path)
    ran: list[int] = []

    @examples(400)
    @given(
        batches(
            st.one_of(
                st.text(max_size=300),
                st.text(alphabet=COOKIE_ALPHABET, max_size=300),
                st.lists(st.text(alphabet=COOKIE_ALPHABET, max_size=60), max_size=8).map(".".join),
            )
        )
    )
    def check(values: list[str]) -> None:
        for value in values:
            ran.append(1)
            assert manager.check(value) is None

    check()
    assert len(ran) >= 4000


def test_random_bytes_are_never_a_session(tmp_path: Path) -> None:
    """3,000 arbitrary byte strings, as the Cookie header hands them over."""
    manager = _manager(tmp_path)
    ran: list[int] = []

    @examples(300)
    @given(batches(st.binary(max_size=400)))
    def check(values: list[bytes]) -> None:
        for value in values:
            ran.append(1)
            assert manager.check(value) is None

    check()
    assert len(ran) >= 3000


@st.composite
def forgeries(draw: st.DrawFn, valid: str) -> str:
    """A valid cookie, damaged the ways an attacker would try."""
    version, sid, issued, expires, signature = valid.split(".")
    kind = draw(st.integers(0, 7))
    if kind == 0:  # flip, insert or delete characters anywhere
        chars = list(valid)
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, len(chars)))
            action = draw(st.sampled_from(["replace", "insert", "delete"]))
            char = draw(st.sampled_from(COOKIE_ALPHABET))
            if action == "insert":
                chars.insert(position, char)
            elif chars:
                position = min(position, len(chars) - 1)
                if action == "replace":
                    chars[position] = char
                else:
                    del chars[position]
        return "".join(chars)
    if kind == 1:  # extend the expiry, keep the signature
        new_expires = draw(st.integers(0, 10**12).map(str))
        return f"{version}.{sid}.{issued}.{new_expires}.{signature}"
    if kind == 2:  # another session id, same signature
        new_sid = draw(
            st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=30)
        )
        return f"{version}.{new_sid}.{issued}.{expires}.{signature}"
    if kind == 3:  # signed with a key the gate does not have
        key = draw(st.binary(min_size=1, max_size=64))
        payload = draw(
            st.sampled_from(
                [
                    f"{version}.{sid}.{issued}.{expires}",
                    f"{version}.{sid}.{issued}.{NOW + 10**9}",
                ]
            )
        )
        return f"{payload}.{_sign(key, payload)}"
    if kind == 4:  # truncated or padded signature, different base64 spellings
        cut = draw(st.integers(0, len(signature)))
        extra = draw(st.sampled_from(["", "=", "==", "A", "%3D", " "]))
        return f"{version}.{sid}.{issued}.{expires}.{signature[:cut]}{extra}"
    if kind == 5:  # other version tags and part counts
        new_version = draw(st.sampled_from(["0", "2", "", "01", "1 ", "v1"]))
        parts = [new_version, sid, issued, expires, signature]
        parts += draw(st.lists(st.sampled_from(["", "1", sid]), max_size=2))
        return ".".join(parts)
    if kind == 6:  # numbers in other spellings (signature recomputed with our key
        # would be a real session, so it keeps the original signature)
        spelled = draw(
            st.sampled_from([f"+{expires}", f"0{expires}", f"{expires}.0", f" {expires}"])
        )
        return f"{version}.{sid}.{issued}.{spelled}.{signature}"
    # an expired session signed with the real key
    payload = f"{version}.{sid}.{draw(st.integers(0, NOW))}.{draw(st.integers(0, NOW))}"
    return f"{payload}.{_sign(SECRET, payload)}"


def test_forgeries_of_a_valid_cookie_are_refused(tmp_path: Path) -> None:
    """3,000 damaged copies of a real cookie: only the untouched value is a session."""
    manager = _manager(tmp_path)
    session, valid = manager.issue()
    assert manager.check(valid) == session
    ran: list[int] = []

    @examples(300)
    @given(batches(forgeries(valid)))
    def check(values: list[str]) -> None:
        for value in values:
            ran.append(1)
            result = manager.check(value)
            if value == valid:
                assert result == session
            else:
                assert result is None, value

    check()
    assert len(ran) >= 3000


def test_previous_secret_still_verifies(tmp_path: Path) -> None:
    """The positive control: a cookie signed with previous_secrets is a session."""
    manager = _manager(tmp_path)
    payload = f"1.abc.{NOW}.{NOW + 60}"
    assert manager.check(f"{payload}.{_sign(PREVIOUS, payload)}") == Session("abc", NOW, NOW + 60)


def test_generated_cookies_through_the_gate_never_500(tmp_path: Path) -> None:
    """400 generated Cookie headers through the real resource tree: always a refusal."""
    from doubles import SeenResponse
    from test_security_gate import make_gate

    gate = make_gate(tmp_path)
    ran: list[int] = []
    header_chars = st.characters(min_codepoint=0x20, max_codepoint=0xFF).filter(
        lambda c: c not in "\x7f"
    )

    @examples(200)
    @given(
        st.one_of(
            st.text(alphabet=header_chars, max_size=200).map(lambda v: f"pingated={v}"),
            st.text(alphabet=header_chars, max_size=200),
            st.lists(
                st.text(alphabet=COOKIE_ALPHABET.strip("\t\x00\x7f"), max_size=40), max_size=5
            ).map(lambda parts: "; ".join(f"pingated={p}" for p in parts)),
        ),
        st.text(alphabet=COOKIE_ALPHABET.strip("\t\x00\x7f"), max_size=120),
    )
    def check(cookie: str, other: str) -> None:
        for navigation, value in ((True, cookie), (False, "pingated=" + other)):
            ran.append(1)
            headers = {"Cookie": value.strip()}
            if navigation:
                headers["Accept"] = "text/html"
            answer = gate.request("GET", "/private", headers=headers)
            assert isinstance(answer, SeenResponse)
            assert answer.code == (302 if navigation else 401), (value, answer.code)

    check()
    assert len(ran) >= 400
    assert gate.upstream.hits == 0
