"""
Tests for the C{pingated} command (L{pingated.cli}) and the C{make run}
config writer (L{pingated.democonfig}).

C{main()} takes its streams as arguments, so everything here runs in
process; C{check-config} is covered in C{tests/test_config.py}.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.exceptions import VerifyMismatchError

from pingated import cli, democonfig
from pingated.config import load_config
from pingated.pins import weak_pin_reason


class _Tty(io.StringIO):
    """A stdin that claims to be a terminal, so hash-pin prompts."""

    def isatty(self) -> bool:
        return True


def _run(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, out=out, err=err, stdin=io.StringIO(stdin))
    return code, out.getvalue(), err.getvalue()


# -- gen-secret -------------------------------------------------------------------


def test_gen_secret() -> None:
    """256 random bits, URL-safe, one line, different every time."""
    secrets_seen = set()
    for _ in range(5):
        code, out, err = _run(["gen-secret"])
        assert code == 0
        assert err == ""
        assert out.endswith("\n")
        secret = out.strip()
        assert "\n" not in secret
        assert len(secret) >= 43
        assert re.fullmatch(r"[A-Za-z0-9_-]+", secret)
        assert len(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))) >= 32
        secrets_seen.add(secret)
    assert len(secrets_seen) == 5


def test_gen_secret_is_accepted_by_config() -> None:
    """What gen-secret prints passes the config's 32-byte rule."""
    _, out, _ = _run(["gen-secret"])
    assert len(out.strip().encode()) >= 32


# -- hash-pin ---------------------------------------------------------------------


def test_hash_pin_from_stdin() -> None:
    """A piped PIN is hashed with argon2id; the hash verifies that PIN only."""
    code, out, err = _run(["hash-pin"], stdin="274915\n")
    assert code == 0, err
    assert err == ""
    pin_hash = out.strip()
    assert pin_hash.startswith("$argon2id$")
    assert "274915" not in out
    assert PasswordHasher().verify(pin_hash, "274915")
    with pytest.raises(VerifyMismatchError):
        PasswordHasher().verify(pin_hash, "274916")


def test_hash_pin_output_is_a_valid_config_value(tmp_path: Path) -> None:
    """The printed hash can be pasted into gate.pin_hash as is."""
    _, out, _ = _run(["hash-pin"], stdin="274915\r\n")
    config_file = tmp_path / "pingated.toml"
    config_file.write_text(
        f'[gate]\npin_hash = "{out.strip()}"\nsecret = "{"s" * 40}"\n'
        '[upstream]\nurl = "http://127.0.0.1:1"\n'
    )
    assert load_config(str(config_file)).gate.pin_hash == out.strip()


def test_hash_pin_salted() -> None:
    """The same PIN gives a different hash each time (random salt)."""
    first = _run(["hash-pin"], stdin="274915\n")[1]
    second = _run(["hash-pin"], stdin="274915\n")[1]
    assert first != second


@pytest.mark.parametrize(
    "pin",
    [
        "1",
        "12345",
        "99999",
        "111111",
        "000000",
        "aaaaaa",
        "123456",
        "654321",
        "234567",
        "987654",
        "0123456789",
        "1234567",
        "890123",
        "121212",
        "112233",
        "123123",
        "696969",
        "password",
        "QWERTY",
    ],
)
def test_hash_pin_refuses_weak(pin: str) -> None:
    """Trivial PINs are refused with one line on stderr, nothing on stdout."""
    code, out, err = _run(["hash-pin"], stdin=pin + "\n")
    assert code == 1
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("pingated hash-pin: the PIN ")
    assert "--allow-weak" in lines[0]
    assert pin not in lines[0]


def test_hash_pin_allow_weak() -> None:
    """--allow-weak accepts a weak PIN on purpose."""
    code, out, err = _run(["hash-pin", "--allow-weak"], stdin="123456\n")
    assert code == 0, err
    assert PasswordHasher().verify(out.strip(), "123456")


@pytest.mark.parametrize("pin", ["274915", "835201", "4711x9", "correct horse"])
def test_reasonable_pins_accepted(pin: str) -> None:
    """Ordinary PINs pass the weak-PIN rules."""
    assert weak_pin_reason(pin) is None


def test_hash_pin_empty_stdin() -> None:
    """No PIN at all is an error, not a hash of the empty string."""
    code, out, err = _run(["hash-pin"], stdin="")
    assert (code, out) == (1, "")
    assert err == "pingated hash-pin: no PIN given\n"


def test_hash_pin_prompts_on_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the PIN is read twice with getpass (never echoed)."""
    answers = iter(["274915", "274915"])
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(cli.getpass, "getpass", fake_getpass)
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["hash-pin"], out=out, err=err, stdin=_Tty("")) == 0
    assert prompts == ["PIN: ", "PIN again: "]
    assert PasswordHasher().verify(out.getvalue().strip(), "274915")


def test_hash_pin_tty_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two different entries on a terminal: refused, nothing printed to stdout."""
    answers = iter(["274915", "274916"])
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt="": next(answers))
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["hash-pin"], out=out, err=err, stdin=_Tty("")) == 1
    assert out.getvalue() == ""
    assert err.getvalue() == "pingated hash-pin: the two PINs differ\n"


# -- argument handling ----------------------------------------------------------


def test_no_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's usage error (exit 2) for a missing or unknown command."""
    with pytest.raises(SystemExit) as caught:
        cli.main([])
    assert caught.value.code == 2
    with pytest.raises(SystemExit) as caught:
        cli.main(["frobnicate"])
    assert caught.value.code == 2
    assert "usage: pingated" in capsys.readouterr().err


# -- democonfig (make run) --------------------------------------------------------


def test_random_pin_is_not_weak() -> None:
    """The PIN make run prints is six digits and passes the weak rules."""
    for _ in range(50):
        pin = democonfig.random_pin()
        assert re.fullmatch(r"\d{6}", pin)
        assert weak_pin_reason(pin) is None


def test_democonfig_writes_valid_private_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """make run's config parses, its hash matches the printed PIN, and it is 0600."""
    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    monkeypatch.setattr(democonfig, "hash_pin", cheap.hash)
    target = tmp_path / "run"
    assert democonfig.main(["--dir", str(target), "--gate-port", "4060"]) == 0
    pin = capsys.readouterr().out.strip()
    config = load_config(str(target / "pingated.toml"))
    assert cheap.verify(config.gate.pin_hash, pin)
    assert config.server.listen == ("tcp:4060:interface=127.0.0.1",)
    assert (target / "pingated.toml").stat().st_mode & 0o077 == 0
    assert (target / "PIN").read_text().strip() == pin
