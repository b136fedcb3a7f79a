"""
The systemd units (systemd/): verified offline with systemd-analyze, scored
for their sandbox, and socket activation exercised for real with
systemd-socket-activate (which passes sockets exactly as systemd does).

This machine runs no systemd as PID 1 (a container), so nothing is started
through systemctl; `systemd-analyze verify --root=` checks the unit files
against a small root holding the unit, the programs it names and systemd's
own units.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any

import pytest
from harness import TWISTD, ManagedProcess, free_port, wait_for_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICE = os.path.join(ROOT, "systemd", "pingated.service")
SOCKET = os.path.join(ROOT, "systemd", "pingated.socket")
PACKAGED_CONFIG = os.path.join(ROOT, "debian", "pingated.toml")

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def service_settings() -> dict[str, list[str]]:
    """Key -> values of the service unit's [Service] section."""
    settings: dict[str, list[str]] = {}
    section = ""
    with open(SERVICE, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                section = line
            elif section == "[Service]":
                key, _, value = line.partition("=")
                settings.setdefault(key, []).append(value)
    return settings


def fake_root(tmp_path: Any) -> str:
    """A root with the units, stand-ins for the programs they run, and systemd's units."""
    root = str(tmp_path / "root")
    os.makedirs(os.path.join(root, "usr", "bin"))
    os.makedirs(os.path.join(root, "usr", "lib", "systemd"))
    os.makedirs(os.path.join(root, "etc", "systemd", "system"))
    os.symlink("usr/bin", os.path.join(root, "bin"))
    os.symlink("usr/lib", os.path.join(root, "lib"))
    shutil.copytree(
        "/usr/lib/systemd/system", os.path.join(root, "usr/lib/systemd/system"), symlinks=True
    )
    settings = service_settings()
    for key in ("ExecStart", "ExecReload"):
        program = settings[key][0].split()[0].lstrip("-@+!")
        target = os.path.join(root, program.lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            with open(target, "w", encoding="ascii") as f:
                f.write("#!/bin/sh\n")
            os.chmod(target, 0o755)
    for unit in (SERVICE, SOCKET):
        shutil.copy(unit, os.path.join(root, "etc/systemd/system"))
    return root


@needs_systemd_analyze
def test_units_verify(tmp_path: Any) -> None:
    """systemd-analyze verify: no error and not one warning for either unit."""
    root = fake_root(tmp_path)
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            f"--root={root}",
            "/etc/systemd/system/pingated.service",
            "/etc/systemd/system/pingated.socket",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


@needs_systemd_analyze
def test_verify_catches_a_broken_unit(tmp_path: Any) -> None:
    """The check above can fail: a misspelt sandbox key is reported."""
    root = fake_root(tmp_path)
    unit = os.path.join(root, "etc/systemd/system/pingated.service")
    with open(unit, encoding="utf-8") as f:
        text = f.read()
    with open(unit, "w", encoding="utf-8") as f:
        f.write(text.replace("ProtectSystem=strict", "ProtectSystm=strict"))
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/pingated.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Unknown key" in result.stderr


@needs_systemd_analyze
def test_sandbox_exposure_is_low(tmp_path: Any) -> None:
    """systemd-analyze security rates the sandbox at most 2.0 ("OK") of 10."""
    root = fake_root(tmp_path)
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            f"--root={root}",
            "/etc/systemd/system/pingated.service",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for pingated\.service: ([\d.]+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.0, result.stdout


def test_service_runs_twistd_like_the_docs_say() -> None:
    """ExecStart, user, reload signal and state directory agree with the packaged config."""
    settings = service_settings()
    assert settings["ExecStart"] == [
        "/usr/lib/pingated/venv/bin/twistd --nodaemon --pidfile= pingated "
        "--config /etc/pingated/pingated.toml"
    ]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["User"] == ["pingated"] and settings["Group"] == ["pingated"]
    assert settings["StateDirectory"] == ["pingated"]
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["AmbientCapabilities"] == [""]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert settings[key] == ["yes"], key
    assert settings["ProtectSystem"] == ["strict"]
    assert "@system-service" in settings["SystemCallFilter"]
    with open(PACKAGED_CONFIG, encoding="utf-8") as f:
        packaged = f.read()
    assert 'state_dir = "/var/lib/pingated"' in packaged
    from pingated.config import parse_config

    # The packaged config is valid apart from the files made at install time.
    text = packaged.replace('pin_hash_file = "/etc/pingated/pin-hash"', f'pin_hash = "{_hash()}"')
    text = text.replace('secret_file = "/etc/pingated/secret"', 'secret = "' + "s" * 43 + '"')
    config = parse_config(text, "pingated.toml")
    assert config.server.state_dir == "/var/lib/pingated"


def _hash() -> str:
    from harness import pin_hash

    return pin_hash()


def test_systemd_listen_strings_pass_check_config() -> None:
    """check-config accepts socket-activation strings without the sockets, and checks them."""
    from pingated.config import ConfigError, parse_config

    base = (
        f'[gate]\npin_hash = "{_hash()}"\nsecret = "{"s" * 43}"\n'
        '[upstream]\nurl = "http://127.0.0.1:1"\n[server]\nlisten = ["{listen}"]\n'
    )
    for good in ("systemd:domain=INET:index=0", "systemd:domain=INET6:name=pingated"):
        config = parse_config(base.replace("{listen}", good), "p.toml")
        assert config.server.listen == (good,)
    for bad in ("systemd:domain=IPX:index=0", "systemd:domain=INET", "systemd:domain=INET:index=x"):
        with pytest.raises(ConfigError) as e:
            parse_config(base.replace("{listen}", bad), "p.toml")
        assert "server.listen" in str(e.value)


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate missing"
)
def test_socket_activation_serves_through_the_passed_socket(
    gate_factory: Any, tmp_path: Any
) -> None:
    """
    The documented socket setup: the socket is created by the activator (as by
    pingated.socket), passed with the name from FileDescriptorName, and the gate
    serves its login page and proxied requests on it.
    """
    port = free_port()
    gate = gate_factory(start=False, server={"listen": ["systemd:domain=INET:name=pingated"]})
    gate.port = port
    activator = ManagedProcess(
        [
            "systemd-socket-activate",
            f"--listen=127.0.0.1:{port}",
            "--fdname=pingated",
            TWISTD,
            "-n",
            "--pidfile=",
            "pingated",
            "--config",
            gate.config_path,
        ],
        str(tmp_path / "activated.log"),
        cwd=gate.workdir,
    )
    try:
        wait_for_port(port, proc=activator.proc)
        assert gate.request("GET", "/.pingated/health").status == 200
        cookie = gate.login()
        response = gate.request("GET", "/echo?x=1", headers={"Cookie": f"pingated={cookie}"})
        assert response.status == 200
        assert response.json()["path"] == "/echo"
    finally:
        activator.stop()
