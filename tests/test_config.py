"""
Tests for L{pingated.config} and L{pingated.units}: what the operator writes
and the one-line refusals they see when it is wrong (contract sections 1-2).

Every refusal contract section 1 lists has its own test, asserting the exact
line (file, dotted key, problem), both from L{parse_config} and through the
C{pingated check-config} command.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from pingated.cli import main
from pingated.config import Config, ConfigError, load_config, parse_config
from pingated.units import UnitError, parse_duration, parse_size

REPO = Path(__file__).resolve().parent.parent
SECRET = "unit-test-secret-0123456789abcdef0123456789"
OLD_SECRET = "unit-test-old-secret-abcdefghijklmnopqrstuv"
PIN_HASH = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("246810")
PATH = "conf/pingated.toml"


def _toml(
    listen: str = '["tcp:0:interface=127.0.0.1"]',
    gate: str | None = None,
    upstream: str = 'url = "http://127.0.0.1:3050"',
    extra: str = "",
) -> str:
    if gate is None:
        gate = f'pin_hash = "{PIN_HASH}"\nsecret = "{SECRET}"'
    return (
        f'[server]\nlisten = {listen}\nstate_dir = "state"\n\n'
        f"[gate]\n{gate}\n\n"
        f"[upstream]\n{upstream}\n{extra}"
    )


def _refusal(text: str, path: str = PATH) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, path)
    line = str(caught.value)
    assert "\n" not in line
    return line


# -- units -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0),
        (90, 90),
        ("90", 90),
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("30d", 2592000),
        ("30D", 2592000),
        (" 5 m ", 300),
    ],
)
def test_durations(value: object, seconds: int) -> None:
    """Integers are seconds; s/m/h/d suffixes multiply."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [-1, True, 1.5, "1.5h", "-5s", "10x", "", "m", "5 minutes", None])
def test_bad_durations(value: object) -> None:
    """Anything else is a L{UnitError} (a ValueError) with a helpful message."""
    with pytest.raises(UnitError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (1048576, 1048576),
        ("100", 100),
        ("100B", 100),
        ("512KB", 512 * 1024),
        ("512k", 512 * 1024),
        ("10MB", 10 * 1024**2),
        ("10 mib", 10 * 1024**2),
        ("1GB", 1024**3),
        ("1g", 1024**3),
    ],
)
def test_sizes(value: object, size: int) -> None:
    """Integers are bytes; KB/MB/GB are binary multiples like nginx's."""
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [-1, False, 2.5, "1.5MB", "1TB", "MB", "", "ten", None])
def test_bad_sizes(value: object) -> None:
    """Anything else is a L{UnitError}."""
    with pytest.raises(UnitError):
        parse_size(value)


# -- a good file -------------------------------------------------------------


def test_minimal_config_defaults() -> None:
    """A minimal file gets the documented defaults."""
    config = parse_config(_toml(), PATH)
    assert config.gate.secret == SECRET.encode()
    assert config.gate.pin_hash == PIN_HASH
    assert config.gate.cookie_name == "pingated"
    assert config.gate.session_ttl == 30 * 86400
    assert config.gate.prefix == "/.pingated"
    assert config.gate.throttle.max_failures == 5
    assert config.upstream is not None
    assert config.upstream.url == "http://127.0.0.1:3050"
    assert config.upstream.idle_timeout == 300
    assert config.upstream.max_request_body == 100 * 1024**2
    assert [str(n) for n in config.server.trusted_proxies] == ["127.0.0.1/32", "::1/128"]
    # Relative paths are relative to the config file's directory.
    assert config.server.state_dir == os.path.abspath("conf/state")


def test_durations_and_sizes_in_config() -> None:
    """Keys documented as durations/sizes accept the string forms."""
    gate = f'pin_hash = "{PIN_HASH}"\nsecret = "{SECRET}"\nsession_ttl = "12h"\n'
    gate += '[gate.throttle]\nwindow = "5m"\nlockout = 60\nglobal_window = "2h"'
    upstream = (
        'url = "https://127.0.0.1:8443/"\nconnect_timeout = "3s"\nidle_timeout = "15m"\n'
        'max_request_body = "10MB"\npreserve_host = true'
    )
    config = parse_config(_toml(gate=gate, upstream=upstream), PATH)
    assert config.gate.session_ttl == 12 * 3600
    assert config.gate.throttle.window == 300
    assert config.gate.throttle.lockout == 60
    assert config.gate.throttle.global_window == 7200
    assert config.upstream is not None
    assert config.upstream.url == "https://127.0.0.1:8443"
    assert config.upstream.connect_timeout == 3
    assert config.upstream.idle_timeout == 900
    assert config.upstream.max_request_body == 10 * 1024**2
    assert config.upstream.preserve_host is True


def test_example_config_is_valid() -> None:
    """The shipped etc/pingated.toml parses (it documents every key)."""
    config = load_config(str(REPO / "etc" / "pingated.toml"))
    assert config.upstream is not None
    assert config.gate.prefix == "/.pingated"


def test_previous_secrets_and_cookie_domain() -> None:
    """Rotation secrets are kept as bytes; the cookie domain is lower-cased."""
    gate = (
        f'pin_hash = "{PIN_HASH}"\nsecret = "{SECRET}"\nprevious_secrets = ["{OLD_SECRET}"]\n'
        'cookie_domain = ".Example.COM"'
    )
    config = parse_config(_toml(gate=gate), PATH)
    assert config.gate.previous_secrets == (OLD_SECRET.encode(),)
    assert config.gate.cookie_domain == ".example.com"


def test_identity_headers() -> None:
    """[identity] headers become ordered (name, value) pairs."""
    extra = (
        '\n[identity]\nheaders = { "X-Trusted-User-Email" = "me@example.com", "X-User" = "me" }\n'
    )
    config = parse_config(_toml(extra=extra), PATH)
    assert config.identity_headers == (
        ("X-Trusted-User-Email", "me@example.com"),
        ("X-User", "me"),
    )


# -- contract section 1: each refusal, exact line ---------------------------

REFUSALS: dict[str, tuple[str, str]] = {
    "short secret": (
        _toml(gate=f'pin_hash = "{PIN_HASH}"\nsecret = "too-short"'),
        f"{PATH}: gate.secret: must be at least 32 bytes",
    ),
    "missing secret": (
        _toml(gate=f'pin_hash = "{PIN_HASH}"'),
        f"{PATH}: gate.secret: is required (set secret or secret_file)",
    ),
    "missing pin hash": (
        _toml(gate=f'secret = "{SECRET}"'),
        f"{PATH}: gate.pin_hash: is required (set pin_hash or pin_hash_file)",
    ),
    "invalid pin hash": (
        _toml(gate=f'pin_hash = "hunter2"\nsecret = "{SECRET}"'),
        f"{PATH}: gate.pin_hash: is not a valid argon2 hash (make one with `pingated hash-pin`)",
    ),
    "unparsable endpoint": (
        _toml(listen='["tcp:notaport"]'),
        f"{PATH}: server.listen: 'tcp:notaport' is not a valid endpoint string "
        "(invalid literal for int() with base 10: 'notaport')",
    ),
    "non-http upstream": (
        _toml(upstream='url = "ftp://127.0.0.1:21"'),
        f"{PATH}: upstream.url: 'ftp://127.0.0.1:21' "
        "must be an http:// or https:// URL with a host",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_contract_refusals(case: str) -> None:
    """Each bad input of contract section 1 is refused with its exact one-line message."""
    text, expected = REFUSALS[case]
    assert _refusal(text) == expected


def test_short_secret_message_matches_contract_example() -> None:
    """The contract's own example line, character for character."""
    text = _toml(gate=f'pin_hash = "{PIN_HASH}"\nsecret = "0123456789abcdef0123456789abcde"')
    assert _refusal(text, "etc/pingated.toml") == (
        "etc/pingated.toml: gate.secret: must be at least 32 bytes"
    )


@pytest.mark.parametrize(
    "pin_hash",
    [
        "",
        "$argon2id$garbage",
        "$argon2id$v=19$m=65536,t=3,p=4$",
        # Parameters fine, salt and digest mangled (a bad copy-paste).
        "$argon2id$v=19$m=65536,t=3,p=4$xx$yy",
        "$argon2id$v=19$m=65536,t=3,p=4$!!!!!!!!!!!!$!!!!!!!!!!!!!!!!!!!!!!!!",
        PIN_HASH[: -len(PIN_HASH.split("$")[-1]) + 3],
        "$2b$12$abcdefghijklmnopqrstuuD5b1Lk5O4y3L9bQ1A2b3C4d5E6f7G8h",
    ],
)
def test_invalid_pin_hashes(pin_hash: str) -> None:
    """Anything that could never verify a PIN is refused at start, not at first login."""
    line = _refusal(_toml(gate=f'pin_hash = "{pin_hash}"\nsecret = "{SECRET}"'))
    assert line.startswith(f"{PATH}: gate.pin_hash: ")


@pytest.mark.parametrize(
    ("listen", "fragment"),
    [
        ('["bogus:1"]', "'bogus:1' is not a valid endpoint string"),
        ('[""]', "'' is not a valid endpoint string"),
        ('["tcp:80:nonsense=1"]', "'tcp:80:nonsense=1' is not a valid endpoint string"),
        ("[]", "at least one endpoint is required"),
        ('"tcp:80"', "must be a list"),
    ],
)
def test_bad_listen(listen: str, fragment: str) -> None:
    """Every listen problem names server.listen."""
    line = _refusal(_toml(listen=listen))
    assert line.startswith(f"{PATH}: server.listen: ")
    assert fragment in line


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "127.0.0.1:3050", "http://", "ws://127.0.0.1:1", "javascript:x"],
)
def test_bad_upstream_urls(url: str) -> None:
    """Only http(s) URLs with a host are upstreams."""
    line = _refusal(_toml(upstream=f'url = "{url}"'))
    assert line == f"{PATH}: upstream.url: {url!r} must be an http:// or https:// URL with a host"


def test_upstream_bad_port() -> None:
    """A port that is not a number is named as such."""
    assert _refusal(_toml(upstream='url = "http://h:xx"')) == (
        f"{PATH}: upstream.url: 'http://h:xx' has an invalid port"
    )


def test_missing_upstream() -> None:
    """No [upstream] and no [[site]]: nothing to protect."""
    text = _toml().split("[upstream]")[0]
    assert _refusal(text) == (
        f"{PATH}: upstream.url: is required (or configure at least one [[site]])"
    )


@pytest.mark.parametrize(
    ("extra_gate", "key", "problem"),
    [
        ('session_ttl = "soon"', "gate.session_ttl", "must be a duration"),
        ("session_ttl = 0", "gate.session_ttl", "must be positive"),
        ('prefix = "login"', "gate.prefix", "must be a path like /.pingated"),
        ('cookie_name = "a b"', "gate.cookie_name", "is not a valid cookie name"),
        ('previous_secrets = ["short"]', "gate.previous_secrets", "at least 32 bytes"),
        ('login_url = "ftp://x"', "gate.login_url", "must be an http:// or https:// URL"),
        ("cookie_name = 5", "gate.cookie_name", "must be a string"),
        ("[gate.throttle]\nmax_failures = 0", "gate.throttle", "must be >= 1"),
        ('[gate.throttle]\nwindow = "often"', "gate.throttle.window", "must be a duration"),
    ],
)
def test_other_gate_refusals(extra_gate: str, key: str, problem: str) -> None:
    """Other gate keys also fail with file, dotted key and problem on one line."""
    gate = f'pin_hash = "{PIN_HASH}"\nsecret = "{SECRET}"\n{extra_gate}'
    line = _refusal(_toml(gate=gate))
    assert line.startswith(f"{PATH}: {key}: ")
    assert problem in line


@pytest.mark.parametrize(
    ("text_change", "key"),
    [
        (("[server]\n", "[server]\nlisten_on = 1\n"), "server.listen_on"),
        (("[gate]\n", "[gate]\nsecrte = 'x'\n"), "gate.secrte"),
        (("[upstream]\n", "[upstream]\ntimeout = 5\n"), "upstream.timeout"),
        (("[server]\n", "bogus = 1\n[server]\n"), "bogus"),
        (("[upstream]\n", "[gate.throttle]\nmax = 1\n[upstream]\n"), "gate.throttle.max"),
        (("[upstream]\n", "[identity]\nheader = {}\n[upstream]\n"), "identity.header"),
        (("[upstream]\n", "[metrics]\nallowed = []\n[upstream]\n"), "metrics.allowed"),
    ],
)
def test_unknown_keys_refused(text_change: tuple[str, str], key: str) -> None:
    """A typo is an error, never silently ignored."""
    old, new = text_change
    assert _refusal(_toml().replace(old, new, 1)) == f"{PATH}: {key}: unknown key"


def test_syntax_error_is_one_line() -> None:
    """TOML syntax errors are reported against the file too."""
    line = _refusal('[gate\nsecret = "x"\n')
    assert line.startswith(f"{PATH}: (syntax): ")


def test_bad_trusted_proxy() -> None:
    """A CIDR that is not one names the offending entry."""
    text = _toml().replace("[server]\n", '[server]\ntrusted_proxies = ["10.0.0.0/8", "nope"]\n')
    assert _refusal(text) == f"{PATH}: server.trusted_proxies: 'nope' is not an address or CIDR"


def test_identity_header_injection_refused() -> None:
    """Identity header names and values cannot smuggle CR/LF or colons."""
    extra = '\n[identity]\nheaders = { "X-User" = "me\\r\\nX-Admin: yes" }\n'
    assert _refusal(_toml(extra=extra)) == f"{PATH}: identity.headers.X-User: is not a valid header"


# -- secret files -------------------------------------------------------------


def test_secret_and_pin_hash_files(tmp_path: Path) -> None:
    """*_file references read the first line, trimmed, relative to the config file."""
    (tmp_path / "secret").write_text(f"  {SECRET}  \nsecond line ignored\n")
    (tmp_path / "pin").write_text(PIN_HASH + "\n")
    config_file = tmp_path / "pingated.toml"
    config_file.write_text(_toml(gate='pin_hash_file = "pin"\nsecret_file = "secret"'))
    config = load_config(str(config_file))
    assert config.gate.secret == SECRET.encode()
    assert config.gate.pin_hash == PIN_HASH


def test_missing_secret_file(tmp_path: Path) -> None:
    """A secret file that does not exist names the key and the resolved path."""
    config_file = tmp_path / "pingated.toml"
    config_file.write_text(_toml(gate=f'pin_hash = "{PIN_HASH}"\nsecret_file = "nope"'))
    with pytest.raises(ConfigError) as caught:
        load_config(str(config_file))
    assert str(caught.value) == (
        f"{config_file}: gate.secret_file: cannot read {tmp_path / 'nope'}: "
        "No such file or directory"
    )


def test_empty_secret_file(tmp_path: Path) -> None:
    """An empty secret file is as bad as no secret."""
    (tmp_path / "secret").write_text("\n")
    config_file = tmp_path / "pingated.toml"
    config_file.write_text(_toml(gate=f'pin_hash = "{PIN_HASH}"\nsecret_file = "secret"'))
    with pytest.raises(ConfigError) as caught:
        load_config(str(config_file))
    assert str(caught.value) == f"{config_file}: gate.secret_file: {tmp_path / 'secret'} is empty"


def test_short_secret_from_file(tmp_path: Path) -> None:
    """The 32-byte rule applies to file secrets too, without echoing the value."""
    (tmp_path / "secret").write_text("tiny-secret-value\n")
    config_file = tmp_path / "pingated.toml"
    config_file.write_text(_toml(gate=f'pin_hash = "{PIN_HASH}"\nsecret_file = "secret"'))
    with pytest.raises(ConfigError) as caught:
        load_config(str(config_file))
    assert str(caught.value) == f"{config_file}: gate.secret: must be at least 32 bytes"
    assert "tiny-secret-value" not in str(caught.value)


def test_secret_inline_and_file_conflict(tmp_path: Path) -> None:
    """Giving both forms is ambiguous and refused."""
    gate = f'pin_hash = "{PIN_HASH}"\nsecret = "{SECRET}"\nsecret_file = "x"'
    assert _refusal(_toml(gate=gate)) == (
        f"{PATH}: gate.secret: give either secret or secret_file, not both"
    )


def test_missing_config_file(tmp_path: Path) -> None:
    """A config path that does not exist is one line too."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(str(missing))
    assert str(caught.value) == f"{missing}: (file): cannot read: No such file or directory"


# -- [[site]] -------------------------------------------------------------------

SITES = """
[identity]
headers = { "X-User" = "global" }

[[site]]
host = "Grafana.Example.com"
upstream = "http://127.0.0.1:3000"
preserve_host = true
public_paths = ["/api/health"]
[site.identity]
headers = { "X-WEBAUTH-USER" = "admin" }

[[site]]
host = "*.apps.example.com"
upstream = "https://127.0.0.1:8443/"
idle_timeout = "1m"
"""


def test_sites() -> None:
    """[[site]] tables: host lower-cased, own upstream, identity fallback, wildcard matching."""
    config = parse_config(_toml(extra=SITES), PATH)
    grafana, wildcard = config.sites
    assert grafana.host == "grafana.example.com"
    assert grafana.upstream.url == "http://127.0.0.1:3000"
    assert grafana.upstream.preserve_host is True
    assert grafana.public_paths == ("/api/health",)
    assert grafana.identity_headers == (("X-WEBAUTH-USER", "admin"),)
    assert wildcard.upstream.url == "https://127.0.0.1:8443"
    assert wildcard.upstream.idle_timeout == 60
    assert wildcard.identity_headers == (("X-User", "global"),)
    assert grafana.matches("GRAFANA.example.com")
    assert not grafana.matches("x.grafana.example.com")
    assert wildcard.matches("a.apps.example.com")
    assert wildcard.matches("a.b.apps.example.com")
    assert not wildcard.matches("apps.example.com")
    assert not wildcard.matches("evilapps.example.com")


def test_sites_without_default_upstream() -> None:
    """Sites alone are enough; requests for other hosts then get 404."""
    text = _toml(extra=SITES).replace('[upstream]\nurl = "http://127.0.0.1:3050"\n', "")
    config = parse_config(text, PATH)
    assert config.upstream is None
    assert len(config.sites) == 2


@pytest.mark.parametrize(
    ("site", "expected"),
    [
        ('upstream = "http://127.0.0.1:1"', "site[0].host: is required: a host name or *.domain"),
        ('host = "a/b"\nupstream = "http://127.0.0.1:1"', "site[0].host: is required"),
        ('host = "a.example.com"', "site[0].upstream: is required"),
        (
            'host = "a.example.com"\nupstream = "gopher://x"',
            "site[0].upstream: 'gopher://x' must be an http:// or https:// URL with a host",
        ),
        (
            'host = "a.example.com"\nupstream = "http://x"\npublic_paths = ["health"]',
            "site[0].public_paths: 'health' must start with /",
        ),
        (
            'host = "a.example.com"\nupstream = "http://x"\nbogus = 1',
            "site[0].bogus: unknown key",
        ),
    ],
)
def test_bad_sites(site: str, expected: str) -> None:
    """Site errors name the site by index."""
    line = _refusal(_toml(extra=f"\n[[site]]\n{site}\n"))
    assert line.startswith(f"{PATH}: {expected}")


# -- secrets never leak -------------------------------------------------------


def test_secrets_not_in_repr_or_str() -> None:
    """Neither the secret, the old secrets nor the PIN hash show in repr/str."""
    gate = f'pin_hash = "{PIN_HASH}"\nsecret = "{SECRET}"\nprevious_secrets = ["{OLD_SECRET}"]'
    extra = (
        '\n[llm]\nenabled = true\nmaster_key = "sk-master-key-value-1234567890"\n'
        + SITES.replace("[identity]", "[theme]\ncss_file = ''\n[identity]")
    )
    config = parse_config(_toml(gate=gate, extra=extra), PATH)
    texts: list[Any] = [config, config.gate, config.llm, config.server, *config.sites]
    for obj in texts:
        for rendered in (repr(obj), str(obj)):
            for secret in (SECRET, OLD_SECRET, PIN_HASH, "sk-master-key-value"):
                assert secret not in rendered
    summary = config.summary()
    for secret in (SECRET, OLD_SECRET, PIN_HASH, "sk-master-key-value"):
        assert secret not in summary


@pytest.mark.parametrize(
    "gate",
    [
        'pin_hash = "{h}"\nsecret = "{s}"\nprevious_secrets = ["{s}", "{s}"[:9]]',
        'pin_hash = "{h}"\nsecret = "{s}"\nprevious_secrets = ["{short}"]',
        'pin_hash = "{h}"\nsecret = "{short}"',
        'pin_hash = "{h}"\nsecret = ["{s}"]',
        'pin_hash = "{h}"\nsecret = "{s}\n',
        'pin_hash = "{h}"\nsecret = 12\nsecret_note = "{s}"',
        'pin_hash = "{s}"\nsecret = "{s}"',
    ],
)
def test_secrets_not_in_errors(gate: str) -> None:
    """Whatever is wrong, the refusal line never carries a secret's value."""
    short = "short-secret-value"
    text = _toml(gate=gate.format(h=PIN_HASH, s=SECRET, short=short))
    with pytest.raises(ConfigError) as caught:
        parse_config(text, PATH)
    message = str(caught.value)
    assert "\n" not in message
    for secret in (SECRET, short, PIN_HASH, SECRET[:9]):
        assert secret not in message


# -- check-config command -----------------------------------------------------


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_check_config_refusals(case: str, tmp_path: Path) -> None:
    """C{pingated check-config FILE}: exit 1 and the single refusal line on stderr."""
    text, expected = REFUSALS[case]
    config_file = tmp_path / "pingated.toml"
    config_file.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    code = main(["check-config", str(config_file)], out=out, err=err)
    assert code == 1
    assert out.getvalue() == ""
    lines = err.getvalue().splitlines()
    assert lines == [expected.replace(PATH, str(config_file), 1)]


def test_check_config_ok(tmp_path: Path) -> None:
    """A good file: exit 0 and a summary without secrets."""
    config_file = tmp_path / "pingated.toml"
    config_file.write_text(_toml())
    out, err = io.StringIO(), io.StringIO()
    assert main(["check-config", str(config_file)], out=out, err=err) == 0
    assert err.getvalue() == ""
    assert out.getvalue().startswith(f"{config_file}: OK\n")
    assert "upstream: http://127.0.0.1:3050" in out.getvalue()
    assert SECRET not in out.getvalue()
    assert PIN_HASH not in out.getvalue()


def test_check_config_real_commands() -> None:
    """The console script and C{python -m pingated} both accept the shipped example."""
    example = str(REPO / "etc" / "pingated.toml")
    script = str(Path(sys.executable).parent / "pingated")
    for command in ([script], [sys.executable, "-m", "pingated"]):
        done = subprocess.run(
            [*command, "check-config", example],
            cwd=str(REPO),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.startswith(f"{example}: OK")
        assert done.stderr == ""


def test_check_config_real_command_refuses(tmp_path: Path) -> None:
    """The real process exits 1 with exactly one line on stderr, no traceback."""
    config_file = tmp_path / "pingated.toml"
    config_file.write_text(REFUSALS["short secret"][0])
    done = subprocess.run(
        [sys.executable, "-m", "pingated", "check-config", str(config_file)],
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"{config_file}: gate.secret: must be at least 32 bytes"]


def test_config_type() -> None:
    """L{parse_config} returns a L{Config} record (guards the import surface)."""
    assert isinstance(parse_config(_toml(), PATH), Config)
