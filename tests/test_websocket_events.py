"""One event per WebSocket session, recorded by the instrumentation middleware.

Small ASGI WebSocket apps (echo, refuse, close with a code, a Realtime-like
server) are wrapped in the middleware, served by Hypercorn on a loopback port
and talked to with a trio-websocket client, under a hang guard. What the
middleware records depends only on the ASGI messages that pass, so these apps
stand in for the proxy's relay.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import pytest
import trio
from conftest import serve_asgi
from docs_examples import example
from events import make_event
from test_middleware import Served as HttpServed
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
)
from ws_client import open_client

from trio_llmproxy._asgi import ASGIApp, Message, Receive, Scope, Send
from trio_llmproxy._event import Event, WebSocketMessage, WebSocketSession
from trio_llmproxy._memory_bus import InMemoryEventBus
from trio_llmproxy._middleware import (
    MESSAGE_OVERHEAD_BYTES,
    CaptureSettings,
    InstrumentationMiddleware,
    _SessionRecord,
    note_outcome,
    note_proxy_close,
)

HANG_GUARD_SECONDS = 10
KEY = "sk-test-abcdefghijklmnop1234"

Session = Callable[[Scope, Receive, Send], Awaitable[None]]


class Served(HttpServed):
    """A wrapped WebSocket app on a loopback port, and its bus's subscription."""

    @asynccontextmanager
    async def connect(
        self, resource: str, **options: Any
    ) -> AsyncIterator[WebSocketConnection]:
        """Open a client session on ``resource``; see :func:`ws_client.open_client`."""
        async with open_client(ws_url(self.url, resource), **options) as ws:
            yield ws

    async def refused(self, resource: str, **options: Any) -> ConnectionRejected:
        """Return how the server refused a handshake on ``resource``."""
        with pytest.raises(ConnectionRejected) as refusal:
            async with open_client(ws_url(self.url, resource), **options):
                pass
        return refusal.value


def ws_url(url: str, resource: str) -> str:
    return url.replace("http://", "ws://", 1) + resource


def websocket_app(session: Session) -> ASGIApp:
    """An ASGI app that runs ``session`` for each WebSocket connection."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert scope["type"] == "websocket"
        await session(scope, receive, send)

    return app


@asynccontextmanager
async def serve_recorded(
    nursery: trio.Nursery, session: Session, settings: CaptureSettings | None = None
) -> AsyncIterator[Served]:
    bus = InMemoryEventBus()
    wrapped = InstrumentationMiddleware(websocket_app(session), bus, settings)
    url = await serve_asgi(nursery, wrapped)
    async with bus.subscribe("test") as subscription:
        yield Served(url, bus, subscription)


def _recording_session(cap: int) -> _SessionRecord:
    """The middleware's record of one session, fed by hand."""
    return _SessionRecord(cap, 0.0)


def _payload(message: Message) -> dict[str, Any]:
    if message.get("bytes") is not None:
        return {"bytes": message["bytes"]}
    return {"text": message["text"]}


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Accept, echo every message, and close with a code when asked.

    The text ``close CODE REASON`` makes it close with that code and reason.
    """
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept", "headers": [(b"x-app", b"echo")]})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text") or ""
        if text.startswith("close "):
            _, code, reason = text.split(" ", 2)
            await send({"type": "websocket.close", "code": int(code), "reason": reason})
            return
        await send({"type": "websocket.send", **_payload(message)})


async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
    assert (await receive())["type"] == "websocket.connect"
    await send(
        {
            "type": "websocket.http.response.start",
            "status": 401,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send(
        {
            "type": "websocket.http.response.body",
            "body": b'{"error": {"message": "bad key", "code": "invalid_api_key"}}',
        }
    )


def realtime_usage(total: int, cached: int) -> dict[str, Any]:
    return {
        "total_tokens": total,
        "input_tokens": total - 10,
        "output_tokens": 10,
        "input_token_details": {
            "text_tokens": total - 10,
            "audio_tokens": 0,
            "cached_tokens": cached,
        },
        "output_token_details": {"text_tokens": 4, "audio_tokens": 6},
    }


async def realtime(scope: Scope, receive: Receive, send: Send) -> None:
    """A Realtime-like server: one response per client message, then close."""

    async def server_event(data: dict[str, Any]) -> None:
        await send({"type": "websocket.send", "text": orjson.dumps(data).decode()})

    assert (await receive())["type"] == "websocket.connect"
    offered = "realtime" in scope["subprotocols"]
    await send(
        {"type": "websocket.accept", "subprotocol": "realtime" if offered else None}
    )
    await server_event(
        {"type": "session.created", "session": {"model": "gpt-realtime-mock"}}
    )
    for number, (total, cached) in enumerate([(100, 20), (50, 5)]):
        message = await receive()
        assert message["type"] == "websocket.receive"
        await server_event({"type": "response.created", "response": {}})
        await server_event({"type": "response.output_audio.delta", "delta": "AAAA"})
        await send({"type": "websocket.send", "bytes": b"\x00\x01audio"})
        await server_event(
            {
                "type": "response.done",
                "response": {
                    "status": "completed",
                    "output": [
                        {
                            "type": "message",
                            "content": [
                                {
                                    "type": "output_audio",
                                    "transcript": f"answer {number}",
                                }
                            ],
                        }
                    ],
                    "usage": realtime_usage(total, cached),
                },
            }
        )
    await send({"type": "websocket.close", "code": 1000})


async def talk(ws: WebSocketConnection, *messages: str | bytes) -> list[str | bytes]:
    """Send each message and read the echo of each."""
    answers: list[str | bytes] = []
    for message in messages:
        await ws.send_message(message)
        answers.append(await ws.get_message())
    return answers


def as_json(event: Event) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(event.to_json())
    return data


# The event of an accepted session.


async def test_session_gives_one_event_with_method_websocket_and_status_101(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, echo) as served:
            async with served.connect("/v1/ws?x=1") as ws:
                await talk(ws, "hello")
                await ws.send_message("close 1000 done")
                with pytest.raises(ConnectionClosed):
                    await ws.get_message()
            event = await served.next_event()
            # The app has returned: nothing more can come of this session.
            await trio.sleep(0.1)
            published = served.bus.statistics().published

    assert published == 1
    assert event.method == "WEBSOCKET"
    assert event.status == 101
    assert (event.path, event.query) == ("/v1/ws", "x=1")
    assert event.outcome == "ok" and event.error is None
    assert event.streamed is True
    assert event.request_body == b"" and event.response_body == b""
    assert event.websocket is not None
    assert event.websocket.closed_by == "upstream"
    assert (
        event.websocket.upstream.close_code,
        event.websocket.upstream.close_reason,
    ) == (
        1000,
        "done",
    )


async def test_messages_of_both_directions_are_listed_in_order(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, echo) as served:
            async with served.connect("/ws") as ws:
                answers = await talk(ws, "héllo", b"\x00\xffbin")
            event = await served.next_event()

    assert answers == ["héllo", b"\x00\xffbin"]
    rendered = as_json(event)["websocket"]["messages"]
    assert [(m["from"], m["type"], m["data"], m["size"]) for m in rendered] == [
        ("client", "text", "héllo", 6),
        ("upstream", "text", "héllo", 6),
        ("client", "binary", base64.b64encode(b"\x00\xffbin").decode(), 5),
        ("upstream", "binary", base64.b64encode(b"\x00\xffbin").decode(), 5),
    ]
    times = [m["at_ms"] for m in rendered]
    assert times == sorted(times)
    assert 0 < times[0] and times[-1] <= event.duration_ms


async def test_time_to_first_byte_is_the_first_upstream_message(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, echo) as served:
            async with served.connect("/ws") as ws:
                await trio.sleep(0.05)
                await talk(ws, "late")
            event = await served.next_event()

    assert event.websocket is not None
    first_answer = event.websocket.messages[1]
    assert first_answer.from_client is False
    assert event.ttfb_ms == pytest.approx(first_answer.at_ms, abs=1.0)
    assert event.ttfb_ms is not None and event.ttfb_ms >= 50


async def test_counts_and_bytes_are_exact_per_direction(nursery: trio.Nursery) -> None:
    sent: list[str | bytes] = ["a" * 10, "ü" * 10, b"\x01" * 1000]

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, echo) as served:
            async with served.connect("/ws") as ws:
                await talk(ws, *sent)
            event = await served.next_event()

    side = as_json(event)["websocket"]
    assert side["client"]["messages"] == side["upstream"]["messages"] == 3
    assert side["client"]["bytes"] == side["upstream"]["bytes"] == 10 + 20 + 1000


async def test_capture_cap_truncates_the_list_but_not_the_counts(
    nursery: trio.Nursery,
) -> None:
    # Room for two messages of 10 bytes and 5 bytes of a third, each also
    # costing its overhead.
    settings = CaptureSettings(max_response_body_bytes=3 * MESSAGE_OVERHEAD_BYTES + 25)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, echo, settings) as served:
            async with served.connect("/ws") as ws:
                await talk(ws, "0123456789", "abcdefghij", "klmnopqrst")
            event = await served.next_event()

    session = as_json(event)["websocket"]
    assert session["messages_truncated"] is True
    assert [m["data"] for m in session["messages"]] == [
        "0123456789",
        "0123456789",
        "abcde",
    ]
    assert session["messages"][-1]["size"] == 10
    assert session["client"] == {
        "messages": 3,
        "bytes": 30,
        "close_code": 1006,
        "close_reason": None,
    }
    assert (session["upstream"]["messages"], session["upstream"]["bytes"]) == (3, 30)


async def test_session_under_the_cap_is_not_truncated(nursery: trio.Nursery) -> None:
    settings = CaptureSettings(max_response_body_bytes=2 * MESSAGE_OVERHEAD_BYTES + 20)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, echo, settings) as served:
            async with served.connect("/ws") as ws:
                await talk(ws, "0123456789")
            event = await served.next_event()

    assert event.websocket is not None
    assert event.websocket.messages_truncated is False
    assert len(event.websocket.messages) == 2


async def test_flood_of_empty_messages_keeps_the_list_within_the_cap(
    nursery: trio.Nursery,
) -> None:
    cap, flood = 4096, 20_000

    async def session(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive()).get("text") != "go":
            pass
        for _ in range(flood):
            await send({"type": "websocket.send", "text": ""})
        await send({"type": "websocket.close", "code": 1000})

    with trio.fail_after(30):
        async with serve_recorded(
            nursery, session, CaptureSettings(max_response_body_bytes=cap)
        ) as served:
            async with served.connect("/ws") as ws:
                for _ in range(flood):
                    await ws.send_message("")
                await ws.send_message("go")
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.get_message()
            event = await served.next_event()

    rendered = as_json(event)["websocket"]
    assert rendered["messages_truncated"] is True
    assert len(rendered["messages"]) == cap // MESSAGE_OVERHEAD_BYTES
    assert len(orjson.dumps(rendered["messages"])) <= cap
    assert (rendered["client"]["messages"], rendered["client"]["bytes"]) == (
        flood + 1,
        2,
    )
    assert (rendered["upstream"]["messages"], rendered["upstream"]["bytes"]) == (
        flood,
        0,
    )


def test_realtime_events_past_the_cap_are_kept_within_the_cap_too() -> None:
    cap = 1024
    session = _recording_session(cap)

    for _ in range(1_000):
        session.add(False, '{"type":"error"}')

    kept = session.freeze()
    assert len(kept.messages) + len(kept.llm_messages) <= 2 * cap // (
        MESSAGE_OVERHEAD_BYTES
    )
    assert kept.upstream.messages == 1_000


# How a session ends.


async def test_client_closing_mid_session_is_client_disconnected(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, echo) as served:
            async with served.connect("/ws") as ws:
                await talk(ws, "hi")
                await ws.aclose(4001, "bye")
            event = await served.next_event()

    assert event.status == 101
    assert event.outcome == "client_disconnected"
    assert event.websocket is not None
    assert event.websocket.closed_by == "client"
    # Hypercorn tells the app 1006 (abnormal closure) whatever code the client
    # sent, and no reason; the event records what the server reported.
    assert event.websocket.client.close_code == 1006
    assert event.error == "client closed the session with code 1006"
    assert event.websocket.upstream.close_code is None


async def test_client_close_code_and_reason_are_recorded_as_asgi_reports_them() -> None:
    bus = InMemoryEventBus()
    incoming: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.disconnect", "code": 4001, "reason": "bye"},
    ]

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        pass

    async with bus.subscribe("test") as subscription:
        await InstrumentationMiddleware(websocket_app(echo), bus)(
            {"type": "websocket", "path": "/ws", "headers": []}, receive, send
        )
        [event] = await subscription.receive_batch()

    assert event.websocket is not None
    assert event.websocket.client.close_code == 4001
    assert event.websocket.client.close_reason == "bye"
    assert event.outcome == "client_disconnected"


async def test_upstream_closing_with_1011_is_upstream_error(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, echo) as served:
            async with served.connect("/ws") as ws:
                await ws.send_message("close 1011 model crashed")
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
            event = await served.next_event()

    assert closed.value.reason is not None and closed.value.reason.code == 1011
    assert event.outcome == "upstream_error"
    assert event.error == "upstream closed the session with code 1011: model crashed"
    assert event.websocket is not None
    assert event.websocket.closed_by == "upstream"
    assert event.websocket.upstream.close_code == 1011
    assert event.websocket.upstream.close_reason == "model crashed"


async def test_app_ending_without_a_close_is_upstream_error(
    nursery: trio.Nursery,
) -> None:
    async def session(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, session) as served:
            async with served.connect("/ws") as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
            event = await served.next_event()

    # Hypercorn closes such a session with 1011 for the app.
    assert closed.value.reason is not None and closed.value.reason.code == 1011
    assert event.outcome == "upstream_error"
    assert event.error == "the app ended the session without closing it"


async def test_app_close_after_the_client_left_is_not_recorded() -> None:
    bus = InMemoryEventBus()
    incoming: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.disconnect"},
    ]

    async def session(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await receive()
        await send({"type": "websocket.close", "code": 1011})

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        pass

    async with bus.subscribe("test") as subscription:
        await InstrumentationMiddleware(websocket_app(session), bus)(
            {"type": "websocket", "path": "/ws", "headers": []}, receive, send
        )
        [event] = await subscription.receive_batch()

    assert event.websocket is not None
    assert event.websocket.client.close_code == 1005
    assert event.websocket.upstream.close_code is None
    assert event.outcome == "client_disconnected"


async def test_note_outcome_sets_the_session_outcome(nursery: trio.Nursery) -> None:
    async def session(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        note_outcome(scope, "upstream_timeout", "upstream went quiet")
        await send({"type": "websocket.close", "code": 1011})

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, session) as served:
            async with served.connect("/ws") as ws:
                with pytest.raises(ConnectionClosed):
                    await ws.get_message()
            event = await served.next_event()

    assert (event.outcome, event.error) == ("upstream_timeout", "upstream went quiet")


async def test_close_noted_as_the_proxys_is_not_recorded_as_the_upstreams(
    nursery: trio.Nursery,
) -> None:
    async def session(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        note_proxy_close(scope, 1001, "going away")
        await send({"type": "websocket.close", "code": 1001, "reason": "going away"})

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, session) as served:
            async with served.connect("/ws") as ws:
                with pytest.raises(ConnectionClosed):
                    await ws.get_message()
            event = await served.next_event()

    rendered = as_json(event)["websocket"]
    assert rendered["closed_by"] == "proxy"
    assert (rendered["proxy_close_code"], rendered["proxy_close_reason"]) == (
        1001,
        "going away",
    )
    assert rendered["upstream"]["close_code"] is None
    assert (event.outcome, event.error) == (
        "upstream_error",
        "the proxy closed the session with code 1001: going away",
    )


async def test_key_in_the_query_and_subprotocols_is_redacted_in_the_event(
    nursery: trio.Nursery,
) -> None:
    token = f"openai-insecure-api-key.{KEY}"

    async def session(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        # An upstream that picks the key: the accept names it.
        await send({"type": "websocket.accept", "subprotocol": token})
        await send({"type": "websocket.close", "code": 1000})

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, session) as served:
            async with served.connect(
                f"/ws?model=m&api_key={KEY}", subprotocols=["realtime", token]
            ) as ws:
                with pytest.raises(ConnectionClosed):
                    await ws.get_message()
            event = await served.next_event()

    rendered = as_json(event)
    assert KEY[:-4] not in event.to_json().decode()
    assert rendered["query"] == "model=m&api_key=[REDACTED]...1234"
    assert rendered["request_headers"]["sec-websocket-protocol"] == [
        "realtime, openai-insecure-api-key.[REDACTED]...1234"
    ]
    assert rendered["websocket"]["subprotocol"] == (
        "openai-insecure-api-key.[REDACTED]...1234"
    )


async def test_session_cancelled_by_the_server_is_recorded_as_shut_down(
    nursery: trio.Nursery,
) -> None:
    accepted = trio.Event()

    async def session(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        accepted.set()
        await receive()

    bus = InMemoryEventBus()
    wrapped = InstrumentationMiddleware(websocket_app(session), bus)
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with bus.subscribe("test") as subscription:
            async with trio.open_nursery() as server:
                url = await serve_asgi(server, wrapped)
                async with open_client(ws_url(url, "/ws")):
                    await accepted.wait()
                    # As when an embedding application cancels the server.
                    server.cancel_scope.cancel()
            [event] = await subscription.receive_batch()

    assert event.status == 101
    assert (event.outcome, event.error) == (
        "upstream_error",
        "cancelled: the proxy is shutting down",
    )
    assert event.websocket is not None and event.websocket.closed_by is None


# Refusals.


async def test_refusal_gives_its_status_and_body(nursery: trio.Nursery) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, refuse) as served:
            rejected = await served.refused("/v1/realtime")
            event = await served.next_event()

    assert rejected.status_code == 401
    assert event.method == "WEBSOCKET"
    assert event.status == 401
    assert event.response_body == rejected.body
    rendered = as_json(event)
    assert rendered["response_body"] == (
        '{"error": {"message": "bad key", "code": "invalid_api_key"}}'
    )
    assert rendered["outcome"] == "upstream_error"
    assert rendered["error"] == "handshake refused with status 401"
    assert rendered["websocket"]["messages"] == []
    assert rendered["llm"]["outcome_detail"] == {
        "outcome": "http_error",
        "error_type": None,
        "error_code": "invalid_api_key",
        "error_message": "bad key",
    }


async def test_close_before_accept_is_a_403_refusal(nursery: trio.Nursery) -> None:
    async def session(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.close", "code": 1008})

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, session) as served:
            rejected = await served.refused("/ws")
            event = await served.next_event()

    assert rejected.status_code == 403
    assert (event.status, event.outcome) == (403, "upstream_error")
    assert event.websocket is not None
    assert event.websocket.upstream.close_code is None


# Headers and request IDs.


async def test_handshake_secrets_are_redacted(nursery: trio.Nursery) -> None:
    headers = [(b"authorization", f"Bearer {KEY}".encode()), (b"api-key", KEY.encode())]

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, echo) as served:
            async with served.connect("/ws", extra_headers=headers) as ws:
                await talk(ws, "hi")
            event = await served.next_event()

    line = event.to_json().decode()
    assert KEY not in line
    rendered = as_json(event)["request_headers"]
    assert rendered["authorization"] == ["Bearer [REDACTED]...1234"]
    assert rendered["api-key"] == ["[REDACTED]...1234"]


async def test_client_request_id_is_kept_and_returned_in_the_accept(
    nursery: trio.Nursery,
) -> None:
    seen: list[list[tuple[bytes, bytes]]] = []

    async def session(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(list(scope["headers"]))
        await echo(scope, receive, send)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, session) as served:
            async with served.connect(
                "/ws", extra_headers=[(b"x-request-id", b"my-id-1")]
            ) as ws:
                answer_headers = dict(ws.handshake_headers)
            event = await served.next_event()

    assert event.request_id == "my-id-1"
    assert answer_headers[b"x-request-id"] == b"my-id-1"
    assert [v for n, v in seen[0] if n == b"x-request-id"] == [b"my-id-1"]
    assert as_json(event)["response_headers"]["x-request-id"] == ["my-id-1"]
    assert as_json(event)["response_headers"]["x-app"] == ["echo"]


async def test_request_id_is_generated_and_sent_to_app_and_client(
    nursery: trio.Nursery,
) -> None:
    seen: list[list[tuple[bytes, bytes]]] = []

    async def session(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(list(scope["headers"]))
        await echo(scope, receive, send)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, session) as served:
            async with served.connect(
                "/ws", extra_headers=[(b"x-request-id", b"bad\x01id")]
            ) as ws:
                answer_headers = dict(ws.handshake_headers)
            event = await served.next_event()

    generated = event.request_id.encode()
    assert generated != b"bad\x01id" and len(generated) == 32
    assert answer_headers[b"x-request-id"] == generated
    assert [v for n, v in seen[0] if n == b"x-request-id"] == [generated]


async def test_refusal_carries_the_request_id(nursery: trio.Nursery) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, refuse) as served:
            rejected = await served.refused(
                "/ws", extra_headers=[(b"x-request-id", b"r-9")]
            )
            event = await served.next_event()

    assert dict(rejected.headers or ())[b"x-request-id"] == b"r-9"
    assert event.request_id == "r-9"
    assert as_json(event)["response_headers"]["x-request-id"] == ["r-9"]


# The Realtime API's llm object.


async def test_realtime_usage_of_each_response_done_is_summed(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, realtime) as served:
            async with served.connect(
                "/v1/realtime?model=gpt-realtime",
                subprotocols=["realtime"],
            ) as ws:
                for _ in range(2):
                    await ws.send_message('{"type": "response.create"}')
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.get_message()
            event = await served.next_event()

    rendered = as_json(event)
    llm = rendered["llm"]
    assert rendered["websocket"]["subprotocol"] == "realtime"
    assert llm["api"] == "realtime"
    assert (llm["request_model"], llm["response_model"]) == (
        "gpt-realtime",
        "gpt-realtime-mock",
    )
    assert llm["responses"] == 2
    assert llm["finish_reasons"] == ["completed", "completed"]
    assert llm["output_text"] == "answer 0\nanswer 1"
    usage = llm["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (
        130,
        20,
        150,
    )
    assert usage["cached_tokens"] == 25
    assert usage["raw"]["output_token_details"] == {
        "text_tokens": 8,
        "audio_tokens": 12,
    }
    assert llm["ttft_ms"] is not None and llm["ttft_ms"] <= rendered["duration_ms"]
    assert llm["outcome_detail"]["outcome"] == "ok"
    assert rendered["outcome"] == "ok"


async def test_realtime_usage_counts_responses_beyond_the_capture_cap(
    nursery: trio.Nursery,
) -> None:
    # Room for the messages before the first response.done, not for it: both
    # response.done events are kept in the second budget.
    settings = CaptureSettings(max_response_body_bytes=900)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, realtime, settings) as served:
            async with served.connect("/v1/realtime") as ws:
                for _ in range(2):
                    await ws.send_message('{"type": "response.create"}')
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.get_message()
            event = await served.next_event()

    llm = as_json(event)["llm"]
    assert event.websocket is not None and event.websocket.messages_truncated
    assert llm["responses"] == 2
    assert llm["usage"]["total_tokens"] == 150
    assert llm["malformed_events"] == 0


def realtime_event(*server_events: Any, path: str = "/v1/realtime") -> Event:
    """An event of a session in which the upstream sent ``server_events``."""
    messages = [
        WebSocketMessage(
            False,
            float(index),
            item if isinstance(item, str) else orjson.dumps(item).decode(),
            0,
        )
        for index, item in enumerate(server_events)
    ]
    return make_event(
        timestamp=1_700_000_000.25,
        method="WEBSOCKET",
        path=path,
        status=101,
        duration_ms=100.0,
        ttfb_ms=1.0,
        request_headers=[],
        response_headers=[],
        request_body=b"",
        response_body=b"",
        streamed=True,
        websocket=WebSocketSession(messages=messages),
    )


def test_realtime_error_event_marks_an_in_band_error() -> None:
    event = realtime_event(
        {"type": "session.created", "session": {"model": "m"}},
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "code": "bad_event",
                "message": "unknown event",
            },
        },
    )

    rendered = event.to_dict()

    assert rendered["outcome"] == "upstream_error"
    assert rendered["error"] == "in-band error: unknown event"
    assert rendered["llm"]["outcome_detail"]["error_code"] == "bad_event"


@pytest.mark.parametrize(
    "junk",
    [
        "not json",
        "[1, 2]",
        '{"type": ["response.done"]}',
        '{"type": "response.done", "response": []}',
        '{"type": "response.done", "response": {"usage": {"total_tokens": "x"}}}',
        '{"type": "response.done", "response": {"output": [1, {"content": 3}]}}',
        '{"type": "session.created", "session": "m"}',
        '{"type": "error", "error": 7}',
    ],
)
def test_realtime_junk_never_breaks_the_event(junk: str) -> None:
    event = realtime_event(junk, {"type": "response.done", "response": {}})

    rendered = event.to_dict()

    assert rendered["llm"]["api"] == "realtime"
    assert rendered["llm"]["responses"] >= 1


def test_session_on_another_path_has_no_llm_object() -> None:
    event = realtime_event({"type": "hello"}, path="/chat")

    assert event.to_dict()["llm"] is None


# The JSON form.


async def test_websocket_event_round_trips_through_json(nursery: trio.Nursery) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, realtime) as served:
            async with served.connect("/v1/realtime") as ws:
                for _ in range(2):
                    await ws.send_message('{"type": "response.create"}')
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.get_message()
            event = await served.next_event()

    again = Event.from_json(event.to_json())

    # Times are rounded to the microsecond in JSON, so compare the JSON form.
    assert again.to_json() == event.to_json()
    assert again.websocket is not None and event.websocket is not None
    assert [m.data for m in again.websocket.messages] == [
        m.data for m in event.websocket.messages
    ]
    assert again.websocket.upstream == event.websocket.upstream


def test_http_event_has_no_websocket_object() -> None:
    event = attrs.evolve(realtime_event(), method="GET", websocket=None)

    assert "websocket" not in event.to_dict()
    assert Event.from_json(event.to_json()).websocket is None


async def test_events_doc_example_has_the_fields_of_a_real_session(
    nursery: trio.Nursery,
) -> None:
    documented = orjson.loads(example("websocket-event").source)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with serve_recorded(nursery, realtime) as served:
            async with served.connect("/v1/realtime") as ws:
                for _ in range(2):
                    await ws.send_message('{"type": "response.create"}')
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.get_message()
            real = as_json(await served.next_event())

    assert list(documented) == list(real)
    assert list(documented["llm"]) == list(real["llm"])
    assert list(documented["websocket"]) == list(real["websocket"])
    assert list(documented["websocket"]["client"]) == list(real["websocket"]["client"])
    assert list(documented["websocket"]["messages"][0]) == list(
        real["websocket"]["messages"][0]
    )
