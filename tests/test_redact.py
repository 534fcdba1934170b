"""Tests for the redaction of secrets in headers, URLs and reprs.

Mostly pure functions; one test runs the proxy in-process on loopback to
check that extra secret header names reach the event log redacted.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest
import trio

from trio_llmproxy import ConfigError, ProxyConfig, serve
from trio_llmproxy._redact import (
    redact_headers,
    redact_query,
    redact_subprotocol,
    redact_url,
    redact_value,
    secret_header_names,
)

KEY = "sk-canary-0123456789abcdefWXYZ"
DEFAULT_NAMES = secret_header_names()


@pytest.mark.parametrize(
    ("name", "value", "redacted"),
    [
        (b"authorization", f"Bearer {KEY}", b"Bearer [REDACTED]...WXYZ"),
        (b"authorization", f"bearer {KEY}", b"bearer [REDACTED]...WXYZ"),
        (b"proxy-authorization", f"Bearer {KEY}", b"Bearer [REDACTED]...WXYZ"),
        (b"x-api-key", KEY, b"[REDACTED]...WXYZ"),
        (b"api-key", KEY, b"[REDACTED]...WXYZ"),
        (b"authorization", "Bearer abcdefghijkl1234", b"Bearer [REDACTED]...1234"),
        (b"authorization", "Bearer tiny", b"Bearer [REDACTED]"),
        (b"x-api-key", "abc", b"[REDACTED]"),
        (b"authorization", "Basic dXNlcjpwYXNzd29yZDEyMzQ1Njc4", b"Basic [REDACTED]"),
        (b"authorization", f"Token {KEY}", b"Token [REDACTED]"),
        (b"cookie", f"session={KEY}; theme=dark", b"[REDACTED]"),
        (b"set-cookie", f"session={KEY}; Path=/; HttpOnly", b"[REDACTED]"),
    ],
    ids=[
        "bearer",
        "bearer-lower-case",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "bearer-at-the-minimum-length",
        "short-bearer-shows-nothing",
        "short-key-shows-nothing",
        "basic-shows-nothing",
        "unknown-scheme-shows-nothing",
        "cookie",
        "set-cookie",
    ],
)
def test_secret_value_is_redacted(name: bytes, value: str, redacted: bytes) -> None:
    assert redact_value(name, value.encode()) == redacted


def test_redact_headers_keeps_other_headers_order_and_repeats() -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"set-cookie", b"a=1"),
        (b"authorization", f"Bearer {KEY}".encode()),
        (b"set-cookie", b"b=2"),
        (b"x-request-id", b"r1"),
    ]

    redacted = redact_headers(headers, DEFAULT_NAMES)

    assert redacted == [
        (b"content-type", b"application/json"),
        (b"set-cookie", b"[REDACTED]"),
        (b"authorization", b"Bearer [REDACTED]...WXYZ"),
        (b"set-cookie", b"[REDACTED]"),
        (b"x-request-id", b"r1"),
    ]


def test_extra_secret_header_names_are_normalised() -> None:
    names = secret_header_names([" X-Goog-Api-Key ", "", "OpenAI-Organization"])

    assert b"x-goog-api-key" in names
    assert b"openai-organization" in names
    assert b"" not in names
    assert DEFAULT_NAMES <= names


def test_default_secret_header_names() -> None:
    assert DEFAULT_NAMES == {
        b"authorization",
        b"proxy-authorization",
        b"api-key",
        b"x-api-key",
        b"cookie",
        b"set-cookie",
    }


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@db:6379/0", "redis://:***@db:6379/0"),
        ("redis://user:hunter2@db/1", "redis://user:***@db/1"),
        ("rediss://db.example:6380/2", "rediss://db.example:6380/2"),
        ("http://127.0.0.1:9000/base", "http://127.0.0.1:9000/base"),
    ],
)
def test_url_password_is_hidden(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_config_repr_hides_the_redis_password() -> None:
    config = ProxyConfig(redis_url="redis://:hunter2@db:6379/0")

    assert "hunter2" not in repr(config)


async def test_extra_secret_header_is_redacted_in_the_event_log(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    config = ProxyConfig(
        listen="127.0.0.1:0",
        upstream_url=mock_upstream_url,
        file_event_log=tmp_path / "e.jsonl",
        secret_headers=["X-Tenant-Token"],
        shutdown_timeout=5,
    )
    secrets = {
        "Authorization": f"Bearer {KEY}",
        "X-Api-Key": KEY,
        "Cookie": f"session={KEY}",
        "X-Tenant-Token": KEY,
    }

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve, config)
            async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
                response = await client.get("/v1/models", headers=secrets)
            handle.shutdown()

    assert response.status_code == 200
    text = (tmp_path / "e.jsonl").read_text()
    assert KEY not in text
    headers = orjson.loads(text)["request_headers"]
    assert headers["x-tenant-token"] == ["[REDACTED]"]
    assert headers["x-api-key"] == ["[REDACTED]...WXYZ"]
    assert headers["cookie"] == ["[REDACTED]"]


def test_upstream_with_a_password_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as raised:
        ProxyConfig(upstream_url="https://gateway:hunter2@llm.example")

    assert "credentials" in str(raised.value)
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize(
    ("query", "redacted"),
    [
        (f"api_key={KEY}", "api_key=[REDACTED]...WXYZ"),
        (f"model=m&key={KEY}&n=1", "model=m&key=[REDACTED]...WXYZ&n=1"),
        (f"Access_Token={KEY}", "Access_Token=[REDACTED]...WXYZ"),
        (f"api%2Dkey={KEY}", "api%2Dkey=[REDACTED]...WXYZ"),
        ("token=short", "token=[REDACTED]"),
        ("token=&key", "token=&key"),
        ("monkey=1&keys=2&x=%ff;y", "monkey=1&keys=2&x=%ff;y"),
        ("", ""),
    ],
)
def test_secret_query_parameters_are_redacted_and_the_rest_kept(
    query: str, redacted: str
) -> None:
    assert redact_query(query) == redacted


@pytest.mark.parametrize(
    ("value", "redacted"),
    [
        (
            f"realtime, openai-insecure-api-key.{KEY}, openai-beta.realtime-v1",
            "realtime, openai-insecure-api-key.[REDACTED]...WXYZ, "
            "openai-beta.realtime-v1",
        ),
        ("openai-insecure-api-key.sk-SECRET", "openai-insecure-api-key.[REDACTED]"),
        ("realtime", "realtime"),
    ],
)
def test_keys_offered_as_subprotocols_are_redacted(value: str, redacted: str) -> None:
    headers = [(b"sec-websocket-protocol", value.encode())]

    assert redact_headers(headers, DEFAULT_NAMES) == [
        (b"sec-websocket-protocol", redacted.encode())
    ]


def test_chosen_key_subprotocol_is_redacted() -> None:
    assert redact_subprotocol(f"openai-insecure-api-key.{KEY}") == (
        "openai-insecure-api-key.[REDACTED]...WXYZ"
    )
