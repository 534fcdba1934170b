"""Faults around the proxy: upstreams that die or hang, clients that leave,
a full disk under the event log, Redis going away, SIGTERM under load.

Upstream death mid-stream, a silent upstream (504), a stall between chunks
and client disconnects during the body, before the head and mid-stream are
held by tests/test_proxy.py; this module adds the cases those leave out.
Each test checks that the proxy keeps serving and that the events say what
happened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path

import httpx
import orjson
import pytest
import trio
from redis_support import (
    RedisServer,
    _command,
    ignore_coredis_stream_leak,
    redis_server_fixture,  # noqa: F401
    redis_url_fixture,  # noqa: F401
)
from test_cli import running_server
from test_proxy import HANG_GUARD_SECONDS, PROMPTLY_SECONDS, proxy_to
from upstreams import Exchange, RawUpstream, chunk, http_request, open_raw_client

from trio_llmproxy._config import ProxyConfig
from trio_llmproxy._server import ServerHandle, serve

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def poll_until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``condition`` holds; for state outside Trio (Redis, logs)."""
    while not await condition():  # noqa: ASYNC110 - nothing here to wait on
        await trio.sleep(0.05)


# --- Upstream -------------------------------------------------------------------


async def test_upstream_never_reading_a_large_body_gives_504(
    nursery: trio.Nursery,
) -> None:
    async def never_read(exchange: Exchange) -> None:
        await trio.sleep_forever()

    body = b"x" * (16 * 1024 * 1024)
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(
            nursery, RawUpstream(never_read), read_timeout=0.5
        ) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
                response = await client.post("/v1/files", content=body)
            event = await proxy.next_event()

    assert response.status_code == 504, event.error
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert event.outcome == "upstream_timeout"


# --- Client ---------------------------------------------------------------------


async def test_client_leaving_before_any_body_byte_closes_upstream_connection(
    nursery: trio.Nursery,
) -> None:
    upstream_cut = trio.Event()

    async def read_until_cut(exchange: Exchange) -> None:
        try:
            await exchange.read_body()
        except EOFError:
            upstream_cut.set()
        await exchange.close()

    request = http_request(
        "POST", "/v1/files", [("Host", "p"), ("Transfer-Encoding", "chunked")]
    )
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, RawUpstream(read_until_cut)) as proxy:
            async with open_raw_client(proxy.url) as client:
                await client.send(request)
                # Let the proxy start the upstream request, then leave.
                await trio.sleep(0.2)
            with trio.fail_after(PROMPTLY_SECONDS):
                await upstream_cut.wait()
            event = await proxy.next_event()

    assert event.outcome == "client_disconnected"
    assert event.status == 499
    assert event.request_body_size == 0


async def test_one_client_leaving_mid_stream_does_not_disturb_the_others(
    nursery: trio.Nursery,
) -> None:
    release = trio.Event()

    async def stream(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"data: 1\n\n")
        )
        await release.wait()
        await exchange.send(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    bodies: list[bytes] = []
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, RawUpstream(stream)) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:

                async def read_all() -> None:
                    response = await client.get("/v1/stream")
                    bodies.append(response.content)

                async with trio.open_nursery() as clients:
                    for _ in range(5):
                        clients.start_soon(read_all)
                    async with open_raw_client(proxy.url) as leaver:
                        await leaver.send(http_request("GET", "/v1/s", [("Host", "p")]))
                        await leaver.read_head()
                    await trio.sleep(0.1)
                    release.set()
            outcomes = sorted([(await proxy.next_event()).outcome for _ in range(6)])

    assert bodies == [b"data: 1\n\ndata: [DONE]\n\n"] * 5
    assert outcomes == ["client_disconnected"] + ["ok"] * 5


# --- The event log's disk -------------------------------------------------------


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``path``; skip the test where not allowed."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_full_disk_under_event_log_never_fails_a_request_and_recovers(
    nursery: trio.Nursery,
    mock_upstream_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    with tiny_tmpfs(tmp_path / "disk", "256k") as disk:
        filler = disk / "filler"
        # Leave a few KiB: the first events fit, then the disk is full.
        filler.write_bytes(b"\0" * (240 * 1024))
        config = ProxyConfig(
            listen="127.0.0.1:0",
            upstream_url=mock_upstream_url,
            file_event_log=disk / "events.jsonl",
            shutdown_timeout=10,
        )
        statuses = []
        with trio.fail_after(HANG_GUARD_SECONDS * 3):
            async with trio.open_nursery() as server_nursery:
                handle: ServerHandle = await server_nursery.start(serve, config)
                async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
                    for _ in range(40):
                        response = await client.post("/v1/chat/completions", json=CHAT)
                        statuses.append(response.status_code)

                    async def retrying() -> bool:
                        return "retrying" in caplog.text

                    await poll_until(retrying)
                    # Space comes back while the sink is still retrying.
                    filler.unlink()
                    for _ in range(10):
                        response = await client.post("/v1/chat/completions", json=CHAT)
                        statuses.append(response.status_code)
                handle.shutdown()
            lines = (disk / "events.jsonl").read_bytes().splitlines()

    assert statuses == [200] * 50
    # Only whole lines, and none lost: the failed batch was retried.
    assert len([orjson.loads(line) for line in lines]) == 50
    assert "No space left on device" in caplog.text


async def test_event_log_disk_full_for_good_loses_events_but_not_requests(
    nursery: trio.Nursery,
    mock_upstream_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    with tiny_tmpfs(tmp_path / "disk", "64k") as disk:
        (disk / "filler").write_bytes(b"\0" * (60 * 1024))
        config = ProxyConfig(
            listen="127.0.0.1:0",
            upstream_url=mock_upstream_url,
            file_event_log=disk / "events.jsonl",
            # The drain gives up after this; the loss is counted and logged.
            shutdown_timeout=1,
        )
        with trio.fail_after(HANG_GUARD_SECONDS * 2):
            async with trio.open_nursery() as server_nursery:
                handle: ServerHandle = await server_nursery.start(serve, config)
                async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
                    statuses = [
                        (
                            await client.post("/v1/chat/completions", json=CHAT)
                        ).status_code
                        for _ in range(30)
                    ]
                    health = await client.get("/healthz")
                handle.shutdown()
            data = (disk / "events.jsonl").read_bytes()

    assert statuses == [200] * 30
    assert health.status_code == 200
    assert all(orjson.loads(line) for line in data.splitlines())
    assert "No space left on device" in caplog.text
    assert "were lost" in caplog.text


# --- Redis ----------------------------------------------------------------------


def _stream_length(server: RedisServer, stream: str = "llm-proxy-events") -> int:
    reply = _command(server.port, b"XLEN " + stream.encode())
    return int(reply.lstrip(b":"))


@pytest.mark.redis
@ignore_coredis_stream_leak
async def test_redis_going_away_and_back_loses_no_event_and_fails_no_request(
    nursery: trio.Nursery,
    mock_upstream_url: str,
    redis_server: RedisServer,
    redis_url: str,
) -> None:
    config = ProxyConfig(
        listen="127.0.0.1:0",
        upstream_url=mock_upstream_url,
        event_bus="redis",
        redis_url=redis_url,
        shutdown_timeout=10,
    )
    statuses: list[int] = []
    try:
        with trio.fail_after(HANG_GUARD_SECONDS * 3):
            async with trio.open_nursery() as server_nursery:
                handle: ServerHandle = await server_nursery.start(serve, config)
                async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:

                    async def call(count: int) -> None:
                        for _ in range(count):
                            response = await client.post(
                                "/v1/chat/completions", json=CHAT
                            )
                            statuses.append(response.status_code)

                    async def stream_holds(count: int) -> bool:
                        length = await trio.to_thread.run_sync(
                            _stream_length, redis_server
                        )
                        return length >= count

                    await call(5)
                    await poll_until(partial(stream_holds, 5))
                    await trio.to_thread.run_sync(redis_server.stop)
                    await call(20)
                    # Back, empty (no persistence): the 20 waited in the buffer.
                    await trio.to_thread.run_sync(redis_server.start)
                    await call(5)
                    await poll_until(partial(stream_holds, 25))
                handle.shutdown()
    finally:
        await trio.to_thread.run_sync(redis_server.start)

    assert statuses == [200] * 30
    assert await trio.to_thread.run_sync(_stream_length, redis_server) == 25


# --- SIGTERM under load -----------------------------------------------------------


# The test's own httpx client leaves its request-body generators unfinished
# when the server's shutdown cuts a request; that is the client library's
# doing, in this process, not the proxy's (a subprocess here).
@pytest.mark.filterwarnings(
    "ignore:Async generator 'httpx._content.ByteStream.__aiter__'"
    ":ResourceWarning"
)
async def test_sigterm_under_load_exits_0_and_every_completed_request_has_its_event(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    slow = {"X-Mock-Chunk-Count": "10", "X-Mock-Chunk-Delay-Ms": "30"}
    completed: list[str] = []
    failed: list[str] = []
    hundred_done = trio.Event()

    with trio.fail_after(HANG_GUARD_SECONDS * 3):
        async with running_server(tmp_path, mock_upstream_url) as server:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(
                base_url=server.url, limits=limits, timeout=10
            ) as client:

                async def stream_calls(worker: int) -> None:
                    for number in range(1000):
                        request_id = f"w{worker}-{number}"
                        try:
                            response = await client.post(
                                "/v1/chat/completions",
                                json={**CHAT, "stream": True},
                                headers={**slow, "X-Request-ID": request_id},
                            )
                        except httpx.TransportError:
                            failed.append(request_id)
                            return
                        if response.status_code != 200:
                            failed.append(request_id)
                            return
                        assert response.content.endswith(b"data: [DONE]\n\n")
                        completed.append(request_id)
                        if len(completed) == 100:
                            hundred_done.set()

                async with trio.open_nursery() as workers:
                    for worker in range(32):
                        workers.start_soon(stream_calls, worker)
                    await hundred_done.wait()
                    server.process.send_signal(signal.SIGTERM)
                    with trio.fail_after(HANG_GUARD_SECONDS):
                        returncode = await server.process.wait()

    assert returncode == 0, server.stderr()
    recorded = {str(event["request_id"]) for event in server.events()}
    assert set(completed) <= recorded
    assert len(server.events()) == len(recorded)
