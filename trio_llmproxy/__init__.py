"""trio_llmproxy: a transparent, instrumented streaming proxy for LLM APIs.

The public API is what this module exports; everything else is private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._app import create_app as create_app
from ._bus import BusStatistics as BusStatistics
from ._bus import EventBus as EventBus
from ._bus import SubscriberStatistics as SubscriberStatistics
from ._bus import Subscription as Subscription
from ._config import ProxyConfig as ProxyConfig
from ._dispatch import Dispatcher as Dispatcher
from ._dispatch import RetryPolicy as RetryPolicy
from ._errors import ClientError as ClientError
from ._errors import ConfigError as ConfigError
from ._errors import ProxyError as ProxyError
from ._errors import SinkError as SinkError
from ._errors import UpstreamError as UpstreamError
from ._errors import UpstreamTimeout as UpstreamTimeout
from ._event import Event as Event
from ._event import WebSocketMessage as WebSocketMessage
from ._event import WebSocketSession as WebSocketSession
from ._event import WebSocketSide as WebSocketSide
from ._http_sink import HttpSink as HttpSink
from ._memory_bus import InMemoryEventBus as InMemoryEventBus
from ._metrics import ProxyMetrics as ProxyMetrics
from ._middleware import CaptureSettings as CaptureSettings
from ._middleware import InstrumentationMiddleware as InstrumentationMiddleware
from ._middleware import note_outcome as note_outcome
from ._server import ServerHandle as ServerHandle
from ._server import serve as serve
from ._sinks import JsonlFileSink as JsonlFileSink
from ._sinks import Sink as Sink
from ._sinks import StdoutSink as StdoutSink
from ._upstream import create_upstream_client as create_upstream_client

if TYPE_CHECKING:
    from ._redis_bus import RedisEventBus as RedisEventBus

__version__ = "0.1.0"

__all__ = [
    "BusStatistics",
    "CaptureSettings",
    "ClientError",
    "ConfigError",
    "Dispatcher",
    "Event",
    "EventBus",
    "HttpSink",
    "InMemoryEventBus",
    "InstrumentationMiddleware",
    "JsonlFileSink",
    "ProxyConfig",
    "ProxyError",
    "ProxyMetrics",
    "RedisEventBus",
    "RetryPolicy",
    "ServerHandle",
    "Sink",
    "SinkError",
    "StdoutSink",
    "SubscriberStatistics",
    "Subscription",
    "UpstreamError",
    "UpstreamTimeout",
    "WebSocketMessage",
    "WebSocketSession",
    "WebSocketSide",
    "create_app",
    "create_upstream_client",
    "note_outcome",
    "serve",
]


def __getattr__(name: str) -> object:
    # The Redis bus pulls in coredis, which takes a noticeable time to import;
    # it is imported on first use, so the CLI and memory-only users start fast.
    if name == "RedisEventBus":
        from ._redis_bus import RedisEventBus

        globals()[name] = RedisEventBus
        return RedisEventBus
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
