"""Tests for the command line, run as real subprocesses.

``python -m trio_llmproxy`` (and the ``llm-proxy`` console script) is started
with a clean environment. Servers listen on a free loopback port, found by
binding port 0 first, and are ready once ``/healthz`` answers; the upstream
is the in-test mock of ``conftest.py``. Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import httpx
import orjson
import pytest
import trio
from conftest import serve_asgi

from trio_llmproxy._asgi import ASGIApp, Receive, Scope, Send

HANG_GUARD_SECONDS = 15
COMMAND_TIMEOUT_SECONDS = 10
CLI = [sys.executable, "-m", "trio_llmproxy"]
CONSOLE_SCRIPT = Path(sys.executable).parent / "llm-proxy"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
CANARY = "sk-canary-5f3a9c0e7b2d4e61a8f9"

# Every variable the CLI reads; tests start from an environment without them.
CLI_VARIABLES = {
    "LISTEN_ADDR",
    "UPSTREAM_URL",
    "FILE_EVENT_LOG",
    "LLM_PROXY_EVENT_BUS",
    "REDIS_URL",
    "REDIS_ADDR",
    "REDIS_DB",
    "REDIS_STREAM",
    "REDIS_STREAM_MAXLEN",
    "OBSERVABILITY_ENABLED",
    "OBSERVABILITY_BUFFER_SIZE",
    "OBSERVABILITY_MAX_REQUEST_BODY_BYTES",
    "OBSERVABILITY_MAX_RESPONSE_BODY_BYTES",
    "UPSTREAM_CONNECT_TIMEOUT",
    "UPSTREAM_READ_TIMEOUT",
    "SHUTDOWN_TIMEOUT",
    "SECRET_HEADERS",
    "LOG_LEVEL",
    "MOCK_LISTEN_ADDR",
    "MOCK_CHUNK_COUNT",
    "MOCK_CHUNK_SIZE",
    "MOCK_CHUNK_DELAY_MS",
    "MOCK_MODEL",
    "EVENTS_FEED_ADDR",
    "EVENTS_FEED_TOKEN",
    "TAIL_FEED_URL",
    "TAIL_JSON",
    "TAIL_PATH",
    "TAIL_STATUS",
    "TAIL_OUTCOME",
    "TAIL_RECONNECT_FOR",
}

SERVER_OPTIONS = {
    "--listen": ("LISTEN_ADDR", "127.0.0.1:8080"),
    "--upstream": ("UPSTREAM_URL", "https://api.openai.com"),
    "--file-event-log": ("FILE_EVENT_LOG", "off"),
    "--event-bus": ("LLM_PROXY_EVENT_BUS", "memory"),
    "--redis-url": ("REDIS_URL", "redis://127.0.0.1:6379/0"),
    "--buffer-size": ("OBSERVABILITY_BUFFER_SIZE", "1000"),
    "--max-request-body-bytes": ("OBSERVABILITY_MAX_REQUEST_BODY_BYTES", "1048576"),
    "--max-response-body-bytes": ("OBSERVABILITY_MAX_RESPONSE_BODY_BYTES", "4194304"),
    "--connect-timeout": ("UPSTREAM_CONNECT_TIMEOUT", "10"),
    "--read-timeout": ("UPSTREAM_READ_TIMEOUT", "600"),
    "--shutdown-timeout": ("SHUTDOWN_TIMEOUT", "30"),
    "--events-feed": ("EVENTS_FEED_ADDR", "off"),
    "--events-feed-token": ("EVENTS_FEED_TOKEN", "none"),
    "--log-level": ("LOG_LEVEL", "info"),
}
MOCK_UPSTREAM_OPTIONS = {
    "--listen": ("MOCK_LISTEN_ADDR", "127.0.0.1:9000"),
    "--chunk-count": ("MOCK_CHUNK_COUNT", "8"),
    "--chunk-size": ("MOCK_CHUNK_SIZE", "4"),
    "--chunk-delay-ms": ("MOCK_CHUNK_DELAY_MS", "0"),
    "--model": ("MOCK_MODEL", "mock-gpt"),
    "--log-level": ("LOG_LEVEL", "info"),
}
TAIL_OPTIONS = {
    "--feed": ("TAIL_FEED_URL", "none"),
    "--token": ("EVENTS_FEED_TOKEN", "none"),
    "--redis-url": ("REDIS_URL", "none"),
    "--redis-stream": ("REDIS_STREAM", "llm-proxy-events"),
    "--json": ("TAIL_JSON", "off"),
    "--path": ("TAIL_PATH", "all"),
    "--status": ("TAIL_STATUS", "all"),
    "--outcome": ("TAIL_OUTCOME", "all"),
    "--reconnect-for": ("TAIL_RECONNECT_FOR", "60"),
}


def clean_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLI_VARIABLES}
    env.update(variables)
    return env


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, program: list[str] = CLI
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*program, *args],
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def options_in_help(text: str) -> dict[str, tuple[str | None, str | None]]:
    """Map each flag in ``--help`` output to its shown variable and default."""
    section = text.split("Options:", 1)[1]
    blocks = re.split(r"\n(?=  -)", section.strip("\n"))
    found: dict[str, tuple[str | None, str | None]] = {}
    for block in blocks:
        # "  --flag METAVAR   Help text...": the flag is before the first gap.
        flags = re.findall(r"--[a-z][a-z-]*", block.strip().split("  ")[0])
        # Help text wraps anywhere, even inside names: compare without spaces.
        squashed = re.sub(r"\s+", "", block)
        envvar = re.search(r"envvar:([A-Z_]+)", squashed)
        default = re.search(r"default:([^;\]]*)", squashed)
        found[flags[-1]] = (
            envvar.group(1) if envvar else None,
            default.group(1) if default else None,
        )
    return found


def same_default(shown: str, expected: str) -> bool:
    try:
        return float(shown) == float(expected)
    except ValueError:
        return expected in shown


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("server", SERVER_OPTIONS),
        ("mock-upstream", MOCK_UPSTREAM_OPTIONS),
        ("tail", TAIL_OPTIONS),
    ],
)
def test_help_lists_every_flag_with_its_variable_and_default(
    command: str, expected: dict[str, tuple[str, str]]
) -> None:
    result = run_cli(command, "--help")

    assert result.returncode == 0
    shown = options_in_help(result.stdout)
    shown.pop("--help")
    for flag, (envvar, default) in expected.items():
        assert flag in shown, flag
        assert shown[flag][0] == envvar, flag
        assert shown[flag][1] is not None, flag
        assert same_default(shown[flag][1], default), (flag, shown[flag][1])
    for flag, (envvar, default) in shown.items():
        assert envvar is not None, f"{flag} has no environment variable"
        assert default is not None, f"{flag} shows no default"


def test_console_script_is_the_same_program_as_python_m() -> None:
    by_module = run_cli("--help")
    by_script = run_cli("--help", program=[str(CONSOLE_SCRIPT)])

    assert by_script.returncode == by_module.returncode == 0
    assert by_script.stdout == by_module.stdout
    assert by_script.stdout.startswith("Usage: llm-proxy ")
    assert re.search(r"^  server ", by_script.stdout, re.MULTILINE)
    assert re.search(r"^  mock-upstream ", by_script.stdout, re.MULTILINE)


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["server", "--listen", "127.0.0.1:70000"], {}, "--listen"),
        (["server"], {"OBSERVABILITY_BUFFER_SIZE": "-5"}, "OBSERVABILITY_BUFFER_SIZE"),
        (["server", "--upstream", "ftp://example.com"], {}, "--upstream"),
        (["server"], {"UPSTREAM_URL": "api.openai.com"}, "UPSTREAM_URL"),
        (["server", "--file-event-log", "{not_a_dir}/e.jsonl"], {}, "--file-event-log"),
        (["server", "--upstream", "http://user:pw@example.com"], {}, "--upstream"),
        (["server", "--redis-url", "redis://:pw@:0/x"], {}, "--redis-url"),
        (["dispatcher", "--backend", "file"], {}, "--file"),
        (["server", "--shutdown-timeout", "nan"], {}, "--shutdown-timeout"),
        (["server"], {"UPSTREAM_CONNECT_TIMEOUT": "inf"}, "UPSTREAM_CONNECT_TIMEOUT"),
        (["server", "--upstream", "http://example.com:99999"], {}, "--upstream"),
        (["server", "--events-feed", "0.0.0.0:0"], {}, "--events-feed"),
        (["server", "--events-feed", "127.0.0.1:x"], {}, "--events-feed"),
        (["server"], {"EVENTS_FEED_TOKEN": "short"}, "EVENTS_FEED_TOKEN"),
        (["tail", "--feed", "ws://127.0.0.1:1/", "--status", "99x"], {}, "--status"),
        (["tail", "--feed", "ws://127.0.0.1:1/", "--status", "600"], {}, "--status"),
        (
            ["tail", "--feed", "ws://127.0.0.1:1/"],
            {"TAIL_STATUS": "2yy"},
            "TAIL_STATUS",
        ),
        (["tail", "--feed", "ws://127.0.0.1:1/", "--outcome", "fine"], {}, "--outcome"),
        (["tail", "--feed", "http://127.0.0.1:1/"], {}, "--feed"),
        (["tail", "--redis-url", "http://127.0.0.1:1/"], {}, "--redis-url"),
        (["tail"], {}, "--feed"),
        (
            ["tail", "--feed", "ws://127.0.0.1:1/", "--redis-url", "redis://h:1/0"],
            {},
            "--redis-url",
        ),
        (
            ["tail"],
            {"TAIL_FEED_URL": "ws://127.0.0.1:1/", "REDIS_URL": "redis://h:1/0"},
            "--redis-url",
        ),
        (
            ["tail", "--feed", "ws://127.0.0.1:1/", "--reconnect-for", "-1"],
            {},
            "--reconnect-for",
        ),
        (["tail", "--feed", "ws://[::1/"], {}, "--feed"),
        (["tail", "--feed", "ws://[not-an-ip]:1/"], {}, "--feed"),
        (["tail", "--feed", "ws://:8181/"], {}, "--feed"),
        (["tail", "--feed", "ws://127.0.0.1:x/"], {}, "--feed"),
        (["tail", "--feed", "ws://127.0.0.1:70000/"], {}, "--feed"),
        (["tail", "--feed", "ws://127.0.0.1:0/"], {}, "--feed"),
        (["tail", "--feed", "127.0.0.1:8181"], {}, "--feed"),
        (["tail"], {"TAIL_FEED_URL": "ws://[::1/"}, "TAIL_FEED_URL"),
        (["server", "--upstream", "http://[::1/"], {}, "--upstream"),
    ],
    ids=[
        "port-out-of-range",
        "negative-buffer-size-variable",
        "ftp-upstream",
        "upstream-variable-without-scheme",
        "unwritable-event-log",
        "upstream-with-credentials",
        "redis-url-without-host",
        "file-backend-without-file",
        "nan-shutdown-timeout",
        "infinite-connect-timeout-variable",
        "upstream-port-out-of-range",
        "non-loopback-feed-without-token",
        "feed-port-not-a-number",
        "short-feed-token-variable",
        "tail-status-not-a-status",
        "tail-status-out-of-range",
        "tail-status-variable",
        "tail-unknown-outcome",
        "tail-feed-not-websocket",
        "tail-redis-url-not-redis",
        "tail-without-source",
        "tail-two-source-flags",
        "tail-two-source-variables",
        "tail-negative-reconnect",
        "tail-feed-unclosed-ipv6-bracket",
        "tail-feed-brackets-without-address",
        "tail-feed-without-host",
        "tail-feed-port-not-a-number",
        "tail-feed-port-out-of-range",
        "tail-feed-port-0",
        "tail-feed-without-scheme",
        "tail-feed-variable-unclosed-bracket",
        "upstream-unclosed-ipv6-bracket",
    ],
)
def test_bad_value_exits_2_with_one_line_naming_it(
    args: list[str], env: dict[str, str], named: str, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    args = [arg.format(not_a_dir=not_a_dir) for arg in args]

    # Port 0, so that a value wrongly accepted starts a server that cannot
    # collide with anything (and the timeout then fails the test).
    result = run_cli(*args, env={"LISTEN_ADDR": "127.0.0.1:0", **env})

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert result.stdout == ""


def test_flag_beats_its_variable() -> None:
    # Were LISTEN_ADDR used, its bad port would be the error; the bad
    # --upstream that follows shows --listen's own value was taken.
    result = run_cli(
        "server",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "ftp://example.com",
        env={"LISTEN_ADDR": "127.0.0.1:70000"},
    )

    assert result.returncode == 2
    assert "--upstream" in result.stderr
    assert "LISTEN_ADDR" not in result.stderr


def test_busy_listen_port_exits_2_with_one_line_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "{}:{}".format(*taken.getsockname())

        result = run_cli("server", "--listen", address)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--listen" in lines[0]
    assert "in use" in lines[0]


def test_malformed_url_in_an_error_line_hides_its_password() -> None:
    result = run_cli("tail", "--feed", "ws://viewer:hunter2-secret@[::1/")

    assert result.returncode == 2
    assert "hunter2-secret" not in result.stderr
    assert "ws://***@[::1/" in result.stderr


@pytest.mark.parametrize(
    ("listen", "feed"),
    [
        ("127.0.0.1:{port}", "127.0.0.1:{port}"),
        ("127.0.0.1:{port}", "{port}"),
        ("0.0.0.0:{port}", "127.0.0.1:{port}"),
        ("localhost:{port}", "127.0.0.1:{port}"),
    ],
    ids=["same-address", "feed-port-alone", "wildcard-listen", "localhost"],
)
def test_feed_on_the_proxy_port_exits_2_with_one_line(listen: str, feed: str) -> None:
    port = free_port()

    result = run_cli(
        "server",
        "--listen",
        listen.format(port=port),
        "--events-feed",
        feed.format(port=port),
    )

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--events-feed" in lines[0]
    assert "own port" in lines[0]


def test_listen_port_taken_by_the_feed_at_bind_time_exits_2_with_one_line() -> None:
    # The check at start-up sees two different addresses, but an IPv6 socket
    # on an IPv4-mapped address takes the IPv4 port too: binding fails.
    port = free_port()

    result = run_cli(
        "server",
        "--listen",
        f"[::ffff:127.0.0.1]:{port}",
        "--events-feed",
        f"127.0.0.1:{port}",
    )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("llm-proxy: error: invalid value for --listen")
    assert "in use" in last


@attrs.define
class RunningServer:
    process: trio.Process
    url: str
    stderr_path: Path
    event_log: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def events(self) -> list[dict[str, object]]:
        data = self.event_log.read_bytes()
        return [orjson.loads(line) for line in data.splitlines()]

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        with trio.fail_after(COMMAND_TIMEOUT_SECONDS):
            return await self.process.wait()


async def wait_until_healthy(url: str, process: trio.Process, stderr: Path) -> None:
    with trio.fail_after(COMMAND_TIMEOUT_SECONDS):
        async with httpx.AsyncClient() as client:
            while True:
                if process.returncode is not None:
                    output = await trio.Path(stderr).read_text()
                    pytest.fail(f"the server exited early:\n{output}")
                try:
                    response = await client.get(f"{url}/healthz")
                except httpx.TransportError:
                    await trio.sleep(0.05)
                    continue
                assert response.text == "ok"
                return


@asynccontextmanager
async def running_server(
    tmp_path: Path, upstream: str, *args: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[RunningServer]:
    """Start ``server`` as a subprocess; kill it at the end if still running."""
    url = f"http://127.0.0.1:{free_port()}"
    event_log = tmp_path / "data" / "events.jsonl"
    stderr_path = tmp_path / "server.err"
    command = [
        *CLI,
        "server",
        "--listen",
        url.removeprefix("http://"),
        "--upstream",
        upstream,
        "--file-event-log",
        str(event_log),
        "--shutdown-timeout",
        "5",
        *args,
    ]
    with stderr_path.open("wb") as stderr:
        async with trio.open_nursery() as nursery:
            run = partial(
                trio.run_process,
                command,
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=clean_env(**(env or {})),
            )
            process: trio.Process = await nursery.start(run)
            await wait_until_healthy(url, process, stderr_path)
            yield RunningServer(process, url, stderr_path, event_log)
            # Normally the test has stopped it; otherwise end it now.
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name
)
async def test_signal_exits_0_after_finishing_requests_and_logging_each(
    signum: signal.Signals, tmp_path: Path, mock_upstream_url: str
) -> None:
    slow = {"X-Mock-Chunk-Count": "6", "X-Mock-Chunk-Delay-Ms": "50"}

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with (
            running_server(tmp_path, mock_upstream_url) as server,
            httpx.AsyncClient(base_url=server.url) as client,
        ):
            for _ in range(3):
                response = await client.post("/v1/chat/completions", json=CHAT)
                assert response.status_code == 200
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                json={**CHAT, "stream": True},
                headers=slow,
            ) as stream:
                chunks = stream.aiter_raw()
                first = await anext(chunks)
                server.process.send_signal(signum)
                rest = b"".join([chunk async for chunk in chunks])
            with trio.fail_after(COMMAND_TIMEOUT_SECONDS):
                returncode = await server.process.wait()

    assert returncode == 0, server.stderr()
    assert (first + rest).endswith(b"data: [DONE]\n\n")
    events = server.events()
    assert len(events) == 4
    assert all(event["outcome"] == "ok" for event in events)
    assert [event["streamed"] for event in events] == [False, False, False, True]


async def test_observability_enabled_logs_one_deprecation_warning(
    tmp_path: Path, mock_upstream_url: str
) -> None:
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with running_server(
            tmp_path, mock_upstream_url, env={"OBSERVABILITY_ENABLED": "true"}
        ) as server:
            returncode = await server.stop()

    assert returncode == 0
    mentions = [
        line for line in server.stderr().splitlines() if "OBSERVABILITY_ENABLED" in line
    ]
    assert len(mentions) == 1
    assert "WARNING" in mentions[0]
    assert "deprecated" in mentions[0]


async def canary_upstream(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers every request with a cookie that holds the canary."""
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"Content-Type", b"application/json"),
                (b"Set-Cookie", f"session={CANARY}; Path=/".encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"{}"})


@attrs.define
class StoppableUpstream:
    """Serves an ASGI app until :meth:`stop`, which returns once it is closed."""

    app: ASGIApp
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _stopped: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[str]) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    task_status.started(await serve_asgi(nursery, self.app))
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        self._scope.cancel()
        # Once the task is over, the listening socket is closed: connections
        # are refused rather than left waiting in the backlog.
        await self._stopped.wait()


async def test_secrets_reach_neither_the_event_log_nor_debug_logs(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    secrets = {
        "Authorization": f"Bearer {CANARY}",
        "x-api-key": CANARY,
        "Cookie": f"session={CANARY}; theme=dark",
    }
    upstream = StoppableUpstream(canary_upstream)

    with trio.fail_after(HANG_GUARD_SECONDS):
        upstream_url = await nursery.start(upstream.run)
        async with (
            running_server(tmp_path, upstream_url, "--log-level", "debug") as server,
            httpx.AsyncClient(base_url=server.url, headers=secrets) as client,
        ):
            answered = await client.post("/v1/chat/completions", json=CHAT)
            # Now the upstream is gone: the next call takes the 502 path.
            await upstream.stop()
            unreachable = await client.post("/v1/chat/completions", json=CHAT)
            returncode = await server.stop()

    assert answered.status_code == 200
    assert unreachable.status_code == 502
    assert returncode == 0
    events = server.events()
    assert [event["status"] for event in events] == [200, 502]
    assert CANARY not in server.event_log.read_text()
    stderr = server.stderr()
    # Debug lines are on (the access log and the bus log at DEBUG and INFO).
    assert "trio_llmproxy.access" in stderr
    assert CANARY not in stderr
    # The last four characters of the key are all an event keeps of it.
    headers = events[0]["request_headers"]
    assert isinstance(headers, dict)
    assert headers["authorization"] == [f"Bearer [REDACTED]...{CANARY[-4:]}"]
