"""The Redis event bus, on one Redis Stream read through consumer groups.

Stream entry format
-------------------

Every event becomes one entry of the stream (``llm-proxy-events`` unless
configured), with an ID chosen by Redis and exactly one field:

``event``
    The event's JSON object in UTF-8, byte for byte what
    :meth:`Event.to_json` returns (one line of the JSONL event log, without
    the newline). Its ``schema_version`` field versions the format, and its
    ``event_id`` stays the same through every hop, so a sink can drop the
    duplicates that at-least-once delivery allows.

Writing
-------

:meth:`RedisEventBus.publish` puts the event into a bounded memory channel
and returns; a full channel drops the event (counted, with a rate-limited
warning). A writer task owned by the bus takes up to
:data:`PIPELINE_BATCH_SIZE` events at a time, renders them in a worker thread
and sends them as one pipeline of ``XADD stream MAXLEN ~ maxlen * event
JSON``. While Redis is unreachable the writer keeps the batch in hand (the
channel keeps the rest), retries with capped exponential backoff and writes
them once Redis answers again. When a pipeline breaks half-way there is no
telling which entries made it, so the whole batch is sent again: that may
duplicate entries, never lose them.

Trimming is approximate and by length only, so it can delete entries that a
consumer group has not read or acknowledged yet when that group lags more
than ``maxlen`` entries behind (Redis 7 has no trimming that waits for
groups). Such entries are lost for that group; a consumer that meets them
logs how many. :meth:`RedisEventBus.lag` shows the stream length and each
group's pending count and lag, so operators can see it coming.

Reading
-------

Each subscription name is a consumer group; each subscription is one consumer
of it. A group is created at ID ``0`` with ``MKSTREAM``: a dispatcher that
starts after the proxy, or that recreates its group after Redis lost it,
still gets every entry the stream holds, rather than only those written after
it arrived. The price is that a brand-new group starts with the retained
history (at most ``maxlen`` entries); to start a new group at the tail
instead, create it beforehand with ``XGROUP CREATE stream group $ MKSTREAM``
(an existing group is always kept as it is).

:meth:`Subscription.receive_batch` first drains the entries already pending
for its consumer (left by an earlier run of a consumer of that name), then
claims entries that other consumers left pending for longer than
``claim_idle_seconds`` (``XAUTOCLAIM``), then reads new entries with a
blocking ``XREADGROUP``. An entry is acknowledged (``XACK``) when
:meth:`Subscription.ack` is called for its event, so a batch that failed
stays pending and is claimed again once it has been idle long enough: pick a
``claim_idle_seconds`` longer than the longest delivery with its retries, or
a slow delivery is duplicated by another consumer. Entries that are not
events are logged, counted as dropped and acknowledged, so that they cannot
come back forever. When the group is gone (Redis restarted empty, or was
flushed) the consumer creates it again and carries on. While Redis is
unreachable it backs off and retries; it never raises for that.

Redis 7.0 or later is needed (``XAUTOCLAIM`` and the way ``XCLAIM`` drops
deleted entries).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Final, Self

import attrs
import coredis
import trio
from coredis.exceptions import (
    RedisError,
    ResponseError,
    StreamConsumerGroupError,
    StreamDuplicateConsumerGroupError,
)
from coredis.response.types import StreamEntry, StreamPendingExt
from coredis.retry import NoRetryPolicy
from coredis.tokens import PureToken

from ._bus import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_FLUSH_INTERVAL_SECONDS,
    BusStatistics,
    DropWarning,
    EventBus,
    SubscriberStatistics,
    Subscription,
)
from ._config import DEFAULT_STREAM, check_redis_url, display_url
from ._errors import ConfigError, ProxyError
from ._event import Event
from ._rendering import render_events

DEFAULT_MAXLEN: Final = 100_000
#: The one field of each stream entry; its value is the event's JSON.
ENTRY_FIELD: Final = b"event"
#: Events written to Redis per pipeline (one round trip).
PIPELINE_BATCH_SIZE: Final = 500
RECONNECT_INITIAL_BACKOFF_SECONDS: Final = 0.05
DEFAULT_MAX_BACKOFF_SECONDS: Final = 5.0
# Without it, connecting to a host that silently drops packets hangs for as
# long as the operating system lets a SYN go unanswered (minutes).
CONNECT_TIMEOUT_SECONDS: Final = 5.0
# A reply slower than this (beyond a blocking read's own wait) means the
# connection is dead; a large pipeline on a slow link stays well inside it.
STREAM_TIMEOUT_MARGIN_SECONDS: Final = 30.0

# XAUTOCLAIM's cursor when a scan of the pending entries is complete.
_SCAN_DONE: Final = b"0-0"
# Every failure of talking to Redis that backing off and retrying can cure.
_REDIS_TROUBLE: Final = (RedisError, TimeoutError, OSError)

logger = logging.getLogger(__name__)


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _as_bytes(value: str | bytes) -> bytes:
    # The client does not decode replies, but its types allow either.
    return value.encode() if isinstance(value, str) else value


def _event_of(entry: StreamEntry) -> Event:
    """Parse the event an entry carries.

    Raises:
        ProxyError: the entry has no ``event`` field or it is not an event.
    """
    fields = {_as_bytes(k): v for k, v in (entry.field_values or {}).items()}
    data = fields.get(ENTRY_FIELD)
    if data is None:
        msg = f"no {ENTRY_FIELD.decode()!r} field"
        raise ProxyError(msg)
    return Event.from_json(data)


def _only_holds(group: BaseExceptionGroup[BaseException], exc: BaseException) -> bool:
    """Whether ``group`` (nested or not) holds ``exc`` and nothing else."""
    _, rest = group.split(lambda leaf: leaf is exc)
    return rest is None


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            msg = f"{name} must be > 0, got {value!r}"
            raise ValueError(msg)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _number(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _group_lag(info: Mapping[bytes, Any]) -> GroupLag:
    return GroupLag(
        name=_text(info.get(b"name")),
        consumers=_number(info.get(b"consumers")) or 0,
        pending=_number(info.get(b"pending")) or 0,
        lag=_number(info.get(b"lag")),
        last_delivered_id=_text(info.get(b"last-delivered-id")),
    )


class BusError(ProxyError):
    """The Redis bus could not answer a query (Redis unreachable or refusing)."""

    status = 503
    code = "bus_unavailable"


@attrs.frozen(kw_only=True)
class GroupLag:
    """Where one consumer group stands in the stream.

    ``pending`` counts entries handed to a consumer and not acknowledged yet;
    ``lag`` counts entries not yet handed out (``None`` when Redis cannot
    tell, for instance after entries were trimmed or deleted).
    """

    name: str
    consumers: int
    pending: int
    lag: int | None
    last_delivered_id: str


@attrs.frozen(kw_only=True)
class StreamLag:
    """A snapshot of the stream's length and of each group's backlog."""

    stream: str
    length: int
    groups: Mapping[str, GroupLag]


@attrs.define
class _Reconnect:
    """Capped exponential backoff, with one warning per outage."""

    what: str
    url: str
    max_backoff_seconds: float
    _delay: float = RECONNECT_INITIAL_BACKOFF_SECONDS
    _down: bool = False

    async def failed(self, exc: BaseException) -> None:
        """Log the outage if it is new, then sleep before the next attempt."""
        # Log the text, not the exception: a record (in a memory handler, say)
        # would keep its traceback, and with it dead connections, alive.
        reason = str(exc) or type(exc).__name__
        if not self._down:
            self._down = True
            logger.warning(
                "%s: Redis at %s is unavailable (%s); retrying with backoff",
                self.what,
                self.url,
                reason,
            )
        else:
            logger.debug("%s: Redis still unavailable: %s", self.what, reason)
        await trio.sleep(self._delay)
        self._delay = min(self._delay * 2, self.max_backoff_seconds)

    def succeeded(self) -> None:
        """Note that Redis answered; log it if that ends an outage."""
        if self._down:
            logger.warning("%s: reconnected to Redis at %s", self.what, self.url)
        self._down = False
        self._delay = RECONNECT_INITIAL_BACKOFF_SECONDS


@attrs.define(eq=False)
class _RedisSubscription(Subscription):
    """One consumer of a consumer group; see the module docstring."""

    name: str
    consumer: str
    _client: coredis.Redis[bytes]
    _stream: str
    _batch_size: int
    _flush_interval: float
    _claim_idle_seconds: float
    _block_seconds: float
    _closed: trio.Event
    _reconnect: _Reconnect
    _poison: DropWarning
    delivered: int = 0
    acknowledged: int = 0
    dropped: int = 0
    lost: int = 0
    # The stream entries that carried each event handed out and not yet
    # acknowledged: usually one, more when the writer had to send a batch
    # again. A set, since a claimed entry comes back under the same ID.
    _entry_ids: dict[str, set[bytes]] = attrs.field(factory=dict)
    _draining: bool = True
    _drain_cursor: bytes = b"-"
    _claim_cursor: bytes = _SCAN_DONE
    _next_claim: float = float("-inf")
    _group_missing: bool = False

    @property
    def buffered(self) -> int:
        """Events handed out and not acknowledged yet."""
        return sum(len(ids) for ids in self._entry_ids.values())

    async def ensure_group(self) -> None:
        """Create the group at the start of the stream unless it exists.

        Retries with backoff while Redis is unavailable; never raises for that.
        """
        while True:
            try:
                await self._create_group()
            except _REDIS_TROUBLE as exc:
                await self._reconnect.failed(exc)
                continue
            self._reconnect.succeeded()
            return

    async def receive_batch(self) -> Sequence[Event]:
        """Wait for the next non-empty batch; see the module docstring.

        Raises:
            trio.EndOfChannel: the bus is closed and nothing more is readable
                at once (or Redis is unavailable).
        """
        while True:
            closed = self._closed.is_set()
            try:
                entries = await self._read_entries(block=not closed)
            except StreamConsumerGroupError as exc:
                self._forget_group(exc)
                continue
            except _REDIS_TROUBLE as exc:
                if closed:
                    logger.warning(
                        "consumer %r of group %r: bus closed while Redis is "
                        "unavailable (%s); the rest stays in the stream",
                        self.consumer,
                        self.name,
                        str(exc),
                    )
                    raise trio.EndOfChannel from None
                await self._reconnect.failed(exc)
                continue
            self._reconnect.succeeded()
            if not entries:
                if closed:
                    raise trio.EndOfChannel
                continue
            batch = await self._parse(entries)
            if batch:
                self.delivered += len(batch)
                return batch

    async def ack(self, batch: Sequence[Event]) -> None:
        """Acknowledge the entries of ``batch``; waits out Redis outages.

        Never raises for Redis trouble. When cancelled first, the entries stay
        pending and are delivered again later.
        """
        ids: list[bytes] = []
        for event in batch:
            # The sink has this event, so every entry that carried it is done.
            ids.extend(self._entry_ids.pop(event.event_id, ()))
        if ids:
            await self._acknowledge(ids)
            self.acknowledged += len(ids)

    async def _create_group(self) -> None:
        try:
            await self._client.xgroup_create(
                self._stream, self.name, "0", mkstream=True
            )
        except StreamDuplicateConsumerGroupError:
            return
        logger.info(
            "created consumer group %r on stream %r, from its first entry",
            self.name,
            self._stream,
        )

    def _forget_group(self, exc: BaseException) -> None:
        logger.warning(
            "consumer group %r of stream %r is gone (%s); Redis was probably "
            "restarted empty or flushed: creating it again",
            self.name,
            self._stream,
            str(exc),
        )
        # Everything pending in the old group went with it.
        self._entry_ids.clear()
        self._draining = False
        self._claim_cursor = _SCAN_DONE
        self._group_missing = True

    async def _read_entries(self, *, block: bool) -> list[StreamEntry]:
        if self._group_missing:
            await self._create_group()
            self._group_missing = False
        if self._draining:
            entries = await self._read_own_pending()
            if entries:
                return entries
            self._draining = False
        entries = await self._claim_idle_entries()
        if entries:
            return entries
        return await self._read_new(block=block)

    async def _read_own_pending(self) -> list[StreamEntry]:
        """Take the next page of entries pending for this very consumer.

        ``XCLAIM`` rather than ``XREADGROUP 0`` hands them back, because it
        drops entries that were trimmed meanwhile instead of returning empty
        ones.
        """
        while True:
            reply = await self._client.xpending(
                self._stream,
                self.name,
                self._drain_cursor,
                "+",
                self._batch_size,
                consumer=self.consumer,
            )
            pending = [p for p in reply if isinstance(p, StreamPendingExt)]
            if not pending:
                return []
            self._drain_cursor = b"(" + _as_bytes(pending[-1].identifier)
            ids = [_as_bytes(p.identifier) for p in pending]
            claimed = await self._client.xclaim(
                self._stream, self.name, self.consumer, 0, ids
            )
            entries = [e for e in claimed if isinstance(e, StreamEntry)]
            self._count_trimmed(len(ids) - len(entries))
            if entries:
                return entries

    async def _claim_idle_entries(self) -> list[StreamEntry]:
        """Claim the next entries idle for over claim_idle, from any consumer.

        One scan of the group's pending entries may take several calls; it
        goes on until it finds entries or ends, then rests for a while.
        """
        while trio.current_time() >= self._next_claim:
            reply = await self._client.xautoclaim(
                self._stream,
                self.name,
                self.consumer,
                max(1, round(self._claim_idle_seconds * 1000)),
                self._claim_cursor,
                count=self._batch_size,
            )
            self._claim_cursor = reply[0]
            if self._claim_cursor == _SCAN_DONE:
                # Entries become claimable claim_idle after their last
                # delivery; scanning twice per period finds them at most half
                # a period late.
                self._next_claim = trio.current_time() + self._claim_idle_seconds / 2
            if len(reply) > 2:
                self._count_trimmed(len(reply[2]))
            entries = [e for e in reply[1] if isinstance(e, StreamEntry)]
            if entries:
                logger.info(
                    "consumer %r of group %r claimed %d entr(y/ies) idle for "
                    "over %.1f s",
                    self.consumer,
                    self.name,
                    len(entries),
                    self._claim_idle_seconds,
                )
                return entries
        return []

    async def _read_new(self, *, block: bool) -> list[StreamEntry]:
        entries = await self._xreadgroup(
            self._batch_size, self._block_seconds if block else None
        )
        if not entries or self._flush_interval <= 0:
            return entries
        deadline = trio.current_time() + self._flush_interval
        while len(entries) < self._batch_size:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            try:
                more = await self._xreadgroup(
                    self._batch_size - len(entries), remaining
                )
            except _REDIS_TROUBLE:
                # What was read already is ours (pending): hand it out now.
                break
            if not more:
                break
            entries.extend(more)
        return entries

    async def _xreadgroup(self, count: int, wait: float | None) -> list[StreamEntry]:
        # BLOCK 0 would wait forever: the shortest real wait is 1 ms.
        block = None if wait is None else max(1, round(wait * 1000))
        reply = await self._client.xreadgroup(
            self.name, self.consumer, {self._stream: ">"}, count=count, block=block
        )
        entries: list[StreamEntry] = []
        for stream_entries in (reply or {}).values():
            entries.extend(stream_entries)
        return entries

    async def _parse(self, entries: Iterable[StreamEntry]) -> list[Event]:
        events: list[Event] = []
        poison: list[bytes] = []
        for entry in entries:
            entry_id = _as_bytes(entry.identifier)
            try:
                event = _event_of(entry)
            except ProxyError as exc:
                logger.debug(
                    "stream %r entry %s is not an event: %s",
                    self._stream,
                    entry_id.decode(),
                    str(exc),
                )
                poison.append(entry_id)
                continue
            self._entry_ids.setdefault(event.event_id, set()).add(entry_id)
            events.append(event)
        if poison:
            self.dropped += len(poison)
            self._poison.count(len(poison))
            # Acknowledged, or they would be claimed and fail again forever.
            await self._acknowledge(poison)
        return events

    async def _acknowledge(self, ids: Sequence[bytes]) -> None:
        while True:
            try:
                await self._client.xack(self._stream, self.name, ids)
            except StreamConsumerGroupError:
                # The group is gone, and its pending entries with it.
                return
            except _REDIS_TROUBLE as exc:
                await self._reconnect.failed(exc)
                continue
            self._reconnect.succeeded()
            return

    def _count_trimmed(self, count: int) -> None:
        if count <= 0:
            return
        self.lost += count
        logger.warning(
            "group %r: %d pending entr(y/ies) of stream %r were trimmed or "
            "deleted before delivery; raise the stream's maxlen or add consumers",
            self.name,
            count,
            self._stream,
        )

    def statistics(self) -> SubscriberStatistics:
        """Return this subscription's counters."""
        return SubscriberStatistics(
            delivered=self.delivered, dropped=self.dropped, buffered=self.buffered
        )


class RedisEventBus(EventBus):
    """An event bus on a Redis Stream, shared by processes and hosts.

    See the module docstring for the stream's format and the delivery rules.
    Use it as an async context manager; it opens its connection pool and
    writer task on entry::

        async with RedisEventBus("redis://127.0.0.1:6379/0") as bus:
            bus.publish(event)
            ...
            bus.close()
        # leaving waits until the writer has written what was buffered; put a
        # deadline around it (a cancel scope) to bound that wait.

    Args:
        url: ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL, with an
            optional password and database number.
        stream: the stream's key.
        maxlen: approximate number of entries the stream keeps.
        buffer_size: events that may wait in this process for the writer
            (during a Redis outage, say); beyond it new events are dropped.
        claim_idle_seconds: how long an entry stays pending with a consumer
            before another consumer of the group may claim it.
        consumer_name: this process's consumer name in every group it reads;
            by default each subscription gets a unique one
            (``host-pid-random``). Give a stable name to let a restarted
            dispatcher take up its own pending entries at once.
        block_seconds: how long one blocking read waits for new entries.
        max_backoff_seconds: cap of the reconnection backoff.

    Raises:
        ConfigError: ``url`` is not a usable Redis URL.
        ValueError: a number is out of range.
    """

    def __init__(
        self,
        url: str,
        *,
        stream: str = DEFAULT_STREAM,
        maxlen: int = DEFAULT_MAXLEN,
        buffer_size: int = 1000,
        claim_idle_seconds: float = 60.0,
        consumer_name: str | None = None,
        block_seconds: float = 1.0,
        max_backoff_seconds: float = DEFAULT_MAX_BACKOFF_SECONDS,
    ) -> None:
        check_redis_url(url)
        _check_positive(
            maxlen=maxlen,
            buffer_size=buffer_size,
            claim_idle_seconds=claim_idle_seconds,
            block_seconds=block_seconds,
            max_backoff_seconds=max_backoff_seconds,
        )
        if not stream:
            msg = "stream must not be empty"
            raise ValueError(msg)
        if consumer_name == "":
            msg = "consumer_name must not be empty"
            raise ValueError(msg)
        self.url = url
        self.stream = stream
        self._shown_url = display_url(url)
        self._maxlen = maxlen
        self._claim_idle_seconds = claim_idle_seconds
        self._consumer_name = consumer_name
        self._block_seconds = block_seconds
        self._max_backoff_seconds = max_backoff_seconds
        self._client = self._open_client(url)
        self._send, self._receive = trio.open_memory_channel[Event](buffer_size)
        self._drops = DropWarning(f"Redis bus buffer ({buffer_size} events) is full")
        self._closed = trio.Event()
        self._stack: AsyncExitStack | None = None
        self._entered = False
        self._published = 0
        self._dropped = 0
        self._written = 0
        self._in_hand = 0
        self._subscriptions: set[_RedisSubscription] = set()
        self._retired: dict[str, SubscriberStatistics] = {}

    def _open_client(self, url: str) -> coredis.Redis[bytes]:
        try:
            return coredis.Redis.from_url(
                url,
                # Our own loops back off and log; a hidden retry would only
                # delay them.
                retry_policy=NoRetryPolicy(),
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                stream_timeout=self._block_seconds + STREAM_TIMEOUT_MARGIN_SECONDS,
            )
        except (ValueError, TypeError, RedisError) as exc:
            msg = f"invalid Redis URL {self._shown_url!r}: {exc}"
            raise ConfigError(msg) from None

    def __repr__(self) -> str:
        return f"RedisEventBus({self._shown_url!r}, stream={self.stream!r})"

    @property
    def written(self) -> int:
        """How many events the writer has written to the stream so far."""
        return self._written

    async def __aenter__(self) -> Self:
        """Open the connection pool and start the writer task.

        Does not wait for Redis: a bus starts while Redis is down, and its
        writer connects when Redis is back.
        """
        if self._entered:
            msg = "a RedisEventBus can be entered only once"
            raise RuntimeError(msg)
        self._entered = True
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self._client)
            nursery = await stack.enter_async_context(trio.open_nursery())
            nursery.start_soon(self._run_writer)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the bus and wait until the writer has written the buffer.

        Put a deadline around this (a cancel scope) to bound the wait: when it
        is cancelled, the number of events left unwritten is logged.
        """
        self.close()
        stack, self._stack = self._stack, None
        if stack is None:
            return
        exc = next((e for e in exc_info if isinstance(e, BaseException)), None)
        try:
            await stack.__aexit__(
                type(exc) if exc is not None else None,
                exc,
                exc.__traceback__ if exc is not None else None,
            )
        except BaseExceptionGroup as group:
            # Our nurseries wrap the caller's own exception in groups; when
            # nothing else went wrong, let the original propagate unchanged.
            if exc is not None and _only_holds(group, exc):
                return
            raise

    def publish(self, event: Event) -> None:
        """Buffer ``event`` for the writer; see :meth:`EventBus.publish`."""
        if self._closed.is_set():
            self._dropped += 1
            return
        self._published += 1
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._dropped += 1
            self._drops.count()

    @asynccontextmanager
    async def subscribe(
        self,
        name: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_SECONDS,
    ) -> AsyncIterator[Subscription]:
        """Read the stream as a consumer of the consumer group ``name``.

        Creates the group (at the start of the stream) if it does not exist,
        waiting for Redis if it is unavailable. Every group gets every entry;
        the consumers of one group share them. The subscription ends once
        :meth:`close` was called and nothing more is readable at once.

        Raises:
            RuntimeError: the bus has not been entered.
        """
        if self._stack is None:
            msg = "enter the RedisEventBus (async with) before subscribing"
            raise RuntimeError(msg)
        if not name:
            msg = "the subscription (consumer group) name must not be empty"
            raise ValueError(msg)
        if batch_size <= 0:
            msg = f"batch_size must be > 0, got {batch_size!r}"
            raise ValueError(msg)
        consumer = self._consumer_name or _default_consumer_name()
        subscription = _RedisSubscription(
            name,
            consumer,
            self._client,
            self.stream,
            batch_size,
            flush_interval,
            self._claim_idle_seconds,
            self._block_seconds,
            self._closed,
            _Reconnect(
                f"consumer {consumer!r} of group {name!r}",
                self._shown_url,
                self._max_backoff_seconds,
            ),
            DropWarning(f"group {name!r}: stream entries that are not events"),
        )
        await subscription.ensure_group()
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)
            self._retired[name] = subscription.statistics()

    def close(self) -> None:
        """Stop taking events; subscriptions end once nothing more is readable.

        A subscription blocked in a read notices within ``block_seconds``.
        """
        self._closed.set()
        self._send.close()

    def statistics(self) -> BusStatistics:
        """Return the counters of the bus and of this process's subscribers.

        ``buffered`` counts events waiting in this process to be written.
        """
        subscribers = dict(self._retired)
        for subscription in self._subscriptions:
            subscribers[subscription.name] = subscription.statistics()
        return BusStatistics(
            published=self._published,
            dropped=self._dropped,
            buffered=self._unwritten(),
            subscribers=subscribers,
        )

    async def lag(self) -> StreamLag:
        """Ask Redis for the stream's length and each group's backlog.

        Raises:
            BusError: Redis is unavailable or refused.
            RuntimeError: the bus has not been entered.
        """
        if self._stack is None:
            msg = "enter the RedisEventBus (async with) before asking for its lag"
            raise RuntimeError(msg)
        try:
            length = await self._client.xlen(self.stream)
            groups = await self._client.xinfo_groups(self.stream)
        except ResponseError as exc:
            if "no such key" not in str(exc).lower():
                msg = f"cannot read the lag of stream {self.stream!r}: {exc}"
                raise BusError(msg) from exc
            length, groups = 0, ()
        except _REDIS_TROUBLE as exc:
            msg = (
                f"cannot read the lag of stream {self.stream!r} from Redis at "
                f"{self._shown_url}: {exc}"
            )
            raise BusError(msg) from exc
        lags = [_group_lag(info) for info in groups]
        return StreamLag(
            stream=self.stream,
            length=length,
            groups={lag.name: lag for lag in lags},
        )

    def _unwritten(self) -> int:
        return self._in_hand + self._receive.statistics().current_buffer_used

    async def _run_writer(self) -> None:
        reconnect = _Reconnect(
            f"writer of stream {self.stream!r}",
            self._shown_url,
            self._max_backoff_seconds,
        )
        try:
            while True:
                events = await self._next_events()
                if not events:
                    return
                self._in_hand = len(events)
                await render_events(events)
                # Each event keeps its JSON once rendered.
                entries = [event.to_json() for event in events]
                await self._write_all(entries, reconnect)
                self._in_hand = 0
        except trio.Cancelled:
            unwritten = self._unwritten()
            if unwritten:
                logger.error(
                    "%d event(s) may not have been written to stream %r: "
                    "the Redis bus was stopped before it could write them",
                    unwritten,
                    self.stream,
                )
            raise

    async def _next_events(self) -> list[Event]:
        """Wait for events and take up to a pipeline's worth; [] once closed."""
        try:
            events = [await self._receive.receive()]
        except trio.EndOfChannel:
            return []
        while len(events) < PIPELINE_BATCH_SIZE:
            try:
                events.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return events

    async def _write_all(self, entries: list[bytes], reconnect: _Reconnect) -> None:
        """Write ``entries``, waiting out Redis outages; returns once all are in."""
        while entries:
            try:
                refused, error = await self._xadd_pipeline(entries)
            except _REDIS_TROUBLE as exc:
                await reconnect.failed(exc)
                continue
            written = len(entries) - len(refused)
            self._written += written
            self._in_hand -= written
            entries = refused
            if error is not None:
                # Out of memory, a key of the wrong type...: keep the events
                # and retry, like an outage, until an operator fixes it.
                await reconnect.failed(error)
            else:
                reconnect.succeeded()

    async def _xadd_pipeline(
        self, entries: list[bytes]
    ) -> tuple[list[bytes], BaseException | None]:
        """Send one pipeline; return the entries Redis refused and why."""
        async with self._client.pipeline(
            transaction=False, raise_on_error=False
        ) as pipe:
            for entry in entries:
                pipe.xadd(
                    self.stream,
                    {ENTRY_FIELD: entry},
                    trim_strategy=PureToken.MAXLEN,
                    trim_operator=PureToken.APPROXIMATELY,
                    threshold=self._maxlen,
                )
        results = pipe.results or ()
        refused = [
            entry
            for entry, result in zip(entries, results, strict=True)
            if isinstance(result, BaseException)
        ]
        error = next((r for r in results if isinstance(r, BaseException)), None)
        return refused, error
