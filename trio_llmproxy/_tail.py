"""``llm-proxy tail``: watch events as they happen, from Redis or a live feed.

Two sources give the same events, each as its JSON object:

* :class:`FeedSource` reads a running server's events feed (``server
  --events-feed``) over a WebSocket, with trio-websocket's client. The feed
  only carries what is published while the tail is connected.
* :class:`RedisSource` reads the Redis stream with ``XREAD``, starting after
  the newest entry at start-up. It joins no consumer group, so it never takes
  an event from the dispatchers and leaves nothing pending.

When a source goes away after it was reached (the server stopped, Redis
restarted), :func:`follow` says so in one line and reconnects with capped
exponential backoff for a while before giving up. The Redis source resumes
after the last entry it showed, so nothing still in the stream is missed;
the feed cannot replay, so events published while it was away are missed.
A source that cannot be reached at start-up, or that refuses the tail (a
wrong token), fails at once.
"""

from __future__ import annotations

import fnmatch
import ssl
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit

import attrs
import orjson
import tenacity
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from ._config import check_redis_url, display_url
from ._errors import ConfigError, ProxyError, first_leaf

if TYPE_CHECKING:
    import coredis

#: How long connecting to a source (TCP, TLS and the WebSocket handshake, or
#: Redis's first answer) may take before it counts as unreachable.
CONNECT_TIMEOUT_SECONDS: Final = 5.0
#: How long one blocking ``XREAD`` waits for new entries.
REDIS_BLOCK_SECONDS: Final = 1.0
#: Entries read from Redis at once.
REDIS_READ_COUNT: Final = 100
#: Backoff between reconnection attempts: doubling from the first to the cap.
RECONNECT_FIRST_SECONDS: Final = 0.25
RECONNECT_MAX_SECONDS: Final = 5.0
#: A feed sends events of up to a few MiB (captured bodies, decoded).
MAX_FEED_MESSAGE_BYTES: Final = 64 * 1024 * 1024
#: Bytes read from the feed at once: trio-websocket's default (4 KiB) takes
#: a read per 4 KiB of an event that can be megabytes long.
FEED_RECEIVE_BYTES: Final = 256 * 1024
NOTICE_FIELD: Final = "events_feed_notice"
OUTCOMES: Final = ("ok", "client_disconnected", "upstream_error", "upstream_timeout")
_GLOB_CHARACTERS: Final = frozenset("*?[")
# WebSocket close codes worth naming in the message of a lost feed.
_CLOSE_REASONS: Final = {
    1000: "the feed closed",
    1001: "the server is shutting down",
    1006: "the connection broke",
}


class TailError(ProxyError):
    """The tail cannot go on: the message says why (the CLI exits 1)."""


class SourceUnavailable(ProxyError):
    """The source could not be reached (it may come back)."""


class SourceLost(ProxyError):
    """The source went away after it was reached (it may come back)."""


class SourceRefused(ProxyError):
    """The source refused the tail (a wrong token, say): retrying cannot help."""


class Source(Protocol):
    """Where events come from; ``str(source)`` names it without secrets."""

    async def run(
        self, show: Callable[[str], None], on_connected: Callable[[], None]
    ) -> None:
        """Hand each message to ``show`` until the source goes away.

        Calls ``on_connected`` once the source is reached. Never returns
        normally.

        Raises:
            SourceUnavailable: before the source was reached.
            SourceLost: after it was reached.
            SourceRefused: the source refused the tail.
        """


def parse_status(value: str) -> str:
    """Return ``value`` as a status filter: a code such as ``404``, or ``4xx``.

    Raises:
        ConfigError: it is neither a code from 100 to 599 nor a class 1xx-5xx.
    """
    text = value.strip().lower()
    if len(text) == 3 and text[0] in "12345" and (text[1:] == "xx" or text.isdigit()):
        return text
    msg = f"expected a status code such as 404 or a class such as 4xx, got {value!r}"
    raise ConfigError(msg)


def _statuses(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(parse_status(value) for value in values)


@attrs.frozen(kw_only=True)
class EventFilter:
    """Which events a tail shows. Values of one kind are alternatives.

    Attributes:
        paths: prefixes of the path, or globs (with ``*``, ``?`` or ``[``)
            that must match the whole path; ``*`` matches ``/`` too.
        statuses: codes (``"404"``) or classes (``"4xx"``), see
            :func:`parse_status`.
        outcomes: the event's ``outcome`` values.
    """

    paths: tuple[str, ...] = ()
    statuses: tuple[str, ...] = attrs.field(default=(), converter=_statuses)
    outcomes: tuple[str, ...] = ()

    def matches(self, event: Mapping[str, Any]) -> bool:
        """Whether ``event`` (its JSON object) passes every filter given."""
        path = str(event.get("path", ""))
        if self.paths and not any(_path_matches(path, p) for p in self.paths):
            return False
        status = str(event.get("status", ""))
        if self.statuses and not any(_status_matches(status, s) for s in self.statuses):
            return False
        return not self.outcomes or event.get("outcome") in self.outcomes


def _path_matches(path: str, pattern: str) -> bool:
    if _GLOB_CHARACTERS.intersection(pattern):
        return fnmatch.fnmatchcase(path, pattern)
    return path.startswith(pattern)


def _status_matches(status: str, wanted: str) -> bool:
    if wanted.endswith("xx"):
        return status[:1] == wanted[0] and len(status) == 3
    return status == wanted


def printable(text: str) -> str:
    """Return ``text`` with each character that is not printable as ``?``.

    Paths and methods come from clients, and reasons from the network: this
    keeps their control characters (terminal escape sequences) off the
    operator's terminal.
    """
    return "".join(c if c.isprintable() else "?" for c in text)


def _is_count(value: object) -> bool:
    # JSON's true and false arrive as bool, a subclass of int: not counts.
    return type(value) is int and value >= 0


def _milliseconds(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.1f}ms"
    return "-"


def format_line(event: Mapping[str, Any]) -> str:
    """Return the one-line summary of ``event`` (its JSON object).

    Time (UTC, to the millisecond), status, method, path, duration, time to
    first token (the ``llm`` object's, else time to first byte), the token
    counts when the upstream reported them, and the outcome. For example
    ``2026-12-03T14:43:12.132Z 200 POST /v1/chat/completions 6.4ms ttft=4.6ms
    tokens=9+12 ok``.
    """
    timestamp = str(event.get("timestamp", "-"))
    if len(timestamp) > 23 and timestamp.endswith("Z"):
        timestamp = timestamp[:23] + "Z"  # microseconds cut to milliseconds
    llm = event.get("llm")
    llm = llm if isinstance(llm, Mapping) else {}
    ttft = llm.get("ttft_ms")
    if ttft is None:
        ttft = event.get("ttfb_ms")
    parts = [
        printable(timestamp),
        printable(str(event.get("status", "-"))),
        printable(str(event.get("method", "-"))),
        printable(str(event.get("path", "-"))),
        _milliseconds(event.get("duration_ms")),
        f"ttft={_milliseconds(ttft)}",
    ]
    usage = llm.get("usage")
    if isinstance(usage, Mapping):
        tokens_in, tokens_out = usage.get("input_tokens"), usage.get("output_tokens")
        if _is_count(tokens_in) and _is_count(tokens_out):
            parts.append(f"tokens={tokens_in}+{tokens_out}")
    parts.append(printable(str(event.get("outcome", "-"))))
    return " ".join(parts)


@attrs.define(eq=False)
class Printer:
    """Shows each message a source hands over: a line, the JSON, or a warning.

    Args:
        event_filter: which events to show.
        json_output: print each event's JSON exactly as received, one per
            line, rather than the summary.
        write: writes one line (with its newline) to the output and flushes.
        warn: shows one warning line to the operator.
        notices: whether messages with an ``events_feed_notice`` field are
            the source's notices (true of the events feed only). No event
            has that field: from any other source, such as a Redis stream
            that anyone with access can write to, they are skipped.
    """

    event_filter: EventFilter
    json_output: bool
    write: Callable[[str], None]
    warn: Callable[[str], None]
    notices: bool = False

    def __call__(self, message: str) -> None:
        try:
            data = orjson.loads(message)
        except orjson.JSONDecodeError:
            self.warn("skipped a message that is not JSON")
            return
        if not isinstance(data, dict):
            self.warn("skipped a message that is not a JSON object")
            return
        if NOTICE_FIELD in data:
            if self.notices:
                self._notice(data)
            else:
                self.warn("skipped a notice that did not come from an events feed")
            return
        if not self.event_filter.matches(data):
            return
        self.write((message if self.json_output else format_line(data)) + "\n")

    def _notice(self, notice: Mapping[str, Any]) -> None:
        if notice.get(NOTICE_FIELD) != "dropped":
            return  # a kind of notice from a newer server
        dropped, total = notice.get("dropped"), notice.get("total_dropped")
        if not (_is_count(dropped) and _is_count(total)):
            # Only integers reach the terminal, never the notice's text.
            self.warn("skipped a malformed notice of dropped events")
            return
        self.warn(
            f"the feed dropped {dropped} event(s) this tail "
            f"did not read in time ({total} in all)"
        )


def _feed_endpoint(url: str) -> tuple[str, int, str, bool]:
    """Host, port, resource and TLS of a ``ws://`` or ``wss://`` URL.

    Raises:
        ConfigError: it is not such a URL with a host, and a port from 1 to
            65535 when it has one.
    """
    expected = f"expected a ws:// or wss:// URL with a host, got {display_url(url)!r}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # brackets that hold no IPv6 address, a bad port
        msg = f"{expected}: {exc}"
        raise ConfigError(msg) from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(expected)
    if port == 0:
        msg = f"{expected}: the port must be from 1 to 65535"
        raise ConfigError(msg)
    secure = parts.scheme == "wss"
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port or (443 if secure else 80), resource, secure


@attrs.define(eq=False)
class FeedSource:
    """A running server's events feed, read over a WebSocket.

    Raises:
        ConfigError: ``url`` is not a ``ws://`` or ``wss://`` URL.
    """

    url: str = attrs.field()
    _token: str | None = attrs.field(default=None, alias="token", repr=False)

    @url.validator
    def _check_url(self, attribute: attrs.Attribute[str], value: str) -> None:
        _feed_endpoint(value)

    def __str__(self) -> str:
        return f"the events feed at {display_url(self.url)}"

    async def run(
        self, show: Callable[[str], None], on_connected: Callable[[], None]
    ) -> None:
        """See :meth:`Source.run`."""
        host, port, resource, secure = _feed_endpoint(self.url)
        stream = await self._connect(host, port, secure)
        reason = None
        try:
            async with trio.open_nursery() as nursery:
                connection = await self._handshake(nursery, stream, host, resource)
                on_connected()
                reason = await _receive_all(connection, show)
                nursery.cancel_scope.cancel()
        except* ConnectionRejected as group:
            status = first_leaf(group).status_code
            if status == HTTPStatus.SERVICE_UNAVAILABLE:
                # The feed serves as many tails as it may: one may leave.
                msg = "HTTP 503: it serves as many tails as it may"
                raise SourceUnavailable(msg) from None
            what = {401: "it needs --token", 403: "it refused the token"}
            msg = f"HTTP {status}" + (f": {what[status]}" if status in what else "")
            raise SourceRefused(msg) from None
        except* (HandshakeError, trio.BrokenResourceError, trio.TooSlowError) as group:
            reason = str(group.exceptions[0]) or type(group.exceptions[0]).__name__
            raise SourceUnavailable(reason) from None
        finally:
            # trio-websocket closes the stream neither of a refused client nor
            # of one the server closed: it is ours to close.
            await stream.aclose()
        raise SourceLost(reason)

    async def _connect(
        self, host: str, port: int, secure: bool
    ) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        try:
            with trio.fail_after(CONNECT_TIMEOUT_SECONDS):
                tcp = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or "timed out"
            raise SourceUnavailable(reason) from None
        if not secure:
            return tcp
        tls = trio.SSLStream(tcp, ssl.create_default_context(), server_hostname=host)
        try:
            with trio.fail_after(CONNECT_TIMEOUT_SECONDS):
                await tls.do_handshake()
        except BaseException as exc:
            await trio.aclose_forcefully(tcp)
            if isinstance(exc, trio.BrokenResourceError | trio.TooSlowError):
                reason = str(exc.__cause__ or exc) or "TLS handshake timed out"
                raise SourceUnavailable(reason) from None
            raise
        return tls

    async def _handshake(
        self,
        nursery: trio.Nursery,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        host: str,
        resource: str,
    ) -> WebSocketConnection:
        headers = []
        if self._token is not None:
            headers.append((b"authorization", f"Bearer {self._token}".encode()))
        with trio.fail_after(CONNECT_TIMEOUT_SECONDS):
            return await wrap_client_stream(
                nursery,
                stream,
                host,
                resource,
                extra_headers=headers,
                max_message_size=MAX_FEED_MESSAGE_BYTES,
                receive_buffer_size=FEED_RECEIVE_BYTES,
            )


async def _receive_all(
    connection: WebSocketConnection, show: Callable[[str], None]
) -> str:
    """Show every message until the feed closes; return why it closed."""
    try:
        while True:
            message = await connection.get_message()
            show(message if isinstance(message, str) else message.decode("utf-8"))
    except ConnectionClosed as exc:
        code = exc.reason.code if exc.reason is not None else 1006
        return _CLOSE_REASONS.get(code, f"closed with code {code}")


@attrs.define(eq=False)
class RedisSource:
    """The Redis stream of the shared bus, read without a consumer group.

    Raises:
        ConfigError: ``url`` is not a Redis URL.
    """

    url: str = attrs.field(repr=display_url)
    stream: str
    # The ID of the last entry shown: a reconnection resumes after it.
    _last_id: bytes | None = attrs.field(default=None, init=False)

    @url.validator
    def _check_url(self, attribute: attrs.Attribute[str], value: str) -> None:
        check_redis_url(value)

    def __str__(self) -> str:
        return f"the Redis stream {self.stream!r} at {display_url(self.url)}"

    async def run(
        self, show: Callable[[str], None], on_connected: Callable[[], None]
    ) -> None:
        """See :meth:`Source.run`."""
        from ._redis_bus import _REDIS_TROUBLE

        reached = False
        failure: BaseException | None = None
        try:
            async with self._client() as client:
                try:
                    with trio.fail_after(CONNECT_TIMEOUT_SECONDS):
                        await client.ping()
                        if self._last_id is None:
                            self._last_id = await self._newest_id(client)
                    reached = True
                    on_connected()
                    await self._read_all(client, show)
                except (*_REDIS_TROUBLE, trio.TooSlowError) as exc:
                    failure = exc
        except* _REDIS_TROUBLE as group:
            failure = group.exceptions[0]
        reason = (str(failure) or type(failure).__name__) if failure else "unknown"
        raise SourceLost(reason) if reached else SourceUnavailable(reason)

    def _client(self) -> coredis.Redis[bytes]:
        import coredis
        from coredis.retry import NoRetryPolicy

        from ._redis_bus import CONNECT_TIMEOUT_SECONDS as REDIS_CONNECT_SECONDS
        from ._redis_bus import STREAM_TIMEOUT_MARGIN_SECONDS

        return coredis.Redis.from_url(
            self.url,
            retry_policy=NoRetryPolicy(),
            connect_timeout=REDIS_CONNECT_SECONDS,
            stream_timeout=REDIS_BLOCK_SECONDS + STREAM_TIMEOUT_MARGIN_SECONDS,
        )

    async def _newest_id(self, client: coredis.Redis[bytes]) -> bytes:
        # XREAD from "$" would miss what arrives between two reads; the ID of
        # the newest entry now, then of each entry shown, misses nothing.
        from ._redis_bus import _as_bytes

        newest = await client.xrevrange(self.stream, count=1)
        return _as_bytes(newest[0].identifier) if newest else b"0-0"

    async def _read_all(
        self, client: coredis.Redis[bytes], show: Callable[[str], None]
    ) -> None:
        from ._redis_bus import ENTRY_FIELD, _as_bytes

        block = round(REDIS_BLOCK_SECONDS * 1000)
        while True:
            assert self._last_id is not None
            reply = await client.xread(
                {self.stream: self._last_id}, count=REDIS_READ_COUNT, block=block
            )
            for entries in (reply or {}).values():
                for entry in entries:
                    self._last_id = _as_bytes(entry.identifier)
                    fields = {
                        _as_bytes(k): v for k, v in (entry.field_values or {}).items()
                    }
                    data = fields.get(ENTRY_FIELD)
                    if data is not None:
                        show(_as_bytes(data).decode("utf-8", "replace"))


def _retrying(reconnect_seconds: float) -> tenacity.AsyncRetrying:
    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(SourceUnavailable),
        stop=tenacity.stop_after_delay(reconnect_seconds),
        wait=tenacity.wait_exponential(
            multiplier=RECONNECT_FIRST_SECONDS, max=RECONNECT_MAX_SECONDS
        ),
        sleep=trio.sleep,
        reraise=True,
    )


async def follow(
    source: Source,
    show: Callable[[str], None],
    warn: Callable[[str], None],
    *,
    reconnect_seconds: float,
) -> None:
    """Show what ``source`` sends until cancelled, reconnecting when it goes.

    Args:
        source: where events come from.
        show: called with each message (an event's JSON, or a feed notice).
        warn: shows one line to the operator (losses and reconnections).
        reconnect_seconds: how long to keep trying to reconnect after the
            source went away; 0 gives up at once.

    Raises:
        TailError: the source could not be reached at start-up, refused the
            tail, or did not come back within ``reconnect_seconds``.
    """

    def connected() -> None:
        # Events may be rare: say at once that the tail is listening.
        warn(f"following {source}; Ctrl-C to stop")

    try:
        await source.run(show, connected)
    except SourceUnavailable as exc:
        msg = f"cannot reach {source}: {exc}"
        raise TailError(msg) from None
    except SourceRefused as exc:
        msg = f"{source} refused this tail: {exc}"
        raise TailError(msg) from None
    except SourceLost as exc:
        reason = str(exc)
    while True:
        if reconnect_seconds <= 0:
            msg = f"lost {source}: {reason}"
            raise TailError(msg)
        warn(f"lost {source}: {reason}; reconnecting for up to {reconnect_seconds:g} s")
        reason = await _reconnect(source, show, warn, reconnect_seconds)


async def _reconnect(
    source: Source,
    show: Callable[[str], None],
    warn: Callable[[str], None],
    reconnect_seconds: float,
) -> str:
    """Reconnect and show what comes until the source goes again; return why."""

    def reconnected() -> None:
        warn(f"reconnected to {source}")

    try:
        async for attempt in _retrying(reconnect_seconds):
            with attempt:
                await source.run(show, reconnected)
    except SourceUnavailable as exc:
        msg = f"gave up on {source} after {reconnect_seconds:g} s: {exc}"
        raise TailError(msg) from None
    except SourceRefused as exc:
        msg = f"{source} refused this tail: {exc}"
        raise TailError(msg) from None
    except SourceLost as exc:
        return str(exc)
    # source.run never returns normally.
    raise AssertionError


def choose_source(
    feed_url: str | None,
    token: str | None,
    redis_url: str | None,
    stream: str,
) -> Source:
    """Return the one source named; see the ``tail`` command for the rules.

    Raises:
        ConfigError: no source, or a bad URL.
    """
    if feed_url is not None:
        return FeedSource(feed_url, token=token)
    if redis_url is not None:
        return RedisSource(redis_url, stream)
    msg = "no source: give --feed URL (a server's events feed) or --redis-url URL"
    raise ConfigError(msg)
