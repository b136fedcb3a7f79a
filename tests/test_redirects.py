"""
Tests for L{pingated.redirects.safe_next}: the login page must never become
an open redirect (contract section 6).

The hostile table is the heart of it: every entry is something a browser (or
a lenient upstream) could turn into a navigation to another origin, and every
one must fall back to C{/}.  A hypothesis property then throws thousands of
generated strings at the function to check it never raises and never returns
anything outside the allow-list.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pingated.redirects import FALLBACK, host_in_domain, safe_next

HOST = "site"
DOMAIN = ".example.com"

# (raw next, request host, cookie_domain): all must give "/".
HOSTILE: list[tuple[str, str, str]] = [
    # protocol-relative and backslash tricks
    ("//evil.com", HOST, ""),
    ("//evil.com/path?q=1", HOST, ""),
    ("///evil", HOST, ""),
    ("////evil.com", HOST, ""),
    ("/\\evil.com", HOST, ""),
    ("/\\/evil.com", HOST, ""),
    ("\\/evil", HOST, ""),
    ("\\\\evil.com", HOST, ""),
    ("/./\\evil", HOST, ""),
    ("/.//evil", HOST, ""),
    ("/..//evil", HOST, ""),
    ("/a/..//evil", HOST, ""),
    ("/a/b/../..//evil?x=1", HOST, ""),
    ("/%2e//evil", HOST, ""),
    ("/.%2F/evil", HOST, ""),
    # whitespace and control characters browsers strip or honour
    ("/\t/evil.com", HOST, ""),
    ("/ /evil", HOST, ""),
    ("/\n/evil.com", HOST, ""),
    ("/\r\n/evil.com", HOST, ""),
    ("/x\r\nLocation: https://evil.com", HOST, ""),
    ("/x\r\nSet-Cookie: a=b", HOST, ""),
    ("/x%0d%0aSet-Cookie:%20a=b", HOST, ""),
    ("/x%0aLocation:%20//evil", HOST, ""),
    ("/\x00//evil.com", HOST, ""),
    ("/x\x00", HOST, ""),
    ("/x\x7f", HOST, ""),
    ("/%00", HOST, ""),
    (" //evil.com", HOST, ""),
    ("\t//evil.com", HOST, ""),
    (" /x", HOST, ""),
    ("\x0b/x", HOST, ""),
    ("/x\x1b[31m", HOST, ""),
    # percent-encoded slashes and backslashes
    ("/%2F%2Fevil", HOST, ""),
    ("/%2f/evil.com", HOST, ""),
    ("/%2F/evil.com", HOST, ""),
    ("/%5Cevil", HOST, ""),
    ("/%5cevil.com", HOST, ""),
    ("/%5C%5Cevil.com", HOST, ""),
    ("/%09/evil.com", HOST, ""),
    # foreign absolute URLs
    ("https://evil.com", HOST, ""),
    ("http://evil.com", HOST, ""),
    ("http://evil.com/site", HOST, ""),
    ("HTTPS://EVIL.COM/", HOST, ""),
    ("https://site.evil.com", HOST, ""),
    ("https://evilsite", HOST, ""),
    ("https://site.", HOST, ""),
    ("https://evil.com:443.site", HOST, ""),
    ("https://evil.com#@site", HOST, ""),
    ("https://evil.com?@site", HOST, ""),
    ("https://evil.com%2F@site", HOST, ""),
    ("https://evil.com%40site", HOST, ""),
    # userinfo tricks
    ("https://site@evil.com", HOST, ""),
    ("https://site:443@evil.com", HOST, ""),
    ("https://user:pass@site/", HOST, ""),
    ("https://evil.com\\@site", HOST, ""),
    ("https://evil.com\\@site/", HOST, ""),
    ("https://a.example.com@evil.com", HOST, DOMAIN),
    ("https://evil.com@a.example.com", HOST, DOMAIN),
    # malformed schemes and scheme-less hosts
    ("evil.com", HOST, ""),
    ("evil.com/path", HOST, ""),
    ("site", HOST, ""),
    ("http:/evil", HOST, ""),
    ("http:evil.com", HOST, ""),
    ("https:/\\evil.com", HOST, ""),
    ("https:\\\\evil.com", HOST, ""),
    ("http:///evil.com", HOST, ""),
    ("ftp://site/", HOST, ""),
    ("ws://site/", HOST, ""),
    ("file:///etc/passwd", HOST, ""),
    # script and data URLs
    ("javascript:alert(1)", HOST, ""),
    ("JaVaScRiPt:alert(document.cookie)", HOST, ""),
    ("javascript://site/%0aalert(1)", HOST, ""),
    (" javascript:alert(1)", HOST, ""),
    ("java\tscript:alert(1)", HOST, ""),
    ("data:text/html,<script>alert(1)</script>", HOST, ""),
    ("data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==", HOST, ""),
    ("vbscript:msgbox(1)", HOST, ""),
    # unicode look-alikes of "/" and "\" and other non-ASCII
    ("/\uff0fevil.com", HOST, ""),
    ("\uff0f\uff0fevil.com", HOST, ""),
    ("/\u2215evil", HOST, ""),
    ("/\u2044evil", HOST, ""),
    ("/\uff3cevil", HOST, ""),
    ("/\u29f5evil", HOST, ""),
    ("https://sit\u0435/", HOST, ""),  # Cyrillic "e"
    ("/x\u202e", HOST, ""),
    ("/\u3000/evil.com", HOST, ""),
    # ports and IPv6
    ("http://site:99999/", HOST, ""),
    ("http://site:port/", HOST, ""),
    ("http://[::1]/", HOST, ""),
    ("http://[::1]@evil.com/", "[::1]", ""),
    ("http://[::1/", "[::1]", ""),
    ("http://[evil.com]/", HOST, ""),
    ("http://evil.com/", "[::1]:8080", ""),
    # cookie_domain edge cases
    ("https://notexample.com", HOST, DOMAIN),
    ("https://example.com.evil.com", HOST, DOMAIN),
    ("https://evilexample.com/", HOST, DOMAIN),
    ("https://example.co", HOST, DOMAIN),
    ("https://evil.com", HOST, "."),
    # empties and sizes
    ("", HOST, ""),
    ("/" + "a" * 5000, HOST, ""),
    ("https://site/" + "a" * 5000, HOST, ""),
    ("//" + "evil." * 1000 + "com", HOST, ""),
]

# (raw next, request host, cookie_domain): each must come back unchanged.
ALLOWED: list[tuple[str, str, str]] = [
    ("/", HOST, ""),
    ("/app", HOST, ""),
    ("/app/", HOST, ""),
    ("/app?x=1&y=2", HOST, ""),
    ("/app?next=//evil.com", HOST, ""),
    ("/app?a=1&a=2#frag", HOST, ""),
    ("/a/b/c.html?q=%20space", HOST, ""),
    ("/%7Euser/", HOST, ""),
    ("/app?url=https%3A%2F%2Fevil.com", HOST, ""),
    ("/a//b", HOST, ""),
    ("/a/../b", HOST, ""),
    ("/ok?x=/.//evil", HOST, ""),
    ("https://site/", HOST, ""),
    ("http://site/x?y=1", HOST, ""),
    ("https://site:8443/x", HOST, ""),
    ("https://site/x", "site:8443", ""),
    ("https://SITE/x", HOST, ""),
    ("http://127.0.0.1:3060/x", "127.0.0.1:3060", ""),
    ("http://[::1]:3060/x", "[::1]:3060", ""),
    ("https://a.example.com/x", HOST, DOMAIN),
    ("https://example.com/", HOST, DOMAIN),
    ("https://deep.sub.example.com/x?y", HOST, DOMAIN),
    ("https://a.example.com/x", HOST, "example.com"),
]


@pytest.mark.parametrize(("raw", "host", "domain"), HOSTILE)
def test_hostile_next_falls_back(raw: str, host: str, domain: str) -> None:
    """Every entry of the hostile table becomes C{/}."""
    assert safe_next(raw, host, domain) == FALLBACK == "/"


def test_hostile_table_is_big_enough() -> None:
    """Issue 2 asks for at least 30 hostile cases; this table keeps well above 40."""
    assert len(HOSTILE) >= 40
    assert len({raw for raw, _, _ in HOSTILE}) >= 40


@pytest.mark.parametrize(("raw", "host", "domain"), ALLOWED)
def test_allowed_next_is_kept(raw: str, host: str, domain: str) -> None:
    """Same-site paths and absolute URLs on our host or cookie domain pass unchanged."""
    assert safe_next(raw, host, domain) == raw


def test_none_falls_back() -> None:
    """A missing C{next} (no form field at all) means C{/}."""
    assert safe_next(None, HOST) == "/"


@pytest.mark.parametrize(
    ("host", "domain", "expected"),
    [
        ("example.com", ".example.com", True),
        ("a.example.com", ".example.com", True),
        ("A.Example.COM.", "example.com", True),
        ("notexample.com", ".example.com", False),
        ("example.com.evil", ".example.com", False),
        ("example.com", "", False),
        ("", ".example.com", False),
    ],
)
def test_host_in_domain(host: str, domain: str, expected: bool) -> None:
    """The cookie-domain rule matches the domain and names below it, nothing else."""
    assert host_in_domain(host, domain) is expected


def _is_acceptable(result: str, host: str, domain: str) -> bool:
    if result == "/":
        return True
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c == "\\" for c in result):
        return False
    if result.startswith("/"):
        return not result.startswith("//")
    parts = urlsplit(result)
    if parts.scheme not in ("http", "https") or parts.username is not None:
        return False
    if not result.lower().startswith(parts.scheme + "://"):
        return False
    target = (parts.hostname or "").lower()
    own = host.lower().rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
    return target == own or (bool(domain) and host_in_domain(target, domain))


_URLISH = st.one_of(
    st.text(max_size=60),
    st.text(alphabet="/\\:@.?#%&=[]-_ \t\r\n\x00\x7fabehilmopstvwx0123456789", max_size=40),
    st.builds(
        lambda prefix, middle, tail: prefix + middle + tail,
        st.sampled_from(
            ["/", "//", "/\\", "\\", "http://", "https://", "https:", "http:/", "javascript:", ""]
        ),
        st.sampled_from(["site", "evil.com", "a.example.com", "example.com", "[::1]", "site@"]),
        st.text(alphabet="/\\:@.?#%&=abc\t\uff0f\u2215", max_size=20),
    ),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_URLISH, domain=st.sampled_from(["", ".example.com"]))
def test_safe_next_never_escapes(raw: str, domain: str) -> None:
    """For any string, the result is C{/}, a single-slash path, or an allowed absolute URL."""
    result = safe_next(raw, HOST, domain)
    assert isinstance(result, str)
    assert _is_acceptable(result, HOST, domain), (raw, result)
    assert result in (raw, "/")
