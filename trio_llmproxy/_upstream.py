"""The upstream side of the proxy: target URLs, header rules, the httpx client.

This module is the only one that talks httpx; it converts httpx's errors into
:class:`~trio_llmproxy.UpstreamError` and :class:`~trio_llmproxy.UpstreamTimeout`.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import httpx
from httpx._utils import get_environment_proxies

from ._errors import ClientError, UpstreamError, UpstreamTimeout
from ._redact import redact_url

# Hop-by-hop headers (RFC 9110 section 7.6.1): they describe one connection,
# so they never cross the proxy, in either direction.
HOP_BY_HOP_HEADERS: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# A dot segment, plain or percent-encoded, between slashes or at the end. An
# encoded slash or a backslash counts as a slash here: upstreams that decode
# or normalise them would otherwise see a '..' climb out of the base path.
_DOT_SEGMENT = re.compile(
    rb"(?:^|/|%2f|\\)(?:\.|%2e){1,2}(?:/|%2f|\\|$)", re.IGNORECASE
)
# httpcore's pool scans all its connections, and for each idle one all of
# them again, on every request and every response close: its cost per
# request grows with the square of the open connections (a third of the
# proxy's CPU at 32 concurrent requests). Several small pools, each taking
# the next request when it is the least busy, keep those scans short.
MAX_POOL_SHARDS: Final = 32


class _NoCookies(httpx.Cookies):
    """Cookies that are never taken from a response.

    Cookies belong to the proxy's clients; a shared jar would grow without
    bound and hand one client's cookies to the next. Not reading them at all
    also saves httpx's http.cookiejar round trip (about 15 us a response).
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        return


class _UpstreamClient(httpx.AsyncClient):
    """The shared upstream client: it never keeps the upstream's cookies."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: httpx._types.CookieTypes) -> None:
        self._no_cookies = _NoCookies(cookies)


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that tells its pool shard when the response is closed."""

    def __init__(
        self, stream: httpx.AsyncByteStream, busy: list[int], shard: int
    ) -> None:
        self._stream = stream
        self._busy = busy
        self._shard = shard
        self._released = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        # The inner iterator itself: no extra generator layer per chunk.
        return self._stream.__aiter__()

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._busy[self._shard] -= 1
        await self._stream.aclose()


class _ShardedTransport(httpx.AsyncBaseTransport):
    """Spreads requests over small connection pools, the least busy first."""

    def __init__(self, shards: list[httpx.AsyncHTTPTransport]) -> None:
        self._shards = shards
        # Requests sent through each shard whose response is not closed yet.
        self._busy = [0] * len(shards)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        busy = self._busy
        shard = busy.index(min(busy))
        busy[shard] += 1
        try:
            response = await self._shards[shard].handle_async_request(request)
        except BaseException:
            busy[shard] -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _ReleasingStream(response.stream, busy, shard)
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _sharded(
    max_connections: int, tls: ssl.SSLContext, proxy: str | None = None
) -> _ShardedTransport:
    """Up to ``MAX_POOL_SHARDS`` pools sharing ``max_connections`` and ``tls``."""
    count = min(MAX_POOL_SHARDS, max_connections)
    keep_alive = _split(min(max_connections, 100), count)
    return _ShardedTransport(
        [
            httpx.AsyncHTTPTransport(
                # One TLS context for all: each one loads the CA bundle,
                # which takes tens of milliseconds of blocking work.
                verify=tls,
                limits=httpx.Limits(
                    max_connections=limit, max_keepalive_connections=keep_alive[i]
                ),
                proxy=proxy,
            )
            for i, limit in enumerate(_split(max_connections, count))
        ]
    )


def _environment_mounts(
    max_connections: int, tls: ssl.SSLContext
) -> dict[str, httpx.AsyncBaseTransport | None]:
    """The transports a default httpx client would mount for the environment.

    An explicit transport makes httpx ignore ``HTTP_PROXY``, ``HTTPS_PROXY``,
    ``ALL_PROXY`` and ``NO_PROXY``; this reads them with httpx's own helper
    and mounts a proxied transport for each proxied origin (``None``, for the
    hosts ``NO_PROXY`` lists, keeps the direct one), as httpx would.
    """
    mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
    for pattern, proxy in get_environment_proxies().items():
        mounts[pattern] = (
            None if proxy is None else _sharded(max_connections, tls, proxy)
        )
    return mounts


def create_upstream_client(
    *, connect_timeout: float, read_timeout: float, max_connections: int
) -> httpx.AsyncClient:
    """Return the one shared client that forwards requests upstream.

    ``read_timeout`` bounds the wait for the response head and for each chunk
    after it, and the wait to send each chunk of a request body. At most
    ``max_connections`` are open at once, over several small pools. Like a
    default httpx client, it goes through the proxies that ``HTTP_PROXY``,
    ``HTTPS_PROXY`` and ``ALL_PROXY`` name, except to the hosts ``NO_PROXY``
    lists.
    """
    # Like a default httpx client's: certifi's CA bundle, or the one that
    # SSL_CERT_FILE or SSL_CERT_DIR names.
    tls = httpx.create_ssl_context()
    return _UpstreamClient(
        timeout=httpx.Timeout(
            connect=connect_timeout,
            read=read_timeout,
            write=read_timeout,
            pool=connect_timeout,
        ),
        transport=_sharded(max_connections, tls),
        mounts=_environment_mounts(max_connections, tls),
        follow_redirects=False,
    )


@attrs.frozen
class Upstream:
    """Where requests go: scheme, host, port and base path of the upstream."""

    scheme: str
    host: str
    port: int | None
    base_path: bytes

    @classmethod
    def from_url(cls, url: str) -> Upstream:
        """Split an upstream URL such as ``http://h:9/base``."""
        parts = urlsplit(url)
        return cls(
            scheme=parts.scheme,
            host=parts.hostname or "",
            port=parts.port,
            base_path=parts.path.rstrip("/").encode("ascii"),
        )

    def target(self, raw_path: bytes, query: bytes) -> httpx.URL:
        """Return the upstream URL for a request's raw path and query string.

        The host always comes from the upstream, never from the request: an
        absolute-form request target contributes only its path.

        Raises:
            ClientError: the path holds ``.`` or ``..`` segments, which could
                climb out of the upstream's base path.
        """
        if not raw_path.startswith(b"/"):
            raw_path = _path_of_absolute_form(raw_path)
        if _DOT_SEGMENT.search(raw_path):
            msg = "the request path must not contain '.' or '..' segments"
            raise ClientError(msg)
        full = self.base_path + raw_path
        if query:
            full += b"?" + query
        try:
            return httpx.URL(
                scheme=self.scheme, host=self.host, port=self.port, raw_path=full
            )
        except httpx.InvalidURL as exc:
            msg = f"the request target is not a valid URL path: {exc}"
            raise ClientError(msg) from exc


def _path_of_absolute_form(target: bytes) -> bytes:
    if target == b"*":
        msg = "the request target '*' is not supported"
        raise ClientError(msg)
    path = urlsplit(target).path
    if not path.startswith(b"/"):
        msg = "the request target must be a path or an absolute URL"
        raise ClientError(msg)
    return path


# Headers the proxy itself guarantees end to end: a Connection header naming
# them does not make them hop-by-hop.
_NEVER_HOP_BY_HOP: Final = frozenset({b"x-request-id"})


def _connection_listed(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    listed: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            listed.update(token.strip().lower() for token in value.split(b","))
    return frozenset(listed)


def end_to_end_headers(
    headers: Iterable[tuple[bytes, bytes]], *, also_drop: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """Return ``headers`` without hop-by-hop ones, order and repeats kept."""
    headers = list(headers)
    listed = _connection_listed(headers) - _NEVER_HOP_BY_HOP
    drop = HOP_BY_HOP_HEADERS | also_drop | listed
    if any(name.lower() == b"transfer-encoding" for name, _ in headers):
        # Chunked framing wins over a Content-Length beside it (RFC 9112
        # section 6.3); the length would no longer describe what is sent.
        drop |= {b"content-length"}
    return [(name, value) for name, value in headers if name.lower() not in drop]


def has_request_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether request headers announce a body (chunked or a non-zero length)."""
    for name, value in headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length" and value.strip() not in (b"", b"0"):
            return True
    return False


def convert_error(exc: httpx.HTTPError, upstream_url: str) -> UpstreamError:
    """Turn an httpx error into our error type, with a message for the client."""
    where = redact_url(upstream_url)
    if isinstance(exc, httpx.PoolTimeout):
        return UpstreamTimeout(
            f"no free connection to the upstream {where} in time: the proxy's "
            "upstream connections are all in use"
        )
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamTimeout(f"timed out connecting to the upstream {where}")
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"the upstream {where} did not answer in time")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamError(f"cannot connect to the upstream {where}")
    return UpstreamError(
        f"the upstream {where} broke the exchange: {type(exc).__name__}"
    )
