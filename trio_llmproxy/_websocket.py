"""The WebSocket relay: each client session carried to the upstream and back.

A ``websocket`` scope is relayed to the same path and query on the upstream
(``ws://`` for an ``http://`` upstream, ``wss://`` for ``https://``), with
trio-websocket as the client. The handshake carries the client's end-to-end
headers and subprotocols; the upstream's choice of subprotocol and its
end-to-end reply headers come back in ``websocket.accept``. An upstream that
refuses the handshake has its status, headers and body passed on through the
ASGI ``websocket.http.response`` extension.

Once both sides are open, each session runs in a nursery of its own, with a
task per direction that relays one message at a time, as it arrives. The
first side to close, fail or be cancelled ends the session: its close code
and reason are passed on to the other side, which is closed within
:data:`CLOSE_TIMEOUT_SECONDS`. Server shutdown (``going_away``) and
cancellation close both sides with 1001, "going away". The upstream
connection is closed on every way out.

The relay opens the upstream's TCP (and TLS) stream itself and runs
trio-websocket's connection over it, rather than through ``open_websocket``:
that one leaves its socket to the garbage collector when the handshake is
refused, and when the upstream closes the session first. This needs three
of trio-websocket's private members (the reader task, the open-handshake
event, and the event that says the upstream sent a close frame), named in
:func:`_read_upstream`, :func:`_wait_open` and :func:`_upstream_to_client`.

Each session counts, from its handshake to its end, against the limit it
shares with HTTP requests (``--max-concurrent-requests``); a handshake beyond
it is refused with 503, ``overloaded``, without contacting the upstream.

A close the proxy makes itself (at shutdown, on a failure, or because the
upstream broke the protocol, sent too large a message or dropped its
connection) is told to the middleware with :func:`note_proxy_close` before
it is sent, so the event does not record it as the upstream's.
"""

from __future__ import annotations

import logging
import ssl
from typing import Final

import attrs
import h11
import httpx
import trio
import wsproto.utilities
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection
from wsproto import ConnectionType, WSConnection

from ._asgi import Message, Receive, Scope, Send
from ._errors import (
    ClientError,
    Overloaded,
    ProxyError,
    UpstreamError,
    UpstreamTimeout,
    is_cancellation,
)
from ._middleware import note_outcome, note_proxy_close
from ._proxy import DEFAULT_MAX_CONCURRENT_REQUESTS, ConcurrencyLimit, error_body
from ._redact import redact_url
from ._upstream import Upstream, end_to_end_headers

# The largest message relayed in either direction: the same as Hypercorn's
# default websocket_max_message_size, which bounds what clients may send.
# A larger message from the upstream closes the session with 1009.
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
# How long the relay waits for a side's close handshake (or for a close
# frame to be written) before it drops that connection.
CLOSE_TIMEOUT_SECONDS: Final = 1.0
# trio-websocket reads 4 KiB at a time by default: a 16 MiB message would
# take 4,096 reads.
RECEIVE_BUFFER_BYTES: Final = 64 * 1024
# The handshake's own headers: the WebSocket client library writes its own
# for the upstream, and Hypercorn its own for the client.
_HANDSHAKE_HEADERS: Final = frozenset(
    {
        b"host",
        b"sec-websocket-accept",
        b"sec-websocket-extensions",
        b"sec-websocket-key",
        b"sec-websocket-protocol",
        b"sec-websocket-version",
        # A handshake has no body; these would only describe a framing the
        # relay does not forward.
        b"content-length",
    }
)
# Close codes an endpoint may put in a close frame (RFC 6455 section 7.4 and
# the IANA registry, as far as wsproto accepts them). 1005, 1006 and 1015
# only ever describe a close that had no frame.
_SENDABLE_CODES: Final = frozenset({1000, 1001, 1002, 1003, *range(1007, 1014)})
GOING_AWAY_CODE: Final = 1001
GOING_AWAY_REASON: Final = "going away"
_INTERNAL_ERROR_CODE: Final = 1011
_POLICY_VIOLATION_CODE: Final = 1008
_MESSAGE_TOO_BIG_CODE: Final = 1009
_TRY_AGAIN_LATER_CODE: Final = 1013
# What trio-websocket raises when the upstream's answer to the handshake is
# not a valid one (a wrong Sec-WebSocket-Accept, a subprotocol the client
# never offered, a head too large or not HTTP): its reader tries to answer
# with a refusal, which a client may not send.
_HANDSHAKE_ERRORS: Final = (h11.LocalProtocolError, wsproto.utilities.ProtocolError)
_HTTP_RESPONSE_EXTENSION: Final = "websocket.http.response"

logger = logging.getLogger(__name__)


def sendable_close_code(code: int | None, fallback: int) -> int:
    """Return ``code`` if a close frame may carry it, otherwise ``fallback``."""
    if code is not None and (code in _SENDABLE_CODES or 3000 <= code <= 4999):
        return code
    return fallback


def _client_close_code(code: int | None) -> int:
    # 1005: the client closed without a code, a normal close. 1006 (what
    # Hypercorn reports for every close by the client, clean or not): the
    # client is gone, and the upstream is told so.
    if code == 1005:
        return 1000
    return sendable_close_code(code, GOING_AWAY_CODE)


@attrs.frozen
class _Closed:
    """How a session ended: which side ended it, with what code and reason."""

    # "client", "upstream" (it sent a close frame), "upstream_fault" (the
    # proxy closes: the upstream dropped, broke the protocol or sent too
    # much), "shutdown" or "error" (the proxy failed).
    side: str
    code: int
    reason: str | None = None


@attrs.define
class _Session:
    """One relayed session: the first side to end it wins."""

    upstream: WebSocketConnection
    cancel_scope: trio.CancelScope
    closed: _Closed | None = None

    def end(self, closed: _Closed) -> None:
        if self.closed is None:
            self.closed = closed
        self.cancel_scope.cancel()


def _has_response_extension(scope: Scope) -> bool:
    return _HTTP_RESPONSE_EXTENSION in (scope.get("extensions") or {})


async def _close_client(send: Send, code: int, reason: str | None) -> None:
    message: Message = {"type": "websocket.close", "code": code}
    if reason:
        message["reason"] = reason
    await send(message)


async def _respond(
    scope: Scope,
    send: Send,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    close_code: int,
    close_reason: str,
) -> None:
    """Answer the handshake with an HTTP response, or where ASGI cannot, a close.

    Without the ``websocket.http.response`` extension, a close before the
    accept reaches the client as a bare 403; accepting first and then
    closing with ``close_code`` at least carries ``close_reason``.
    """
    if _has_response_extension(scope):
        headers = [*headers, (b"content-length", str(len(body)).encode("ascii"))]
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": headers,
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "websocket.accept"})
    await _close_client(send, close_code, close_reason)


async def _respond_error(scope: Scope, send: Send, exc: ProxyError) -> None:
    """Refuse the handshake with ``exc``'s status and OpenAI-style JSON body."""
    if isinstance(exc, Overloaded):
        close_code = _TRY_AGAIN_LATER_CODE
    elif isinstance(exc, ClientError):
        close_code = _POLICY_VIOLATION_CODE
    else:
        close_code = _INTERNAL_ERROR_CODE
    await _respond(
        scope,
        send,
        exc.status,
        [(b"content-type", b"application/json")],
        error_body(exc),
        close_code=close_code,
        close_reason=str(exc),
    )


@attrs.define(eq=False)
class _Handshake:
    """How the upstream's handshake went, once ``settled`` is set."""

    settled: trio.Event = attrs.field(factory=trio.Event)
    opened: bool = False
    refusal: ConnectionRejected | None = None
    timed_out: bool = False
    invalid: str | None = None


async def _read_upstream(
    connection: WebSocketConnection, handshake: _Handshake
) -> None:
    """Run trio-websocket's reader for ``connection`` (it sends the handshake)."""
    try:
        await connection._reader_task()  # private: see the module docstring
    except ConnectionRejected as exc:
        handshake.refusal = exc
    except _HANDSHAKE_ERRORS as exc:
        if handshake.opened:
            raise
        # The reader failed answering the upstream's invalid reply; what was
        # wrong with the reply is the error it was handling.
        cause = exc.__context__ if exc.__context__ is not None else exc
        handshake.invalid = str(cause) or type(cause).__name__
    finally:
        # The reader also ends, without a refusal, when the upstream drops
        # the connection during the handshake.
        handshake.settled.set()


async def _wait_open(connection: WebSocketConnection, handshake: _Handshake) -> None:
    await connection._open_handshake.wait()  # private: see the module docstring
    handshake.opened = True
    handshake.settled.set()


class WebSocketRelay:
    """ASGI app that relays every WebSocket session to one upstream.

    Args:
        upstream_url: base URL of the upstream (``http://`` or ``https://``);
            the session's path and query are appended to it.
        connect_timeout: the longest wait for the upstream's TCP (and TLS)
            connection and its handshake reply; the client then gets 504.
        going_away: once set (at server shutdown), every open session is
            closed on both sides with 1001, "going away".
        max_message_bytes: the largest message taken from the upstream; a
            larger one closes the session with 1009.
        concurrency: the limit on sessions at once, shared with the app's
            HTTP proxy (``--max-concurrent-requests``); a handshake beyond it
            is refused with 503 without contacting the upstream. Without it,
            the relay has a limit of its own of
            :data:`DEFAULT_MAX_CONCURRENT_REQUESTS`.
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        connect_timeout: float,
        going_away: trio.Event | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        concurrency: ConcurrencyLimit | None = None,
    ) -> None:
        self._upstream_url = upstream_url
        self._upstream = Upstream.from_url(upstream_url)
        use_ssl = self._upstream.scheme == "https"
        # The same trust as the HTTP side's httpx client (certifi's bundle,
        # or what SSL_CERT_FILE or SSL_CERT_DIR names), made here, at start,
        # since loading the CA bundle blocks for tens of milliseconds.
        self._ssl_context: ssl.SSLContext | None = (
            httpx.create_ssl_context() if use_ssl else None
        )
        self._port = self._upstream.port or (443 if use_ssl else 80)
        host = self._upstream.host
        if ":" in host:
            host = f"[{host}]"
        self._host_header = (
            host if self._upstream.port is None else f"{host}:{self._port}"
        )
        self._connect_timeout = connect_timeout
        self._going_away = going_away
        self._max_message_bytes = max_message_bytes
        if concurrency is None:
            concurrency = ConcurrencyLimit(DEFAULT_MAX_CONCURRENT_REQUESTS)
        self._concurrency = concurrency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            msg = f"the WebSocket relay got a {scope['type']!r} scope"
            raise RuntimeError(msg)
        if (await receive())["type"] != "websocket.connect":
            # The client left before its handshake reached the app.
            return
        # A session holds two sockets for as long as it lasts: it counts
        # against the same limit as an HTTP request, from its handshake on.
        if not self._concurrency.try_take():
            overloaded = self._concurrency.overloaded()
            note_outcome(scope, "ok", str(overloaded))
            await _respond_error(scope, send, overloaded)
            return
        try:
            await self._session(scope, receive, send)
        finally:
            self._concurrency.give_back()

    async def _session(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Open the upstream session and relay it, or answer why there is none."""
        try:
            resource = self._resource(scope)
        except ClientError as exc:
            note_outcome(scope, "ok", str(exc))
            await _respond_error(scope, send, exc)
            return

        deadline = trio.current_time() + self._connect_timeout
        try:
            stream = await self._open_stream(deadline)
        except UpstreamError as exc:
            await self._fail_handshake(scope, send, exc)
            return
        try:
            handshake = await self._run(
                scope, receive, send, stream, resource, deadline
            )
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT_SECONDS, shield=True):
                await stream.aclose()
        if handshake.refusal is not None:
            await self._pass_refusal(scope, send, handshake.refusal)
        elif not handshake.opened:
            where = redact_url(self._upstream_url)
            if handshake.invalid is not None:
                error: UpstreamError = UpstreamError(
                    f"the upstream {where} answered the WebSocket handshake "
                    f"invalidly: {handshake.invalid}"
                )
            elif handshake.timed_out:
                error = UpstreamTimeout(
                    f"timed out opening a WebSocket session with the upstream {where}"
                )
            else:
                error = UpstreamError(
                    f"the upstream {where} closed the connection during the "
                    "WebSocket handshake"
                )
            await self._fail_handshake(scope, send, error)

    def _resource(self, scope: Scope) -> str:
        """The upstream's resource (path and query) for the session.

        Raises:
            ClientError: the path could climb out of the upstream's base path.
        """
        url = self._upstream.target(
            scope.get("raw_path") or scope["path"].encode("utf-8"),
            scope.get("query_string", b""),
        )
        return url.raw_path.decode("ascii")

    async def _open_stream(self, deadline: float) -> trio.abc.Stream:
        """Connect to the upstream, by ``deadline``.

        Raises:
            UpstreamError: the upstream cannot be reached.
            UpstreamTimeout: it could not be reached in time.
        """
        host, port = self._upstream.host, self._port
        where = redact_url(self._upstream_url)
        try:
            with trio.fail_at(deadline):
                if self._ssl_context is None:
                    return await trio.open_tcp_stream(host, port)
                return await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=self._ssl_context, https_compatible=True
                )
        except trio.TooSlowError:
            msg = f"timed out connecting to the upstream {where}"
            raise UpstreamTimeout(msg) from None
        except OSError as exc:
            msg = f"cannot connect to the upstream {where}"
            raise UpstreamError(msg) from exc

    async def _run(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        stream: trio.abc.Stream,
        resource: str,
        deadline: float,
    ) -> _Handshake:
        """Hold the handshake over ``stream``; once open, relay the session.

        Returns how the handshake went, for the caller to answer a failed one
        once the stream is closed.
        """
        connection = WebSocketConnection(
            stream,
            WSConnection(ConnectionType.CLIENT),
            host=self._host_header,
            path=resource,
            client_subprotocols=list(scope.get("subprotocols") or ()),
            client_extra_headers=end_to_end_headers(
                scope["headers"], also_drop=_HANDSHAKE_HEADERS
            ),
            max_message_size=self._max_message_bytes,
            receive_buffer_size=RECEIVE_BUFFER_BYTES,
        )
        handshake = _Handshake()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_upstream, connection, handshake)
            nursery.start_soon(_wait_open, connection, handshake)
            with trio.move_on_at(deadline):
                await handshake.settled.wait()
            handshake.timed_out = not handshake.settled.is_set()
            if handshake.opened:
                await send(
                    {
                        "type": "websocket.accept",
                        "subprotocol": connection.subprotocol,
                        "headers": end_to_end_headers(
                            connection.handshake_headers, also_drop=_HANDSHAKE_HEADERS
                        ),
                    }
                )
                await self._relay(scope, receive, send, connection)
            # The session is over (or never began): stop the reader.
            nursery.cancel_scope.cancel()
        return handshake

    async def _pass_refusal(
        self, scope: Scope, send: Send, exc: ConnectionRejected
    ) -> None:
        """Give the client the upstream's refusal: status, headers and body."""
        status = exc.status_code
        logger.debug("the upstream refused a WebSocket handshake: %d", status)
        headers = end_to_end_headers(exc.headers, also_drop=_HANDSHAKE_HEADERS)
        reason = f"the upstream refused the WebSocket handshake with status {status}"
        await _respond(
            scope,
            send,
            status,
            headers,
            exc.body or b"",
            close_code=_POLICY_VIOLATION_CODE
            if 400 <= status < 500
            else _INTERNAL_ERROR_CODE,
            close_reason=reason,
        )

    async def _fail_handshake(
        self, scope: Scope, send: Send, error: UpstreamError
    ) -> None:
        """Answer 502 or 504 when the upstream cannot be reached in time."""
        if isinstance(error, UpstreamTimeout):
            note_outcome(scope, "upstream_timeout", str(error))
        else:
            note_outcome(scope, "upstream_error", str(error))
        logger.debug("no WebSocket session with the upstream: %s", error)
        await _respond_error(scope, send, error)

    async def _relay(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        upstream: WebSocketConnection,
    ) -> None:
        """Relay messages both ways until one side ends the session; close both."""
        session = _Session(upstream, trio.CancelScope())
        try:
            with session.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_client_to_upstream, receive, session)
                    nursery.start_soon(_upstream_to_client, send, session)
                    if self._going_away is not None:
                        nursery.start_soon(_watch_going_away, self._going_away, session)
        except BaseException as exc:
            if is_cancellation(exc):
                session.end(_Closed("shutdown", GOING_AWAY_CODE, GOING_AWAY_REASON))
            else:
                session.end(_Closed("error", _INTERNAL_ERROR_CODE, "proxy error"))
            raise
        finally:
            with trio.CancelScope(shield=True):
                await _close_both(scope, send, session)


async def _client_to_upstream(receive: Receive, session: _Session) -> None:
    """Relay the client's messages until it disconnects."""
    upstream = session.upstream
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            code = _client_close_code(message.get("code"))
            session.end(_Closed("client", code, message.get("reason") or None))
            return
        data = message.get("bytes")
        try:
            await upstream.send_message(data if data is not None else message["text"])
        except ConnectionClosed:
            # The upstream has closed: the other direction delivers what it
            # sent before its close, then passes the close on.
            return


async def _upstream_to_client(send: Send, session: _Session) -> None:
    """Relay the upstream's messages until it closes."""
    upstream = session.upstream
    while True:
        try:
            data = await upstream.get_message()
        except ConnectionClosed as exc:
            reason = exc.reason
            code = reason.code if reason is not None else 1006
            text = reason.reason if reason is not None else None
            # Set only when the upstream sent a close frame (private: see the
            # module docstring). trio-websocket closes by itself, with 1009
            # or 1002, a session whose upstream sent too large a message or
            # broke the protocol; 1006 says the connection dropped.
            if upstream._for_testing_peer_closed_connection.is_set():
                session.end(_Closed("upstream", code, text))
            else:
                session.end(_Closed("upstream_fault", code, text))
            return
        if isinstance(data, str):
            await send({"type": "websocket.send", "text": data})
        else:
            await send({"type": "websocket.send", "bytes": data})


async def _watch_going_away(going_away: trio.Event, session: _Session) -> None:
    await going_away.wait()
    session.end(_Closed("shutdown", GOING_AWAY_CODE, GOING_AWAY_REASON))


async def _close_both(scope: Scope, send: Send, session: _Session) -> None:
    """Pass the session's end on: close each side still open, bounded in time."""
    closed = session.closed
    assert closed is not None
    upstream = session.upstream
    if closed.side == "upstream":
        with trio.move_on_after(CLOSE_TIMEOUT_SECONDS):
            await _close_client(
                send,
                sendable_close_code(closed.code, _INTERNAL_ERROR_CODE),
                closed.reason,
            )
    elif closed.side != "client":
        code, reason = _proxy_close(scope, closed)
        note_proxy_close(scope, code, reason)
        with trio.move_on_after(CLOSE_TIMEOUT_SECONDS):
            await _close_client(send, code, reason)
    with trio.move_on_after(CLOSE_TIMEOUT_SECONDS):
        await upstream.aclose(
            sendable_close_code(closed.code, _INTERNAL_ERROR_CODE), closed.reason
        )


def _proxy_close(scope: Scope, closed: _Closed) -> tuple[int, str | None]:
    """The code and reason of a close the proxy makes itself; note its outcome."""
    if closed.side == "shutdown":
        note_outcome(scope, "upstream_error", "closed: the proxy is shutting down")
        return closed.code, closed.reason
    if closed.side != "upstream_fault":
        # The proxy failed: the middleware records the exception.
        return closed.code, closed.reason
    code = sendable_close_code(closed.code, _INTERNAL_ERROR_CODE)
    if code != closed.code:
        # 1006: the upstream's connection dropped without a close frame.
        reason = "the upstream connection was lost"
        note_outcome(scope, "upstream_error", reason)
        return code, reason
    if code == _MESSAGE_TOO_BIG_CODE:
        error = f"the upstream sent a message too big to relay: {closed.reason}"
    else:
        error = f"the upstream broke the WebSocket protocol: {closed.reason}"
    note_outcome(scope, "upstream_error", error)
    return code, closed.reason
