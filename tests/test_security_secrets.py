"""
Secrets stay secret: the PIN (right and wrong ones), the cookie secret and
previous secrets, the PIN hash, the LLM master key and every issued cookie
value must never appear in the daemon's log, in any answer it gives
(pages, errors, what the upstream is sent) or in exception text.

Real traffic, including errors, goes through a real C{twistd pingated};
then gate.log, every response and the state directory are searched.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from harness import free_port

from pingated import cli

# Distinctive values, so a match can only be a leak.
PIN = "kq7Z2x9pin"
WRONG_PINS = ["wR0ng-p1n-A", "wR0ng-p1n-B", "wR0ng-p1n-C"]
SECRET = "Sekr1t-cookie-signing-key-0123456789-ABCDEFGH"
PREVIOUS = "Pr3vious-signing-key-0123456789-ZYXWVUTSRQPO"
MASTER_KEY = "sk-master-K3y-4f1d9e2c7b6a5f4e3d2c1b0a"
PIN_HASH = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PIN)
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _secrets(cookies: list[str]) -> dict[str, str]:
    found = {
        "pin": PIN,
        "secret": SECRET,
        "previous secret": PREVIOUS,
        "master key": MASTER_KEY,
        "pin hash": PIN_HASH,
        "pin hash digest": PIN_HASH.rsplit("$", 1)[1],
    }
    for n, wrong in enumerate(WRONG_PINS):
        found[f"wrong pin {n}"] = wrong
    for n, cookie in enumerate(cookies):
        found[f"cookie {n}"] = cookie
        found[f"cookie {n} signature"] = cookie.rsplit(".", 1)[1]
    return found


def _assert_clean(where: str, text: str, cookies: list[str]) -> None:
    for name, value in _secrets(cookies).items():
        assert value not in text, f"the {name} appears in {where}"


def _login(gate: Any, pin: str, address: str) -> Any:
    return gate.request(
        "POST",
        "/.pingated/login",
        f"pin={pin}&next=/echo".encode(),
        {**FORM, "X-Forwarded-For": address, "Accept": "text/html"},
    )


def test_secrets_never_leak(gate_factory: Any, upstream_url: str, tmp_path: Path) -> None:
    """Drive every kind of answer, then search the log, the answers and state_dir."""
    gate = gate_factory(
        gate={"pin_hash": PIN_HASH, "secret": SECRET, "previous_secrets": [PREVIOUS]},
        llm={"enabled": True, "upstream": upstream_url, "master_key": MASTER_KEY},
    )
    answers: list[tuple[str, Any]] = []
    cookies: list[str] = []

    def keep(label: str, answer: Any) -> Any:
        answers.append((label, answer))
        return answer

    # No session: redirect and 401.
    keep("anon nav", gate.request("GET", "/echo", headers={"Accept": "text/html"}))
    keep("anon api", gate.request("GET", "/echo"))
    # Wrong PINs up to a lockout, and the lockout page / JSON.
    for n in range(5):
        keep("wrong pin", _login(gate, WRONG_PINS[n % len(WRONG_PINS)], "203.0.113.7"))
    keep("locked page", _login(gate, PIN, "203.0.113.7"))
    keep(
        "locked json",
        gate.request(
            "POST",
            "/.pingated/login",
            b'{"pin": "' + WRONG_PINS[0].encode() + b'"}',
            {"Content-Type": "application/json", "X-Forwarded-For": "203.0.113.7"},
        ),
    )
    keep(
        "login page after",
        gate.request(
            "GET", "/.pingated/login?error=pin", headers={"X-Forwarded-For": "203.0.113.7"}
        ),
    )
    # Right PIN from elsewhere: a cookie (its Set-Cookie is the one place it may appear).
    for address in ("198.51.100.1", "198.51.100.2"):
        answer = _login(gate, PIN, address)
        assert answer.status == 303
        cookie = answer.cookie("pingated")
        assert cookie
        cookies.append(cookie)
    session = {"Cookie": f"pingated={cookies[0]}; other=1"}
    # Proxied: what the upstream echoes is what it was sent - never the gate's cookie.
    echoed = keep("proxied echo", gate.request("GET", "/echo?x=1", headers=session))
    assert echoed.status == 200
    assert b"other=1" in echoed.body  # the echo really shows the Cookie header
    # The LLM route with the demo's echo as the "LLM": the key is injected and masked.
    llm = keep(
        "llm echo",
        gate.request(
            "POST",
            "/api/llm/echo",
            b"{}",
            {**session, "Content-Type": "application/json", "Authorization": "Bearer client-key"},
        ),
    )
    assert llm.status == 200
    keep("llm anon", gate.request("POST", "/api/llm/echo", b"{}"))
    # Broken and hostile cookies.
    tampered = cookies[0][:-1] + ("A" if cookies[0][-1] != "A" else "B")
    keep("tampered", gate.request("GET", "/echo", headers={"Cookie": f"pingated={tampered}"}))
    keep("junk cookie", gate.request("GET", "/echo", headers={"Cookie": "pingated=" + "x" * 3000}))
    # Errors of every kind.
    keep("404", gate.request("GET", "/.pingated/nothing-here"))
    keep("405", gate.request("PUT", "/.pingated/health", b"x"))
    keep("upstream 500", gate.request("GET", "/status/500", headers=session))
    keep(
        "bad form",
        gate.request(
            "POST",
            "/.pingated/login",
            b"pin=%ZZ%00&next=%",
            {**FORM, "X-Forwarded-For": "192.0.2.9"},
        ),
    )
    keep("huge pin", _login(gate, "9" * 5000, "192.0.2.10"))
    # Logout revokes; the revoked cookie is then refused.
    keep("logout", gate.request("POST", "/.pingated/logout", b"", session))
    refused = keep("revoked", gate.request("GET", "/echo", headers=session))
    assert refused.status == 401
    # A bad reload: the refusal is logged, naming the key but not the value.
    config = dict(gate.config)
    config["gate"] = {**config["gate"], "secret": "short-" + SECRET[:10]}
    gate.write_config(config)
    gate.process.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in gate.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "gate.secret: must be at least 32 bytes" in gate.log()

    log = gate.log()
    assert "login-failed" in log and "login-ok" in log  # the log really saw the traffic
    _assert_clean("gate.log", log, cookies)
    assert "short-" + SECRET[:10] not in log
    for label, answer in answers:
        headers = "\n".join(f"{k}: {v}" for k, v in answer.headers if k.lower() != "set-cookie")
        text = headers + "\n" + answer.body.decode("latin-1")
        _assert_clean(f"the {label} answer", text, cookies)
    for path in Path(gate.config["server"]["state_dir"]).rglob("*"):
        if path.is_file():
            _assert_clean(f"state file {path.name}", path.read_text(errors="replace"), cookies)


def test_refusals_at_start_name_the_key_not_the_value(tmp_path: Path) -> None:
    """check-config and a refused start never echo a bad secret, key or hash."""
    bad_secret = "tooShort-S3cret"
    bad_hash = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$" + "Q" * 3
    config = tmp_path / "bad.toml"
    cases = [
        f'[gate]\npin_hash = "{PIN_HASH}"\nsecret = "{bad_secret}"\n',
        f'[gate]\npin_hash = "{bad_hash}"\nsecret = "{SECRET}"\n',
        f'[gate]\npin_hash = "{PIN_HASH}"\nsecret = "{SECRET}"\n'
        f'previous_secrets = ["{bad_secret}"]\n',
        f'[gate]\npin_hash = "{PIN_HASH}"\nsecret = "{SECRET}"\n'
        f'[llm]\nenabled = true\nmaster_key = "{MASTER_KEY}"\nupstream = "ftp://x"\n',
        f'[gate]\npin_hash = "{PIN_HASH}"\nsecret = "{SECRET}"\nscret = "{bad_secret}"\n',
    ]
    for text in cases:
        config.write_text(text + '[upstream]\nurl = "http://127.0.0.1:1"\n')
        out, err = io.StringIO(), io.StringIO()
        assert cli.main(["check-config", str(config)], out=out, err=err) == 1
        output = out.getvalue() + err.getvalue()
        assert output.count("\n") == 1, output
        for value in (bad_secret, bad_hash, SECRET, MASTER_KEY, PIN_HASH):
            assert value not in output, output


def test_secret_file_contents_never_echoed(tmp_path: Path) -> None:
    """A secret read from secret_file that is too short is refused without its content."""
    from pingated.config import ConfigError, parse_config

    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cret-from-file\n")
    text = (
        f'[gate]\npin_hash = "{PIN_HASH}"\nsecret_file = "{secret_file}"\n'
        '[upstream]\nurl = "http://127.0.0.1:1"\n'
    )
    with pytest.raises(ConfigError) as e:
        parse_config(text, str(tmp_path / "p.toml"))
    assert "s3cret-from-file" not in str(e.value)
    assert str(e.value).endswith("gate.secret: must be at least 32 bytes")


def test_reprs_hide_secrets(tmp_path: Path) -> None:
    """Objects that hold secrets print without them (tracebacks, debug logs)."""
    from twisted.internet.task import Clock

    from pingated.config import parse_config
    from pingated.pins import PinVerifier
    from pingated.sessions import RevocationStore, SessionManager
    from pingated.threads import run_inline

    text = (
        f'[gate]\npin_hash = "{PIN_HASH}"\nsecret = "{SECRET}"\n'
        f'previous_secrets = ["{PREVIOUS}"]\n'
        f'[upstream]\nurl = "http://127.0.0.1:1"\n'
        f'[llm]\nenabled = true\nmaster_key = "{MASTER_KEY}"\n'
    )
    config = parse_config(text, str(tmp_path / "p.toml"))
    clock = Clock()
    sessions = SessionManager(
        SECRET.encode(),
        (PREVIOUS.encode(),),
        60,
        clock,
        RevocationStore.load(str(tmp_path / "state"), run_inline, 0),
    )
    _, cookie = sessions.issue()
    verifier = PinVerifier(PIN_HASH, run_inline)
    for thing in (config, config.gate, config.llm, sessions, verifier):
        _assert_clean(f"repr of {type(thing).__name__}", repr(thing) + str(thing), [cookie])


def test_daemon_refusing_to_start_prints_one_clean_line(tmp_path: Path) -> None:
    """twistd with a bad secret exits non-zero with the key named and the value absent."""
    from harness import TWISTD

    config = tmp_path / "pingated.toml"
    config.write_text(
        f'[server]\nlisten = ["tcp:{free_port()}:interface=127.0.0.1"]\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[gate]\npin_hash = "{PIN_HASH}"\nsecret = "{SECRET[:20]}"\n'
        '[upstream]\nurl = "http://127.0.0.1:1"\n'
    )
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "pingated", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ},
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "gate.secret: must be at least 32 bytes" in output
    assert SECRET[:20] not in output
    assert PIN_HASH not in output
