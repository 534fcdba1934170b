"""The in-memory event bus, on Trio memory channels.

``publish`` puts the event into each subscriber's own bounded channel with
``send_nowait``: a full channel drops that subscriber's copy (counted), so a
slow subscriber never blocks the request path or the other subscribers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Self

import attrs
import trio

from ._bus import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_FLUSH_INTERVAL_SECONDS,
    BusStatistics,
    DropWarning,
    EventBus,
    SubscriberStatistics,
    Subscription,
    receive_batch_from,
)
from ._event import Event

# Captured bodies a subscriber may have waiting, whatever the event count:
# with bodies of up to 4 MiB each, a count alone would let a stuck sink hold
# gigabytes before anything is dropped.
DEFAULT_MAX_BUFFERED_BYTES = 256 * 1024 * 1024

logger = logging.getLogger(__name__)


@attrs.define(eq=False)
class _MemorySubscription(Subscription):
    name: str
    _send: trio.MemorySendChannel[Event]
    _receive: trio.MemoryReceiveChannel[Event]
    _batch_size: int
    _flush_interval: float
    _drops: DropWarning
    _max_bytes: int
    delivered: int = 0
    dropped: int = 0
    _bytes: int = 0
    _waiting: int = 0
    # While a batch gathers: set once it is full, or the bus is closed.
    _filled: trio.Event | None = None

    def offer(self, event: Event) -> bool:
        size = event.captured_bytes()
        # Past the byte budget only when something already waits: a single
        # event larger than the budget still gets through an empty buffer.
        over_budget = self._bytes > 0 and self._bytes + size > self._max_bytes
        try:
            if over_budget:
                raise trio.WouldBlock
            self._send.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped += 1
            self._drops.count()
            return False
        self._bytes += size
        self._waiting += 1
        if self._filled is not None and self._waiting >= self._batch_size:
            self._filled.set()
        return True

    def end(self) -> None:
        self._send.close()
        if self._filled is not None:
            self._filled.set()

    @property
    def buffered(self) -> int:
        return self._receive.statistics().current_buffer_used

    async def receive_batch(self) -> Sequence[Event]:
        if self._flush_interval > 0:
            batch = await self._gather()
        else:
            batch = await receive_batch_from(self._receive, self._batch_size, 0)
        self._waiting -= len(batch)
        self.delivered += len(batch)
        self._bytes -= sum(event.captured_bytes() for event in batch)
        return batch

    async def _gather(self) -> list[Event]:
        """Wait for an event, then for a full batch or the flush interval.

        The subscriber wakes once per batch, not once per event: under load
        that is one task switch and one deadline less per request for the
        event loop that also carries the traffic.
        """
        batch = [await self._receive.receive()]
        if self._waiting < self._batch_size:
            self._filled = trio.Event()
            try:
                with trio.move_on_after(self._flush_interval):
                    await self._filled.wait()
            except BaseException:
                # Cancelled: the event in hand is lost with the subscriber.
                self._waiting -= 1
                raise
            finally:
                self._filled = None
        while len(batch) < self._batch_size:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return batch


class InMemoryEventBus(EventBus):
    """An event bus inside one process, fanning out over memory channels.

    Args:
        buffer_size: how many events each subscriber may have waiting; beyond
            that its new events are dropped and counted.
        max_buffered_bytes: how many bytes of captured bodies each subscriber
            may have waiting; beyond that, too, new events are dropped.
    """

    def __init__(
        self,
        buffer_size: int = 1000,
        *,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    ) -> None:
        if buffer_size <= 0:
            msg = f"buffer_size must be > 0, got {buffer_size!r}"
            raise ValueError(msg)
        if max_buffered_bytes <= 0:
            msg = f"max_buffered_bytes must be > 0, got {max_buffered_bytes!r}"
            raise ValueError(msg)
        self._buffer_size = buffer_size
        self._max_bytes = max_buffered_bytes
        self._subscriptions: list[_MemorySubscription] = []
        self._closed = False
        self._published = 0
        self._dropped = 0
        self._retired: dict[str, SubscriberStatistics] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def publish(self, event: Event) -> None:
        """Offer ``event`` to every subscriber; see :meth:`EventBus.publish`."""
        if self._closed:
            self._dropped += 1
            return
        self._published += 1
        taken = False
        for subscription in self._subscriptions:
            taken = subscription.offer(event) or taken
        if self._subscriptions and not taken:
            # Every subscriber was full: not even one copy of this event exists.
            self._dropped += 1

    @asynccontextmanager
    async def subscribe(
        self,
        name: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_SECONDS,
        buffer_size: int | None = None,
        max_buffered_bytes: int | None = None,
    ) -> AsyncIterator[Subscription]:
        """Subscribe to every event published from now on.

        Leaving the block unsubscribes; what was still waiting is discarded.
        ``buffer_size`` and ``max_buffered_bytes``, when given, replace the
        bus's limits for this subscriber alone (a smaller buffer for a
        subscriber that may fall behind, such as a live viewer).
        """
        if batch_size <= 0:
            msg = f"batch_size must be > 0, got {batch_size!r}"
            raise ValueError(msg)
        if buffer_size is not None and buffer_size <= 0:
            msg = f"buffer_size must be > 0, got {buffer_size!r}"
            raise ValueError(msg)
        if max_buffered_bytes is not None and max_buffered_bytes <= 0:
            msg = f"max_buffered_bytes must be > 0, got {max_buffered_bytes!r}"
            raise ValueError(msg)
        send, receive = trio.open_memory_channel[Event](
            self._buffer_size if buffer_size is None else buffer_size
        )
        subscription = _MemorySubscription(
            name,
            send,
            receive,
            batch_size,
            flush_interval,
            DropWarning(f"subscriber {name!r} is too slow"),
            self._max_bytes if max_buffered_bytes is None else max_buffered_bytes,
        )
        if self._closed:
            send.close()
        self._subscriptions.append(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.remove(subscription)
            self._retired[name] = self._statistics_of(subscription)
            send.close()
            receive.close()

    def close(self) -> None:
        """Stop taking events; subscribers end after receiving what waits."""
        self._closed = True
        for subscription in self._subscriptions:
            subscription.end()

    def statistics(self) -> BusStatistics:
        """Return the counters of the bus and of each subscriber."""
        subscribers = dict(self._retired)
        for subscription in self._subscriptions:
            subscribers[subscription.name] = self._statistics_of(subscription)
        return BusStatistics(
            published=self._published,
            dropped=self._dropped,
            buffered=sum(s.buffered for s in self._subscriptions),
            subscribers=subscribers,
        )

    @staticmethod
    def _statistics_of(subscription: _MemorySubscription) -> SubscriberStatistics:
        return SubscriberStatistics(
            delivered=subscription.delivered,
            dropped=subscription.dropped,
            buffered=subscription.buffered,
        )
