"""
Issue 2, done-when 1: what `make run` starts (scripts/run-demo) prints a URL
and a PIN, and logging in with them shows the demo page through the gate.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.parse

from harness import Gate, free_port, wait_for_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_demo_prints_url_and_pin_that_work(tmp_path: object) -> None:
    """The printed PIN opens the printed URL, and the demo page comes through."""
    gate_port, upstream_port = free_port(), free_port()
    log_path = os.path.join(str(tmp_path), "run.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [os.path.join(ROOT, "scripts", "run-demo"), str(gate_port), str(upstream_port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PINGATED_RUN_DIR": str(tmp_path)},
            start_new_session=True,
        )
    try:
        wait_for_port(gate_port, timeout=30, proc=proc)
        wait_for_port(upstream_port, timeout=30, proc=proc)
        deadline = time.monotonic() + 10
        output = ""
        while time.monotonic() < deadline and "PIN:" not in output:
            with open(log_path, encoding="utf-8") as f:
                output = f.read()
            time.sleep(0.05)
        url = re.search(r"URL: (http://\S+)", output)
        pin = re.search(r"PIN: (\d{6})", output)
        assert url and pin, output
        assert urllib.parse.urlsplit(url.group(1)).port == gate_port
        gate = Gate.__new__(Gate)
        gate.port = gate_port
        cookie = gate.login(pin=pin.group(1))
        page = gate.request("GET", "/", headers={"Cookie": f"pingated={cookie}"})
        assert page.status == 200
        assert b"pingated demo" in page.body
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
