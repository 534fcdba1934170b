"""Tests for the HTTP sink, against a small real backend on loopback.

The backend is an ASGI app served by Hypercorn on 127.0.0.1 port 0 that
records each request and answers with the statuses it is given. Every test
that talks to it runs under a ``trio.fail_after`` hang guard.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

import attrs
import orjson
import pytest
import trio
from conftest import serve_asgi
from events import make_event

from trio_llmproxy._bus import Subscription
from trio_llmproxy._dispatch import Dispatcher, RetryPolicy
from trio_llmproxy._errors import ConfigError, SinkError
from trio_llmproxy._event import Event
from trio_llmproxy._http_sink import HttpSink

HANG_GUARD_SECONDS = 10
FAST_RETRY = RetryPolicy(
    attempts=3, initial_backoff_seconds=0.01, max_backoff_seconds=0.01
)

Message = Mapping[str, object]


@attrs.define
class Request:
    method: str
    path: str
    headers: dict[bytes, bytes]
    body: bytes


@attrs.define
class Backend:
    """Answers the given statuses in turn (the last one from then on)."""

    statuses: list[int]
    delay_seconds: float = 0.0
    requests: list[Request] = attrs.field(factory=list)

    async def __call__(
        self,
        scope: Mapping[str, object],
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            await _serve_lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += bytes(message.get("body", b""))  # type: ignore[call-overload]
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])  # type: ignore[call-overload]
        self.requests.append(
            Request(str(scope["method"]), str(scope["path"]), headers, body)
        )
        await trio.sleep(self.delay_seconds)
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-length", b"2")],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})


async def _serve_lifespan(
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@attrs.define
class ListSubscription(Subscription):
    """Hands out the given batches once each and records acknowledgements."""

    batches: list[Sequence[Event]]
    acked: list[Event] = attrs.field(factory=list)

    async def receive_batch(self) -> Sequence[Event]:
        if not self.batches:
            raise trio.EndOfChannel
        return self.batches.pop(0)

    async def ack(self, batch: Sequence[Event]) -> None:
        self.acked.extend(batch)


async def serve_backend(nursery: trio.Nursery, backend: Backend) -> str:
    return await serve_asgi(nursery, backend) + "/ingest"


async def test_a_batch_is_posted_as_one_json_array(nursery: trio.Nursery) -> None:
    backend = Backend([200])
    url = await serve_backend(nursery, backend)
    events = [make_event(n) for n in range(3)]

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with HttpSink(url) as sink:
            await sink.deliver(events)

    [request] = backend.requests
    assert (request.method, request.path) == ("POST", "/ingest")
    assert request.headers[b"content-type"] == b"application/json"
    assert orjson.loads(request.body) == [orjson.loads(e.to_json()) for e in events]


async def test_a_backend_answering_500_then_200_gets_the_batch_on_retry(
    nursery: trio.Nursery,
) -> None:
    backend = Backend([500, 200])
    url = await serve_backend(nursery, backend)
    batch = [make_event(n) for n in range(3)]

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with HttpSink(url) as sink:
            dispatcher = Dispatcher(sink, retry=FAST_RETRY)
            accepted = await dispatcher.deliver(batch)

    assert accepted == 3
    assert len(backend.requests) == 2
    assert backend.requests[0].body == backend.requests[1].body
    assert (dispatcher.stats.delivered, dispatcher.stats.retries) == (3, 1)


async def test_a_backend_answering_400_is_not_retried_and_the_batch_is_acked(
    nursery: trio.Nursery,
) -> None:
    backend = Backend([400, 200])
    url = await serve_backend(nursery, backend)
    batch = [make_event(n) for n in range(3)]
    subscription = ListSubscription([batch])

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with HttpSink(url) as sink:
            dispatcher = Dispatcher(sink, retry=FAST_RETRY)
            await dispatcher.serve(subscription)

    assert len(backend.requests) == 1
    assert subscription.acked == batch
    assert (dispatcher.stats.rejected, dispatcher.stats.delivered) == (3, 0)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_retryable_statuses_are_transient_errors(
    nursery: trio.Nursery, status: int
) -> None:
    url = await serve_backend(nursery, Backend([status]))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with HttpSink(url) as sink:
            with pytest.raises(SinkError) as caught:
                await sink.deliver([make_event(1)])

    assert not caught.value.permanent
    assert str(status) in str(caught.value)
    assert url in str(caught.value)


@pytest.mark.parametrize("status", [301, 400, 401, 403, 404, 413, 422])
async def test_other_statuses_are_permanent_errors(
    nursery: trio.Nursery, status: int
) -> None:
    url = await serve_backend(nursery, Backend([status]))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with HttpSink(url) as sink:
            with pytest.raises(SinkError) as caught:
                await sink.deliver([make_event(1)])

    assert caught.value.permanent
    assert str(status) in str(caught.value)


async def test_a_refused_connection_is_a_transient_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ingest"

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with HttpSink(url) as sink:
            with pytest.raises(SinkError) as caught:
                await sink.deliver([make_event(1)])

    assert not caught.value.permanent


async def test_a_timeout_is_a_transient_error(nursery: trio.Nursery) -> None:
    url = await serve_backend(nursery, Backend([200], delay_seconds=5))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with HttpSink(url, timeout=0.2) as sink:
            with pytest.raises(SinkError) as caught:
                await sink.deliver([make_event(1)])

    assert not caught.value.permanent
    assert "timed out" in str(caught.value)


async def test_error_messages_hide_credentials_and_query(
    nursery: trio.Nursery,
) -> None:
    base = await serve_asgi(nursery, Backend([503]))
    url = base.replace("http://", "http://user:s3cret@") + "/ingest?token=t0ken"

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with HttpSink(url) as sink:
            with pytest.raises(SinkError) as caught:
                await sink.deliver([make_event(1)])

    message = str(caught.value)
    assert "503" in message
    assert f"{base}/ingest" in message
    assert "s3cret" not in message
    assert "t0ken" not in message
    assert "s3cret" not in repr(sink)


async def test_delivering_through_a_closed_sink_is_an_error() -> None:
    sink = HttpSink("http://127.0.0.1:9/ingest")

    with pytest.raises(SinkError, match="not open"):
        await sink.deliver([make_event(1)])


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/ingest",
        "http:///ingest",
        "http://user:s3cret@127.0.0.1:port/ingest",
        "127.0.0.1:8080/ingest",
    ],
)
def test_a_bad_url_is_a_config_error_without_credentials(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        HttpSink(url)

    assert "s3cret" not in str(caught.value)


def test_a_non_positive_timeout_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="timeout"):
        HttpSink("http://127.0.0.1:9/ingest", timeout=0)
