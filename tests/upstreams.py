"""Raw HTTP/1.1 peers on loopback sockets, for tests that need exact bytes.

:class:`RawUpstream` is a scriptable upstream: it parses each request it gets
(recording the request line, the headers as sent and the body) and lets the
test's responder write whatever bytes it likes, whenever it likes, or close
the connection, or never answer. :class:`RawClient` is the other side: it
writes a request byte for byte and parses the response it gets back.

Neither of them adds, drops or reorders anything, so what a test sees is what
crossed the wire.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing, asynccontextmanager
from functools import partial

import attrs
import trio

MAX_RECEIVE_BYTES = 65536
_CHUNK_SIZE_LINE = re.compile(rb"^([0-9a-fA-F]+)(;.*)?$")


def chunk(data: bytes) -> bytes:
    """Return ``data`` as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def http_response(
    status: int,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    reason: str = "Whatever",
) -> bytes:
    """Return a response head (and ``body``) exactly as given: nothing is added."""
    lines = [f"HTTP/1.1 {status} {reason}".encode("ascii")]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def http_request(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> bytes:
    """Return a request head (and ``body``) exactly as given: nothing is added."""
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1")]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@attrs.define
class Head:
    """The start line and headers of a message, as they crossed the wire."""

    start_line: bytes
    headers: list[tuple[bytes, bytes]]

    @property
    def method(self) -> bytes:
        return self.start_line.split(b" ", 1)[0]

    @property
    def target(self) -> bytes:
        return self.start_line.split(b" ")[1]

    @property
    def status(self) -> int:
        return int(self.start_line.split(b" ")[1])

    def names(self) -> list[bytes]:
        """The header names, lower-cased, in order and with repeats."""
        return [name.lower() for name, _ in self.headers]

    def values(self, name: str) -> list[bytes]:
        """Every value of header ``name`` (any case), in order."""
        wanted = name.lower().encode("latin-1")
        return [value for key, value in self.headers if key.lower() == wanted]

    def value(self, name: str) -> bytes | None:
        """The only value of header ``name``; None when absent."""
        values = self.values(name)
        assert len(values) <= 1, f"{name} appears {len(values)} times"
        return values[0] if values else None

    @property
    def is_chunked(self) -> bool:
        return any(b"chunked" in v.lower() for v in self.values("transfer-encoding"))


class HttpPeer:
    """Reads HTTP/1.1 messages from a stream, keeping the bytes as they came."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._eof = False

    async def _fill(self) -> bool:
        if self._eof:
            return False
        data = await self.stream.receive_some(MAX_RECEIVE_BYTES)
        if not data:
            self._eof = True
            return False
        self._buffer += data
        return True

    async def _read_until(self, delimiter: bytes) -> bytes | None:
        while (end := self._buffer.find(delimiter)) < 0:
            if not await self._fill():
                return None
        data = bytes(self._buffer[: end + len(delimiter)])
        del self._buffer[: end + len(delimiter)]
        return data

    async def _read_some(self, limit: int) -> bytes:
        if not self._buffer and not await self._fill():
            msg = "the peer closed the connection inside a body"
            raise EOFError(msg)
        data = bytes(self._buffer[:limit])
        del self._buffer[:limit]
        return data

    async def read_head(self) -> Head | None:
        """Read the next head; None when the peer closed before sending one."""
        raw = await self._read_until(b"\r\n\r\n")
        if raw is None:
            if self._buffer:
                msg = f"the peer closed the connection inside a head: {self._buffer!r}"
                raise EOFError(msg)
            return None
        start_line, *lines = raw[:-4].split(b"\r\n")
        headers = []
        for line in lines:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip()))
        return Head(start_line, headers)

    async def body(
        self, head: Head, *, until_eof: bool = False
    ) -> AsyncIterator[bytes]:
        """Yield the body of ``head`` piece by piece, as it arrives, unframed.

        Without a length or chunked framing, the body is empty, or (for a
        response, ``until_eof``) runs to the end of the connection.
        """
        length = head.value("content-length")
        if head.is_chunked:
            # Closing this generator early closes the inner one too.
            async with aclosing(self._chunked()) as pieces:
                async for piece in pieces:
                    yield piece
        elif length is not None:
            left = int(length)
            while left:
                piece = await self._read_some(left)
                left -= len(piece)
                yield piece
        elif until_eof:
            while self._buffer or await self._fill():
                yield bytes(self._buffer)
                self._buffer.clear()

    async def _chunked(self) -> AsyncIterator[bytes]:
        while True:
            line = await self._read_until(b"\r\n")
            if line is None:
                msg = "the peer closed the connection inside a chunked body"
                raise EOFError(msg)
            match = _CHUNK_SIZE_LINE.match(line[:-2])
            assert match, f"bad chunk size line {line!r}"
            left = int(match.group(1), 16)
            if left == 0:
                # Trailers, if any, up to the empty line.
                while await self._read_until(b"\r\n") not in (b"\r\n", None):
                    pass
                return
            while left:
                piece = await self._read_some(left)
                left -= len(piece)
                yield piece
            assert await self._read_until(b"\r\n") == b"\r\n", "chunk without CRLF"

    async def read_body(self, head: Head, *, until_eof: bool = False) -> bytes:
        """Read the whole body of ``head``."""
        return b"".join([piece async for piece in self.body(head, until_eof=until_eof)])

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def wait_for_close(self) -> None:
        """Wait until the peer closes or resets the connection."""
        try:
            while await self._fill():
                self._buffer.clear()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def aclose(self) -> None:
        await self.stream.aclose()


@attrs.define(eq=False)
class ReceivedRequest:
    """A request as the upstream got it; ``body`` grows as the body is read."""

    head: Head
    body: bytearray = attrs.field(factory=bytearray)


@attrs.define(eq=False)
class Exchange:
    """One request at the upstream, handed to the test's responder."""

    peer: HttpPeer
    request: ReceivedRequest
    closed: bool = False
    _body_read: bool = False

    @property
    def head(self) -> Head:
        return self.request.head

    async def body(self) -> AsyncIterator[bytes]:
        """Yield the request body as it arrives (recording it)."""
        self._body_read = True
        async with aclosing(self.peer.body(self.head)) as pieces:
            async for piece in pieces:
                self.request.body += piece
                yield piece

    async def read_body(self) -> bytes:
        """Read the rest of the request body."""
        if not self._body_read:
            async for _ in self.body():
                pass
        return bytes(self.request.body)

    async def send(self, data: bytes) -> None:
        await self.peer.send(data)

    async def close(self) -> None:
        """Close the connection now, whatever was or was not sent."""
        self.closed = True
        await self.peer.aclose()

    async def wait_for_close(self) -> None:
        """Wait until the proxy closes this connection."""
        await self.peer.wait_for_close()


Responder = Callable[[Exchange], Awaitable[None]]


def reply(*writes: bytes) -> Responder:
    """A responder that reads the request body, then writes ``writes`` in order."""

    async def respond(exchange: Exchange) -> None:
        await exchange.read_body()
        for data in writes:
            await exchange.send(data)

    return respond


class RawUpstream:
    """An HTTP/1.1 upstream whose every answer the test writes byte by byte.

    Each request is parsed and recorded in :attr:`requests`, then handed to
    ``respond``. Connections are kept alive, as a real upstream's are, until
    either side closes them.
    """

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.requests: list[ReceivedRequest] = []
        self.connections = 0

    async def start(self, nursery: trio.Nursery) -> str:
        """Listen on a free loopback port in ``nursery``; return the base URL."""
        listeners = await nursery.start(
            partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        peer = HttpPeer(stream)
        try:
            while True:
                head = await peer.read_head()
                if head is None:
                    return
                request = ReceivedRequest(head)
                self.requests.append(request)
                exchange = Exchange(peer, request)
                await self.respond(exchange)
                if exchange.closed:
                    return
                await exchange.read_body()
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            # The proxy went away first; that is for the test to check.
            pass
        finally:
            await stream.aclose()

    @property
    def only_request(self) -> ReceivedRequest:
        assert len(self.requests) == 1, f"{len(self.requests)} requests upstream"
        return self.requests[0]


@attrs.define
class RawResponse:
    """A response as the client got it; ``complete`` is False when cut short."""

    head: Head
    body: bytes
    complete: bool


class RawClient:
    """A client on a raw socket: sends bytes as given, parses what comes back."""

    def __init__(self, peer: HttpPeer) -> None:
        self.peer = peer

    @classmethod
    async def connect(cls, base_url: str) -> RawClient:
        host_port = base_url.removeprefix("http://").rstrip("/")
        host, _, port = host_port.rpartition(":")
        return cls(HttpPeer(await trio.open_tcp_stream(host, int(port))))

    async def send(self, data: bytes) -> None:
        await self.peer.send(data)

    async def read_head(self) -> Head:
        head = await self.peer.read_head()
        assert head is not None, "the proxy closed the connection without answering"
        return head

    def body(self, head: Head) -> AsyncIterator[bytes]:
        """The response body as it arrives; close it if not read to the end."""
        return self.peer.body(head, until_eof=True)

    async def read_response(self) -> RawResponse:
        """Read one whole response; a body cut by a close is returned as is."""
        head = await self.read_head()
        pieces = []
        try:
            async with aclosing(self.body(head)) as body:
                async for piece in body:
                    pieces.append(piece)
        except EOFError:
            return RawResponse(head, b"".join(pieces), complete=False)
        return RawResponse(head, b"".join(pieces), complete=True)

    async def aclose(self) -> None:
        await self.peer.aclose()


@asynccontextmanager
async def open_raw_client(base_url: str) -> AsyncIterator[RawClient]:
    """Connect a raw client to ``base_url``; leaving the block disconnects."""
    client = await RawClient.connect(base_url)
    try:
        yield client
    finally:
        await client.aclose()


async def raw_exchange(base_url: str, request: bytes) -> RawResponse:
    """Send ``request`` on a new connection and return the response."""
    async with open_raw_client(base_url) as client:
        await client.send(request)
        return await client.read_response()
