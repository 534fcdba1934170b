"""The command line: ``python -m trio_llmproxy`` and ``llm-proxy``.

Every option has an environment variable; a flag beats its variable. A bad
value stops start-up with one line naming the flag and the variable, and
exit status 2.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import trio
from click.core import ParameterSource

from ._config import (
    ListenFailed,
    ProxyConfig,
    check_events_feed,
    check_events_feed_apart,
    check_events_feed_token,
    check_http_url,
    check_metrics_path,
    check_redis_url,
    check_upstream_url,
    parse_events_feed_address,
    parse_listen_address,
)
from ._errors import ConfigError
from ._redact import redact_url
from ._server import ServerHandle, serve
from ._sinks import JsonlFileSink, Sink, StdoutSink, open_event_log

if TYPE_CHECKING:
    from ._tail import Source

EXIT_USAGE = 2
LOG_LEVELS = ("debug", "info", "warning", "error")
DEPRECATED_VARIABLES = {
    "OBSERVABILITY_ENABLED": "events are always on; the variable is ignored",
}

logger = logging.getLogger(__name__)


def _check_can_listen(value: str) -> None:
    """Bind ``HOST:PORT`` once, as Hypercorn will, and let it go.

    A busy port or a host that is not ours then fails at start-up with one
    line, rather than with a traceback from inside the server.

    Raises:
        ConfigError: the address cannot be bound.
    """
    host, port = parse_listen_address(value)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        msg = f"cannot listen on {value!r}: {exc.strerror or exc}"
        raise ConfigError(msg) from exc


class _Checked(click.ParamType[str]):
    """A text value that ``check`` returns as it should be used, or refuses.

    ``check`` raises ConfigError with the one line to show. Where that line
    names the setting by its Python name (``"metrics_path must ..."``), which
    the flag and its variable already name, ``subject`` is that name and is
    left out (``"must ..."``).
    """

    def __init__(
        self, name: str, check: Callable[[str], str], subject: str = ""
    ) -> None:
        self.name = name
        self._check = check
        self._subject = f"{subject} must" if subject else ""

    def convert(self, value: Any, param: click.Parameter | None, ctx: Any) -> str:
        try:
            return self._check(str(value))
        except ConfigError as exc:
            message = str(exc)
            if self._subject:
                message = message.replace(self._subject, "must")
            self.fail(message, param, ctx)


def _returning(check: Callable[[str], object]) -> Callable[[str], str]:
    """A check that returns the value it was given, once ``check`` accepts it."""

    def checked(value: str) -> str:
        check(value)
        return value

    return checked


def _listen_address(value: str) -> str:
    parse_listen_address(value)
    _check_can_listen(value)
    return value


def _feed_address(value: str) -> str:
    address = parse_events_feed_address(value)
    _check_can_listen(address)
    return address


def _metrics_path(value: str) -> str:
    # An empty variable is ignored by click, so "off" also turns it off.
    return check_metrics_path("" if value.lower() == "off" else value)


def _status_filter(value: str) -> str:
    from ._tail import parse_status

    return parse_status(value)


def _feed_url(value: str) -> str:
    from ._tail import FeedSource

    FeedSource(value)
    return value


LISTEN = _Checked("HOST:PORT", _listen_address)
HTTP_URL = _Checked("URL", check_http_url, subject="URL")
UPSTREAM_URL = _Checked("URL", partial(check_upstream_url, what="it"))
REDIS_URL = _Checked("URL", _returning(check_redis_url))
METRICS_PATH = _Checked("PATH", _metrics_path, subject="metrics_path")
FEED_ADDRESS = _Checked("[HOST:]PORT", _feed_address)
FEED_TOKEN = _Checked(
    "TOKEN", _returning(check_events_feed_token), subject="events_feed_token"
)
FEED_URL = _Checked("URL", _feed_url)
STATUS_FILTER = _Checked("STATUS", _status_filter)
POSITIVE_INT = click.IntRange(min=1)
NON_NEGATIVE_INT = click.IntRange(min=0)


class _Seconds(click.ParamType[float]):
    """A finite number of seconds (NaN and infinity are refused)."""

    name = "SECONDS"

    def __init__(self, *, allow_zero: bool, name: str = "SECONDS") -> None:
        self._allow_zero = allow_zero
        self.name = name

    def convert(self, value: Any, param: click.Parameter | None, ctx: Any) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        lowest = ">= 0" if self._allow_zero else "> 0"
        if (  # a number of seconds, or of milliseconds for NAME=MILLISECONDS
            not math.isfinite(seconds)
            or seconds < 0
            or (seconds == 0 and not self._allow_zero)
        ):
            self.fail(f"must be a finite number {lowest}, got {value!r}", param, ctx)
        return seconds


POSITIVE_SECONDS = _Seconds(allow_zero=False)
NON_NEGATIVE_SECONDS = _Seconds(allow_zero=True)


def _option(*names: str, envvar: str, **kwargs: Any) -> Callable[[Any], Any]:
    kwargs.setdefault("show_default", True)
    return click.option(*names, envvar=envvar, show_envvar=True, **kwargs)


def _log_level_option() -> Callable[[Any], Any]:
    return _option(
        "--log-level",
        envvar="LOG_LEVEL",
        type=click.Choice(LOG_LEVELS, case_sensitive=False),
        default="info",
        help="Least severe log level shown.",
    )


def _redis_url_default() -> str:
    """``REDIS_URL``'s fallback: ``REDIS_ADDR`` and ``REDIS_DB``, for compatibility."""
    address = os.environ.get("REDIS_ADDR")
    if not address:
        return "redis://127.0.0.1:6379/0"
    return f"redis://{address}/{os.environ.get('REDIS_DB', '0')}"


def _redis_url_option() -> Callable[[Any], Any]:
    return _option(
        "--redis-url",
        envvar="REDIS_URL",
        type=REDIS_URL,
        default=_redis_url_default,
        show_default="redis://127.0.0.1:6379/0, or from REDIS_ADDR and REDIS_DB",
        help="Redis server of the shared bus; rediss:// for TLS, password and "
        "database number in the URL.",
    )


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs each upstream URL (a key in a query string included) and
    # httpcore's trace prints response headers verbatim (Set-Cookie included):
    # both stay quiet even at --log-level debug; the access log has the rest.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.INFO)
    for variable, why in DEPRECATED_VARIABLES.items():
        if variable in os.environ:
            logger.warning("%s is deprecated: %s", variable, why)


def _run_until_signal(
    start: Callable[..., Awaitable[None]], stop: Callable[[Any], None]
) -> None:
    """Run ``start`` (a ``nursery.start`` target) until SIGINT or SIGTERM.

    The first signal calls ``stop`` with what ``start`` reported, for a
    graceful shutdown; a second one cancels everything at once. SIGHUP is
    logged and otherwise ignored, rather than killing the process.
    """

    async def main() -> None:
        watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        with trio.open_signal_receiver(*watched) as signals:
            async with trio.open_nursery() as nursery:

                async def run(*, task_status: trio.TaskStatus[Any]) -> None:
                    await start(task_status=task_status)
                    # Stopped by itself or by a signal: stop watching signals.
                    nursery.cancel_scope.cancel()

                handle = await nursery.start(run)
                stopping = False
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        # Log rotation sends it; the event log follows a
                        # moved file by itself, so there is nothing to do.
                        logger.info("SIGHUP received: ignored")
                    elif not stopping:
                        logger.info("%s received", signal.Signals(signum).name)
                        stop(handle)
                        stopping = True
                    else:
                        logger.warning("second signal: stopping at once")
                        nursery.cancel_scope.cancel()

    trio.run(main)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """trio_llmproxy: a transparent, instrumented proxy for OpenAI-compatible APIs."""


@cli.command("server")
@_option(
    "--listen",
    envvar="LISTEN_ADDR",
    type=LISTEN,
    default="127.0.0.1:8080",
    help="Address to accept clients on (HOST:PORT).",
)
@_option(
    "--upstream",
    envvar="UPSTREAM_URL",
    type=UPSTREAM_URL,
    default="https://api.openai.com",
    help="Base URL requests are forwarded to; the path and query are appended.",
)
@_option(
    "--file-event-log",
    envvar="FILE_EVENT_LOG",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_default="off",
    help="Append one JSON event per request to this file (JSONL).",
)
@_option(
    "--event-bus",
    envvar="LLM_PROXY_EVENT_BUS",
    type=click.Choice(["memory", "redis"]),
    default="memory",
    help="Where events go: this process only, or a Redis stream shared "
    "with dispatchers.",
)
@_redis_url_option()
@_option(
    "--redis-stream",
    envvar="REDIS_STREAM",
    default="llm-proxy-events",
    help="Redis stream the events are written to.",
)
@_option(
    "--redis-stream-maxlen",
    envvar="REDIS_STREAM_MAXLEN",
    type=POSITIVE_INT,
    default=100_000,
    help="Approximate length the Redis stream is trimmed to.",
)
@_option(
    "--buffer-size",
    envvar="OBSERVABILITY_BUFFER_SIZE",
    type=POSITIVE_INT,
    default=1000,
    help="Events a subscriber may have waiting before new ones are dropped.",
)
@_option(
    "--max-request-body-bytes",
    envvar="OBSERVABILITY_MAX_REQUEST_BODY_BYTES",
    type=NON_NEGATIVE_INT,
    default=1_048_576,
    help="Request body bytes captured in an event (the rest still passes).",
)
@_option(
    "--max-response-body-bytes",
    envvar="OBSERVABILITY_MAX_RESPONSE_BODY_BYTES",
    type=NON_NEGATIVE_INT,
    default=4_194_304,
    help="Response body bytes captured in an event (the rest still passes).",
)
@_option(
    "--connect-timeout",
    envvar="UPSTREAM_CONNECT_TIMEOUT",
    type=POSITIVE_SECONDS,
    default=10.0,
    help="Seconds to connect to the upstream.",
)
@_option(
    "--read-timeout",
    envvar="UPSTREAM_READ_TIMEOUT",
    type=POSITIVE_SECONDS,
    default=600.0,
    help="Seconds to wait for the response head, and between chunks.",
)
@_option(
    "--shutdown-timeout",
    envvar="SHUTDOWN_TIMEOUT",
    type=NON_NEGATIVE_SECONDS,
    default=30.0,
    help="Seconds to finish in-flight requests and drain events on shutdown.",
)
@_option(
    "--max-request-bytes",
    envvar="MAX_REQUEST_BYTES",
    type=POSITIVE_INT,
    default=64 * 1024 * 1024,
    help="Largest request body accepted; a larger one is answered 413.",
)
@_option(
    "--client-timeout",
    envvar="CLIENT_TIMEOUT",
    type=POSITIVE_SECONDS,
    default=75.0,
    help="Seconds a client connection may stay idle, or take to send a "
    "request head, or pause inside a request body (then 408).",
)
@_option(
    "--max-concurrent-requests",
    envvar="MAX_CONCURRENT_REQUESTS",
    type=POSITIVE_INT,
    default=1000,
    help="Requests and WebSocket sessions handled at once; more are "
    "answered 503 at once.",
)
@_option(
    "--secret-header",
    "secret_headers",
    envvar="SECRET_HEADERS",
    multiple=True,
    default=(),
    show_default="none",
    help="Extra header name to redact in events and logs (repeatable; the "
    "variable takes names separated by spaces).",
)
@_option(
    "--metrics-path",
    envvar="METRICS_PATH",
    type=METRICS_PATH,
    default="/metrics",
    help="Path where the proxy itself answers GET with Prometheus metrics "
    "(never forwarded or recorded); '' or 'off' turns them off.",
)
@_option(
    "--events-feed",
    envvar="EVENTS_FEED_ADDR",
    type=FEED_ADDRESS,
    default=None,
    show_default="off",
    help="Serve every event live over a WebSocket on this address, for "
    "`llm-proxy tail --feed` (a port alone binds 127.0.0.1; never on the "
    "proxy's own port).",
)
@_option(
    "--events-feed-token",
    envvar="EVENTS_FEED_TOKEN",
    type=FEED_TOKEN,
    default=None,
    show_default="none",
    help="Bearer token the feed's clients must send (at least 16 "
    "characters); required when the feed is not on loopback.",
)
@_log_level_option()
def server_command(**options: Any) -> None:
    """Run the proxy."""
    _check_events_feed(
        options["listen"], options["events_feed"], options["events_feed_token"]
    )
    _setup_logging(options.pop("log_level"))
    config = ProxyConfig(
        listen=options["listen"],
        upstream_url=options["upstream"],
        file_event_log=options["file_event_log"],
        event_bus=options["event_bus"],
        redis_url=options["redis_url"],
        redis_stream=options["redis_stream"],
        redis_stream_maxlen=options["redis_stream_maxlen"],
        buffer_size=options["buffer_size"],
        max_request_body_bytes=options["max_request_body_bytes"],
        max_response_body_bytes=options["max_response_body_bytes"],
        connect_timeout=options["connect_timeout"],
        read_timeout=options["read_timeout"],
        shutdown_timeout=options["shutdown_timeout"],
        max_request_bytes=options["max_request_bytes"],
        client_timeout=options["client_timeout"],
        max_concurrent_requests=options["max_concurrent_requests"],
        secret_headers=options["secret_headers"],
        metrics_path=options["metrics_path"],
        events_feed=options["events_feed"],
        events_feed_token=options["events_feed_token"],
    )
    if config.file_event_log is not None:
        _check_event_log(config.file_event_log)
    try:
        _run_until_signal(partial(serve, config), ServerHandle.shutdown)
    except* ListenFailed as group:
        # Free when checked at start-up, but taken by the time it was bound
        # (or by the server's other listener, under another name).
        failure = group.exceptions[0]
        while isinstance(failure, BaseExceptionGroup):  # nurseries nest them
            failure = failure.exceptions[0]
        assert isinstance(failure, ListenFailed)
        hint = _hint(failure.setting)
        raise click.BadParameter(str(failure), param_hint=hint) from None


def _check_events_feed(listen: str, address: str | None, token: str | None) -> None:
    try:
        check_events_feed(address, token)
        check_events_feed_apart(listen, address)
    except ConfigError as exc:
        msg = str(exc).replace(
            "set events_feed_token", f"set {_hint('events_feed_token')}"
        )
        msg = msg.replace(f"events_feed {address!r}", repr(address))
        msg = msg.replace("(listen is ", f"({_hint('listen')} is ")
        raise click.BadParameter(msg, param_hint=_hint("events_feed")) from exc


def _check_event_log(path: Path, option: str = "file_event_log") -> None:
    try:
        os.close(open_event_log(path))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint=_hint(option)) from exc


def _hint(name: str) -> str:
    ctx = click.get_current_context()
    for param in ctx.command.params:
        if param.name == name and isinstance(param, click.Option):
            return _param_hint(ctx, param)
    return name


def _param_hint(ctx: click.Context, param: click.Parameter) -> str:
    flag = param.opts[0] if param.opts else str(param.name)
    envvar = getattr(param, "envvar", None)
    if isinstance(envvar, str):
        if ctx.get_parameter_source(str(param.name)) == ParameterSource.ENVIRONMENT:
            return f"{envvar} (--{flag.lstrip('-')})"
        return f"{flag} ({envvar})"
    return flag


@cli.command("mock-upstream")
@_option(
    "--listen",
    envvar="MOCK_LISTEN_ADDR",
    type=LISTEN,
    default="127.0.0.1:9000",
    help="Address to accept clients on (HOST:PORT).",
)
@_option(
    "--chunk-count",
    envvar="MOCK_CHUNK_COUNT",
    type=NON_NEGATIVE_INT,
    default=8,
    help="Content chunks per streamed completion (header X-Mock-Chunk-Count).",
)
@_option(
    "--chunk-size",
    envvar="MOCK_CHUNK_SIZE",
    type=NON_NEGATIVE_INT,
    default=4,
    help="Characters per content chunk (header X-Mock-Chunk-Size).",
)
@_option(
    "--chunk-delay-ms",
    envvar="MOCK_CHUNK_DELAY_MS",
    type=_Seconds(allow_zero=True, name="MILLISECONDS"),
    default=0.0,
    help="Milliseconds between chunks (header X-Mock-Chunk-Delay-Ms).",
)
@_option(
    "--model",
    envvar="MOCK_MODEL",
    default="mock-gpt",
    help="Model named in answers when the request names none.",
)
@_log_level_option()
def mock_upstream_command(
    listen: str,
    chunk_count: int,
    chunk_size: int,
    chunk_delay_ms: float,
    model: str,
    log_level: str,
) -> None:
    """Run a local OpenAI-compatible fake upstream (no key needed)."""
    from ._mock_upstream import (
        MockUpstreamHandle,
        MockUpstreamSettings,
        serve_mock_upstream,
    )

    _setup_logging(log_level)
    settings = MockUpstreamSettings(
        chunk_count=chunk_count,
        chunk_size=chunk_size,
        chunk_delay_seconds=chunk_delay_ms / 1000.0,
        model=model,
    )
    _run_until_signal(
        partial(serve_mock_upstream, settings, listen=listen),
        MockUpstreamHandle.shutdown,
    )


@cli.command("dispatcher")
@_option(
    "--backend",
    envvar="DISPATCHER_BACKEND",
    type=click.Choice(["file", "stdout", "http"]),
    required=True,
    show_default=False,
    help="Where events go: a JSONL file, standard output, or an HTTP endpoint.",
)
@_option(
    "--file",
    "file_path",
    envvar="DISPATCHER_FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_default="none",
    help="JSONL file to append to (--backend file).",
)
@_option(
    "--url",
    envvar="DISPATCHER_URL",
    type=HTTP_URL,
    default=None,
    show_default="none",
    help="Endpoint that receives each batch as a JSON array (--backend http).",
)
@_option(
    "--http-timeout",
    envvar="DISPATCHER_HTTP_TIMEOUT",
    type=POSITIVE_SECONDS,
    default=30.0,
    help="Seconds one POST to the endpoint may take (--backend http).",
)
@_redis_url_option()
@_option(
    "--redis-stream",
    envvar="REDIS_STREAM",
    default="llm-proxy-events",
    help="Redis stream to read.",
)
@_option(
    "--consumer-group",
    envvar="DISPATCHER_CONSUMER_GROUP",
    default=None,
    show_default="the backend's name",
    help="Consumer group; dispatchers of one group share the work.",
)
@_option(
    "--consumer-name",
    envvar="DISPATCHER_CONSUMER_NAME",
    default=None,
    show_default="unique per process",
    help="This dispatcher's name in the group; a stable name lets a restarted "
    "dispatcher take up what it left pending at once.",
)
@_option(
    "--batch-size",
    envvar="DISPATCHER_BATCH_SIZE",
    type=POSITIVE_INT,
    default=100,
    help="Most events delivered in one batch.",
)
@_option(
    "--flush-interval",
    envvar="DISPATCHER_FLUSH_INTERVAL",
    type=NON_NEGATIVE_SECONDS,
    default=1.0,
    help="Seconds a batch waits for more events once it holds one.",
)
@_option(
    "--claim-idle",
    envvar="DISPATCHER_CLAIM_IDLE",
    type=POSITIVE_SECONDS,
    default=60.0,
    help="Seconds an entry may stay pending with another consumer before "
    "this one claims it.",
)
@_option(
    "--retries",
    envvar="DISPATCHER_RETRIES",
    type=POSITIVE_INT,
    default=5,
    help="Attempts per batch before it is left pending for later.",
)
@_option(
    "--shutdown-timeout",
    envvar="SHUTDOWN_TIMEOUT",
    type=NON_NEGATIVE_SECONDS,
    default=30.0,
    help="Seconds to finish the batch in hand on shutdown.",
)
@_log_level_option()
def dispatcher_command(**options: Any) -> None:
    """Deliver events from the shared Redis bus to a backend."""
    from ._dispatch import DispatcherConfig, RetryPolicy

    _setup_logging(options.pop("log_level"))
    sink = _dispatcher_sink(options)
    config = DispatcherConfig(
        redis_url=options["redis_url"],
        stream=options["redis_stream"],
        consumer_group=options["consumer_group"],
        consumer_name=options["consumer_name"],
        batch_size=options["batch_size"],
        flush_interval=options["flush_interval"],
        claim_idle_seconds=options["claim_idle"],
        shutdown_timeout=options["shutdown_timeout"],
        retry=RetryPolicy(attempts=options["retries"]),
    )
    _run_until_signal(partial(_serve_dispatcher, config, sink), trio.Event.set)


def _dispatcher_sink(options: dict[str, Any]) -> Sink:
    backend = options["backend"]
    if backend == "file":
        path = options["file_path"]
        if path is None:
            raise click.UsageError("--backend file needs --file PATH (DISPATCHER_FILE)")
        _check_event_log(path, "file_path")
        return JsonlFileSink(path)
    if backend == "http":
        from ._http_sink import HttpSink

        if options["url"] is None:
            raise click.UsageError("--backend http needs --url URL (DISPATCHER_URL)")
        return HttpSink(options["url"], timeout=options["http_timeout"])
    return StdoutSink()


async def _serve_dispatcher(
    config: Any, sink: Sink, *, task_status: trio.TaskStatus[trio.Event]
) -> None:
    """Run a dispatcher until the reported event is set, then finish up."""
    from ._dispatch import serve_dispatcher

    stopping = trio.Event()
    task_status.started(stopping)
    async with sink:
        logger.info(
            "dispatching %s to the %s backend",
            redact_url(config.redis_url),
            sink.name,
        )
        await serve_dispatcher(config, sink, stopping=stopping)


@cli.command("tail")
@_option(
    "--feed",
    envvar="TAIL_FEED_URL",
    type=FEED_URL,
    default=None,
    show_default="none",
    help="A running server's events feed (server --events-feed), such as "
    "ws://127.0.0.1:8181/.",
)
@_option(
    "--token",
    envvar="EVENTS_FEED_TOKEN",
    type=FEED_TOKEN,
    default=None,
    show_default="none",
    help="Bearer token the events feed asks for.",
)
@_option(
    "--redis-url",
    envvar="REDIS_URL",
    type=REDIS_URL,
    default=None,
    show_default="none",
    help="Read the shared bus's Redis stream instead of a feed (without a "
    "consumer group: dispatchers lose nothing).",
)
@_option(
    "--redis-stream",
    envvar="REDIS_STREAM",
    default="llm-proxy-events",
    help="Redis stream to read.",
)
@_option(
    "--json",
    "json_output",
    envvar="TAIL_JSON",
    is_flag=True,
    default=False,
    show_default="off",
    help="Print each event's JSON object, one per line, instead of a summary.",
)
@_option(
    "--path",
    "paths",
    envvar="TAIL_PATH",
    multiple=True,
    default=(),
    show_default="all",
    help="Show only paths starting with this prefix, or matching this glob "
    "(with * ? or [, whole path; * matches / too). Repeatable.",
)
@_option(
    "--status",
    "statuses",
    envvar="TAIL_STATUS",
    type=STATUS_FILTER,
    multiple=True,
    default=(),
    show_default="all",
    help="Show only this status code (404) or class (4xx). Repeatable.",
)
@_option(
    "--outcome",
    "outcomes",
    envvar="TAIL_OUTCOME",
    type=click.Choice(
        ["ok", "client_disconnected", "upstream_error", "upstream_timeout"]
    ),
    multiple=True,
    default=(),
    show_default="all",
    help="Show only events with this outcome. Repeatable.",
)
@_option(
    "--reconnect-for",
    envvar="TAIL_RECONNECT_FOR",
    type=NON_NEGATIVE_SECONDS,
    default=60.0,
    help="Seconds to keep reconnecting when the source goes away, then exit "
    "1; 0 exits at once.",
)
def tail_command(**options: Any) -> None:
    """Show events as they happen, one line each."""
    from ._tail import EventFilter, Printer, choose_source

    ctx = click.get_current_context()
    feed, redis_url = _tail_sources(ctx, options["feed"], options["redis_url"])
    source = choose_source(feed, options["token"], redis_url, options["redis_stream"])
    printer = Printer(
        EventFilter(
            paths=options["paths"],
            statuses=options["statuses"],
            outcomes=options["outcomes"],
        ),
        json_output=options["json_output"],
        write=_write_line,
        warn=_warn,
        notices=feed is not None,
    )
    _run_tail(source, printer, options["reconnect_for"])


def _tail_sources(
    ctx: click.Context, feed: str | None, redis_url: str | None
) -> tuple[str | None, str | None]:
    """Keep exactly one source; a flag beats a variable, as for every option."""

    def level(name: str, value: object) -> int:
        source = ctx.get_parameter_source(name)
        if source == ParameterSource.COMMANDLINE:
            return 2
        return 1 if value is not None else 0

    feed_level, redis_level = level("feed", feed), level("redis_url", redis_url)
    if feed_level and feed_level == redis_level:
        where = "flags" if feed_level == 2 else "variables"
        msg = (
            f"--feed and --redis-url are two sources ({where}); give one: "
            "a server's events feed, or the Redis stream"
        )
        raise click.UsageError(msg)
    if feed_level > redis_level:
        return feed, None
    if redis_level:
        return None, redis_url
    if os.environ.get("REDIS_ADDR"):
        return None, _redis_url_default()
    return None, None


class _OutputClosed(Exception):
    """Standard output's reader has left (``tail | head``).

    Not an ``OSError``: the Redis source takes those for Redis trouble.
    """


def _write_line(line: str) -> None:
    try:
        sys.stdout.write(line)
        sys.stdout.flush()
    except BrokenPipeError:
        raise _OutputClosed from None


def _warn(message: str) -> None:
    from ._tail import printable

    click.echo(f"llm-proxy tail: {printable(message)}", err=True)


def _run_tail(
    source: Source, printer: Callable[[str], None], reconnect_seconds: float
) -> None:
    """Follow ``source`` until SIGINT or SIGTERM (exit 0) or a failure (exit 1)."""
    from ._tail import TailError, follow, printable

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_signal)
                await follow(
                    source, printer, _warn, reconnect_seconds=reconnect_seconds
                )

    try:
        trio.run(main)
    except* TailError as group:
        # The reason can come from the network (a Redis error, say).
        message = printable(str(group.exceptions[0]))
        click.echo(f"llm-proxy: error: {message}", err=True)
        sys.exit(1)
    except* _OutputClosed:
        # The reader of our output left (`tail | head`): nothing to say.
        _silence_stdout()


def _silence_stdout() -> None:
    # Python flushes stdout at exit; a closed pipe would raise there again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _fail(message: str) -> NoReturn:
    click.echo(f"llm-proxy: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``llm-proxy`` and ``python -m trio_llmproxy``."""
    try:
        cli.main(args=argv, prog_name="llm-proxy", standalone_mode=False)
    except click.BadParameter as exc:
        hint = exc.param_hint
        if exc.ctx is not None and exc.param is not None:
            hint = _param_hint(exc.ctx, exc.param)
        _fail(f"invalid value for {hint}: {exc.message}")
    except click.UsageError as exc:
        _fail(exc.format_message().splitlines()[0])
    except ConfigError as exc:
        _fail(str(exc))
    except click.exceptions.Abort:
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
