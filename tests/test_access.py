"""Tests for the access log lines: what an operator reads for each exchange.

Lines are built from events made by hand, and once from a real session
through the proxy on loopback, under a hang guard.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
from events import make_event
from ws_client import open_client

from trio_llmproxy import Event, ProxyConfig, ServerHandle, serve
from trio_llmproxy._access import log_access
from trio_llmproxy._event import WebSocketSession, WebSocketSide

HANG_GUARD_SECONDS = 10
ACCESS_LOGGER = "trio_llmproxy.access"


def session_event(**session: Any) -> Event:
    return make_event(
        method="WEBSOCKET",
        path="/v1/realtime",
        status=101,
        request_body=b"",
        response_body=b"",
        streamed=True,
        websocket=WebSocketSession(**session),
    )


def access_line(caplog: pytest.LogCaptureFixture, event: Event) -> str:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    log_access(event)
    (record,) = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    return record.getMessage()


def test_http_line_gives_status_outcome_and_body_sizes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    event = make_event(request_body=b"x" * 14, response_body=b"y" * 300)

    line = access_line(caplog, event)

    assert line.startswith("'r1' POST '/v1/chat/completions' 200 ok in=14B out=300B")


def test_session_line_gives_messages_and_bytes_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    event = session_event(
        client=WebSocketSide(messages=2, bytes=90),
        upstream=WebSocketSide(messages=12, bytes=4_000),
    )

    line = access_line(caplog, event)

    assert line.startswith("'r1' WEBSOCKET '/v1/realtime' 101 ok ")
    assert " client=2msg/90B upstream=12msg/4000B " in line
    assert "in=" not in line and "out=" not in line


def test_session_line_names_who_closed_first_and_the_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    event = session_event(
        closed_by="upstream",
        client=WebSocketSide(close_code=1000),
        upstream=WebSocketSide(close_code=1011, close_reason="boom"),
    )

    line = access_line(caplog, event)

    assert " closed=upstream:1011 " in line


def test_session_line_of_a_session_nobody_closed_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    line = access_line(caplog, session_event())

    assert " closed=- " in line


def test_refused_handshake_line_is_an_http_line_with_the_answer_size(
    caplog: pytest.LogCaptureFixture,
) -> None:
    event = make_event(
        method="WEBSOCKET",
        path="/v1/nowhere",
        status=403,
        request_body=b"",
        response_body=b"",
        response_body_size=0,
        outcome="upstream_error",
        error="handshake refused with status 403",
        websocket=WebSocketSession(),
    )

    line = access_line(caplog, event)

    assert line.startswith("'r1' WEBSOCKET '/v1/nowhere' 403 upstream_error in=0B")
    assert "closed=" not in line


def test_session_closed_by_the_proxy_names_the_proxy_and_its_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    event = session_event(
        closed_by="proxy",
        proxy_close_code=1001,
        proxy_close_reason="going away",
        upstream=WebSocketSide(messages=1, bytes=10),
    )

    line = access_line(caplog, event)

    assert " closed=proxy:1001 " in line


async def test_session_through_the_proxy_logs_its_messages_and_close(
    mock_upstream_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    config = ProxyConfig(listen="127.0.0.1:0", upstream_url=mock_upstream_url)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle: ServerHandle = await nursery.start(serve, config)
            async with handle.bus.subscribe("test") as subscription:
                url = handle.addresses[0].replace("http://", "ws://") + "/v1/realtime"
                async with open_client(url) as session:
                    await session.get_message()  # session.created
                    await session.send_message('{"type": "nonsense"}')
                    await session.get_message()  # the error event
                    await session.aclose(1000)
                (event,) = await subscription.receive_batch()
            handle.shutdown()

    (line,) = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert event.websocket is not None
    client, upstream = event.websocket.client, event.websocket.upstream
    assert " WEBSOCKET '/v1/realtime' 101 " in line
    # One message of 20 bytes from the client; two events from the upstream.
    assert f" client=1msg/20B upstream=2msg/{upstream.bytes}B " in line
    # Hypercorn reports a client's close as 1006 whatever code it sent.
    assert f" closed=client:{client.close_code} " in line
