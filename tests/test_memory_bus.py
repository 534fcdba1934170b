"""Tests for the in-memory event bus: fan-out, drops, batching, closing.

No sockets: subscribers are tasks in the test's nursery and time runs on
Trio's autojump clock where a test waits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import trio
import trio.testing
from events import make_event

from trio_llmproxy import Event, InMemoryEventBus, Subscription, WebSocketSession


def ids(events: Sequence[Event]) -> list[str]:
    return [event.event_id for event in events]


async def collect(subscription: Subscription, into: list[Event]) -> None:
    async for batch in subscription:
        into.extend(batch)


async def test_every_subscriber_gets_every_event() -> None:
    bus = InMemoryEventBus()
    first: list[Event] = []
    second: list[Event] = []

    async with bus, trio.open_nursery() as nursery:
        async with bus.subscribe("a") as a, bus.subscribe("b") as b:
            nursery.start_soon(collect, a, first)
            nursery.start_soon(collect, b, second)
            for number in range(5):
                bus.publish(make_event(number))
            bus.close()
            await trio.testing.wait_all_tasks_blocked()

    assert ids(first) == ids(second) == ["e0", "e1", "e2", "e3", "e4"]


async def test_publish_to_a_full_subscriber_drops_and_counts_without_blocking() -> None:
    bus = InMemoryEventBus(buffer_size=2)

    async with bus.subscribe("stuck"):
        # publish is synchronous: it cannot wait for the subscriber to read.
        for number in range(10):
            bus.publish(make_event(number))
        stats = bus.statistics()

    assert stats.published == 10
    assert stats.subscribers["stuck"].dropped == 8
    assert stats.subscribers["stuck"].buffered == 2
    # Every subscriber was full: those events exist nowhere.
    assert stats.dropped == 8


async def test_slow_subscriber_loses_only_its_own_events() -> None:
    bus = InMemoryEventBus(buffer_size=2)
    fast: list[Event] = []

    async with trio.open_nursery() as nursery:
        async with bus.subscribe("fast") as subscription, bus.subscribe("stuck"):
            nursery.start_soon(collect, subscription, fast)
            for number in range(20):
                bus.publish(make_event(number))
                await trio.testing.wait_all_tasks_blocked()
            stats = bus.statistics()
            bus.close()

    assert ids(fast) == [f"e{number}" for number in range(20)]
    assert stats.subscribers["fast"].dropped == 0
    assert stats.subscribers["stuck"].dropped == 18
    # Someone took each event, so the bus itself lost none.
    assert stats.dropped == 0


async def test_subscriber_with_its_own_small_buffer_drops_alone() -> None:
    bus = InMemoryEventBus(buffer_size=100)

    async with bus.subscribe("viewer", buffer_size=2), bus.subscribe("sink"):
        for number in range(10):
            bus.publish(make_event(number))
        stats = bus.statistics()

    assert stats.subscribers["viewer"].dropped == 8
    assert stats.subscribers["sink"].dropped == 0
    assert stats.subscribers["sink"].buffered == 10


async def test_subscriber_with_its_own_byte_budget_drops_alone() -> None:
    bus = InMemoryEventBus()
    body = b"x" * 1000

    async with (
        bus.subscribe("viewer", max_buffered_bytes=2500),
        bus.subscribe("sink"),
    ):
        for number in range(5):
            bus.publish(make_event(number, response_body=body))
        stats = bus.statistics()

    assert stats.subscribers["viewer"].buffered == 2
    assert stats.subscribers["sink"].buffered == 5


async def test_websocket_sessions_count_their_messages_in_the_byte_budget() -> None:
    bus = InMemoryEventBus()
    session = WebSocketSession(captured_bytes=1000)

    async with bus.subscribe("viewer", max_buffered_bytes=2500):
        for number in range(5):
            bus.publish(make_event(number, method="WEBSOCKET", websocket=session))
        stats = bus.statistics()

    assert stats.subscribers["viewer"].buffered == 2


async def test_batches_hold_at_most_batch_size_events() -> None:
    bus = InMemoryEventBus()

    async with bus.subscribe("s", batch_size=4) as subscription:
        for number in range(10):
            bus.publish(make_event(number))
        bus.close()
        sizes = [len(batch) async for batch in subscription]

    assert sizes == [4, 4, 2]


async def test_batch_waits_flush_interval_for_more_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = InMemoryEventBus()
    batches: list[tuple[float, list[str]]] = []

    async def receive(subscription: Subscription) -> None:
        async for batch in subscription:
            batches.append((trio.current_time(), ids(batch)))

    async with trio.open_nursery() as nursery:
        async with bus.subscribe("s", batch_size=10, flush_interval=5.0) as sub:
            nursery.start_soon(receive, sub)
            start = trio.current_time()
            bus.publish(make_event(0))
            await trio.sleep(2)
            bus.publish(make_event(1))
            await trio.sleep(10)
            bus.publish(make_event(2))
            await trio.sleep(10)
            bus.close()

    assert [batch for _, batch in batches] == [["e0", "e1"], ["e2"]]
    # The first batch left once its oldest event had waited the interval.
    assert batches[0][0] - start == pytest.approx(5.0)
    assert batches[1][0] - start == pytest.approx(17.0)


async def test_full_batch_leaves_before_the_flush_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = InMemoryEventBus()
    batches: list[tuple[float, list[str]]] = []

    async def receive(subscription: Subscription) -> None:
        async for batch in subscription:
            batches.append((trio.current_time(), ids(batch)))

    async with trio.open_nursery() as nursery:
        async with bus.subscribe("s", batch_size=3, flush_interval=5.0) as sub:
            nursery.start_soon(receive, sub)
            start = trio.current_time()
            for number in range(3):
                await trio.sleep(1)
                bus.publish(make_event(number))
            await trio.sleep(10)
            bus.close()

    assert batches == [(pytest.approx(start + 3.0), ["e0", "e1", "e2"])]


async def test_zero_flush_interval_delivers_what_waits_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = InMemoryEventBus()

    async with bus.subscribe("s", batch_size=10, flush_interval=0) as subscription:
        bus.publish(make_event(0))
        bus.publish(make_event(1))
        start = trio.current_time()
        batch = await subscription.receive_batch()

    assert ids(batch) == ["e0", "e1"]
    assert trio.current_time() == start


async def test_close_ends_subscriptions_after_every_earlier_event() -> None:
    bus = InMemoryEventBus()

    async with bus.subscribe("s", batch_size=3) as subscription:
        for number in range(7):
            bus.publish(make_event(number))
        bus.close()
        bus.publish(make_event(99))
        received = [event async for batch in subscription for event in batch]

    assert ids(received) == [f"e{number}" for number in range(7)]
    assert bus.statistics().dropped == 1


async def test_subscribing_after_close_ends_at_once() -> None:
    bus = InMemoryEventBus()
    bus.close()

    async with bus.subscribe("late") as subscription:
        with trio.fail_after(1):
            batches = [batch async for batch in subscription]

    assert batches == []


async def test_leaving_the_bus_context_closes_it() -> None:
    bus = InMemoryEventBus()

    async with bus.subscribe("s") as subscription:
        async with bus:
            bus.publish(make_event(0))
        with trio.fail_after(1):
            batches = [ids(batch) async for batch in subscription]

    assert batches == [["e0"]]


async def test_statistics_count_published_dropped_and_delivered() -> None:
    bus = InMemoryEventBus(buffer_size=3)

    async with bus.subscribe("reader") as reader, bus.subscribe("idle"):
        for number in range(5):
            bus.publish(make_event(number))
        await reader.receive_batch()
        bus.publish(make_event(5))
        stats = bus.statistics()

    assert stats.published == 6
    assert stats.subscribers["reader"].delivered == 3
    assert stats.subscribers["reader"].dropped == 2
    assert stats.subscribers["reader"].buffered == 1
    assert stats.subscribers["idle"].delivered == 0
    assert stats.subscribers["idle"].dropped == 3
    assert stats.buffered == 4
    # Events 3 and 4 found both subscribers full; event 5 found room in one.
    assert stats.dropped == 2


async def test_statistics_keep_a_subscriber_after_it_leaves() -> None:
    bus = InMemoryEventBus()

    async with bus.subscribe("gone") as subscription:
        bus.publish(make_event(0))
        await subscription.receive_batch()

    assert bus.statistics().subscribers["gone"].delivered == 1


async def test_many_drops_log_one_rate_limited_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = InMemoryEventBus(buffer_size=1)

    with caplog.at_level(logging.WARNING):
        async with bus.subscribe("stuck"):
            for number in range(500):
                bus.publish(make_event(number))

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "stuck" in warnings[0].getMessage()
    assert "dropped" in warnings[0].getMessage()


def test_buffer_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="buffer_size"):
        InMemoryEventBus(buffer_size=0)


async def test_batch_size_must_be_positive() -> None:
    bus = InMemoryEventBus()

    with pytest.raises(ValueError, match="batch_size"):
        async with bus.subscribe("s", batch_size=0):
            pass  # pragma: no cover
