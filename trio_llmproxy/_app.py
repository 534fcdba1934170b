"""The proxy's ASGI app as served: health check, instrumentation, forwarding.

:func:`create_app` stacks the pieces: ``GET /healthz`` is answered here and
never forwarded or recorded; every other HTTP request goes through the
instrumentation middleware to the forwarding app.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from ._asgi import ASGIApp, Receive, Scope, Send
from ._bus import EventBus
from ._config import ProxyConfig
from ._event import Event
from ._middleware import CaptureSettings, InstrumentationMiddleware
from ._proxy import ProxyApp

HEALTH_PATH = "/healthz"


async def _lifespan(receive: Receive, send: Send) -> None:
    # Nothing to set up or tear down here: serve() owns the client and the bus.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


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


def create_app(
    config: ProxyConfig,
    bus: EventBus,
    client: httpx.AsyncClient,
    *,
    enrich: Callable[[Event], Event] | None = None,
) -> ASGIApp:
    """Return the proxy as an ASGI app, to serve with one's own Hypercorn.

    Args:
        config: the proxy's configuration (upstream, capture caps, secrets).
        bus: where each request's event is published.
        client: the shared upstream client, from ``create_upstream_client``;
            the caller owns it and closes it after the server stops.
        enrich: optional hook that returns each event to publish, for adding
            fields (see docs/embedding.md).
    """
    recorded = InstrumentationMiddleware(
        ProxyApp(config.upstream_url, client),
        bus,
        capture_settings(config),
        enrich=enrich,
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
        elif (
            kind == "http" and scope["path"] == HEALTH_PATH and scope["method"] == "GET"
        ):
            await _health(send)
        else:
            await recorded(scope, receive, send)

    return app
