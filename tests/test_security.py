"""Secrets stay secret and the upstream host stays fixed, whatever happens.

A canary secret rides in every header that carries one (Authorization,
api-key, x-api-key, Cookie, and a header configured with --secret-header),
and in the upstream's Set-Cookie. Along every path an exchange can take
(answered, 502, 504, 413, 408, 400, cut mid-stream, client gone), the canary
must reach neither the event, nor a log line at DEBUG level, nor an error
message the client reads. Only the last four characters of a key may show.

The open-proxy attempts extend tests/test_proxy.py's: whatever the request
line, Host or X-Forwarded-Host say, the request reaches the configured
upstream, under its base path, or is refused with 400.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
from test_proxy import (
    HANG_GUARD_SECONDS,
    chunked_head,
    free_port,
    json_response,
    open_proxy,
)
from upstreams import (
    LAST_CHUNK,
    Exchange,
    RawUpstream,
    chunk,
    http_request,
    open_raw_client,
    raw_exchange,
    reply,
)

from trio_llmproxy._config import ProxyConfig
from trio_llmproxy._server import ServerHandle, serve

CANARY = "sk-canary-0a1b2c3d4e5f60718293TAIL"
# What must never show: the canary without the four characters a key may keep.
CANARY_CORE = CANARY[:-4]
SECRET_HEADER = "X-Tenant-Token"


def canary_headers() -> list[tuple[str, str]]:
    return [
        ("Host", "proxy"),
        ("Authorization", f"Bearer {CANARY}"),
        ("api-key", CANARY),
        ("x-api-key", CANARY),
        ("Cookie", f"session={CANARY}; theme=dark"),
        (SECRET_HEADER, CANARY),
        ("Content-Type", "application/json"),
    ]


def _request(body: bytes = b'{"model": "m"}', *extra: tuple[str, str]) -> bytes:
    headers = [*canary_headers(), *extra, ("Content-Length", str(len(body)))]
    return http_request("POST", "/v1/chat/completions", headers, body)


def _stalled_request() -> bytes:
    """A request whose body stops after its first byte of a hundred."""
    headers = [*canary_headers(), ("Content-Length", "100")]
    return http_request("POST", "/v1/chat/completions", headers, b"{")


async def _never_answer(exchange: Exchange) -> None:
    await exchange.read_body()
    await trio.sleep_forever()


async def _break_off(exchange: Exchange) -> None:
    await exchange.read_body()
    await exchange.send(chunked_head() + chunk(b"data: 1\n\n"))
    await exchange.close()


async def _stream_forever(exchange: Exchange) -> None:
    await exchange.read_body()
    await exchange.send(chunked_head() + chunk(b"data: 1\n\n"))
    await exchange.wait_for_close()


_ANSWER = json_response(
    headers=(("Set-Cookie", f"sid={CANARY}; HttpOnly"), (SECRET_HEADER, CANARY))
)


@attrs.frozen
class ExchangePath:
    """One way an exchange can go, and what the client sees of it."""

    responder: Callable[[Exchange], Awaitable[None]] | None
    request: bytes
    settings: dict[str, Any] = attrs.field(factory=dict)
    disconnect_after_head: bool = False
    status: int | None = None


PATHS = {
    "answered": ExchangePath(reply(_ANSWER), _request(), status=200),
    "upstream unreachable (502)": ExchangePath(None, _request(), status=502),
    "upstream silent (504)": ExchangePath(
        _never_answer, _request(), {"read_timeout": 0.3}, status=504
    ),
    "body too large (413)": ExchangePath(
        reply(_ANSWER), _request(b"x" * 100), {"max_request_bytes": 10}, status=413
    ),
    "body stalled (408)": ExchangePath(
        reply(_ANSWER), _stalled_request(), {"client_timeout": 0.3}, status=408
    ),
    "dot segments (400)": ExchangePath(
        reply(_ANSWER),
        http_request("GET", "/v1/%2e%2e/admin", canary_headers()),
        status=400,
    ),
    "upstream dies mid-stream": ExchangePath(_break_off, _request(), status=200),
    "client leaves mid-stream": ExchangePath(
        _stream_forever, _request(), disconnect_after_head=True
    ),
}


def _log_text(caplog: pytest.LogCaptureFixture) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)


@pytest.mark.parametrize("path", list(PATHS.values()), ids=list(PATHS))
async def test_canary_secret_reaches_no_event_log_line_or_error_message(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, path: ExchangePath
) -> None:
    caplog.set_level(logging.DEBUG)
    # As the CLI sets them: httpx and httpcore print raw headers at DEBUG.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.INFO)
    if path.responder is None:
        upstream_url = f"http://127.0.0.1:{free_port()}"
    else:
        upstream_url = await RawUpstream(path.responder).start(nursery)
    settings = {"secret_headers": [SECRET_HEADER], **path.settings}

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_proxy(nursery, upstream_url, **settings) as proxy:
            async with open_raw_client(proxy.url) as client:
                await client.send(path.request)
                if path.disconnect_after_head:
                    await client.read_head()
                    response = None
                else:
                    response = await client.read_response()
            event = await proxy.next_event()
            line = event.to_json()

    if response is not None:
        assert response.head.status == path.status
        if response.head.status >= 400:
            assert CANARY_CORE not in response.body.decode("latin-1")
    assert CANARY_CORE not in line.decode()
    assert CANARY_CORE not in _log_text(caplog)
    assert CANARY_CORE not in repr(event)
    headers = orjson.loads(line)["request_headers"]
    assert headers["authorization"] == ["Bearer [REDACTED]...TAIL"]
    assert headers["cookie"] == ["[REDACTED]"]
    assert headers[SECRET_HEADER.lower()] == ["[REDACTED]"]


async def test_event_log_is_created_readable_by_its_owner_only(
    nursery: trio.Nursery, mock_upstream_url: str, tmp_path: Path
) -> None:
    event_log = tmp_path / "new" / "events.jsonl"
    config = ProxyConfig(
        listen="127.0.0.1:0",
        upstream_url=mock_upstream_url,
        file_event_log=event_log,
        shutdown_timeout=5,
    )
    # Even a process whose umask lets everyone read what it creates.
    previous = os.umask(0)
    try:
        with trio.fail_after(HANG_GUARD_SECONDS):
            async with trio.open_nursery() as server_nursery:
                handle: ServerHandle = await server_nursery.start(serve, config)
                await raw_exchange(
                    handle.addresses[0],
                    http_request("GET", "/v1/models", [("Host", "p")]),
                )
                handle.shutdown()
    finally:
        os.umask(previous)

    assert stat.S_IMODE(event_log.stat().st_mode) == 0o600
    assert len(event_log.read_bytes().splitlines()) == 1


# --- Open-proxy attempts --------------------------------------------------------

OPEN_PROXY_ATTEMPTS = {
    "absolute-form with userinfo": (
        "http://user:pw@evil.example/v1/models",
        [],
        b"/base/v1/models",
    ),
    "absolute-form https with port": (
        "https://evil.example:8443/v1/models",
        [],
        b"/base/v1/models",
    ),
    "absolute-form and forged Host": (
        "http://evil.example/v1/models",
        [("X-Forwarded-Host", "evil.example"), ("Forwarded", "host=evil.example")],
        b"/base/v1/models",
    ),
    "double slash": ("//evil.example/v1/models", [], b"/base//evil.example/v1/models"),
    "triple slash": ("///evil.example/v1", [], b"/base///evil.example/v1"),
    "encoded slash, no dots": ("/v1%2Fmodels", [], b"/base/v1%2Fmodels"),
    "X-Forwarded-Proto and Port": (
        "/v1/models",
        [("X-Forwarded-Proto", "https"), ("X-Forwarded-Port", "443")],
        b"/base/v1/models",
    ),
}


@pytest.mark.parametrize(
    ("target", "extra_headers", "upstream_target"),
    list(OPEN_PROXY_ATTEMPTS.values()),
    ids=list(OPEN_PROXY_ATTEMPTS),
)
async def test_open_proxy_attempt_still_reaches_the_configured_upstream(
    nursery: trio.Nursery,
    target: str,
    extra_headers: list[tuple[str, str]],
    upstream_target: bytes,
) -> None:
    upstream = RawUpstream(reply(json_response()))
    upstream_url = await upstream.start(nursery)
    headers = [("Host", "evil.example"), *extra_headers]

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_proxy(nursery, upstream_url + "/base") as proxy:
            response = await raw_exchange(
                proxy.url, http_request("GET", target, headers)
            )

    received = upstream.only_request.head
    assert response.head.status == 200
    assert received.target == upstream_target
    assert received.values("host") == [upstream_url.removeprefix("http://").encode()]


@pytest.mark.parametrize(
    "target",
    [
        "/v1/..%2Fadmin",
        "/v1%2F..%2F..%2Fadmin",
        "/v1/%2e%2e%2fadmin",
        "/v1/..\\admin",
        "/v1/.%2e/admin",
        "http://evil.example/v1/../admin",
        "/v1/%2E%2E%2F%2E%2E%2Fadmin",
    ],
)
async def test_dot_segments_behind_encoded_slashes_get_400(
    nursery: trio.Nursery, target: str
) -> None:
    upstream = RawUpstream(reply(json_response()))
    upstream_url = await upstream.start(nursery)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_proxy(nursery, upstream_url + "/base") as proxy:
            response = await raw_exchange(
                proxy.url, http_request("GET", target, [("Host", "p")])
            )
            event = await proxy.next_event()

    assert response.head.status == 400
    assert orjson.loads(response.body)["error"]["code"] == "bad_request"
    assert upstream.requests == []
    assert event.status == 400


async def test_connect_and_chunked_smuggling_never_reach_another_host(
    nursery: trio.Nursery,
) -> None:
    upstream = RawUpstream(reply(json_response()))
    upstream_url = await upstream.start(nursery)
    # A second request hidden in a body that a length-framing upstream would
    # read as two: the proxy forwards it as one chunked body.
    smuggled = b"GET /admin HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    request = (
        b"POST /v1/x HTTP/1.1\r\nHost: p\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunk(smuggled) + LAST_CHUNK
    )

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_proxy(nursery, upstream_url) as proxy:
            connect = await raw_exchange(
                proxy.url,
                http_request(
                    "CONNECT", "evil.example:443", [("Host", "evil.example:443")]
                ),
            )
            response = await raw_exchange(proxy.url, request)

    assert connect.head.status == 400
    assert response.head.status == 200
    received = upstream.only_request
    assert received.head.target == b"/v1/x"
    assert bytes(received.body) == smuggled


@pytest.mark.parametrize("name", ["api_key", "key", "api-key", "access_token", "token"])
async def test_key_in_the_query_is_redacted_in_the_event_but_forwarded(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream = RawUpstream(reply(json_response()))
    upstream_url = await upstream.start(nursery)
    target = f"/v1/models?limit=5&{name}={CANARY}&x=%2F1"

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_proxy(nursery, upstream_url) as proxy:
            response = await raw_exchange(
                proxy.url, http_request("GET", target, [("Host", "proxy")])
            )
            event = await proxy.next_event()

    assert response.head.status == 200
    assert upstream.only_request.head.target == target.encode()
    assert event.query == f"limit=5&{name}=[REDACTED]...TAIL&x=%2F1"
    assert CANARY_CORE not in event.to_json().decode()
    assert CANARY_CORE not in caplog.text
