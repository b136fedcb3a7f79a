"""
A tiny stdlib upstream for the benchmark: what nginx cannot serve by itself.

* C{GET /sse?n=N&interval=S} — N server-sent events, one every S seconds;
  each carries C{time.monotonic_ns()} taken just before the write, so a
  client on the same machine can tell how long the event took to reach it
  (CLOCK_MONOTONIC is shared by all processes on Linux).
* C{POST /sink} (Content-Length or chunked) — reads the body as fast as it
  comes and answers with the byte count.

Run: C{python bench/aux_upstream.py --port 0} (prints the port it bound).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from urllib.parse import parse_qs, urlsplit


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def _sse(writer: asyncio.StreamWriter, query: dict[str, list[str]]) -> None:
    count = int(query.get("n", ["50"])[0])
    interval = float(query.get("interval", ["0.02"])[0])
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    await writer.drain()
    for i in range(count):
        await asyncio.sleep(interval)
        event = f"id: {i}\ndata: {time.monotonic_ns()}\n\n".encode()
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def _sink(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]
) -> None:
    total = 0
    if "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining:
            data = await reader.read(min(remaining, 1 << 20))
            if not data:
                break
            total += len(data)
            remaining -= len(data)
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            while size:
                data = await reader.read(min(size, 1 << 20))
                total += len(data)
                size -= len(data)
            await reader.readexactly(2)
    body = b'{"received": %d}\n' % total
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    await writer.drain()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            head = await _read_head(reader)
            if head is None:
                break
            method, target, headers = head
            parts = urlsplit(target)
            if parts.path == "/sse":
                await _sse(writer, parse_qs(parts.query))
            elif parts.path == "/sink" and method in ("POST", "PUT"):
                await _sink(reader, writer, headers)
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _main(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port)
    bound = server.sockets[0].getsockname()[1]
    print(bound, flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    """Serve until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(_main(args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
