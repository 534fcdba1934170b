"""Shared fixtures: real servers on loopback ports, owned by the test's nursery."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, cast

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from trio_llmproxy._mock_upstream import MockUpstreamHandle, serve_mock_upstream

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework


async def serve_asgi(nursery: trio.Nursery, app: Callable[..., Awaitable[None]]) -> str:
    """Serves ``app`` with Hypercorn on a free loopback port and returns its base URL.

    The server runs in ``nursery`` until that nursery is cancelled; with
    pytest-trio's ``nursery`` fixture that happens when the test ends. Returns
    once the socket is listening, as ``"http://127.0.0.1:PORT"``.
    """
    config = Config()
    config.bind = ["127.0.0.1:0"]
    # ``app`` is any ASGI 3 callable, whichever aliases typed it; Hypercorn types
    # scopes and messages as TypedDicts, but they describe the same calls.
    framework = cast("ASGIFramework", app)
    # An explicit trigger keeps Hypercorn from installing signal handlers.
    server = partial(serve, framework, config, shutdown_trigger=trio.sleep_forever)
    binds: list[str] = await nursery.start(server)
    return binds[0]


@pytest.fixture
async def mock_upstream_url(nursery: trio.Nursery) -> str:
    """Base URL of a mock upstream with default settings, live for one test."""
    handle: MockUpstreamHandle = await nursery.start(serve_mock_upstream)
    return handle.addresses[0]
