"""Tests for the sinks (JSONL file, stdout) and the dispatcher that feeds them.

The file sink writes real files under ``tmp_path``; a disk-full write is
simulated by wrapping ``os.write`` for the sink's own descriptor only.
Dispatcher tests use a hand-written fake of the real ``Sink`` interface and
the autojump clock, so backoff sleeps cost no real time.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
import trio
import trio.testing
from events import make_event

from trio_llmproxy import (
    Dispatcher,
    Event,
    InMemoryEventBus,
    JsonlFileSink,
    RetryPolicy,
    Sink,
    SinkError,
    StdoutSink,
)

# Far above any open descriptor (and the usual limit): every call on it fails
# with EBADF.
NOT_A_DESCRIPTOR = 1_000_000


def events(count: int, start: int = 0) -> list[Event]:
    return [make_event(number) for number in range(start, start + count)]


def read_lines(path: Path) -> list[dict[str, object]]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [orjson.loads(line) for line in data.splitlines()]


# JsonlFileSink


async def test_file_sink_creates_the_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "events.jsonl"

    async with JsonlFileSink(path) as sink:
        await sink.deliver(events(1))

    assert path.is_file()


async def test_file_sink_creates_the_file_readable_by_its_owner_only(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.jsonl"

    async with JsonlFileSink(path):
        pass

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_file_sink_writes_one_json_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"

    async with JsonlFileSink(path) as sink:
        await sink.deliver(events(3))
        await sink.deliver(events(2, start=3))

    lines = read_lines(path)
    assert [line["event_id"] for line in lines] == ["e0", "e1", "e2", "e3", "e4"]
    assert lines[0] == make_event(0).to_dict()


async def test_file_sink_appends_to_an_existing_log(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(make_event(0).to_json() + b"\n")

    async with JsonlFileSink(path) as sink:
        await sink.deliver(events(1, start=1))

    assert [line["event_id"] for line in read_lines(path)] == ["e0", "e1"]


async def test_failed_write_leaves_only_whole_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events.jsonl"
    real_write = os.write
    sink = JsonlFileSink(path)

    def disk_fills_half_way(fd: int, data: bytes) -> int:
        if fd != sink._fd:
            return real_write(fd, data)
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async with sink:
        await sink.deliver(events(2))
        monkeypatch.setattr(os, "write", disk_fills_half_way)
        with pytest.raises(SinkError) as raised:
            await sink.deliver(events(3, start=2))
        monkeypatch.undo()
        after_failure = read_lines(path)
        await sink.deliver(events(1, start=5))

    assert not raised.value.permanent
    assert "No space left" in str(raised.value)
    assert [line["event_id"] for line in after_failure] == ["e0", "e1"]
    assert [line["event_id"] for line in read_lines(path)] == ["e0", "e1", "e5"]


async def test_write_to_a_closed_descriptor_is_a_permanent_error(
    tmp_path: Path,
) -> None:
    sink = JsonlFileSink(tmp_path / "events.jsonl")

    async with sink:
        real_fd, sink._fd = sink._fd, NOT_A_DESCRIPTOR
        with pytest.raises(SinkError) as raised:
            await sink.deliver(events(1))
        sink._fd = real_fd

    assert raised.value.permanent


async def test_file_sink_fsyncs_on_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    sink = JsonlFileSink(tmp_path / "events.jsonl", fsync_interval=3600)
    async with sink:
        fd = sink._fd
        monkeypatch.setattr(os, "fsync", recording_fsync)
        await sink.deliver(events(2))
        assert synced == []

    assert synced == [fd]


async def test_file_sink_closes_even_when_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlFileSink(path)

    with trio.CancelScope() as scope:
        async with sink:
            await sink.deliver(events(1))
            scope.cancel()
            await trio.sleep_forever()

    assert sink._fd is None
    assert len(read_lines(path)) == 1


async def test_deliver_after_close_is_an_error(tmp_path: Path) -> None:
    sink = JsonlFileSink(tmp_path / "events.jsonl")
    async with sink:
        pass

    with pytest.raises(SinkError, match="not open"):
        await sink.deliver(events(1))


# StdoutSink


async def test_stdout_sink_prints_one_json_line_per_event() -> None:
    stream = io.BytesIO()

    async with StdoutSink(stream) as sink:
        await sink.deliver(events(2))

    lines = stream.getvalue().splitlines()
    assert [orjson.loads(line)["event_id"] for line in lines] == ["e0", "e1"]


async def test_stdout_sink_reports_a_broken_stream() -> None:
    class BrokenPipe(io.BytesIO):
        def write(self, data: object) -> int:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    with pytest.raises(SinkError, match="standard output"):
        await StdoutSink(BrokenPipe()).deliver(events(1))


# Dispatcher


class ScriptedSink(Sink):
    """Fails deliveries as scripted, then accepts; records every attempt."""

    name = "scripted"

    def __init__(self, failures: Sequence[SinkError]) -> None:
        self.failures = list(failures)
        self.attempts: list[tuple[float, list[str]]] = []
        self.stored: list[str] = []

    async def deliver(self, events: Sequence[Event]) -> None:
        ids = [event.event_id for event in events]
        self.attempts.append((trio.current_time(), ids))
        if self.failures:
            failure = self.failures.pop(0)
            self.stored.extend(ids[: failure.delivered])
            raise failure
        self.stored.extend(ids)


class AlwaysFailingSink(Sink):
    name = "down"

    def __init__(self) -> None:
        self.attempts: list[float] = []

    async def deliver(self, events: Sequence[Event]) -> None:
        self.attempts.append(trio.current_time())
        raise SinkError("backend is down")


async def test_transient_error_is_retried_with_backoff_then_succeeds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = ScriptedSink([SinkError("busy"), SinkError("busy")])
    dispatcher = Dispatcher(sink, RetryPolicy(attempts=5, initial_backoff_seconds=1))
    start = trio.current_time()

    accepted = await dispatcher.deliver(events(3))

    times = [at - start for at, _ in sink.attempts]
    assert times == pytest.approx([0.0, 1.0, 3.0])
    assert accepted == 3
    assert sink.stored == ["e0", "e1", "e2"]
    assert dispatcher.stats.delivered == 3
    assert dispatcher.stats.retries == 2


async def test_backoff_never_exceeds_its_maximum(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = AlwaysFailingSink()
    policy = RetryPolicy(attempts=6, initial_backoff_seconds=1, max_backoff_seconds=3)
    dispatcher = Dispatcher(sink, policy)

    await dispatcher.deliver(events(1))

    gaps = [b - a for a, b in zip(sink.attempts, sink.attempts[1:], strict=False)]
    assert gaps == pytest.approx([1.0, 2.0, 3.0, 3.0, 3.0])


async def test_batch_still_failing_after_the_last_attempt_is_not_acknowledged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = AlwaysFailingSink()
    dispatcher = Dispatcher(sink, RetryPolicy(attempts=3))

    accepted = await dispatcher.deliver(events(4))

    assert len(sink.attempts) == 3
    assert accepted == 0
    assert dispatcher.stats.failed == 4


async def test_permanent_error_is_not_retried_and_counted_rejected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = ScriptedSink([SinkError("bad request", permanent=True)])
    dispatcher = Dispatcher(sink)

    accepted = await dispatcher.deliver(events(3))

    assert len(sink.attempts) == 1
    assert dispatcher.stats.rejected == 3
    assert dispatcher.stats.retries == 0
    # Retrying cannot help, so the batch is acknowledged all the same.
    assert accepted == 3


async def test_partial_delivery_retries_only_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = ScriptedSink([SinkError("cut", delivered=2), SinkError("cut", delivered=1)])
    dispatcher = Dispatcher(sink)

    accepted = await dispatcher.deliver(events(5))

    assert [ids for _, ids in sink.attempts] == [
        ["e0", "e1", "e2", "e3", "e4"],
        ["e2", "e3", "e4"],
        ["e3", "e4"],
    ]
    assert sink.stored == ["e0", "e1", "e2", "e3", "e4"]
    assert accepted == 5
    assert dispatcher.stats.delivered == 5


async def test_partial_then_permanent_acknowledges_all_and_rejects_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = ScriptedSink([SinkError("too big", permanent=True, delivered=1)])
    dispatcher = Dispatcher(sink)

    accepted = await dispatcher.deliver(events(3))

    assert accepted == 3
    assert dispatcher.stats.delivered == 1
    assert dispatcher.stats.rejected == 2


async def test_stopping_during_backoff_cuts_the_sleep_short(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = AlwaysFailingSink()
    dispatcher = Dispatcher(sink, RetryPolicy(attempts=5, initial_backoff_seconds=60))
    start = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher.deliver, events(1))
        await trio.sleep(5)
        dispatcher.stopping.set()

    # One more attempt right away, then no further retries.
    assert [at - start for at in sink.attempts] == pytest.approx([0.0, 5.0])
    assert trio.current_time() - start == pytest.approx(5.0)
    assert dispatcher.stats.failed == 1


async def test_sink_raising_a_foreign_exception_is_retried(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    class BuggySink(Sink):
        name = "buggy"
        calls = 0

        async def deliver(self, events: Sequence[Event]) -> None:
            self.calls += 1
            if self.calls == 1:
                raise KeyError("oops")

    sink = BuggySink()
    dispatcher = Dispatcher(sink)

    accepted = await dispatcher.deliver(events(1))

    assert accepted == 1
    assert sink.calls == 2
    assert "KeyError" in caplog.text


async def test_dispatcher_serves_a_subscription_until_the_bus_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = InMemoryEventBus()
    sink = ScriptedSink([SinkError("busy")])
    dispatcher = Dispatcher(sink)

    async with bus.subscribe("s") as subscription:
        for event in events(3):
            bus.publish(event)
        bus.close()
        await dispatcher.serve(subscription)

    assert sink.stored == ["e0", "e1", "e2"]
