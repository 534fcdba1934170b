"""Tests for the Redis event bus, against a real redis-server on loopback.

Every test runs under a ``trio.fail_after`` hang guard. Time is real (the
server is another process), so backoffs, blocking reads and claim periods are
kept small. Outages stop the session's server and start it again on the same
port, empty; the ``redis_url`` fixture restarts it if a test failed half-way.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import coredis
import pytest
import trio
from events import make_event
from redis_support import (  # noqa: F401
    RedisServer,
    ignore_coredis_stream_leak,
    redis_server_fixture,
    redis_url_fixture,
)

from trio_llmproxy._bus import Subscription
from trio_llmproxy._errors import ConfigError
from trio_llmproxy._event import Event
from trio_llmproxy._redis_bus import ENTRY_FIELD, RedisEventBus

pytestmark = ignore_coredis_stream_leak

HANG_GUARD_SECONDS = 15
STREAM = "test-events"


def open_bus(url: str, **options: object) -> RedisEventBus:
    """A bus with small waits, so that the tests stay fast."""
    settings: dict[str, object] = {
        "stream": STREAM,
        "block_seconds": 0.1,
        "max_backoff_seconds": 0.2,
        "claim_idle_seconds": 30.0,
    }
    settings.update(options)
    return RedisEventBus(url, **settings)  # type: ignore[arg-type]


@asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[coredis.Redis[bytes]]:
    async with coredis.Redis.from_url(url) as client:
        yield client


async def collect(
    subscription: Subscription, count: int, *, ack: bool = True
) -> list[Event]:
    """Receive until ``count`` events arrived, acknowledging them if ``ack``."""
    events: list[Event] = []
    while len(events) < count:
        batch = await subscription.receive_batch()
        events.extend(batch)
        if ack:
            await subscription.ack(batch)
    return events


def ids(events: Sequence[Event]) -> list[str]:
    return sorted(event.event_id for event in events)


def expected_ids(numbers: range) -> list[str]:
    return sorted(f"e{n}" for n in numbers)


async def test_published_events_reach_a_subscriber_exactly_once(
    redis_url: str,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_bus(redis_url) as bus, bus.subscribe("g") as subscription:
            for number in range(50):
                bus.publish(make_event(number))

            received = await collect(subscription, 50)
            bus.close()
            rest = [event async for batch in subscription for event in batch]

        assert ids(received) == expected_ids(range(50))
        assert rest == []


async def test_stream_entry_holds_the_event_json_in_one_field(redis_url: str) -> None:
    event = make_event(1)
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_bus(redis_url) as bus:
            bus.publish(event)

        async with raw_client(redis_url) as client:
            entries = await client.xrange(STREAM)

    assert len(entries) == 1
    assert dict(entries[0].field_values) == {ENTRY_FIELD: event.to_json()}


async def test_each_consumer_group_gets_every_event(redis_url: str) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            open_bus(redis_url) as bus,
            bus.subscribe("file") as files,
            bus.subscribe("http") as webhooks,
        ):
            for number in range(30):
                bus.publish(make_event(number))

            to_file = await collect(files, 30)
            to_webhook = await collect(webhooks, 30)

    assert ids(to_file) == expected_ids(range(30))
    assert ids(to_webhook) == expected_ids(range(30))


async def test_consumers_of_one_group_split_the_work(redis_url: str) -> None:
    received: dict[str, list[Event]] = {"a": [], "b": []}
    all_in = trio.Event()

    async def consume(name: str) -> None:
        async with (
            open_bus(redis_url, consumer_name=name) as bus,
            bus.subscribe("g", batch_size=5) as subscription,
        ):
            while True:
                batch = await subscription.receive_batch()
                received[name].extend(batch)
                await subscription.ack(batch)
                if sum(len(events) for events in received.values()) >= 100:
                    all_in.set()
                # A slow consumer lets the other one take the next batches.
                await trio.sleep(0.01)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume, "a")
            nursery.start_soon(consume, "b")
            async with open_bus(redis_url) as publisher:
                for number in range(100):
                    publisher.publish(make_event(number))
            await all_in.wait()
            nursery.cancel_scope.cancel()

    assert ids(received["a"] + received["b"]) == expected_ids(range(100))
    assert received["a"]
    assert received["b"]


async def test_entries_left_pending_by_a_gone_consumer_are_claimed(
    redis_url: str,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_bus(redis_url) as publisher:
            for number in range(250):
                publisher.publish(make_event(number))
        async with (
            open_bus(redis_url, consumer_name="gone") as bus,
            bus.subscribe("g", batch_size=100) as subscription,
        ):
            await collect(subscription, 250, ack=False)

        async with (
            open_bus(redis_url, consumer_name="live", claim_idle_seconds=0.3) as bus,
            bus.subscribe("g", batch_size=100) as subscription,
        ):
            claimed = await collect(subscription, 250)
            lag = await bus.lag()

    assert ids(claimed) == expected_ids(range(250))
    assert lag.groups["g"].pending == 0


async def test_a_consumer_drains_its_own_pending_entries_before_new_ones(
    redis_url: str,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            open_bus(redis_url, consumer_name="x") as bus,
            bus.subscribe("g", batch_size=100) as subscription,
        ):
            for number in range(250):
                bus.publish(make_event(number))
            await collect(subscription, 250, ack=False)

        # Same name, and no claiming for a minute: only the drain can help.
        async with (
            open_bus(redis_url, consumer_name="x", claim_idle_seconds=60) as bus,
            bus.subscribe("g", batch_size=100) as subscription,
        ):
            bus.publish(make_event(250))
            with trio.fail_after(3):
                drained = await collect(subscription, 250)
            newer = await collect(subscription, 1)

    assert ids(drained) == expected_ids(range(250))
    assert ids(newer) == ["e250"]


async def test_publish_survives_an_outage_and_buffered_events_arrive(
    redis_server: RedisServer, redis_url: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            open_bus(redis_url) as bus,
            bus.subscribe("g", batch_size=10) as subscription,
        ):
            for number in range(10):
                bus.publish(make_event(number))
            before = await collect(subscription, 10)

            await trio.to_thread.run_sync(redis_server.stop)
            for number in range(10, 30):
                bus.publish(make_event(number))
                await trio.sleep(0.1)
            await trio.to_thread.run_sync(redis_server.start)
            after = await collect(subscription, 20)

            statistics = bus.statistics()

    assert ids(before) == expected_ids(range(10))
    assert ids(after) == expected_ids(range(10, 30))
    assert statistics.dropped == 0
    assert bus.written == 30


async def test_outage_is_logged_once_and_the_reconnection_too(
    redis_server: RedisServer, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_llmproxy._redis_bus")

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_bus(redis_url) as bus:
            await trio.to_thread.run_sync(redis_server.stop)
            bus.publish(make_event(1))
            await trio.sleep(1.0)
            await trio.to_thread.run_sync(redis_server.start)

    writer = [r.getMessage() for r in caplog.records if "writer" in r.getMessage()]
    assert len(writer) == 2
    assert "unavailable" in writer[0]
    assert "reconnected" in writer[1]
    assert bus.written == 1


async def test_events_refused_by_redis_wait_until_it_takes_them(
    redis_url: str,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with raw_client(redis_url) as client:
            await client.set(STREAM, "not a stream")
            async with open_bus(redis_url) as bus:
                for number in range(3):
                    bus.publish(make_event(number))
                await trio.sleep(0.3)
                written_while_refused = bus.written

                await client.delete([STREAM])
            length = await client.xlen(STREAM)

    assert written_while_refused == 0
    assert length == 3


async def test_a_full_buffer_during_an_outage_drops_and_counts(
    redis_server: RedisServer, redis_url: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        await trio.to_thread.run_sync(redis_server.stop)
        async with open_bus(redis_url, buffer_size=10) as bus:
            for number in range(25):
                bus.publish(make_event(number))
            statistics = bus.statistics()
            await trio.to_thread.run_sync(redis_server.start)

        async with raw_client(redis_url) as client:
            length = await client.xlen(STREAM)

    assert statistics.published == 25
    # The writer may hold one event already; the buffer holds ten more.
    assert statistics.dropped in (14, 15)
    assert length == 25 - statistics.dropped


async def test_the_group_is_recreated_when_redis_restarts_empty(
    redis_server: RedisServer, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_llmproxy._redis_bus")

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            open_bus(redis_url) as bus,
            bus.subscribe("g") as subscription,
        ):
            bus.publish(make_event(1))
            before = await collect(subscription, 1)

            await trio.to_thread.run_sync(redis_server.restart)
            bus.publish(make_event(2))
            after = await collect(subscription, 1)

    assert ids(before) == ["e1"]
    assert ids(after) == ["e2"]
    gone = [r for r in caplog.records if "is gone" in r.getMessage()]
    assert len(gone) == 1


async def test_entries_that_are_not_events_are_acknowledged_and_skipped(
    redis_url: str,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with raw_client(redis_url) as client:
            await client.xadd(STREAM, {b"other": b"field"})
            await client.xadd(STREAM, {ENTRY_FIELD: b"not json"})
            await client.xadd(STREAM, {ENTRY_FIELD: b'{"event_id": "x"}'})
        async with open_bus(redis_url) as bus, bus.subscribe("g") as subscription:
            bus.publish(make_event(1))

            received = await collect(subscription, 1)
            statistics = bus.statistics()
            lag = await bus.lag()

    assert ids(received) == ["e1"]
    assert statistics.subscribers["g"].dropped == 3
    assert lag.groups["g"].pending == 0


async def test_closing_the_bus_ends_a_subscription_after_what_is_readable(
    redis_url: str,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_bus(redis_url) as bus, bus.subscribe("g") as subscription:
            for number in range(5):
                bus.publish(make_event(number))
            await trio.sleep(0.2)  # let the writer write them
            bus.close()

            received = [event async for batch in subscription for event in batch]

    assert ids(received) == expected_ids(range(5))


async def test_leaving_the_bus_writes_what_was_buffered(redis_url: str) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        # More than one pipeline's worth, all of it in the buffer.
        async with open_bus(redis_url, buffer_size=2000) as bus:
            for number in range(1200):
                bus.publish(make_event(number))

        async with raw_client(redis_url) as client:
            length = await client.xlen(STREAM)

    assert length == 1200
    assert bus.statistics().buffered == 0


async def test_a_cancelled_flush_logs_how_many_events_were_not_written(
    redis_server: RedisServer, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        await trio.to_thread.run_sync(redis_server.stop)
        with trio.move_on_after(0.5):
            async with open_bus(redis_url) as bus:
                for number in range(5):
                    bus.publish(make_event(number))

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(message.startswith("5 event(s) may not") for message in errors)


async def test_publish_after_close_drops_and_counts(redis_url: str) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_bus(redis_url) as bus:
            bus.close()
            bus.publish(make_event(1))

    assert bus.statistics().dropped == 1
    assert bus.written == 0


async def test_lag_shows_stream_length_and_pending_entries(redis_url: str) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_bus(redis_url) as publisher:
            for number in range(10):
                publisher.publish(make_event(number))
        async with (
            open_bus(redis_url) as bus,
            bus.subscribe("g", batch_size=4) as subscription,
        ):
            await subscription.receive_batch()

            lag = await bus.lag()

    assert lag.length == 10
    assert lag.groups["g"].pending == 4
    assert lag.groups["g"].lag == 6


async def test_a_caller_exception_leaves_the_bus_unwrapped(redis_url: str) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS), pytest.raises(KeyError):
        async with open_bus(redis_url):
            raise KeyError("boom")


@pytest.mark.parametrize(
    "url",
    [
        "http://:s3cret@127.0.0.1:6379/0",
        "redis://:s3cret@127.0.0.1:notaport/0",
        "redis://:s3cret@/0",
        "redis://:s3cret@127.0.0.1:6379/zero",
        "redis://:s3cret@127.0.0.1:6379/0?db=zero",
    ],
)
def test_a_bad_url_is_a_config_error_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        RedisEventBus(url)

    assert "s3cret" not in str(caught.value)
