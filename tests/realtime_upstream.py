"""A local Realtime-like WebSocket upstream, written with trio-websocket's server.

It speaks a small part of the OpenAI Realtime API's shape: JSON events in,
JSON events and binary audio frames out. On connect it sends
``session.created``; ``session.update`` is answered with ``session.updated``;
``response.create`` with ``response.created``, two binary audio frames and a
``response.done`` that carries ``usage``.

Test commands, as JSON events:

- ``{"type": "test.echo", ...}``: the message is sent back exactly as received
  (binary messages are always echoed);
- ``{"type": "test.close", "code": 1011, "reason": "..."}``: the upstream
  closes the session with that code and reason;
- ``{"type": "test.binary", "size": N}``: one binary frame of N bytes;
- ``{"type": "test.ping"}``: the upstream pings its peer and, once the pong
  is back, sends ``{"type": "test.pong"}``;
- ``{"type": "test.drop"}``: the upstream drops the TCP connection without a
  close frame.

:func:`serve_hostile_upstream` serves a raw-socket upstream that answers the
handshake with whatever bytes a test writes, for answers no WebSocket
library would send.

A handshake whose query has ``refuse=STATUS`` is refused with that status,
an ``x-refusal`` header and an OpenAI-style JSON error body. Every session
is recorded: its resource, headers, subprotocol, what it received, and how
and when it was closed.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
from collections.abc import Callable
from functools import partial
from typing import Final
from urllib.parse import parse_qs, urlsplit

import attrs
import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
    serve_websocket,
)

REFUSAL_BODY: Final = orjson.dumps(
    {
        "error": {
            "message": "Incorrect API key provided",
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        }
    }
)
USAGE: Final = {
    "total_tokens": 60,
    "input_tokens": 20,
    "output_tokens": 40,
    "input_token_details": {"text_tokens": 12, "audio_tokens": 8, "cached_tokens": 0},
    "output_token_details": {"text_tokens": 10, "audio_tokens": 30},
}
AUDIO_FRAMES: Final = (bytes(range(256)) * 16, b"\x00\xff" * 1000)
# Upstream messages may be larger than trio-websocket's 1 MiB default.
MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
# What the server answers in its handshake, beside the WebSocket headers.
REPLY_HEADERS: Final = [(b"x-upstream-session", b"sess_1"), (b"openai-version", b"v1")]


@attrs.define(eq=False)
class Session:
    """What the upstream saw of one session."""

    resource: str
    headers: list[tuple[bytes, bytes]]
    subprotocol: str | None = None
    offered: list[str] = attrs.field(factory=list)
    received: list[str | bytes] = attrs.field(factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    closed_at: float | None = None
    closed: trio.Event = attrs.field(factory=trio.Event)

    def header(self, name: bytes) -> list[bytes]:
        """The values of header ``name`` (lower case) in the handshake."""
        return [value for key, value in self.headers if key.lower() == name]


@attrs.define(eq=False)
class RealtimeUpstream:
    """The running upstream: its URL and the sessions it has seen.

    ``subprotocols`` are the ones it accepts, in its order of preference.
    """

    subprotocols: tuple[str, ...] = ("realtime", "openai-beta.realtime-v1")
    url: str = ""
    sessions: list[Session] = attrs.field(factory=list)
    connected: trio.Event = attrs.field(factory=trio.Event)

    async def handle(self, request: WebSocketRequest) -> None:
        """Serve one session (trio-websocket's handler)."""
        query = parse_qs(urlsplit(request.path).query)
        session = Session(request.path, list(request.headers))
        self.sessions.append(session)
        if "refuse" in query:
            status = int(query["refuse"][0])
            await request.reject(
                status,
                extra_headers=[
                    (b"content-type", b"application/json"),
                    (b"x-refusal", b"yes"),
                ],
                body=REFUSAL_BODY,
            )
            session.closed.set()
            return
        offered = request.proposed_subprotocols
        session.offered = list(offered)
        chosen = next((p for p in self.subprotocols if p in offered), None)
        session.subprotocol = chosen
        ws = await request.accept(subprotocol=chosen, extra_headers=REPLY_HEADERS)
        self.connected.set()
        try:
            await _send_json(ws, {"type": "session.created", "session": {"id": "s1"}})
            while True:
                message = await ws.get_message()
                session.received.append(message)
                await _answer(ws, message)
        except ConnectionClosed as exc:
            if exc.reason is not None:
                session.close_code = exc.reason.code
                session.close_reason = exc.reason.reason
        finally:
            session.closed_at = trio.current_time()
            session.closed.set()


async def _send_json(ws: WebSocketConnection, event: dict[str, object]) -> None:
    await ws.send_message(orjson.dumps(event).decode())


async def _answer(ws: WebSocketConnection, message: str | bytes) -> None:
    if isinstance(message, bytes):
        await ws.send_message(message)
        return
    event = orjson.loads(message)
    kind = event.get("type")
    if kind == "test.echo":
        await ws.send_message(message)
    elif kind == "test.close":
        await ws.aclose(event["code"], event.get("reason"))
    elif kind == "test.binary":
        await ws.send_message(bytes(i % 251 for i in range(event["size"])))
    elif kind == "test.ping":
        with trio.fail_after(2):
            await ws.ping(b"upstream ping")
        await _send_json(ws, {"type": "test.pong"})
    elif kind == "test.drop":
        # trio-websocket has no public way to drop a connection abruptly.
        await ws._stream.aclose()
    elif kind == "session.update":
        await _send_json(ws, {"type": "session.updated", "session": event["session"]})
    elif kind == "response.create":
        await _send_response(ws)


async def _send_response(ws: WebSocketConnection) -> None:
    response = {"id": "resp_1", "object": "realtime.response", "status": "in_progress"}
    await _send_json(ws, {"type": "response.created", "response": response})
    for frame in AUDIO_FRAMES:
        await ws.send_message(frame)
    done = {**response, "status": "completed", "usage": USAGE}
    await _send_json(ws, {"type": "response.done", "response": done})


async def serve_realtime_upstream(
    nursery: trio.Nursery,
    upstream: RealtimeUpstream | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> RealtimeUpstream:
    """Serve a Realtime-like upstream on a free loopback port, in ``nursery``.

    Returns it once it listens; its ``url`` is ``http://127.0.0.1:PORT``
    (``https://`` with ``ssl_context``), the base URL the proxy is given.
    """
    upstream = upstream or RealtimeUpstream()
    server: WebSocketServer = await nursery.start(
        partial(
            serve_websocket,
            upstream.handle,
            "127.0.0.1",
            0,
            ssl_context=ssl_context,
            max_message_size=MAX_MESSAGE_BYTES,
            connect_timeout=5,
            disconnect_timeout=5,
        )
    )
    scheme = "http" if ssl_context is None else "https"
    upstream.url = f"{scheme}://127.0.0.1:{server.port}"
    return upstream


# RFC 6455's key for Sec-WebSocket-Accept.
_ACCEPT_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_token(key: bytes) -> bytes:
    """The valid ``Sec-WebSocket-Accept`` for the handshake's ``key``."""
    return base64.b64encode(hashlib.sha1(key + _ACCEPT_GUID).digest())


def switching_protocols(accept: bytes, *extra: bytes) -> bytes:
    """A ``101`` head with ``accept`` and the ``extra`` header lines."""
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + accept,
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def serve_hostile_upstream(
    nursery: trio.Nursery, answer: Callable[[bytes], bytes]
) -> str:
    """Serve an upstream that answers each handshake with ``answer(key)``.

    ``key`` is the handshake's ``Sec-WebSocket-Key``; the bytes returned are
    written as they are (a head, and frames after it, say), then the
    connection stays open until the peer closes it or 5 seconds pass.
    Returns the base URL, ``http://127.0.0.1:PORT``.
    """

    async def serve(stream: trio.SocketStream) -> None:
        head = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some(65536)
                if not data:
                    return
                head += data
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            try:
                await stream.send_all(answer(key))
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
