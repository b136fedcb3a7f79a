"""
The Debian package (debian/), end to end on this machine.

Builds the .deb with dpkg-buildpackage from a clean copy of the tree (the
files git tracks plus untracked, non-ignored ones), runs lintian on it,
installs it with dpkg, configures it the way docs/deploy.md says (a PIN hash
from the installed `pingated` command, the upstream URL, a free port), starts
the daemon the way the systemd unit does (its ExecStart, as its User, with
its WorkingDirectory, UMask and environment, no new privileges and no
capabilities), logs in through it and gets a proxied answer from the demo
upstream; then stops it by pid and purges the package.

Installing on the host rather than in a debootstrap chroot: the suite runs
as root on a throwaway machine (CI, a developer container), the package
touches only its own paths plus a system user, and the test refuses to run
where a `pingated` package is already installed.  A chroot would need a
Debian mirror's worth of downloads on every run.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from harness import ARTIFACTS, ManagedProcess, free_port, wait_for_port

from pingated import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = "/lib/systemd/system/pingated.service"
CONFIG = "/etc/pingated/pingated.toml"
PIN = "739153"
BUILD_TIMEOUT = 900

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("dpkg") is None,
        reason="installs a .deb: needs root on a Debian system",
    ),
]


def _installed(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return "install ok installed" in result.stdout


def clean_copy(destination: str) -> None:
    """The tree as a fresh clone plus new, non-ignored files would have it."""
    listed = subprocess.run(
        ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        relative = os.fsdecode(raw)
        source = os.path.join(ROOT, relative)
        if not os.path.lexists(source):
            continue  # deleted in the working tree, not yet in git
        target = os.path.join(destination, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)


def build_deb(workdir: str) -> str:
    """dpkg-buildpackage in a clean copy; returns the .deb path."""
    source = os.path.join(workdir, "pingated")
    clean_copy(source)
    log_path = os.path.join(workdir, "build.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    with open(log_path, "wb") as log:
        result = subprocess.run(
            ["dpkg-buildpackage", "-us", "-uc", "-b"],
            cwd=source,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=BUILD_TIMEOUT,
        )
    with open(log_path, encoding="utf-8", errors="replace") as f:
        output = f.read()
    _keep_artifact("deb-build.log", output)
    assert result.returncode == 0, "dpkg-buildpackage failed (if pip reports a conflict, run " + (
        "`.venv/bin/python debian/update-constraints`):\n" + output[-6000:]
    )
    [deb] = glob.glob(os.path.join(workdir, "pingated_*.deb"))
    return deb


def _keep_artifact(name: str, text: str) -> None:
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, name), "w", encoding="utf-8") as f:
        f.write(text)


def unit_settings(path: str) -> dict[str, list[str]]:
    """Key -> values of the [Service] section (repeated keys keep every value)."""
    settings: dict[str, list[str]] = {}
    section = ""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
                continue
            if section == "[Service]":
                key, _, value = line.partition("=")
                settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_command(path: str) -> tuple[list[str], dict[str, str]]:
    """The argv that starts the daemon as the unit would, and its environment."""
    settings = unit_settings(path)
    [exec_start] = settings["ExecStart"]
    [user] = settings["User"]
    [group] = settings["Group"]
    [umask] = settings.get("UMask", ["0022"])
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    }
    for assignment in settings.get("Environment", []):
        for pair in shlex.split(assignment):
            key, _, value = pair.partition("=")
            env[key] = value
    assert settings.get("NoNewPrivileges") == ["yes"]
    assert settings.get("CapabilityBoundingSet") == [""]
    setpriv = [
        "setpriv",
        f"--reuid={user}",
        f"--regid={group}",
        "--init-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]
    command = " ".join(shlex.quote(a) for a in setpriv + shlex.split(exec_start))
    # exec keeps the pid: the process stopped at the end is the daemon itself.
    return ["/bin/sh", "-c", f"umask {umask} && exec {command}"], env


@pytest.fixture
def deb_workdir(tmp_path: Any) -> Iterator[str]:
    if _installed("pingated"):
        pytest.skip("a pingated package is already installed here; not touching it")
    yield str(tmp_path)


def _purge(created_user: bool) -> str:
    result = subprocess.run(
        ["dpkg", "--purge", "pingated"], capture_output=True, text=True, timeout=120
    )
    if created_user:
        subprocess.run(["userdel", "pingated"], capture_output=True)
        subprocess.run(["groupdel", "pingated"], capture_output=True)
    return result.stdout + result.stderr


def test_deb_builds_installs_serves_and_purges(deb_workdir: str, upstream_url: str) -> None:
    """The .deb: lintian-clean, installs, the unit's command serves a login and a proxied page."""
    deb = build_deb(deb_workdir)
    assert os.path.basename(deb) == f"pingated_{__version__}_{_arch()}.deb"
    lintian = subprocess.Popen(
        ["lintian", "--fail-on", "error", "--tag-display-limit", "0", deb],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    created_user = _user_missing()
    daemon: ManagedProcess | None = None
    purge_output = ""
    try:
        install = subprocess.run(["dpkg", "-i", deb], capture_output=True, text=True, timeout=300)
        assert install.returncode == 0, install.stdout + install.stderr
        _check_installed_files()

        # Configure as docs/deploy.md says: the PIN, the upstream, the port.
        hashed = subprocess.run(
            ["pingated", "hash-pin"], input=PIN + "\n", capture_output=True, text=True
        )
        assert hashed.returncode == 0, hashed.stderr
        _write_private("/etc/pingated/pin-hash", hashed.stdout)
        port = free_port()
        with open(CONFIG, encoding="utf-8") as f:
            config = f.read()
        config = re.sub(r"tcp:3060:", f"tcp:{port}:", config)
        config = re.sub(r'url = "http://127\.0\.0\.1:8080"', f'url = "{upstream_url}"', config)
        with open(CONFIG, "w", encoding="utf-8") as f:
            f.write(config)
        check = subprocess.run(["pingated", "check-config", CONFIG], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr

        argv, env = unit_command(UNIT)
        [workdir] = unit_settings(UNIT)["WorkingDirectory"]
        daemon = _start_clean(argv, env, workdir, os.path.join(deb_workdir, "daemon.log"))
        wait_for_port(port, timeout=60, proc=daemon.proc)

        assert _process_user(daemon.pid) == "pingated"
        cookie = _login(port)
        status, body = _get(port, "/echo?via=deb", cookie)
        assert status == 200, body
        assert b'"path": "/echo"' in body and b"via=deb" in body
        status, body = _get(port, "/.pingated/metrics", None)
        assert status == 200 and b'pingated_logins_total{result="ok"} 1.0' in body
        # ExecReload: SIGHUP re-reads the config without stopping.
        daemon.signal(signal.SIGHUP)
        _wait_for(lambda: "configuration reloaded" in daemon.log(), "reload", daemon)
        assert _get(port, "/echo", cookie)[0] == 200
        assert os.listdir("/var/lib/pingated"), "nothing written to the state directory"
        # postinst made byte-code and the plugin cache the daemon can read.
        assert "plugin cache" not in daemon.log(), daemon.log()
        cache = glob.glob("/usr/lib/pingated/venv/lib/python3*/site-packages/twisted/plugins/")
        assert os.stat(cache[0] + "dropin.cache").st_mode & 0o004
        compiled = glob.glob(
            "/usr/lib/pingated/venv/lib/python3*/site-packages/pingated/__pycache__/*"
        )
        assert compiled and all(os.stat(path).st_mode & 0o004 for path in compiled)
    finally:
        if daemon is not None:
            daemon.stop()
            _keep_artifact("deb-daemon.log", _read(daemon.log_path))
        lintian_output, _ = lintian.communicate(timeout=600)
        _keep_artifact("deb-lintian.txt", lintian_output)
        purge_output = _purge(created_user)
    errors = [line for line in lintian_output.splitlines() if line.startswith("E:")]
    assert not errors, lintian_output
    assert lintian.returncode == 0, lintian_output
    assert "not empty" not in purge_output, purge_output
    for path in ("/usr/lib/pingated", "/etc/pingated", "/var/lib/pingated", UNIT):
        assert not os.path.exists(path), f"{path} left after purge"


def _arch() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _user_missing() -> bool:
    try:
        pwd.getpwnam("pingated")
    except KeyError:
        return True
    return False


def _check_installed_files() -> None:
    """What the package promises besides the program: user, secret, conffile, unit, extras."""
    user = pwd.getpwnam("pingated")
    assert user.pw_uid < 1000 and user.pw_shell in ("/usr/sbin/nologin", "/bin/false")
    secret = os.stat("/etc/pingated/secret")
    assert oct(secret.st_mode & 0o777) == "0o640" and secret.st_gid == user.pw_gid
    with open("/etc/pingated/secret", encoding="utf-8") as f:
        assert len(f.readline().strip()) >= 43
    conffiles = subprocess.run(
        ["dpkg-query", "-W", "-f=${Conffiles}", "pingated"], capture_output=True, text=True
    ).stdout
    assert CONFIG in conffiles and "/etc/logrotate.d/pingated" in conffiles
    if os.path.exists(os.path.join(ROOT, "etc/fail2ban/filter.d/pingated.conf")):
        assert "/etc/fail2ban/filter.d/pingated.conf" in conffiles
    assert os.path.exists(UNIT)
    assert os.path.realpath("/usr/bin/pingated") == "/usr/lib/pingated/venv/bin/pingated"
    state = os.stat("/var/lib/pingated")
    assert state.st_uid == user.pw_uid and oct(state.st_mode & 0o777) == "0o700"
    # The installed unit verifies against the installed files.
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(
            ["systemd-analyze", "verify", UNIT], capture_output=True, text=True, timeout=60
        )
        assert verify.returncode == 0 and "pingated" not in verify.stderr, verify.stderr


def _write_private(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o640)
    os.chown(path, 0, pwd.getpwnam("pingated").pw_gid)


def _start_clean(argv: list[str], env: dict[str, str], cwd: str, log_path: str) -> ManagedProcess:
    """A ManagedProcess whose environment is exactly the unit's."""
    process = ManagedProcess.__new__(ManagedProcess)
    process.argv = argv
    process.log_path = log_path
    process.log_file = open(log_path, "ab")
    process.proc = subprocess.Popen(
        argv,
        stdout=process.log_file,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    return process


def _process_user(pid: int) -> str:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Uid:"):
                return pwd.getpwuid(int(line.split()[2])).pw_name
    raise AssertionError("no Uid line")


def _login(port: int) -> str:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST",
            "/.pingated/login",
            f"pin={PIN}&next=/".encode(),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        response = conn.getresponse()
        response.read()
        assert response.status == 303, response.status
        for name, value in response.getheaders():
            if name.lower() == "set-cookie" and value.startswith("pingated="):
                return value.split(";", 1)[0].split("=", 1)[1]
    finally:
        conn.close()
    raise AssertionError("no session cookie")


def _get(port: int, path: str, cookie: str | None) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Cookie": f"pingated={cookie}"} if cookie else {}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _wait_for(condition: Any, what: str, daemon: ManagedProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{daemon.log()}"
        time.sleep(0.2)


def _read(path: str) -> str:
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
        return f.read()
    return ""
