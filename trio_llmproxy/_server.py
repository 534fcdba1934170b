"""Running the proxy: Hypercorn, the shared client, the bus and its sinks.

Ownership, from the outside in: :func:`serve` owns the event pipeline (the
in-process bus, the sinks and their dispatcher tasks, and the Redis bus when
configured), then the upstream client, then Hypercorn, which owns a task per
connection and per request. Shutdown runs the other way: Hypercorn stops
accepting and gives in-flight requests until the deadline, then the bus is
closed and drained into the sinks within the same deadline, then the sinks
are flushed, fsynced and closed.

When the bus is Redis, the in-process bus still feeds this process's own
sinks (so ``--file-event-log`` records the events this process published,
each once), and one more subscriber forwards every event to Redis.

With ``--events-feed``, the pipeline also runs the live events feed
(``_events_feed.py``): each connected ``tail`` is one more subscriber, which
is not a sink. It stops with the bus, and what its clients have not received
by then is not counted as lost.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from ._app import create_app
from ._bus import EventBus
from ._config import ListenFailed, ProxyConfig
from ._dispatch import Dispatcher
from ._errors import first_leaf
from ._event import Event
from ._events_feed import SUBSCRIBER_PREFIX, EventsFeed
from ._memory_bus import InMemoryEventBus
from ._metrics import ProxyMetrics
from ._redact import redact_url
from ._sinks import JsonlFileSink, Sink
from ._upstream import create_upstream_client

LISTEN_BACKLOG = 1024
# The largest request head (request line and headers) accepted; a larger one
# is answered 431 by h11 and the connection closed. Hypercorn's default of
# 16 KiB is tight for requests that carry long tokens and cookies.
MAX_REQUEST_HEAD_BYTES = 64 * 1024
# The drain of the bus gets at least this long, even when in-flight requests
# used up the whole shutdown timeout.
MIN_DRAIN_SECONDS = 1.0

logger = logging.getLogger(__name__)


@attrs.define(eq=False)
class ServerHandle:
    """What :func:`serve` reports once it accepts connections.

    Attributes:
        addresses: the bound addresses, such as ``["http://127.0.0.1:8080"]``.
        bus: the in-process bus; subscribe to it to receive every event.
        events_feed: the live events feed's address, such as
            ``"ws://127.0.0.1:8181/"`` (with the bound port when
            ``config.events_feed`` asks for port 0), or None when it is off.
    """

    addresses: list[str]
    bus: EventBus
    _shutdown: trio.Event
    events_feed: str | None = None

    def shutdown(self) -> None:
        """Begin a graceful shutdown: stop accepting, finish, drain, return."""
        self._shutdown.set()


def hypercorn_config(config: ProxyConfig) -> HypercornConfig:
    """Return Hypercorn settings that suit a transparent proxy."""
    hyper = HypercornConfig()
    hyper.bind = [config.listen]
    # The proxy adds nothing of its own: the upstream's Date and Server pass.
    hyper.include_date_header = False
    hyper.include_server_header = False
    hyper.graceful_timeout = config.shutdown_timeout
    # Hypercorn's keep-alive timer runs from the end of a response (or the
    # opening of the connection) until the next request head is complete:
    # it closes idle connections and also clients that send their head too
    # slowly. LLM clients reuse connections between calls, so the default
    # is longer than Hypercorn's. Its read_timeout stays off: it would also
    # cut a client that rightly sends nothing while a long answer streams.
    hyper.keep_alive_timeout = config.client_timeout
    hyper.h11_max_incomplete_size = MAX_REQUEST_HEAD_BYTES
    hyper.backlog = LISTEN_BACKLOG
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger("hypercorn.error")
    return hyper


def _default_sinks(config: ProxyConfig) -> list[Sink]:
    if config.file_event_log is None:
        return []
    return [JsonlFileSink(config.file_event_log)]


async def _drain_into(
    bus: InMemoryEventBus,
    name: str,
    deliver: Callable[[Sequence[Event]], Awaitable[object]],
    scopes: list[trio.CancelScope],
    cut_off: list[int],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one subscriber of ``bus`` until the bus closes and it has drained.

    The subscriber shields itself from outside cancellation: the pipeline
    ends it by closing the bus, or, at the drain deadline, through its scope.
    It appends to ``cut_off`` how many events it had not delivered when it
    ended (the batch in hand and those still waiting).
    """
    with trio.CancelScope(shield=True) as scope:
        scopes.append(scope)
        async with bus.subscribe(name) as subscription:
            task_status.started()
            in_hand = 0
            try:
                async for batch in subscription:
                    in_hand = len(batch)
                    await deliver(batch)
                    in_hand = 0
            finally:
                waiting = bus.statistics().subscribers[name].buffered
                cut_off.append(in_hand + waiting)


@asynccontextmanager
async def open_event_pipeline(
    config: ProxyConfig,
    sinks: Sequence[Sink],
    drain_deadline: Callable[[], float],
    *,
    metrics: ProxyMetrics | None = None,
    feed_address: list[str] | None = None,
) -> AsyncIterator[InMemoryEventBus]:
    """Open the bus with its sinks (and Redis forwarding); drain it on exit.

    ``drain_deadline`` is called when the block exits and returns the Trio
    time by which the drain must be done; what is not delivered by then is
    counted and logged as lost. Closing the sinks (fsync) then gets a short
    grace period of its own. ``metrics``, when given, counts every event (a
    subscriber named ``metrics``) and reports the buses' counters. When
    ``config.events_feed`` is set, the feed runs too, and its address is
    appended to ``feed_address``.
    """
    bus = InMemoryEventBus(config.buffer_size)
    scopes: list[trio.CancelScope] = []
    cut_off: list[int] = []
    dispatchers = [Dispatcher(sink) for sink in sinks]
    async with AsyncExitStack() as stack:
        # Sinks shield their own closing (fsync), see Sink.__aexit__.
        for sink in sinks:
            await stack.enter_async_context(sink)
        async with trio.open_nursery() as nursery:
            # The feed first: should its port be taken, nothing shielded has
            # started yet that would wait for a bus that is never closed.
            feed = None
            if config.events_feed is not None:
                feed = EventsFeed(config.events_feed, token=config.events_feed_token)
                address = await nursery.start(feed.serve, bus)
                if feed_address is not None:
                    feed_address.append(address)
            for dispatcher in dispatchers:
                name, deliver = dispatcher.sink.name, dispatcher.deliver
                await nursery.start(
                    partial(_drain_into, bus, name, deliver, scopes, cut_off)
                )
            if metrics is not None:
                metrics.watch_bus(bus, "memory")
                await nursery.start(metrics.serve_bus_subscriber, bus)
            if config.event_bus == "redis":
                await nursery.start(_forward_to_redis, bus, config, scopes, metrics)
            try:
                yield bus
            finally:
                # Never less than a moment, so events published by requests
                # cut at the shutdown deadline still reach the sinks.
                deadline = max(
                    drain_deadline(), trio.current_time() + MIN_DRAIN_SECONDS
                )
                bus.close()
                if feed is not None:
                    # Its clients get what the bus still delivers, within a
                    # grace period of the feed's own; they are not sinks.
                    feed.stop()
                for dispatcher in dispatchers:
                    dispatcher.stopping.set()
                for scope in scopes:
                    scope.deadline = deadline
                _log_drain_start(bus)
            # Leaving the nursery waits for every subscriber to drain (they
            # are shielded, and bounded by the deadline just set).
    _log_drain_result(bus, dispatchers, sum(cut_off))


async def _forward_to_redis(
    bus: InMemoryEventBus,
    config: ProxyConfig,
    scopes: list[trio.CancelScope],
    metrics: ProxyMetrics | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forward every event of ``bus`` to the Redis stream, then flush.

    The Redis bus lives inside this task's shielded scope, so its writer
    flushes what it buffered even when ``serve`` is cancelled, and stops at
    the drain deadline set on the scope (counting what it could not write).
    """
    from ._redis_bus import RedisEventBus

    with trio.CancelScope(shield=True) as scope:
        scopes.append(scope)
        redis_bus = RedisEventBus(
            config.redis_url,
            stream=config.redis_stream,
            maxlen=config.redis_stream_maxlen,
            buffer_size=config.buffer_size,
        )
        if metrics is not None:
            metrics.watch_bus(redis_bus, "redis", lag=redis_bus.lag)
        async with redis_bus, bus.subscribe("redis") as subscription:
            task_status.started()
            async for batch in subscription:
                for event in batch:
                    redis_bus.publish(event)


def _log_drain_start(bus: InMemoryEventBus) -> None:
    waiting = bus.statistics().buffered
    if waiting:
        logger.info("draining %d event(s) into the sinks", waiting)


def _log_drain_result(
    bus: InMemoryEventBus, dispatchers: Sequence[Dispatcher], cut_off: int
) -> None:
    stats = bus.statistics()
    # The subscriptions have ended by now, so the bus itself buffers nothing:
    # what was lost is what the drain deadline cut off, and what the sinks
    # still failed after their last attempt.
    lost = cut_off + sum(d.stats.failed for d in dispatchers)
    # A tail's losses are its own (the feed tells it); they are not the sinks'.
    dropped = stats.dropped + sum(
        s.dropped
        for name, s in stats.subscribers.items()
        if not name.startswith(SUBSCRIBER_PREFIX)
    )
    if lost:
        logger.error("%d event(s) were lost: the drain did not finish in time", lost)
    if dropped:
        logger.warning(
            "%d event(s) were dropped by full buffers while running", dropped
        )
    logger.info("event bus drained: %d event(s) published", stats.published)


async def serve(
    config: ProxyConfig,
    *,
    sinks: Sequence[Sink] = (),
    enrich: Callable[[Event], Event] | None = None,
    task_status: trio.TaskStatus[ServerHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until shut down; start it with ``nursery.start(serve, config)``.

    Reports a :class:`ServerHandle` (bound addresses, the bus) once it
    accepts connections. It returns after a graceful shutdown, asked for with
    :meth:`ServerHandle.shutdown`; when its cancel scope is cancelled instead,
    in-flight requests are cut, but the events already published are still
    drained into the sinks within ``config.shutdown_timeout``.

    Args:
        config: the proxy's configuration.
        sinks: sinks to feed besides ``config.file_event_log``; ``serve``
            enters them and closes them.
        enrich: optional hook that returns each event to publish.

    Raises:
        ListenFailed: ``config.listen`` or ``config.events_feed`` cannot be
            bound (the port is taken, say), before anything is served.
    """
    shutdown_requested = trio.Event()
    shutdown_started: list[float] = []

    async def wait_for_shutdown() -> None:
        await shutdown_requested.wait()
        shutdown_started.append(trio.current_time())
        logger.info("shutting down: finishing in-flight requests")

    def drain_deadline() -> float:
        start = shutdown_started[0] if shutdown_started else trio.current_time()
        return start + config.shutdown_timeout

    all_sinks = [*_default_sinks(config), *sinks]
    metrics = ProxyMetrics() if config.metrics_path else None
    feed_address: list[str] = []
    pipeline = open_event_pipeline(
        config, all_sinks, drain_deadline, metrics=metrics, feed_address=feed_address
    )
    async with pipeline as bus:
        async with create_upstream_client(
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            max_connections=config.max_upstream_connections,
        ) as client:
            app = create_app(
                config,
                bus,
                client,
                enrich=enrich,
                metrics=metrics,
                # Open WebSocket sessions close at once (1001) on shutdown.
                going_away=shutdown_requested,
            )
            async with trio.open_nursery() as nursery:
                hypercorn = partial(
                    hypercorn_serve,
                    # Hypercorn types apps with its own TypedDicts; ours use
                    # plain mappings of the same ASGI messages.
                    app,  # type: ignore[arg-type]
                    hypercorn_config(config),
                    shutdown_trigger=wait_for_shutdown,
                )
                try:
                    addresses = await nursery.start(hypercorn)
                except* OSError as group:
                    # Before it reports its addresses, Hypercorn only binds.
                    first = first_leaf(group)
                    raise ListenFailed("listen", config.listen, first) from first
                logger.info(
                    "proxying %s on %s",
                    redact_url(config.upstream_url),
                    ", ".join(addresses),
                )
                handle = ServerHandle(
                    addresses,
                    bus,
                    shutdown_requested,
                    events_feed=feed_address[0] if feed_address else None,
                )
                task_status.started(handle)
