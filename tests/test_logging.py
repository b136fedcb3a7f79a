"""
Logging (pingated.logging): JSON lines, access lines, escaping, and the
[log] section -- in memory and through a real twistd process.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
from harness import TEST_PIN, TEST_SECRET, Gate
from twisted.internet.address import IPv4Address
from twisted.logger import Logger, LogLevel
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from pingated.config import ConfigError, LogConfig, MetricsConfig, parse_config
from pingated.logging import AccessLog, JsonLinesObserver, clean, install_observer

EXAMPLE_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$V84y6GsFLuX+be/fQCCnxQ$"
    "xouTyEpH+mlspqVMPmXxxm7y8IBRVxEmuTCJyNaMGOA"
)
MINIMAL = f"""
[gate]
pin_hash = "{EXAMPLE_HASH}"
secret = "0123456789abcdef0123456789abcdef"
[upstream]
url = "http://127.0.0.1:3050"
"""


def _json_events(emit: Any) -> list[dict[str, Any]]:
    stream = io.StringIO()
    observer = JsonLinesObserver(stream)
    emit(Logger(namespace="pingated.test", observer=observer))
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_format_fields_only() -> None:
    """One object per line: time, level, namespace, message and the named fields."""
    [event] = _json_events(
        lambda log: log.info(
            "pingated[security] login-failed ip={ip} path={path}",
            ip="203.0.113.7",
            path="/.pingated/login",
            not_named="must not appear",
        )
    )
    assert (
        event["message"] == "pingated[security] login-failed ip=203.0.113.7 path=/.pingated/login"
    )
    assert event["level"] == "info"
    assert event["namespace"] == "pingated.test"
    assert event["ip"] == "203.0.113.7"
    assert event["path"] == "/.pingated/login"
    assert "not_named" not in event
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", event["time"])


def test_json_lines_failures_and_odd_fields() -> None:
    """Failures carry their traceback; objects and reserved names are not copied."""

    def emit(log: Logger) -> None:
        try:
            raise ValueError("bad thing")
        except ValueError:
            log.failure("it broke for {thing} at {time}", Failure(), thing=object(), time="x")
        log.warn("multi\nline {n}", n=3)

    failure, warning = _json_events(emit)
    assert "ValueError: bad thing" in failure["traceback"]
    assert failure["level"] == "critical"
    assert "thing" not in failure
    assert failure["time"] != "x"
    assert warning["message"] == "multi\nline 3" and warning["n"] == 3
    assert warning["level"] == LogLevel.warn.name


def test_clean_escapes_what_could_forge_a_line() -> None:
    """Newlines, control characters and quotes from clients are escaped."""
    forged = 'x\r\n2026 [pingated.security#info] pingated[security] login-failed ip=1.2.3.4 "'
    cleaned = clean(forged)
    assert "\n" not in cleaned and "\r" not in cleaned
    assert cleaned.startswith("x\\x0d\\x0a2026")
    assert cleaned.endswith('\\"')
    assert clean("\x1b[31m\u2028") == "\\x1b[31m\\u2028"
    assert len(clean("a" * 10_000)) == 2000


def test_access_log_line() -> None:
    """The access line: real client address, request line, status, size, referer, agent."""
    events: list[dict[str, Any]] = []
    access = AccessLog(MetricsConfig().allow, Logger(observer=events.append))
    request = DummyRequest([b"x"])
    request.client = IPv4Address("TCP", "127.0.0.1", 5000)
    request.uri = b"/x?y=1"
    request.method = b"GET"
    request.clientproto = b"HTTP/1.1"
    request.code = 200
    request.sentLength = 512
    request.requestHeaders.setRawHeaders(b"x-forwarded-for", [b"203.0.113.7"])
    request.requestHeaders.setRawHeaders(b"user-agent", [b"curl/8\x1bforged"])
    request.requestHeaders.setRawHeaders(b"cookie", [b"pingated=SECRETVALUE"])
    access(request, "default")
    [event] = events
    from twisted.logger import formatEvent

    line = formatEvent(event)
    assert line == (
        '203.0.113.7 "GET /x?y=1 HTTP/1.1" 200 512 "-" "curl/8\\x1bforged" site=default'
    )
    assert "SECRETVALUE" not in line


def test_log_section_parsing() -> None:
    """[log] defaults to text without access lines; bad values are one clear line."""
    assert parse_config(MINIMAL, "p.toml").log == LogConfig()
    config = parse_config(MINIMAL + '[log]\nformat = "json"\naccess_log = true\n', "p.toml")
    assert config.log == LogConfig(format="json", access_log=True)
    with pytest.raises(ConfigError) as e:
        parse_config(MINIMAL + '[log]\nformat = "xml"\n', "p.toml")
    assert str(e.value) == 'p.toml: log.format: must be "text" or "json"'
    with pytest.raises(ConfigError) as e:
        parse_config(MINIMAL + "[log]\nlevel = 1\n", "p.toml")
    assert str(e.value) == "p.toml: log.level: unknown key"


def test_install_observer_only_for_json() -> None:
    """The JSON observer becomes the Application's ILogObserver; text leaves twistd's."""
    from twisted.logger import ILogObserver

    app = Componentized()
    assert not install_observer(app, LogConfig(), {"nodaemon": True, "logfile": None})
    assert app.getComponent(ILogObserver, None) is None
    assert install_observer(app, LogConfig(format="json"), {"nodaemon": True, "logfile": None})
    assert isinstance(app.getComponent(ILogObserver), JsonLinesObserver)


# --- a real gate ---


def _stopped_log(gate: Gate) -> str:
    """Stop the gate (so every line is flushed) and return all it printed."""
    gate.stop()
    assert gate.process is not None
    with open(gate.process.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()


FORGED_AGENT = (
    "ua\r\n2026-01-01T00:00:00+0000 pingated[security] login-failed ip=198.51.100.66 path=/"
)


def _traffic(gate: Gate) -> str:
    gate.request(
        "POST",
        "/.pingated/login",
        b"pin=111111&next=/",
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    cookie = gate.login()
    gate.request("GET", "/echo?q=1", headers={"Cookie": f"pingated={cookie}"})
    # http.client refuses raw CR/LF in headers, so send the forged agent by hand.
    import socket

    with socket.create_connection(("127.0.0.1", gate.port), 5) as s:
        s.sendall(
            b"GET /.pingated/health HTTP/1.1\r\nHost: x\r\nUser-Agent: "
            + FORGED_AGENT.replace("\r\n", "\x0b").encode()
            + b"\r\nConnection: close\r\n\r\n"
        )
        while s.recv(65536):
            pass
    return cookie


def test_json_logs_and_access_lines_from_twistd(gate_factory: Any) -> None:
    """format=json + access_log: every line is JSON; security and access events have fields."""
    gate = gate_factory(log={"format": "json", "access_log": True})
    cookie = _traffic(gate)
    text = _stopped_log(gate)
    lines = [line for line in text.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]
    failed = [e for e in events if e["message"].startswith("pingated[security] login-failed")]
    assert [(e["namespace"], e["ip"]) for e in failed] == [("pingated.security", "127.0.0.1")]
    forged = [e for e in events if "198.51.100.66" in e["message"]]
    assert [e["namespace"] for e in forged] == ["pingated.access"]
    assert forged[0]["agent"].startswith("ua\\x0b2026")
    access = [e for e in events if e["namespace"] == "pingated.access"]
    echo = [e for e in access if e["uri"] == "/echo?q=1"]
    assert len(echo) == 1 and echo[0]["status"] == 200 and echo[0]["ip"] == "127.0.0.1"
    assert any(e["status"] == 303 and e["method"] == "POST" for e in access)
    assert any("twistd" in e["message"] and "starting up" in e["message"] for e in events)
    for secret in (cookie, TEST_PIN, TEST_SECRET):
        assert secret not in text


def test_text_access_lines_cannot_forge_security_lines(gate_factory: Any) -> None:
    """Text format: access lines present, and no client input starts a new log line."""
    gate = gate_factory(log={"access_log": True})
    cookie = _traffic(gate)
    text = _stopped_log(gate)
    assert re.search(
        r'\[pingated\.access#info\] 127\.0\.0\.1 "GET /echo\?q=1 HTTP/1\.1" 200 ', text
    )
    security = [line for line in text.splitlines() if "pingated[security] login-failed" in line]
    assert len(security) == 2  # the real one, and the escaped forged agent inside an access line
    assert sum("[pingated.access#info]" in line for line in security) == 1
    assert not any("198.51.100.66" in line and "access" not in line for line in text.splitlines())
    assert cookie not in text and TEST_PIN not in text


def test_no_access_lines_by_default(gate_factory: Any) -> None:
    """access_log is off by default: requests leave no access lines."""
    gate = gate_factory()
    gate.request("GET", "/.pingated/health")
    assert "pingated.access" not in _stopped_log(gate)
