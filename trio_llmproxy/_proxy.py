"""The proxy ASGI app: forwards each request upstream and streams the answer.

One shared ``httpx.AsyncClient`` carries every request. The request body is
streamed upstream as it arrives; the response is passed to the client chunk
by chunk, as received, still content-encoded. Each exchange runs in a
nursery owned by the request, beside a task that watches the client: if the
client goes away, the exchange is cancelled and the upstream connection
closed at once, so nobody pays for tokens no one reads.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final

import attrs
import httpx
import orjson
import trio

from ._asgi import Message, Receive, Scope, Send
from ._config import DEFAULT_MAX_REQUEST_BYTES
from ._errors import (
    ClientError,
    ClientTimeout,
    Overloaded,
    ProxyError,
    RequestTooLarge,
    UpstreamError,
    UpstreamTimeout,
)
from ._middleware import note_outcome
from ._upstream import Upstream, convert_error, end_to_end_headers, has_request_body

# Closing a cut-off upstream response only closes a socket; if even that
# hangs, give up on it rather than hold the request open.
CLOSE_TIMEOUT_SECONDS: Final = 5.0
# How long the proxy keeps reading a request body the upstream never took
# (it failed first), so that the event still records the body.
UNREAD_BODY_TIMEOUT_SECONDS: Final = 10.0
# After refusing a request whose body is still coming (413, say), the proxy
# keeps reading and discarding it this long before it closes the connection:
# closing on unread bytes makes the kernel send a reset, which can destroy
# the refusal before the client has read it.
LINGER_SECONDS: Final = 2.0
DEFAULT_CLIENT_TIMEOUT_SECONDS: Final = 75.0
# Upstream URLs kept for reuse; past this many distinct targets (IDs in
# paths, varied queries) the cache starts over, so it stays bounded.
MAX_CACHED_TARGETS: Final = 512
# Longer targets are built each time, so the cache stays small whatever
# the clients send (a request head may hold 64 KiB).
MAX_CACHED_TARGET_BYTES: Final = 256
DEFAULT_MAX_CONCURRENT_REQUESTS: Final = 1000
# Headers the client sends that the proxy replaces: httpx sets Host to the
# upstream's.
_REQUEST_HEADERS_REPLACED: Final = frozenset({b"host"})
# With a chunked body, the client's Content-Length is dropped too: the chunked
# framing wins (RFC 9112 section 6.3), and forwarding both would let the
# upstream frame the body otherwise than the proxy did (request smuggling).
_REQUEST_HEADERS_REPLACED_WHEN_CHUNKED: Final = frozenset({b"host", b"content-length"})

logger = logging.getLogger(__name__)


@attrs.define(eq=False)
class ConcurrencyLimit:
    """The requests and WebSocket sessions a proxy carries at once, and its cap.

    One instance is shared by an app's HTTP proxy and its WebSocket relay,
    so that both count against ``--max-concurrent-requests``.
    """

    limit: int
    active: int = 0

    def try_take(self) -> bool:
        """Count one more request or session; False (and no count) when full."""
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def give_back(self) -> None:
        """Count one request or session less."""
        self.active -= 1

    def overloaded(self) -> Overloaded:
        """The error to refuse one more with."""
        msg = (
            f"the proxy is carrying its maximum of {self.limit} concurrent "
            "requests and WebSocket sessions; retry later"
        )
        return Overloaded(msg)


class _BodyStream(httpx.AsyncByteStream):
    """The request body as httpx sends it: the client's body, iterated directly.

    Passed as a stream rather than as content, so that no wrapper generator
    of httpx's stands between: when sending fails half-way, :func:`_send`
    closes the one generator left suspended (unclosed, Trio warns when it is
    garbage collected).
    """

    def __init__(self, body: AsyncGenerator[bytes]) -> None:
        self._body = body

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._body

    async def aclose(self) -> None:
        await self._body.aclose()


async def _send(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    try:
        return await client.send(request, stream=True)
    except BaseException:
        if isinstance(request.stream, _BodyStream):
            with trio.CancelScope(shield=True):
                await request.stream.aclose()
        raise


class _ClientGone(Exception):
    """The client disconnected while the proxy was reading its request body."""


class _Client:
    """The client's side of one exchange: its body, then its disconnect."""

    def __init__(
        self,
        receive: Receive,
        has_body: bool,
        *,
        max_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        timeout: float = DEFAULT_CLIENT_TIMEOUT_SECONDS,
    ) -> None:
        self._receive = receive
        self._max_bytes = max_bytes
        self._timeout = timeout
        self.received = 0
        self.body_done = trio.Event()
        self.gone = False
        self.answered = False
        if not has_body:
            self.body_done.set()

    async def body(self) -> AsyncGenerator[bytes]:
        """Yield the request body as it arrives, without reading it whole.

        Raises:
            RequestTooLarge: the body grew past the limit.
            ClientTimeout: the client sent nothing for the client timeout.
        """
        while not self.body_done.is_set():
            with trio.move_on_after(self._timeout) as waiting:
                message = await self._receive()
            if waiting.cancelled_caught:
                msg = f"the client sent no request body data for {self._timeout:g} s"
                raise ClientTimeout(msg)
            if message["type"] == "http.disconnect":
                self.gone = True
                raise _ClientGone
            chunk = message.get("body", b"")
            if not message.get("more_body", False):
                self.body_done.set()
            self.received += len(chunk)
            if self.received > self._max_bytes:
                raise RequestTooLarge(_too_large_message(self._max_bytes))
            if chunk:
                yield chunk

    async def discard_body(self, seconds: float) -> None:
        """Read and drop what is left of the request body, for ``seconds`` at most."""
        with trio.move_on_after(seconds):
            while not self.body_done.is_set():
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    self.gone = True
                    return
                if not message.get("more_body", False):
                    self.body_done.set()

    async def read_rest_of_body(self) -> None:
        """Read what is left of the request body, so the event records it.

        Used when the upstream failed before taking the body: the client is
        still sending it. Bounded in time; a client that disconnects or
        stalls just ends the reading.
        """
        with trio.move_on_after(UNREAD_BODY_TIMEOUT_SECONDS):
            try:
                async for _ in self.body():
                    pass
            except (_ClientGone, ClientError):
                pass

    async def watch(self, exchange: trio.CancelScope) -> None:
        """Cancel ``exchange`` as soon as the client disconnects."""
        await self.body_done.wait()
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                # Hypercorn also reports a disconnect while the last body
                # message is being sent; cancelling that send would abort
                # the server's own bookkeeping for the connection (its
                # keep-alive timer, which also closes idle connections on
                # shutdown).
                if not self.answered:
                    exchange.cancel()
                return


def _too_large_message(limit: int) -> str:
    return f"the request body is larger than the proxy accepts ({limit} bytes)"


def _announced_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The largest Content-Length of the request headers, 0 when none."""
    length = 0
    for name, value in headers:
        if name == b"content-length":
            try:
                length = max(length, int(value))
            except ValueError:
                # The HTTP server has already refused such a request.
                continue
    return length


def error_body(exc: ProxyError) -> bytes:
    """Return the OpenAI-style JSON error body for ``exc``."""
    return orjson.dumps(
        {"error": {"message": str(exc), "type": "proxy_error", "code": exc.code}}
    )


def _error_head(exc: ProxyError, body: bytes, *, close: bool = False) -> Message:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
    ]
    if close:
        headers.append((b"connection", b"close"))
    return {"type": "http.response.start", "status": exc.status, "headers": headers}


async def send_error(send: Send, exc: ProxyError) -> None:
    """Answer with ``exc``'s status and an OpenAI-style JSON error body."""
    body = error_body(exc)
    await send(_error_head(exc, body))
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ProxyApp:
    """ASGI app that forwards every HTTP request to one upstream.

    Args:
        upstream_url: base URL of the upstream; the request's path and query
            are appended to it.
        client: the shared httpx client (see ``create_upstream_client``); the
            caller owns it and closes it.
        max_request_bytes: a larger request body is answered with 413,
            before it is forwarded when its Content-Length says so, or as
            soon as it grows past the limit (the upstream request is then
            cancelled).
        client_timeout: the longest pause inside a request body; the client
            then gets 408 and the upstream request is cancelled.
        concurrency: the limit on requests at once, which the caller may
            share with a WebSocket relay; requests beyond it are answered
            with 503 at once, without reaching the upstream. Without it, the
            app has a limit of its own of
            :data:`DEFAULT_MAX_CONCURRENT_REQUESTS`.
    """

    def __init__(
        self,
        upstream_url: str,
        client: httpx.AsyncClient,
        *,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        client_timeout: float = DEFAULT_CLIENT_TIMEOUT_SECONDS,
        concurrency: ConcurrencyLimit | None = None,
    ) -> None:
        self._upstream_url = upstream_url
        self._upstream = Upstream.from_url(upstream_url)
        # Upstream URLs by (raw path, query): clients call a handful of
        # routes, and httpx validates every URL it builds (about 20 us).
        self._targets: dict[tuple[bytes, bytes], httpx.URL] = {}
        self._client = client
        self._max_request_bytes = max_request_bytes
        self._client_timeout = client_timeout
        if concurrency is None:
            concurrency = ConcurrencyLimit(DEFAULT_MAX_CONCURRENT_REQUESTS)
        self._concurrency = concurrency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            # WebSocket proxying is not supported: refuse the handshake (403).
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        client = _Client(
            receive,
            has_request_body(scope["headers"]),
            max_bytes=self._max_request_bytes,
            timeout=self._client_timeout,
        )
        if not self._concurrency.try_take():
            await _refuse(scope, client, send, self._concurrency.overloaded())
            return
        try:
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as exchange:
                    nursery.start_soon(client.watch, exchange)
                    await self._exchange(scope, client, send)
                nursery.cancel_scope.cancel()
        finally:
            self._concurrency.give_back()
        if client.gone and not client.answered:
            note_outcome(scope, "client_disconnected", "client closed the connection")

    async def _exchange(self, scope: Scope, client: _Client, send: Send) -> None:
        try:
            if _announced_length(scope["headers"]) > self._max_request_bytes:
                raise RequestTooLarge(_too_large_message(self._max_request_bytes))
            request = self._build_request(scope, client)
        except ClientError as exc:
            await _refuse(scope, client, send, exc)
            return
        try:
            response = await _send(self._client, request)
        except _ClientGone:
            return
        except ClientError as exc:
            # Raised by the request body (too large, or the client stalled):
            # the upstream request was cut off with it.
            await _refuse(scope, client, send, exc)
            return
        except httpx.HTTPError as exc:
            if client.gone:
                return
            error = convert_error(exc, self._upstream_url)
            _note_error(scope, error)
            await client.read_rest_of_body()
            client.answered = True
            await send_error(send, error)
            return
        try:
            await self._relay(scope, client, response, send)
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT_SECONDS) as cleanup:
                cleanup.shield = True
                await response.aclose()

    def _build_request(self, scope: Scope, client: _Client) -> httpx.Request:
        also_drop = _REQUEST_HEADERS_REPLACED
        if any(name == b"transfer-encoding" for name, _ in scope["headers"]):
            also_drop = _REQUEST_HEADERS_REPLACED_WHEN_CHUNKED
        headers = end_to_end_headers(scope["headers"], also_drop=also_drop)
        url = self._target(
            scope.get("raw_path") or scope["path"].encode("utf-8"),
            scope.get("query_string", b""),
        )
        if client.body_done.is_set():
            return httpx.Request(scope["method"], url, headers=headers)
        if not any(name == b"content-length" for name, _ in headers):
            headers.append((b"transfer-encoding", b"chunked"))
        # Made without a body, so that httpx adds Host (and nothing else:
        # the body is framed by Content-Length or Transfer-Encoding already).
        request = httpx.Request(scope["method"], url, headers=headers)
        request.stream = _BodyStream(client.body())
        return request

    def _target(self, raw_path: bytes, query: bytes) -> httpx.URL:
        if len(raw_path) + len(query) > MAX_CACHED_TARGET_BYTES:
            return self._upstream.target(raw_path, query)
        key = (raw_path, query)
        url = self._targets.get(key)
        if url is None:
            url = self._upstream.target(raw_path, query)
            if len(self._targets) >= MAX_CACHED_TARGETS:
                self._targets.clear()
            self._targets[key] = url
        return url

    async def _relay(
        self, scope: Scope, client: _Client, response: httpx.Response, send: Send
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": end_to_end_headers(response.headers.raw),
            }
        )
        message: Message = {
            "type": "http.response.body",
            "body": b"",
            "more_body": True,
        }
        # Once the client has every byte a Content-Length promised, it may
        # close at once; that is not a cut exchange.
        remaining = _promised_length(scope, response)
        if remaining == 0:
            client.answered = True
        chunks = response.aiter_raw()
        try:
            async for chunk in chunks:
                message["body"] = chunk
                if remaining is not None:
                    remaining -= len(chunk)
                    if remaining <= 0:
                        client.answered = True
                await send(message)
        except httpx.HTTPError as exc:
            # The head is out: all that is left is to cut the client's stream
            # short (by not finishing it), so it cannot pass for complete.
            _note_error(scope, convert_error(exc, self._upstream_url))
            return
        except BaseException:
            await _finish_cut(response, chunks)
            raise
        # From here on a disconnect is the client leaving after the answer.
        client.answered = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _refuse(scope: Scope, client: _Client, send: Send, exc: ProxyError) -> None:
    """Answer with ``exc``'s error instead of forwarding the request."""
    note_outcome(scope, "ok", str(exc))
    client.answered = True
    if client.body_done.is_set() or isinstance(exc, ClientTimeout):
        await send_error(send, exc)
        return
    # The body is still coming: send the whole error, then linger, reading
    # the body, before the response ends and the server closes the
    # connection (it cannot be reused with a body left unread).
    body = error_body(exc)
    await send(_error_head(exc, body, close=True))
    await send({"type": "http.response.body", "body": body, "more_body": True})
    await client.discard_body(LINGER_SECONDS)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _finish_cut(response: httpx.Response, chunks: AsyncIterator[bytes]) -> None:
    """Close a response cut mid-stream and run its chunk iterator to the end.

    Cut while sending (cancelled), the iterator is left suspended, and with
    it the async generators nested inside httpx and httpcore; garbage
    collected unfinished, each makes Trio warn. Once the connection is
    closed, resuming the iterator ends them all at once, with a read error.
    """
    with trio.move_on_after(CLOSE_TIMEOUT_SECONDS, shield=True):
        await response.aclose()
        try:
            async for _ in chunks:
                pass
        except Exception as exc:
            logger.debug("after a cut stream: %r", exc)


def _promised_length(scope: Scope, response: httpx.Response) -> int | None:
    """Body bytes the client expects from the response head, if it says."""
    if scope["method"] == "HEAD" or response.status_code in (204, 304):
        return 0
    value = response.headers.get("content-length")
    if value is None or "transfer-encoding" in response.headers:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _note_error(scope: Scope, error: UpstreamError) -> None:
    outcome = (
        "upstream_timeout" if isinstance(error, UpstreamTimeout) else "upstream_error"
    )
    note_outcome(scope, outcome, str(error))
