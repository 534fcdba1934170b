"""Tests for the Event: its JSON form, body decoding and rendering rules.

Pure functions of an in-memory value: no sockets, no clock.
"""

from __future__ import annotations

import base64
import gzip
import re
import zlib
from typing import Any

import brotli  # type: ignore[import-untyped]  # ships no type hints
import orjson
import pytest
import zstandard
from events import make_event

from trio_llmproxy import Event, ProxyError
from trio_llmproxy._event import WebSocketMessage, WebSocketSession, WebSocketSide

SSE_TEXT = 'data: {"content": "héllo"}\n\ndata: [DONE]\n\n'


def streamed_event(**overrides: Any) -> Event:
    """A streamed chat completion with a query and non-ASCII text in its body."""
    fields: dict[str, Any] = {
        "query": "x=1",
        "response_headers": [(b"content-type", b"text/event-stream")],
        "response_body": SSE_TEXT.encode(),
        "streamed": True,
    }
    fields.update(overrides)
    return make_event(**fields)


def compressed_event(body: bytes, coding: str) -> Event:
    return make_event(
        response_headers=[
            (b"content-type", b"application/json"),
            (b"content-encoding", coding.encode()),
        ],
        response_body=body,
        response_body_content_encoding=coding,
    )


def test_json_round_trip_gives_back_an_equal_event() -> None:
    event = streamed_event(
        request_headers=[(b"authorization", b"Bearer [REDACTED]"), (b"a", b"1")],
        extra={"team": "search"},
    )

    again = Event.from_json(event.to_json())

    assert again == event
    assert again.to_json() == event.to_json()


def test_json_round_trip_keeps_a_base64_body() -> None:
    event = make_event(response_body=b"\xff\xfe\x00binary", response_body_size=9)

    again = Event.from_json(event.to_json())

    assert again.response_body == b"\xff\xfe\x00binary"


def test_to_json_is_one_line_with_every_fixed_field() -> None:
    line = streamed_event().to_json()

    assert b"\n" not in line
    # New fields may be added; these never go away or change name.
    assert set(orjson.loads(line)) >= {
        "schema_version",
        "event_id",
        "request_id",
        "timestamp",
        "method",
        "path",
        "query",
        "status",
        "duration_ms",
        "ttfb_ms",
        "request_headers",
        "response_headers",
        "request_body",
        "request_body_encoding",
        "request_body_size",
        "request_body_truncated",
        "response_body",
        "response_body_encoding",
        "response_body_size",
        "response_body_truncated",
        "streamed",
        "outcome",
        "error",
    }


def test_from_json_refuses_a_line_that_is_not_an_event() -> None:
    with pytest.raises(ProxyError, match="not an event"):
        Event.from_json(b'{"event_id": "e1"}')


@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),
        ("br", brotli.compress),
        ("zstd", zstandard.ZstdCompressor().compress),
    ],
    ids=["gzip", "deflate", "raw-deflate", "br", "zstd"],
)
def test_compressed_response_body_is_decoded(coding: str, compress: Any) -> None:
    text = '{"choices": [{"message": {"content": "héllo"}}]}' * 20
    event = compressed_event(compress(text.encode()), coding)

    rendered = event.to_dict()

    assert rendered["response_body"] == text
    assert rendered["response_body_encoding"] == "utf-8"


def test_stacked_content_codings_are_undone_in_reverse_order() -> None:
    body = zlib.compress(gzip.compress(b"plain text"))
    event = compressed_event(body, "gzip, deflate")

    assert event.to_dict()["response_body"] == "plain text"


def test_corrupt_gzip_body_is_kept_as_base64() -> None:
    corrupt = b"\x1f\x8b\x08\x00garbage that is not deflate data"
    event = compressed_event(corrupt, "gzip")

    rendered = event.to_dict()

    assert rendered["response_body_encoding"] == "base64"
    assert base64.b64decode(rendered["response_body"]) == corrupt


def test_unknown_content_coding_is_kept_as_base64() -> None:
    event = compressed_event(b"compressed somehow", "x-custom")

    rendered = event.to_dict()

    assert rendered["response_body_encoding"] == "base64"
    assert base64.b64decode(rendered["response_body"]) == b"compressed somehow"


def test_non_utf8_body_is_base64() -> None:
    body = b"caf\xe9 \x80\x81"
    event = make_event(
        response_headers=[(b"content-type", b"text/plain")],
        response_body=body,
        response_body_size=len(body),
    )

    rendered = event.to_dict()

    assert rendered["response_body_encoding"] == "base64"
    assert base64.b64decode(rendered["response_body"]) == body


def test_binary_content_type_is_base64_even_when_valid_utf8() -> None:
    event = make_event(
        response_headers=[(b"content-type", b"audio/mpeg")],
        response_body=b"ID3 looks like text",
        response_body_size=19,
    )

    assert event.to_dict()["response_body_encoding"] == "base64"


def test_truncated_body_cut_inside_a_character_renders_as_text() -> None:
    full = "naïve €uro".encode()
    cut = full[: full.index("€".encode()) + 1]  # one byte of a three-byte char
    event = make_event(
        response_body=cut, response_body_size=len(full), response_body_truncated=True
    )

    rendered = event.to_dict()

    assert rendered["response_body_encoding"] == "utf-8"
    assert rendered["response_body"] == "naïve "
    assert rendered["response_body_truncated"] is True


def test_empty_bodies_are_null() -> None:
    event = make_event(
        request_body=b"", request_body_size=0, response_body=b"", response_body_size=0
    )

    rendered = event.to_dict()

    assert rendered["request_body"] is None
    assert rendered["response_body"] is None


def test_timestamp_is_rfc3339_utc_with_microseconds() -> None:
    event = make_event(timestamp=1_700_000_000.123456)

    timestamp = event.to_dict()["timestamp"]

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", timestamp)
    assert timestamp.startswith("2023-11-14T22:13:20.1234")


def test_headers_render_as_lower_case_names_with_lists_of_values() -> None:
    event = make_event(
        response_headers=[
            (b"Set-Cookie", b"[REDACTED]"),
            (b"content-type", b"text/plain"),
            (b"set-cookie", b"[REDACTED]"),
        ]
    )

    headers = event.to_dict()["response_headers"]

    assert headers == {
        "set-cookie": ["[REDACTED]", "[REDACTED]"],
        "content-type": ["text/plain"],
    }


def test_extra_fields_appear_in_the_json() -> None:
    event = make_event(extra={"team": "search", "cost_usd": 0.25})

    rendered = orjson.loads(event.to_json())

    assert rendered["team"] == "search"
    assert rendered["cost_usd"] == 0.25


def test_extra_fields_cannot_replace_fixed_ones() -> None:
    event = make_event(extra={"status": 999})

    assert event.to_dict()["status"] == 200


# WebSocket sessions.


def websocket_event(**overrides: Any) -> Event:
    session = WebSocketSession(
        subprotocol="realtime",
        closed_by="client",
        client=WebSocketSide(messages=2, bytes=9, close_code=1000, close_reason="bye"),
        upstream=WebSocketSide(messages=1, bytes=3),
        messages=[
            WebSocketMessage(True, 1.5, "héllo", 6),
            WebSocketMessage(False, 2.25, b"\x00\xff\x01", 3),
            WebSocketMessage(True, 3.0, "abc", 3),
        ],
    )
    fields: dict[str, Any] = {
        "method": "WEBSOCKET",
        "path": "/v1/realtime",
        "status": 101,
        "request_body": b"",
        "response_headers": [],
        "response_body": b"",
        "streamed": True,
        "websocket": session,
    }
    fields.update(overrides)
    return make_event(**fields)


def test_websocket_session_renders_as_its_own_object() -> None:
    rendered = websocket_event().to_dict()

    assert rendered["websocket"] == {
        "subprotocol": "realtime",
        "closed_by": "client",
        "proxy_close_code": None,
        "proxy_close_reason": None,
        "client": {
            "messages": 2,
            "bytes": 9,
            "close_code": 1000,
            "close_reason": "bye",
        },
        "upstream": {
            "messages": 1,
            "bytes": 3,
            "close_code": None,
            "close_reason": None,
        },
        "messages": [
            {
                "from": "client",
                "at_ms": 1.5,
                "type": "text",
                "data": "héllo",
                "size": 6,
            },
            {
                "from": "upstream",
                "at_ms": 2.25,
                "type": "binary",
                "data": base64.b64encode(b"\x00\xff\x01").decode(),
                "size": 3,
            },
            {"from": "client", "at_ms": 3.0, "type": "text", "data": "abc", "size": 3},
        ],
        "messages_truncated": False,
    }
    assert (rendered["request_body"], rendered["response_body"]) == (None, None)


def test_websocket_event_round_trips_to_an_equal_event() -> None:
    event = websocket_event()

    again = Event.from_json(event.to_json())

    assert again == event
    assert again.to_json() == event.to_json()


def test_http_event_json_has_no_websocket_key() -> None:
    rendered = streamed_event().to_dict()

    assert "websocket" not in rendered
    assert Event.from_dict(rendered).websocket is None


def test_extra_field_cannot_pose_as_a_websocket_object() -> None:
    event = make_event(extra={"websocket": {"closed_by": "nobody"}})

    assert "websocket" not in event.to_dict()
