"""
Test doubles and process helpers shared by the whole suite.

Integration tests start the real C{twistd -n pingated} process (and real
upstreams) on loopback ports chosen at run time, and every process a test
starts is stopped by its pid when the test ends, also on failure.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any

TEST_PIN = "246810"
TEST_SECRET = "test-secret-0123456789abcdef0123456789abcdef"
BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
PINGATED = os.path.join(BIN, "pingated")
ARTIFACTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts"
)


@cache
def pin_hash(pin: str = TEST_PIN) -> str:
    """argon2id hash of C{pin}, computed once per test session."""
    from pingated.pins import hash_pin

    return hash_pin(pin)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until something accepts on 127.0.0.1:C{port}."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(value)


def to_toml(data: Mapping[str, Any]) -> str:
    """Enough TOML for test configs: tables, nested tables and arrays of tables."""
    lines: list[str] = []

    def emit(prefix: str, table: Mapping[str, Any]) -> None:
        scalars = {
            k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_list(v)
        }
        subtables = {k: v for k, v in table.items() if isinstance(v, dict) and not _inline(k)}
        inline = {k: v for k, v in table.items() if isinstance(v, dict) and _inline(k)}
        lists = {k: v for k, v in table.items() if _is_table_list(v)}
        for k, v in {**scalars, **inline}.items():
            lines.append(f"{k} = {_toml_value(v)}")
        for k, v in subtables.items():
            name = f"{prefix}.{k}" if prefix else k
            lines.append(f"\n[{name}]")
            emit(name, v)
        for k, v in lists.items():
            name = f"{prefix}.{k}" if prefix else k
            for entry in v:
                lines.append(f"\n[[{name}]]")
                emit(name, entry)

    emit("", data)
    return "\n".join(lines) + "\n"


def _inline(key: str) -> bool:
    # Header maps are written inline: { "X-A" = "b" }.
    return key == "headers"


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def base_config(state_dir: str, port: int, upstream: str | None) -> dict[str, Any]:
    """A minimal valid config as a dict, for tests to adjust before writing."""
    config: dict[str, Any] = {
        "server": {"listen": [f"tcp:{port}:interface=127.0.0.1"], "state_dir": state_dir},
        "gate": {"pin_hash": pin_hash(), "secret": TEST_SECRET},
    }
    if upstream is not None:
        config["upstream"] = {"url": upstream}
    return config


def deep_update(target: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Merge C{changes} into C{target} recursively (tables merge, values replace)."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_update(target[key], value)
        else:
            target[key] = value
    return target


class ManagedProcess:
    """A child process that is always stopped by pid, even when a test fails."""

    def __init__(
        self,
        argv: list[str],
        log_path: str,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = argv
        self.log_path = log_path
        self.log_file = open(log_path, "ab")
        merged = dict(os.environ)
        merged.update(env or {})
        self.proc = subprocess.Popen(
            argv,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=merged,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """Everything the process printed so far."""
        self.log_file.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log_file.close()
        return self.proc.returncode


class Gate:
    """A running C{twistd -n pingated} process with its config file and port."""

    def __init__(self, workdir: str, config: dict[str, Any], port: int) -> None:
        self.workdir = workdir
        self.config = config
        self.port = port
        self.config_path = os.path.join(workdir, "pingated.toml")
        self.write_config(config)
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = config
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(to_toml(config))

    def start(self, wait: bool = True) -> Gate:
        self.process = ManagedProcess(
            [TWISTD, "-n", "--pidfile=", "pingated", "--config", self.config_path],
            os.path.join(self.workdir, "gate.log"),
            cwd=self.workdir,
        )
        if wait:
            wait_for_port(self.port, proc=self.process.proc)
        return self

    def stop(self) -> int | None:
        return self.process.stop() if self.process else None

    def restart(self) -> Gate:
        self.stop()
        return self.start()

    def log(self) -> str:
        return self.process.log() if self.process else ""

    # --- HTTP helpers (stdlib only, so they cannot hide proxy behaviour) ---

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        host: str | None = None,
    ) -> Response:
        """One request on a fresh connection; redirects are not followed."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            if host is not None:
                hdrs["Host"] = host
            conn.request(method, path, body=body, headers=hdrs)
            raw = conn.getresponse()
            data = raw.read()
            return Response(raw.status, raw.getheaders(), data)
        finally:
            conn.close()

    def login(self, pin: str = TEST_PIN, next_url: str = "/", host: str | None = None) -> str:
        """Log in and return the session cookie value."""
        body = f"pin={pin}&next={next_url}".encode()
        response = self.request(
            "POST",
            "/.pingated/login",
            body,
            {"Content-Type": "application/x-www-form-urlencoded"},
            host=host,
        )
        cookie = response.cookie("pingated")
        if response.status != 303 or cookie is None:
            raise AssertionError(f"login failed: {response.status} {response.headers}")
        return cookie


class Response:
    """A fully read HTTP response."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def cookie(self, name: str) -> str | None:
        """The value a Set-Cookie for C{name} sets, if any."""
        for value in self.all("set-cookie"):
            first = value.split(";", 1)[0]
            key, _, val = first.partition("=")
            if key.strip() == name:
                return val
        return None

    def set_cookie(self, name: str) -> str | None:
        """The whole Set-Cookie header for C{name}."""
        for value in self.all("set-cookie"):
            if value.split("=", 1)[0].strip() == name:
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


@contextlib.contextmanager
def demo_upstream(port: int | None = None) -> Iterator[str]:
    """The bundled demo upstream as a real process; yields its base URL."""
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="pingated-upstream-")
    proc = ManagedProcess(
        [sys.executable, "-m", "pingated.demo", "--port", str(port), "--interface", "127.0.0.1"],
        os.path.join(workdir, "upstream.log"),
    )
    try:
        wait_for_port(port, proc=proc.proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()
