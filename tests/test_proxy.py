"""The proxy on the wire, and the event it records for each exchange.

Every test runs the real server (``serve``) on a loopback port in front of a
real upstream on another: usually a :class:`~upstreams.RawUpstream`, whose
answers the test writes byte by byte, so that what a test checks is what
crossed the wire. Clients are httpx, or a raw socket where the bytes of the
request matter (absolute-form targets, forged Host headers, hop-by-hop
headers). Ordering between peers uses ``trio.Event`` handshakes, never
sleeps, and every test runs under a hang guard.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import logging
import re
import socket
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio
from upstreams import (
    LAST_CHUNK,
    Exchange,
    RawUpstream,
    chunk,
    http_request,
    http_response,
    open_raw_client,
    raw_exchange,
    reply,
)

from trio_llmproxy._bus import Subscription
from trio_llmproxy._config import ProxyConfig
from trio_llmproxy._event import Event
from trio_llmproxy._server import ServerHandle, serve

HANG_GUARD_SECONDS = 10
# How long a step that should be immediate may take before the test calls it
# buffering or a leak rather than slowness.
PROMPTLY_SECONDS = 1.0
SSE = "text/event-stream"
SECRET_TOKEN = "sk-test-4f9a0c1d2e3b4a5968778695a4b3c2d1WXYZ"


@attrs.define
class Proxy:
    """A running proxy and a subscription to its bus, opened before traffic."""

    url: str
    handle: ServerHandle
    subscription: Subscription
    _pending: list[Event] = attrs.field(factory=list)

    async def next_event(self) -> Event:
        if not self._pending:
            self._pending.extend(await self.subscription.receive_batch())
        return self._pending.pop(0)

    async def next_event_dict(self) -> dict[str, Any]:
        return (await self.next_event()).to_dict()


@asynccontextmanager
async def open_proxy(
    nursery: trio.Nursery, upstream_url: str, **settings: Any
) -> AsyncIterator[Proxy]:
    """Start the proxy in ``nursery`` (it stops with it) and subscribe to it."""
    config = ProxyConfig(
        listen="127.0.0.1:0",
        upstream_url=upstream_url,
        shutdown_timeout=5,
        **settings,
    )
    handle: ServerHandle = await nursery.start(serve, config)
    async with handle.bus.subscribe("test") as subscription:
        yield Proxy(handle.addresses[0], handle, subscription)


@asynccontextmanager
async def proxy_to(
    nursery: trio.Nursery,
    upstream: RawUpstream,
    *,
    base_path: str = "",
    **settings: Any,
) -> AsyncIterator[Proxy]:
    """Start ``upstream``, then a proxy in front of it."""
    upstream_url = await upstream.start(nursery)
    async with open_proxy(nursery, upstream_url + base_path, **settings) as proxy:
        yield proxy


def json_response(
    body: bytes = b'{"ok": true}',
    *,
    status: int = 200,
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    return http_response(
        status,
        [
            ("Content-Type", "application/json"),
            *headers,
            ("Content-Length", str(len(body))),
        ],
        body,
    )


def chunked_head(content_type: str = SSE) -> bytes:
    return http_response(
        200, [("Content-Type", content_type), ("Transfer-Encoding", "chunked")]
    )


def free_port() -> int:
    """A loopback port on which nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_proxy_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["type"] == "proxy_error"
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]


# --- Streaming ---------------------------------------------------------------


async def test_chunk_reaches_client_while_upstream_holds_back_next(
    nursery: trio.Nursery,
) -> None:
    release = trio.Event()

    async def respond(exchange: Exchange) -> None:
        await exchange.send(chunked_head() + chunk(b"data: first\n\n"))
        await release.wait()
        await exchange.send(chunk(b"data: second\n\n") + LAST_CHUNK)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, RawUpstream(respond)) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                async with client.stream("GET", "/v1/stream") as response:
                    chunks = response.aiter_raw()
                    with trio.fail_after(PROMPTLY_SECONDS):
                        first = await chunks.__anext__()
                    release.set()
                    rest = b"".join([piece async for piece in chunks])

    assert first == b"data: first\n\n"
    assert rest == b"data: second\n\n"


async def test_sse_event_split_across_upstream_writes_arrives_intact(
    nursery: trio.Nursery,
) -> None:
    halves = (b'data: {"choices": [{"delta": {"con', b'tent": "Hi"}}]}\n\n')
    first_half_sent = trio.Event()
    release = trio.Event()

    async def respond(exchange: Exchange) -> None:
        await exchange.send(chunked_head() + chunk(halves[0]))
        first_half_sent.set()
        await release.wait()
        await exchange.send(chunk(halves[1]) + chunk(b"data: [DONE]\n\n") + LAST_CHUNK)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, RawUpstream(respond)) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                async with client.stream("POST", "/v1/chat/completions") as response:
                    await first_half_sent.wait()
                    release.set()
                    received = b"".join([piece async for piece in response.aiter_raw()])

    assert received == halves[0] + halves[1] + b"data: [DONE]\n\n"


async def test_large_download_passes_byte_for_byte(nursery: trio.Nursery) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB, every byte value
    upstream = RawUpstream(
        reply(
            http_response(
                200,
                [
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Length", "2097152"),
                ],
                body,
            )
        )
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.get("/v1/files/f/content")
            event = await proxy.next_event()

    assert response.content == body
    assert response.headers["content-length"] == str(len(body))
    assert event.response_body_size == len(body)


# --- Where requests go -------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "upstream_target"),
    [
        ("/v1/chat/completions?x=1", b"/base/v1/chat/completions?x=1"),
        ("/v1/models", b"/base/v1/models"),
        ("/v1/a%2Fb/c%20d?q=%2F+x&y=%zz", b"/base/v1/a%2Fb/c%20d?q=%2F+x&y=%zz"),
        ("/v1/files?", b"/base/v1/files"),
        ("/", b"/base/"),
    ],
)
async def test_target_is_upstream_base_path_plus_path_and_query_unchanged(
    nursery: trio.Nursery, target: str, upstream_target: bytes
) -> None:
    upstream = RawUpstream(reply(json_response()))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream, base_path="/base") as proxy:
            response = await raw_exchange(
                proxy.url, http_request("GET", target, [("Host", "proxy")])
            )

    assert response.head.status == 200
    assert upstream.only_request.head.target == upstream_target


async def test_absolute_form_target_still_goes_to_configured_upstream(
    nursery: trio.Nursery,
) -> None:
    upstream = RawUpstream(reply(json_response()))
    upstream_url = await upstream.start(nursery)
    request = http_request(
        "GET", "http://evil.example/v1/models?x=1", [("Host", "evil.example")]
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_proxy(nursery, upstream_url + "/base") as proxy:
            response = await raw_exchange(proxy.url, request)

    head = upstream.only_request.head
    assert response.head.status == 200
    assert head.target == b"/base/v1/models?x=1"
    assert head.values("host") == [upstream_url.removeprefix("http://").encode()]


async def test_double_slash_path_still_goes_to_configured_upstream(
    nursery: trio.Nursery,
) -> None:
    upstream = RawUpstream(reply(json_response()))
    upstream_url = await upstream.start(nursery)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_proxy(nursery, upstream_url) as proxy:
            response = await raw_exchange(
                proxy.url,
                http_request("GET", "//evil.example/v1/models", [("Host", "proxy")]),
            )

    head = upstream.only_request.head
    assert response.head.status == 200
    assert head.target == b"//evil.example/v1/models"
    assert head.value("host") == upstream_url.removeprefix("http://").encode()


async def test_forged_host_header_still_goes_to_configured_upstream(
    nursery: trio.Nursery,
) -> None:
    upstream = RawUpstream(reply(json_response()))
    upstream_url = await upstream.start(nursery)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_proxy(nursery, upstream_url) as proxy:
            response = await raw_exchange(
                proxy.url,
                http_request("GET", "/v1/models", [("Host", "evil.example:443")]),
            )

    head = upstream.only_request.head
    assert response.head.status == 200
    assert head.values("host") == [upstream_url.removeprefix("http://").encode()]


async def test_x_forwarded_host_still_goes_to_configured_upstream(
    nursery: trio.Nursery,
) -> None:
    upstream = RawUpstream(reply(json_response()))
    upstream_url = await upstream.start(nursery)
    headers = [("Host", "proxy"), ("X-Forwarded-Host", "evil.example")]

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_proxy(nursery, upstream_url) as proxy:
            response = await raw_exchange(
                proxy.url, http_request("GET", "/v1/models", headers)
            )

    head = upstream.only_request.head
    assert response.head.status == 200
    assert head.values("host") == [upstream_url.removeprefix("http://").encode()]
    # An end-to-end header like any other: it passes, and routes nothing.
    assert head.values("x-forwarded-host") == [b"evil.example"]


@pytest.mark.parametrize(
    "target",
    ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/%2E%2E", "/./v1/models", "/v1/.."],
)
async def test_dot_segments_get_400_with_openai_error(
    nursery: trio.Nursery, target: str
) -> None:
    upstream = RawUpstream(reply(json_response()))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            response = await raw_exchange(
                proxy.url, http_request("GET", target, [("Host", "proxy")])
            )
            event = await proxy.next_event()

    assert response.head.status == 400
    assert response.head.value("content-type") == b"application/json"
    error = orjson.loads(response.body)["error"]
    assert error["type"] == "proxy_error"
    assert error["code"] == "bad_request"
    assert error["message"]
    assert upstream.requests == []
    assert event.status == 400


# --- Headers and bodies pass unchanged ---------------------------------------


async def test_method_headers_and_body_pass_unchanged(nursery: trio.Nursery) -> None:
    body = b'{"model": "m", "input": "h\xc3\xa9llo"}'
    client_headers = [
        ("Host", "proxy.example"),
        ("X-Request-ID", "req-1"),
        ("Authorization", f"Bearer {SECRET_TOKEN}"),
        ("X-Repeated", "one"),
        ("Content-Type", "application/json"),
        ("X-Repeated", "two"),
        ("OpenAI-Beta", "assistants=v2"),
        ("Content-Length", str(len(body))),
        ("x-lower", "Mixed Case Value"),
    ]
    upstream = RawUpstream(reply(json_response()))
    upstream_url = await upstream.start(nursery)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_proxy(nursery, upstream_url) as proxy:
            await raw_exchange(
                proxy.url, http_request("PATCH", "/v1/things/1", client_headers, body)
            )

    received = upstream.only_request
    sent = [(n.lower().encode(), v.encode()) for n, v in client_headers]
    upstream_host = upstream_url.removeprefix("http://").encode()
    assert received.head.method == b"PATCH"
    assert [(n.lower(), v) for n, v in received.head.headers] == [
        (b"host", upstream_host),
        *sent[1:],
    ]
    assert received.body == body


async def test_upstream_sees_no_headers_the_client_did_not_send(
    nursery: trio.Nursery,
) -> None:
    upstream = RawUpstream(reply(json_response()))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            await raw_exchange(
                proxy.url,
                http_request(
                    "POST",
                    "/v1/embeddings",
                    [("Host", "p"), ("Content-Length", "2")],
                    b"{}",
                ),
            )

    # Host is replaced and X-Request-ID added; nothing else (no User-Agent,
    # Accept, Accept-Encoding, Connection, Via or X-Forwarded-* of our own).
    assert upstream.only_request.head.names() == [
        b"host",
        b"content-length",
        b"x-request-id",
    ]


async def test_response_status_headers_and_body_pass_unchanged(
    nursery: trio.Nursery,
) -> None:
    body = b'{"id": "chatcmpl-1", "object": "chat.completion"}'
    upstream_headers = [
        ("Content-Type", "application/json"),
        ("X-Ratelimit-Remaining-Requests", "99"),
        ("Vary", "Origin"),
        ("Openai-Processing-Ms", "42"),
        ("Vary", "Accept-Encoding"),
        ("Content-Length", str(len(body))),
    ]
    upstream = RawUpstream(reply(http_response(201, upstream_headers, body)))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            response = await raw_exchange(
                proxy.url, http_request("GET", "/v1/x", [("Host", "p")])
            )

    expected = [(n.lower().encode(), v.encode()) for n, v in upstream_headers]
    assert response.head.status == 201
    assert [(n.lower(), v) for n, v in response.head.headers[:-1]] == expected
    assert response.head.names()[-1] == b"x-request-id"
    assert response.body == body


async def test_proxy_adds_no_date_or_server_header(nursery: trio.Nursery) -> None:
    upstream = RawUpstream(reply(json_response()))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            response = await raw_exchange(
                proxy.url, http_request("GET", "/v1/x", [("Host", "p")])
            )

    assert b"date" not in response.head.names()
    assert b"server" not in response.head.names()


async def test_upstream_date_and_server_reach_client_once(
    nursery: trio.Nursery,
) -> None:
    date = "Tue, 01 Apr 2025 10:00:00 GMT"
    upstream = RawUpstream(
        reply(json_response(headers=(("Date", date), ("Server", "cloudflare"))))
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            response = await raw_exchange(
                proxy.url, http_request("GET", "/v1/x", [("Host", "p")])
            )

    assert response.head.values("date") == [date.encode()]
    assert response.head.values("server") == [b"cloudflare"]


async def test_hop_by_hop_request_headers_do_not_reach_upstream(
    nursery: trio.Nursery,
) -> None:
    headers = [
        ("Host", "p"),
        ("Connection", "keep-alive, X-Hop-Listed"),
        ("X-Hop-Listed", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "example/1"),
        ("X-End-To-End", "kept"),
        ("Content-Length", "2"),
    ]
    upstream = RawUpstream(reply(json_response()))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            await raw_exchange(proxy.url, http_request("POST", "/v1/x", headers, b"{}"))

    assert upstream.only_request.head.names() == [
        b"host",
        b"x-end-to-end",
        b"content-length",
        b"x-request-id",
    ]


async def test_client_transfer_encoding_does_not_reach_upstream(
    nursery: trio.Nursery,
) -> None:
    # A chunked request body is re-framed by the proxy's own connection: the
    # upstream sees one Transfer-Encoding (the proxy's), never two.
    headers = [("Host", "p"), ("Transfer-Encoding", "chunked")]
    upstream = RawUpstream(reply(json_response()))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            await raw_exchange(
                proxy.url,
                http_request("POST", "/v1/x", headers, chunk(b"{}") + LAST_CHUNK),
            )

    received = upstream.only_request
    assert len(received.head.values("transfer-encoding")) <= 1
    assert received.body == b"{}"


async def test_hop_by_hop_response_headers_do_not_reach_client(
    nursery: trio.Nursery,
) -> None:
    head = http_response(
        200,
        [
            ("Content-Type", SSE),
            ("Connection", "keep-alive, X-Hop-Listed"),
            ("X-Hop-Listed", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "example/1"),
            ("X-End-To-End", "kept"),
            ("Transfer-Encoding", "chunked"),
        ],
    )
    upstream = RawUpstream(reply(head + chunk(b"data: x\n\n") + LAST_CHUNK))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            response = await raw_exchange(
                proxy.url, http_request("GET", "/v1/x", [("Host", "p")])
            )

    names = response.head.names()
    for hop in (b"connection", b"x-hop-listed", b"keep-alive", b"proxy-connection"):
        assert hop not in names
    for hop in (b"te", b"trailer", b"upgrade"):
        assert hop not in names
    # The client's connection is framed by the proxy's server: one header.
    assert response.head.values("transfer-encoding") == [b"chunked"]
    assert b"x-end-to-end" in names
    assert response.body == b"data: x\n\n"


# --- Request IDs ---------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["req-42", "a" * 128, "x y!~{}"])
async def test_sane_request_id_is_kept_end_to_end(
    nursery: trio.Nursery, request_id: str
) -> None:
    upstream = RawUpstream(reply(json_response()))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.get(
                    "/v1/models", headers={"X-Request-ID": request_id}
                )
            event = await proxy.next_event()

    assert upstream.only_request.head.values("x-request-id") == [request_id.encode()]
    assert response.headers.get_list("x-request-id") == [request_id]
    assert event.request_id == request_id


@pytest.mark.parametrize(
    "request_id",
    [b"a" * 129, b"with\ttab", b"caf\xc3\xa9", b"del\x7f", b""],
    ids=["too-long", "tab", "non-ascii", "delete", "empty"],
)
async def test_insane_request_id_is_replaced_by_a_generated_one(
    nursery: trio.Nursery, request_id: bytes
) -> None:
    upstream = RawUpstream(reply(json_response()))
    request = (
        b"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Request-ID: "
        + request_id
        + b"\r\n\r\n"
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            response = await raw_exchange(proxy.url, request)
            event = await proxy.next_event()

    generated = response.head.value("x-request-id")
    assert generated is not None and generated != request_id
    assert re.fullmatch(rb"[\x21-\x7e]{1,128}", generated)
    assert upstream.only_request.head.values("x-request-id") == [generated]
    assert event.request_id == generated.decode()


async def test_missing_request_id_is_generated(nursery: trio.Nursery) -> None:
    upstream = RawUpstream(reply(json_response()))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                first = await client.get("/v1/models")
                second = await client.get("/v1/models")
            events = [await proxy.next_event(), await proxy.next_event()]

    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert ids[0] != ids[1]
    assert [r.head.value("x-request-id") for r in upstream.requests] == [
        i.encode() for i in ids
    ]
    assert [e.request_id for e in events] == ids


async def test_upstream_request_id_is_replaced_by_the_proxy_one(
    nursery: trio.Nursery,
) -> None:
    upstream = RawUpstream(
        reply(json_response(headers=(("X-Request-ID", "upstream-own-id"),)))
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.get("/v1/x", headers={"X-Request-ID": "mine"})

    assert response.headers.get_list("x-request-id") == ["mine"]


# --- Encodings and binary bodies ---------------------------------------------


async def test_gzip_body_reaches_client_compressed_and_event_holds_text(
    nursery: trio.Nursery,
) -> None:
    text = '{"choices": [{"message": {"content": "héllo, compressed world"}}]}'
    compressed = gzip.compress(text.encode() * 20)
    upstream = RawUpstream(
        reply(
            json_response(compressed, headers=(("Content-Encoding", "gzip"),)),
        )
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                async with client.stream("GET", "/v1/x") as response:
                    received = b"".join([p async for p in response.aiter_raw()])
            event = await proxy.next_event_dict()

    assert received == compressed
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-length"] == str(len(compressed))
    assert event["response_body"] == text * 20
    assert event["response_body_encoding"] == "utf-8"
    assert event["response_body_size"] == len(compressed)


async def test_binary_response_is_base64_in_event_and_identical_at_client(
    nursery: trio.Nursery,
) -> None:
    audio = b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x64" + bytes(range(256)) * 4
    head = http_response(
        200, [("Content-Type", "audio/mpeg"), ("Transfer-Encoding", "chunked")]
    )
    upstream = RawUpstream(
        reply(head, chunk(audio[:300]), chunk(audio[300:]), LAST_CHUNK)
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.post("/v1/audio/speech", json={"input": "hi"})
            event = await proxy.next_event_dict()

    assert response.content == audio
    assert event["response_body_encoding"] == "base64"
    assert base64.b64decode(event["response_body"]) == audio
    assert event["response_body_size"] == len(audio)


async def test_multipart_upload_reaches_upstream_byte_for_byte(
    nursery: trio.Nursery,
) -> None:
    audio = bytes(range(256)) * 64 + b"\r\n--not-the-boundary\r\n"
    upstream = RawUpstream(reply(json_response(b'{"text": "hi"}')))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                request = client.build_request(
                    "POST",
                    "/v1/audio/transcriptions",
                    data={"model": "whisper-1"},
                    files={"file": ("a.mp3", audio, "audio/mpeg")},
                )
                sent = request.read()
                response = await client.send(request)
            event = await proxy.next_event()

    received = upstream.only_request
    assert response.status_code == 200
    assert received.body == sent
    assert (
        received.head.value("content-type") == request.headers["content-type"].encode()
    )
    assert received.head.value("content-length") == str(len(sent)).encode()
    assert event.request_body_size == len(sent)


async def test_request_body_is_streamed_before_client_finishes_sending(
    nursery: trio.Nursery,
) -> None:
    boundary = "b0undary"
    first_part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        "whisper-1\r\n"
    ).encode()
    second_part = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            'filename="a.mp3"\r\nContent-Type: audio/mpeg\r\n\r\n'
        ).encode()
        + bytes(range(256))
        + f"\r\n--{boundary}--\r\n".encode()
    )
    first_part_upstream = trio.Event()

    async def respond(exchange: Exchange) -> None:
        async for _ in exchange.body():
            if len(exchange.request.body) >= len(first_part):
                first_part_upstream.set()
        await exchange.send(json_response())

    headers = [
        ("Host", "p"),
        ("Content-Type", f"multipart/form-data; boundary={boundary}"),
        ("Transfer-Encoding", "chunked"),
    ]
    upstream = RawUpstream(respond)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with open_raw_client(proxy.url) as client:
                head = http_request("POST", "/v1/audio/transcriptions", headers)
                await client.send(head + chunk(first_part))
                with trio.fail_after(PROMPTLY_SECONDS):
                    await first_part_upstream.wait()
                await client.send(chunk(second_part) + LAST_CHUNK)
                response = await client.read_response()

    assert response.head.status == 200
    assert upstream.only_request.body == first_part + second_part


# --- Upstream errors and failures ----------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
async def test_upstream_error_status_passes_through_unchanged(
    nursery: trio.Nursery, status: int
) -> None:
    body = b'{"error": {"message": "nope", "type": "invalid_request_error"}}'
    headers = (("Retry-After", "7"), ("X-Should-Retry", "true"))
    upstream = RawUpstream(reply(json_response(body, status=status, headers=headers)))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.post("/v1/chat/completions", json={})
            event = await proxy.next_event()

    assert response.status_code == status
    assert response.content == body
    assert list(response.headers.items())[:-1] == [
        ("content-type", "application/json"),
        ("retry-after", "7"),
        ("x-should-retry", "true"),
        ("content-length", str(len(body))),
    ]
    assert event.status == status
    assert event.outcome == "ok"
    assert event.error is None


async def test_repeated_set_cookie_headers_reach_client(nursery: trio.Nursery) -> None:
    cookies = ("__cf_bm=c00kie-0ne; Path=/; HttpOnly", "_cfuvid=c00kie-tw0; Path=/")
    upstream = RawUpstream(
        reply(json_response(headers=tuple(("Set-Cookie", c) for c in cookies)))
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.get("/v1/models")

    assert response.headers.get_list("set-cookie") == list(cookies)


async def test_event_redacts_secret_headers(nursery: trio.Nursery) -> None:
    cookies = ("__cf_bm=c00kie-0ne; Path=/", "_cfuvid=c00kie-tw0; Path=/")
    upstream = RawUpstream(
        reply(json_response(headers=tuple(("Set-Cookie", c) for c in cookies)))
    )
    secrets = {
        "Authorization": f"Bearer {SECRET_TOKEN}",
        "api-key": "azure-key-0123456789abcdefQRST",
        "x-api-key": "anthropic-key-0123456789LMNO",
        "Cookie": "session=s3ss10n-c00kie",
        "Proxy-Authorization": "Basic dXNlcjpwNHNzdzByZA==",
    }

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                await client.get("/v1/models", headers=secrets)
            event = await proxy.next_event()

    rendered = event.to_dict()
    request_headers = rendered["request_headers"]
    assert request_headers["authorization"] == ["Bearer [REDACTED]...WXYZ"]
    assert request_headers["api-key"] == ["[REDACTED]...QRST"]
    assert request_headers["x-api-key"] == ["[REDACTED]...LMNO"]
    assert request_headers["cookie"] == ["[REDACTED]"]
    assert request_headers["proxy-authorization"] == ["Basic [REDACTED]"]
    assert rendered["response_headers"]["set-cookie"] == ["[REDACTED]", "[REDACTED]"]
    json_text = event.to_json().decode()
    for secret in [*secrets.values(), "c00kie-0ne", "c00kie-tw0", SECRET_TOKEN]:
        assert secret not in json_text
    # The upstream itself got the real key: redaction is for the record only.
    upstream_auth = upstream.only_request.head.value("authorization")
    assert upstream_auth == secrets["Authorization"].encode()


async def test_configured_secret_header_is_redacted(nursery: trio.Nursery) -> None:
    upstream = RawUpstream(
        reply(json_response(headers=(("X-Session-Token", "upstream-s3cret"),)))
    )
    headers = {"X-Tenant-Secret": "tenant-s3cret"}

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(
            nursery,
            upstream,
            secret_headers=("x-tenant-secret", "X-Session-Token"),
        ) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.get("/v1/models", headers=headers)
            event = await proxy.next_event()

    rendered = event.to_dict()
    assert rendered["request_headers"]["x-tenant-secret"] == ["[REDACTED]"]
    assert rendered["response_headers"]["x-session-token"] == ["[REDACTED]"]
    assert response.headers["x-session-token"] == "upstream-s3cret"
    assert upstream.only_request.head.value("x-tenant-secret") == b"tenant-s3cret"


async def test_authorization_value_appears_nowhere_in_event_file_or_logs(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream = RawUpstream(reply(json_response()))
    upstream_url = await upstream.start(nursery)
    event_log = tmp_path / "events.jsonl"
    config = ProxyConfig(
        listen="127.0.0.1:0",
        upstream_url=upstream_url,
        file_event_log=event_log,
        shutdown_timeout=5,
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as server_nursery:
            handle: ServerHandle = await server_nursery.start(serve, config)
            async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
                await client.post(
                    "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {SECRET_TOKEN}"},
                    json={"messages": []},
                )
            handle.shutdown()

    lines = event_log.read_text().splitlines()
    assert len(lines) == 1
    assert "[REDACTED]" in lines[0]
    assert SECRET_TOKEN not in lines[0]
    assert caplog.records, "expected at least the access line"
    for record in caplog.records:
        assert SECRET_TOKEN not in record.getMessage()


async def test_unreachable_upstream_gives_502_openai_error(
    nursery: trio.Nursery,
) -> None:
    upstream_url = f"http://127.0.0.1:{free_port()}"

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_proxy(nursery, upstream_url) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.get("/v1/models")
            event = await proxy.next_event()

    assert_proxy_error(response, 502, "upstream_unreachable")
    assert response.headers["x-request-id"] == event.request_id
    assert event.status == 502
    assert event.outcome == "upstream_error"
    assert event.error


async def test_unreachable_upstream_event_still_records_the_request_body(
    nursery: trio.Nursery,
) -> None:
    upstream_url = f"http://127.0.0.1:{free_port()}"
    body = b'{"model": "m", "messages": []}'

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_proxy(nursery, upstream_url) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.post("/v1/chat/completions", content=body)
            event = await proxy.next_event()

    assert response.status_code == 502
    assert event.request_body == body
    assert event.request_body_size == len(body)


async def test_upstream_not_answering_gives_504_openai_error(
    nursery: trio.Nursery,
) -> None:
    async def never_answer(exchange: Exchange) -> None:
        await exchange.read_body()
        await trio.sleep_forever()

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(
            nursery, RawUpstream(never_answer), read_timeout=0.3
        ) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.get("/v1/models")
            event = await proxy.next_event()

    assert_proxy_error(response, 504, "upstream_timeout")
    assert event.status == 504
    assert event.outcome == "upstream_timeout"
    assert event.error


async def test_mid_stream_upstream_failure_cuts_client_stream(
    nursery: trio.Nursery,
) -> None:
    async def break_off(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.send(
            chunked_head() + chunk(b"data: 1\n\n") + chunk(b"data: 2\n\n")
        )
        await exchange.close()

    received = []
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, RawUpstream(break_off)) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                async with client.stream("GET", "/v1/stream") as response:
                    with pytest.raises(httpx.RemoteProtocolError):
                        async for piece in response.aiter_raw():
                            received.append(piece)
            event = await proxy.next_event()

    assert b"".join(received) == b"data: 1\n\ndata: 2\n\n"
    assert event.status == 200
    assert event.outcome == "upstream_error"
    assert event.error
    assert event.response_body == b"data: 1\n\ndata: 2\n\n"


async def test_upstream_body_shorter_than_content_length_cuts_client_stream(
    nursery: trio.Nursery,
) -> None:
    async def fall_short(exchange: Exchange) -> None:
        await exchange.read_body()
        headers = [("Content-Type", "application/json"), ("Content-Length", "100")]
        await exchange.send(http_response(200, headers, b"x" * 40))
        await exchange.close()

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, RawUpstream(fall_short)) as proxy:
            response = await raw_exchange(
                proxy.url, http_request("GET", "/v1/x", [("Host", "p")])
            )
            event = await proxy.next_event()

    assert response.head.value("content-length") == b"100"
    assert response.complete is False
    assert response.body == b"x" * 40
    assert event.outcome == "upstream_error"
    assert event.response_body_size == 40


async def test_upstream_stalling_mid_stream_cuts_client_stream_as_timeout(
    nursery: trio.Nursery,
) -> None:
    async def stall(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.send(chunked_head() + chunk(b"data: 1\n\n"))
        await trio.sleep_forever()

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, RawUpstream(stall), read_timeout=0.3) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                async with client.stream("GET", "/v1/stream") as response:
                    with pytest.raises(httpx.RemoteProtocolError):
                        async for _ in response.aiter_raw():
                            pass
            event = await proxy.next_event()

    assert event.outcome == "upstream_timeout"


async def test_client_disconnect_mid_stream_closes_upstream_connection(
    nursery: trio.Nursery,
) -> None:
    upstream_closed = trio.Event()

    async def stream_forever(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.send(chunked_head() + chunk(b"data: 1\n\n"))
        await exchange.wait_for_close()
        upstream_closed.set()
        await exchange.close()

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, RawUpstream(stream_forever)) as proxy:
            async with open_raw_client(proxy.url) as client:
                await client.send(http_request("GET", "/v1/stream", [("Host", "p")]))
                head = await client.read_head()
                async with aclosing(client.body(head)) as body:
                    first = await body.__anext__()
            with trio.fail_after(PROMPTLY_SECONDS):
                await upstream_closed.wait()
            event = await proxy.next_event()

    assert first == b"data: 1\n\n"
    assert event.outcome == "client_disconnected"
    assert event.response_body == b"data: 1\n\n"


async def test_client_disconnect_before_response_head_closes_upstream_connection(
    nursery: trio.Nursery,
) -> None:
    request_upstream = trio.Event()
    upstream_closed = trio.Event()

    async def think_forever(exchange: Exchange) -> None:
        await exchange.read_body()
        request_upstream.set()
        await exchange.wait_for_close()
        upstream_closed.set()
        await exchange.close()

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, RawUpstream(think_forever)) as proxy:
            async with open_raw_client(proxy.url) as client:
                await client.send(
                    http_request(
                        "POST",
                        "/v1/chat/completions",
                        [("Host", "p"), ("Content-Length", "2")],
                        b"{}",
                    )
                )
                await request_upstream.wait()
            with trio.fail_after(PROMPTLY_SECONDS):
                await upstream_closed.wait()
            event = await proxy.next_event()

    assert event.outcome == "client_disconnected"
    assert event.ttfb_ms is None


async def test_client_disconnect_during_request_body_closes_upstream_connection(
    nursery: trio.Nursery,
) -> None:
    body_started_upstream = trio.Event()
    upstream_closed = trio.Event()

    async def read_until_close(exchange: Exchange) -> None:
        try:
            async for _ in exchange.body():
                body_started_upstream.set()
        except (EOFError, trio.BrokenResourceError):
            upstream_closed.set()
        await exchange.close()

    headers = [("Host", "p"), ("Transfer-Encoding", "chunked")]
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, RawUpstream(read_until_close)) as proxy:
            async with open_raw_client(proxy.url) as client:
                await client.send(
                    http_request("POST", "/v1/files", headers) + chunk(b"first part")
                )
                await body_started_upstream.wait()
            with trio.fail_after(PROMPTLY_SECONDS):
                await upstream_closed.wait()
            event = await proxy.next_event()

    assert event.outcome == "client_disconnected"
    assert event.request_body == b"first part"


async def test_healthz_is_answered_by_proxy_and_not_recorded(
    nursery: trio.Nursery,
) -> None:
    upstream = RawUpstream(reply(json_response()))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                health = await client.get("/healthz")
                await client.get("/v1/models")
            event = await proxy.next_event()

    assert health.status_code == 200
    assert health.text == "ok"
    assert [r.head.target for r in upstream.requests] == [b"/v1/models"]
    assert event.path == "/v1/models"
    assert proxy.handle.bus.statistics().published == 1


# --- Forward proxies named by the environment ------------------------------------

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def set_proxy_environment(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    """Clear every proxy variable (either case), then set ``values``."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


async def test_http_proxy_from_environment_carries_upstream_requests(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = RawUpstream(reply(json_response(b'{"via": "upstream"}')))
    upstream_url = await upstream.start(nursery)
    # The forward proxy answers itself: what matters is that it was asked.
    forward_proxy = RawUpstream(reply(json_response(b'{"via": "forward proxy"}')))
    set_proxy_environment(monkeypatch, HTTP_PROXY=await forward_proxy.start(nursery))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_proxy(nursery, upstream_url) as proxy:
            response = await raw_exchange(
                proxy.url, http_request("GET", "/v1/models", [("Host", "p")])
            )

    assert response.body == b'{"via": "forward proxy"}'
    asked = forward_proxy.only_request.head
    assert asked.target == f"{upstream_url}/v1/models".encode()
    assert upstream.requests == []


async def test_no_proxy_host_from_environment_is_reached_directly(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = RawUpstream(reply(json_response(b'{"via": "upstream"}')))
    upstream_url = await upstream.start(nursery)
    forward_proxy = RawUpstream(reply(json_response(b'{"via": "forward proxy"}')))
    set_proxy_environment(
        monkeypatch,
        HTTP_PROXY=await forward_proxy.start(nursery),
        NO_PROXY="example.com,127.0.0.1",
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_proxy(nursery, upstream_url) as proxy:
            response = await raw_exchange(
                proxy.url, http_request("GET", "/v1/models", [("Host", "p")])
            )

    assert response.body == b'{"via": "upstream"}'
    assert upstream.only_request.head.target == b"/v1/models"
    assert forward_proxy.requests == []


# --- The event's fields ----------------------------------------------------------


async def test_event_timestamp_is_rfc3339_utc_with_microseconds(
    nursery: trio.Nursery,
) -> None:
    upstream = RawUpstream(reply(json_response()))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            before = datetime.datetime.now(datetime.UTC)
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                await client.get("/v1/models")
            after = datetime.datetime.now(datetime.UTC)
            event = await proxy.next_event_dict()

    timestamp = event["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", timestamp)
    moment = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    assert before <= moment <= after


async def test_event_ttfb_is_at_most_duration(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def respond(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.send(chunked_head() + chunk(b"data: 1\n\n"))
        await release.wait()
        await exchange.send(chunk(b"data: 2\n\n") + LAST_CHUNK)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, RawUpstream(respond)) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                async with client.stream("GET", "/v1/stream") as response:
                    async for _ in response.aiter_raw():
                        release.set()
            event = await proxy.next_event_dict()

    assert 0 <= event["ttfb_ms"] <= event["duration_ms"]


async def test_event_sizes_are_the_bytes_that_passed(nursery: trio.Nursery) -> None:
    request_body = b'{"input": "' + b"x" * 5000 + b'"}'
    pieces = [b"data: " + bytes([65 + i]) * 100 + b"\n\n" for i in range(5)]
    upstream = RawUpstream(
        reply(chunked_head(), *(chunk(p) for p in pieces), LAST_CHUNK)
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.post("/v1/x", content=request_body)
            event = await proxy.next_event_dict()

    assert event["request_body_size"] == len(request_body)
    assert event["request_body"] == request_body.decode()
    assert event["response_body_size"] == len(response.content) == len(b"".join(pieces))
    assert event["response_body"] == b"".join(pieces).decode()
    assert event["request_body_truncated"] is False
    assert event["response_body_truncated"] is False


async def test_event_response_body_over_cap_is_truncated_with_full_size(
    nursery: trio.Nursery,
) -> None:
    body = b"0123456789" * 10
    upstream = RawUpstream(reply(json_response(body)))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream, max_response_body_bytes=16) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.get("/v1/x")
            event = await proxy.next_event_dict()

    assert response.content == body
    assert event["response_body"] == body[:16].decode()
    assert event["response_body_truncated"] is True
    assert event["response_body_size"] == len(body)


async def test_event_request_body_over_cap_is_truncated_with_full_size(
    nursery: trio.Nursery,
) -> None:
    body = b"abcdefghij" * 10
    upstream = RawUpstream(reply(json_response()))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream, max_request_body_bytes=16) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                await client.post("/v1/x", content=body)
            event = await proxy.next_event_dict()

    assert upstream.only_request.body == body
    assert event["request_body"] == body[:16].decode()
    assert event["request_body_truncated"] is True
    assert event["request_body_size"] == len(body)


@pytest.mark.parametrize(
    ("response", "streamed"),
    [
        (chunked_head(SSE) + chunk(b"data: 1\n\n") + LAST_CHUNK, True),
        (chunked_head("application/json") + chunk(b"{}") + LAST_CHUNK, True),
        (json_response(), False),
        (http_response(204, [("X-Deleted", "1")]), False),
    ],
    ids=["sse", "chunked-json", "content-length", "no-content"],
)
async def test_event_streamed_flag_follows_the_response_framing(
    nursery: trio.Nursery, response: bytes, streamed: bool
) -> None:
    upstream = RawUpstream(reply(response))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                await client.get("/v1/x")
            event = await proxy.next_event_dict()

    assert event["streamed"] is streamed


async def test_event_of_head_request_is_not_streamed(nursery: trio.Nursery) -> None:
    upstream = RawUpstream(reply(http_response(200, [("Content-Type", "text/plain")])))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.head("/v1/files/f")
            event = await proxy.next_event_dict()

    assert response.status_code == 200
    assert event["streamed"] is False


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/v1/models", "/v1/models", ""),
        ("/v1/models?", "/v1/models", ""),
        ("/v1/a%20b?limit=10&after=x%2Fy", "/v1/a%20b", "limit=10&after=x%2Fy"),
    ],
)
async def test_event_path_and_query_are_as_received(
    nursery: trio.Nursery, target: str, path: str, query: str
) -> None:
    upstream = RawUpstream(reply(json_response()))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            await raw_exchange(proxy.url, http_request("GET", target, [("Host", "p")]))
            event = await proxy.next_event_dict()

    assert event["path"] == path
    assert event["query"] == query


async def test_event_records_method_status_and_fixed_fields(
    nursery: trio.Nursery,
) -> None:
    upstream = RawUpstream(reply(json_response(status=201)))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy_to(nursery, upstream) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                await client.put("/v1/x", content=b"")
                await client.put("/v1/x", content=b"")
            events = [await proxy.next_event_dict(), await proxy.next_event_dict()]

    first = events[0]
    assert first["schema_version"] == 1
    assert first["method"] == "PUT"
    assert first["status"] == 201
    assert first["outcome"] == "ok"
    assert first["error"] is None
    assert first["request_body"] is None
    assert events[0]["event_id"] != events[1]["event_id"]
