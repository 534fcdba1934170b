"""/metrics: scraped from a real proxy after real traffic, and its parts alone.

Each network test serves the proxy in-process on a loopback port in front of
the mock upstream (or a raw upstream replaying a transcript), under a hang
guard. Request metrics come from a bus subscriber, a moment after each
request ends, so the tests wait for the count they expect.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import orjson
import pytest
import trio
from conftest import serve_asgi
from prometheus_client.parser import text_string_to_metric_families
from transcripts import load, raw_upstream

from trio_llmproxy import Event, InMemoryEventBus, ProxyConfig, ServerHandle, serve
from trio_llmproxy._cli import METRICS_PATH
from trio_llmproxy._errors import ConfigError
from trio_llmproxy._metrics import ProxyMetrics, path_template
from trio_llmproxy._redis_bus import BusError, GroupLag, StreamLag
from trio_llmproxy._rendering import INLINE_BODY_BYTES

HANG_GUARD_SECONDS = 20.0
API_KEY = "sk-demo-0000000000001234"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@asynccontextmanager
async def running_proxy(upstream: str, **config: Any) -> AsyncIterator[ServerHandle]:
    settings = ProxyConfig(listen="127.0.0.1:0", upstream_url=upstream, **config)
    async with trio.open_nursery() as nursery:
        handle: ServerHandle = await nursery.start(serve, settings)
        yield handle
        handle.shutdown()


async def scrape(client: httpx.AsyncClient, path: str = "/metrics") -> Samples:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def scrape_when(
    client: httpx.AsyncClient, name: str, count: float, **labels: str
) -> Samples:
    """Scrape until ``name`` with ``labels`` reaches ``count`` (events lag)."""
    while True:
        samples = await scrape(client)
        if value(samples, name, **labels) >= count:
            return samples
        await trio.sleep(0.01)


def chat(stream: bool, **extra: Any) -> dict[str, Any]:
    return {
        "model": "mock-gpt",
        "stream": stream,
        "messages": [{"role": "user", "content": "Hello there"}],
        **extra,
    }


async def test_metrics_count_calls_tokens_latency_and_bytes(
    mock_upstream_url: str,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            running_proxy(mock_upstream_url) as handle,
            httpx.AsyncClient(base_url=handle.addresses[0]) as client,
        ):
            plain = await client.post("/v1/chat/completions", json=chat(False))
            streamed = await client.post(
                "/v1/chat/completions",
                json=chat(True, stream_options={"include_usage": True}),
            )
            failed = await client.post(
                "/v1/chat/completions",
                json=chat(False),
                headers={"X-Mock-Status": "503"},
            )
            models = await client.get("/v1/models")
            samples = await scrape_when(client, "llmproxy_requests_total", 4)

    usage = plain.json()["usage"]
    route = {"method": "POST", "path": "/v1/chat/completions"}
    model = {"api": "chat.completions", "model": "mock-gpt"}
    assert value(samples, "llmproxy_requests_total", **route, outcome="ok") == 2
    assert (
        value(
            samples,
            "llmproxy_requests_total",
            **route,
            status="503",
            outcome="http_error",
        )
        == 1
    )
    assert value(samples, "llmproxy_requests_total", path="/v1/models") == 1
    # Both answers use the same prompt and length, so the same usage.
    assert value(samples, "llmproxy_tokens_total", **model, kind="input") == (
        2 * usage["prompt_tokens"]
    )
    assert value(samples, "llmproxy_tokens_total", **model, kind="output") == (
        2 * usage["completion_tokens"]
    )
    assert value(samples, "llmproxy_llm_requests_without_usage_total", **model) == 1
    assert value(samples, "llmproxy_request_duration_seconds_count", **route) == 3
    assert value(samples, "llmproxy_time_to_first_byte_seconds_count", **route) == 3
    assert value(samples, "llmproxy_time_to_first_token_seconds_count", **model) == 2
    assert value(samples, "llmproxy_response_body_bytes_total", **route) == sum(
        len(r.content) for r in (plain, streamed, failed)
    )
    assert value(samples, "llmproxy_request_body_bytes_total", **route) == sum(
        len(r.request.content) for r in (plain, streamed, failed)
    )
    assert models.status_code == 200
    assert value(samples, "llmproxy_bus_published_events_total", bus="memory") == 4
    assert (
        value(
            samples,
            "llmproxy_subscriber_delivered_events_total",
            subscriber="metrics",
        )
        == 4
    )


async def test_stream_larger_than_the_inline_limit_is_counted_with_its_tokens(
    mock_upstream_url: str,
) -> None:
    # Captures above INLINE_BODY_BYTES are counted in a worker thread.
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            running_proxy(mock_upstream_url) as handle,
            httpx.AsyncClient(base_url=handle.addresses[0]) as client,
        ):
            streamed = await client.post(
                "/v1/chat/completions",
                json=chat(True, stream_options={"include_usage": True}),
                headers={"X-Mock-Chunk-Count": "400", "X-Mock-Chunk-Size": "100"},
            )
            samples = await scrape_when(client, "llmproxy_requests_total", 1)

    assert len(streamed.content) > INLINE_BODY_BYTES
    usage = orjson.loads(
        [line for line in streamed.text.splitlines() if '"usage":{' in line][-1][6:]
    )["usage"]
    model = {"api": "chat.completions", "model": "mock-gpt"}
    assert value(samples, "llmproxy_llm_requests_total", **model, outcome="ok") == 1
    output = value(samples, "llmproxy_tokens_total", **model, kind="output")
    assert output == usage["completion_tokens"]


async def test_metrics_are_neither_forwarded_nor_recorded(
    mock_upstream_url: str,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            running_proxy(mock_upstream_url) as handle,
            httpx.AsyncClient(base_url=handle.addresses[0]) as client,
        ):
            await scrape(client)
            await client.get("/v1/models")
            samples = await scrape_when(client, "llmproxy_requests_total", 1)

    # The mock has no /metrics: forwarded, it would have answered 404.
    assert value(samples, "llmproxy_requests_total") == 1
    assert value(samples, "llmproxy_bus_published_events_total") == 1


@pytest.mark.parametrize("metrics_path", ["", "/internal/metrics"])
async def test_metrics_path_moves_or_turns_off(
    mock_upstream_url: str, metrics_path: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            running_proxy(mock_upstream_url, metrics_path=metrics_path) as handle,
            httpx.AsyncClient(base_url=handle.addresses[0]) as client,
        ):
            default = await client.get("/metrics")
            moved = await client.get("/internal/metrics")

    # Forwarded to the mock, which knows neither path.
    assert default.status_code == 404
    assert default.json()["error"]["code"] == "not_found"
    if metrics_path:
        assert moved.status_code == 200
        assert "llmproxy_requests_total" in moved.text
    else:
        assert moved.status_code == 404


@pytest.mark.parametrize("name", ["chat_tools.error", "anthropic.error"])
async def test_stream_ending_in_an_error_event_is_not_a_success(
    nursery: trio.Nursery, name: str
) -> None:
    transcript = load(name)
    upstream = await serve_asgi(nursery, raw_upstream(transcript.chunks()))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            running_proxy(upstream) as handle,
            httpx.AsyncClient(base_url=handle.addresses[0]) as client,
        ):
            async with handle.bus.subscribe("test") as subscription:
                response = await client.post(
                    transcript.path, content=transcript.request
                )
                event = await subscription.events().__anext__()
            samples = await scrape_when(client, "llmproxy_requests_total", 1)

    assert response.status_code == 200
    assert event.to_dict()["llm"]["outcome_detail"]["outcome"] == "upstream_error"
    assert value(samples, "llmproxy_requests_total", outcome="upstream_error") == 1
    assert value(samples, "llmproxy_requests_total", outcome="ok") == 0
    assert value(samples, "llmproxy_llm_requests_total", outcome="upstream_error") == 1
    assert value(samples, "llmproxy_llm_requests_total", outcome="ok") == 0


async def test_openai_sdk_usage_matches_the_event_and_the_metrics(
    mock_upstream_url: str,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            running_proxy(mock_upstream_url) as handle,
            httpx.AsyncClient(base_url=handle.addresses[0]) as client,
            handle.bus.subscribe("test") as subscription,
        ):

            def stream_with_sdk() -> list[Any]:
                # The sync client in a thread: the async one leaves generators
                # unfinished under Trio, which warns about them.
                with openai.OpenAI(
                    base_url=f"{handle.addresses[0]}/v1",
                    api_key=API_KEY,
                    max_retries=0,
                ) as sdk:
                    stream = sdk.chat.completions.create(
                        model="mock-gpt",
                        messages=[{"role": "user", "content": "Say something."}],
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    return list(stream)

            chunks = await trio.to_thread.run_sync(stream_with_sdk)
            event = await subscription.events().__anext__()
            samples = await scrape_when(client, "llmproxy_llm_requests_total", 1)

    reported = chunks[-1].usage
    assert reported is not None and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    llm = Event.from_json(event.to_json()).to_dict()["llm"]
    assert llm["usage"]["input_tokens"] == reported.prompt_tokens
    assert llm["usage"]["output_tokens"] == reported.completion_tokens
    assert llm["usage"]["total_tokens"] == reported.total_tokens
    assert llm["usage"]["raw"] == reported.model_dump(exclude_unset=True)
    assert llm["output_text"] == text
    assert llm["outcome_detail"]["outcome"] == "ok"
    model = {"api": "chat.completions", "model": "mock-gpt"}
    assert value(samples, "llmproxy_llm_requests_total", **model, outcome="ok") == 1
    assert value(samples, "llmproxy_tokens_total", **model, kind="input") == (
        reported.prompt_tokens
    )
    assert value(samples, "llmproxy_tokens_total", **model, kind="output") == (
        reported.completion_tokens
    )
    duration_sum = value(samples, "llmproxy_request_duration_seconds_sum")
    assert math.isclose(duration_sum, event.duration_ms / 1000.0)
    assert value(samples, "llmproxy_time_to_first_token_seconds_count", **model) == 1
    assert math.isclose(
        value(samples, "llmproxy_time_to_first_token_seconds_sum", **model),
        llm["ttft_ms"] / 1000.0,
        rel_tol=1e-3,
    )


# The parts alone: the bus collector, Redis, labels, the flag.


async def test_bus_collector_reports_drops_per_subscriber() -> None:
    bus = InMemoryEventBus(buffer_size=1)
    metrics = ProxyMetrics()
    metrics.watch_bus(bus, "memory")
    event = Event.from_json(orjson.dumps(_minimal_event()))

    async with bus.subscribe("slow"):
        for _ in range(3):
            bus.publish(event)
        samples = parse((await metrics.render()).decode())

    labels = {"bus": "memory", "subscriber": "slow"}
    assert value(samples, "llmproxy_bus_published_events_total") == 3
    assert value(samples, "llmproxy_subscriber_dropped_events_total", **labels) == 2
    assert value(samples, "llmproxy_subscriber_buffered_events", **labels) == 1
    assert value(samples, "llmproxy_bus_buffered_events", bus="memory") == 1


async def test_redis_stream_length_and_pending_are_read_at_scrape() -> None:
    metrics = ProxyMetrics()
    lag = StreamLag(
        stream="llm-proxy-events",
        length=42,
        groups={
            "file": GroupLag(
                name="file",
                consumers=2,
                pending=5,
                lag=7,
                last_delivered_id="1-0",
            )
        },
    )

    async def read_lag() -> StreamLag:
        return lag

    metrics.watch_bus(InMemoryEventBus(), "redis", lag=read_lag)
    samples = parse((await metrics.render()).decode())

    assert value(samples, "llmproxy_redis_up") == 1
    assert value(samples, "llmproxy_redis_stream_length") == 42
    assert value(samples, "llmproxy_redis_group_pending_entries", group="file") == 5
    assert value(samples, "llmproxy_redis_group_lag_entries", group="file") == 7


async def test_redis_down_is_reported_not_raised() -> None:
    metrics = ProxyMetrics()

    async def read_lag() -> StreamLag:
        msg = "cannot read the lag: connection refused"
        raise BusError(msg)

    metrics.watch_bus(InMemoryEventBus(), "redis", lag=read_lag)
    samples = parse((await metrics.render()).decode())

    assert value(samples, "llmproxy_redis_up") == 0
    assert value(samples, "llmproxy_redis_stream_length") == 0


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/responses/resp_68a1c0f2e9b4", "/v1/responses/{id}"),
        ("/v1/files/file-abc123/content", "/v1/files/{id}/content"),
        ("/v1/threads/thread_abc123/runs/run_abc123", "/v1/threads/{id}/runs/{id}"),
        (
            "/openai/deployments/gpt-4o-prod/chat/completions",
            "/openai/deployments/{deployment}/chat/completions",
        ),
        ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs"),
        ("/v1/models/gpt-4o", "/v1/models/{id}"),
        ("/v1/batches/123456", "/v1/batches/{id}"),
    ],
)
def test_path_template(path: str, template: str) -> None:
    assert path_template(path) == template


def test_client_controlled_labels_are_bounded() -> None:
    metrics = ProxyMetrics()
    base = _minimal_event()

    for index in range(300):
        event = Event.from_dict({**base, "path": f"/custom/route{index}x"})
        metrics.observe(event)

    families = {f.name: f for f in metrics.registry.collect()}
    paths = {s.labels["path"] for s in families["llmproxy_requests"].samples}
    assert len(paths) == 201
    assert "other" in paths


def test_metrics_path_flag_takes_off_and_checks_the_path() -> None:
    flag = METRICS_PATH

    assert flag.convert("off", None, None) == ""
    assert flag.convert("/m", None, None) == "/m"
    with pytest.raises(Exception, match="must start with /"):
        flag.convert("metrics", None, None)
    with pytest.raises(ConfigError, match="metrics_path"):
        ProxyConfig(metrics_path="metrics")


def _minimal_event() -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": "e1",
        "request_id": "r1",
        "timestamp": "2026-12-03T14:00:00.000000Z",
        "method": "GET",
        "path": "/v1/models",
        "query": "",
        "status": 200,
        "duration_ms": 1.0,
        "ttfb_ms": 0.5,
        "request_headers": {},
        "response_headers": {},
        "request_body": None,
        "request_body_encoding": "utf-8",
        "request_body_size": 0,
        "request_body_truncated": False,
        "response_body": None,
        "response_body_encoding": "utf-8",
        "response_body_size": 0,
        "response_body_truncated": False,
        "streamed": False,
        "outcome": "ok",
        "error": None,
    }


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--metrics-path", "metrics"], {}, "--metrics-path (METRICS_PATH)"),
        ([], {"METRICS_PATH": "/m?x=1"}, "METRICS_PATH (--metrics-path)"),
    ],
)
def test_bad_metrics_path_exits_2_with_one_line_naming_it(
    args: list[str], env: dict[str, str], named: str
) -> None:
    # Port 0: a value wrongly accepted starts a server the timeout then stops.
    result = subprocess.run(
        [sys.executable, "-m", "trio_llmproxy", "server", *args],
        env={**os.environ, "LISTEN_ADDR": "127.0.0.1:0", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "must start with /" in lines[0]
