"""
1,000 concurrent WebSocket pairs through the real gate, bounded in time.

Every pair is opened, proven live while all the others are open too, and
closed again; afterwards the gate holds no more file descriptors than before
(nothing leaks).  A dedicated demo upstream is started after the fd limit is
raised, so neither it nor the gate inherits a limit too low for 1,000 pairs.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time
from typing import Any

from harness import Gate, ManagedProcess, free_port, wait_for_port
from websockets.asyncio.client import ClientConnection, connect

PAIRS = 1000
#: Handshakes in flight at once: Twisted listens with a backlog of 50.
OPENING_AT_ONCE = 40
TIME_BOUND = 60.0


def raise_fd_limit(wanted: int) -> None:
    """Lift the soft RLIMIT_NOFILE (inherited by the processes we start)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_thousand_concurrent_pairs(gate_factory: Any, tmp_path: Any) -> None:
    """1,000 bridged sockets open at once, all live, all closed, nothing left behind."""
    raise_fd_limit(8192)
    port = free_port()
    upstream = ManagedProcess(
        [sys.executable, "-m", "pingated.demo", "--port", str(port), "--interface", "127.0.0.1"],
        str(tmp_path / "upstream.log"),
    )
    try:
        wait_for_port(port, proc=upstream.proc)
        gate: Gate = gate_factory(upstream=f"http://127.0.0.1:{port}")
        cookie = gate.login()
        assert gate.process is not None
        pid = gate.process.pid
        started = time.monotonic()

        async def scenario() -> dict[str, float]:
            baseline_fds = _fds(pid)
            baseline_rss = _rss_kb(pid)
            gate_url = f"ws://127.0.0.1:{gate.port}/ws"
            limit = asyncio.Semaphore(OPENING_AT_ONCE)

            async def open_one(n: int) -> ClientConnection:
                async with limit:
                    ws = await connect(
                        gate_url,
                        additional_headers={"Cookie": f"pingated={cookie}"},
                        open_timeout=30,
                        ping_interval=None,
                        close_timeout=10,
                        compression=None,
                    )
                    await ws.send(f"hello {n}")
                    assert await ws.recv() == f"hello {n}"
                    return ws

            sockets = await asyncio.gather(*(open_one(n) for n in range(PAIRS)))
            opened = time.monotonic() - started
            held_fds = _fds(pid)
            held_rss = _rss_kb(pid)

            # All 1,000 at once: every pair carries a message while all are open.
            async def ping_pong(n: int, ws: ClientConnection) -> None:
                await ws.send(bytes([n % 256]) * 100)
                assert await ws.recv() == bytes([n % 256]) * 100

            await asyncio.gather(*(ping_pong(n, ws) for n, ws in enumerate(sockets)))

            await asyncio.gather(*(ws.close() for ws in sockets))
            deadline = time.monotonic() + 20
            while _fds(pid) > baseline_fds and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            return {
                "opened_s": opened,
                "baseline_fds": baseline_fds,
                "held_fds": held_fds,
                "after_fds": _fds(pid),
                "rss_per_pair_kb": (held_rss - baseline_rss) / PAIRS,
            }

        numbers = asyncio.run(asyncio.wait_for(scenario(), TIME_BOUND))
        elapsed = time.monotonic() - started
        print(f"1000 pairs: {numbers}, total {elapsed:.1f}s")
        # Each pair is two sockets in the gate: browser leg and upstream leg.
        assert numbers["held_fds"] >= numbers["after_fds"] + 2 * PAIRS, numbers
        assert numbers["after_fds"] <= numbers["baseline_fds"], numbers
        assert elapsed < TIME_BOUND
    finally:
        upstream.stop()
