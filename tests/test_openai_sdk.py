"""End to end: the real ``openai`` SDK, through the proxy, to the mock upstream.

The proxy runs in-process with ``serve`` on a loopback port and writes its
event log under ``tmp_path``; the SDK is the async client, under Trio. Each
test reads the event log once the proxy has shut down.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import trio

from trio_llmproxy import ProxyConfig, serve
from trio_llmproxy._mock_upstream import SENTENCE

HANG_GUARD_SECONDS = 10
API_KEY = "sk-proj-0123456789abcdefWXYZ"
MESSAGES: list[Any] = [{"role": "user", "content": "Say something."}]
# The mock's default answer: 8 chunks of 4 characters.
MOCK_TEXT = (SENTENCE * 2)[:32]

# After a stream the SDK leaves its inner async generators suspended, and Trio
# warns when they are collected; that is the SDK's doing, not the proxy's.
ignore_sdk_stream_leak = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|httpx2|httpcore2)\.:ResourceWarning"
)

SdkCall = Callable[[openai.AsyncOpenAI], Coroutine[Any, Any, Any]]


async def call_through_proxy(
    tmp_path: Path, upstream: str, call: SdkCall
) -> tuple[Any, dict[str, Any]]:
    """Run ``call`` with an SDK client aimed at the proxy; return its result
    and the one event the proxy logged."""
    config = ProxyConfig(
        listen="127.0.0.1:0",
        upstream_url=upstream,
        file_event_log=tmp_path / "events.jsonl",
        shutdown_timeout=5,
    )
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve, config)
            async with openai.AsyncOpenAI(
                base_url=f"{handle.addresses[0]}/v1", api_key=API_KEY, max_retries=0
            ) as sdk:
                result = await call(sdk)
            handle.shutdown()

    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    assert len(lines) == 1
    return result, orjson.loads(lines[0])


def sse_chunks(body: str) -> list[Any]:
    events = [event for event in body.split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events)
    data = [event.removeprefix("data: ") for event in events]
    assert data[-1] == "[DONE]"
    return [orjson.loads(item) for item in data[:-1]]


def assert_sane_timings(event: dict[str, Any], started: float) -> None:
    assert 0 < event["ttfb_ms"] <= event["duration_ms"] < HANG_GUARD_SECONDS * 1000
    assert event["timestamp"].endswith("Z")
    arrived = datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    assert started <= arrived.timestamp() <= time.time()


def assert_key_redacted(event: dict[str, Any]) -> None:
    assert event["request_headers"]["authorization"] == [
        f"Bearer [REDACTED]...{API_KEY[-4:]}"
    ]
    assert API_KEY not in orjson.dumps(event).decode()


async def test_sdk_completion_through_the_proxy_is_recorded(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    started = time.time()

    async def complete(sdk: openai.AsyncOpenAI) -> Any:
        return await sdk.chat.completions.create(model="m", messages=MESSAGES)

    completion, event = await call_through_proxy(tmp_path, mock_upstream_url, complete)

    assert completion.choices[0].message.content == MOCK_TEXT
    assert event["path"] == "/v1/chat/completions"
    assert event["status"] == 200
    assert event["outcome"] == "ok"
    assert event["streamed"] is False
    body = orjson.loads(event["response_body"])
    assert body["choices"][0]["message"]["content"] == MOCK_TEXT
    assert orjson.loads(event["request_body"])["messages"] == MESSAGES
    assert_key_redacted(event)
    assert_sane_timings(event, started)


@ignore_sdk_stream_leak
async def test_sdk_stream_through_the_proxy_is_recorded_whole(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    started = time.time()

    async def stream(sdk: openai.AsyncOpenAI) -> list[Any]:
        chunks = await sdk.chat.completions.create(
            model="m",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        async with chunks:
            return [chunk async for chunk in chunks]

    chunks, event = await call_through_proxy(tmp_path, mock_upstream_url, stream)

    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == MOCK_TEXT
    assert chunks[-1].usage is not None
    assert event["streamed"] is True
    assert event["outcome"] == "ok"
    assert event["response_body_truncated"] is False
    body: str = event["response_body"]
    assert len(body.encode()) == event["response_body_size"]
    recorded = sse_chunks(body)
    assert [chunk["id"] for chunk in recorded] == [chunk.id for chunk in chunks]
    assert recorded[-1]["usage"]["total_tokens"] == chunks[-1].usage.total_tokens
    assert_key_redacted(event)
    assert_sane_timings(event, started)
