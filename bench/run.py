"""
pingated against nginx, side by side, in one run: ``make bench``.

Starts, all on 127.0.0.1 and all stopped by pid at the end (also on error):

* nginx as the static upstream (1 KB, 1 MB and 300 MB files) and, in the
  same nginx process, as a plain reverse proxy in front of it (keepalive
  upstream pool, the usual production settings);
* a small stdlib upstream for server-sent events and upload sinking
  (``bench/aux_upstream.py``);
* pingated (``twistd -n pingated``, one process, a logged-in session, identity
  headers on) in front of the same nginx static upstream.

Then measures with wrk: 1 KB responses at -c1 and -c50 (req/s, p50/p99),
1 MB responses (MB/s); per-event latency of a server-sent event stream; and
the peak RSS of the proxy during a 300 MB download and a 300 MB upload.
Writes the figures, the ratios to nginx-proxy and the targets of issue #3
to ``--out`` (docs/benchmarks.md).  ``--profile`` samples pingated with
py-spy under a wrk load and prints where its time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
PIN = "135791"
SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
BIG = 300 * 1024 * 1024
TARGETS = {"small": 0.30, "big": 0.80, "latency_ms": 0.3}


# --------------------------------------------------------------------------
# processes


class Processes:
    """Every process the bench starts, stopped by its own pid on exit."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        proc = subprocess.Popen(
            argv, stdout=kwargs.pop("stdout", log), stderr=log, start_new_session=True, **kwargs
        )
        self.started.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        """Stop one process (and its own process group, e.g. nginx workers)."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # nginx workers die with their master; make sure nothing of the group lingers.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for _, proc in reversed(self.started):
            self.stop(proc)

    def log(self, name: str) -> str:
        with open(os.path.join(self.workdir, f"{name}.log"), errors="replace") as f:
            return f.read()


def load_average() -> str:
    """The 1-minute load average: other work on the machine skews every figure."""
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def rss_kb(pid: int) -> int:
    """Resident set size of one process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def group_rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += rss_kb(pid)
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Direct children (nginx workers) of C{pid}."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


class RssSampler:
    """Samples the summed RSS of some processes every 20 ms in a thread; keeps the peak."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, group_rss_kb(self.pids()))
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------
# the servers


NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000;
    upstream static_backend {{ server 127.0.0.1:{static}; keepalive 64; }}
    upstream aux_backend {{ server 127.0.0.1:{aux}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{static};
        root {dir}/www;
    }}
    server {{
        listen 127.0.0.1:{proxy};
        client_max_body_size 0;
        location / {{
            proxy_pass http://static_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
        location /sse {{
            proxy_pass http://aux_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
        location /sink {{
            proxy_pass http://aux_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
        }}
    }}
}}
"""


def toml_string(value: str) -> str:
    return json.dumps(value)


def pingated_config(path: str, port: int, upstream: str, state: str) -> None:
    from pingated.pins import hash_pin

    with open(path, "w") as f:
        f.write(
            f"[server]\nlisten = [{toml_string(f'tcp:{port}:interface=127.0.0.1')}]\n"
            f"state_dir = {toml_string(state)}\n\n"
            f"[gate]\npin_hash = {toml_string(hash_pin(PIN))}\n"
            f"secret = {toml_string(SECRET)}\n\n"
            f"[upstream]\nurl = {toml_string(upstream)}\nmax_request_body = \"1GB\"\n\n"
            '[identity]\nheaders = { "X-Trusted-User" = "bench" }\n'
        )


def login(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = urlencode({"pin": PIN, "next": "/"})
    conn.request(
        "POST",
        "/.pingated/login",
        body,
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    response = conn.getresponse()
    response.read()
    conn.close()
    for name, value in response.getheaders():
        if name.lower() == "set-cookie" and value.startswith("pingated="):
            return value.split(";", 1)[0].split("=", 1)[1]
    raise RuntimeError(f"login failed: {response.status}")


@dataclass
class Bench:
    """The running servers and the figures collected so far."""

    workdir: str
    procs: Processes
    static_port: int = 0
    proxy_port: int = 0
    aux_port: int = 0
    gate_port: int = 0
    sse_gate_port: int = 0
    nginx: subprocess.Popen[bytes] | None = None
    gate: subprocess.Popen[bytes] | None = None
    sse_gate: subprocess.Popen[bytes] | None = None
    cookie: str = ""
    sse_cookie: str = ""
    results: dict[str, Any] = field(default_factory=dict)

    def pid_of(self, target: str) -> int | None:
        """The process whose CPU time a target's requests cost (the proxy itself)."""
        if target == "pingated" and self.gate is not None:
            return self.gate.pid
        return None

    def targets(self) -> dict[str, tuple[int, dict[str, str]]]:
        cookie = {"Cookie": f"pingated={self.cookie}"}
        return {
            "nginx-direct": (self.static_port, {}),
            "nginx-proxy": (self.proxy_port, {}),
            "pingated": (self.gate_port, cookie),
        }


def start_servers(bench: Bench) -> None:
    d = bench.workdir
    www = os.path.join(d, "www")
    os.makedirs(www)
    with open(os.path.join(www, "1k.bin"), "wb") as f:
        f.write(os.urandom(1024))
    with open(os.path.join(www, "1m.bin"), "wb") as f:
        f.write(os.urandom(1024 * 1024))
    with open(os.path.join(www, "300m.bin"), "wb") as f:
        f.truncate(BIG)  # sparse: no 300 MB written to disk
    # nginx workers run as an unprivileged user when started as root.
    for path in (d, www, *(os.path.join(www, n) for n in os.listdir(www))):
        os.chmod(path, 0o755 if os.path.isdir(path) else 0o644)

    aux = bench.procs.start(
        "aux", [sys.executable, os.path.join(HERE, "aux_upstream.py"), "--port", "0"],
        stdout=subprocess.PIPE,
    )
    assert aux.stdout is not None
    bench.aux_port = int(aux.stdout.readline())

    bench.static_port, bench.proxy_port = free_port(), free_port()
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            NGINX_CONF.format(
                dir=d, static=bench.static_port, proxy=bench.proxy_port, aux=bench.aux_port
            )
        )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    bench.nginx = bench.procs.start("nginx", [nginx, "-p", d, "-c", conf])
    wait_for_port(bench.static_port, bench.nginx)
    wait_for_port(bench.proxy_port, bench.nginx)

    bench.gate_port = free_port()
    bench.gate = start_gate(bench, "pingated", bench.gate_port,
                            f"http://127.0.0.1:{bench.static_port}")
    bench.cookie = login(bench.gate_port)
    bench.sse_gate_port = free_port()
    bench.sse_gate = start_gate(bench, "pingated-aux", bench.sse_gate_port,
                                f"http://127.0.0.1:{bench.aux_port}")
    bench.sse_cookie = login(bench.sse_gate_port)


def start_gate(bench: Bench, name: str, port: int, upstream: str) -> subprocess.Popen[bytes]:
    config = os.path.join(bench.workdir, f"{name}.toml")
    pingated_config(config, port, upstream, os.path.join(bench.workdir, f"{name}-state"))
    argv = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "pingated", "--config", config]
    proc = bench.procs.start(name, argv, cwd=bench.workdir)
    wait_for_port(port, proc)
    return proc


# --------------------------------------------------------------------------
# wrk

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
_SIZE = {"B": 1 / 1024**2, "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(port: int, path: str, connections: int, seconds: float,
        headers: dict[str, str]) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "--timeout", "10s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    result: dict[str, float] = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Requests/sec:"):
            result["rps"] = float(line.split()[1])
        elif line.startswith("Transfer/sec:"):
            match = re.fullmatch(r"([\d.]+)(B|KB|MB|GB)", line.split()[1])
            if match:
                result["mbps"] = float(match.group(1)) * _SIZE[match.group(2)]
        elif re.match(r"^(50|99)%\s", line):
            pct, value = line.split()
            result[f"p{pct[:-1]}"] = _ms(value)
        elif line.startswith("Non-2xx or 3xx responses:"):
            result["errors"] = result.get("errors", 0) + float(line.split()[-1])
        elif line.startswith("Socket errors:"):
            numbers = [int(n) for n in re.findall(r"\d+", line)]
            result["errors"] = result.get("errors", 0) + sum(numbers)
    if "rps" not in result:
        raise RuntimeError(f"wrk failed: {out}")
    return result


SCENARIOS = {
    "1k-c1": ("/1k.bin", 1),
    "1k-c50": ("/1k.bin", 50),
    "1m-c4": ("/1m.bin", 4),
}


def run_wrk_matrix(bench: Bench, rounds: int, seconds: float,
                   only: list[str] | None = None) -> None:
    """Each scenario against each target, interleaved, best of C{rounds}."""
    scenarios = {k: v for k, v in SCENARIOS.items() if not only or k in only}
    best: dict[str, dict[str, dict[str, float]]] = {}
    for name, (path, conns) in scenarios.items():
        best[name] = {}
        for port, headers in bench.targets().values():
            wrk(port, path, conns, 1, headers)  # warm up pools and caches
        for _ in range(rounds):
            for target, (port, headers) in bench.targets().items():
                pid = bench.pid_of(target)
                before = cpu_seconds(pid) if pid else 0.0
                got = wrk(port, path, conns, seconds, headers)
                if pid:
                    requests = got["rps"] * seconds
                    got["cpu_us"] = (cpu_seconds(pid) - before) / requests * 1e6

                print(f"  {name:7} {target:13} {got}", flush=True)
                previous = best[name].get(target)
                if previous is None or got["rps"] > previous["rps"]:
                    best[name][target] = got
    bench.results["wrk"] = best


# --------------------------------------------------------------------------
# server-sent events


def sse_latencies(port: int, headers: dict[str, str], events: int,
                  interval: float) -> list[float]:
    """Milliseconds from the upstream's write to this client's read, per event."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(
        f"GET /sse?n={events}&interval={interval} HTTP/1.1\r\nHost: bench\r\n"
        f"Accept: text/event-stream\r\n{extra}\r\n".encode()
    )
    latencies: list[float] = []
    buffer = b""
    with sock:
        while len(latencies) < events:
            data = sock.recv(65536)
            now = time.monotonic_ns()
            if not data:
                break
            buffer += data
            for stamp in re.findall(rb"data: (\d+)\n\n", buffer):
                latencies.append((now - int(stamp)) / 1e6)
            buffer = buffer[buffer.rfind(b"\n\n") + 2 :] if b"\n\n" in buffer else buffer
    return latencies


def run_sse(bench: Bench) -> None:
    targets = {
        "direct": (bench.aux_port, {}),
        "nginx-proxy": (bench.proxy_port, {}),
        "pingated": (bench.sse_gate_port, {"Cookie": f"pingated={bench.sse_cookie}"}),
    }
    out = {}
    for name, (port, headers) in targets.items():
        values = sse_latencies(port, headers, events=100, interval=0.02)
        values.sort()
        out[name] = {
            "events": len(values),
            "p50": statistics.median(values),
            "p99": values[min(len(values) - 1, int(len(values) * 0.99))],
            "max": values[-1],
        }
        print(f"  sse {name:12} {out[name]}", flush=True)
    bench.results["sse"] = out


# --------------------------------------------------------------------------
# 300 MB transfers and memory


def download(port: int, path: str, headers: dict[str, str]) -> tuple[int, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    start = time.monotonic()
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    total = 0
    while chunk := response.read(1 << 20):
        total += len(chunk)
    conn.close()
    return total, time.monotonic() - start


def upload(port: int, headers: dict[str, str]) -> tuple[int, float]:
    block = b"u" * (1 << 20)

    def body() -> Iterator[bytes]:
        for _ in range(BIG // len(block)):
            yield block

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    start = time.monotonic()
    conn.request("POST", "/sink", body=body(),
                 headers={**headers, "Content-Length": str(BIG)})
    response = conn.getresponse()
    received = json.loads(response.read())["received"]
    conn.close()
    return received, time.monotonic() - start


def run_memory(bench: Bench) -> None:
    assert bench.nginx and bench.gate and bench.sse_gate
    nginx_pid = bench.nginx.pid
    gate_pid = bench.gate.pid
    sse_gate_pid = bench.sse_gate.pid
    out: dict[str, Any] = {}
    cases: list[tuple[str, Callable[[], list[int]], Callable[[], tuple[int, float]]]] = [
        ("nginx-proxy download", lambda: [nginx_pid, *children(nginx_pid)],
         lambda: download(bench.proxy_port, "/300m.bin", {})),
        ("pingated download", lambda: [gate_pid],
         lambda: download(bench.gate_port, "/300m.bin", {"Cookie": f"pingated={bench.cookie}"})),
        ("nginx-proxy upload", lambda: [nginx_pid, *children(nginx_pid)],
         lambda: upload(bench.proxy_port, {})),
        ("pingated upload", lambda: [sse_gate_pid],
         lambda: upload(bench.sse_gate_port, {"Cookie": f"pingated={bench.sse_cookie}"})),
    ]
    for name, pids, transfer in cases:
        before = group_rss_kb(pids())
        with RssSampler(pids) as sampler:
            size, seconds = transfer()
        if size != BIG:
            raise RuntimeError(f"{name}: moved {size} bytes, expected {BIG}")
        out[name] = {
            "rss_before_mb": before / 1024,
            "rss_peak_mb": sampler.peak / 1024,
            "mb_per_s": BIG / 1024**2 / seconds,
        }
        print(f"  {name:22} {out[name]}", flush=True)
    bench.results["memory"] = out


# --------------------------------------------------------------------------
# profile


def profile_gate(bench: Bench, seconds: float, connections: int) -> str:
    """py-spy samples the gate while wrk loads it; returns self and inclusive tops."""
    assert bench.gate is not None
    py_spy = shutil.which("py-spy", path=BIN) or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    raw = os.path.join(bench.workdir, "profile.txt")
    spy = bench.procs.start("py-spy", [py_spy, "record", "--pid", str(bench.gate.pid),
                                       "--rate", "500", "--format", "raw", "--nonblocking",
                                       "-o", raw, "-d", str(int(seconds) + 1)])
    time.sleep(1)
    port, headers = bench.targets()["pingated"]
    print(wrk(port, "/1k.bin", connections, seconds, headers))
    spy.wait(60)
    return summarize_collapsed(raw)


def summarize_collapsed(path: str, limit: int = 30) -> str:
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count_text = line.rstrip().rpartition(" ")
            count = int(count_text)
            total += count
            frames = [re.sub(r" \((.*/)?([^/]+)\)", r" (\2)", fr) for fr in stack.split(";")]
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + count
    by_file: dict[str, int] = {}
    for frame, count in own.items():
        match = re.search(r"\((\S+?):\d+\)$", frame)
        name = match.group(1) if match else frame
        by_file[name] = by_file.get(name, 0) + count
    lines = [f"{total} samples", "", "self, by file:"]
    for name, count in sorted(by_file.items(), key=lambda kv: -kv[1])[:limit]:
        lines.append(f"  {100 * count / total:5.1f}%  {name}")
    lines += ["", "self:"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:limit]:
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    lines += ["", "inclusive:"]
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[: limit * 2]:
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# report


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def write_report(bench: Bench, out: str, notes: str) -> None:
    w = bench.results["wrk"]
    sse = bench.results["sse"]
    mem = bench.results["memory"]
    small_ratio = w["1k-c50"]["pingated"]["rps"] / w["1k-c50"]["nginx-proxy"]["rps"]
    big_ratio = w["1m-c4"]["pingated"]["mbps"] / w["1m-c4"]["nginx-proxy"]["mbps"]
    added_p50 = w["1k-c1"]["pingated"]["p50"] - w["1k-c1"]["nginx-proxy"]["p50"]

    def met(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def short(value: float, target: float, unit: str) -> str:
        if value >= target:
            return ""
        return f": {target - value:.2f}{unit} short ({target / value:.1f} times the figure needed)"

    def over(value: float, target: float) -> str:
        return "" if value <= target else f": {value - target:.2f} ms over"

    when = bench.results.get("generated") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    gate_sse = sse["pingated"]
    if gate_sse["max"] <= 5:
        sse_status = "met"
    elif gate_sse["max"] < 50 and gate_sse["p50"] <= 5:
        sse_status = (
            f"met at p50; **missed** at max by {gate_sse['max'] - 5:.2f} ms (50 ms limit met)"
        )
    else:
        sse_status = "**missed**"
    rss_down = mem["pingated download"]["rss_peak_mb"]
    rss_up = mem["pingated upload"]["rss_peak_mb"]
    sse_added = gate_sse["p50"] - sse["direct"]["p50"]
    nginx_sse_added = sse["nginx-proxy"]["p50"] - sse["direct"]["p50"]

    lines = [
        "# Benchmarks: pingated against nginx",
        "",
        f"Generated by `make bench` (`bench/run.py`) on {when}.",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()},"
        f" Python {platform.python_version()}, {bench.results['nginx_version']}, wrk 4.1.",
        "Everything runs on 127.0.0.1 on the same machine (client, proxies, upstream share"
        " the cores, and other work on the machine adds noise: each figure is the best of "
        f"{bench.results['rounds']} interleaved rounds of {bench.results['seconds']} s).",
        "",
        f"Load average (1 min) on the machine: {bench.results['load_before']} at the start,"
        f" {bench.results['load_after']} at the end.",
        "",
        "* **nginx-direct**: nginx serving the static files itself (the upstream).",
        "* **nginx-proxy**: nginx (1 worker) as a plain reverse proxy in front of it,"
        " keepalive pool.",
        "* **pingated**: one `twistd pingated` process in front of the same upstream, with a valid"
        " session cookie (checked on every request), identity headers, X-Forwarded-*, the gate"
        " cookie stripped: all features on.",
        "",
        "## Targets (issue #3)",
        "",
        "| target | measured | status |",
        "|---|---|---|",
        f"| small responses (1 KB, -c50) req/s >= 0.30x nginx-proxy | {small_ratio:.2f}x"
        f" | {met(small_ratio >= TARGETS['small'])}"
        f"{short(small_ratio, TARGETS['small'], 'x')} |",
        f"| 1 MB throughput >= 0.80x nginx-proxy | {big_ratio:.2f}x"
        f" | {met(big_ratio >= TARGETS['big'])}{short(big_ratio, TARGETS['big'], 'x')} |",
        f"| added p50 latency at -c1 <= 0.3 ms over nginx-proxy | {added_p50:+.3f} ms"
        f" | {met(added_p50 <= TARGETS['latency_ms'])}"
        f"{over(added_p50, TARGETS['latency_ms'])} |",
        f"| SSE event delay <= 5 ms (the test's limit: 50 ms) | p50 {gate_sse['p50']:.2f} ms,"
        f" max {gate_sse['max']:.2f} ms (direct, no proxy: max {sse['direct']['max']:.2f} ms)"
        f" | {sse_status} |",
        f"| RSS during a 300 MB transfer < 150 MB | download {rss_down:.0f} MB,"
        f" upload {rss_up:.0f} MB | {met(max(rss_down, rss_up) < 150)} |",
        "",
        "## HTTP throughput and latency (wrk, 1 thread)",
        "",
        "| scenario | target | req/s | MB/s | p50 ms | p99 ms | vs nginx-proxy"
        " | proxy CPU per request |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scenario, targets in w.items():
        reference = targets["nginx-proxy"]
        for target, r in targets.items():
            key = "mbps" if scenario.startswith("1m") else "rps"
            errors = f" ({int(r['errors'])} errors)" if r.get("errors") else ""
            ratio = _ratio(r[key], reference[key])
            cpu = f"{r['cpu_us']:.0f} µs" if "cpu_us" in r else ""
            lines.append(
                f"| {scenario} | {target} | {r['rps']:.0f}{errors} | {r.get('mbps', 0):.1f} |"
                f" {r.get('p50', 0):.3f} | {r.get('p99', 0):.3f} | {ratio} | {cpu} |"
            )
    lines += [
        "",
        "## Server-sent events: delay from the upstream's write to the client's read",
        "",
        "100 events, one every 20 ms, timestamps from CLOCK_MONOTONIC on both ends.",
        "",
        "| path | events | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for name, r in sse.items():
        lines.append(
            f"| {name} | {r['events']} | {r['p50']:.3f} | {r['p99']:.3f} | {r['max']:.3f} |"
        )
    lines += [
        "",
        f"Added by pingated over the direct stream: p50 {sse_added:+.3f} ms;"
        f" by nginx-proxy: {nginx_sse_added:+.3f} ms.",
        "",
        "## Memory during 300 MB transfers",
        "",
        "Peak resident set (sampled every 20 ms; nginx: master + worker) while one client"
        " downloads a 300 MB file from the static upstream, or uploads 300 MB (Content-Length)"
        " to a sink upstream (nginx with `proxy_request_buffering off`).",
        "",
        "| transfer | RSS before MB | peak RSS MB | MB/s |",
        "|---|---|---|---|",
    ]
    for name, r in mem.items():
        lines.append(
            f"| {name} | {r['rss_before_mb']:.0f} | {r['rss_peak_mb']:.0f} | {r['mb_per_s']:.0f} |"
        )
    if notes:
        lines += ["", notes.strip()]
    lines.append("")
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # Keep sections other scripts write between their own markers (WebSockets).
    with contextlib.suppress(OSError), open(out) as f:
        previous = f.read()
        for match in re.finditer(r"<!-- (\w+):begin -->.*?<!-- \1:end -->\n?", previous, re.S):
            text += "\n" + match.group(0)
    with open(out, "w") as f:
        f.write(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--notes", default=os.path.join(HERE, "NOTES.md"),
                        help="markdown appended to the report (analysis, profile findings)")
    parser.add_argument("--profile", action="store_true",
                        help="sample pingated with py-spy under a 1 KB wrk load; print the top")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c for --profile")
    parser.add_argument("--save", help="also write the raw figures to this JSON file")
    parser.add_argument("--render", help="only re-render --out from figures saved by --save")
    parser.add_argument("--only", choices=["wrk", "sse", "memory"], action="append")
    parser.add_argument("--scenario", choices=list(SCENARIOS), action="append",
                        help="with --only wrk: just these wrk scenarios")
    args = parser.parse_args()
    notes = ""
    if args.notes and os.path.exists(args.notes):
        with open(args.notes) as f:
            notes = f.read()
    if args.render:
        with open(args.render) as f:
            saved = Bench("", Processes(tempfile.gettempdir()))
            saved.results = json.load(f)
        write_report(saved, args.out, notes)
        print(f"wrote {args.out}")
        return 0

    workdir = tempfile.mkdtemp(prefix="pingated-bench-")
    procs = Processes(workdir)
    bench = Bench(workdir, procs)
    bench.results.update(rounds=args.rounds, seconds=args.seconds, load_before=load_average())
    version = subprocess.run([shutil.which("nginx") or "nginx", "-v"], capture_output=True,
                             text=True).stderr.strip()
    bench.results["nginx_version"] = version.replace("nginx version: ", "")
    try:
        start_servers(bench)
        if args.profile:
            print(profile_gate(bench, args.seconds, args.connections))
            return 0
        only = set(args.only or ["wrk", "sse", "memory"])
        print("wrk:", flush=True)
        if "wrk" in only:
            run_wrk_matrix(bench, args.rounds, args.seconds, args.scenario)
        print("sse:", flush=True)
        if "sse" in only:
            run_sse(bench)
        print("memory:", flush=True)
        if "memory" in only:
            run_memory(bench)
        bench.results["load_after"] = load_average()
        bench.results["generated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if args.save:
            with open(args.save, "w") as f:
                json.dump(bench.results, f, indent=1)
        if only == {"wrk", "sse", "memory"}:
            write_report(bench, args.out, notes)
            print(f"wrote {args.out}")
            # WebSocket figures: their own script, written between their markers.
            subprocess.run(
                [sys.executable, os.path.join(HERE, "websocket_bench.py"), "--out", args.out],
                check=False,
            )
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
