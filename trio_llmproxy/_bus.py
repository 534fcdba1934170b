"""The event bus interface, shared by the in-memory and Redis buses.

A bus takes events from the request path with :meth:`EventBus.publish`, which
never blocks and never raises, and hands them to subscribers in batches. A
subscriber acknowledges a batch once its sink has it; buses that can
redeliver (Redis) use that to deliver at least once.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Self

import attrs
import trio

from ._event import Event

DEFAULT_BATCH_SIZE = 100
# How long a subscriber waits for more events to fill a batch once it holds
# one; 0 delivers whatever is there at once, which keeps the file log current.
DEFAULT_FLUSH_INTERVAL_SECONDS = 0.0
DROP_WARNING_INTERVAL_SECONDS = 10.0

logger = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class SubscriberStatistics:
    """Counters of one subscriber."""

    delivered: int
    dropped: int
    buffered: int


@attrs.frozen(kw_only=True)
class BusStatistics:
    """A snapshot of a bus's counters.

    ``dropped`` counts events no subscriber could take because the bus's own
    buffer was full (or the bus was closed); a subscriber's own losses are in
    ``subscribers``.
    """

    published: int
    dropped: int
    buffered: int
    subscribers: Mapping[str, SubscriberStatistics]


class Subscription(abc.ABC):
    """A subscriber's view of the bus: batches of events, then acknowledgements.

    Iterate it (``async for batch in subscription``) to receive batches; the
    iteration ends once the bus is closed and everything published before is
    delivered. Call :meth:`ack` when a batch is safely stored. Or iterate
    :meth:`events` to receive one event at a time, acknowledged for you.
    """

    @abc.abstractmethod
    async def receive_batch(self) -> Sequence[Event]:
        """Wait for the next non-empty batch.

        Raises:
            trio.EndOfChannel: the bus is closed and this subscriber has had
                every event published before.
        """

    async def ack(self, batch: Sequence[Event]) -> None:  # noqa: B027
        """Acknowledge ``batch`` (or the part of it a sink accepted).

        Buses that cannot redeliver need not override this.
        """

    # An iterator object rather than an async generator: a loop may ``break``
    # out of it without leaving a generator for the garbage collector (which
    # Trio warns about).
    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Sequence[Event]:
        try:
            return await self.receive_batch()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def events(self) -> AsyncIterator[Event]:
        """Return an async iterator of single events, in order, until the end.

        Each batch is acknowledged once the loop asks for the event after its
        last one, so on a bus that redelivers, an event whose loop body did
        not finish is handed out again. Breaking out of the loop is fine.
        """
        return _Events(self)


@attrs.define
class _Events:
    """What :meth:`Subscription.events` returns: the batches, one event at a time."""

    _subscription: Subscription
    _batch: Sequence[Event] = ()
    _next: int = 0

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        if self._next == len(self._batch):
            done, self._batch, self._next = self._batch, (), 0
            if done:
                await self._subscription.ack(done)
            # StopAsyncIteration, once the subscription ends, ends this too.
            self._batch = await self._subscription.__anext__()
        event = self._batch[self._next]
        self._next += 1
        return event


class EventBus(abc.ABC):
    """Where the proxy publishes events and subscribers receive them.

    A bus is an async context manager: entering it starts whatever background
    tasks it needs, in a nursery it owns; :meth:`close` ends publishing and
    lets subscribers drain what is left; leaving it waits for that.
    """

    @abc.abstractmethod
    def publish(self, event: Event) -> None:
        """Hand ``event`` to the bus without blocking; never raises.

        When the bus cannot take the event (its buffer is full, or it is
        closed) the event is dropped and counted.
        """

    @abc.abstractmethod
    def subscribe(
        self,
        name: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_SECONDS,
    ) -> AbstractAsyncContextManager[Subscription]:
        """Open a subscription named ``name`` that receives every event.

        Batches hold at most ``batch_size`` events, and a batch waits at most
        ``flush_interval`` seconds for more events once it holds one.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Stop taking events; subscriptions end once they have the rest."""

    @abc.abstractmethod
    def statistics(self) -> BusStatistics:
        """Return a snapshot of the bus's counters."""

    @abc.abstractmethod
    async def __aenter__(self) -> EventBus: ...

    @abc.abstractmethod
    async def __aexit__(self, *exc_info: object) -> None: ...


@attrs.define
class DropWarning:
    """Logs dropped events at most once per interval, with the count since."""

    what: str
    interval_seconds: float = DROP_WARNING_INTERVAL_SECONDS
    _pending: int = 0
    _last_logged: float = -1e18

    def count(self, dropped: int = 1) -> None:
        """Count ``dropped`` events and log a warning if one is due."""
        self._pending += dropped
        now = time.monotonic()
        if now - self._last_logged >= self.interval_seconds:
            logger.warning(
                "%s: dropped %d event(s) in the last %.0f s",
                self.what,
                self._pending,
                self.interval_seconds,
            )
            self._pending = 0
            self._last_logged = now


async def receive_batch_from(
    channel: trio.MemoryReceiveChannel[Event], batch_size: int, flush_interval: float
) -> list[Event]:
    """Receive one batch from ``channel``: what is there, waiting for more.

    Raises:
        trio.EndOfChannel: the channel is closed and empty.
    """
    batch = [await channel.receive()]
    deadline = trio.current_time() + flush_interval
    while len(batch) < batch_size:
        try:
            batch.append(channel.receive_nowait())
            continue
        except trio.WouldBlock:
            if flush_interval <= 0:
                break
        except trio.EndOfChannel:
            break
        with trio.move_on_at(deadline):
            try:
                batch.append(await channel.receive())
                continue
            except trio.EndOfChannel:
                break
        break
    return batch
