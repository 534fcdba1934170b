"""Embedding the proxy in a Trio application, as docs/embedding.md shows it.

Networking rules: every server listens on 127.0.0.1 port 0 and runs in a
nursery the test owns; every test that waits on the network has a hang
guard. Warnings are errors (pyproject), so a leaked socket or an abandoned
async generator fails the test that caused it.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from conftest import serve_asgi
from docs_examples import example
from events import make_event

from trio_llmproxy import (
    Dispatcher,
    Event,
    EventBus,
    InMemoryEventBus,
    InstrumentationMiddleware,
    ProxyConfig,
    ServerHandle,
    Sink,
    Subscription,
    create_app,
    serve,
)

HANG_GUARD_SECONDS = 20.0
CHAT = {
    "model": "mock-gpt",
    "stream": True,
    "messages": [{"role": "user", "content": "Hi"}],
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ListSink(Sink):
    """Keeps every delivered event, and notes whether it was opened and closed."""

    name = "list"

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.opened = False
        self.closed = False

    async def __aenter__(self) -> ListSink:
        self.opened = True
        return self

    async def deliver(self, events: Sequence[Event]) -> None:
        assert self.opened and not self.closed
        self.events.extend(events)

    async def aclose(self) -> None:
        self.closed = True


def _task_count() -> int:
    """Count every task of this Trio run, from the root down."""

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            count(child)
            for nursery in task.child_nurseries
            for child in nursery.child_tasks
        )

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)


def _config(upstream_url: str, **changes: Any) -> ProxyConfig:
    return ProxyConfig(listen="127.0.0.1:0", upstream_url=upstream_url, **changes)


async def _send_traffic(base_url: str, count: int) -> list[str]:
    """Send ``count`` requests (plain and streamed); return their request IDs."""
    ids = []
    async with httpx.AsyncClient(base_url=base_url) as client:
        for n in range(count):
            if n % 2:
                response = await client.post("/v1/chat/completions", json=CHAT)
            else:
                response = await client.get("/v1/models", params={"n": n})
            assert response.status_code == 200
            ids.append(response.headers["x-request-id"])
    return ids


async def test_serve_in_a_nursery_delivers_every_event_to_a_subscription(
    mock_upstream_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await trio.testing.wait_all_tasks_blocked()
    tasks_before = _task_count()
    received: list[Event] = []

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle: ServerHandle = await nursery.start(
                serve, _config(mock_upstream_url)
            )
            async with handle.bus.subscribe("mine") as subscription:
                sent = await _send_traffic(handle.addresses[0], 6)
                async for event in subscription.events():
                    received.append(event)
                    if len(received) == len(sent):
                        break
            nursery.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()

    assert [event.request_id for event in received] == sent
    assert {event.outcome for event in received} == {"ok"}
    assert _task_count() == tasks_before
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_cancelling_serve_still_delivers_events_of_cut_requests_to_sinks(
    mock_upstream_url: str,
) -> None:
    sink = ListSink()
    config = _config(mock_upstream_url, shutdown_timeout=5)
    slow = {"X-Mock-Chunk-Count": "1000", "X-Mock-Chunk-Delay-Ms": "50"}

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(partial(serve, config, sinks=[sink]))
            sent = await _send_traffic(handle.addresses[0], 3)
            async with (
                httpx.AsyncClient(base_url=handle.addresses[0]) as client,
                client.stream(
                    "POST", "/v1/chat/completions", json=CHAT, headers=slow
                ) as response,
            ):
                assert response.status_code == 200  # the head is through
                nursery.cancel_scope.cancel()
                await trio.sleep_forever()

    assert [event.request_id for event in sink.events[:3]] == sent
    assert len(sink.events) == 4
    assert sink.events[3].outcome == "upstream_error"
    assert sink.events[3].streamed
    assert sink.closed


async def test_handle_shutdown_drains_concurrent_requests_into_the_sinks(
    mock_upstream_url: str,
) -> None:
    sink = ListSink()
    sent: list[str] = []

    async def one_client(base_url: str) -> None:
        sent.extend(await _send_traffic(base_url, 4))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                partial(serve, _config(mock_upstream_url), sinks=[sink])
            )
            async with trio.open_nursery() as clients:
                for _ in range(10):
                    clients.start_soon(one_client, handle.addresses[0])
            handle.shutdown()

    assert sorted(event.request_id for event in sink.events) == sorted(sent)
    assert len(sent) == 40
    assert sink.closed


# The middleware around a plain ASGI app (not the proxy).


async def _answer_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


async def _read_body(receive: Receive) -> bytes:
    body: bytes = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


async def plain_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Streams three chunks on /stream; echoes the body elsewhere, with a length."""
    if scope["type"] == "lifespan":
        await _answer_lifespan(receive, send)
        return
    body = await _read_body(receive)
    if scope["path"] == "/stream":
        start = {"type": "http.response.start", "status": 201, "headers": []}
        await send({**start, "headers": [(b"content-type", b"text/event-stream")]})
        for n in range(3):
            chunk = f"data: {n}\n\n".encode()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await trio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _record(
    app: Any, requests: Callable[[httpx.AsyncClient], Any], count: int
) -> list[Event]:
    """Serve ``app``, run ``requests`` against it, return ``count`` events."""
    bus = InMemoryEventBus()
    events: list[Event] = []
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            trio.open_nursery() as nursery,
            bus.subscribe("test") as subscription,
        ):
            base_url = await serve_asgi(nursery, InstrumentationMiddleware(app, bus))
            async with httpx.AsyncClient(base_url=base_url) as client:
                await requests(client)
            async for event in subscription.events():
                events.append(event)
                if len(events) == count:
                    break
            nursery.cancel_scope.cancel()
    return events


async def test_middleware_records_a_streaming_response_of_a_plain_app() -> None:
    chunks: list[bytes] = []

    async def requests(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/stream?x=1", content=b"ping") as response:
            assert response.status_code == 201
            chunks.extend([chunk async for chunk in response.aiter_raw()])

    (event,) = await _record(plain_app, requests, 1)

    assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    fields = event.to_dict()
    assert (fields["method"], fields["path"], fields["query"]) == (
        "POST",
        "/stream",
        "x=1",
    )
    assert fields["status"] == 201
    assert fields["streamed"] is True
    assert fields["request_body"] == "ping"
    assert fields["response_body"] == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert fields["response_body_size"] == 27
    assert 0 < fields["ttfb_ms"] < fields["duration_ms"]
    assert fields["outcome"] == "ok"
    assert fields["response_headers"]["x-request-id"] == [event.request_id]


async def test_middleware_records_each_request_of_a_plain_app_once() -> None:
    async def requests(client: httpx.AsyncClient) -> None:
        for n in range(3):
            response = await client.put(f"/echo/{n}", content=b"x" * n)
            assert response.content == b"x" * n

    events = await _record(plain_app, requests, 3)

    assert [event.path for event in events] == ["/echo/0", "/echo/1", "/echo/2"]
    assert [event.streamed for event in events] == [False, False, False]
    assert [event.response_body_size for event in events] == [0, 1, 2]


async def test_middleware_passes_lifespan_scopes_through_untouched() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    bus = InMemoryEventBus()
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}

    async with bus.subscribe("test"):
        await InstrumentationMiddleware(app, bus)(scope, _never, _never)

    assert seen == [scope] and seen[0] is scope
    assert bus.statistics().published == 0


async def _never(*args: object) -> Any:
    raise AssertionError("the middleware must not touch a lifespan's messages")


# create_app, and the custom bus and sink of the docs.


async def test_docs_bus_and_sink_work_end_to_end_with_create_app(
    mock_upstream_url: str, tmp_path: Path
) -> None:
    channel_bus = example("channel-bus").load()
    sqlite_sink = example("sqlite-sink").load()
    bus: EventBus = channel_bus.ChannelBus(buffer_size=100)
    sink: Sink = sqlite_sink.SqliteSink(tmp_path / "events.db")
    app = create_app(ProxyConfig(upstream_url=mock_upstream_url), bus)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with bus, sink, bus.subscribe(sink.name) as subscription:
            async with trio.open_nursery() as nursery:
                base_url = await serve_asgi(nursery, app)
                sent = await _send_traffic(base_url, 5)
                nursery.cancel_scope.cancel()
            bus.close()
            dispatcher = Dispatcher(sink)
            await dispatcher.serve(subscription)

    assert dispatcher.stats.delivered == 5
    db = sqlite3.connect(tmp_path / "events.db")
    try:
        rows = db.execute("SELECT event_id, path, status, json FROM events").fetchall()
    finally:
        db.close()
    assert sorted(Event.from_json(row[3]).request_id for row in rows) == sorted(sent)
    assert {(row[1], row[2]) for row in rows} == {
        ("/v1/models", 200),
        ("/v1/chat/completions", 200),
    }


async def test_docs_sink_works_with_serve(
    mock_upstream_url: str, tmp_path: Path
) -> None:
    sink = example("sqlite-sink").load().SqliteSink(tmp_path / "events.db")

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                partial(serve, _config(mock_upstream_url), sinks=[sink])
            )
            sent = await _send_traffic(handle.addresses[0], 3)
            handle.shutdown()

    db = sqlite3.connect(tmp_path / "events.db")
    try:
        rows = db.execute("SELECT json FROM events").fetchall()
    finally:
        db.close()
    assert sorted(Event.from_json(row[0]).request_id for row in rows) == sorted(sent)


async def test_app_without_a_client_can_be_served_again_after_it_stops(
    mock_upstream_url: str,
) -> None:
    bus = InMemoryEventBus()
    app = create_app(ProxyConfig(upstream_url=mock_upstream_url), bus)

    for _ in range(2):
        with trio.fail_after(HANG_GUARD_SECONDS):
            async with trio.open_nursery() as nursery:
                base_url = await serve_asgi(nursery, app)
                await _send_traffic(base_url, 2)
                nursery.cancel_scope.cancel()

    assert bus.statistics().published == 4


async def test_app_without_a_client_can_be_served_by_two_servers_at_once(
    mock_upstream_url: str,
) -> None:
    bus = InMemoryEventBus()
    app = create_app(ProxyConfig(upstream_url=mock_upstream_url), bus)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            first = await serve_asgi(nursery, app)
            second = await serve_asgi(nursery, app)
            await _send_traffic(first, 2)
            await _send_traffic(second, 2)
            nursery.cancel_scope.cancel()

    assert bus.statistics().published == 4


async def test_app_without_a_client_needs_the_lifespan() -> None:
    bus = InMemoryEventBus()
    app = create_app(ProxyConfig(upstream_url="http://127.0.0.1:9"), bus)
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1/models",
        "headers": [],
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent without an upstream client")

    async with bus.subscribe("test") as subscription:
        with pytest.raises(RuntimeError, match="ASGI lifespan"):
            await app(scope, receive, send)
        bus.close()
        events = [event async for event in subscription.events()]

    assert [event.outcome for event in events] == ["upstream_error"]


# Subscription.events()


class _ListSubscription(Subscription):
    """Hands out fixed batches and notes what is acknowledged."""

    def __init__(self, batches: list[list[Event]]) -> None:
        self._batches = batches
        self.acked: list[list[str]] = []

    async def receive_batch(self) -> Sequence[Event]:
        if not self._batches:
            raise trio.EndOfChannel
        return self._batches.pop(0)

    async def ack(self, batch: Sequence[Event]) -> None:
        self.acked.append([event.event_id for event in batch])


async def test_subscription_events_yields_in_order_and_acks_each_batch_after_it() -> (
    None
):
    subscription = _ListSubscription(
        [
            [make_event(event_id="a"), make_event(event_id="b")],
            [make_event(event_id="c")],
        ]
    )
    seen: list[tuple[str, int]] = []

    async for event in subscription.events():
        seen.append((event.event_id, len(subscription.acked)))

    assert seen == [("a", 0), ("b", 0), ("c", 1)]
    assert subscription.acked == [["a", "b"], ["c"]]


async def test_subscription_events_can_be_left_early_without_acking_the_rest() -> None:
    subscription = _ListSubscription(
        [
            [make_event(event_id="a"), make_event(event_id="b")],
            [make_event(event_id="c")],
        ]
    )

    async for event in subscription.events():
        if event.event_id == "b":
            break

    assert subscription.acked == []
