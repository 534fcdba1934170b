"""The instrumentation middleware on its own, around plain ASGI apps.

HTTP tests serve the wrapped app with Hypercorn on a loopback port and talk
to it with httpx, under a hang guard; the scopes the middleware must leave
alone (lifespan) are checked by calling it directly. WebSocket sessions have
their own tests, in test_websocket_events.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import pytest
import trio
from conftest import serve_asgi

from trio_llmproxy._asgi import ASGIApp, Message, Receive, Scope, Send
from trio_llmproxy._bus import Subscription
from trio_llmproxy._event import Event
from trio_llmproxy._memory_bus import InMemoryEventBus
from trio_llmproxy._middleware import (
    CaptureSettings,
    InstrumentationMiddleware,
    note_outcome,
)

HANG_GUARD_SECONDS = 10


@attrs.define
class Served:
    """A wrapped app on a loopback port, and a subscription to its bus."""

    url: str
    bus: InMemoryEventBus
    subscription: Subscription

    async def next_event(self) -> Event:
        batch = await self.subscription.receive_batch()
        assert len(batch) == 1
        return batch[0]


@asynccontextmanager
async def serve_instrumented(
    nursery: trio.Nursery,
    app: ASGIApp,
    settings: CaptureSettings | None = None,
    *,
    enrich: Callable[[Event], Event] | None = None,
) -> AsyncIterator[Served]:
    bus = InMemoryEventBus()
    wrapped = InstrumentationMiddleware(app, bus, settings, enrich=enrich)
    url = await serve_asgi(nursery, wrapped)
    async with bus.subscribe("test") as subscription:
        yield Served(url, bus, subscription)


async def read_body(receive: Receive) -> tuple[bytes, int]:
    """Read a request body whole; return it and how many messages it took."""
    body = b""
    messages = 0
    while True:
        message = await receive()
        assert message["type"] == "http.request"
        messages += 1
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body, messages


async def respond(send: Send, status: int, body: bytes) -> None:
    length = str(len(body)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", length)],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def test_app_sees_identical_request_body_bytes(nursery: trio.Nursery) -> None:
    body = bytes(range(256)) * 512  # 128 KiB, every byte value
    seen: list[tuple[bytes, int]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(await read_body(receive))
        await respond(send, 200, b"ok")

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 10_000):
            yield body[start : start + 10_000]

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_instrumented(nursery, app) as served:
            async with httpx.AsyncClient(base_url=served.url) as client:
                await client.post("/upload", content=pieces())
            event = await served.next_event()

    [(app_body, messages)] = seen
    assert messages > 1, "the body should have come in several messages"
    assert app_body == body
    assert event.request_body == body
    assert event.request_body_size == len(body)


async def test_streaming_response_is_recorded_whole(nursery: trio.Nursery) -> None:
    pieces = [f"data: {i}\n\n".encode() for i in range(5)]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_instrumented(nursery, app) as served:
            async with httpx.AsyncClient(base_url=served.url) as client:
                response = await client.get("/stream")
            event = await served.next_event()

    assert response.content == b"".join(pieces)
    assert event.response_body == b"".join(pieces)
    assert event.response_body_size == len(b"".join(pieces))
    assert event.streamed is True
    assert event.outcome == "ok"
    assert event.ttfb_ms is not None and event.ttfb_ms <= event.duration_ms


async def test_app_that_raises_gives_upstream_error_event_with_status_500(
    nursery: trio.Nursery,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_instrumented(nursery, app) as served:
            async with httpx.AsyncClient(base_url=served.url) as client:
                response = await client.get("/fail")
            event = await served.next_event()

    assert response.status_code == 500
    assert event.status == 500
    assert event.outcome == "upstream_error"
    assert event.error is not None and "boom" in event.error


async def test_app_that_raises_mid_response_keeps_the_status_sent(
    nursery: trio.Nursery,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("broke mid-stream")

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_instrumented(nursery, app) as served:
            async with httpx.AsyncClient(base_url=served.url) as client:
                async with client.stream("GET", "/fail") as response:
                    with pytest.raises(httpx.RemoteProtocolError):
                        await response.aread()
            event = await served.next_event()

    assert event.status == 200
    assert event.outcome == "upstream_error"
    assert event.response_body == b"part"


async def test_note_outcome_sets_the_event_outcome(nursery: trio.Nursery) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        note_outcome(scope, "upstream_timeout", "the backend took too long")
        await respond(send, 504, b"late")

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_instrumented(nursery, app) as served:
            async with httpx.AsyncClient(base_url=served.url) as client:
                await client.get("/slow")
            event = await served.next_event()

    assert event.outcome == "upstream_timeout"
    assert event.error == "the backend took too long"
    assert event.status == 504


def test_note_outcome_without_middleware_does_nothing() -> None:
    scope: Scope = {"type": "http", "headers": []}

    note_outcome(scope, "upstream_error", "ignored")

    assert scope == {"type": "http", "headers": []}


async def test_app_gets_the_request_id_and_client_gets_it_back(
    nursery: trio.Nursery,
) -> None:
    seen: list[list[tuple[bytes, bytes]]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(list(scope["headers"]))
        await read_body(receive)
        await respond(send, 200, b"ok")

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_instrumented(nursery, app) as served:
            async with httpx.AsyncClient(base_url=served.url) as client:
                response = await client.get("/")
            event = await served.next_event()

    [headers] = seen
    request_ids = [value for name, value in headers if name == b"x-request-id"]
    assert request_ids == [event.request_id.encode()]
    assert response.headers["x-request-id"] == event.request_id


async def test_capture_caps_apply_with_true_sizes(nursery: trio.Nursery) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await respond(send, 200, b"response body")

    settings = CaptureSettings(max_request_body_bytes=4, max_response_body_bytes=8)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_instrumented(nursery, app, settings) as served:
            async with httpx.AsyncClient(base_url=served.url) as client:
                await client.post("/", content=b"request body")
            event = await served.next_event()

    assert (event.request_body, event.request_body_size) == (b"requ", 12)
    assert event.request_body_truncated is True
    assert (event.response_body, event.response_body_size) == (b"response", 13)
    assert event.response_body_truncated is True


async def test_enrich_adds_fields_to_the_event(nursery: trio.Nursery) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await respond(send, 200, b"ok")

    def enrich(event: Event) -> Event:
        return attrs.evolve(event, extra={"tenant": "team-a"})

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_instrumented(nursery, app, enrich=enrich) as served:
            async with httpx.AsyncClient(base_url=served.url) as client:
                await client.get("/")
            event = await served.next_event()

    assert event.to_dict()["tenant"] == "team-a"


@attrs.define
class RecordingApp:
    """Remembers exactly what it was called with."""

    calls: list[tuple[Scope, Receive, Send]] = attrs.field(factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls.append((scope, receive, send))


async def _receive() -> Message:
    raise AssertionError("the middleware must not receive for the app")


async def _send(message: Message) -> None:
    raise AssertionError("the middleware must not send for the app")


async def _passes_through_untouched(scope: dict[str, Any]) -> None:
    app = RecordingApp()
    bus = InMemoryEventBus()
    original = {key: value for key, value in scope.items()}

    await InstrumentationMiddleware(app, bus)(scope, _receive, _send)

    [(seen_scope, seen_receive, seen_send)] = app.calls
    assert seen_scope is scope
    assert scope == original
    assert seen_receive is _receive
    assert seen_send is _send
    assert bus.statistics().published == 0


async def test_websocket_scope_is_recorded_and_left_unchanged() -> None:
    headers = [(b"host", b"h")]
    scope: dict[str, Any] = {
        "type": "websocket",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "headers": headers,
        "extensions": {},
    }
    incoming: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.disconnect", "code": 1000},
    ]

    async def app(app_scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await receive()

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        pass

    bus = InMemoryEventBus()
    await InstrumentationMiddleware(app, bus)(scope, receive, send)

    assert scope["headers"] is headers and headers == [(b"host", b"h")]
    assert scope["extensions"] == {}
    assert bus.statistics().published == 1


async def test_lifespan_scope_passes_through_untouched() -> None:
    await _passes_through_untouched({"type": "lifespan", "asgi": {"version": "3.0"}})


async def test_server_scope_is_left_unchanged() -> None:
    headers = [(b"host", b"h")]
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": headers,
        "extensions": {},
    }
    messages: list[Message] = []

    async def app(app_scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 200, b"ok")

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    await InstrumentationMiddleware(app, InMemoryEventBus())(scope, receive, send)

    assert scope["headers"] is headers and headers == [(b"host", b"h")]
    assert scope["extensions"] == {}
    assert [m["type"] for m in messages] == [
        "http.response.start",
        "http.response.body",
    ]
