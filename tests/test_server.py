"""Tests for serve(): the proxy run in-process, its event pipeline and shutdown.

Everything talks over real loopback sockets: the proxy listens on 127.0.0.1
port 0 and forwards to the mock upstream of ``conftest.py``. Each test runs
under a ``trio.fail_after`` hang guard.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from trio_llmproxy import Event, ProxyConfig, Sink, serve

HANG_GUARD_SECONDS = 10
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


def proxy_config(tmp_path: Path, upstream: str, **overrides: Any) -> ProxyConfig:
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "upstream_url": upstream,
        "file_event_log": tmp_path / "e.jsonl",
        "shutdown_timeout": 5,
    }
    settings.update(overrides)
    return ProxyConfig(**settings)


def read_events(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "e.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


class RecordingSink(Sink):
    """Keeps every event it is given; optionally slow, or stuck until released."""

    def __init__(
        self, name: str = "recording", delay: float = 0.0, *, blocked: bool = False
    ) -> None:
        self.name = name
        self.events: list[Event] = []
        self.delay = delay
        self.release = trio.Event()
        if not blocked:
            self.release.set()
        self._grew = trio.Event()
        self.closed = False

    async def deliver(self, events: Sequence[Event]) -> None:
        await self.release.wait()
        await trio.sleep(self.delay)
        self.events.extend(events)
        self._grew.set()
        self._grew = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.events) < count:
            await self._grew.wait()

    async def aclose(self) -> None:
        self.closed = True


class PublishCounter:
    """An ``enrich`` hook that notes when ``target`` events have been published.

    The hook runs just before each publish, with no checkpoint in between, so
    a task woken by :attr:`reached` runs after the last publish.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.reached = trio.Event()

    def __call__(self, event: Event) -> Event:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()
        return event


async def test_every_request_is_one_event_in_the_file_after_shutdown(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                serve, proxy_config(tmp_path, mock_upstream_url)
            )
            async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
                sent = []
                for number in range(6):
                    body = STREAM if number % 2 else CHAT
                    request_id = f"req-{number}"
                    response = await client.post(
                        "/v1/chat/completions",
                        json=body,
                        headers={"X-Request-ID": request_id},
                    )
                    assert response.status_code == 200
                    sent.append(request_id)
            handle.shutdown()

    recorded = read_events(tmp_path)
    assert [event["request_id"] for event in recorded] == sent
    assert [event["streamed"] for event in recorded] == [False, True] * 3
    assert all(event["outcome"] == "ok" for event in recorded)


async def test_health_checks_are_not_recorded(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                serve, proxy_config(tmp_path, mock_upstream_url)
            )
            async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
                health = await client.get("/healthz")
            handle.shutdown()

    assert health.text == "ok"
    assert read_events(tmp_path) == []


async def test_shutdown_lets_in_flight_streams_finish_and_loses_no_event(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    slow = {"X-Mock-Chunk-Count": "5", "X-Mock-Chunk-Delay-Ms": "100"}
    bodies: list[bytes] = []

    async def stream(
        client: httpx.AsyncClient, *, task_status: trio.TaskStatus[None]
    ) -> None:
        async with client.stream(
            "POST", "/v1/chat/completions", json=STREAM, headers=slow
        ) as response:
            chunks = response.aiter_raw()
            first = await anext(chunks)
            task_status.started()
            bodies.append(first + b"".join([chunk async for chunk in chunks]))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                serve, proxy_config(tmp_path, mock_upstream_url)
            )
            async with (
                httpx.AsyncClient(base_url=handle.addresses[0]) as client,
                trio.open_nursery() as clients,
            ):
                for _ in range(3):
                    await clients.start(stream, client)
                handle.shutdown()

    assert len(bodies) == 3
    assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)
    recorded = read_events(tmp_path)
    assert len(recorded) == 3
    assert all(event["outcome"] == "ok" for event in recorded)
    assert all(event["response_body"].endswith("[DONE]\n\n") for event in recorded)


async def test_shutdown_does_not_wait_for_idle_keep_alive_connections(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        # The client keeps its connection open until serve() has returned.
        async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
            handle = await nursery.start(
                serve, proxy_config(tmp_path, mock_upstream_url)
            )
            await client.post(f"{handle.addresses[0]}/v1/chat/completions", json=CHAT)
            handle.shutdown()
            start = trio.current_time()
        stopped_after = trio.current_time() - start

    # Well under the 5 s shutdown timeout: idle connections close at once.
    assert stopped_after < 1
    assert len(read_events(tmp_path)) == 1


async def test_stream_outliving_the_shutdown_timeout_is_cut_and_still_recorded(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    endless = {"X-Mock-Chunk-Count": "1000", "X-Mock-Chunk-Delay-Ms": "50"}
    config = proxy_config(tmp_path, mock_upstream_url, shutdown_timeout=0.5)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve, config)
            async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
                async with client.stream(
                    "POST", "/v1/chat/completions", json=STREAM, headers=endless
                ) as response:
                    chunks = response.aiter_raw()
                    await anext(chunks)
                    handle.shutdown()
                    start = trio.current_time()
                    try:
                        async for _ in chunks:
                            pass
                    except httpx.HTTPError:
                        pass
        stopped_after = trio.current_time() - start

    assert stopped_after < 3
    (event,) = read_events(tmp_path)
    assert event["outcome"] == "upstream_error"
    assert event["error"] == "cancelled: the proxy is shutting down"
    assert event["response_body"].startswith("data: ")


async def test_cancelling_serve_still_drains_published_events(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    # A slow sink keeps events waiting in the bus when the cancel comes.
    slow_sink = RecordingSink(delay=0.2)
    published = PublishCounter(5)
    config = proxy_config(tmp_path, mock_upstream_url)
    run = partial(serve, config, sinks=[slow_sink], enrich=published)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(run)
            async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
                for _ in range(5):
                    await client.post("/v1/chat/completions", json=CHAT)
            await published.reached.wait()
            assert handle.bus.statistics().buffered > 0
            nursery.cancel_scope.cancel()

    assert len(slow_sink.events) == 5
    assert slow_sink.closed
    assert len(read_events(tmp_path)) == 5


async def test_drain_missing_its_deadline_logs_how_many_events_were_lost(
    tmp_path: Path, mock_upstream_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    stuck = RecordingSink("stuck", blocked=True)
    published = PublishCounter(3)
    config = proxy_config(
        tmp_path, mock_upstream_url, file_event_log=None, shutdown_timeout=0.1
    )
    run = partial(serve, config, sinks=[stuck], enrich=published)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(run)
            async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
                for _ in range(3):
                    await client.get("/v1/models")
            await published.reached.wait()
            handle.shutdown()

    # One event in the stuck sink's hands, two waiting behind it.
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["3 event(s) were lost: the drain did not finish in time"]


async def test_custom_sink_receives_every_event(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    sink = RecordingSink()
    config = proxy_config(tmp_path, mock_upstream_url, file_event_log=None)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(partial(serve, config, sinks=[sink]))
            async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
                for number in range(4):
                    await client.get(
                        "/v1/models", headers={"X-Request-ID": f"m{number}"}
                    )
            handle.shutdown()

    assert [event.request_id for event in sink.events] == ["m0", "m1", "m2", "m3"]
    assert all(event.status == 200 for event in sink.events)
    assert sink.closed


async def test_full_buffer_drops_and_counts_without_blocking_requests(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    stuck = RecordingSink("stuck", blocked=True)
    keeping_up = RecordingSink("keeping-up")
    config = proxy_config(
        tmp_path, mock_upstream_url, buffer_size=1, file_event_log=None
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            run = partial(serve, config, sinks=[stuck, keeping_up])
            handle = await nursery.start(run)
            async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
                start = trio.current_time()
                for number in range(10):
                    response = await client.post("/v1/chat/completions", json=CHAT)
                    assert response.status_code == 200
                    # One event at a time, so this subscriber's buffer of one
                    # is enough; the stuck one never makes room.
                    await keeping_up.wait_for(number + 1)
                elapsed = trio.current_time() - start
            stats = handle.bus.statistics()
            stuck.release.set()
            handle.shutdown()

    assert elapsed < 3
    # The stuck sink holds one event and has room to buffer one more.
    assert stats.subscribers["stuck"].dropped == 8
    assert stats.subscribers["keeping-up"].dropped == 0
    assert stats.published == 10
    assert len(stuck.events) == 2
    assert len(keeping_up.events) == 10
