"""Regressions found by trying to break the proxy from the outside.

Each test holds one behaviour that an adversarial run once broke: outcomes
of complete answers, framing of odd upstream answers, request IDs, event
log crashes and rotation, decompression bombs and memory bounds.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import brotli  # type: ignore[import-untyped]  # ships no type hints
import httpx
import trio
from events import make_event
from upstreams import (
    RawUpstream,
    chunk,
    http_request,
    http_response,
    raw_exchange,
    reply,
)

from trio_llmproxy import Event, InMemoryEventBus, JsonlFileSink, ProxyConfig, serve
from trio_llmproxy._event import MAX_DECODED_BODY_BYTES

HANG_GUARD_SECONDS = 10


@asynccontextmanager
async def _proxy(nursery: trio.Nursery, upstream_url: str) -> AsyncIterator[tuple]:
    config = ProxyConfig(listen="127.0.0.1:0", upstream_url=upstream_url)
    handle = await nursery.start(serve, config)
    async with handle.bus.subscribe("test") as subscription:
        yield handle.addresses[0], subscription


def _read_exactly_then_close(port: int, request: bytes) -> None:
    """Read a Content-Length answer to its last byte, then close at once."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += sock.recv(65536)


async def test_client_closing_right_after_a_complete_answer_is_outcome_ok(
    nursery: trio.Nursery,
) -> None:
    body = b'{"ok": true}'
    upstream = RawUpstream(
        reply(http_response(200, [("Content-Length", str(len(body)))], body))
    )
    upstream_url = await upstream.start(nursery)
    request = http_request("GET", "/v1/models", [("Host", "x")])

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with _proxy(nursery, upstream_url) as (base, subscription):
            port = int(base.rsplit(":", 1)[1])
            outcomes = []
            for _ in range(20):
                await trio.to_thread.run_sync(_read_exactly_then_close, port, request)
                (event,) = await subscription.receive_batch()
                outcomes.append(event.outcome)

    assert outcomes == ["ok"] * 20


async def test_upstream_length_beside_chunked_framing_is_not_passed_on(
    nursery: trio.Nursery,
) -> None:
    head = http_response(
        200, [("Content-Length", "100"), ("Transfer-Encoding", "chunked")]
    )
    upstream = RawUpstream(reply(head, chunk(b"ok"), b"0\r\n\r\n"))
    upstream_url = await upstream.start(nursery)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with _proxy(nursery, upstream_url) as (base, subscription):
            response = await raw_exchange(
                base, http_request("GET", "/v1/x", [("Host", "x")])
            )
            (event,) = await subscription.receive_batch()

    assert response.complete
    assert response.body == b"ok"
    assert response.head.value("content-length") is None
    assert event.outcome == "ok"


async def test_fragment_in_the_request_target_gets_400_not_500(
    nursery: trio.Nursery,
) -> None:
    upstream = RawUpstream(reply(http_response(200, [("Content-Length", "0")])))
    upstream_url = await upstream.start(nursery)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with _proxy(nursery, upstream_url) as (base, _):
            response = await raw_exchange(
                base, http_request("GET", "/v1/x?a=1#frag", [("Host", "x")])
            )

    assert response.head.status == 400
    assert upstream.requests == []


async def test_connection_header_naming_x_request_id_does_not_strip_it(
    nursery: trio.Nursery,
) -> None:
    upstream = RawUpstream(reply(http_response(200, [("Content-Length", "0")])))
    upstream_url = await upstream.start(nursery)
    headers = [("Host", "x"), ("Connection", "X-Request-ID"), ("X-Request-ID", "abc")]

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with _proxy(nursery, upstream_url) as (base, _):
            await raw_exchange(base, http_request("GET", "/v1/x", headers))

    assert upstream.only_request.head.values("x-request-id") == [b"abc"]


async def test_repeated_x_request_id_reaches_upstream_once(
    nursery: trio.Nursery,
) -> None:
    upstream = RawUpstream(reply(http_response(200, [("Content-Length", "0")])))
    upstream_url = await upstream.start(nursery)
    headers = [("Host", "x"), ("X-Request-ID", "first"), ("X-Request-ID", "second")]

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with _proxy(nursery, upstream_url) as (base, subscription):
            response = await raw_exchange(base, http_request("GET", "/v1/x", headers))
            (event,) = await subscription.receive_batch()

    assert upstream.only_request.head.values("x-request-id") == [b"first"]
    assert response.head.value("x-request-id") == b"first"
    assert event.request_id == "first"


def test_brotli_bomb_decodes_only_up_to_the_cap_and_is_marked_truncated() -> None:
    bomb = brotli.compress(b"\0" * (4 * MAX_DECODED_BODY_BYTES), quality=5)

    event = make_event(
        response_headers=[(b"content-encoding", b"br")],
        response_body=bomb,
        response_body_content_encoding="br",
    )

    rendered = event.to_dict()

    assert len(rendered["response_body"]) == MAX_DECODED_BODY_BYTES
    assert rendered["response_body_truncated"] is True


async def test_event_log_left_with_a_partial_line_gets_whole_lines_after_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"event_id": "complete"}\n{"event_id": "cut sho')

    async with JsonlFileSink(path) as sink:
        await sink.deliver([make_event(1)])

    lines = path.read_bytes().split(b"\n")
    assert lines[1] == b'{"event_id": "cut sho'
    assert Event.from_json(lines[2]).event_id == "e1"


async def test_event_log_moved_away_is_written_anew_at_its_path(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.jsonl"

    async with JsonlFileSink(path) as sink:
        await sink.deliver([make_event(1)])
        os.rename(path, tmp_path / "events.jsonl.1")
        await sink.deliver([make_event(2)])

    assert Event.from_json(path.read_bytes()).event_id == "e2"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


async def test_slow_subscriber_drops_once_its_byte_budget_is_full() -> None:
    bus = InMemoryEventBus(buffer_size=1000, max_buffered_bytes=10_000)

    async with bus, bus.subscribe("slow") as subscription:
        for number in range(10):
            bus.publish(make_event(number, response_body=b"x" * 4_000))
        batch = await subscription.receive_batch()

    assert [event.event_id for event in batch] == ["e0", "e1"]
    assert bus.statistics().subscribers["slow"].dropped == 8


async def test_sighup_does_not_stop_the_server(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "trio_llmproxy", "server"]
    command += ["--listen", f"127.0.0.1:{port}", "--upstream", "http://127.0.0.1:9"]
    log = tmp_path / "server.log"

    with log.open("wb") as stderr, trio.fail_after(30):
        process = await trio.lowlevel.open_process(command, stderr=stderr)
        try:
            async with httpx.AsyncClient() as client:
                while True:
                    try:
                        await client.get(f"http://127.0.0.1:{port}/healthz")
                        break
                    except httpx.TransportError:
                        await trio.sleep(0.1)
                process.send_signal(signal.SIGHUP)
                await trio.sleep(0.5)
                response = await client.get(f"http://127.0.0.1:{port}/healthz")
            process.send_signal(signal.SIGTERM)
            returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    assert response.status_code == 200
    assert returncode == 0
    assert b"SIGHUP received: ignored" in log.read_bytes()
