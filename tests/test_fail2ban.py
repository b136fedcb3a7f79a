"""
The shipped fail2ban filter (etc/fail2ban/filter.d/pingated.conf) against
REAL log output: failed logins are made against a real C{twistd pingated}
process, then Debian's C{fail2ban-regex} runs the filter over its gate.log
and must find exactly the failed attempts, each with the right address.

fail2ban is a system package (Makefile SYSTEM_PACKAGES); without it the test
fails under CI and is skipped on a developer machine that lacks it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from harness import TEST_PIN

ROOT = Path(__file__).resolve().parent.parent
FILTER = ROOT / "etc" / "fail2ban" / "filter.d" / "pingated.conf"
JAIL = ROOT / "etc" / "fail2ban" / "jail.d" / "pingated.local"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _fail2ban_regex() -> str:
    found = shutil.which("fail2ban-regex")
    if found is None:
        message = "fail2ban-regex is not installed (make system-deps installs fail2ban)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run(log_file: Path, filter_spec: str, out: str) -> list[str]:
    result = subprocess.run(
        [_fail2ban_regex(), "--out", out, str(log_file), filter_spec],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.splitlines()


def _matches(log_file: Path, filter_spec: str) -> list[tuple[str, str]]:
    """(address, matched line) for every failure the filter found, in log order."""
    addresses = _run(log_file, filter_spec, "ip")
    messages = _run(log_file, filter_spec, "msg")
    assert len(addresses) == len(messages), (addresses, messages)
    return list(zip(addresses, messages, strict=True))


def _wait_for_lines(gate: Any, text: str, count: int) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = gate.log()
        if log.count(text) >= count:
            return str(log)
        time.sleep(0.05)
    raise AssertionError(f"expected {count} x {text!r} in the log:\n{gate.log()}")


def test_filter_matches_real_failed_logins(gate_factory: Any, tmp_path: Path) -> None:
    """Failed PINs from two addresses (via the trusted proxy) are matched with those addresses."""
    gate = gate_factory(gate={"throttle": {"max_failures": 20}})
    attempts = [("203.0.113.7", "000001")] * 3 + [("2001:db8::7", "000002")] * 2
    for address, pin in attempts:
        answer = gate.request(
            "POST",
            "/.pingated/login",
            f"pin={pin}&next=/".encode(),
            {**FORM, "X-Forwarded-For": address},
        )
        assert answer.status == 303
    # A success and a logout must not count.
    cookie = gate.login(TEST_PIN)
    gate.request("GET", "/.pingated/logout", headers={"Cookie": f"pingated={cookie}"})
    _wait_for_lines(gate, "login-failed", 5)
    log_file = Path(gate.workdir) / "gate.log"
    matches = _matches(log_file, str(FILTER))
    assert [address for address, _ in matches] == [a for a, _ in attempts]
    assert all("login-failed" in line for _, line in matches)
    # The log also holds lines fail2ban must ignore (startup, login-ok, logout).
    assert "login-ok" in log_file.read_text()


def test_forged_forwarded_for_is_not_who_gets_banned(gate_factory: Any) -> None:
    """From an untrusted peer the filter sees the real peer, never the forged header."""
    gate = gate_factory(server={"trusted_proxies": []})
    for n in range(3):
        gate.request(
            "POST",
            "/.pingated/login",
            b"pin=000001",
            {**FORM, "X-Forwarded-For": f"198.51.100.{n}", "X-Real-IP": "192.0.2.1"},
        )
    _wait_for_lines(gate, "login-failed", 3)
    matches = _matches(Path(gate.workdir) / "gate.log", str(FILTER))
    assert [address for address, _ in matches] == ["127.0.0.1"] * 3


def test_aggressive_mode_also_counts_lockouts(gate_factory: Any) -> None:
    """mode=aggressive adds the 'throttled' lines (attempts refused while locked out)."""
    gate = gate_factory()
    for _ in range(7):
        gate.request(
            "POST",
            "/.pingated/login",
            b"pin=000001",
            {**FORM, "X-Forwarded-For": "203.0.113.9"},
        )
    log = _wait_for_lines(gate, "throttled ip=203.0.113.9", 3)
    assert log.count("login-failed ip=203.0.113.9") == 5
    log_file = Path(gate.workdir) / "gate.log"
    assert len(_matches(log_file, str(FILTER))) == 5
    aggressive = _matches(log_file, f"{FILTER}[mode=aggressive]")
    assert len(aggressive) == 8  # 5 failures, the lockout line, 2 refused attempts
    assert {address for address, _ in aggressive} == {"203.0.113.9"}


def test_filter_ignores_injection_attempts(tmp_path: Path) -> None:
    """Lines whose address field is not first and well-formed never match another address."""
    log = tmp_path / "crafted.log"
    log.write_text(
        "2026-01-02T03:04:05+0000 [pingated.proxy#info] x "
        "pingated[security] login-failed ip=192.0.2.66 path=/x\n"
        "2026-01-02T03:04:05+0000 [pingated.security#info] pingated[security] login-ok "
        "ip=192.0.2.67\n"
        "2026-01-02T03:04:05+0000 [pingated.security#info] pingated[security] login-failed "
        "ip=203.0.113.7 path=/.pingated/login ip=192.0.2.68\n"
        "2026-01-02T03:04:05+0000 [pingated.security#info] pingated[security] login-failed "
        "ip=203.0.113.7 path=/.pingated/login\n"
        "Jan  2 03:04:05 host pingated[42]: pingated[security] login-failed "
        "ip=203.0.113.8 path=/.pingated/login\n"
    )
    matches = _matches(log, str(FILTER))
    assert [address for address, _ in matches] == ["203.0.113.7", "203.0.113.8"]


def test_jail_example_points_at_the_filter() -> None:
    """The jail example enables the shipped filter by name."""
    text = JAIL.read_text()
    assert re.search(r"^\[pingated\]$", text, re.M)
    assert re.search(r"^filter\s*=\s*pingated$", text, re.M)
    assert re.search(r"^logpath\s*=", text, re.M)
