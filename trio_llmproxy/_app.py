"""The proxy's ASGI app as served: health check, instrumentation, forwarding.

:func:`create_app` stacks the pieces: ``GET /healthz`` is answered here and
never forwarded or recorded; every other HTTP request goes through the
instrumentation middleware to the forwarding app, and every WebSocket session
through its own instance of the middleware to the WebSocket relay.

The upstream client is either the caller's (``serve`` passes its own) or the
app's: then the ASGI lifespan owns it, opening it at ``lifespan.startup`` and
closing it at ``lifespan.shutdown``, or when the lifespan task is cancelled.
It reaches the requests through the lifespan state, so each server that
runs the app has a client of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import attrs
import httpx
import trio

from ._asgi import ASGIApp, Receive, Scope, Send, answer_lifespan
from ._bus import EventBus
from ._config import ProxyConfig
from ._event import Event
from ._middleware import CaptureSettings, InstrumentationMiddleware
from ._proxy import ConcurrencyLimit, ProxyApp
from ._upstream import create_upstream_client
from ._websocket import WebSocketRelay

if TYPE_CHECKING:
    from ._metrics import ProxyMetrics

HEALTH_PATH = "/healthz"
# The key of the forwarding app in the ASGI lifespan state, when the app owns
# its client.
STATE_KEY: Final = "trio_llmproxy.proxy"
# Closing the owned client only closes sockets; if that hangs, give up on it
# rather than hold up the server's shutdown.
CLIENT_CLOSE_TIMEOUT_SECONDS: Final = 5.0


@attrs.frozen
class _OwnedUpstream:
    """The forwarding app of a proxy app that owns its upstream client.

    Each server that runs the app gets a client from the lifespan's startup
    to its shutdown, handed to its requests in the lifespan state.
    """

    config: ProxyConfig
    concurrency: ConcurrencyLimit

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[ProxyApp]:
        config = self.config
        client = create_upstream_client(
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            max_connections=config.max_upstream_connections,
        )
        try:
            yield proxy_app(config, client, self.concurrency)
        finally:
            # Runs on cancellation too (a cancelled server skips the lifespan
            # shutdown message), so the sockets are always closed.
            with trio.move_on_after(CLIENT_CLOSE_TIMEOUT_SECONDS, shield=True):
                await client.aclose()

    async def lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        state = scope.get("state")
        if state is None:
            msg = (
                "the server has no ASGI lifespan state for the proxy's upstream "
                "client; pass create_app() a client of your own"
            )
            await send({"type": "lifespan.startup.failed", "message": msg})
            return
        async with self._running() as proxy:
            state[STATE_KEY] = proxy
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
        await send({"type": "lifespan.shutdown.complete"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        proxy = (scope.get("state") or {}).get(STATE_KEY)
        if proxy is None:
            msg = (
                "the proxy app has no upstream client: create_app() without a "
                "client needs a server that runs the ASGI lifespan (Hypercorn "
                "does), or pass client=create_upstream_client(...)"
            )
            raise RuntimeError(msg)
        await proxy(scope, receive, send)


async def _health(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


def capture_settings(config: ProxyConfig) -> CaptureSettings:
    """Return the middleware's capture settings from a proxy config."""
    return CaptureSettings(
        max_request_body_bytes=config.max_request_body_bytes,
        max_response_body_bytes=config.max_response_body_bytes,
        secret_headers=config.secret_headers,
    )


def proxy_app(
    config: ProxyConfig, client: httpx.AsyncClient, concurrency: ConcurrencyLimit
) -> ProxyApp:
    """Return the forwarding app for ``config``, with its limits.

    ``concurrency`` is shared with the app's WebSocket relay.
    """
    return ProxyApp(
        config.upstream_url,
        client,
        max_request_bytes=config.max_request_bytes,
        client_timeout=config.client_timeout,
        concurrency=concurrency,
    )


def create_app(
    config: ProxyConfig,
    bus: EventBus,
    client: httpx.AsyncClient | None = None,
    *,
    enrich: Callable[[Event], Event] | None = None,
    metrics: ProxyMetrics | None = None,
    going_away: trio.Event | None = None,
) -> ASGIApp:
    """Return the proxy as an ASGI app, to serve with one's own Hypercorn.

    Only ``config``'s upstream, capture caps, secret headers and upstream
    timeouts apply; the listening address and the event bus settings are the
    server's business. The caller owns ``bus``: the app only publishes to it.

    Args:
        config: the proxy's configuration (upstream, capture caps, secrets).
        bus: where each request's event is published.
        client: the shared upstream client, from ``create_upstream_client``;
            the caller owns it and closes it after the server stops. Without
            it the app makes its own from ``config`` and owns it through the
            ASGI lifespan, which the server must run (Hypercorn does).
        enrich: optional hook that returns each event to publish, for adding
            fields (see docs/embedding.md).
        metrics: served at ``config.metrics_path`` (unless that is empty),
            never forwarded or recorded; ``serve`` passes its own. Without
            it that path is forwarded like any other.
        going_away: set it when the server begins to shut down: open
            WebSocket sessions are then closed at once on both sides with
            1001, "going away", instead of holding the shutdown until its
            timeout cuts them (see docs/websocket.md). ``serve`` passes its
            own.
    """
    metrics_path = config.metrics_path if metrics is not None else ""
    # HTTP requests and WebSocket sessions count against one limit.
    concurrency = ConcurrencyLimit(config.max_concurrent_requests)
    owned: _OwnedUpstream | None = None
    forward: ASGIApp
    if client is None:
        forward = owned = _OwnedUpstream(config, concurrency)
    else:
        forward = proxy_app(config, client, concurrency)
    recorded = InstrumentationMiddleware(
        forward,
        bus,
        capture_settings(config),
        enrich=enrich,
    )
    # A middleware instance of its own, so the HTTP path pays nothing for
    # telling the two kinds of scope apart.
    sessions = InstrumentationMiddleware(
        WebSocketRelay(
            config.upstream_url,
            connect_timeout=config.connect_timeout,
            going_away=going_away,
            concurrency=concurrency,
        ),
        bus,
        capture_settings(config),
        enrich=enrich,
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            if owned is not None:
                await owned.lifespan(scope, receive, send)
            else:
                # Nothing to set up or tear down: the caller owns the client
                # and the bus.
                await answer_lifespan(receive, send)
        elif (
            kind == "http" and scope["path"] == HEALTH_PATH and scope["method"] == "GET"
        ):
            await _health(send)
        elif (
            metrics is not None
            and kind == "http"
            and scope["path"] == metrics_path
            and scope["method"] == "GET"
        ):
            await metrics.serve_http(send)
        elif kind == "websocket":
            await sessions(scope, receive, send)
        else:
            await recorded(scope, receive, send)

    return app
