"""A lean OpenAI-compatible upstream for the benchmarks, on raw asyncio sockets.

The package's ``mock-upstream`` runs on Hypercorn, which costs about as much
CPU per request as the proxy under test; sharing a core with the load
generator it would be the bottleneck of the JSON scenarios. This server parses
just enough HTTP/1.1 to answer the benchmark's requests and costs a few tens
of microseconds per request.

It speaks the mock's per-request headers: ``X-Mock-Chunk-Count``,
``X-Mock-Chunk-Size`` (characters of content per event) and
``X-Mock-Chunk-Delay-Ms`` (sleep before each content event). A POST whose body
holds ``"stream": true`` gets SSE, sent as one HTTP chunk per event; anything
else gets a small JSON completion. Every SSE event carries ``"ts"``, the
``time.monotonic_ns()`` at which it was written, so the load generator (on the
same machine, same clock) can tell how long each event took to reach it.

Run: ``python benchmarks/upstream.py --port PORT``; it prints ``ready`` once
it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import time

MAX_HEAD_BYTES = 65536
MAX_CHUNK_COUNT = 100_000
MAX_CHUNK_SIZE = 1 << 20

_JSON_BODY = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
    b'"model":"bench","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"The quick brown fox jumps over the lazy dog."},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":10,'
    b'"total_tokens":19}}'
)
_JSON_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_JSON_BODY)).encode() + b"\r\n\r\n"
)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
_MODELS_BODY = b'{"object":"list","data":[{"id":"bench","object":"model"}]}'
_MODELS = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_MODELS_BODY)).encode() + b"\r\n\r\n" + _MODELS_BODY
)
_EVENT_HEAD = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","ts":'
_EVENT_MID = b',"choices":[{"index":0,"delta":{"content":"'
_EVENT_TAIL = b'"},"finish_reason":null}]}\n\n'
_DONE = b"data: [DONE]\n\n"
_TEXT = b"The quick brown fox jumps over the lazy dog. " * 64


def _content(size: int) -> bytes:
    repeats = size // len(_TEXT) + 1
    return (_TEXT * repeats)[:size]


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._buffer = b""
        self._busy = False
        self._paused: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)

    def pause_writing(self) -> None:
        self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        self._paused = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._busy:
            self._parse()

    def _parse(self) -> None:
        transport = self._transport
        while transport is not None and not self._busy:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    transport.close()
                return
            head = self._buffer[:end].split(b"\r\n")
            headers: dict[bytes, bytes] = {}
            for line in head[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            if len(self._buffer) < end + 4 + length:
                return
            body = self._buffer[end + 4 : end + 4 + length]
            self._buffer = self._buffer[end + 4 + length :]
            self._answer(transport, head[0], headers, body)

    def _answer(
        self,
        transport: asyncio.Transport,
        request_line: bytes,
        headers: dict[bytes, bytes],
        body: bytes,
    ) -> None:
        if request_line.startswith(b"GET"):
            transport.write(_MODELS)
            return
        if b'"stream": true' not in body and b'"stream":true' not in body:
            transport.write(_JSON_HEAD + _JSON_BODY)
            return
        count = min(int(headers.get(b"x-mock-chunk-count", b"8")), MAX_CHUNK_COUNT)
        size = min(int(headers.get(b"x-mock-chunk-size", b"4")), MAX_CHUNK_SIZE)
        delay = float(headers.get(b"x-mock-chunk-delay-ms", b"0")) / 1000
        self._busy = True
        asyncio.get_running_loop().create_task(
            self._stream(transport, count, _content(size), delay)
        )

    async def _stream(
        self, transport: asyncio.Transport, count: int, content: bytes, delay: float
    ) -> None:
        transport.write(_SSE_HEAD)
        tail = _EVENT_MID + content + _EVENT_TAIL
        for _ in range(count):
            if delay:
                await asyncio.sleep(delay)
            if self._paused is not None:
                await self._paused
            if self._transport is None:
                return
            event = _EVENT_HEAD + b"%d" % time.monotonic_ns() + tail
            transport.write(_chunk(event))
        transport.write(_chunk(_DONE) + b"0\r\n\r\n")
        self._busy = False
        self._parse()


async def _main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Connection, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        asyncio.run(_main(args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
