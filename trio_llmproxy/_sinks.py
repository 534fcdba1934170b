"""Sinks: where dispatchers deliver batches of events.

A sink is an async context manager with one method, :meth:`Sink.deliver`.
It raises :class:`~trio_llmproxy.SinkError` when a batch (or the rest of it)
did not get through; ``permanent=True`` says retrying cannot help.
"""

from __future__ import annotations

import abc
import errno
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Self

import trio

from ._errors import ConfigError, SinkError
from ._event import Event
from ._rendering import render_events

FSYNC_INTERVAL_SECONDS = 1.0
CLOSE_TIMEOUT_SECONDS = 10.0
# The event log holds prompts and completions: only its owner may read it.
FILE_MODE = 0o600

logger = logging.getLogger(__name__)


def encode_lines(events: Sequence[Event]) -> bytes:
    """Return ``events`` as JSON lines, each ending in ``\\n``."""
    return b"".join([event.to_json() + b"\n" for event in events])


class Sink(abc.ABC):
    """A backend that receives batches of events.

    Entering the sink opens what it needs; leaving it flushes and closes.
    """

    #: Names the sink in logs and statistics, and the default consumer group.
    name: str = "sink"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Closing flushes what was delivered: it runs even when the caller is
        # being cancelled, for a bounded time.
        with trio.move_on_after(CLOSE_TIMEOUT_SECONDS, shield=True):
            await self.aclose()

    @abc.abstractmethod
    async def deliver(self, events: Sequence[Event]) -> None:
        """Deliver ``events`` in order.

        Raises:
            SinkError: some or all of them were not delivered.
        """

    async def aclose(self) -> None:  # noqa: B027
        """Flush and release what the sink holds; the default does nothing."""


def open_event_log(path: Path) -> int:
    """Open (creating it and its folder) the event log at ``path`` for appending.

    Raises:
        ConfigError: the folder or file cannot be created or written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    except OSError as exc:
        msg = f"cannot write the event log {str(path)!r}: {exc.strerror}"
        raise ConfigError(msg) from exc


class JsonlFileSink(Sink):
    """Appends one JSON object per event per line to a file.

    Each batch is written with one ``write`` and only whole lines: a write
    that fails half-way (disk full) is cut back to the last whole line and
    reported as a transient :class:`SinkError`. The file is fsynced at most
    every ``fsync_interval`` seconds and on close. It is created readable by
    its owner only. Rendering and writing happen in a worker thread.
    """

    name = "file"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync_interval: float = FSYNC_INTERVAL_SECONDS,
    ) -> None:
        self.path = Path(path)
        self._fsync_interval = fsync_interval
        self._fd: int | None = None
        self._last_fsync = time.monotonic()
        self._lock = trio.Lock()

    async def __aenter__(self) -> Self:
        self._fd = await trio.to_thread.run_sync(self._open)
        return self

    def _open(self) -> int:
        fd = open_event_log(self.path)
        _end_with_newline(fd, self.path)
        return fd

    def _reopen_if_moved(self, fd: int) -> int:
        """Follow the path when the file was moved or deleted (log rotation).

        Without this, events would go on into a file nobody can reach.
        """
        try:
            moved = not os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            moved = True
        except OSError as exc:
            msg = f"cannot append to {str(self.path)!r}: {exc.strerror}"
            raise SinkError(msg, permanent=exc.errno == errno.EBADF) from exc
        if not moved:
            return fd
        try:
            new_fd = self._open()
        except ConfigError as exc:
            raise SinkError(str(exc)) from exc
        logger.info("event log %s was moved or deleted: writing a new one", self.path)
        os.close(fd)
        self._fd = new_fd
        return new_fd

    async def deliver(self, events: Sequence[Event]) -> None:
        """Append ``events``; see the class docstring."""
        await render_events(events)
        async with self._lock:
            await trio.to_thread.run_sync(self._write, events)

    async def aclose(self) -> None:
        """Fsync and close the file."""
        async with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                await trio.to_thread.run_sync(_sync_and_close, fd)

    def _write(self, events: Sequence[Event]) -> None:
        fd = self._fd
        if fd is None:
            msg = f"event log {str(self.path)!r} is not open"
            raise SinkError(msg)
        fd = self._reopen_if_moved(fd)
        data = memoryview(encode_lines(events))
        start: int | None = None
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            while data:
                written = os.write(fd, data)
                data = data[written:]
            if time.monotonic() - self._last_fsync >= self._fsync_interval:
                os.fsync(fd)
                self._last_fsync = time.monotonic()
        except OSError as exc:
            if start is not None:
                self._cut_back(fd, start)
            msg = f"cannot append to {str(self.path)!r}: {exc.strerror}"
            raise SinkError(msg, permanent=exc.errno == errno.EBADF) from exc

    def _cut_back(self, fd: int, size: int) -> None:
        try:
            os.ftruncate(fd, size)
        except OSError:
            logger.exception("cannot cut %s back to its last whole line", self.path)


def _end_with_newline(fd: int, path: Path) -> None:
    """Finish a last line left partial (by a crash) so new lines start clean.

    The fragment stays as one line that is not valid JSON; the events after
    it are intact. Nothing already written is removed.
    """
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return
    with open(path, "rb") as reader:
        reader.seek(size - 1)
        if reader.read(1) == b"\n":
            return
    os.write(fd, b"\n")
    logger.warning("event log %s ended in a partial line; it was ended", path)


def _sync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StdoutSink(Sink):
    """Prints one JSON object per event per line on standard output."""

    name = "stdout"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer

    async def deliver(self, events: Sequence[Event]) -> None:
        """Write and flush ``events``."""
        await render_events(events)
        await trio.to_thread.run_sync(self._write, events)

    def _write(self, events: Sequence[Event]) -> None:
        data = encode_lines(events)
        try:
            self._stream.write(data)
            self._stream.flush()
        except OSError as exc:
            msg = f"cannot write to standard output: {exc.strerror}"
            raise SinkError(msg) from exc
