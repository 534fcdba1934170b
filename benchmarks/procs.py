"""Processes of a benchmark run: starting, pinning, readiness, CPU and memory.

Every figure here comes from the kernel's own accounting in ``/proc``: the
CPU time of a process (all its threads, live and exited) from
``/proc/PID/stat``, its resident memory from ``/proc/PID/status``. The peak
(``VmHWM``) is reset before each measured segment by writing ``5`` to
``/proc/PID/clear_refs``, so each segment reports its own peak.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 10.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_split() -> tuple[set[int] | None, set[int] | None]:
    """Return (proxy CPUs, other CPUs), or (None, None) when pinning is impossible."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, None
    if len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


def start(
    argv: Sequence[str],
    cpus: set[int] | None,
    *,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.DEVNULL,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` pinned to ``cpus`` (inherited by all its threads).

    Its standard error goes to ``log`` (a file, so a chatty process can never
    block on a full pipe), or nowhere.
    """

    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    if log is None:
        return subprocess.Popen(
            list(argv), stdin=stdin, stdout=stdout, stderr=subprocess.DEVNULL,
            preexec_fn=pin,
        )  # fmt: skip
    with log.open("ab") as err:
        return subprocess.Popen(
            list(argv), stdin=stdin, stdout=stdout, stderr=err, preexec_fn=pin
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    """Ask ``process`` to stop (SIGTERM), then kill it if it does not."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT_SECONDS)


def wait_http(
    url: str, process: subprocess.Popen[bytes] | None, log: Path | None = None
) -> None:
    """Wait until ``url`` answers 200, or fail if the process dies or times out."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            err = log.read_text(errors="replace") if log is not None else ""
            msg = f"process exited with {process.returncode}: {err.strip()[-2000:]}"
            raise RuntimeError(msg)
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    msg = f"{url} did not answer within {READY_TIMEOUT_SECONDS:.0f}s"
    raise RuntimeError(msg)


def cpu_seconds(pid: int | None) -> float:
    """Return the CPU time (user + system) the process has used, in seconds."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int | None) -> dict[str, int]:
    """Return ``VmRSS`` and ``VmHWM`` (peak RSS) of the process, in KiB."""
    out = {"rss": 0, "hwm": 0}
    if pid is None:
        return out
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                out["rss"] = int(line.split()[1])
            elif line.startswith(b"VmHWM:"):
                out["hwm"] = int(line.split()[1])
    return out


def reset_peak(pid: int | None) -> bool:
    """Reset the process's peak RSS; return whether the kernel allowed it."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def settle(pid: int | None, *, quiet_seconds: float = 0.15, limit: float = 2.0) -> None:
    """Wait until the process stops using CPU (deferred work such as sinks)."""
    if pid is None:
        return
    deadline = time.monotonic() + limit
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet_seconds)
        now = cpu_seconds(pid)
        if now == last:
            return
        last = now
