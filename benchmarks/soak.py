"""Soak test: many streamed requests through a server process; memory and events.

It starts ``llm-proxy mock-upstream`` and ``llm-proxy server --file-event-log``
as subprocesses on 127.0.0.1, sends ``--requests`` streamed chat completions
at ``--concurrency`` through the proxy, then stops the server with SIGTERM.
It reports the server's resident memory (``VmRSS`` from /proc/PID/status)
after start-up and a warm-up, at its peak under load (``VmHWM``, reset after
the warm-up, and the highest ``VmRSS`` sampled), and after the load once
idle; and the events in (requests answered 200) against the events out
(lines of the event log after shutdown, matched by request ID).

It exits 1 when an event is missing or doubled, when a request failed, or
when the memory after the load stays more than ``--rss-slack-mib`` above the
baseline. Run it from the repository root::

    .venv/bin/python benchmarks/soak.py --requests 10000 --concurrency 64
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

CLI = [sys.executable, "-m", "trio_llmproxy"]
READY_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 60.0
SAMPLE_INTERVAL_SECONDS = 0.1
# After the load, the server idles this long before its memory is read, so
# that connections closed by the clients are gone and garbage is collected.
SETTLE_SECONDS = 3.0
CHAT = {
    "model": "mock-gpt",
    "stream": True,
    "messages": [{"role": "user", "content": "soak"}],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_kib(pid: int) -> dict[str, int]:
    """Return VmRSS and VmHWM of ``pid`` in KiB, from /proc/PID/status."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            figures[name] = int(value.split()[0])
    return figures


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            msg = f"{url}: the process exited with {process.returncode}"
            raise RuntimeError(msg)
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    msg = f"{url} did not answer within {READY_TIMEOUT_SECONDS} s"
    raise RuntimeError(msg)


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )


class Load:
    """Streams chat completions through the proxy and counts the answers."""

    def __init__(self, url: str, requests: int, concurrency: int, prefix: str):
        self.url = url
        self.requests = requests
        self.concurrency = concurrency
        self.prefix = prefix
        self.next = 0
        self.ok: list[str] = []
        self.errors: list[str] = []

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency)
        async with httpx.AsyncClient(
            base_url=self.url, limits=limits, timeout=60
        ) as client:
            async with trio.open_nursery() as nursery:
                for _ in range(self.concurrency):
                    nursery.start_soon(self._worker, client)

    async def _worker(self, client: httpx.AsyncClient) -> None:
        while self.next < self.requests:
            request_id = f"{self.prefix}-{self.next}"
            self.next += 1
            try:
                async with client.stream(
                    "POST",
                    "/v1/chat/completions",
                    json=CHAT,
                    headers={"X-Request-ID": request_id},
                ) as response:
                    body = b"".join([piece async for piece in response.aiter_raw()])
            except httpx.HTTPError as exc:
                self.errors.append(f"{request_id}: {exc!r}")
                continue
            if response.status_code == 200 and body.endswith(b"data: [DONE]\n\n"):
                self.ok.append(request_id)
            else:
                self.errors.append(f"{request_id}: status {response.status_code}")


async def sample_peak(pid: int, stop: trio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], memory_kib(pid)["VmRSS"])
        with trio.move_on_after(SAMPLE_INTERVAL_SECONDS):
            await stop.wait()


async def drive(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"rss_start_kib": memory_kib(pid)["VmRSS"]}
    warm_up = Load(url, args.warm_up, args.concurrency, "warm")
    await warm_up.run()
    await trio.sleep(SETTLE_SECONDS)
    figures["rss_baseline_kib"] = memory_kib(pid)["VmRSS"]
    figures["peak_reset"] = reset_peak(pid)

    load = Load(url, args.requests, args.concurrency, "soak")
    peak = [figures["rss_baseline_kib"]]
    stop = trio.Event()
    started = time.perf_counter()
    with trio.fail_after(args.max_seconds):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_peak, pid, stop, peak)
            await load.run()
            stop.set()
    figures["load_seconds"] = round(time.perf_counter() - started, 2)
    memory = memory_kib(pid)
    figures["rss_peak_sampled_kib"] = peak[0]
    figures["rss_peak_hwm_kib"] = memory["VmHWM"] if figures["peak_reset"] else None

    await trio.sleep(SETTLE_SECONDS)
    figures["rss_after_kib"] = memory_kib(pid)["VmRSS"]
    figures["completed"] = load.ok + warm_up.ok
    figures["errors"] = load.errors + warm_up.errors
    return figures


def read_event_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["request_id"] for line in path.read_bytes().splitlines()]


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    upstream_url = f"http://127.0.0.1:{free_port()}"
    proxy_url = f"http://127.0.0.1:{free_port()}"
    event_log = workdir / "events.jsonl"
    upstream = start(
        [
            *CLI,
            "mock-upstream",
            "--listen",
            upstream_url.removeprefix("http://"),
            "--chunk-count",
            str(args.chunks),
            "--log-level",
            "warning",
        ],
        workdir / "upstream.log",
    )
    server: subprocess.Popen[bytes] | None = None
    try:
        wait_ready(upstream_url + "/v1/models", upstream)
        server = start(
            [
                *CLI,
                "server",
                "--listen",
                proxy_url.removeprefix("http://"),
                "--upstream",
                upstream_url,
                "--file-event-log",
                str(event_log),
                "--shutdown-timeout",
                "30",
                "--log-level",
                "warning",
            ],
            workdir / "server.log",
        )
        wait_ready(proxy_url + "/healthz", server)
        figures = trio.run(drive, proxy_url, server.pid, args)
        server.send_signal(signal.SIGTERM)
        figures["server_exit"] = server.wait(STOP_TIMEOUT_SECONDS)
    finally:
        for process in (server, upstream):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    completed: list[str] = figures.pop("completed")
    recorded = read_event_ids(event_log)
    figures["events_in"] = len(completed)
    figures["events_out"] = len(recorded)
    figures["events_missing"] = len(set(completed) - set(recorded))
    figures["events_doubled"] = len(recorded) - len(set(recorded))
    errors: list[str] = figures.pop("errors")
    figures["errors"] = len(errors)
    figures["first_errors"] = errors[:5]
    return figures


def verdict(figures: dict[str, Any], slack_mib: float) -> list[str]:
    """Return what went wrong; empty when the soak passed."""
    problems = []
    if figures["server_exit"] != 0:
        problems.append(f"the server exited with {figures['server_exit']}")
    if figures["errors"]:
        problems.append(f"{figures['errors']} request(s) failed")
    if figures["events_missing"] or figures["events_in"] != figures["events_out"]:
        problems.append(
            f"events in {figures['events_in']} != events out "
            f"{figures['events_out']} ({figures['events_missing']} missing)"
        )
    growth_mib = (figures["rss_after_kib"] - figures["rss_baseline_kib"]) / 1024
    if growth_mib > slack_mib:
        problems.append(f"RSS stayed {growth_mib:.1f} MiB above the baseline")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--warm-up", type=int, default=500, help="requests before the baseline"
    )
    parser.add_argument("--chunks", type=int, default=8, help="content chunks")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument(
        "--rss-slack-mib",
        type=float,
        default=32.0,
        help="how far above the baseline the RSS may stay after the load",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--keep", type=Path, help="keep the event log and logs in this folder"
    )
    args = parser.parse_args()

    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        figures = run(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="soak-") as workdir:
            figures = run(args, Path(workdir))
    figures["requests"] = args.requests
    figures["concurrency"] = args.concurrency
    figures["warm_up"] = args.warm_up
    problems = verdict(figures, args.rss_slack_mib)
    figures["passed"] = not problems

    print(json.dumps(figures, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    for problem in problems:
        print(f"soak: {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
