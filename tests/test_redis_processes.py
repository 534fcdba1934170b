"""Processes sharing one Redis stream, as users run them.

Two ``server`` processes publish to one stream; ``dispatcher`` processes of
one consumer group deliver it to one JSONL file. Every process is a real
subprocess of ``python -m trio_llmproxy``; the upstream is ``mock-upstream``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from redis_support import (  # noqa: F401
    ignore_coredis_stream_leak,
    redis_server_fixture,
    redis_url_fixture,
)

pytestmark = ignore_coredis_stream_leak

REQUESTS = 1000
CONCURRENCY = 16
CLAIM_IDLE_SECONDS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Processes:
    """Starts ``python -m trio_llmproxy`` subprocesses and ends them all."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self._log_dir / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trio_llmproxy",
                    *args,
                    "--log-level",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> int:
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=30)

    def end_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[_Processes]:
    started = _Processes(tmp_path)
    try:
        yield started
    finally:
        started.end_all()


async def _wait_ready(url: str) -> None:
    async with httpx.AsyncClient() as client:
        with trio.fail_after(20):
            while True:
                try:
                    response = await client.get(url)
                except httpx.TransportError:
                    await trio.sleep(0.1)
                    continue
                if response.status_code < 500:
                    return


async def _stream_requests(
    bases: list[str], count: int, *, halfway: trio.Event
) -> list[str]:
    """Send ``count`` streamed completions, spread over ``bases``."""
    ids = [f"req-{number:05d}" for number in range(count)]
    queue = iter(enumerate(ids))
    body = {"model": "mock-gpt", "stream": True, "messages": []}

    async def worker(client: httpx.AsyncClient) -> None:
        for number, request_id in queue:
            url = f"{bases[number % len(bases)]}/v1/chat/completions"
            headers = {"X-Request-ID": request_id}
            async with client.stream("POST", url, json=body, headers=headers) as r:
                assert r.status_code == 200
                text = b"".join([chunk async for chunk in r.aiter_raw()])
                assert text.endswith(b"data: [DONE]\n\n")
            if number == count // 2:
                halfway.set()

    async with httpx.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:
        for _ in range(CONCURRENCY):
            nursery.start_soon(worker, client)
    return ids


def _request_ids(path: Path) -> Counter[str]:
    if not path.exists():
        return Counter()
    lines = path.read_bytes().splitlines()
    return Counter(json.loads(line)["request_id"] for line in lines)


async def _wait_for_ids(path: Path, ids: list[str], seconds: float) -> Counter[str]:
    with trio.move_on_after(seconds):
        while True:
            seen = _request_ids(path)
            if all(request_id in seen for request_id in ids):
                return seen
            await trio.sleep(0.5)
    return _request_ids(path)


async def test_two_servers_and_two_dispatchers_deliver_every_request_despite_a_kill(
    processes: _Processes, redis_url: str, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    stream = "e2e-events"
    upstream_port = _free_port()
    processes.start("mock", "mock-upstream", "--listen", f"127.0.0.1:{upstream_port}")
    upstream = f"http://127.0.0.1:{upstream_port}"
    server_ports = [_free_port(), _free_port()]
    servers = [
        processes.start(
            f"server{port}",
            "server",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            upstream,
            "--event-bus",
            "redis",
            "--redis-url",
            redis_url,
            "--redis-stream",
            stream,
        )
        for port in server_ports
    ]
    dispatcher_args = [
        "dispatcher",
        "--backend",
        "file",
        "--file",
        str(events),
        "--redis-url",
        redis_url,
        "--redis-stream",
        stream,
        "--consumer-group",
        "file",
        "--claim-idle",
        str(CLAIM_IDLE_SECONDS),
        "--flush-interval",
        "0.05",
    ]
    doomed = processes.start("dispatcher-doomed", *dispatcher_args)
    survivor = processes.start("dispatcher-survivor", *dispatcher_args)
    bases = [f"http://127.0.0.1:{port}" for port in server_ports]
    await _wait_ready(f"{upstream}/v1/models")
    for base in bases:
        await _wait_ready(f"{base}/healthz")

    halfway = trio.Event()
    async with trio.open_nursery() as nursery:
        result: list[list[str]] = []

        async def send_all() -> None:
            result.append(await _stream_requests(bases, REQUESTS, halfway=halfway))

        nursery.start_soon(send_all)
        with trio.fail_after(120):
            await halfway.wait()
        doomed.kill()
    ids = result[0]
    for server in servers:
        assert processes.stop(server) == 0
    seen = await _wait_for_ids(events, ids, 30 + CLAIM_IDLE_SECONDS)

    assert processes.stop(survivor) == 0
    assert [request_id for request_id in ids if request_id not in seen] == []
    duplicates = sum(count - 1 for count in seen.values())
    # Only the batch the killed dispatcher held can come twice.
    assert duplicates <= 100
