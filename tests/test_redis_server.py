"""The server with ``--event-bus redis``: the stream and its own event log."""

from __future__ import annotations

import json
from pathlib import Path

import coredis
import httpx
import trio
from redis_support import (  # noqa: F401
    ignore_coredis_stream_leak,
    redis_server_fixture,
    redis_url_fixture,
    unreachable_redis_url_fixture,
)

from trio_llmproxy import Event, ProxyConfig, serve

pytestmark = ignore_coredis_stream_leak

STREAM = "server-test-events"


async def _stream_entries(redis_url: str) -> list[Event]:
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    async with client:
        entries = await client.xrange(STREAM)
    return [Event.from_json(entry.field_values[b"event"]) for entry in entries]


async def _serve_and_send(
    config: ProxyConfig, requests: int, *, cancel_instead: bool = False
) -> list[str]:
    ids = [f"redis-server-{number}" for number in range(requests)]
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(serve, config)
        async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
            for request_id in ids:
                response = await client.get(
                    "/v1/models", headers={"X-Request-ID": request_id}
                )
                assert response.status_code == 200
        if cancel_instead:
            nursery.cancel_scope.cancel()
        else:
            handle.shutdown()
    return ids


async def test_server_writes_each_event_to_the_stream_once(
    redis_url: str, mock_upstream_url: str
) -> None:
    config = ProxyConfig(
        listen="127.0.0.1:0",
        upstream_url=mock_upstream_url,
        event_bus="redis",
        redis_url=redis_url,
        redis_stream=STREAM,
    )

    with trio.fail_after(20):
        ids = await _serve_and_send(config, 20)
        events = await _stream_entries(redis_url)

    assert sorted(event.request_id for event in events) == sorted(ids)


async def test_file_event_log_in_redis_mode_holds_this_process_events_once(
    redis_url: str, mock_upstream_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    config = ProxyConfig(
        listen="127.0.0.1:0",
        upstream_url=mock_upstream_url,
        event_bus="redis",
        redis_url=redis_url,
        redis_stream=STREAM,
        file_event_log=log,
    )

    with trio.fail_after(20):
        ids = await _serve_and_send(config, 10)

    lines = log.read_bytes().splitlines()
    assert sorted(json.loads(line)["request_id"] for line in lines) == sorted(ids)


async def test_cancelled_server_still_flushes_published_events_to_the_stream(
    redis_url: str, mock_upstream_url: str
) -> None:
    config = ProxyConfig(
        listen="127.0.0.1:0",
        upstream_url=mock_upstream_url,
        event_bus="redis",
        redis_url=redis_url,
        redis_stream=STREAM,
    )

    with trio.fail_after(20):
        ids = await _serve_and_send(config, 10, cancel_instead=True)
        events = await _stream_entries(redis_url)

    assert sorted(event.request_id for event in events) == sorted(ids)


async def test_server_keeps_serving_while_redis_is_unreachable(
    unreachable_redis_url: str, mock_upstream_url: str
) -> None:
    config = ProxyConfig(
        listen="127.0.0.1:0",
        upstream_url=mock_upstream_url,
        event_bus="redis",
        redis_url=unreachable_redis_url,
        shutdown_timeout=1,
    )

    with trio.fail_after(20):
        ids = await _serve_and_send(config, 5)

    assert len(ids) == 5
