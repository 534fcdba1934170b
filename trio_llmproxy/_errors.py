"""The exception hierarchy of trio_llmproxy.

Client faults and upstream faults are kept apart, and each error carries the
HTTP status the proxy answers with and the ``code`` of its OpenAI-style body.
Errors of httpx, coredis and the like are converted into these at the module
that talks to them, so callers catch only our types.
"""

from __future__ import annotations

from typing import TypeVar

import trio

E = TypeVar("E", bound=BaseException)


class ProxyError(Exception):
    """Base class of every error raised by trio_llmproxy."""

    status: int = 500
    code: str = "proxy_error"


class ConfigError(ProxyError):
    """A configuration value is invalid; the message names it and the rule."""

    status = 500
    code = "config_error"


class ClientError(ProxyError):
    """The client sent something the proxy refuses."""

    status = 400
    code = "bad_request"


class RequestTooLarge(ClientError):
    """The request body is larger than the proxy accepts."""

    status = 413
    code = "request_too_large"


class ClientTimeout(ClientError):
    """The client stopped sending its request body for too long."""

    status = 408
    code = "request_timeout"


class Overloaded(ProxyError):
    """The proxy already carries as many requests as it is allowed to."""

    status = 503
    code = "overloaded"


class UpstreamError(ProxyError):
    """The upstream could not be reached or broke the exchange."""

    status = 502
    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer, or stopped sending, within its deadline."""

    status = 504
    code = "upstream_timeout"


class SinkError(ProxyError):
    """A sink failed to deliver a batch of events.

    ``permanent`` tells the dispatcher not to retry: the backend refused the
    batch for good (a 4xx other than 408 and 429, say). ``delivered`` says how
    many events at the head of the batch the backend did accept, so that only
    the rest is retried.
    """

    def __init__(
        self, message: str, *, permanent: bool = False, delivered: int = 0
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.delivered = delivered


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is a cancellation, bare or grouped by a nursery."""
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(trio.Cancelled)
        return rest is None
    return isinstance(exc, trio.Cancelled)


def first_leaf(group: BaseExceptionGroup[E]) -> E:
    """The first exception of ``group`` that is not itself a group.

    Nested nurseries (Hypercorn's, trio-websocket's) wrap an error once per
    level.
    """
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
