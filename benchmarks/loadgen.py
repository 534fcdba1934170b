"""The benchmark's load generator: a process of its own, on raw asyncio sockets.

It reads one JSON command per line on stdin, runs it, and writes one JSON
result per line on stdout. A command names a port on 127.0.0.1, one request
(method, path, headers, body), a concurrency, a number of requests and a time
limit. Each of ``concurrency`` workers opens one keep-alive connection before
the clock starts and sends requests on it until the count or the time is used
up; nothing is sent anywhere but 127.0.0.1.

HTTP/1.1 is parsed by hand, just enough for the proxy's and the upstream's
answers (``Content-Length`` or chunked bodies), so that the load generator
costs a few microseconds per chunk and is never the bottleneck. With
``timing`` on, the SSE events are split out of the body and each event's
``"ts"`` (the upstream's ``time.monotonic_ns()`` when it wrote the event) is
compared with the time it arrived: that gives the latency of each event and
the gap excess between consecutive events.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

READ_BYTES = 1 << 18
# A request that has not finished this long after the time limit is an error.
GRACE_SECONDS = 30.0
MAX_ERROR_SAMPLES = 5


class _Dechunker:
    """Incremental decoder of a chunked body; counts or keeps the payload."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.done = False
        self.size = 0
        self._remaining = 0
        self._crlf = False
        self._last = False
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._pending + data if self._pending else data
        self._pending = b""
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while pos < end:
            if self._remaining:
                take = min(self._remaining, end - pos)
                if self.keep:
                    out.append(buf[pos : pos + take])
                self.size += take
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._crlf = True
                continue
            if self._crlf:
                if end - pos < 2:
                    break
                pos += 2
                self._crlf = False
                if self._last:
                    self.done = True
                    return out
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if size:
                self._remaining = size
            else:
                self._crlf = True
                self._last = True
        self._pending = buf[pos:]
        return out


class _Stats:
    def __init__(self, timing: bool) -> None:
        self.timing = timing
        self.latencies_ms: list[float] = []
        self.ttft_ms: list[float] = []
        self.event_latency_ms: list[float] = []
        self.gap_excess_ms: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self.events = 0
        self.body_bytes = 0

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(what)


def _events(
    stats: _Stats, pending: bytes, payload: bytes, now: int, last: list[int]
) -> bytes:
    """Take the complete SSE events out of ``pending + payload``; keep the rest."""
    data = pending + payload
    start = 0
    while True:
        end = data.find(b"\n\n", start)
        if end < 0:
            return data[start:]
        stats.events += 1
        ts_at = data.find(b'"ts":', start, end)
        if ts_at >= 0:
            ts_end = data.find(b",", ts_at, end)
            sent = int(data[ts_at + 5 : ts_end])
            stats.event_latency_ms.append((now - sent) / 1e6)
            if last:
                gap_in = now - last[0]
                gap_out = sent - last[1]
                stats.gap_excess_ms.append((gap_in - gap_out) / 1e6)
            last[:] = [now, sent]
        start = end + 2


async def _one(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    stats: _Stats,
) -> bool:
    """Send one request and read its whole answer; return whether to reuse."""
    started = time.monotonic_ns()
    writer.write(request)
    buf = b""
    while True:
        data = await reader.read(READ_BYTES)
        if not data:
            raise ConnectionError("connection closed before the response head")
        buf += data
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            break
    status = int(buf[9:12])
    head = buf[:head_end].lower()
    rest = buf[head_end + 4 :]
    keep_alive = b"connection: close" not in head
    first: int | None = None
    if b"transfer-encoding: chunked" in head:
        decoder = _Dechunker(keep=stats.timing)
        pending, last = b"", []
        data = rest
        while True:
            now = time.monotonic_ns()
            payloads = decoder.feed(data) if data else []
            if first is None and decoder.size:
                first = now
            if stats.timing:
                for payload in payloads:
                    pending = _events(stats, pending, payload, now, last)
            if decoder.done:
                break
            data = await reader.read(READ_BYTES)
            if not data:
                raise ConnectionError("connection closed in the middle of a body")
        size = decoder.size
    else:
        at = head.find(b"content-length:")
        length = 0
        if at >= 0:
            eol = head.find(b"\r\n", at)
            length = int(head[at + 15 : eol if eol >= 0 else None])
        size = len(rest)
        if size:
            first = time.monotonic_ns()
        while size < length:
            data = await reader.read(READ_BYTES)
            if not data:
                raise ConnectionError("connection closed in the middle of a body")
            if first is None:
                first = time.monotonic_ns()
            size += len(data)
    done = time.monotonic_ns()
    stats.body_bytes += size
    if status != 200:
        stats.error(f"status {status}")
        return keep_alive
    stats.latencies_ms.append((done - started) / 1e6)
    if first is not None:
        stats.ttft_ms.append((first - started) / 1e6)
    return keep_alive


async def _worker(
    port: int, request: bytes, stats: _Stats, budget: list[int], deadline: float
) -> None:
    reader = writer = None
    try:
        while budget[0] > 0 and time.monotonic() < deadline:
            budget[0] -= 1
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert reader is not None
            try:
                reusable = await _one(reader, writer, request, stats)
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                stats.error(f"{type(exc).__name__}: {exc}")
                reusable = False
            if not reusable:
                writer.close()
                writer = None
    finally:
        if writer is not None:
            writer.close()


def _request_bytes(command: dict[str, Any]) -> bytes:
    body = command.get("body", "").encode()
    lines = [
        f"{command.get('method', 'POST')} {command['path']} HTTP/1.1",
        f"host: 127.0.0.1:{command['port']}",
    ]
    lines += [f"{name}: {value}" for name, value in command.get("headers", [])]
    if body:
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run(command: dict[str, Any]) -> dict[str, Any]:
    """Run one load command and return its raw figures."""
    stats = _Stats(bool(command.get("timing")))
    request = _request_bytes(command)
    concurrency = int(command["concurrency"])
    budget = [int(command["requests"])]
    started = time.monotonic()
    deadline = started + float(command["max_seconds"])
    workers = [
        _worker(command["port"], request, stats, budget, deadline)
        for _ in range(concurrency)
    ]
    tasks = [asyncio.ensure_future(w) for w in workers]
    done, pending = await asyncio.wait(
        tasks, timeout=float(command["max_seconds"]) + GRACE_SECONDS
    )
    for task in pending:
        task.cancel()
        stats.error("request still running at the time limit")
    for task in done:
        if task.exception() is not None:
            stats.error(f"worker failed: {task.exception()!r}")
    wall = time.monotonic() - started
    return {
        "completed": len(stats.latencies_ms),
        "wall_s": wall,
        "errors": stats.errors,
        "error_samples": stats.error_samples,
        "latencies_ms": stats.latencies_ms,
        "ttft_ms": stats.ttft_ms,
        "event_latency_ms": stats.event_latency_ms,
        "gap_excess_ms": stats.gap_excess_ms,
        "events": stats.events,
        "body_bytes": stats.body_bytes,
    }


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        result = await run(json.loads(line))
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(_serve())
