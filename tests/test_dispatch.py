"""Tests for dispatching: retries with a fake sink, and serve_dispatcher on Redis.

Sinks here are hand-written fakes of the real interface. serve_dispatcher
runs against the session's real redis-server on loopback, under a
``trio.fail_after`` hang guard, with small waits so that it stays fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import attrs
import pytest
import trio
from events import make_event
from redis_support import (  # noqa: F401
    ignore_coredis_stream_leak,
    redis_server_fixture,
    redis_url_fixture,
    unreachable_redis_url_fixture,
)

from trio_llmproxy._dispatch import (
    Dispatcher,
    DispatcherConfig,
    RetryPolicy,
    serve_dispatcher,
)
from trio_llmproxy._errors import ConfigError, SinkError
from trio_llmproxy._event import Event
from trio_llmproxy._redis_bus import RedisEventBus
from trio_llmproxy._sinks import Sink

pytestmark = ignore_coredis_stream_leak

HANG_GUARD_SECONDS = 15
STREAM = "test-events"
FAST_RETRY = RetryPolicy(
    attempts=3, initial_backoff_seconds=0.01, max_backoff_seconds=0.01
)
# Long enough that a test which waits for one has failed.
SLOW_RETRY = RetryPolicy(attempts=5, initial_backoff_seconds=60, max_backoff_seconds=60)


@attrs.define
class FakeSink(Sink):
    """Records every attempt; fails as its script says, then accepts.

    Each entry of ``failures`` is the error raised by one attempt, in turn;
    once they run out, every attempt succeeds.
    """

    name: str = "fake"
    failures: list[SinkError] = attrs.field(factory=list)
    hang: bool = False
    attempts: list[list[Event]] = attrs.field(factory=list)
    delivered: list[Event] = attrs.field(factory=list)
    attempted: trio.Event = attrs.field(factory=trio.Event)
    _progress: trio.Event = attrs.field(factory=trio.Event)

    async def deliver(self, events: Sequence[Event]) -> None:
        self.attempts.append(list(events))
        self.attempted.set()
        if self.hang:
            await trio.sleep_forever()
        if self.failures:
            raise self.failures.pop(0)
        self.delivered.extend(events)
        self._progress.set()
        self._progress = trio.Event()

    async def wait_delivered(self, count: int) -> None:
        """Wait until at least ``count`` events were delivered."""
        while len(self.delivered) < count:
            await self._progress.wait()


def config(url: str, **options: object) -> DispatcherConfig:
    settings: dict[str, object] = {
        "redis_url": url,
        "stream": STREAM,
        "batch_size": 10,
        "flush_interval": 0.0,
        "block_seconds": 0.1,
        "retry": FAST_RETRY,
    }
    settings.update(options)
    return DispatcherConfig(**settings)  # type: ignore[arg-type]


async def publish(url: str, count: int) -> None:
    async with RedisEventBus(url, stream=STREAM) as bus:
        for number in range(count):
            bus.publish(make_event(number))


async def pending(url: str, group: str) -> int:
    async with RedisEventBus(url, stream=STREAM) as bus:
        lag = await bus.lag()
    return lag.groups[group].pending


async def test_a_partial_delivery_retries_only_the_rest() -> None:
    sink = FakeSink(failures=[SinkError("backend full", delivered=2)])
    batch = [make_event(n) for n in range(5)]

    accepted = await Dispatcher(sink, retry=FAST_RETRY).deliver(batch)

    assert accepted == 5
    assert sink.attempts == [batch, batch[2:]]
    assert sink.delivered == batch[2:]


async def test_serve_dispatcher_delivers_and_acknowledges_every_event(
    redis_url: str,
) -> None:
    sink = FakeSink()
    stopping = trio.Event()

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(serve_dispatcher, config(redis_url), sink, stopping=stopping)
            )
            await publish(redis_url, 25)
            await sink.wait_delivered(25)
            stopping.set()
        left = await pending(redis_url, "fake")

    assert sorted(e.event_id for e in sink.delivered) == sorted(
        f"e{n}" for n in range(25)
    )
    assert left == 0


async def test_the_consumer_group_defaults_to_the_sink_name(redis_url: str) -> None:
    stopping = trio.Event()

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_dispatcher,
                    config(redis_url),
                    FakeSink(name="webhook"),
                    stopping=stopping,
                )
            )
            stopping.set()
        async with RedisEventBus(redis_url, stream=STREAM) as bus:
            lag = await bus.lag()

    assert list(lag.groups) == ["webhook"]


async def test_stopping_during_a_backoff_returns_promptly_and_leaves_entries_pending(
    redis_url: str,
) -> None:
    sink = FakeSink(failures=[SinkError("down")] * 5)
    stopping = trio.Event()

    with trio.fail_after(HANG_GUARD_SECONDS):
        await publish(redis_url, 5)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_dispatcher,
                    config(redis_url, retry=SLOW_RETRY),
                    sink,
                    stopping=stopping,
                )
            )
            await sink.attempted.wait()
            started = trio.current_time()
            stopping.set()
        elapsed = trio.current_time() - started
        left = await pending(redis_url, "fake")

    assert elapsed < 2
    assert len(sink.attempts) == 2  # the first, and one last attempt
    assert left == 5


async def test_stopping_while_waiting_for_entries_returns_promptly(
    redis_url: str,
) -> None:
    stopping = trio.Event()

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_dispatcher,
                    config(redis_url, block_seconds=30),
                    FakeSink(),
                    stopping=stopping,
                )
            )
            await trio.sleep(0.2)  # inside the blocking read by now
            started = trio.current_time()
            stopping.set()
        elapsed = trio.current_time() - started

    assert elapsed < 2


async def test_the_shutdown_timeout_bounds_the_last_delivery(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    sink = FakeSink(hang=True)
    stopping = trio.Event()

    with trio.fail_after(HANG_GUARD_SECONDS):
        await publish(redis_url, 5)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_dispatcher,
                    config(redis_url, shutdown_timeout=0.3),
                    sink,
                    stopping=stopping,
                )
            )
            await sink.attempted.wait()
            started = trio.current_time()
            stopping.set()
        elapsed = trio.current_time() - started
        left = await pending(redis_url, "fake")

    assert 0.3 <= elapsed < 2
    assert left == 5
    assert any("5 event(s) in hand" in r.getMessage() for r in caplog.records)


async def test_a_batch_that_failed_every_attempt_is_claimed_again_later(
    redis_url: str,
) -> None:
    sink = FakeSink(failures=[SinkError("down")] * 3)
    stopping = trio.Event()
    once = RetryPolicy(attempts=1, initial_backoff_seconds=0.01)

    with trio.fail_after(HANG_GUARD_SECONDS):
        await publish(redis_url, 3)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_dispatcher,
                    config(redis_url, retry=once, claim_idle_seconds=0.2),
                    sink,
                    stopping=stopping,
                )
            )
            await sink.wait_delivered(3)
            stopping.set()
        left = await pending(redis_url, "fake")

    assert len(sink.attempts) == 4
    assert [e.event_id for e in sink.delivered] == ["e0", "e1", "e2"]
    assert left == 0


async def test_stopping_before_redis_answers_returns_at_once(
    unreachable_redis_url: str,
) -> None:
    stopping = trio.Event()

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    serve_dispatcher,
                    config(unreachable_redis_url),
                    FakeSink(),
                    stopping=stopping,
                )
            )
            await trio.sleep(0.3)
            started = trio.current_time()
            stopping.set()
        elapsed = trio.current_time() - started

    assert elapsed < 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("redis_url", "http://127.0.0.1:6379"),
        ("stream", ""),
        ("consumer_group", ""),
        ("consumer_name", ""),
        ("batch_size", 0),
        ("flush_interval", -1.0),
        ("claim_idle_seconds", 0.0),
        ("shutdown_timeout", -1.0),
        ("block_seconds", 0.0),
    ],
)
def test_dispatcher_config_rejects_a_bad_value_naming_it(
    field: str, value: object
) -> None:
    with pytest.raises(ConfigError) as caught:
        DispatcherConfig(**{field: value})  # type: ignore[arg-type]

    assert field.split("_")[0].lower() in str(caught.value).lower()


def test_dispatcher_config_repr_hides_the_redis_password() -> None:
    settings = DispatcherConfig(redis_url="redis://:s3cret@127.0.0.1:6379/0")

    assert "s3cret" not in repr(settings)
