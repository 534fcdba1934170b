"""The live events feed: every event, as it is published, over a WebSocket.

``llm-proxy tail --feed`` reads it. The feed has a listener of its own, apart
from the proxy's port, so it is never forwarded upstream nor recorded as an
event. Each message is one event's JSON object, byte for byte what
:meth:`Event.to_json` returns, in a text frame. When a client has lost events
because it read too slowly, it gets a notice before the next event::

    {"events_feed_notice": "dropped", "dropped": 12, "total_dropped": 40}

``dropped`` counts the events lost since the last notice and
``total_dropped`` those lost since the client connected. No event has an
``events_feed_notice`` field.

Each connected client is one more subscriber of the in-process bus, with a
buffer of its own (:data:`CLIENT_BUFFER_EVENTS` events and
:data:`CLIENT_BUFFER_BYTES` of bodies waiting). Its task renders the events
in a worker thread (as the sinks do) and sends them. A client that reads
slowly fills only its own buffer and loses only its own events, counted by
the bus: the request path and the other subscribers never wait for it.

Each connection runs in a handler of the feed's own, around trio-websocket's
server side of it (:func:`trio_websocket.wrap_server_stream`): whatever the
client does (reset the socket, send something that is not WebSocket) and
whatever trio-websocket raises about it ends that connection only, with one
DEBUG line.

The feed serves at most :data:`MAX_CLIENTS` clients at once (each holds a
socket, a task and a buffer); one more is refused at its handshake with 503
and a one-line reason, and the server logs one WARNING about it at most
every :data:`FULL_WARNING_INTERVAL_SECONDS`, with the number refused since.

Access: a client that sends an ``Origin`` header (every browser does) is
refused with 403, so that a web page cannot read the feed of an operator's
machine; a feed with a token refuses a client without
``Authorization: Bearer <token>`` with 401, and one with a wrong token with
403, before any event is sent.

Stopping: :meth:`EventsFeed.stop` stops accepting clients at once; each
client then receives what its subscription still delivers (everything
published before the bus was closed) and is closed with code 1001 (going
away), within :data:`CLOSE_GRACE_SECONDS`. Clients are not sinks: what they
have not received by then is neither sent, nor reported to them, nor counted
as lost by the drain.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import math
from functools import partial
from typing import Final

import attrs
import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    Endpoint,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)
from wsproto.utilities import ProtocolError

from ._bus import EventBus, Subscription
from ._config import ListenFailed, check_events_feed, parse_events_feed_address
from ._memory_bus import InMemoryEventBus
from ._rendering import render_events

#: Events rendered and sent together.
SEND_BATCH_EVENTS: Final = 16
#: What may wait for one tail: a viewer that falls this far behind loses
#: events rather than holding the memory of the sinks' whole buffer.
CLIENT_BUFFER_EVENTS: Final = 256
CLIENT_BUFFER_BYTES: Final = 32 * 1024 * 1024
#: How long clients get, once the feed stops, to receive what is left.
CLOSE_GRACE_SECONDS: Final = 1.0
#: The closing handshake with one client, after the grace period.
CLOSE_HANDSHAKE_SECONDS: Final = 0.5
#: A client must finish its opening handshake within this.
HANDSHAKE_TIMEOUT_SECONDS: Final = 10.0
#: Clients send nothing but control frames; anything bigger is refused.
MAX_CLIENT_MESSAGE_BYTES: Final = 4096
#: Clients served at once; one more is refused with 503 at its handshake.
MAX_CLIENTS: Final = 64
#: A full feed logs the clients it refused at most this often (a script
#: that retries in a loop would otherwise fill the log).
FULL_WARNING_INTERVAL_SECONDS: Final = 60.0
#: WebSocket close code "going away": the server is shutting down.
GOING_AWAY: Final = 1001
SUBSCRIBER_PREFIX: Final = "events-feed-"
#: What a client that breaks off, resets or speaks something other than
#: WebSocket raises, from trio-websocket's tasks as well as from ours.
_CONNECTION_TROUBLE: Final = (
    ConnectionClosed,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ProtocolError,
)

logger = logging.getLogger(__name__)


def _notice(dropped: int, total: int) -> str:
    notice = {
        "events_feed_notice": "dropped",
        "dropped": dropped,
        "total_dropped": total,
    }
    return orjson.dumps(notice).decode("ascii")


def _address_of(listener: trio.SocketListener) -> str:
    host, port, *_ = listener.socket.getsockname()
    return f"{Endpoint(host, port, is_ssl=False).url}/"


def _peer_of(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:  # the client is gone already
        return "a client"
    return f"{host}:{port}"


def _header(request: WebSocketRequest, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value
    return None


def _refusal(request: WebSocketRequest, token: bytes | None) -> tuple[int, str] | None:
    """The status and reason to refuse ``request`` with, or None to accept it."""
    if request.path.split("?", 1)[0] != "/":
        return 404, "the events feed is at /"
    if _header(request, b"origin") is not None:
        return 403, "browsers may not read the events feed"
    if token is None:
        return None
    authorization = _header(request, b"authorization")
    if authorization is None:
        return 401, "the events feed needs a bearer token"
    scheme, _, given = authorization.partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), token):
        return 403, "wrong token for the events feed"
    return None


class _WatchedStream(trio.abc.Stream):
    """A client's stream that tells when the client can send no more.

    trio-websocket's reader task stops when the client closes, resets or
    sends something that is not WebSocket, but a handshake still waits for
    its timeout; :attr:`ended` lets the handler stop waiting at once.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.ended = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            data = await self._stream.receive_some(max_bytes)
        except BaseException:
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        return data

    async def aclose(self) -> None:
        self.ended.set()
        await self._stream.aclose()


async def _handshake(
    nursery: trio.Nursery, stream: _WatchedStream
) -> WebSocketRequest | None:
    """The client's opening handshake, or None if it left or took too long."""
    request = None
    with trio.move_on_after(HANDSHAKE_TIMEOUT_SECONDS) as waiting:

        async def give_up_when_ended() -> None:
            await stream.ended.wait()
            waiting.cancel()

        async with trio.open_nursery() as watch:
            watch.start_soon(give_up_when_ended)
            request = await wrap_server_stream(
                nursery, stream, max_message_size=MAX_CLIENT_MESSAGE_BYTES
            )
            watch.cancel_scope.cancel()
    return request


@attrs.define(eq=False)
class _Client:
    """One connected tail: its bus subscription and what it lost."""

    connection: WebSocketConnection
    name: str
    sent: int = 0
    dropped: int = 0

    async def serve(self, bus: InMemoryEventBus) -> None:
        """Send every event of ``bus`` until it closes or the client leaves."""
        async with (
            bus.subscribe(
                self.name,
                batch_size=SEND_BATCH_EVENTS,
                buffer_size=CLIENT_BUFFER_EVENTS,
                max_buffered_bytes=CLIENT_BUFFER_BYTES,
            ) as subscription,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._watch_client, nursery.cancel_scope)
            try:
                await self._send_all(subscription, bus)
            except ConnectionClosed:
                pass  # the client left while an event was on its way
            nursery.cancel_scope.cancel()

    async def _watch_client(self, scope: trio.CancelScope) -> None:
        # Reading is how a closed or vanished client is noticed while no
        # event is due; a client has nothing to say, so messages are ignored.
        try:
            while True:
                await self.connection.get_message()
        except ConnectionClosed:
            scope.cancel()

    async def _send_all(self, subscription: Subscription, bus: EventBus) -> None:
        async for batch in subscription:
            # Rendered without stalling the loop; each event keeps its JSON.
            await render_events(batch)
            for event in batch:
                await self.connection.send_message(event.to_json().decode())
            self.sent += len(batch)
            await self._report_drops(bus)

    async def _report_drops(self, bus: EventBus) -> None:
        # The bus counts what this subscriber lost while its buffer was full.
        stats = bus.statistics().subscribers.get(self.name)
        total = stats.dropped if stats is not None else 0
        if total > self.dropped:
            notice = _notice(total - self.dropped, total)
            self.dropped = total
            await self.connection.send_message(notice)


@attrs.define(eq=False)
class _NamePool:
    """Subscriber names, the lowest free number first.

    Reusing names keeps the bus's per-subscriber statistics (and the metrics
    labels made from them) as many as the most clients ever connected at
    once, not as many as ever connected.
    """

    _taken: set[int] = attrs.Factory(set)

    def take(self) -> int:
        number = next(n for n in itertools.count(1) if n not in self._taken)
        self._taken.add(number)
        return number

    def give_back(self, number: int) -> None:
        self._taken.discard(number)


@attrs.define(eq=False)
class EventsFeed:
    """A WebSocket server that sends every event of a bus to its clients.

    Start it with ``address = await nursery.start(feed.serve, bus)``; it
    reports its address as ``ws://HOST:PORT/`` (with the bound port when
    ``listen`` asks for port 0) and runs until :meth:`stop` or cancellation.

    Args:
        listen: ``HOST:PORT``, or a port alone for 127.0.0.1.
        token: the bearer token clients must send; required when ``listen``
            is not a loopback address.
        max_clients: clients served at once; one more is refused with 503.

    Raises:
        ConfigError: ``listen`` is malformed, or it is not loopback and no
            token is given. :meth:`serve` raises :class:`ListenFailed` when
            it cannot bind ``listen``.
        ValueError: ``max_clients`` is less than 1.
    """

    listen: str = attrs.field(converter=parse_events_feed_address)
    _token: str | None = attrs.field(default=None, repr=False, alias="token")
    max_clients: int = attrs.field(default=MAX_CLIENTS, kw_only=True)
    _stopping: trio.Event = attrs.field(factory=trio.Event, init=False)
    _names: _NamePool = attrs.field(factory=_NamePool, init=False)
    _connected: int = attrs.field(default=0, init=False)
    _refused_full: int = attrs.field(default=0, init=False)
    _full_warned_at: float = attrs.field(default=-math.inf, init=False)

    def __attrs_post_init__(self) -> None:
        check_events_feed(self.listen, self._token)
        if self.max_clients < 1:
            msg = f"max_clients must be at least 1, got {self.max_clients!r}"
            raise ValueError(msg)

    def stop(self) -> None:
        """Stop accepting clients; the connected ones finish, then close."""
        self._stopping.set()

    async def serve(
        self,
        bus: InMemoryEventBus,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the feed of ``bus`` until stopped or cancelled.

        Once stopped it returns within :data:`CLOSE_GRACE_SECONDS` and the
        closing handshakes; clients still connected then are closed with 1001.
        """
        host, port = self.listen.rsplit(":", 1)
        host = host.removeprefix("[").removesuffix("]")
        if host.lower() == "localhost":
            # One socket, so one port even for port 0 (not ::1 and 127.0.0.1).
            host = "127.0.0.1"
        try:
            listeners = await trio.open_tcp_listeners(int(port), host=host)
        except OSError as exc:
            raise ListenFailed("events_feed", self.listen, exc) from exc
        address = _address_of(listeners[0])
        # Each connection gets a handler of ours, which owns all of
        # trio-websocket's work for it: see _handle.
        handler = partial(self._handle, bus)
        async with trio.open_nursery() as clients:
            accepting = trio.CancelScope()

            async def accept(*, task_status: trio.TaskStatus[object]) -> None:
                with accepting:
                    await trio.serve_listeners(
                        handler,
                        listeners,
                        handler_nursery=clients,
                        task_status=task_status,
                    )

            await clients.start(accept)
            logger.info("events feed on %s", address)
            task_status.started(address)
            await self._stopping.wait()
            accepting.cancel()
            clients.cancel_scope.deadline = trio.current_time() + CLOSE_GRACE_SECONDS

    async def _handle(self, bus: InMemoryEventBus, stream: trio.SocketStream) -> None:
        """Serve one connection; whatever happens to it ends only it.

        The handlers run in the feed's nursery, inside the event pipeline's.
        trio-websocket's reader task raises from inside the connection's
        nursery (a client that resets the socket while its bad request is
        answered 400, say), so the guard is around that nursery, not only
        around our part of the work.
        """
        peer = _peer_of(stream)
        try:
            async with trio.open_nursery() as nursery:
                request = await _handshake(nursery, _WatchedStream(stream))
                if request is None:
                    logger.debug("events feed: %s sent no handshake", peer)
                else:
                    await self._serve_client(bus, request, peer)
                # Ends trio-websocket's reader task, done or not.
                nursery.cancel_scope.cancel()
        except* _CONNECTION_TROUBLE as group:
            logger.debug(
                "events feed: the connection of %s broke off: %r",
                peer,
                group.exceptions[0],
            )
        except* Exception:
            logger.exception("events feed: the connection of %s failed", peer)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_client(
        self, bus: InMemoryEventBus, request: WebSocketRequest, peer: str
    ) -> None:
        token = None if self._token is None else self._token.encode()
        refusal = _refusal(request, token)
        if refusal is not None:
            status, reason = refusal
            logger.info("events feed: refused %s: %s", peer, reason)
            headers = [(b"www-authenticate", b"Bearer")] if status == 401 else []
            await request.reject(status, extra_headers=headers, body=reason.encode())
            return
        if self._connected >= self.max_clients:
            self._note_full(peer)
            reason = (
                f"the events feed serves at most {self.max_clients} clients "
                "at once; try again later"
            )
            await request.reject(503, body=reason.encode())
            return
        # Counted before the accept, so that clients accepted meanwhile
        # cannot take the feed past its maximum.
        self._connected += 1
        try:
            await self._serve_accepted(bus, request, peer)
        finally:
            self._connected -= 1

    def _note_full(self, peer: str) -> None:
        """Count a client refused because the feed is full; warn if one is due."""
        self._refused_full += 1
        now = trio.current_time()
        if now - self._full_warned_at < FULL_WARNING_INTERVAL_SECONDS:
            logger.debug("events feed: refused %s: the feed is full", peer)
            return
        logger.warning(
            "events feed: refused %s: it serves at most %d clients at once "
            "(%d refused since this was last logged)",
            peer,
            self.max_clients,
            self._refused_full,
        )
        self._refused_full = 0
        self._full_warned_at = now

    async def _serve_accepted(
        self, bus: InMemoryEventBus, request: WebSocketRequest, peer: str
    ) -> None:
        connection = await request.accept()
        number = self._names.take()
        client = _Client(connection, f"{SUBSCRIBER_PREFIX}{number}")
        logger.info("events feed: %s connected", peer)
        try:
            await client.serve(bus)
        finally:
            self._names.give_back(number)
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(CLOSE_HANDSHAKE_SECONDS),
            ):
                await connection.aclose(GOING_AWAY, "the proxy is shutting down")
            logger.info(
                "events feed: %s left (%d event(s) sent, %d dropped)",
                peer,
                client.sent,
                client.dropped,
            )
