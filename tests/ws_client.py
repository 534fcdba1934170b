"""A WebSocket client for tests: trio-websocket's connection over our own stream.

trio-websocket's ``open_websocket_url`` leaves its socket to the garbage
collector when the server refuses the handshake, and when the server closes
the session first; with warnings as errors, that fails whichever test runs
when the collector comes by. This client runs the same
:class:`trio_websocket.WebSocketConnection` (the real client protocol) over a
TCP stream that it closes itself, on every way out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionRejected, WebSocketConnection
from wsproto import ConnectionType, WSConnection

CLOSE_TIMEOUT_SECONDS = 5.0


@asynccontextmanager
async def open_client(
    url: str,
    *,
    subprotocols: Sequence[str] = (),
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    max_message_size: int = 32 * 1024 * 1024,
    message_queue_size: int = 1,
    receive_buffer_size: int = 64 * 1024,
) -> AsyncIterator[WebSocketConnection]:
    """Open a session with ``url`` (``ws://`` only); close it on the way out.

    Raises:
        ConnectionRejected: the server refused the handshake.
    """
    parts = urlsplit(url)
    assert parts.scheme == "ws" and parts.hostname and parts.port
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    refusal: list[ConnectionRejected] = []
    try:
        connection = WebSocketConnection(
            stream,
            WSConnection(ConnectionType.CLIENT),
            host=parts.netloc,
            path=resource,
            client_subprotocols=list(subprotocols),
            client_extra_headers=extra_headers or [],
            max_message_size=max_message_size,
            message_queue_size=message_queue_size,
            receive_buffer_size=receive_buffer_size,
        )
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                try:
                    await connection._reader_task()
                except ConnectionRejected as exc:
                    refusal.append(exc)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(read)
            await connection._open_handshake.wait()
            try:
                yield connection
            finally:
                with trio.move_on_after(CLOSE_TIMEOUT_SECONDS, shield=True):
                    await connection.aclose()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
    if refusal:
        raise refusal[0]
