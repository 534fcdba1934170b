"""The llm object of an event, from recorded transcripts of real stream shapes.

The transcripts in ``tests/streams/`` are written by hand in the shapes real
providers send; ``manifest.json`` gives each one's request and the chunk
boundaries it was "recorded" with. Each is replayed with those boundaries,
re-chunked at random down to single bytes, and with CRLF and CR line
endings: the llm object must not change. Some are also replayed through the
real proxy from a raw upstream, where the client must get the very bytes.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Sequence
from typing import Any

import events
import httpx
import orjson
import pytest
import trio
from conftest import serve_asgi
from hypothesis import given
from hypothesis import strategies as st
from transcripts import (
    COMPLETE,
    FIRST_CONTENT,
    MANIFEST,
    Transcript,
    cut_before_terminal,
    load,
    raw_upstream,
    variants,
)

from trio_llmproxy import Event, ProxyConfig, ServerHandle, serve
from trio_llmproxy._event import WebSocketMessage, WebSocketSession
from trio_llmproxy._llm import describe_llm, normalise_usage, recognise_api
from trio_llmproxy._middleware import MAX_CHUNK_MARKS

HANG_GUARD_SECONDS = 30.0


def make_event(
    path: str,
    request: bytes,
    chunks: Sequence[bytes],
    *,
    status: int = 200,
    content_type: bytes = b"text/event-stream",
    marks: Sequence[tuple[int, float]] = (),
    **overrides: Any,
) -> Event:
    fields: dict[str, Any] = {
        "path": path.split("?")[0],
        "query": path.partition("?")[2],
        "status": status,
        "duration_ms": 500.0,
        "ttfb_ms": 5.0,
        "response_headers": [(b"content-type", content_type)],
        "request_body": request,
        "response_body": b"".join(chunks),
        "response_chunk_marks": marks,
        "streamed": content_type == b"text/event-stream",
    }
    fields.update(overrides)
    return events.make_event(**fields)


def llm_of(transcript: Transcript, chunks: Sequence[bytes]) -> dict[str, Any]:
    llm = describe_llm(make_event(transcript.path, transcript.request, chunks))
    assert llm is not None
    return llm


def _all_transcripts() -> list[Transcript]:
    loaded = [load(name) for name in MANIFEST]
    return loaded + [cut_before_terminal(load(name)) for name in COMPLETE]


@pytest.mark.parametrize("transcript", _all_transcripts(), ids=lambda t: t.name)
def test_llm_object_is_the_same_however_the_stream_is_cut(
    transcript: Transcript,
) -> None:
    reference = llm_of(transcript, transcript.chunks())

    for name, chunks in variants(transcript).items():
        assert llm_of(transcript, chunks) == reference, name


def test_chat_completions_with_tool_calls_and_usage_chunk() -> None:
    llm = llm_of(load("chat_tools"), load("chat_tools").chunks())

    assert llm["api"] == "chat.completions"
    assert llm["request_model"] == "gpt-4o"
    assert llm["response_model"] == "gpt-4o-2024-08-06"
    assert llm["stream"] is True
    assert llm["usage"] == {
        "input_tokens": 82,
        "output_tokens": 41,
        "total_tokens": 123,
        "reasoning_tokens": 0,
        "cached_tokens": 64,
        "raw": {
            "prompt_tokens": 82,
            "completion_tokens": 41,
            "total_tokens": 123,
            "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
    }
    assert llm["finish_reasons"] == ["tool_calls"]
    assert llm["output_text"] == "Je vérifie la météo — un instant."
    assert llm["reasoning_text"] is None
    assert llm["tool_calls"] == [
        {
            "choice": 0,
            "index": 0,
            "id": "call_Vq3mXw1",
            "name": "get_weather",
            "arguments": '{"city": "Paris", "unit": "°C"}',
        },
        {
            "choice": 0,
            "index": 1,
            "id": "call_Lk92hZe",
            "name": "get_time",
            "arguments": '{"tz": "Europe/Paris"}',
        },
    ]
    assert llm["outcome_detail"] == {
        "outcome": "ok",
        "error_type": None,
        "error_code": None,
        "error_message": None,
    }
    assert llm["malformed_events"] == 0


def test_azure_stream_with_empty_first_and_last_choices() -> None:
    llm = llm_of(load("azure_chat"), load("azure_chat").chunks())

    assert llm["api"] == "chat.completions"
    assert llm["request_model"] is None
    assert llm["response_model"] == "gpt-4o-2024-11-20"
    assert llm["output_text"] == "東京の天気は晴れです。"
    assert llm["finish_reasons"] == ["stop"]
    usage = llm["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (
        21,
        9,
        30,
    )
    assert llm["outcome_detail"]["outcome"] == "ok"


def test_responses_stream_takes_usage_from_response_completed() -> None:
    llm = llm_of(load("responses"), load("responses").chunks())

    assert llm["api"] == "responses"
    assert llm["request_model"] == "gpt-4.1"
    assert llm["response_model"] == "gpt-4.1-2025-04-14"
    assert llm["output_text"] == "Bonjour — je cherche 東京."
    assert llm["tool_calls"] == [
        {
            "choice": 0,
            "index": 1,
            "id": "call_Rt5yU8",
            "name": "lookup",
            "arguments": '{"q": "tokyo weather"}',
        }
    ]
    assert llm["finish_reasons"] == ["completed"]
    usage = llm["usage"]
    assert usage["input_tokens"] == 57
    assert usage["output_tokens"] == 31
    assert usage["total_tokens"] == 88
    assert usage["cached_tokens"] == 0
    assert usage["reasoning_tokens"] == 0
    assert llm["outcome_detail"]["outcome"] == "ok"


def test_anthropic_stream_merges_usage_and_keeps_the_thinking_apart() -> None:
    llm = llm_of(load("anthropic"), load("anthropic").chunks())

    assert llm["api"] == "anthropic.messages"
    assert llm["response_model"] == "claude-sonnet-4-20250514"
    assert llm["output_text"] == "Il fait 21 °C à Paris ; je regarde la suite."
    assert llm["reasoning_text"] == (
        "The user wants Paris weather; I should call the forecast tool."
    )
    assert llm["tool_calls"] == [
        {
            "choice": 0,
            "index": 2,
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "name": "get_forecast",
            "arguments": '{"city": "Paris", "days": 3}',
        }
    ]
    assert llm["finish_reasons"] == ["tool_use"]
    usage = llm["usage"]
    # The whole prompt: uncached, cache written and cache read.
    assert usage["input_tokens"] == 472 + 0 + 1024
    assert usage["output_tokens"] == 157
    assert usage["total_tokens"] == 472 + 1024 + 157
    assert usage["cached_tokens"] == 1024
    assert usage["reasoning_tokens"] is None
    assert usage["raw"]["output_tokens"] == 157
    assert usage["raw"]["service_tier"] == "standard"
    assert llm["outcome_detail"]["outcome"] == "ok"


@pytest.mark.parametrize(
    ("name", "error_type", "error_code", "message"),
    [
        (
            "chat_tools.error",
            "server_error",
            None,
            "The server had an error while processing your request. Sorry about that!",
        ),
        (
            "azure_chat.error",
            None,
            "content_filter",
            "The response was filtered due to the prompt triggering Azure "
            "OpenAI's content management policy.",
        ),
        (
            "responses.error",
            "error",
            "server_error",
            "The server had an error while processing your request.",
        ),
        ("anthropic.error", "overloaded_error", None, "Overloaded"),
    ],
)
def test_in_band_error_is_an_upstream_error(
    name: str, error_type: str | None, error_code: str | None, message: str
) -> None:
    transcript = load(name)

    llm = llm_of(transcript, transcript.chunks())

    assert llm["outcome_detail"] == {
        "outcome": "upstream_error",
        "error_type": error_type,
        "error_code": error_code,
        "error_message": message,
    }


def test_in_band_error_makes_the_event_outcome_upstream_error() -> None:
    transcript = load("anthropic.error")
    event = make_event(transcript.path, transcript.request, transcript.chunks())

    rendered = event.to_dict()

    assert event.outcome == "ok"
    assert rendered["outcome"] == "upstream_error"
    assert rendered["error"] == "in-band error: Overloaded"


@pytest.mark.parametrize("name", COMPLETE)
def test_stream_cut_before_its_terminal_event_is_incomplete(name: str) -> None:
    transcript = cut_before_terminal(load(name))

    llm = llm_of(transcript, transcript.chunks())

    assert llm["outcome_detail"]["outcome"] == "incomplete"
    assert llm["output_text"]


def test_stream_cut_by_the_capture_cap_is_not_called_incomplete() -> None:
    transcript = cut_before_terminal(load("chat_tools"))
    event = make_event(
        transcript.path,
        transcript.request,
        transcript.chunks(),
        response_body_truncated=True,
    )

    llm = describe_llm(event)

    assert llm is not None
    assert llm["outcome_detail"]["outcome"] == "unknown"


def test_malformed_json_in_one_event_is_counted_not_raised() -> None:
    transcript = load("chat_tools")
    body = transcript.body.replace(
        b"data: [DONE]", b'data: {"choices": [ oops\n\ndata: [DONE]'
    )

    llm = llm_of(transcript, [body])

    assert llm["malformed_events"] == 1
    assert llm["outcome_detail"]["outcome"] == "ok"
    assert llm["usage"]["total_tokens"] == 123


def _first_content_ttft(
    transcript: Transcript, marks: list[tuple[int, float]]
) -> float:
    body = transcript.body
    start = body.index(FIRST_CONTENT[transcript.name].encode())
    complete = body.index(b"\n\n", start) + 2
    return next(at for end, at in marks if end >= complete)


@pytest.mark.parametrize("name", COMPLETE)
def test_ttft_is_when_the_first_content_event_was_sent(name: str) -> None:
    transcript = load(name)
    marks = [(end, 10.0 * (i + 1)) for i, end in enumerate(transcript.chunk_ends)]
    event = make_event(
        transcript.path, transcript.request, transcript.chunks(), marks=marks
    )

    llm = describe_llm(event)

    assert llm is not None
    assert llm["ttft_ms"] == _first_content_ttft(transcript, marks)


def test_ttft_of_a_gzip_stream_maps_chunks_through_the_decoder() -> None:
    transcript = load("anthropic")
    compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    pieces = [
        compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH)
        for chunk in transcript.chunks()
    ]
    pieces[-1] += compressor.flush()
    ends, at, marks = 0, 0.0, []
    for piece in pieces:
        ends += len(piece)
        at += 10.0
        marks.append((ends, at))
    plain = [(end, 10.0 * (i + 1)) for i, end in enumerate(transcript.chunk_ends)]
    event = make_event(
        transcript.path,
        transcript.request,
        pieces,
        marks=marks,
        response_body_content_encoding="gzip",
    )

    llm = describe_llm(event)

    assert llm is not None
    assert llm["ttft_ms"] == _first_content_ttft(transcript, plain)
    assert llm == {**llm_of(transcript, transcript.chunks()), "ttft_ms": llm["ttft_ms"]}
    assert gzip.decompress(b"".join(pieces)) == transcript.body


def test_ttft_is_null_when_content_comes_after_the_marked_chunks() -> None:
    transcript = load("chat_tools")
    event = make_event(
        transcript.path, transcript.request, transcript.chunks(), marks=[(10, 1.0)]
    )

    llm = describe_llm(event)

    assert llm is not None
    assert llm["ttft_ms"] is None


# Whole JSON answers.


def test_non_streamed_chat_completion() -> None:
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi there"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }
    event = make_event(
        "/v1/chat/completions",
        b'{"model": "gpt-4o-mini", "messages": []}',
        [orjson.dumps(answer)],
        content_type=b"application/json",
    )

    llm = describe_llm(event)

    assert llm is not None
    assert llm["stream"] is False
    assert llm["output_text"] == "Hi there"
    assert llm["finish_reasons"] == ["stop"]
    assert llm["usage"]["total_tokens"] == 12
    assert llm["ttft_ms"] == event.ttfb_ms
    assert llm["outcome_detail"]["outcome"] == "ok"


def test_non_streamed_anthropic_message_with_tool_use() -> None:
    answer = {
        "type": "message",
        "model": "claude-3-5-haiku-20241022",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 20, "output_tokens": 8},
    }
    event = make_event(
        "/v1/messages",
        b'{"model": "claude-3-5-haiku-latest"}',
        [orjson.dumps(answer)],
        content_type=b"application/json",
    )

    llm = describe_llm(event)

    assert llm is not None
    assert llm["output_text"] == "Checking."
    assert llm["tool_calls"][0]["arguments"] == '{"a":1}'
    assert llm["usage"]["total_tokens"] == 28


def test_http_error_answer_is_an_http_error_with_its_message() -> None:
    error = {
        "message": "Rate limit reached",
        "type": "requests",
        "code": "rate_limit_exceeded",
    }
    body = orjson.dumps({"error": error})
    event = make_event(
        "/v1/chat/completions",
        b'{"model": "gpt-4o"}',
        [body],
        status=429,
        content_type=b"application/json",
    )

    llm = describe_llm(event)

    assert llm is not None
    assert llm["outcome_detail"] == {
        "outcome": "http_error",
        "error_type": "requests",
        "error_code": "rate_limit_exceeded",
        "error_message": "Rate limit reached",
    }
    assert llm["usage"] is None
    assert llm["ttft_ms"] is None


def test_embeddings_usage() -> None:
    usage = {"prompt_tokens": 5, "total_tokens": 5}
    body = orjson.dumps(
        {
            "object": "list",
            "data": [],
            "model": "text-embedding-3-small",
            "usage": usage,
        }
    )
    event = make_event(
        "/v1/embeddings",
        b'{"model": "text-embedding-3-small", "input": "hi"}',
        [body],
        content_type=b"application/json",
    )

    llm = describe_llm(event)

    assert llm is not None
    assert llm["api"] == "embeddings"
    assert llm["usage"]["input_tokens"] == 5
    assert llm["usage"]["output_tokens"] is None
    assert llm["ttft_ms"] is None


def test_the_exchange_outcome_wins_over_the_stream() -> None:
    transcript = cut_before_terminal(load("responses"))
    event = make_event(
        transcript.path,
        transcript.request,
        transcript.chunks(),
        outcome="client_disconnected",
        error="client closed the connection",
    )

    llm = describe_llm(event)

    assert llm is not None
    assert llm["outcome_detail"]["outcome"] == "client_disconnected"
    assert llm["outcome_detail"]["error_message"] == "client closed the connection"


@pytest.mark.parametrize(
    ("path", "body", "api"),
    [
        ("/v1/chat/completions", None, "chat.completions"),
        ("/openai/deployments/d/chat/completions", None, "chat.completions"),
        ("/v1/responses", None, "responses"),
        ("/v1/messages", None, "anthropic.messages"),
        ("/v1/embeddings", None, "embeddings"),
        ("/v1/completions", {"model": "gpt-3.5-turbo-instruct"}, "other"),
        ("/v1/models", None, None),
        ("/healthz", {"not": "a model"}, None),
    ],
)
def test_api_is_recognised_from_path_and_body(
    path: str, body: dict[str, Any] | None, api: str | None
) -> None:
    assert recognise_api(path, body) == api


def test_not_an_llm_call_has_no_llm_object() -> None:
    event = make_event("/v1/models", b"", [b"{}"], method="GET")

    assert describe_llm(event) is None
    assert event.to_dict()["llm"] is None


def test_usage_totals_are_computed_only_from_reported_counts() -> None:
    usage = normalise_usage("anthropic.messages", {"output_tokens": 5})

    assert usage["input_tokens"] is None
    assert usage["total_tokens"] is None


def test_llm_object_survives_the_json_round_trip_with_its_ttft() -> None:
    transcript = load("chat_tools")
    marks = [(end, 1.0 + i) for i, end in enumerate(transcript.chunk_ends)]
    event = make_event(
        transcript.path, transcript.request, transcript.chunks(), marks=marks
    )

    again = Event.from_json(event.to_json())

    assert again.to_dict()["llm"] == event.to_dict()["llm"]
    assert again.to_dict()["llm"]["ttft_ms"] is not None


# Through the real proxy, from a raw upstream that sends the recorded chunks.


async def replay_through_proxy(
    nursery: trio.Nursery, transcript: Transcript, chunks: Sequence[bytes]
) -> tuple[bytes, Event]:
    upstream = await serve_asgi(nursery, raw_upstream(chunks))
    config = ProxyConfig(listen="127.0.0.1:0", upstream_url=upstream)
    async with trio.open_nursery() as inner:
        handle: ServerHandle = await inner.start(serve, config)
        async with handle.bus.subscribe("test") as subscription:
            async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
                async with client.stream(
                    "POST", transcript.path, content=transcript.request
                ) as response:
                    received = b"".join([chunk async for chunk in response.aiter_raw()])
            event = await subscription.events().__anext__()
        handle.shutdown()
    return received, event


@pytest.mark.parametrize(
    ("name", "chunking"),
    [
        *[(name, "original") for name in MANIFEST],
        ("chat_tools", "single-bytes"),
        ("anthropic", "random-3"),
        ("responses", "crlf"),
    ],
)
async def test_replay_through_the_proxy_passes_bytes_and_gives_the_same_llm(
    nursery: trio.Nursery, name: str, chunking: str
) -> None:
    transcript = load(name)
    chunks = variants(transcript)[chunking]
    expected = llm_of(transcript, transcript.chunks())

    with trio.fail_after(HANG_GUARD_SECONDS):
        received, event = await replay_through_proxy(nursery, transcript, chunks)

    assert received == b"".join(chunks)
    llm = event.to_dict()["llm"]
    if len(event.response_chunk_marks) < MAX_CHUNK_MARKS:
        assert 0 < llm["ttft_ms"] <= event.duration_ms
    else:
        # The first content came after the chunks the middleware marks.
        assert llm["ttft_ms"] is None
    assert {**llm, "ttft_ms": None} == {**expected, "ttft_ms": None}


def test_json_answer_cut_by_the_capture_cap_is_unknown() -> None:
    event = make_event(
        "/v1/chat/completions",
        b'{"model": "gpt-4o"}',
        [b'{"id": "chatcmpl-1", "choices": [{"message": {"content": "Hel'],
        content_type=b"application/json",
        response_body_truncated=True,
    )

    llm = describe_llm(event)

    assert llm is not None
    assert llm["outcome_detail"]["outcome"] == "unknown"


_REFERENCES = {t.name: (t, llm_of(t, t.chunks())) for t in _all_transcripts()}


@given(
    name=st.sampled_from(sorted(_REFERENCES)),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=60),
    newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
)
def test_any_cut_of_any_transcript_with_any_line_ends_gives_the_same_llm(
    name: str, cuts: list[int], newline: bytes
) -> None:
    transcript, reference = _REFERENCES[name]
    body = transcript.body.replace(b"\n", newline)
    ends = sorted({min(cut, len(body)) for cut in cuts})

    chunks = [body[a:b] for a, b in zip([0, *ends], [*ends, len(body)], strict=True)]

    assert llm_of(transcript, chunks) == reference


# Realtime API sessions.

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_REALTIME_KEYS = st.sampled_from(
    ["type", "response", "usage", "output", "content", "session", "model", "error"]
)
_REALTIME_TYPES = st.sampled_from(
    ["response.done", "session.created", "session.updated", "error", "x"]
)


def realtime_session_event(server_messages: Sequence[str | bytes]) -> Event:
    messages = [
        WebSocketMessage(False, float(index), data, len(data))
        for index, data in enumerate(server_messages)
    ]
    return make_event(
        "/v1/realtime?model=gpt-realtime",
        b"",
        [],
        status=101,
        method="WEBSOCKET",
        request_headers=[],
        response_headers=[],
        websocket=WebSocketSession(messages=messages),
    )


@given(
    st.lists(
        st.dictionaries(_REALTIME_KEYS, _REALTIME_TYPES | _JSON, max_size=5)
        | _JSON
        | st.binary(max_size=8),
        max_size=6,
    )
)
def test_realtime_llm_object_survives_any_server_messages(
    server_messages: list[Any],
) -> None:
    # The json module writes what orjson refuses (huge integers, NaN): junk
    # an upstream could send too.
    encoded = [m if isinstance(m, bytes) else json.dumps(m) for m in server_messages]

    llm = describe_llm(realtime_session_event(encoded))

    assert llm is not None and llm["api"] == "realtime"
    assert llm["responses"] <= len(encoded)
    orjson.dumps(llm)


def test_realtime_usage_keeps_the_raw_sum_of_every_count() -> None:
    done = {
        "type": "response.done",
        "response": {
            "status": "incomplete",
            "status_details": {"type": "incomplete", "reason": "max_output_tokens"},
            "usage": {
                "total_tokens": 7,
                "input_tokens": 4,
                "output_tokens": 3,
                "input_token_details": {"cached_tokens": 2, "audio_tokens": 1},
            },
        },
    }
    event = realtime_session_event([orjson.dumps(done).decode()] * 2)

    llm = describe_llm(event)

    assert llm is not None
    assert llm["finish_reasons"] == ["max_output_tokens", "max_output_tokens"]
    assert llm["usage"] == {
        "input_tokens": 8,
        "output_tokens": 6,
        "total_tokens": 14,
        "reasoning_tokens": None,
        "cached_tokens": 4,
        "raw": {
            "total_tokens": 14,
            "input_tokens": 8,
            "output_tokens": 6,
            "input_token_details": {"cached_tokens": 4, "audio_tokens": 2},
        },
    }


def test_realtime_failed_response_is_an_in_band_error() -> None:
    failed = {
        "type": "response.done",
        "response": {
            "status": "failed",
            "status_details": {
                "type": "failed",
                "error": {
                    "type": "server_error",
                    "code": "boom",
                    "message": "it broke",
                },
            },
        },
    }
    event = realtime_session_event([orjson.dumps(failed).decode()])

    rendered = event.to_dict()

    assert rendered["llm"]["outcome_detail"]["outcome"] == "upstream_error"
    assert rendered["llm"]["outcome_detail"]["error_code"] == "boom"
    assert rendered["outcome"] == "upstream_error"


def test_realtime_function_calls_are_listed() -> None:
    done = {
        "type": "response.done",
        "response": {
            "status": "completed",
            "output": [
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "name": "get_weather",
                    "arguments": '{"city": "Oslo"}',
                }
            ],
        },
    }
    event = realtime_session_event([orjson.dumps(done).decode()])

    llm = describe_llm(event)

    assert llm is not None
    assert llm["tool_calls"] == [
        {
            "choice": 0,
            "index": 0,
            "id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Oslo"}',
        }
    ]


def test_realtime_usage_of_absurd_counts_still_writes_as_json() -> None:
    done = {
        "type": "response.done",
        "response": {"usage": {"total_tokens": 2**63 - 1, "input_tokens": -5}},
    }
    event = realtime_session_event([json.dumps(done)] * 2)

    line = event.to_json()

    usage = orjson.loads(line)["llm"]["usage"]
    assert usage["total_tokens"] is None
    assert usage["input_tokens"] is None
