"""Dispatchers: the loop that moves batches from a subscription into a sink.

A batch is retried with exponential backoff while the sink says the failure
is transient, and only the part the sink did not take is sent again. What
got through is acknowledged; a permanent refusal is acknowledged too (it is
logged and counted, since retrying cannot help); a batch still failing after
the last attempt is not acknowledged, so a bus that can redeliver (Redis)
hands it out again later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import attrs
import tenacity
import trio

from ._bus import Subscription
from ._config import DEFAULT_STREAM, check_redis_url, non_negative, positive
from ._errors import ConfigError, SinkError
from ._event import Event
from ._redact import redact_url
from ._sinks import Sink

logger = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How a dispatcher retries a batch: attempts and exponential backoff."""

    attempts: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    initial_backoff_seconds: float = attrs.field(
        default=0.5, validator=attrs.validators.gt(0)
    )
    max_backoff_seconds: float = attrs.field(
        default=30.0, validator=attrs.validators.gt(0)
    )


@attrs.define
class DispatchStatistics:
    """Counters of one dispatcher (mutable; read them, do not write)."""

    delivered: int = 0
    rejected: int = 0
    failed: int = 0
    retries: int = 0


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, SinkError) and not exc.permanent


@attrs.define
class Dispatcher:
    """Delivers a subscription's batches to a sink until the bus closes.

    Set :attr:`stopping` to cut backoff sleeps short: the batch at hand then
    gets one more attempt and no further retries.
    """

    sink: Sink
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    stopping: trio.Event = attrs.field(factory=trio.Event)
    stats: DispatchStatistics = attrs.field(factory=DispatchStatistics)

    async def serve(self, subscription: Subscription) -> None:
        """Deliver batches until the subscription ends; never returns early."""
        async for batch in subscription:
            accepted = await self.deliver(batch)
            if accepted:
                await subscription.ack(batch[:accepted])

    async def deliver(self, batch: Sequence[Event]) -> int:
        """Deliver one batch with retries; return how many to acknowledge."""
        done = 0
        try:
            async for attempt in self._retrying():
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self.stats.retries += 1
                    try:
                        await self._attempt(batch[done:])
                    except SinkError as exc:
                        # Only the events the sink did not take are sent again.
                        done += exc.delivered
                        raise
                    done = len(batch)
        except SinkError as exc:
            self.stats.delivered += done
            return self._give_up(batch, done, exc)
        self.stats.delivered += done
        return done

    async def _attempt(self, events: Sequence[Event]) -> None:
        try:
            await self.sink.deliver(events)
        except SinkError:
            raise
        except Exception as exc:
            # A bug in a user's sink: logged with its traceback, then retried
            # like any transient failure.
            logger.exception("sink %r raised", self.sink.name)
            msg = f"sink {self.sink.name!r} raised {exc!r}"
            raise SinkError(msg) from exc

    def _give_up(self, batch: Sequence[Event], done: int, exc: SinkError) -> int:
        rest = len(batch) - done
        if exc.permanent:
            self.stats.rejected += rest
            logger.error(
                "sink %r refused %d event(s) for good: %s", self.sink.name, rest, exc
            )
            return len(batch)
        self.stats.failed += rest
        logger.error(
            "sink %r failed %d event(s) after %d attempt(s): %s",
            self.sink.name,
            rest,
            self.retry.attempts,
            exc,
        )
        return done

    def _retrying(self) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(_transient),
            stop=tenacity.stop_any(
                tenacity.stop_after_attempt(self.retry.attempts),
                _StopWhenSet(self.stopping),
            ),
            wait=tenacity.wait_exponential(
                multiplier=self.retry.initial_backoff_seconds,
                max=self.retry.max_backoff_seconds,
            ),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )

    async def _sleep(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self.stopping.wait()

    def _log_retry(self, retry_state: tenacity.RetryCallState) -> None:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        logger.warning(
            "sink %r: attempt %d failed (%s); retrying in %.2f s",
            self.sink.name,
            retry_state.attempt_number,
            error,
            retry_state.upcoming_sleep,
        )


class _StopWhenSet(tenacity.stop.stop_base):
    """Stops retrying once ``event`` is set (shutdown has begun)."""

    def __init__(self, event: trio.Event) -> None:
        self._event = event

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self._event.is_set()


def _redis_url(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    check_redis_url(value)


def _not_empty(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value == "":
        msg = f"{attribute.name} must not be empty"
        raise ConfigError(msg)


@attrs.frozen(kw_only=True)
class DispatcherConfig:
    """Everything :func:`serve_dispatcher` needs; times are in seconds.

    ``consumer_group`` defaults to the sink's name (``file``, ``http``...), so
    that each kind of dispatcher is one group; ``consumer_name`` defaults to
    one unique to the process. Give a stable ``consumer_name`` to let a
    restarted dispatcher take up the entries it left pending at once, rather
    than after ``claim_idle_seconds``.

    Raises:
        ConfigError: a field is out of range; the message names it.
    """

    redis_url: str = attrs.field(
        default="redis://127.0.0.1:6379/0", validator=_redis_url, repr=redact_url
    )
    stream: str = attrs.field(default=DEFAULT_STREAM, validator=_not_empty)
    consumer_group: str | None = attrs.field(default=None, validator=_not_empty)
    consumer_name: str | None = attrs.field(default=None, validator=_not_empty)
    batch_size: int = attrs.field(default=100, validator=positive)
    flush_interval: float = attrs.field(default=1.0, validator=non_negative)
    claim_idle_seconds: float = attrs.field(default=60.0, validator=positive)
    shutdown_timeout: float = attrs.field(default=30.0, validator=non_negative)
    block_seconds: float = attrs.field(default=1.0, validator=positive)
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)


@attrs.define
class _DispatchRun:
    """One run of :func:`serve_dispatcher`, and how it stops.

    Stopping cancels a read in progress (whatever it fetched stays pending in
    the group), cuts the dispatcher's backoff short and gives the batch in
    hand ``shutdown_timeout`` seconds to be delivered and acknowledged.
    """

    dispatcher: Dispatcher
    shutdown_timeout: float
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    stopping: bool = False
    running: bool = False
    in_hand: int = 0
    _read_scope: trio.CancelScope | None = None

    async def stop_when_set(self, event: trio.Event) -> None:
        await event.wait()
        self.stopping = True
        self.dispatcher.stopping.set()
        if not self.running:
            # Still connecting or subscribing: there is nothing to finish.
            self.scope.cancel()
            return
        if self._read_scope is not None:
            self._read_scope.cancel()
        self.scope.deadline = trio.current_time() + self.shutdown_timeout

    async def run(self, subscription: Subscription) -> None:
        self.running = True
        while not self.stopping:
            with trio.CancelScope() as self._read_scope:
                try:
                    batch = await subscription.receive_batch()
                except trio.EndOfChannel:
                    return
            self._read_scope = None
            if self.stopping:
                # The read was cut short, or came back as stopping began:
                # what it fetched stays pending, to be claimed later.
                return
            self.in_hand = len(batch)
            accepted = await self.dispatcher.deliver(batch)
            if accepted:
                await subscription.ack(batch[:accepted])
            self.in_hand = 0


async def serve_dispatcher(
    config: DispatcherConfig,
    sink: Sink,
    *,
    stopping: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Deliver the events of the Redis stream to ``sink`` until ``stopping``.

    Reads as a consumer of the group ``config.consumer_group`` (by default
    the sink's name), delivering each batch with retries and acknowledging
    what the sink took. While Redis is unavailable it waits and reconnects.
    ``sink`` must already be open (entered); this function neither opens nor
    closes it.

    Calls ``task_status.started()`` once subscribed (the group exists). When
    ``stopping`` is set it stops reading, cuts a backoff sleep short, makes
    one last attempt at the batch in hand and acknowledges what got through,
    all within ``config.shutdown_timeout``; the rest stays pending in the
    group, for this or another consumer to take later. Then it returns
    normally. If ``stopping`` is set before the subscription is open, it
    returns at once without calling ``task_status.started()``.
    """
    group = config.consumer_group or sink.name
    # Imported here: coredis is needed only once a dispatcher runs.
    from ._redis_bus import RedisEventBus

    bus = RedisEventBus(
        config.redis_url,
        stream=config.stream,
        claim_idle_seconds=config.claim_idle_seconds,
        consumer_name=config.consumer_name,
        block_seconds=config.block_seconds,
    )
    dispatcher = Dispatcher(sink, retry=config.retry)
    run = _DispatchRun(dispatcher, config.shutdown_timeout)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run.stop_when_set, stopping)
        with run.scope:
            async with (
                bus,
                bus.subscribe(
                    group,
                    batch_size=config.batch_size,
                    flush_interval=config.flush_interval,
                ) as subscription,
            ):
                logger.info(
                    "dispatching stream %r of %s to sink %r as group %r",
                    config.stream,
                    redact_url(config.redis_url),
                    sink.name,
                    group,
                )
                task_status.started()
                await run.run(subscription)
        nursery.cancel_scope.cancel()
    _log_end(dispatcher, run)


def _log_end(dispatcher: Dispatcher, run: _DispatchRun) -> None:
    if run.scope.cancelled_caught and run.in_hand:
        logger.warning(
            "sink %r: shutdown timeout passed with %d event(s) in hand; they "
            "stay pending in the group",
            dispatcher.sink.name,
            run.in_hand,
        )
    stats = dispatcher.stats
    logger.info(
        "dispatcher for sink %r stopped: %d delivered, %d rejected, %d failed, "
        "%d retries",
        dispatcher.sink.name,
        stats.delivered,
        stats.rejected,
        stats.failed,
        stats.retries,
    )
