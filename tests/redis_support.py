"""A real ``redis-server`` for the tests, started once per session.

Import the fixtures into a test module to use them (they are registered
under the names ``redis_server`` and ``redis_url``; the functions carry a
``_fixture`` suffix so that test parameters do not shadow the imports)::

    from redis_support import redis_server_fixture, redis_url_fixture  # noqa: F401

The server is a child process on a free loopback port with persistence off,
so a restart brings it back empty, as after a crash of a Redis without
persistence. ``redis_url`` flushes it before each test and makes sure it runs
(a test that stopped it may have failed half-way). Without a ``redis-server``
binary the tests are skipped, except under ``CI=true``, where that is a
failure.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator

import pytest

STARTUP_TIMEOUT_SECONDS = 10.0
# coredis (6.x) creates anyio memory streams for each connection and leaves
# them unclosed when the connection attempt fails, as it does throughout a
# Redis outage; anyio then warns when they are garbage collected. That is the
# library's doing, and they hold no operating-system resource. Modules that
# use the server mark themselves with this (``pytestmark``).
ignore_coredis_stream_leak = pytest.mark.filterwarnings(
    r"ignore:Unclosed <MemoryObject(Send|Receive)Stream:ResourceWarning"
)
_INSTALL_HINT = (
    "redis-server is not installed; install it (Debian/Ubuntu: "
    "`apt-get install redis-server`, macOS: `brew install redis`) to run "
    "the Redis tests"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _command(port: int, command: bytes) -> bytes:
    """Send one inline command and return the first line of the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(command + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply.strip()


class RedisServer:
    """A ``redis-server`` child process on one fixed loopback port.

    :meth:`stop` and :meth:`start` are blocking; from a Trio test call them
    through ``trio.to_thread.run_sync``.
    """

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (empty) and wait until it answers PING."""
        if self.running:
            return
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                msg = f"redis-server exited at start with {self._process.returncode}"
                raise RuntimeError(msg)
            try:
                if _command(self.port, b"PING") == b"+PONG":
                    return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        msg = f"redis-server did not answer on port {self.port}"
        raise RuntimeError(msg)

    def stop(self) -> None:
        """Kill the server; everything in it is lost."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    def restart(self) -> None:
        """Stop and start again on the same port, empty."""
        self.stop()
        self.start()

    def flush(self) -> None:
        reply = _command(self.port, b"FLUSHALL")
        if reply != b"+OK":
            msg = f"FLUSHALL answered {reply!r}"
            raise RuntimeError(msg)


_shared: RedisServer | None = None


def _shared_server() -> RedisServer:
    global _shared
    if _shared is None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI") == "true":
                pytest.fail(_INSTALL_HINT + " (CI=true: Redis tests must run)")
            pytest.skip(_INSTALL_HINT)
        _shared = RedisServer(binary)
    _shared.start()
    return _shared


@pytest.fixture(scope="session", name="redis_server")
def redis_server_fixture() -> Iterator[RedisServer]:
    """The session's Redis server (one process, whichever module asks)."""
    server = _shared_server()
    yield server
    # Every module that imports this fixture tears it down; stop is idempotent.
    server.stop()
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r"Unclosed <MemoryObject", category=ResourceWarning
        )
        gc.collect()


@pytest.fixture(name="redis_url")
def redis_url_fixture(redis_server: RedisServer) -> Iterator[str]:
    """URL of the running, freshly flushed session server."""
    redis_server.start()
    redis_server.flush()
    yield redis_server.url
    # Collect the test's garbage while its warning filters still apply (see
    # ignore_coredis_stream_leak).
    gc.collect()


@pytest.fixture(name="unreachable_redis_url")
def unreachable_redis_url_fixture() -> Iterator[str]:
    """A Redis URL on a loopback port where nothing listens."""
    yield f"redis://127.0.0.1:{_free_port()}/0"
    gc.collect()  # as in redis_url_fixture
