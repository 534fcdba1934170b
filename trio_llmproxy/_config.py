"""The configuration of the proxy server, as one attrs value.

The CLI builds a :class:`ProxyConfig` from flags and environment variables;
embedding applications build the same object in Python. Every field is
validated when the object is made, with a message that names the field and
the rule it broke.
"""

from __future__ import annotations

import ipaddress
import math
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import attrs

from ._errors import ConfigError
from ._redact import redact_url


class ListenFailed(ConfigError):
    """A listener could not be bound: the port is taken, or the host not ours.

    Attributes:
        setting: the setting whose address it was (``listen`` or
            ``events_feed``), for the CLI to name its flag.
    """

    def __init__(self, setting: str, address: str, exc: OSError) -> None:
        self.setting = setting
        super().__init__(f"cannot listen on {address!r}: {exc.strerror or exc}")


def parse_listen_address(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) and check the port.

    Raises:
        ConfigError: the address is not of that form or the port is out of range.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or port_text.endswith("]"):
        msg = f"expected HOST:PORT, got {value!r}"
        raise ConfigError(msg)
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        msg = f"port must be a number, got {port_text!r}"
        raise ConfigError(msg) from None
    if not 0 <= port <= 65535:
        msg = f"port must be between 0 and 65535, got {port}"
        raise ConfigError(msg)
    return host, port


def check_http_url(value: str, *, what: str = "URL") -> str:
    """Return ``value`` without a trailing slash if it is an http(s) URL.

    Raises:
        ConfigError: it is not an absolute http:// or https:// URL with a host.
    """
    shown = display_url(value)
    expected = f"{what} must be an http:// or https:// URL with a host, got {shown!r}"
    try:
        parts = urlsplit(value)
    except ValueError as exc:  # brackets that hold no IPv6 address
        msg = f"{expected}: {exc}"
        raise ConfigError(msg) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(expected)
    if parts.query or parts.fragment:
        msg = f"{what} must not have a query or fragment, got {shown!r}"
        raise ConfigError(msg)
    try:
        parts.port  # noqa: B018  (reading it checks the port)
    except ValueError:
        msg = f"{what} has a port outside 1-65535 or not a number: {shown!r}"
        raise ConfigError(msg) from None
    return value.rstrip("/")


DEFAULT_STREAM: Final = "llm-proxy-events"
# A bearer token shorter than this is too easy to guess for a feed that
# carries every prompt and answer.
MIN_EVENTS_FEED_TOKEN_CHARS: Final = 16
DEFAULT_MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024
_REDIS_SCHEMES: Final = ("redis", "rediss", "unix")


def display_url(url: str) -> str:
    """Return ``url`` fit for a log or a message, even when it is malformed."""
    try:
        return redact_url(url)
    except ValueError:
        # redact_url needs a URL that urlsplit takes apart (a valid port, and
        # brackets around an IPv6 address only); hide any credentials by hand.
        scheme, sep, rest = url.partition("://")
        if not sep:
            return url
        ends = [i for i in map(rest.find, "/?#") if i >= 0]
        end = min(ends, default=len(rest))
        _, at, host = rest[:end].rpartition("@")
        if not at:
            return url
        return f"{scheme}://***@{host}{rest[end:]}"


def check_redis_url(url: str) -> None:
    """Check that ``url`` is a Redis URL that coredis can use.

    Accepted: ``redis://[[user]:password@]host[:port][/db]``, the same with
    ``rediss://`` (TLS), and ``unix://[[user]:password@]/path/to.sock[?db=N]``.

    Raises:
        ConfigError: the URL is not of one of these forms; the message shows
            it without its password.
    """
    shown = display_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        msg = f"invalid Redis URL {shown!r}: {exc}"
        raise ConfigError(msg) from None
    if parts.scheme not in _REDIS_SCHEMES:
        msg = f"Redis URL must start with redis://, rediss:// or unix://, got {shown!r}"
        raise ConfigError(msg)
    if parts.scheme == "unix":
        if not parts.path:
            msg = f"unix:// Redis URL needs a socket path, got {shown!r}"
            raise ConfigError(msg)
        return
    if not parts.hostname:
        msg = f"Redis URL needs a host, got {shown!r}"
        raise ConfigError(msg)
    if port == 0:
        msg = f"Redis URL port must be between 1 and 65535, got {shown!r}"
        raise ConfigError(msg)
    database = parts.path.strip("/")
    if database and not database.isdigit():
        msg = f"Redis URL path must be a database number, got {shown!r}"
        raise ConfigError(msg)


def _listen(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    parse_listen_address(value)


def non_negative(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """attrs validator: a finite number >= 0."""
    if not math.isfinite(value) or value < 0:
        msg = f"{attribute.name} must be a finite number >= 0, got {value!r}"
        raise ConfigError(msg)


def positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """attrs validator: a finite number > 0."""
    if not math.isfinite(value) or value <= 0:
        msg = f"{attribute.name} must be a finite number > 0, got {value!r}"
        raise ConfigError(msg)


def check_upstream_url(value: str, *, what: str = "upstream_url") -> str:
    """Return the upstream URL without a trailing slash if it is usable.

    Raises:
        ConfigError: not an http(s) URL with a host, or it carries credentials.
    """
    value = check_http_url(value, what=what)
    if "@" in urlsplit(value).netloc:
        # httpx would turn them into a Basic Authorization header of its own,
        # overriding the client's; keys belong in the clients' headers.
        msg = (
            "upstream_url must not carry credentials (user:password@); "
            "send keys as headers from the clients instead"
        )
        raise ConfigError(msg.replace("upstream_url", what))
    return value


def _upstream(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    check_upstream_url(value)


def _redis_url(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    check_redis_url(value)


def _names(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(names)


def _strip_slash(value: str) -> str:
    return value.rstrip("/")


def check_metrics_path(value: str) -> str:
    """Return ``value`` if it can be the metrics path ("" turns metrics off).

    Raises:
        ConfigError: it is not empty and not an absolute path without a query.
    """
    if value and (not value.startswith("/") or "?" in value or "#" in value):
        msg = (
            "metrics_path must start with / and have no query (or be empty "
            f"to turn metrics off), got {value!r}"
        )
        raise ConfigError(msg)
    return value


def _metrics_path(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    check_metrics_path(value)


def parse_events_feed_address(value: str) -> str:
    """Return the events feed's ``HOST:PORT``; a bare port means 127.0.0.1.

    Raises:
        ConfigError: the address is neither a port nor ``HOST:PORT``.
    """
    text = value.strip()
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    parse_listen_address(text)
    return text


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address) only reaches this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_events_feed_token(token: str) -> None:
    """Check that ``token`` can protect the events feed.

    Raises:
        ConfigError: it is too short, or holds characters that cannot travel
            in an ``Authorization`` header (the message never shows it).
    """
    if len(token) < MIN_EVENTS_FEED_TOKEN_CHARS:
        msg = (
            f"events_feed_token must be at least {MIN_EVENTS_FEED_TOKEN_CHARS} "
            f"characters, got {len(token)}"
        )
        raise ConfigError(msg)
    allowed = set(string.ascii_letters + string.digits + string.punctuation)
    if not set(token) <= allowed:
        msg = "events_feed_token must hold only printable ASCII without spaces"
        raise ConfigError(msg)


def check_events_feed(address: str | None, token: str | None) -> None:
    """Refuse an events feed bound beyond loopback without a token.

    Raises:
        ConfigError: ``address`` is not a loopback address and ``token`` is
            ``None``.
    """
    if address is None or token is not None:
        return
    host, _ = parse_listen_address(address)
    if not is_loopback_host(host):
        msg = (
            f"events_feed {address!r} is not a loopback address: set "
            "events_feed_token too, or bind the feed to 127.0.0.1"
        )
        raise ConfigError(msg)


def _bound_by(host: str) -> set[str]:
    # The names a listener on ``host`` answers to; "*" for every address.
    name = host.lower()
    if name in ("", "0.0.0.0", "::"):
        return {"*"}
    if name == "localhost":
        return {name, "127.0.0.1", "::1"}
    try:
        return {str(ipaddress.ip_address(name))}
    except ValueError:
        return {name}


def check_events_feed_apart(listen: str, address: str | None) -> None:
    """Refuse an events feed on the proxy's own address and port.

    Raises:
        ConfigError: both use the same port (not 0) on hosts that overlap:
            the same address, ``localhost`` and a loopback address, or a
            wildcard such as ``0.0.0.0`` and any other.
    """
    if address is None:
        return
    listen_host, listen_port = parse_listen_address(listen)
    feed_host, feed_port = parse_listen_address(address)
    if listen_port == 0 or listen_port != feed_port:
        return
    listen_names, feed_names = _bound_by(listen_host), _bound_by(feed_host)
    if "*" in listen_names | feed_names or listen_names & feed_names:
        msg = (
            f"events_feed {address!r} is on the proxy's own port (listen is "
            f"{listen!r}); give the feed a port of its own"
        )
        raise ConfigError(msg)


def _optional_feed_address(value: str | None) -> str | None:
    return None if value is None or value == "" else parse_events_feed_address(value)


def _optional_token(value: str | None) -> str | None:
    return None if value is None or value == "" else value


def _feed_token(
    instance: Any, attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    if value is not None:
        check_events_feed_token(value)


def _optional_path(value: str | Path | None) -> Path | None:
    return None if value is None or value == "" else Path(value)


@attrs.frozen(kw_only=True)
class ProxyConfig:
    """Everything :func:`serve` needs; defaults match the CLI's.

    Times are in seconds and sizes in bytes. ``listen`` may use port 0 to let
    the system choose; :func:`serve` reports the bound address.
    """

    listen: str = attrs.field(default="127.0.0.1:8080", validator=_listen)
    upstream_url: str = attrs.field(
        default="https://api.openai.com",
        converter=_strip_slash,
        validator=_upstream,
        repr=redact_url,
    )
    file_event_log: Path | None = attrs.field(default=None, converter=_optional_path)
    event_bus: Literal["memory", "redis"] = attrs.field(
        default="memory", validator=attrs.validators.in_(("memory", "redis"))
    )
    redis_url: str = attrs.field(
        default="redis://127.0.0.1:6379/0", validator=_redis_url, repr=redact_url
    )
    redis_stream: str = DEFAULT_STREAM
    redis_stream_maxlen: int = attrs.field(default=100_000, validator=positive)
    buffer_size: int = attrs.field(default=1000, validator=positive)
    max_request_body_bytes: int = attrs.field(default=1_048_576, validator=non_negative)
    max_response_body_bytes: int = attrs.field(
        default=4_194_304, validator=non_negative
    )
    connect_timeout: float = attrs.field(default=10.0, validator=positive)
    read_timeout: float = attrs.field(default=600.0, validator=positive)
    shutdown_timeout: float = attrs.field(default=30.0, validator=non_negative)
    secret_headers: tuple[str, ...] = attrs.field(default=(), converter=_names)
    max_upstream_connections: int = attrs.field(default=1000, validator=positive)
    # Limits on what clients may ask of the proxy.
    max_request_bytes: int = attrs.field(
        default=DEFAULT_MAX_REQUEST_BYTES, validator=positive
    )
    client_timeout: float = attrs.field(default=75.0, validator=positive)
    max_concurrent_requests: int = attrs.field(default=1000, validator=positive)
    # Where the proxy answers GET with Prometheus metrics; "" turns it off.
    metrics_path: str = attrs.field(default="/metrics", validator=_metrics_path)
    # The live events feed for ``tail`` (``HOST:PORT``; None turns it off),
    # and the bearer token its clients must send. The token is kept out of
    # the repr, so it never reaches a log line.
    events_feed: str | None = attrs.field(
        default=None, converter=_optional_feed_address
    )
    events_feed_token: str | None = attrs.field(
        default=None, converter=_optional_token, validator=_feed_token, repr=False
    )

    def __attrs_post_init__(self) -> None:
        check_events_feed(self.events_feed, self.events_feed_token)
        check_events_feed_apart(self.listen, self.events_feed)

    @property
    def listen_host(self) -> str:
        """The host part of :attr:`listen`."""
        return parse_listen_address(self.listen)[0]

    @property
    def listen_port(self) -> int:
        """The port part of :attr:`listen`."""
        return parse_listen_address(self.listen)[1]
