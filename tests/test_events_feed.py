"""Tests for the live events feed that serve() runs with ``events_feed``.

The proxy runs in-process on loopback port 0 with the feed on another port 0
(its address is in ``ServerHandle.events_feed``); the upstream is the mock of
``conftest.py``; the feed's clients are real trio-websocket clients. Each test
runs under a hang guard.
"""

from __future__ import annotations

import gc
import logging
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import trio
from test_cli import run_cli
from test_server import CHAT, RecordingSink, proxy_config, read_events
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)
from ws_client import open_client

from trio_llmproxy import InMemoryEventBus, ProxyConfig, serve
from trio_llmproxy._config import ListenFailed
from trio_llmproxy._errors import ConfigError
from trio_llmproxy._events_feed import (
    HANDSHAKE_TIMEOUT_SECONDS,
    SUBSCRIBER_PREFIX,
    EventsFeed,
)
from trio_llmproxy._server import ServerHandle
from trio_llmproxy._tail import FEED_RECEIVE_BYTES, MAX_FEED_MESSAGE_BYTES

HANG_GUARD_SECONDS = 15
TOKEN = "feed-token-0123456789abcdef"
# What port scanners, health checks and confused clients send a feed.
NOT_WEBSOCKET = {
    "plain-http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "garbage": b"\x00" * 100,
    "half-a-head": b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n",
    "nothing": b"",
}
STORM_CONNECTIONS = 200


def feed_config(tmp_path: Path, upstream: str, **overrides: Any) -> Any:
    return proxy_config(tmp_path, upstream, events_feed="127.0.0.1:0", **overrides)


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


@asynccontextmanager
async def feed_client(
    url: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    message_queue_size: int = 1,
) -> AsyncIterator[WebSocketConnection]:
    """A client of the feed, reading as tail does (see ws_client)."""
    async with open_client(
        url,
        extra_headers=headers,
        message_queue_size=message_queue_size,
        # As large as tail takes: events carry whole bodies.
        max_message_size=MAX_FEED_MESSAGE_BYTES,
        receive_buffer_size=FEED_RECEIVE_BYTES,
    ) as connection:
        yield connection


async def handshake_refusal(
    url: str, headers: list[tuple[bytes, bytes]]
) -> ConnectionRejected | None:
    """Open and close a client; return the refusal, if the feed refused it."""
    refusal = None
    try:
        async with feed_client(url, headers):
            pass
    except* ConnectionRejected as group:
        first = group.exceptions[0]
        assert isinstance(first, ConnectionRejected)
        refusal = first
    return refusal


async def read_until_closed(connection: WebSocketConnection) -> list[str]:
    messages: list[str] = []
    try:
        while True:
            message = await connection.get_message()
            assert isinstance(message, str)
            messages.append(message)
    except ConnectionClosed:
        return messages


async def connect_badly(url: str, payload: bytes, *, reset: bool) -> None:
    """Send ``payload`` to the feed, then close the socket or reset it."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    with trio.socket.socket() as sock:
        await sock.connect((parts.hostname, parts.port))
        if payload:
            await sock.send(payload)
        if reset:
            # Linger 0: close() sends RST, as port scanners do.
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )


async def feed_and_proxy_still_serve(handle: ServerHandle) -> str:
    """Send one request; return what a new feed client receives of it."""
    assert handle.events_feed is not None
    async with (
        feed_client(handle.events_feed) as feed,
        httpx.AsyncClient(base_url=handle.addresses[0]) as client,
    ):
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        message = await feed.get_message()
    assert isinstance(message, str)
    return message


def split_notices(messages: Sequence[str]) -> tuple[list[dict[str, Any]], int]:
    """The events among ``messages``, and the events the notices say were lost."""
    events, dropped = [], 0
    for message in messages:
        data = orjson.loads(message)
        if "events_feed_notice" in data:
            dropped += data["dropped"]
        else:
            events.append(data)
    return events, dropped


async def test_feed_client_receives_each_event_as_its_json_while_serving(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            config = feed_config(tmp_path, mock_upstream_url)
            handle: ServerHandle = await nursery.start(serve, config)
            assert handle.events_feed is not None
            async with (
                feed_client(handle.events_feed, message_queue_size=100) as feed,
                httpx.AsyncClient(base_url=handle.addresses[0]) as client,
            ):
                received = []
                for number in range(3):
                    request_id = f"live-{number}"
                    headers = {"X-Request-ID": request_id}
                    await client.post(
                        "/v1/chat/completions", json=CHAT, headers=headers
                    )
                    # Each event arrives before the next request is sent.
                    received.append(await feed.get_message())
            handle.shutdown()

    lines = (tmp_path / "e.jsonl").read_text().splitlines()
    assert received == lines
    assert [orjson.loads(m)["request_id"] for m in received] == [
        "live-0",
        "live-1",
        "live-2",
    ]


async def test_feed_address_names_the_bound_loopback_port(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            config = feed_config(tmp_path, mock_upstream_url)
            handle: ServerHandle = await nursery.start(serve, config)
            handle.shutdown()

    assert handle.events_feed is not None
    assert handle.events_feed.startswith("ws://127.0.0.1:")
    assert not handle.events_feed.endswith(":0/")
    assert handle.events_feed != handle.addresses[0].replace("http", "ws") + "/"


async def test_feed_is_off_unless_asked_for(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                serve, proxy_config(tmp_path, mock_upstream_url)
            )
            handle.shutdown()

    assert handle.events_feed is None


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([], 401),
        (bearer("not-the-token-at-all-0000"), 403),
        ([(b"authorization", f"Basic {TOKEN}".encode())], 403),
    ],
    ids=["no-token", "wrong-token", "not-bearer"],
)
async def test_feed_with_token_refuses_client_without_it(
    headers: list[tuple[bytes, bytes]],
    status: int,
    tmp_path: Path,
    mock_upstream_url: str,
) -> None:
    config = feed_config(tmp_path, mock_upstream_url, events_feed_token=TOKEN)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle: ServerHandle = await nursery.start(serve, config)
            assert handle.events_feed is not None
            refused = await handshake_refusal(handle.events_feed, headers)
            handle.shutdown()

    assert refused is not None
    assert refused.status_code == status
    assert TOKEN.encode() not in (refused.body or b"")
    challenge = (b"www-authenticate", b"Bearer") in (refused.headers or ())
    assert challenge == (status == 401)


async def test_feed_with_token_sends_events_to_client_with_it(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    config = feed_config(tmp_path, mock_upstream_url, events_feed_token=TOKEN)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle: ServerHandle = await nursery.start(serve, config)
            assert handle.events_feed is not None
            async with (
                feed_client(handle.events_feed, bearer(TOKEN)) as feed,
                httpx.AsyncClient(base_url=handle.addresses[0]) as client,
            ):
                await client.post("/v1/chat/completions", json=CHAT)
                message = await feed.get_message()
            handle.shutdown()

    assert orjson.loads(message)["path"] == "/v1/chat/completions"


async def test_feed_refuses_browsers_by_their_origin_header(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            config = feed_config(tmp_path, mock_upstream_url)
            handle: ServerHandle = await nursery.start(serve, config)
            assert handle.events_feed is not None
            origin = [(b"origin", b"https://evil.example")]
            refused = await handshake_refusal(handle.events_feed, origin)
            handle.shutdown()

    assert refused is not None
    assert refused.status_code == 403


async def test_feed_is_neither_forwarded_nor_recorded(
    tmp_path: Path, mock_upstream_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = feed_config(tmp_path, mock_upstream_url, events_feed_token=TOKEN)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle: ServerHandle = await nursery.start(serve, config)
            assert handle.events_feed is not None
            refused = await handshake_refusal(handle.events_feed, bearer(TOKEN))
            handle.shutdown()

    assert refused is None
    assert read_events(tmp_path) == []
    assert TOKEN not in caplog.text
    assert f"events feed on {handle.events_feed}" in caplog.text


def test_non_loopback_feed_without_token_exits_2_with_one_line() -> None:
    result = run_cli("server", "--listen", "127.0.0.1:0", "--events-feed", "0.0.0.0:0")

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--events-feed" in lines[0]
    assert "EVENTS_FEED_TOKEN" in lines[0]


async def test_slow_feed_client_loses_only_its_own_events(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    # Answers of 1 MB: a few fill the loopback socket buffers of a client
    # that does not read, and then its own buffer in the feed (32 MiB), far
    # below the sinks' (1000 events of up to 4 MiB each), is soon full.
    big = {"X-Mock-Chunk-Count": "1", "X-Mock-Chunk-Size": "1000000"}
    requests = 60
    sink = RecordingSink()
    config = feed_config(tmp_path, mock_upstream_url)

    with trio.fail_after(HANG_GUARD_SECONDS * 2):
        async with trio.open_nursery() as nursery:
            handle: ServerHandle = await nursery.start(
                partial(serve, config, sinks=[sink])
            )
            assert handle.events_feed is not None
            async with (
                feed_client(handle.events_feed, message_queue_size=1) as slow,
                feed_client(handle.events_feed, message_queue_size=100) as fast,
                httpx.AsyncClient(base_url=handle.addresses[0]) as client,
            ):
                fast_messages: list[str] = []
                for number in range(requests):
                    response = await client.post(
                        "/v1/chat/completions", json=CHAT, headers=big
                    )
                    assert response.status_code == 200
                    message = await fast.get_message()
                    assert isinstance(message, str)
                    fast_messages.append(message)
                    await sink.wait_for(number + 1)
                handle.shutdown()
                slow_messages = await read_until_closed(slow)

    # The bus keeps each subscriber's counters after it leaves. (What the
    # slow client still receives after the shutdown, notices included,
    # depends on how far it gets in the feed's grace period.)
    feed_drops = sorted(
        stats.dropped
        for name, stats in handle.bus.statistics().subscribers.items()
        if name.startswith(SUBSCRIBER_PREFIX)
    )
    slow_events, _ = split_notices(slow_messages)
    fast_events, fast_dropped = split_notices(fast_messages)
    assert feed_drops[0] == 0 and feed_drops[1] > 0 and len(feed_drops) == 2
    assert len(slow_events) < requests
    assert (len(fast_events), fast_dropped) == (requests, 0)
    assert len(read_events(tmp_path)) == requests
    assert len(sink.events) == requests


async def test_shutdown_with_feed_client_is_prompt_and_loses_no_sink_event(
    tmp_path: Path, mock_upstream_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            config = feed_config(tmp_path, mock_upstream_url)
            handle: ServerHandle = await nursery.start(serve, config)
            assert handle.events_feed is not None
            async with (
                feed_client(handle.events_feed, message_queue_size=100) as feed,
                httpx.AsyncClient(base_url=handle.addresses[0]) as client,
            ):
                for _ in range(5):
                    await client.post("/v1/chat/completions", json=CHAT)
                start = trio.current_time()
                handle.shutdown()
                messages = await read_until_closed(feed)
                closed = feed.closed
        stopped = trio.current_time() - start

    assert stopped < 2
    assert closed is not None
    assert closed.code == 1001
    assert len(messages) == 5
    assert len(read_events(tmp_path)) == 5
    assert "lost" not in caplog.text


async def test_feed_clients_that_vanish_leave_the_proxy_and_the_feed_serving(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            config = feed_config(tmp_path, mock_upstream_url)
            handle: ServerHandle = await nursery.start(serve, config)
            assert handle.events_feed is not None
            parts = urlsplit(handle.events_feed)
            assert parts.hostname is not None and parts.port is not None
            # One leaves before its handshake, one right after it, unannounced.
            stream = await trio.open_tcp_stream(parts.hostname, parts.port)
            await stream.aclose()
            stream = await trio.open_tcp_stream(parts.hostname, parts.port)
            async with trio.open_nursery() as client_nursery:
                await wrap_client_stream(client_nursery, stream, parts.hostname, "/")
                await stream.aclose()
            async with (
                feed_client(handle.events_feed) as feed,
                httpx.AsyncClient(base_url=handle.addresses[0]) as client,
            ):
                response = await client.post("/v1/chat/completions", json=CHAT)
                message = await feed.get_message()
            handle.shutdown()

    assert response.status_code == 200
    assert isinstance(message, str)
    assert orjson.loads(message)["path"] == "/v1/chat/completions"


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "closed"])
@pytest.mark.parametrize("payload", NOT_WEBSOCKET.values(), ids=NOT_WEBSOCKET.keys())
async def test_feed_connection_that_is_not_websocket_ends_only_itself(
    payload: bytes, reset: bool, tmp_path: Path, mock_upstream_url: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            config = feed_config(tmp_path, mock_upstream_url)
            handle: ServerHandle = await nursery.start(serve, config)
            assert handle.events_feed is not None
            for _ in range(3):
                await connect_badly(handle.events_feed, payload, reset=reset)
            message = await feed_and_proxy_still_serve(handle)
            handle.shutdown()

    assert orjson.loads(message)["path"] == "/v1/chat/completions"


@pytest.mark.parametrize("payload", NOT_WEBSOCKET.values(), ids=NOT_WEBSOCKET.keys())
async def test_feed_lets_go_at_once_of_a_client_that_leaves_without_a_handshake(
    payload: bytes,
    tmp_path: Path,
    mock_upstream_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_llmproxy._events_feed")

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            config = feed_config(tmp_path, mock_upstream_url)
            handle: ServerHandle = await nursery.start(serve, config)
            assert handle.events_feed is not None
            await connect_badly(handle.events_feed, payload, reset=False)
            # Well before the handshake timeout runs out.
            polls = 100
            for _ in range(polls):
                if "sent no handshake" in caplog.text:
                    break
                await trio.sleep(HANDSHAKE_TIMEOUT_SECONDS / 4 / polls)
            handle.shutdown()

    assert "sent no handshake" in caplog.text


async def test_storm_of_bad_feed_connections_leaves_proxy_and_feed_serving(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    kinds = [(p, r) for p in NOT_WEBSOCKET.values() for r in (True, False)]

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            config = feed_config(tmp_path, mock_upstream_url)
            handle: ServerHandle = await nursery.start(serve, config)
            assert handle.events_feed is not None
            async with trio.open_nursery() as storm:
                for number in range(STORM_CONNECTIONS):
                    payload, reset = kinds[number % len(kinds)]
                    storm.start_soon(
                        partial(connect_badly, handle.events_feed, payload, reset=reset)
                    )
            message = await feed_and_proxy_still_serve(handle)
            handle.shutdown()

    assert orjson.loads(message)["path"] == "/v1/chat/completions"


async def test_serve_fails_at_once_when_the_feed_port_is_taken(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = taken.getsockname()
        config = proxy_config(tmp_path, mock_upstream_url, events_feed=f"{host}:{port}")

        with trio.fail_after(HANG_GUARD_SECONDS), pytest.raises(Exception) as failed:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, config)

    assert failed.group_contains(ListenFailed)
    failure = listen_failure(failed.value)
    assert failure.setting == "events_feed"
    assert str(port) in str(failure)


# Hypercorn does not close the socket it failed to bind; the collector does,
# with a ResourceWarning, within this test (see the end of the test).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_serve_fails_at_once_naming_listen_when_its_port_is_taken(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = taken.getsockname()
        config = feed_config(tmp_path, mock_upstream_url, listen=f"{host}:{port}")

        with trio.fail_after(HANG_GUARD_SECONDS), pytest.raises(Exception) as failed:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, config)

    failure = listen_failure(failed.value)
    assert failure.setting == "listen"
    assert str(port) in str(failure)
    del failed, failure
    gc.collect()


@pytest.mark.parametrize(
    ("listen", "feed"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("[::]:8080", "127.0.0.1:8080"),
        ("localhost:8080", "[::1]:8080"),
    ],
)
def test_config_refuses_a_feed_on_the_proxy_port(listen: str, feed: str) -> None:
    with pytest.raises(ConfigError, match="own port"):
        ProxyConfig(listen=listen, events_feed=feed)


@pytest.mark.parametrize(
    ("listen", "feed"),
    [
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("127.0.0.1:8080", "127.0.0.1:8181"),
        ("127.0.0.1:8080", "127.0.0.2:8080"),
    ],
)
def test_config_takes_a_feed_on_a_port_of_its_own(listen: str, feed: str) -> None:
    assert ProxyConfig(listen=listen, events_feed=feed).events_feed == feed


def listen_failure(error: BaseException) -> ListenFailed:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, ListenFailed)
    return error


# At most so many clients at once.


@asynccontextmanager
async def small_feed(max_clients: int) -> AsyncIterator[str]:
    """An events feed for ``max_clients`` clients at most; yields its URL."""
    bus = InMemoryEventBus(10)
    feed = EventsFeed("127.0.0.1:0", max_clients=max_clients)
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(feed.serve, bus)
        yield url
        feed.stop()
        bus.close()


async def test_feed_refuses_a_client_beyond_its_maximum_with_503() -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with small_feed(2) as url, feed_client(url), feed_client(url):
            refused = await handshake_refusal(url, [])

    assert refused is not None
    assert refused.status_code == 503
    assert refused.body == (
        b"the events feed serves at most 2 clients at once; try again later"
    )


async def test_full_feed_logs_one_warning_for_many_refused_clients(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_llmproxy._events_feed")

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with small_feed(1) as url, feed_client(url):
            refused = [await handshake_refusal(url, []) for _ in range(5)]

    assert [r.status_code if r else None for r in refused] == [503] * 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "serves at most 1 clients at once" in warnings[0]


async def test_client_leaving_a_full_feed_frees_its_place() -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with small_feed(1) as url:
            async with feed_client(url):
                pass
            # The feed lets go of the client just after the close handshake.
            polls = 100
            for _ in range(polls):
                refused = await handshake_refusal(url, [])
                if refused is None:
                    break
                await trio.sleep(0.01)

    assert refused is None


def test_feed_needs_room_for_one_client() -> None:
    with pytest.raises(ValueError, match="max_clients must be at least 1, got 0"):
        EventsFeed("127.0.0.1:0", max_clients=0)
