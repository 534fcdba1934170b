"""Tests for the WebSocket relay: sessions proxied to a Realtime-like upstream.

Every test runs a real trio-websocket client (see ``ws_client``) through the
proxy, served by Hypercorn on a loopback port, to the local upstream of
``realtime_upstream``.
Each test has a hang guard; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import logging
import shutil
import ssl
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from conftest import serve_asgi
from realtime_upstream import (
    AUDIO_FRAMES,
    REFUSAL_BODY,
    USAGE,
    RealtimeUpstream,
    accept_token,
    serve_hostile_upstream,
    serve_realtime_upstream,
    switching_protocols,
)
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
)
from ws_client import open_client

from trio_llmproxy import (
    Event,
    InMemoryEventBus,
    ProxyConfig,
    ServerHandle,
    create_app,
    serve,
)
from trio_llmproxy._mock_upstream import MockUpstreamSettings, create_mock_upstream_app

HANG_GUARD_SECONDS = 10
ONE_MEGABYTE = 1024 * 1024
KEY = "sk-proj-abcdefghijklmnopWXYZ"


def _ws_url(http_url: str, path: str) -> str:
    return "ws" + http_url.removeprefix("http") + path


def _json(message: str | bytes) -> Any:
    assert isinstance(message, str), f"expected a text message, got {message!r:.60}"
    return orjson.loads(message)


async def _send_json(ws: WebSocketConnection, event: dict[str, Any]) -> None:
    await ws.send_message(orjson.dumps(event).decode())


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> RealtimeUpstream:
    return await serve_realtime_upstream(nursery)


@pytest.fixture
async def proxy(nursery: trio.Nursery, upstream: RealtimeUpstream) -> ServerHandle:
    """The proxy, run by serve() as the CLI runs it, in front of ``upstream``."""
    config = ProxyConfig(listen="127.0.0.1:0", upstream_url=upstream.url)
    handle: ServerHandle = await nursery.start(partial(serve, config))
    return handle


def _open(
    proxy: ServerHandle, path: str = "/v1/realtime?model=gpt-realtime", **kwargs: Any
) -> Any:
    return open_client(_ws_url(proxy.addresses[0], path), **kwargs)


async def test_session_relays_text_and_binary_both_ways_in_order(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    sent: list[str | bytes] = [
        orjson.dumps(
            {"type": "session.update", "session": {"voice": "alloy"}}
        ).decode(),
        b"\x00\x01 audio \xff",
        orjson.dumps({"type": "test.echo", "text": "h\u00e9llo \u2603"}).decode(),
        orjson.dumps({"type": "response.create"}).decode(),
    ]

    async with _open(proxy) as ws:
        for message in sent:
            await ws.send_message(message)
        got = [await ws.get_message() for _ in range(8)]

    assert upstream.sessions[0].received == sent
    assert _json(got[0])["type"] == "session.created"
    assert _json(got[1])["type"] == "session.updated"
    assert got[2] == sent[1]
    assert got[3] == sent[2]
    assert _json(got[4])["type"] == "response.created"
    assert tuple(got[5:7]) == AUDIO_FRAMES
    done = _json(got[7])
    assert done["type"] == "response.done"
    assert done["response"]["usage"] == USAGE


async def test_one_megabyte_binary_frame_passes_both_ways(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    frame = bytes(i % 253 for i in range(ONE_MEGABYTE))

    async with _open(proxy) as ws:
        await ws.get_message()
        await ws.send_message(frame)
        echoed = await ws.get_message()
        await _send_json(ws, {"type": "test.binary", "size": ONE_MEGABYTE})
        generated = await ws.get_message()

    assert upstream.sessions[0].received[0] == frame
    assert echoed == frame
    assert generated == bytes(i % 251 for i in range(ONE_MEGABYTE))


async def test_sixteen_mebibyte_message_passes_both_ways(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    # Hypercorn's and the relay's limit, exactly.
    message = b"\x5a" * (16 * ONE_MEGABYTE)

    async with _open(proxy) as ws:
        await ws.get_message()
        await ws.send_message(message)
        echoed = await ws.get_message()

    assert echoed == message


async def test_upstream_picks_one_of_the_offered_subprotocols(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    offered = ["openai-insecure-api-key.sk-test", "openai-beta.realtime-v1"]

    async with _open(proxy, subprotocols=offered) as ws:
        chosen = ws.subprotocol

    assert chosen == "openai-beta.realtime-v1"
    assert upstream.sessions[0].subprotocol == "openai-beta.realtime-v1"


async def test_client_gets_the_upstreams_handshake_refusal(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    with pytest.raises(ConnectionRejected) as refused:
        async with _open(proxy, "/v1/realtime?refuse=401"):
            pass

    assert refused.value.status_code == 401
    assert refused.value.body == REFUSAL_BODY
    assert (b"x-refusal", b"yes") in refused.value.headers


async def test_unreachable_upstream_gives_502_with_a_json_error(
    nursery: trio.Nursery,
) -> None:
    with trio.socket.socket() as sock:
        # A port that was free a moment ago: nothing listens on it.
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = ProxyConfig(listen="127.0.0.1:0", upstream_url=f"http://127.0.0.1:{port}")
    handle: ServerHandle = await nursery.start(partial(serve, config))

    with pytest.raises(ConnectionRejected) as refused:
        async with _open(handle):
            pass

    assert refused.value.status_code == 502
    assert refused.value.body is not None
    error = orjson.loads(refused.value.body)["error"]
    assert error["type"] == "proxy_error"
    assert error["code"] == "upstream_unreachable"


async def test_silent_upstream_gives_504_after_the_connect_timeout(
    nursery: trio.Nursery,
) -> None:
    # The kernel completes the TCP connection; nothing ever answers it.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    config = ProxyConfig(
        listen="127.0.0.1:0",
        upstream_url=f"http://127.0.0.1:{port}",
        connect_timeout=0.5,
    )
    handle: ServerHandle = await nursery.start(partial(serve, config))
    started = trio.current_time()

    try:
        with pytest.raises(ConnectionRejected) as refused:
            async with _open(handle):
                pass
    finally:
        await listeners[0].aclose()

    assert refused.value.status_code == 504
    assert refused.value.body is not None
    assert orjson.loads(refused.value.body)["error"]["code"] == "upstream_timeout"
    assert trio.current_time() - started < 2


async def test_client_closing_closes_the_upstream_within_a_second(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    async with _open(proxy) as ws:
        await ws.get_message()
        await ws.aclose(4000, "user hung up")
        closed_at = trio.current_time()

    session = upstream.sessions[0]
    with trio.fail_after(1):
        await session.closed.wait()
    assert session.closed_at is not None
    assert session.closed_at - closed_at < 1.0
    # Hypercorn reports every close by the client as 1006 (see
    # docs/websocket.md), which the relay passes on as 1001.
    assert session.close_code == 1001


async def test_upstream_closing_with_1011_gives_the_client_1011_and_reason(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    async with _open(proxy) as ws:
        await ws.get_message()
        await _send_json(ws, {"type": "test.close", "code": 1011, "reason": "boom"})
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()

    assert closed.value.reason is not None
    assert closed.value.reason.code == 1011
    assert closed.value.reason.reason == "boom"


async def test_messages_sent_before_the_upstream_closes_reach_the_client(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    async with _open(proxy) as ws:
        await ws.get_message()
        await _send_json(ws, {"type": "response.create"})
        await _send_json(ws, {"type": "test.close", "code": 1000, "reason": "done"})
        got = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                got.append(await ws.get_message())

    assert len(got) == 4
    assert _json(got[-1])["type"] == "response.done"
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1000


async def test_shutdown_closes_open_sessions_with_1001_at_once(
    nursery: trio.Nursery, upstream: RealtimeUpstream
) -> None:
    config = ProxyConfig(
        listen="127.0.0.1:0", upstream_url=upstream.url, shutdown_timeout=30
    )
    stopped = trio.Event()

    async def run_proxy(task_status: trio.TaskStatus[ServerHandle]) -> None:
        await serve(config, task_status=task_status)
        stopped.set()

    handle: ServerHandle = await nursery.start(run_proxy)
    async with _open(handle) as first, _open(handle) as second:
        await first.get_message()
        await second.get_message()
        started = trio.current_time()
        handle.shutdown()
        codes = []
        for ws in (first, second):
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None
            codes.append(closed.value.reason.code)
        with trio.fail_after(5):
            await stopped.wait()

    assert codes == [1001, 1001]
    assert trio.current_time() - started < 3
    assert all(s.close_code == 1001 for s in upstream.sessions)


async def test_https_upstream_is_reached_over_tls(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await trio.run_process(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        capture_stdout=True,
        capture_stderr=True,
    )  # fmt: skip
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    upstream = await serve_realtime_upstream(nursery, ssl_context=server_context)
    # The relay trusts what SSL_CERT_FILE names, as the HTTP side does.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    config = ProxyConfig(listen="127.0.0.1:0", upstream_url=upstream.url)
    handle: ServerHandle = await nursery.start(partial(serve, config))

    async with _open(handle) as ws:
        created = _json(await ws.get_message())

    assert upstream.url.startswith("https://")
    assert created["type"] == "session.created"


async def test_path_query_and_base_path_reach_the_upstream(
    nursery: trio.Nursery, upstream: RealtimeUpstream
) -> None:
    config = ProxyConfig(listen="127.0.0.1:0", upstream_url=upstream.url + "/base")
    handle: ServerHandle = await nursery.start(partial(serve, config))

    async with _open(handle, "/v1/realtime?model=gpt-realtime&x=%2F1"):
        pass

    assert (
        upstream.sessions[0].resource == "/base/v1/realtime?model=gpt-realtime&x=%2F1"
    )


async def test_dot_segments_are_refused_with_400(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    with pytest.raises(ConnectionRejected) as refused:
        async with _open(proxy, "/v1/%2e%2e/admin"):
            pass

    assert refused.value.status_code == 400
    assert upstream.sessions == []


async def test_authorization_and_openai_beta_reach_the_upstream(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    headers = [
        (b"authorization", b"Bearer sk-test-1234"),
        (b"openai-beta", b"realtime=v1"),
        (b"x-request-id", b"req-42"),
    ]

    async with _open(proxy, extra_headers=headers):
        pass

    session = upstream.sessions[0]
    assert session.header(b"authorization") == [b"Bearer sk-test-1234"]
    assert session.header(b"openai-beta") == [b"realtime=v1"]
    assert session.header(b"x-request-id") == [b"req-42"]
    # The client's own handshake headers are not forwarded beside the relay's.
    assert session.header(b"upgrade") == [b"websocket"]


async def test_upstreams_handshake_reply_headers_reach_the_client(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    async with _open(proxy) as ws:
        headers = ws.handshake_headers

    assert (b"x-upstream-session", b"sess_1") in headers
    assert (b"openai-version", b"v1") in headers


async def test_upstream_dropping_the_connection_gives_the_client_1011(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    async with _open(proxy) as ws:
        await ws.get_message()
        await _send_json(ws, {"type": "test.drop"})
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()

    assert closed.value.reason is not None
    assert closed.value.reason.code == 1011
    assert closed.value.reason.reason == "the upstream connection was lost"


def _without_response_extension(app: Any) -> Any:
    """``app`` served as by a server without ``websocket.http.response``."""

    async def without_extension(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            scope = {**scope, "extensions": {}}
        await app(scope, receive, send)

    return without_extension


async def test_refusal_without_the_response_extension_is_a_close_with_reason(
    nursery: trio.Nursery, upstream: RealtimeUpstream
) -> None:
    app = create_app(ProxyConfig(upstream_url=upstream.url), InMemoryEventBus(10))
    url = await serve_asgi(nursery, _without_response_extension(app))

    async with open_client(_ws_url(url, "/v1/realtime?refuse=401")) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()

    assert closed.value.reason is not None
    assert closed.value.reason.code == 1008
    assert closed.value.reason.reason == (
        "the upstream refused the WebSocket handshake with status 401"
    )


async def test_pings_from_the_upstream_are_answered(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    async with _open(proxy) as ws:
        await ws.get_message()
        await _send_json(ws, {"type": "test.ping"})
        pong = _json(await ws.get_message())

    assert pong == {"type": "test.pong"}


async def test_pings_from_the_client_are_answered(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    async with _open(proxy) as ws:
        with trio.fail_after(1):
            await ws.ping(b"are you there")


async def test_mock_upstream_serves_a_realtime_session_through_the_proxy(
    nursery: trio.Nursery,
) -> None:
    mock = create_mock_upstream_app(MockUpstreamSettings())
    config = ProxyConfig(
        listen="127.0.0.1:0", upstream_url=await serve_asgi(nursery, mock)
    )
    handle: ServerHandle = await nursery.start(partial(serve, config))

    async with _open(handle, "/v1/realtime", subprotocols=["realtime"]) as ws:
        created = _json(await ws.get_message())
        await _send_json(ws, {"type": "response.create"})
        events = [_json(await ws.get_message()) for _ in range(11)]

    assert created["type"] == "session.created"
    assert ws.subprotocol == "realtime"
    text = "".join(e["delta"] for e in events if e["type"] == "response.text.delta")
    assert text == "The quick brown fox jumps over the lazy dog. "
    assert events[-1]["type"] == "response.done"
    assert events[-1]["response"]["usage"]["output_tokens"] == 9


async def test_mock_realtime_session_event_has_answer_model_and_usage(
    nursery: trio.Nursery,
) -> None:
    mock = create_mock_upstream_app(MockUpstreamSettings(model="mock-realtime"))
    config = ProxyConfig(
        listen="127.0.0.1:0", upstream_url=await serve_asgi(nursery, mock)
    )
    handle: ServerHandle = await nursery.start(partial(serve, config))

    async with handle.bus.subscribe("test") as subscription:
        async with _open(handle, "/v1/realtime", subprotocols=["realtime"]) as ws:
            await ws.get_message()
            await _send_json(ws, {"type": "response.create"})
            for _ in range(11):
                await ws.get_message()
        with trio.fail_after(HANG_GUARD_SECONDS):
            event = await subscription.events().__anext__()

    llm = event.to_dict()["llm"]
    assert llm["output_text"] == "The quick brown fox jumps over the lazy dog."
    assert llm["response_model"] == "mock-realtime"
    assert (llm["usage"]["input_tokens"], llm["usage"]["output_tokens"]) == (5, 9)


async def test_each_session_publishes_one_event(upstream: RealtimeUpstream) -> None:
    bus = InMemoryEventBus(100)
    config = ProxyConfig(upstream_url=upstream.url)
    app = create_app(config, bus)
    async with bus.subscribe("test") as subscription, trio.open_nursery() as nursery:
        url = await serve_asgi(nursery, app)
        for _ in range(2):
            async with open_client(_ws_url(url, "/v1/realtime")) as ws:
                await ws.get_message()
        with trio.fail_after(2):
            events = [*await subscription.receive_batch()]
            while len(events) < 2:
                events += await subscription.receive_batch()
        nursery.cancel_scope.cancel()

    assert len(events) == 2
    assert [(event.method, event.path) for event in events] == [
        ("WEBSOCKET", "/v1/realtime"),
        ("WEBSOCKET", "/v1/realtime"),
    ]


async def _session_event(
    handle: ServerHandle, path: str = "/v1/realtime", **options: Any
) -> tuple[Event, ConnectionClosed | ConnectionRejected]:
    """Open a session through ``handle``, read until it ends; return its event.

    Returns the event and how the session ended for the client (its close,
    or the refusal of its handshake).
    """
    ended: ConnectionClosed | ConnectionRejected
    # Its own hang guard: pytest-trio runs fixtures (the module's guard) in
    # another task than the test.
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with handle.bus.subscribe("test") as subscription:
            try:
                async with _open(handle, path, **options) as ws:
                    try:
                        while True:
                            await ws.get_message()
                    except ConnectionClosed as closed:
                        ended = closed
            except ConnectionRejected as refused:
                ended = refused
            (event,) = await subscription.receive_batch()
    return event, ended


async def _hostile_proxy(
    nursery: trio.Nursery, answer: Callable[[bytes], bytes]
) -> ServerHandle:
    url = await serve_hostile_upstream(nursery, answer)
    config = ProxyConfig(listen="127.0.0.1:0", upstream_url=url)
    handle: ServerHandle = await nursery.start(partial(serve, config))
    return handle


# Keys offered as subprotocols (OpenAI Realtime's browser authentication).


async def test_key_offered_as_a_subprotocol_reaches_the_upstream_unchanged(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    offered = ["realtime", f"openai-insecure-api-key.{KEY}"]

    async with _open(proxy, subprotocols=offered):
        pass

    assert upstream.sessions[0].offered == offered


async def test_key_offered_as_a_subprotocol_is_redacted_in_event_and_logs(
    upstream: RealtimeUpstream, proxy: ServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    offered = ["realtime", f"openai-insecure-api-key.{KEY}"]

    async with proxy.bus.subscribe("test") as subscription:
        async with _open(proxy, subprotocols=offered) as ws:
            await ws.get_message()
        (event,) = await subscription.receive_batch()

    rendered = orjson.loads(event.to_json())
    assert rendered["request_headers"]["sec-websocket-protocol"] == [
        "realtime, openai-insecure-api-key.[REDACTED]...WXYZ"
    ]
    assert KEY[:-4] not in event.to_json().decode()
    assert KEY[:-4] not in repr(event)
    assert KEY[:-4] not in caplog.text


async def test_key_subprotocol_picked_by_the_upstream_is_redacted_in_the_event(
    nursery: trio.Nursery,
) -> None:
    token = f"openai-insecure-api-key.{KEY}"
    upstream = await serve_realtime_upstream(
        nursery, RealtimeUpstream(subprotocols=(token,))
    )
    config = ProxyConfig(listen="127.0.0.1:0", upstream_url=upstream.url)
    handle: ServerHandle = await nursery.start(partial(serve, config))

    async with handle.bus.subscribe("test") as subscription:
        async with _open(handle, subprotocols=[token]) as ws:
            chosen = ws.subprotocol
        (event,) = await subscription.receive_batch()

    assert chosen == token
    assert event.websocket is not None
    assert event.websocket.subprotocol == "openai-insecure-api-key.[REDACTED]...WXYZ"
    assert KEY[:-4] not in event.to_json().decode()


async def test_key_in_the_query_is_redacted_in_the_event_but_forwarded(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    path = f"/v1/realtime?model=gpt-realtime&api_key={KEY}&x=%2F1"

    async with proxy.bus.subscribe("test") as subscription:
        async with _open(proxy, path) as ws:
            await ws.get_message()
        (event,) = await subscription.receive_batch()

    assert upstream.sessions[0].resource == path
    assert event.query == "model=gpt-realtime&api_key=[REDACTED]...WXYZ&x=%2F1"
    assert orjson.loads(event.to_json())["llm"]["request_model"] == "gpt-realtime"


# Upstreams that answer the handshake with an invalid 101.


def _wrong_accept(key: bytes) -> bytes:
    return switching_protocols(accept_token(b"another key"))


def _unoffered_subprotocol(key: bytes) -> bytes:
    return switching_protocols(accept_token(key), b"Sec-WebSocket-Protocol: evil")


def _huge_head(key: bytes) -> bytes:
    return switching_protocols(accept_token(key), b"X-Big: " + b"a" * 200_000)


@pytest.mark.parametrize("answer", [_wrong_accept, _unoffered_subprotocol, _huge_head])
async def test_invalid_handshake_answer_gives_502_and_an_event_without_traceback(
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    answer: Callable[[bytes], bytes],
) -> None:
    handle = await _hostile_proxy(nursery, answer)

    event, ended = await _session_event(handle)

    assert isinstance(ended, ConnectionRejected)
    assert ended.status_code == 502
    assert ended.body is not None
    error = orjson.loads(ended.body)["error"]
    assert (error["type"], error["code"]) == ("proxy_error", "upstream_unreachable")
    assert "answered the WebSocket handshake invalidly" in error["message"]
    assert (event.status, event.outcome) == (502, "upstream_error")
    assert event.error == error["message"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# Closes the proxy makes itself are recorded as its own.


async def test_shutdown_records_the_close_as_the_proxys(
    nursery: trio.Nursery, upstream: RealtimeUpstream
) -> None:
    config = ProxyConfig(listen="127.0.0.1:0", upstream_url=upstream.url)
    handle: ServerHandle = await nursery.start(partial(serve, config))

    async with handle.bus.subscribe("test") as subscription:
        async with _open(handle) as ws:
            await ws.get_message()
            handle.shutdown()
            with pytest.raises(ConnectionClosed):
                await ws.get_message()
        (event,) = await subscription.receive_batch()

    session = event.websocket
    assert session is not None
    assert session.closed_by == "proxy"
    assert (session.proxy_close_code, session.proxy_close_reason) == (
        1001,
        "going away",
    )
    assert session.upstream.close_code is None
    assert (event.outcome, event.error) == (
        "upstream_error",
        "closed: the proxy is shutting down",
    )


async def test_upstream_message_over_the_limit_is_the_proxys_1009(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    async with proxy.bus.subscribe("test") as subscription:
        async with _open(proxy) as ws:
            await ws.get_message()
            await _send_json(ws, {"type": "test.binary", "size": 16 * ONE_MEGABYTE + 1})
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        (event,) = await subscription.receive_batch()

    assert closed.value.reason is not None and closed.value.reason.code == 1009
    session = event.websocket
    assert session is not None
    assert (session.closed_by, session.proxy_close_code) == ("proxy", 1009)
    assert session.upstream.close_code is None
    assert event.outcome == "upstream_error"
    assert event.error is not None
    assert event.error.startswith("the upstream sent a message too big to relay")


async def test_upstream_sending_garbage_frames_is_the_proxys_1002(
    nursery: trio.Nursery,
) -> None:
    def garbage(key: bytes) -> bytes:
        return switching_protocols(accept_token(key)) + b"\x81\x02hi" + b"\xff" * 4

    handle = await _hostile_proxy(nursery, garbage)

    event, ended = await _session_event(handle)

    assert isinstance(ended, ConnectionClosed)
    assert ended.reason is not None and ended.reason.code == 1002
    session = event.websocket
    assert session is not None
    assert (session.closed_by, session.proxy_close_code) == ("proxy", 1002)
    assert session.upstream.close_code is None
    assert (session.upstream.messages, session.upstream.bytes) == (1, 2)
    assert event.outcome == "upstream_error"
    assert event.error is not None
    assert event.error.startswith("the upstream broke the WebSocket protocol: ")


async def test_upstream_dropping_the_connection_is_recorded_as_the_proxys_close(
    upstream: RealtimeUpstream, proxy: ServerHandle
) -> None:
    async with proxy.bus.subscribe("test") as subscription:
        async with _open(proxy) as ws:
            await ws.get_message()
            await _send_json(ws, {"type": "test.drop"})
            with pytest.raises(ConnectionClosed):
                await ws.get_message()
        (event,) = await subscription.receive_batch()

    session = event.websocket
    assert session is not None
    assert (session.closed_by, session.proxy_close_code) == ("proxy", 1011)
    assert (event.outcome, event.error) == (
        "upstream_error",
        "the upstream connection was lost",
    )


# Sessions count against --max-concurrent-requests, with HTTP requests.


async def _limited_proxy(
    nursery: trio.Nursery, upstream: RealtimeUpstream, limit: int
) -> ServerHandle:
    config = ProxyConfig(
        listen="127.0.0.1:0",
        upstream_url=upstream.url,
        max_concurrent_requests=limit,
    )
    handle: ServerHandle = await nursery.start(partial(serve, config))
    return handle


async def test_handshake_beyond_the_limit_gets_503_and_is_recorded(
    nursery: trio.Nursery, upstream: RealtimeUpstream
) -> None:
    proxy = await _limited_proxy(nursery, upstream, 2)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy.bus.subscribe("test") as subscription:
            async with _open(proxy), _open(proxy):
                with pytest.raises(ConnectionRejected) as refused:
                    async with _open(proxy):
                        pass
                (event,) = await subscription.receive_batch()

    assert refused.value.status_code == 503
    assert refused.value.body is not None
    error = orjson.loads(refused.value.body)["error"]
    assert (error["type"], error["code"]) == ("proxy_error", "overloaded")
    assert "maximum of 2 concurrent" in error["message"]
    assert len(upstream.sessions) == 2
    assert (event.method, event.path, event.status) == (
        "WEBSOCKET",
        "/v1/realtime",
        503,
    )
    assert event.error == error["message"]


async def test_session_that_closes_frees_its_place_for_a_new_one(
    nursery: trio.Nursery, upstream: RealtimeUpstream
) -> None:
    proxy = await _limited_proxy(nursery, upstream, 2)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with proxy.bus.subscribe("test") as subscription, _open(proxy):
            async with _open(proxy) as leaving:
                await leaving.get_message()
            # Published once the relay is done with the session.
            (closed,) = await subscription.receive_batch()
            async with _open(proxy) as new:
                created = _json(await new.get_message())

    assert closed.status == 101
    assert created["type"] == "session.created"
    assert len(upstream.sessions) == 3


async def test_open_session_takes_a_place_from_http_requests(
    nursery: trio.Nursery, upstream: RealtimeUpstream
) -> None:
    proxy = await _limited_proxy(nursery, upstream, 1)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            _open(proxy) as ws,
            httpx.AsyncClient(base_url=proxy.addresses[0]) as client,
        ):
            await ws.get_message()
            response = await client.get("/v1/models")

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "overloaded"


async def test_handshake_beyond_the_limit_without_the_extension_closes_1013(
    nursery: trio.Nursery, upstream: RealtimeUpstream
) -> None:
    config = ProxyConfig(upstream_url=upstream.url, max_concurrent_requests=1)
    app = create_app(config, InMemoryEventBus(10))
    url = await serve_asgi(nursery, _without_response_extension(app))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with open_client(_ws_url(url, "/v1/realtime")) as held:
            await held.get_message()
            async with open_client(_ws_url(url, "/v1/realtime")) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()

    assert closed.value.reason is not None
    assert closed.value.reason.code == 1013
    assert closed.value.reason.reason is not None
    assert "maximum of 1 concurrent" in closed.value.reason.reason
    assert len(upstream.sessions) == 1
