"""The HTTP sink: POSTs each batch of events to a URL as one JSON array.

The body is ``[event, event, ...]``, each element the event's JSON object
exactly as in the JSONL event log, sent with ``Content-Type:
application/json``. A 2xx answer means the backend has the whole batch.
Answers 408, 429 and 5xx, timeouts and connection errors are transient (the
dispatcher retries); any other answer is permanent (the backend refused the
batch and will refuse it again).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Final, Self
from urllib.parse import urlsplit, urlunsplit

import httpx
import trio

from ._errors import ConfigError, SinkError
from ._event import Event
from ._rendering import render_events
from ._sinks import Sink

DEFAULT_TIMEOUT_SECONDS: Final = 30.0
# Request Timeout and Too Many Requests: the backend asks to be tried again.
_TRANSIENT_STATUSES: Final = frozenset({408, 429})

logger = logging.getLogger(__name__)


def _display_url(url: str) -> str:
    """Return ``url`` without credentials or query (which may hold a token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _check_url(url: str) -> None:
    shown = _display_url(url)
    try:
        parts = urlsplit(url)
        # Reading the port checks it: a ValueError when not a number in range.
        parts.port  # noqa: B018
    except ValueError:
        msg = f"HTTP sink URL has an invalid port: {shown!r}"
        raise ConfigError(msg) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = f"HTTP sink URL must be http:// or https:// with a host, got {shown!r}"
        raise ConfigError(msg)


def encode_array(events: Sequence[Event]) -> bytes:
    """Return ``events`` as one JSON array of event objects."""
    return b"[" + b",".join([event.to_json() for event in events]) + b"]"


class HttpSink(Sink):
    """POSTs each batch as a JSON array to ``url`` through one shared client.

    Entering the sink opens its :class:`httpx.AsyncClient`; leaving it (or
    :meth:`aclose`) closes it.

    Args:
        url: an ``http://`` or ``https://`` URL; credentials in it are sent
            (as basic authentication) but never logged.
        timeout: seconds allowed to connect, and between bytes sent or
            received, for each POST.
        headers: extra request headers (an ``Authorization`` header, say).

    Raises:
        ConfigError: ``url`` is not an http(s) URL with a host, or
            ``timeout`` is not positive.
    """

    name = "http"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        _check_url(url)
        if timeout <= 0:
            msg = f"HTTP sink timeout must be > 0, got {timeout!r}"
            raise ConfigError(msg)
        self.url = url
        self._shown_url = _display_url(url)
        self._timeout = timeout
        self._headers = dict(headers or {})
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"HttpSink({self._shown_url!r})"

    async def __aenter__(self) -> Self:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self._timeout),
            headers={"content-type": "application/json", **self._headers},
        )
        return self

    async def deliver(self, events: Sequence[Event]) -> None:
        """POST ``events`` as one JSON array.

        Raises:
            SinkError: the backend did not take the batch; ``permanent`` when
                it refused it with a status that retrying cannot change.
        """
        client = self._client
        if client is None:
            msg = f"HTTP sink for {self._shown_url} is not open"
            raise SinkError(msg)
        await render_events(events)
        body = await trio.to_thread.run_sync(encode_array, events)
        try:
            response = await client.post(self.url, content=body)
        except httpx.TimeoutException as exc:
            msg = f"POST {self._shown_url} timed out after {self._timeout:g} s"
            raise SinkError(msg) from exc
        except httpx.TransportError as exc:
            msg = f"POST {self._shown_url} failed: {type(exc).__name__}: {exc}"
            raise SinkError(msg) from exc
        self._check(response, len(events))

    def _check(self, response: httpx.Response, count: int) -> None:
        status = response.status_code
        if 200 <= status < 300:
            logger.debug("POST %s: %d, %d event(s)", self._shown_url, status, count)
            return
        transient = status >= 500 or status in _TRANSIENT_STATUSES
        msg = f"POST {self._shown_url} answered {status} {response.reason_phrase}"
        raise SinkError(msg, permanent=not transient)

    async def aclose(self) -> None:
        """Close the HTTP client and its connections."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
