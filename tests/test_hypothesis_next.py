"""
Property-based tests of C{next} handling through the login POST handler
(contract section 6): at least 2,000 generated C{next} values are posted
with the right PIN and with a wrong one, and every redirect the gate answers
with must stay on the gate's own host, whatever a browser makes of it.

(tests/test_redirects.py covers L{pingated.redirects.safe_next} on its own;
this goes through the login page's handler with real twisted.web requests:
the Host used, the Location header actually written, the cookie only for the
right PIN - and a smaller run over in-memory HTTP for form decoding.)
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, urljoin, urlsplit

from doubles import SeenResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_security_gate import PIN, _context_of, config_text, make_gate
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from pingated.gate import GatePages

HOST = "gate.test"
BATCH = 10
T = TypeVar("T")

# Pieces attackers put together to escape a same-site redirect check.
TOKENS = [
    "/",
    "//",
    "///",
    "\\",
    "/\\",
    "\\\\",
    "http:",
    "https:",
    "HTTP:",
    "hTtPs:",
    "javascript:",
    "data:",
    "vbscript:",
    "evil.test",
    HOST,
    f"{HOST}.evil.test",
    f"evil.test\\@{HOST}",
    "@",
    ":",
    ":443",
    ":80",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "%09",
    "%0a",
    "%0d",
    "%00",
    "%20",
    "%252f",
    "\t",
    "\n",
    "\r",
    " ",
    "\x00",
    "\x0b",
    ".",
    "..",
    "./",
    "../",
    "?",
    "#",
    "&",
    "=",
    "next=",
    "a",
    "b/c",
    "\u2215",
    "\uff0f",
    "\u3002",
    "\u200b",
    "\u202e",
    "[::1]",
    "127.0.0.1",
    "0x7f.1",
    "user:pass@",
    ";",
    ",",
    "'",
    '"',
    "<",
    ">",
    "`",
    "{",
    "~",
    "*",
]


def batches(values: st.SearchStrategy[T]) -> st.SearchStrategy[list[T]]:
    """BATCH values per example: Hypothesis's per-example cost dominates otherwise."""
    return st.lists(values, min_size=BATCH, max_size=BATCH)


NEXT_VALUES = st.one_of(
    st.lists(st.sampled_from(TOKENS), min_size=1, max_size=8).map("".join),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=60),
    st.builds(
        lambda scheme, sep, host, rest: f"{scheme}{sep}{host}{rest}",
        st.sampled_from(["http:", "https:", "", "//", "javascript:", "HTTPS:"]),
        st.sampled_from(["//", "/\\", "\\\\", "///", "", "/"]),
        st.sampled_from(
            [HOST, f"{HOST}:8443", "evil.test", f"{HOST}@evil.test", f"evil.test#{HOST}"]
        ),
        st.text(st.sampled_from("/?#@:.%\\a"), max_size=10),
    ),
)


def lands_on_gate(location: str) -> bool:
    """
    An independent oracle: where would a browser go?  No byte a browser
    would strip or reinterpret, and the URL resolved against the gate's own
    page has the gate's host.
    """
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F or c == "\\" for c in location):
        return False
    resolved = urlsplit(urljoin(f"https://{HOST}/.pingated/login", location))
    return (
        resolved.scheme in ("http", "https")
        and resolved.hostname == HOST
        and (resolved.username is None)
    )


def _post(pages: GatePages, pin: str, next_value: bytes) -> Request:
    """Call the login POST handler itself with a real twisted.web Request."""
    request = Request(DummyChannel(), False)
    request.method = b"POST"
    request.uri = request.path = b"/.pingated/login"
    request.args = {b"pin": [pin.encode()], b"next": [next_value]}
    request.requestHeaders.setRawHeaders(b"host", [HOST.encode()])
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/x-www-form-urlencoded"])
    result = pages.login_submit(request)
    if isinstance(result, Deferred):
        failures: list[Failure] = []
        result.addErrback(failures.append)
        assert not failures, failures[0].getTraceback()
    return request


def _check_answer(value: object, request: Request, right_pin: bool) -> None:
    assert request.code == 303, (value, request.code)
    (raw_location,) = request.responseHeaders.getRawHeaders(b"location")
    location = raw_location.decode("latin-1")
    assert lands_on_gate(location), (value, location)
    if right_pin:
        assert request.cookies, value
    else:
        assert not request.cookies, value
        # The wrong-PIN redirect carries next along: that copy must be safe too.
        carried = parse_qs(urlsplit(location).query).get("next", ["/"])[0]
        assert lands_on_gate(carried), (value, carried)


def test_login_handler_redirects_never_leave_the_host(tmp_path: Path) -> None:
    """2,000 generated next values x (right PIN, wrong PIN) through the login POST handler."""
    gate = make_gate(
        tmp_path, config_text(throttle="max_failures = 1000000\nglobal_max_failures = 1000000")
    )
    pages = GatePages(_context_of(gate))
    ran: list[int] = []

    @settings(
        max_examples=2000 // BATCH,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(batches(st.one_of(NEXT_VALUES.map(lambda v: v.encode("utf-8")), st.binary(max_size=40))))
    def check(values: list[bytes]) -> None:
        for value in values:
            ran.append(1)
            _check_answer(value, _post(pages, PIN, value), right_pin=True)
            _check_answer(value, _post(pages, "000001", value), right_pin=False)

    check()
    assert len(ran) >= 2000


def test_login_over_http_redirects_never_leave_the_host(tmp_path: Path) -> None:
    """200 more through the whole tree over (in-memory) HTTP: form encoding, Host, headers."""
    gate = make_gate(
        tmp_path, config_text(throttle="max_failures = 1000000\nglobal_max_failures = 1000000")
    )
    ran: list[int] = []

    @settings(max_examples=200, deadline=None, database=None)
    @given(NEXT_VALUES, st.booleans())
    def check(value: str, right_pin: bool) -> None:
        ran.append(1)
        answer = gate.request(
            "POST",
            "/.pingated/login",
            headers={"Content-Type": "application/x-www-form-urlencoded", "Host": HOST},
            data={"pin": PIN if right_pin else "000001", "next": value},
        )
        assert isinstance(answer, SeenResponse)
        assert answer.code == 303, (value, answer.code, answer.body[:200])
        location = answer.header("location") or ""
        assert lands_on_gate(location), (value, location)
        assert ("set-cookie" in answer.headers) == right_pin

    check()
    assert len(ran) >= 200
    assert gate.upstream.hits == 0


def test_oracle_is_not_vacuous() -> None:
    """The oracle itself refuses the classic escapes and accepts plain paths."""
    for bad in [
        "//evil.test",
        "/\\evil.test",
        "https://evil.test/",
        "javascript:alert(1)",
        "/\t/evil.test",
        f"https://{HOST}@evil.test/",
        "\\\\evil.test",
    ]:
        assert not lands_on_gate(bad), bad
    for good in ["/", "/a?b=c#d", f"https://{HOST}/x", "/.pingated/login?next=%2F&error=pin"]:
        assert lands_on_gate(good), good
