"""
WebSocket figures for docs/benchmarks.md: memory per idle bridged pair, and
messages per second through the bridge against the same upstream directly.

Starts, all on 127.0.0.1 and all stopped by pid at the end (also on error),
the bundled demo upstream (its /ws echo) and one ``twistd -n pingated`` in
front of it, logs in once, then:

* opens ``--pairs`` WebSockets through the gate (each exchanges one message
  and then sits idle) and reads the gate's resident set before and after:
  the difference divided by the pairs is the memory one idle pair costs
  (both legs: the browser's socket and the upstream's);
* echoes messages of several sizes over ``--connections`` sockets, each
  keeping ``--window`` messages in flight, for ``--seconds``, first straight
  to the upstream and then through the gate.

The client is one asyncio process (the `websockets` package); client, gate
and upstream share the machine's cores, so the ratio matters more than the
absolute figures.  Rewrites only the part of ``--out`` between
``<!-- websocket:begin -->`` and ``<!-- websocket:end -->`` (appending it when
missing), so it can run after ``bench/run.py`` rewrote the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from harness import Gate, base_config, demo_upstream, free_port  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402

BEGIN = "<!-- websocket:begin -->"
END = "<!-- websocket:end -->"
SIZES = (64, 4096, 65536)


def rss_kb(pid: int) -> int:
    """Resident set of C{pid} in KB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    """Open file descriptors of C{pid}."""
    return len(os.listdir(f"/proc/{pid}/fd"))


async def open_socket(url: str, cookie: str | None) -> ClientConnection:
    """One client socket, with the session cookie when going through the gate."""
    headers = {"Cookie": f"pingated={cookie}"} if cookie else {}
    return await connect(
        url,
        additional_headers=headers,
        open_timeout=60,
        close_timeout=10,
        ping_interval=None,
        compression=None,
        max_size=None,
    )


async def idle_pairs(gate: Gate, cookie: str, pairs: int) -> dict[str, float]:
    """Memory and descriptors of the gate with C{pairs} idle bridged sockets."""
    assert gate.process is not None
    pid = gate.process.pid
    url = f"ws://127.0.0.1:{gate.port}/ws"
    limit = asyncio.Semaphore(40)  # twisted listens with a backlog of 50

    async def one(n: int) -> ClientConnection:
        async with limit:
            ws = await open_socket(url, cookie)
            await ws.send(f"hello {n}")
            await ws.recv()
            return ws

    # Warm up: the first sockets allocate what every later one reuses.
    warm = await asyncio.gather(*(one(n) for n in range(50)))
    await asyncio.gather(*(ws.close() for ws in warm))
    await asyncio.sleep(1)
    before_rss, before_fds = rss_kb(pid), fd_count(pid)
    started = time.monotonic()
    sockets = await asyncio.gather(*(one(n) for n in range(pairs)))
    opened_s = time.monotonic() - started
    await asyncio.sleep(1)
    after_rss, after_fds = rss_kb(pid), fd_count(pid)
    await asyncio.gather(*(ws.close() for ws in sockets))
    return {
        "pairs": pairs,
        "rss_before_mb": before_rss / 1024,
        "rss_after_mb": after_rss / 1024,
        "kb_per_pair": (after_rss - before_rss) / pairs,
        "fds_per_pair": (after_fds - before_fds) / pairs,
        "open_per_s": pairs / opened_s,
    }


async def echo_rate(
    url: str, cookie: str | None, size: int, connections: int, window: int, seconds: float
) -> float:
    """Echoed messages per second over C{connections} sockets, C{window} in flight each."""
    sockets = [await open_socket(url, cookie) for _ in range(connections)]
    payload = os.urandom(size)
    done = 0
    stop = time.monotonic() + seconds

    async def pump(ws: ClientConnection) -> None:
        nonlocal done
        while time.monotonic() < stop:
            for _ in range(window):
                await ws.send(payload)
            for _ in range(window):
                await ws.recv()
            done += window

    started = time.monotonic()
    await asyncio.gather(*(pump(ws) for ws in sockets))
    elapsed = time.monotonic() - started
    await asyncio.gather(*(ws.close() for ws in sockets))
    return done / elapsed


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown section, markers included."""
    idle = results["idle"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        BEGIN,
        "## WebSockets",
        "",
        f"Generated by `bench/websocket_bench.py` (run by `make bench`) on {when};"
        f" {os.cpu_count()} cores, Linux {platform.release()}, Python"
        f" {platform.python_version()}. Upstream: the demo's autobahn `/ws` echo; client:"
        " one asyncio process (`websockets`); client, gate and upstream share the cores.",
        "",
        "### Memory per idle pair",
        "",
        f"{idle['pairs']:.0f} WebSockets opened through the gate (each exchanged one message,"
        " then idle); resident set of the gate process before and after.",
        "",
        "| pairs | gate RSS before | gate RSS after | per idle pair | fds per pair |"
        " handshakes/s |",
        "|---|---|---|---|---|---|",
        f"| {idle['pairs']:.0f} | {idle['rss_before_mb']:.1f} MB | {idle['rss_after_mb']:.1f} MB"
        f" | {idle['kb_per_pair']:.1f} KB | {idle['fds_per_pair']:.1f} |"
        f" {idle['open_per_s']:.0f} |",
        "",
        "### Messages per second: through the bridge vs direct",
        "",
        f"{args.connections} sockets, each keeping {args.window} binary messages in flight,"
        f" {args.seconds:g} s per figure; a message counts once its echo is back.",
        "",
        "| message size | direct msg/s | through pingated msg/s | ratio | through pingated MB/s"
        " (each way) |",
        "|---|---|---|---|---|",
    ]
    for size, rates in results["rates"].items():
        direct, gated = rates["direct"], rates["gate"]
        ratio = f"{gated / direct:.2f}x" if direct else "n/a"
        lines.append(
            f"| {size} B | {direct:.0f} | {gated:.0f} | {ratio} | {gated * size / 1e6:.1f} |"
        )
    lines += [
        "",
        "The direct figure is the same client against the same echo without the gate. Through"
        " pingated every message is parsed and re-framed by autobahn on both legs (unmasked from"
        " the browser, masked towards the upstream, and back), so per echoed message the machine"
        " does three autobahn parse/frame steps in each direction instead of one; with client,"
        " gate and upstream sharing the same cores that bounds the ratio near 1/3. One run, so"
        " other work on the machine adds noise.",
        END,
    ]
    return "\n".join(lines)


def write_section(out: str, section: str) -> None:
    """Replace the marked section of C{out} (or append it), leaving the rest alone."""
    text = ""
    if os.path.exists(out):
        with open(out, encoding="utf-8") as f:
            text = f.read()
    start, end = text.find(BEGIN), text.find(END)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(END) :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)


async def measure(gate: Gate, upstream: str, cookie: str, args: argparse.Namespace) -> Any:
    """Every figure of the section."""
    results: dict[str, Any] = {"idle": await idle_pairs(gate, cookie, args.pairs), "rates": {}}
    print(f"idle pairs: {results['idle']}", flush=True)
    direct_url = upstream.replace("http://", "ws://") + "/ws"
    gate_url = f"ws://127.0.0.1:{gate.port}/ws"
    for size in args.sizes:
        rates = {}
        for name, url, session in (("direct", direct_url, None), ("gate", gate_url, cookie)):
            rates[name] = await echo_rate(
                url, session, size, args.connections, args.window, args.seconds
            )
        results["rates"][size] = rates
        print(f"{size} B: {rates}", flush=True)
    return results


def main() -> int:
    """Run the WebSocket benchmark and write its section of --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * args.pairs + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    workdir = tempfile.mkdtemp(prefix="pingated-wsbench-")
    with demo_upstream() as upstream:
        port = free_port()
        gate = Gate(workdir, base_config(os.path.join(workdir, "state"), port, upstream), port)
        try:
            gate.start()
            cookie = gate.login()
            results = asyncio.run(measure(gate, upstream, cookie, args))
        finally:
            gate.stop()
    section = report(results, args)
    if args.no_write:
        print(section)
    else:
        write_section(args.out, section)
        print(f"wrote the WebSocket section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
