"""Tests for the mock upstream: over real loopback HTTP, and as a bare ASGI app.

Network tests talk to a Hypercorn server on 127.0.0.1 port 0 and run under a
``trio.fail_after`` hang guard. Timing tests call the app directly with fake
``receive``/``send`` callables and the autojump clock, so they never sleep for real.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from typing import cast

import attrs
import httpx
import openai
import pytest
import trio
import trio.testing

from trio_llmproxy import ConfigError
from trio_llmproxy._asgi import Message
from trio_llmproxy._mock_upstream import (
    SENTENCE,
    MockUpstreamHandle,
    MockUpstreamSettings,
    create_mock_upstream_app,
    serve_mock_upstream,
)

HANG_GUARD_SECONDS = 10
DEFAULT_TEXT = (SENTENCE * 2)[:32]
MESSAGES = [{"role": "user", "content": "Say something."}]  # 14 chars: 4 tokens

# The openai SDK leaves its inner SSE async generators suspended after [DONE]; Trio
# then warns when they are garbage collected. That is the SDK's doing, not ours.
ignore_sdk_stream_leak = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|httpx2|httpcore2)\.:ResourceWarning"
)


@pytest.fixture
async def client(mock_upstream_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mock_upstream_url) as client:
        yield client


@pytest.fixture
async def sdk(mock_upstream_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    base_url = f"{mock_upstream_url}/v1"
    async with openai.AsyncOpenAI(
        base_url=base_url, api_key="unused", max_retries=0
    ) as sdk:
        yield sdk


def sse_data(body: str) -> list[str]:
    """Splits an SSE body into the data of its events."""
    events = [event for event in body.split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events)
    return [event.removeprefix("data: ") for event in events]


def content_pieces(data: list[str]) -> list[str]:
    """Returns the content deltas of the chunks between the role and stop chunks."""
    chunks = [json.loads(item) for item in data if item != "[DONE]"]
    return [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:-1]]


async def stream_body(client: httpx.AsyncClient, **extra: object) -> list[str]:
    body = {"model": "m", "messages": MESSAGES, "stream": True, **extra}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    return sse_data(response.text)


async def test_completion_returns_deterministic_content_and_usage(
    client: httpx.AsyncClient,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        response = await client.post(
            "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}
        )

    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(response.content))
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "m"
    assert body["choices"][0]["message"]["content"] == DEFAULT_TEXT
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 8,
        "total_tokens": 12,
    }


async def test_completion_without_model_names_default_model(
    client: httpx.AsyncClient,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        response = await client.post("/v1/chat/completions", json={"messages": []})

    assert response.json()["model"] == "mock-gpt"


async def test_stream_chunks_concatenate_to_plain_content(
    client: httpx.AsyncClient,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        data = await stream_body(client)

    first, last = json.loads(data[0]), json.loads(data[-2])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert content_pieces(data) == [DEFAULT_TEXT[i : i + 4] for i in range(0, 32, 4)]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert data[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("stream_options", "has_usage_chunk"),
    [({"include_usage": True}, True), ({"include_usage": False}, False), (None, False)],
)
async def test_stream_sends_usage_chunk_only_when_asked(
    client: httpx.AsyncClient, stream_options: object, has_usage_chunk: bool
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        data = await stream_body(client, stream_options=stream_options)

    usage_chunks = [json.loads(item) for item in data[:-1] if '"usage"' in item]
    assert len(usage_chunks) == int(has_usage_chunk)
    if has_usage_chunk:
        assert usage_chunks[0]["choices"] == []
        assert usage_chunks[0]["usage"]["completion_tokens"] == 8
        assert data[-2] == json.dumps(usage_chunks[0], separators=(",", ":"))


async def test_chunk_headers_override_settings(client: httpx.AsyncClient) -> None:
    headers = {"X-Mock-Chunk-Count": "3", "X-Mock-Chunk-Size": "2"}

    with trio.fail_after(HANG_GUARD_SECONDS):
        body = {"messages": MESSAGES, "stream": True}
        response = await client.post("/v1/chat/completions", json=body, headers=headers)

    assert content_pieces(sse_data(response.text)) == ["Th", "e ", "qu"]


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-Mock-Chunk-Count", "-1"),
        ("X-Mock-Chunk-Count", "many"),
        ("X-Mock-Chunk-Size", "1.5"),
        ("X-Mock-Chunk-Size", "20000000"),
        ("X-Mock-Chunk-Delay-Ms", "nan"),
        ("X-Mock-Chunk-Delay-Ms", "inf"),
    ],
)
async def test_bad_override_header_answers_400(
    client: httpx.AsyncClient, header: str, value: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        response = await client.post(
            "/v1/chat/completions", json={}, headers={header: value}
        )

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_mock_header"


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/nowhere")],
)
@pytest.mark.parametrize(
    ("status", "error_type"),
    [(401, "authentication_error"), (429, "rate_limit_error"), (503, "server_error")],
)
async def test_mock_status_header_answers_that_status(
    client: httpx.AsyncClient, method: str, path: str, status: int, error_type: str
) -> None:
    headers = {"X-Mock-Status": str(status)}

    with trio.fail_after(HANG_GUARD_SECONDS):
        response = await client.request(method, path, json={}, headers=headers)

    assert response.status_code == status
    assert response.json()["error"]["type"] == error_type


@pytest.mark.parametrize("value", ["200", "600", "teapot"])
async def test_bad_mock_status_answers_400(
    client: httpx.AsyncClient, value: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        response = await client.get("/v1/models", headers={"X-Mock-Status": value})

    assert response.status_code == 400
    assert "X-Mock-Status" in response.json()["error"]["message"]


async def test_models_lists_default_model(client: httpx.AsyncClient) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        response = await client.get("/v1/models")

    body = response.json()
    assert body["object"] == "list"
    assert [model["id"] for model in body["data"]] == ["mock-gpt"]


@pytest.mark.parametrize(
    ("inputs", "count"), [("one", 1), (["one", "two", "three"], 3)]
)
async def test_embeddings_give_one_vector_per_input(
    client: httpx.AsyncClient, inputs: object, count: int
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        body = {"model": "e", "input": inputs}
        response = await client.post("/v1/embeddings", json=body)

    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == "e"
    assert [item["index"] for item in body["data"]] == list(range(count))
    assert all(len(item["embedding"]) == 8 for item in body["data"])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


async def test_embeddings_are_deterministic_per_input(
    client: httpx.AsyncClient,
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        body = {"model": "e", "input": ["same", "other", "same"]}
        response = await client.post("/v1/embeddings", json=body)

    first, other, again = (item["embedding"] for item in response.json()["data"])
    assert first == again != other


@pytest.mark.parametrize(
    "body", [{"model": "e", "input": [1, 2]}, {"input": "x", "encoding_format": "hex"}]
)
async def test_embeddings_reject_bad_request(
    client: httpx.AsyncClient, body: object
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        response = await client.post("/v1/embeddings", json=body)

    assert response.status_code == 400


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/v1/chat/completions"), ("POST", "/v1/completions")],
)
async def test_unknown_route_answers_404(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        response = await client.request(method, path)

    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b""])
async def test_invalid_json_answers_400(
    client: httpx.AsyncClient, path: str, content: bytes
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        response = await client.post(path, content=content)

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/models", "/nowhere"])
async def test_request_id_is_echoed(client: httpx.AsyncClient, path: str) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        response = await client.get(path, headers={"X-Request-ID": "req-42"})

    assert response.headers["x-request-id"] == "req-42"


async def test_streamed_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    headers = {"X-Request-ID": "req-43"}

    with trio.fail_after(HANG_GUARD_SECONDS):
        body = {"messages": [], "stream": True}
        response = await client.post("/v1/chat/completions", json=body, headers=headers)

    assert response.headers["x-request-id"] == "req-43"


async def test_custom_settings_shape_completions(nursery: trio.Nursery) -> None:
    settings = MockUpstreamSettings(chunk_count=2, chunk_size=3, model="tiny")

    with trio.fail_after(HANG_GUARD_SECONDS):
        handle = await nursery.start(serve_mock_upstream, settings)
        async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
            response = await client.post("/v1/chat/completions", json={})

    body = response.json()
    assert body["model"] == "tiny"
    assert body["choices"][0]["message"]["content"] == "The qu"


# The real openai SDK, async, under Trio (it runs on anyio, so it works).


async def test_sdk_completion(sdk: openai.AsyncOpenAI) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        completion = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Say something."}]
        )

    assert completion.choices[0].message.content == DEFAULT_TEXT
    assert completion.usage is not None
    assert completion.usage.total_tokens == 12


@ignore_sdk_stream_leak
async def test_sdk_stream(sdk: openai.AsyncOpenAI) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        stream = await sdk.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Say something."}],
            stream=True,
            stream_options={"include_usage": True},
        )
        async with stream:
            chunks = [chunk async for chunk in stream]

    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    assert "".join(piece or "" for piece in pieces) == DEFAULT_TEXT
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8


async def test_sdk_embeddings_decode_base64(sdk: openai.AsyncOpenAI) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        # The SDK asks for base64 unless told otherwise, then decodes to floats.
        packed = await sdk.embeddings.create(model="e", input=["a", "b"])
        plain = await sdk.embeddings.create(
            model="e", input=["a", "b"], encoding_format="float"
        )

    assert [item.embedding for item in packed.data] == [
        item.embedding for item in plain.data
    ]
    assert len(packed.data[0].embedding) == 8


async def test_sdk_models(sdk: openai.AsyncOpenAI) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        page = await sdk.models.list()

    assert [model.id for model in page.data] == ["mock-gpt"]


async def test_sdk_raises_mock_status(sdk: openai.AsyncOpenAI) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS), pytest.raises(openai.RateLimitError):
        await sdk.chat.completions.create(
            model="m", messages=[], extra_headers={"X-Mock-Status": "429"}
        )


# Starting it from Python.


async def test_serve_reports_the_port_chosen_for_port_0(nursery: trio.Nursery) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        handle = await nursery.start(partial(serve_mock_upstream, listen="127.0.0.1:0"))
        async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
            response = await client.get("/v1/models")

    assert handle.addresses[0].startswith("http://127.0.0.1:")
    assert not handle.addresses[0].endswith(":0")
    assert response.status_code == 200


async def test_serve_returns_after_shutdown_and_refuses_new_clients() -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle: MockUpstreamHandle = await nursery.start(serve_mock_upstream)
            handle.shutdown()

        async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get("/v1/models")


async def test_serve_refuses_a_listen_address_without_a_port() -> None:
    with pytest.raises(ConfigError, match="127.0.0.1"):
        await serve_mock_upstream(listen="127.0.0.1")


# The bare ASGI app, driven by hand, for timing and disconnects.


@attrs.define
class FakeClient:
    """Plays the server side of ASGI for one request; records what the app sends."""

    body: bytes
    sent: list[Message] = attrs.Factory(list)
    sent_at: list[float] = attrs.Factory(list)
    leave_after_messages: int | None = None
    _left: trio.Event = attrs.Factory(trio.Event)
    _asked_for_body: bool = False

    async def receive(self) -> Message:
        if not self._asked_for_body:
            self._asked_for_body = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self._left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        self.sent_at.append(trio.current_time())
        if len(self.sent) == self.leave_after_messages:
            self._left.set()


def http_scope(headers: list[tuple[bytes, bytes]]) -> dict[str, object]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": headers,
    }


STREAM_REQUEST = json.dumps({"messages": [], "stream": True}).encode()


async def test_stream_sends_each_event_as_its_own_message() -> None:
    app = create_mock_upstream_app(MockUpstreamSettings(chunk_count=3))
    fake = FakeClient(STREAM_REQUEST)

    await app(http_scope([]), fake.receive, fake.send)

    start, *bodies, end = fake.sent
    assert start["type"] == "http.response.start"
    events = [cast("bytes", message["body"]) for message in bodies]
    assert [event == b"data: [DONE]\n\n" for event in events] == [False] * 5 + [True]
    assert all(m["more_body"] is True for m in bodies)
    assert end == {"type": "http.response.body", "body": b""}


async def test_stream_sleeps_before_each_content_chunk(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = create_mock_upstream_app(MockUpstreamSettings(chunk_count=3))
    fake = FakeClient(STREAM_REQUEST)
    headers = [(b"x-mock-chunk-delay-ms", b"250")]

    await app(http_scope(headers), fake.receive, fake.send)

    # Start and role chunk at once, then three content chunks 0.25 s apart.
    assert fake.sent_at[:5] == pytest.approx([0, 0, 0.25, 0.5, 0.75])
    assert fake.sent_at[-1] == pytest.approx(0.75)


async def test_stream_stops_quietly_when_client_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = MockUpstreamSettings(chunk_count=100, chunk_delay_seconds=1.0)
    app = create_mock_upstream_app(settings)
    fake = FakeClient(STREAM_REQUEST, leave_after_messages=4)

    await app(http_scope([]), fake.receive, fake.send)

    assert len(fake.sent) == 4
    assert trio.current_time() < 5


async def test_app_completes_lifespan() -> None:
    app = create_mock_upstream_app(MockUpstreamSettings())
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[Message] = []

    async def receive() -> Message:
        return next(incoming)

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)

    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"chunk_count": -1}, "chunk_count must be an int from 0"),
        ({"chunk_count": True}, "chunk_count must be an int from 0"),
        ({"chunk_size": 2.0}, "chunk_size must be an int from 0"),
        ({"chunk_delay_seconds": -0.5}, "chunk_delay_seconds must be a finite"),
        ({"chunk_delay_seconds": float("nan")}, "chunk_delay_seconds must be"),
        ({"chunk_count": 10_000, "chunk_size": 10_000}, "chunk_count * chunk_size"),
        ({"model": ""}, "model"),
    ],
)
def test_settings_reject_bad_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        MockUpstreamSettings(**changes)  # type: ignore[arg-type]
