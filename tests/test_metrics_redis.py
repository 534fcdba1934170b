"""/metrics with ``--event-bus redis``: the stream's length and pending counts."""

from __future__ import annotations

import coredis
import httpx
import trio
from redis_support import (  # noqa: F401
    ignore_coredis_stream_leak,
    redis_server_fixture,
    redis_url_fixture,
    unreachable_redis_url_fixture,
)
from test_metrics import running_proxy, scrape, scrape_when, value

pytestmark = ignore_coredis_stream_leak

STREAM = "metrics-test-events"
HANG_GUARD_SECONDS = 20.0


async def test_redis_stream_length_and_pending_entries(
    redis_url: str, mock_upstream_url: str
) -> None:
    redis: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            redis,
            running_proxy(
                mock_upstream_url,
                event_bus="redis",
                redis_url=redis_url,
                redis_stream=STREAM,
            ) as handle,
            httpx.AsyncClient(base_url=handle.addresses[0]) as client,
        ):
            for _ in range(3):
                await client.get("/v1/models")
            await scrape_when(client, "llmproxy_redis_stream_length", 3)
            # A group that has taken one entry and not acknowledged it.
            await redis.xgroup_create(STREAM, "reader", "0")
            await redis.xreadgroup("reader", "r1", {STREAM: ">"}, count=1)
            samples = await scrape(client)

    group = {"stream": STREAM, "group": "reader"}
    assert value(samples, "llmproxy_redis_up", stream=STREAM) == 1
    assert value(samples, "llmproxy_redis_stream_length", stream=STREAM) == 3
    assert value(samples, "llmproxy_redis_group_pending_entries", **group) == 1
    assert value(samples, "llmproxy_redis_group_lag_entries", **group) == 2
    assert value(samples, "llmproxy_bus_published_events_total", bus="redis") == 3
    assert (
        value(
            samples,
            "llmproxy_subscriber_delivered_events_total",
            bus="memory",
            subscriber="redis",
        )
        == 3
    )


async def test_unreachable_redis_is_reported_as_down(
    unreachable_redis_url: str, mock_upstream_url: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            running_proxy(
                mock_upstream_url,
                event_bus="redis",
                redis_url=unreachable_redis_url,
                redis_stream=STREAM,
                shutdown_timeout=0.5,
            ) as handle,
            httpx.AsyncClient(base_url=handle.addresses[0]) as client,
        ):
            samples = await scrape(client)

    assert value(samples, "llmproxy_redis_up") == 0
