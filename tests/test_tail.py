"""Tests for ``llm-proxy tail``, run as a real subprocess against both sources.

The proxy runs in-process (``serve``) on loopback port 0 in front of the mock
upstream of ``conftest.py``, with its events feed on another port 0, or with
the Redis bus on the ``redis-server`` of ``redis_support.py``. The tail is
``python -m trio_llmproxy tail`` with a clean environment; its output is read
line by line as it comes. Every wait is bounded by a hang guard.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import coredis
import httpx
import orjson
import pytest
import trio
from redis_support import (  # noqa: F401
    RedisServer,
    ignore_coredis_stream_leak,
    redis_server_fixture,
    redis_url_fixture,
)
from test_cli import CLI, clean_env, free_port
from test_events_feed import feed_client
from test_server import CHAT, proxy_config
from trio_websocket import open_websocket_url

from trio_llmproxy import InMemoryEventBus, serve
from trio_llmproxy._events_feed import EventsFeed
from trio_llmproxy._server import ServerHandle
from trio_llmproxy._tail import EventFilter, Printer, format_line

HANG_GUARD_SECONDS = 20
STREAM = "llm-proxy-events"
TOKEN = "tail-token-0123456789abcdef"
FOLLOWING = "llm-proxy tail: following "
# A notice of dropped events whose counts are terminal escape sequences.
HOSTILE_NOTICE = (
    '{"events_feed_notice":"dropped","dropped":"\\u001b]0;pwned\\u0007",'
    '"total_dropped":"\\u001b[31mRED"}'
)
POLL_SECONDS = 0.02
POLLS = 500
LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<status>\d{3}) (?P<method>[A-Z]+) "
    r"(?P<path>\S+) \d+\.\dms ttft=(?:\d+\.\dms|-)"
    r"(?: tokens=(?P<tokens_in>\d+)\+(?P<tokens_out>\d+))? (?P<outcome>[a-z_]+)$"
)

pytestmark = ignore_coredis_stream_leak


@attrs.define
class Tail:
    """A running ``tail`` subprocess and what it has printed so far."""

    process: trio.Process
    lines: list[str] = attrs.Factory(list)
    errors: list[str] = attrs.Factory(list)
    # The line that says which source the tail follows, once connected; it
    # goes to standard error, and is kept apart from the warnings.
    following: list[str] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def collect(self, stream: trio.abc.ReceiveStream, into: list[str]) -> None:
        pending = b""
        async for chunk in stream:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in (raw.decode() for raw in complete):
                if into is self.errors and line.startswith(FOLLOWING):
                    self.following.append(line)
                else:
                    into.append(line)
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, what: Callable[[], bool]) -> None:
        while not what():
            await self._changed.wait()

    async def wait_for_lines(self, count: int) -> list[str]:
        await self.wait_for(lambda: len(self.lines) >= count)
        return self.lines

    async def wait_for_error(self, text: str) -> None:
        await self.wait_for(lambda: any(text in line for line in self.errors))

    async def exit_status(self) -> int:
        return await self.process.wait()

    async def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return await self.process.wait()


@asynccontextmanager
async def running_tail(
    *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[Tail]:
    """Start ``tail`` with ``args``; kill it at the end if it still runs."""
    async with trio.open_nursery() as nursery:
        run = partial(
            trio.run_process,
            [*CLI, "tail", *args],
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(**(env or {})),
        )
        process: trio.Process = await nursery.start(run)
        tail = Tail(process)
        assert process.stdout is not None and process.stderr is not None
        nursery.start_soon(tail.collect, process.stdout, tail.lines)
        nursery.start_soon(tail.collect, process.stderr, tail.errors)
        yield tail
        if process.returncode is None:
            nursery.cancel_scope.cancel()


@attrs.define
class Proxy:
    """The proxy under test, and how a tail reads its events."""

    handle: ServerHandle
    tail_args: list[str]
    redis_url: str | None
    event_log: Path

    @property
    def url(self) -> str:
        return self.handle.addresses[0]

    async def wait_until_tail_reads(self, tail: Tail) -> None:
        """Return once the tail's source delivers new events to it."""
        for _ in range(POLLS):
            if await self._tail_connected():
                return
            if tail.process.returncode is not None:
                pytest.fail(f"tail exited early: {tail.errors}")
            await trio.sleep(POLL_SECONDS)
        pytest.fail("the tail never connected")

    async def _tail_connected(self) -> bool:
        if self.redis_url is None:
            subscribers = self.handle.bus.statistics().subscribers
            return any(name.startswith("events-feed-") for name in subscribers)
        async with coredis.Redis.from_url(self.redis_url) as client:
            clients = await client.client_list()
        return any(info.get("cmd") == "xread" for info in clients)

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.event_log.read_bytes().splitlines()]

    async def wait_for_logged_events(self, count: int) -> list[dict[str, Any]]:
        for _ in range(POLLS):
            if self.event_log.exists() and len(self.events()) >= count:
                return self.events()
            await trio.sleep(POLL_SECONDS)
        pytest.fail(f"the event log never had {count} event(s)")


async def start_proxy(
    nursery: trio.Nursery,
    tmp_path: Path,
    upstream: str,
    source: str,
    redis_url: str | None = None,
    **overrides: Any,
) -> Proxy:
    settings: dict[str, Any] = {"events_feed": "127.0.0.1:0", **overrides}
    if source == "redis":
        assert redis_url is not None
        settings.update(event_bus="redis", redis_url=redis_url)
    config = proxy_config(tmp_path, upstream, **settings)
    handle: ServerHandle = await nursery.start(serve, config)
    assert handle.events_feed is not None
    if source == "redis":
        args = ["--redis-url", str(redis_url), "--redis-stream", STREAM]
        return Proxy(handle, args, redis_url, tmp_path / "e.jsonl")
    return Proxy(handle, ["--feed", handle.events_feed], None, tmp_path / "e.jsonl")


@pytest.fixture(params=["feed", pytest.param("redis", marks=pytest.mark.redis)])
async def proxy(
    request: pytest.FixtureRequest,
    nursery: trio.Nursery,
    tmp_path: Path,
    mock_upstream_url: str,
) -> Proxy:
    """The proxy, once with a tail reading its feed and once reading Redis."""
    source: str = request.param
    redis_url = request.getfixturevalue("redis_url") if source == "redis" else None
    return await start_proxy(nursery, tmp_path, mock_upstream_url, source, redis_url)


@pytest.fixture
async def feed_proxy(
    nursery: trio.Nursery, tmp_path: Path, mock_upstream_url: str
) -> Proxy:
    """The proxy, with a tail reading its events feed."""
    return await start_proxy(nursery, tmp_path, mock_upstream_url, "feed")


async def leave_a_slow_stream(url: str) -> None:
    """Ask for a slow stream and leave once its first bytes arrive."""
    host, port = url.removeprefix("http://").split(":")
    body = orjson.dumps({**CHAT, "stream": True})
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
        "Content-Type: application/json\r\nX-Mock-Chunk-Count: 20\r\n"
        f"X-Mock-Chunk-Delay-Ms: 50\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(head.encode() + body)
        assert await stream.receive_some(65536)


async def send_requests(url: str) -> None:
    """One request of each kind the filter tests tell apart, in this order.

    The fourth, a stream the client leaves, ends with outcome
    ``client_disconnected``; its event may come after the fifth's.
    """
    async with httpx.AsyncClient(base_url=url) as client:
        await client.post("/v1/chat/completions", json=CHAT)
        await client.get("/v1/models")
        await client.post(
            "/v1/chat/completions", json=CHAT, headers={"X-Mock-Status": "429"}
        )
        await leave_a_slow_stream(url)
        await client.post("/v1/embeddings", json={"model": "m", "input": "hi"})


def parsed(line: str) -> dict[str, str | None]:
    match = LINE.match(line)
    assert match is not None, line
    return match.groupdict()


async def test_tail_prints_one_line_per_request_as_it_happens(proxy: Proxy) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            running_tail(*proxy.tail_args) as tail,
            httpx.AsyncClient(base_url=proxy.url) as client,
        ):
            await proxy.wait_until_tail_reads(tail)
            await client.post("/v1/chat/completions", json=CHAT)
            first = parsed((await tail.wait_for_lines(1))[0])
            await client.get("/v1/models")
            second = parsed((await tail.wait_for_lines(2))[1])
            events = await proxy.wait_for_logged_events(2)
            status = await tail.interrupt()

    usage = events[0]["llm"]["usage"]
    assert first == {
        "status": "200",
        "method": "POST",
        "path": "/v1/chat/completions",
        "tokens_in": str(usage["input_tokens"]),
        "tokens_out": str(usage["output_tokens"]),
        "outcome": "ok",
    }
    assert second["path"] == "/v1/models"
    assert second["tokens_in"] is None
    assert (status, tail.errors) == (0, [])


async def test_tail_shows_time_to_first_token_of_a_stream(proxy: Proxy) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            running_tail(*proxy.tail_args) as tail,
            httpx.AsyncClient(base_url=proxy.url) as client,
        ):
            await proxy.wait_until_tail_reads(tail)
            await client.post("/v1/chat/completions", json=body)
            line = (await tail.wait_for_lines(1))[0]
            [event] = await proxy.wait_for_logged_events(1)
            await tail.interrupt()

    assert f"ttft={event['llm']['ttft_ms']:.1f}ms" in line
    usage = event["llm"]["usage"]
    assert f"tokens={usage['input_tokens']}+{usage['output_tokens']}" in line


async def test_tail_shows_a_websocket_session_once_it_ends(proxy: Proxy) -> None:
    url = proxy.url.replace("http://", "ws://") + "/v1/realtime"

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_tail(*proxy.tail_args) as tail:
            await proxy.wait_until_tail_reads(tail)
            async with open_websocket_url(url, subprotocols=["realtime"]) as session:
                await session.get_message()  # session.created
                await session.send_message('{"type": "response.create"}')
                for _ in range(11):  # up to response.done
                    await session.get_message()
            line = (await tail.wait_for_lines(1))[0]
            [event] = await proxy.wait_for_logged_events(1)
            await tail.interrupt()

    shown = parsed(line)
    assert (shown["status"], shown["method"], shown["path"]) == (
        "101",
        "WEBSOCKET",
        "/v1/realtime",
    )
    assert shown["tokens_out"] == str(event["llm"]["usage"]["output_tokens"])


async def test_tail_json_prints_each_event_exactly_as_recorded(proxy: Proxy) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_tail(*proxy.tail_args, "--json") as tail:
            await proxy.wait_until_tail_reads(tail)
            await send_requests(proxy.url)
            lines = await tail.wait_for_lines(5)
            await proxy.wait_for_logged_events(5)
            await tail.interrupt()

    assert lines == proxy.event_log.read_text().splitlines()


CHAT_OK = "200 POST /v1/chat/completions"
CHAT_429 = "429 POST /v1/chat/completions"
MODELS = "200 GET /v1/models"
EMBEDDINGS = "200 POST /v1/embeddings"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--path", "/v1/chat"], [CHAT_OK, CHAT_429, CHAT_OK]),
        (["--path", "*/models"], [MODELS]),
        (["--path", "/v1/models", "--path", "/v1/embeddings"], [MODELS, EMBEDDINGS]),
        (["--status", "4xx"], [CHAT_429]),
        (["--status", "200", "--path", "/v1/chat"], [CHAT_OK, CHAT_OK]),
        (
            ["--status", "429", "--status", "2XX"],
            [CHAT_OK, MODELS, CHAT_429, CHAT_OK, EMBEDDINGS],
        ),
        (["--outcome", "client_disconnected"], [CHAT_OK]),
        (["--outcome", "ok"], [CHAT_OK, MODELS, CHAT_429, EMBEDDINGS]),
    ],
    ids=[
        "path-prefix",
        "path-glob",
        "paths",
        "status-class",
        "status-and-path",
        "statuses",
        "outcome-disconnected",
        "outcome-ok",
    ],
)
async def test_tail_shows_only_events_passing_its_filters(
    args: list[str], expected: list[str], feed_proxy: Proxy
) -> None:
    # The feed ends when the proxy stops: with --reconnect-for 0 the tail
    # exits then, having printed every event that passed.
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_tail(
            *feed_proxy.tail_args, "--reconnect-for", "0", *args
        ) as tail:
            await feed_proxy.wait_until_tail_reads(tail)
            await send_requests(feed_proxy.url)
            feed_proxy.handle.shutdown()
            status = await tail.exit_status()

    shown = [parsed(line) for line in tail.lines]
    # The abandoned stream's event may come after the next request's.
    assert sorted(f"{s['status']} {s['method']} {s['path']}" for s in shown) == sorted(
        expected
    )
    assert status == 1


@pytest.mark.redis
async def test_tail_filters_events_read_from_redis(
    nursery: trio.Nursery, tmp_path: Path, mock_upstream_url: str, redis_url: str
) -> None:
    proxy = await start_proxy(nursery, tmp_path, mock_upstream_url, "redis", redis_url)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_tail(*proxy.tail_args, "--status", "4xx") as tail:
            await proxy.wait_until_tail_reads(tail)
            await send_requests(proxy.url)
            # Entries come in order: once the 429 shows, the 200s before it
            # have been read and left out.
            await tail.wait_for_lines(1)
            await proxy.wait_for_logged_events(5)
            await tail.interrupt()

    assert [parsed(line)["status"] for line in tail.lines] == ["429"]


@pytest.mark.redis
async def test_tail_takes_no_event_from_the_dispatchers(
    nursery: trio.Nursery, tmp_path: Path, mock_upstream_url: str, redis_url: str
) -> None:
    proxy = await start_proxy(nursery, tmp_path, mock_upstream_url, "redis", redis_url)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_tail(*proxy.tail_args) as tail:
            await proxy.wait_until_tail_reads(tail)
            await send_requests(proxy.url)
            await tail.wait_for_lines(5)
            await tail.interrupt()
        async with coredis.Redis.from_url(redis_url) as client:
            groups = await client.xinfo_groups(STREAM)
            length = await client.xlen(STREAM)

    assert groups == ()
    assert length == 5


@pytest.mark.redis
async def test_tail_reconnects_to_a_restarted_redis_and_carries_on(
    nursery: trio.Nursery,
    tmp_path: Path,
    mock_upstream_url: str,
    redis_url: str,
    redis_server: RedisServer,
) -> None:
    proxy = await start_proxy(nursery, tmp_path, mock_upstream_url, "redis", redis_url)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_tail(*proxy.tail_args) as tail:
            await proxy.wait_until_tail_reads(tail)
            await trio.to_thread.run_sync(redis_server.restart)
            await tail.wait_for_error("reconnected")
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                await client.get("/v1/models")
            line = (await tail.wait_for_lines(1))[0]
            status = await tail.interrupt()

    assert "lost the Redis stream 'llm-proxy-events'" in tail.errors[0]
    assert parsed(line)["path"] == "/v1/models"
    assert status == 0


async def test_tail_says_which_source_it_follows_once_connected(
    feed_proxy: Proxy,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_tail(*feed_proxy.tail_args) as tail:
            await tail.wait_for(lambda: bool(tail.following))
            await tail.interrupt()

    assert tail.following == [
        f"{FOLLOWING}the events feed at {feed_proxy.handle.events_feed}; "
        "Ctrl-C to stop"
    ]


async def test_tail_exits_0_quietly_on_interrupt(feed_proxy: Proxy) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_tail(*feed_proxy.tail_args) as tail:
            await feed_proxy.wait_until_tail_reads(tail)
            status = await tail.interrupt()

    assert (status, tail.lines, tail.errors) == (0, [], [])


async def test_tail_says_the_feed_went_away_and_exits_1_without_reconnecting(
    feed_proxy: Proxy,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_tail(*feed_proxy.tail_args, "--reconnect-for", "0") as tail:
            await feed_proxy.wait_until_tail_reads(tail)
            feed_proxy.handle.shutdown()
            status = await tail.exit_status()

    assert status == 1
    assert len(tail.errors) == 1, tail.errors
    assert "the server is shutting down" in tail.errors[0]


async def test_tail_reconnects_to_a_restarted_server_and_shows_its_events(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    feed = f"127.0.0.1:{free_port()}"
    config = proxy_config(tmp_path, mock_upstream_url, events_feed=feed)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_tail("--feed", f"ws://{feed}/") as tail:
            async with trio.open_nursery() as nursery:
                first: ServerHandle = await nursery.start(serve, config)
                proxy = Proxy(first, [], None, tmp_path / "e.jsonl")
                await proxy.wait_until_tail_reads(tail)
                first.shutdown()
            await tail.wait_for_error("reconnecting")
            async with trio.open_nursery() as nursery:
                second: ServerHandle = await nursery.start(serve, config)
                await tail.wait_for_error("reconnected")
                async with httpx.AsyncClient(base_url=second.addresses[0]) as client:
                    await client.get("/v1/models")
                line = (await tail.wait_for_lines(1))[0]
                second.shutdown()
            status = await tail.interrupt()

    assert parsed(line)["path"] == "/v1/models"
    assert status == 0


async def test_tail_cannot_reach_the_feed_exits_1_with_one_line() -> None:
    url = f"ws://127.0.0.1:{free_port()}/"

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_tail("--feed", url) as tail:
            status = await tail.exit_status()

    assert status == 1
    assert len(tail.errors) == 1, tail.errors
    assert f"cannot reach the events feed at {url}" in tail.errors[0]


async def test_tail_finding_the_feed_full_is_told_so_and_exits_1(
    nursery: trio.Nursery,
) -> None:
    feed = EventsFeed("127.0.0.1:0", max_clients=1)
    address = await nursery.start(feed.serve, InMemoryEventBus())

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with feed_client(address):
            async with running_tail("--feed", address) as tail:
                status = await tail.exit_status()
        feed.stop()

    assert status == 1
    assert len(tail.errors) == 1, tail.errors
    # A full feed is not a refusal of this tail: a later reconnection may
    # find room, as it would find a restarted server.
    assert f"cannot reach the events feed at {address}: HTTP 503" in tail.errors[0]


async def test_tail_speaking_tls_to_a_plain_feed_exits_1_with_one_line(
    feed_proxy: Proxy,
) -> None:
    assert feed_proxy.handle.events_feed is not None
    url = feed_proxy.handle.events_feed.replace("ws://", "wss://")

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_tail("--feed", url) as tail:
            status = await tail.exit_status()

    assert status == 1
    assert len(tail.errors) == 1, tail.errors
    assert f"cannot reach the events feed at {url}" in tail.errors[0]


async def test_tail_without_the_feed_token_is_refused_and_exits_1(
    nursery: trio.Nursery, tmp_path: Path, mock_upstream_url: str
) -> None:
    proxy = await start_proxy(
        nursery, tmp_path, mock_upstream_url, "feed", events_feed_token=TOKEN
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_tail(*proxy.tail_args) as tail:
            status = await tail.exit_status()

    assert status == 1
    assert len(tail.errors) == 1, tail.errors
    assert "needs --token" in tail.errors[0]


async def test_tail_sends_the_feed_token_from_its_variable(
    nursery: trio.Nursery, tmp_path: Path, mock_upstream_url: str
) -> None:
    proxy = await start_proxy(
        nursery, tmp_path, mock_upstream_url, "feed", events_feed_token=TOKEN
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        env = {"EVENTS_FEED_TOKEN": TOKEN}
        async with running_tail(*proxy.tail_args, env=env) as tail:
            await proxy.wait_until_tail_reads(tail)
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                await client.get("/v1/models")
            line = (await tail.wait_for_lines(1))[0]
            status = await tail.interrupt()

    assert parsed(line)["path"] == "/v1/models"
    assert status == 0


@pytest.mark.redis
async def test_tail_skips_a_notice_written_to_redis_without_showing_its_text(
    nursery: trio.Nursery, tmp_path: Path, mock_upstream_url: str, redis_url: str
) -> None:
    proxy = await start_proxy(nursery, tmp_path, mock_upstream_url, "redis", redis_url)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_tail(*proxy.tail_args) as tail:
            await proxy.wait_until_tail_reads(tail)
            async with coredis.Redis.from_url(redis_url) as client:
                await client.xadd(STREAM, {"event": HOSTILE_NOTICE})
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                await client.get("/v1/models")
            line = (await tail.wait_for_lines(1))[0]
            await tail.interrupt()

    assert parsed(line)["path"] == "/v1/models"
    assert tail.errors == [
        "llm-proxy tail: skipped a notice that did not come from an events feed"
    ]


def printer_for_feed() -> tuple[Printer, list[str], list[str]]:
    """A printer of a feed's messages, and the lines and warnings it shows."""
    lines: list[str] = []
    warnings: list[str] = []
    printer = Printer(
        EventFilter(),
        json_output=False,
        write=lines.append,
        warn=warnings.append,
        notices=True,
    )
    return printer, lines, warnings


def test_feed_notice_of_dropped_events_becomes_a_warning_line() -> None:
    printer, lines, warnings = printer_for_feed()

    printer('{"events_feed_notice":"dropped","dropped":3,"total_dropped":5}')

    assert lines == []
    assert warnings == [
        "the feed dropped 3 event(s) this tail did not read in time (5 in all)"
    ]


@pytest.mark.parametrize(
    "counts",
    [
        '"dropped":"\\u001b]0;pwned\\u0007","total_dropped":"\\u001b[31mRED"',
        '"dropped":true,"total_dropped":true',
        '"dropped":-1,"total_dropped":5',
        '"dropped":1.5,"total_dropped":5',
        '"total_dropped":5',
    ],
    ids=["escape-sequences", "booleans", "negative", "fraction", "missing"],
)
def test_feed_notice_without_integer_counts_is_skipped_with_a_fixed_warning(
    counts: str,
) -> None:
    printer, lines, warnings = printer_for_feed()

    printer(f'{{"events_feed_notice":"dropped",{counts}}}')

    assert lines == []
    assert warnings == ["skipped a malformed notice of dropped events"]


def test_notice_from_a_source_other_than_the_feed_is_not_honoured() -> None:
    lines: list[str] = []
    warnings: list[str] = []
    printer = Printer(
        EventFilter(), json_output=False, write=lines.append, warn=warnings.append
    )

    printer(HOSTILE_NOTICE)

    assert lines == []
    assert warnings == ["skipped a notice that did not come from an events feed"]


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": True, "output_tokens": 1},
        {"input_tokens": 1, "output_tokens": False},
        {"input_tokens": "1", "output_tokens": 1},
    ],
    ids=["true-in", "false-out", "text-in"],
)
def test_line_leaves_out_token_counts_that_are_not_integers(
    usage: dict[str, Any],
) -> None:
    event = {"status": 200, "method": "POST", "path": "/v1/x", "llm": {"usage": usage}}

    line = format_line(event)

    assert "tokens=" not in line


def test_line_shows_integer_token_counts() -> None:
    usage = {"input_tokens": 0, "output_tokens": 7}
    event = {"status": 200, "method": "POST", "path": "/v1/x", "llm": {"usage": usage}}

    assert " tokens=0+7 " in format_line(event)
