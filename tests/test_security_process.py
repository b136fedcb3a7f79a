"""
Brute-force protection and reactor safety against the REAL daemon
(C{twistd -n pingated} from C{gate_factory}, in front of the demo upstream).

Covers issue 5's "done when" 1 (lockout, 429 + Retry-After even for the
right PIN, forged X-Forwarded-For from an untrusted address, lockout expiry,
counters surviving a restart; the global limit is exercised in memory in
tests/test_throttle.py and tests/test_security_gate.py) and 3 (an
authenticated proxied request stays fast while 40 wrong-PIN logins are in
flight).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from argon2 import PasswordHasher
from harness import TEST_PIN, ManagedProcess

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
# The throttle tests make many logins: a cheap argon2 hash keeps them quick
# (the flood test keeps the default, expensive one on purpose).
CHEAP_HASH = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(TEST_PIN)


def _login(gate: Any, pin: str, **headers: str) -> Any:
    return gate.request(
        "POST", "/.pingated/login", f"pin={pin}&next=/".encode(), {**FORM, **headers}
    )


def test_lockout_forged_forwarded_for_and_expiry(gate_factory: Any) -> None:
    """
    From an untrusted address: 5 wrong PINs (each with a different forged
    X-Forwarded-For) lock it out; then even the right PIN gets 429 with
    Retry-After; once the lockout is over the right PIN logs in.
    """
    gate = gate_factory(
        server={"trusted_proxies": []},
        gate={"pin_hash": CHEAP_HASH, "throttle": {"lockout": 3}},
    )
    for n in range(5):
        answer = _login(gate, "000001", **{"X-Forwarded-For": f"198.51.100.{n}"})
        assert answer.status == 303
        assert "error=pin" in (answer.header("location") or "")
    locked_at = time.monotonic()
    answer = _login(gate, TEST_PIN, **{"X-Forwarded-For": "192.0.2.99", "X-Real-IP": "192.0.2.98"})
    assert answer.status == 429
    retry = int(answer.header("retry-after") or "0")
    assert 1 <= retry <= 3
    assert answer.cookie("pingated") is None
    log = gate.log()
    assert log.count("pingated[security] login-failed ip=127.0.0.1 path=/.pingated/login") == 5
    assert "pingated[security] throttled ip=127.0.0.1 retry_after=" in log
    assert "198.51.100" not in log and "192.0.2.9" not in log
    # The lockout expires.
    time.sleep(max(0.0, 3.2 - (time.monotonic() - locked_at)))
    answer = _login(gate, TEST_PIN)
    assert answer.status == 303
    assert answer.cookie("pingated")


def test_trusted_proxy_addresses_are_counted_separately(gate_factory: Any) -> None:
    """Behind a trusted proxy each real client has its own budget: one locked out, another not."""
    gate = gate_factory(gate={"pin_hash": CHEAP_HASH})
    for _ in range(5):
        _login(gate, "000001", **{"X-Forwarded-For": "203.0.113.7"})
    assert _login(gate, TEST_PIN, **{"X-Forwarded-For": "203.0.113.7"}).status == 429
    assert _login(gate, TEST_PIN, **{"X-Forwarded-For": "203.0.113.8"}).status == 303


def test_lockout_survives_a_restart(gate_factory: Any) -> None:
    """Counters live in state_dir: restarting the daemon does not unlock an attacker."""
    gate = gate_factory(gate={"pin_hash": CHEAP_HASH})
    for _ in range(5):
        _login(gate, "000001", **{"X-Forwarded-For": "203.0.113.7"})
    for _ in range(3):
        _login(gate, "000001", **{"X-Forwarded-For": "203.0.113.8"})
    gate.restart()
    answer = _login(gate, TEST_PIN, **{"X-Forwarded-For": "203.0.113.7"})
    assert answer.status == 429
    assert 800 < int(answer.header("retry-after") or "0") <= 900
    # The other address kept its 3 failures: 2 more lock it out.
    for _ in range(2):
        assert _login(gate, "000001", **{"X-Forwarded-For": "203.0.113.8"}).status == 303
    assert _login(gate, TEST_PIN, **{"X-Forwarded-For": "203.0.113.8"}).status == 429


# Runs in its own process, so the flood's 40 client threads do not share a
# GIL with the probe whose latency is measured.
FLOOD_SCRIPT = r"""
import http.client, json, sys, threading, time
port, workers, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
statuses, errors = [], []
deadline = time.monotonic() + seconds
def flood(worker):
    n = 0
    while time.monotonic() < deadline:
        n += 1
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("POST", "/.pingated/login", body=b"pin=000001&next=/", headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Forwarded-For": "10.%d.%d.%d" % (worker, n // 250, n % 250)})
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
        except Exception as e:
            errors.append(repr(e))
        finally:
            conn.close()
threads = [threading.Thread(target=flood, args=(w,)) for w in range(workers)]
for t in threads:
    t.start()
print("flooding", flush=True)
for t in threads:
    t.join()
print(json.dumps({"statuses": statuses, "errors": errors[:5]}), flush=True)
"""


def test_proxied_request_fast_during_login_flood(gate_factory: Any, tmp_path: Any) -> None:
    """
    40 concurrent wrong-PIN logins keep argon2 saturated (limits raised so
    every attempt is really checked); meanwhile an authenticated proxied
    request completes in under a second, every time.
    """
    gate = gate_factory(gate={"throttle": {"max_failures": 100000, "global_max_failures": 1000000}})
    cookie = gate.login()
    flood = ManagedProcess(
        [sys.executable, "-c", FLOOD_SCRIPT, str(gate.port), "40", "3"],
        str(tmp_path / "flood.log"),
    )
    try:
        deadline = time.monotonic() + 15
        while "flooding" not in flood.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # let the flood fill the verifier
        timings = []
        for _ in range(8):
            started = time.monotonic()
            answer = gate.request("GET", "/echo?probe=1", headers={"Cookie": f"pingated={cookie}"})
            timings.append(time.monotonic() - started)
            assert answer.status == 200
            time.sleep(0.1)
        flood.proc.wait(timeout=60)
    finally:
        flood.stop()
    with open(flood.log_path, encoding="utf-8") as f:
        report = json.loads(f.read().splitlines()[-1])
    statuses = report["statuses"]
    assert not report["errors"], report["errors"]
    assert max(timings) < 1.0, timings
    # The flood was real: PINs were checked (303) and the bound refused the excess (503).
    assert statuses.count(303) >= 8, statuses.count(303)
    assert statuses.count(503) >= 40, statuses.count(503)
    assert set(statuses) <= {303, 503}
