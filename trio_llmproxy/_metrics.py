"""Prometheus metrics of the proxy, served at ``/metrics`` by the proxy itself.

Where the numbers come from, and why there:

- Per request counts, timings, bytes and tokens come from a subscriber of
  the in-memory bus (``open_event_pipeline`` starts it, named ``metrics``),
  not from the request path. The subscriber needs each event's ``llm``
  object anyway, for tokens and for the true outcome (a 2xx stream that ends
  in an error event is no success), and that object parses the body. It
  runs on the event loop in slices of about a millisecond (in a worker
  thread for events with large bodies: see :meth:`ProxyMetrics.deliver`),
  and the sinks then reuse the object cached on the event. So the request
  path pays nothing for metrics. The cost is that a request shows in ``/metrics``
  a moment after it ended, and that events the metrics subscriber drops
  (its buffer full) are missing from these counts. Those drops are counted
  in ``llmproxy_subscriber_dropped_events_total{subscriber="metrics"}``.
- The bus metrics are read from ``bus.statistics()`` when Prometheus
  scrapes, by a custom collector, so they cost nothing between scrapes. The
  Redis stream's length and each group's pending count need a Redis query,
  made at scrape time with a short timeout.

Label values that clients control (paths, models, methods) are bounded: a
path becomes a template (IDs become ``{id}``, Azure deployment names become
``{deployment}``), and past a fixed number of distinct values per label,
new ones are counted under ``other``. docs/metrics.md lists every metric.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Final

import attrs
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._asgi import Send
from ._bus import EventBus
from ._errors import ProxyError
from ._event import Event
from ._rendering import process_events

if TYPE_CHECKING:
    from ._redis_bus import StreamLag

# LLM calls last from milliseconds (embeddings) to minutes (long generations).
DURATION_BUCKETS_SECONDS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# Distinct values kept per client-controlled label before "other".
MAX_PATH_LABELS: Final = 200
MAX_MODEL_LABELS: Final = 200
MAX_METHOD_LABELS: Final = 20
OTHER_LABEL: Final = "other"
# A scrape waits this long for Redis before reporting the stream as down.
REDIS_SCRAPE_TIMEOUT_SECONDS: Final = 2.0
TOKEN_KINDS: Final = ("input", "output", "reasoning", "cached")
METRICS_SUBSCRIBER: Final = "metrics"

# A path segment that names one object rather than a route: provider IDs
# (chatcmpl-..., resp_..., msg_..., file-...), UUIDs, numbers, long tokens.
_ID_SEGMENT: Final = re.compile(
    r"^(?:\d+|[0-9a-fA-F-]{16,}|[A-Za-z]+[_-][A-Za-z0-9_-]*\d[A-Za-z0-9_-]*|.{40,})$"
)

# The metrics subscriber hands each batch to a worker thread; waiting a
# moment for bigger batches makes that hop rare under load (each one cost
# several percent of the proxy's CPU with batches of one or two events).
METRICS_FLUSH_INTERVAL_SECONDS: Final = 0.2
METRICS_BATCH_SIZE: Final = 1000

logger = logging.getLogger(__name__)

StreamLagReader = Callable[[], Awaitable["StreamLag"]]


def path_template(path: str) -> str:
    """Return ``path`` with its object IDs replaced by ``{id}``.

    ``/v1/responses/resp_68a1c0f2`` becomes ``/v1/responses/{id}``; Azure's
    ``/openai/deployments/NAME/...`` becomes ``/openai/deployments/{deployment}/...``.
    """
    segments = path.split("?", 1)[0].split("/")
    for index, segment in enumerate(segments):
        if index > 0 and segments[index - 1] == "deployments":
            segments[index] = "{deployment}"
        elif segment and _ID_SEGMENT.match(segment):
            segments[index] = "{id}"
    return "/".join(segments)


@attrs.define
class _BoundedLabel:
    """Lets through at most ``limit`` distinct values; the rest are "other"."""

    limit: int
    _seen: set[str] = attrs.field(factory=set)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER_LABEL


@attrs.define
class _WatchedBus:
    name: str
    bus: EventBus
    lag: StreamLagReader | None = None
    last_lag: StreamLag | None = None
    redis_up: bool = True


class _BusCollector(Collector):
    """Reads the watched buses' counters when Prometheus scrapes."""

    def __init__(self, buses: list[_WatchedBus]) -> None:
        self._buses = buses

    def collect(self) -> Iterator[Metric]:
        published = CounterMetricFamily(
            "llmproxy_bus_published_events",
            "Events published to the bus.",
            labels=["bus"],
        )
        dropped = CounterMetricFamily(
            "llmproxy_bus_dropped_events",
            "Events no subscriber could take (the bus full or closed).",
            labels=["bus"],
        )
        buffered = GaugeMetricFamily(
            "llmproxy_bus_buffered_events",
            "Events waiting in the bus for their subscribers (or for Redis).",
            labels=["bus"],
        )
        delivered = CounterMetricFamily(
            "llmproxy_subscriber_delivered_events",
            "Events handed to each subscriber.",
            labels=["bus", "subscriber"],
        )
        lost = CounterMetricFamily(
            "llmproxy_subscriber_dropped_events",
            "Events a subscriber lost because its buffer was full.",
            labels=["bus", "subscriber"],
        )
        waiting = GaugeMetricFamily(
            "llmproxy_subscriber_buffered_events",
            "Events waiting in each subscriber's buffer.",
            labels=["bus", "subscriber"],
        )
        for watched in self._buses:
            stats = watched.bus.statistics()
            published.add_metric([watched.name], stats.published)
            dropped.add_metric([watched.name], stats.dropped)
            buffered.add_metric([watched.name], stats.buffered)
            for name, subscriber in sorted(stats.subscribers.items()):
                delivered.add_metric([watched.name, name], subscriber.delivered)
                lost.add_metric([watched.name, name], subscriber.dropped)
                waiting.add_metric([watched.name, name], subscriber.buffered)
        yield from (published, dropped, buffered, delivered, lost, waiting)
        yield from self._redis_metrics()

    def _redis_metrics(self) -> Iterator[Metric]:
        watched = [w for w in self._buses if w.lag is not None]
        if not watched:
            return
        up = GaugeMetricFamily(
            "llmproxy_redis_up",
            "1 if the last scrape could read the Redis stream, else 0.",
            labels=["stream"],
        )
        length = GaugeMetricFamily(
            "llmproxy_redis_stream_length",
            "Entries in the Redis stream.",
            labels=["stream"],
        )
        pending = GaugeMetricFamily(
            "llmproxy_redis_group_pending_entries",
            "Entries handed to a consumer of the group and not acknowledged yet.",
            labels=["stream", "group"],
        )
        lag = GaugeMetricFamily(
            "llmproxy_redis_group_lag_entries",
            "Entries of the stream the group has not read yet.",
            labels=["stream", "group"],
        )
        for w in watched:
            snapshot = w.last_lag
            stream = snapshot.stream if snapshot is not None else w.name
            up.add_metric([stream], 1.0 if w.redis_up else 0.0)
            if snapshot is None or not w.redis_up:
                continue
            length.add_metric([stream], snapshot.length)
            for group in snapshot.groups.values():
                pending.add_metric([stream, group.name], group.pending)
                if group.lag is not None:
                    lag.add_metric([stream, group.name], group.lag)
        yield from (up, length, pending, lag)


class ProxyMetrics:
    """The proxy's metrics, in a registry of their own.

    Feed it events with :meth:`deliver` (a bus subscriber's delivery
    function) or :meth:`observe`; watch buses with :meth:`watch_bus`; serve
    the text format with :meth:`serve_http`. ``serve`` does all three.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._buses: list[_WatchedBus] = []
        self._paths = _BoundedLabel(MAX_PATH_LABELS)
        self._models = _BoundedLabel(MAX_MODEL_LABELS)
        self._methods = _BoundedLabel(MAX_METHOD_LABELS)
        registry = self.registry
        by_route = ["method", "path"]
        self.requests = Counter(
            "llmproxy_requests",
            "Proxied requests, by outcome (llm.outcome_detail for LLM calls).",
            [*by_route, "status", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "llmproxy_request_duration_seconds",
            "From arrival to the last byte sent.",
            by_route,
            buckets=DURATION_BUCKETS_SECONDS,
            registry=registry,
        )
        self.ttfb = Histogram(
            "llmproxy_time_to_first_byte_seconds",
            "From arrival to the first response body byte sent.",
            by_route,
            buckets=DURATION_BUCKETS_SECONDS,
            registry=registry,
        )
        self.request_bytes = Counter(
            "llmproxy_request_body_bytes",
            "Request body bytes received from clients.",
            by_route,
            registry=registry,
        )
        self.response_bytes = Counter(
            "llmproxy_response_body_bytes",
            "Response body bytes sent to clients (as sent, still compressed).",
            by_route,
            registry=registry,
        )
        by_model = ["api", "model"]
        self.llm_requests = Counter(
            "llmproxy_llm_requests",
            "LLM calls, by API, model and llm.outcome_detail.outcome.",
            [*by_model, "outcome"],
            registry=registry,
        )
        self.ttft = Histogram(
            "llmproxy_time_to_first_token_seconds",
            "From arrival to the first chunk that carried generated content.",
            by_model,
            buckets=DURATION_BUCKETS_SECONDS,
            registry=registry,
        )
        self.tokens = Counter(
            "llmproxy_tokens",
            "Tokens the upstream reported, by kind: input, output, reasoning, cached.",
            [*by_model, "kind"],
            registry=registry,
        )
        self.usage_missing = Counter(
            "llmproxy_llm_requests_without_usage",
            "LLM calls whose upstream reported no usage (never estimated).",
            by_model,
            registry=registry,
        )
        registry.register(_BusCollector(self._buses))

    def watch_bus(
        self, bus: EventBus, name: str, *, lag: StreamLagReader | None = None
    ) -> None:
        """Report ``bus``'s counters as bus ``name``; ``lag`` reads Redis."""
        self._buses.append(_WatchedBus(name, bus, lag))

    def observe(self, event: Event) -> None:
        """Count one finished request; thread-safe, parses the body once."""
        llm = event.describe_llm()
        method = self._methods(event.method)
        path = self._paths(path_template(event.path))
        outcome = event.outcome if llm is None else llm["outcome_detail"]["outcome"]
        self.requests.labels(method, path, str(event.status), outcome).inc()
        self.duration.labels(method, path).observe(event.duration_ms / 1000.0)
        if event.ttfb_ms is not None:
            self.ttfb.labels(method, path).observe(event.ttfb_ms / 1000.0)
        self.request_bytes.labels(method, path).inc(event.request_body_size)
        self.response_bytes.labels(method, path).inc(event.response_body_size)
        if llm is None:
            return

        api = llm["api"]
        model = self._models(llm["response_model"] or llm["request_model"] or "unknown")
        self.llm_requests.labels(api, model, outcome).inc()
        if llm["ttft_ms"] is not None:
            self.ttft.labels(api, model).observe(llm["ttft_ms"] / 1000.0)
        usage = llm["usage"]
        if usage is None:
            self.usage_missing.labels(api, model).inc()
            return
        for kind in TOKEN_KINDS:
            count = usage[f"{kind}_tokens"]
            if count:
                self.tokens.labels(api, model, kind).inc(count)

    def observe_all(self, events: Sequence[Event]) -> None:
        """Count each of ``events``; one bad event never stops the rest."""
        for event in events:
            try:
                self.observe(event)
            except Exception:
                logger.exception("cannot count request %s", event.request_id)

    async def deliver(self, events: Sequence[Event]) -> None:
        """Count a batch: small events on the event loop, large ones in a thread.

        Counting parses the captured bodies; see ``_rendering`` for why small
        events are counted on the loop.
        """
        await process_events(events, self.observe_all)

    async def serve_bus_subscriber(
        self,
        bus: EventBus,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Count every event of ``bus`` until the bus closes (subscriber ``metrics``).

        Reports started once subscribed. Unlike the sinks' subscribers it
        does not shield itself: when the server is cancelled there is no one
        left to scrape what it would count.
        """
        async with bus.subscribe(
            METRICS_SUBSCRIBER,
            batch_size=METRICS_BATCH_SIZE,
            flush_interval=METRICS_FLUSH_INTERVAL_SECONDS,
        ) as subscription:
            task_status.started()
            async for batch in subscription:
                await self.deliver(batch)

    async def render(self) -> bytes:
        """Return every metric in the Prometheus text format.

        Asks Redis for the stream's length and pending counts first, giving up
        after ``REDIS_SCRAPE_TIMEOUT_SECONDS`` (reported as ``llmproxy_redis_up
        0``).
        """
        for watched in self._buses:
            if watched.lag is not None:
                await self._read_lag(watched, watched.lag)
        return generate_latest(self.registry)

    async def serve_http(self, send: Send) -> None:
        """Answer one ASGI HTTP request with :meth:`render`'s text."""
        body = await self.render()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", CONTENT_TYPE_LATEST.encode("ascii")),
                    (b"content-length", str(len(body)).encode("ascii")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _read_lag(watched: _WatchedBus, read: StreamLagReader) -> None:
        watched.redis_up = False
        with trio.move_on_after(REDIS_SCRAPE_TIMEOUT_SECONDS):
            try:
                watched.last_lag = await read()
            except (ProxyError, RuntimeError) as exc:
                # RuntimeError: the bus is not running (starting or stopped).
                # The text only: a record holding the exception would keep
                # its traceback, and the client's streams, alive.
                reason = str(exc)
                logger.warning("cannot read the Redis stream for metrics: %s", reason)
                return
            watched.redis_up = True
