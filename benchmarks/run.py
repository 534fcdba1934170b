"""Benchmark of the proxy's streaming overhead, side by side with the upstream.

One command runs every scenario against every target, alternating targets
round by round, and prints a table (and writes JSON with ``--json``):

    .venv/bin/python benchmarks/run.py [--quick] [--json out.json]
        [--compare-url URL [--compare-pid PID]] [--upstream-port PORT]

Targets: ``direct`` (the upstream itself: the limit), ``memory`` (the proxy
with the in-memory bus and no sink), ``file`` (``--file-event-log``),
``redis`` (``--event-bus redis``, against a ``redis-server`` this run starts)
and ``compare`` (any other proxy on 127.0.0.1, given by ``--compare-url``).

Each proxy runs as its own process (``python -m trio_llmproxy server``),
pinned to one core; the upstream (``benchmarks/upstream.py``), the load
generator (``benchmarks/loadgen.py``) and Redis share the other core. CPU and
memory figures come from ``/proc`` of each process. All traffic goes to
127.0.0.1, every load segment is bounded in requests and in time, and every
process this run starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import procs

HERE = Path(__file__).resolve().parent
CHAT_PATH = "/v1/chat/completions"
JSON_BODY = '{"model":"bench","messages":[{"role":"user","content":"Hi"}]}'
STREAM_BODY = (
    '{"model":"bench","stream": true,"messages":[{"role":"user","content":"Hi"}]}'
)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# A load segment never runs longer than this (the load generator then stops
# sending and waits a bounded grace period for what is in flight).
SEGMENT_MAX_SECONDS = 60.0
ALL_TARGETS = ("direct", "memory", "file", "redis", "compare")
PROXY_TARGETS = ("memory", "file", "redis")


# --------------------------------------------------------------------- scenarios


def _scenario(
    name: str,
    title: str,
    *,
    stream: bool,
    concurrency: int,
    requests: int,
    chunks: int = 0,
    size: int = 16,
    delay_ms: int = 0,
    timing: bool = False,
) -> dict[str, Any]:
    headers = []
    if stream:
        headers = [
            ["x-mock-chunk-count", str(chunks)],
            ["x-mock-chunk-size", str(size)],
            ["x-mock-chunk-delay-ms", str(delay_ms)],
        ]
    return {
        "name": name,
        "title": title,
        "stream": stream,
        "concurrency": concurrency,
        "requests": requests,
        "chunks": chunks,
        "chunk_size": size,
        "delay_ms": delay_ms,
        "timing": timing,
        "headers": headers,
        "body": STREAM_BODY if stream else JSON_BODY,
    }


def scenarios(quick: bool) -> list[dict[str, Any]]:
    """Return the scenarios, with request counts for a full or a quick run."""
    q = quick
    main = [
        _scenario("json_c1", "JSON, c=1", stream=False, concurrency=1,
                  requests=40 if q else 400),
        _scenario("json_c32", "JSON, c=32", stream=False, concurrency=32,
                  requests=300 if q else 3000),
        _scenario("sse200_c1", "SSE 200 chunks, c=1", stream=True, concurrency=1,
                  requests=5 if q else 60, chunks=200),
        _scenario("sse200_c16", "SSE 200 chunks, c=16", stream=True,
                  concurrency=16, requests=32 if q else 400, chunks=200),
        _scenario("sse50d20_c1", "SSE 50 chunks 20 ms apart, c=1", stream=True,
                  concurrency=1, requests=1 if q else 5, chunks=50, delay_ms=20,
                  timing=True),
        _scenario("sse50d20_c64", "SSE 50 chunks 20 ms apart, c=64", stream=True,
                  concurrency=64, requests=64 if q else 192, chunks=50,
                  delay_ms=20, timing=True),
        _scenario("large_20mib", "SSE 20 MiB body (320 x 64 KiB), c=1",
                  stream=True, concurrency=1, requests=1 if q else 2, chunks=320,
                  size=65536),
        # Four times the body: with the capture cap holding, the same peak.
        _scenario("large_80mib", "SSE 80 MiB body (1280 x 64 KiB), c=1",
                  stream=True, concurrency=1, requests=1 if q else 2, chunks=1280,
                  size=65536),
    ]  # fmt: skip
    if quick:
        series = [(10, 16), (100, 16), (1000, 16), (100, 1), (10, 64), (10, 256)]
    else:
        series = [(n, c) for n in (10, 100, 1000) for c in (1, 16, 64, 256)]
    for chunks, concurrency in series:
        # Enough requests for every connection to do a few, and for the CPU
        # time (counted in 10 ms ticks) to be precise, bounded in events.
        budget = 2_000 if quick else 40_000
        requests = min(
            max(budget // chunks, concurrency, 50), max(8 * concurrency, 200)
        )
        if chunks * concurrency > 100_000:
            requests = concurrency
        if quick:
            requests = min(requests, max(concurrency, 32))
        main.append(
            _scenario(
                f"scale_n{chunks}_c{concurrency}",
                f"scaling: {chunks} chunks, c={concurrency}",
                stream=True,
                concurrency=concurrency,
                requests=requests,
                chunks=chunks,
            )
        )
    return main


# ---------------------------------------------------------------------- figures


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def summarise(
    scenario: dict[str, Any], segments: list[dict[str, Any]]
) -> dict[str, Any]:
    """Merge the rounds of one target into its figures."""
    lat = [x for s in segments for x in s["latencies_ms"]]
    ttft = [x for s in segments for x in s["ttft_ms"]]
    ev = [x for s in segments for x in s["event_latency_ms"]]
    gap = [x for s in segments for x in s["gap_excess_ms"]]
    completed = sum(s["completed"] for s in segments)
    wall = sum(s["wall_s"] for s in segments)
    cpu = sum(s["proxy_cpu_s"] for s in segments)
    measured_cpu = all(s["proxy_pid"] is not None for s in segments)
    events = completed * scenario["chunks"]
    return {
        "requests": completed,
        "errors": sum(s["errors"] for s in segments),
        "error_samples": [e for s in segments for e in s["error_samples"]][:5],
        "wall_s": wall,
        "requests_per_s": _div(completed, wall),
        "events_per_s": _div(events, wall) if scenario["stream"] else None,
        "latency_p50_ms": _pct(lat, 50),
        "latency_p99_ms": _pct(lat, 99),
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p99_ms": _pct(ttft, 99),
        "event_latency_p50_ms": _pct(ev, 50),
        "event_latency_p99_ms": _pct(ev, 99),
        "gap_excess_p50_ms": _pct(gap, 50),
        "gap_excess_p99_ms": _pct(gap, 99),
        "proxy_cpu_ms_per_request": _div(cpu * 1e3, completed)
        if measured_cpu
        else None,
        "proxy_cpu_us_per_event": _div(cpu * 1e6, events)
        if measured_cpu and scenario["stream"]
        else None,
        "proxy_cpu_percent": _div(cpu * 100, wall) if measured_cpu else None,
        "peak_rss_mb": max((s["peak_rss_kib"] for s in segments), default=0) / 1024
        if measured_cpu
        else None,
        "rss_before_mb": min((s["rss_before_kib"] for s in segments), default=0) / 1024
        if measured_cpu
        else None,
        "upstream_cpu_percent": max(s["upstream_cpu_percent"] for s in segments),
        "loadgen_cpu_percent": max(s["loadgen_cpu_percent"] for s in segments),
    }


def add_deltas(figures: dict[str, dict[str, Any]]) -> None:
    """Add the figures relative to ``direct`` to every other target."""
    direct = figures.get("direct")
    if direct is None:
        return
    for name, fig in figures.items():
        for key in (
            "latency_p50_ms",
            "latency_p99_ms",
            "ttft_p50_ms",
            "ttft_p99_ms",
            "event_latency_p50_ms",
            "event_latency_p99_ms",
            "gap_excess_p50_ms",
            "gap_excess_p99_ms",
        ):
            fig["added_" + key] = (
                None if name == "direct" else _sub(fig[key], direct[key])
            )
        fig["throughput_ratio"] = _div(fig["requests_per_s"], direct["requests_per_s"])


# ----------------------------------------------------------------------- checks


def checks(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluate the issue's targets against one run's figures."""
    out: list[dict[str, Any]] = []

    def fig(scenario: str, target: str, key: str) -> float | None:
        value = results.get(scenario, {}).get("targets", {}).get(target, {}).get(key)
        return None if value is None else float(value)

    def check(
        what: str, value: float | None, limit: float, *, at_least: bool = False
    ) -> None:
        met = (
            None if value is None else (value >= limit if at_least else value <= limit)
        )
        out.append({"target": what, "value": value, "limit": limit,
                    "at_least": at_least, "met": met})  # fmt: skip

    m = "memory"
    check(
        "c=1 SSE 20 ms: added TTFT p50 (ms)",
        fig("sse50d20_c1", m, "added_ttft_p50_ms"),
        1.0,
    )
    check(
        "c=1 SSE 20 ms: added TTFT p99 (ms)",
        fig("sse50d20_c1", m, "added_ttft_p99_ms"),
        3.0,
    )
    check(
        "c=1 SSE 20 ms: added per-event latency p50 (ms)",
        fig("sse50d20_c1", m, "added_event_latency_p50_ms"),
        0.3,
    )
    check(
        "c=64 SSE 20 ms: added TTFT p50 (ms)",
        fig("sse50d20_c64", m, "added_ttft_p50_ms"),
        3.0,
    )
    check(
        "c=64 SSE 20 ms: gap excess p99 (ms)",
        fig("sse50d20_c64", m, "gap_excess_p99_ms"),
        5.0,
    )
    check(
        "c=64 SSE 20 ms: errors (all targets)",
        sum(fig("sse50d20_c64", t, "errors") or 0 for t in PROXY_TARGETS),
        0,
    )
    check(
        "SSE 200 chunks c=16: proxy CPU per event (us)",
        fig("sse200_c16", m, "proxy_cpu_us_per_event"),
        40.0,
    )
    check(
        "SSE 200 chunks c=1: proxy CPU per event (us)",
        fig("sse200_c1", m, "proxy_cpu_us_per_event"),
        40.0,
    )
    check(
        "JSON c=32: requests/s",
        fig("json_c32", m, "requests_per_s"),
        800.0,
        at_least=True,
    )
    check(
        "JSON c=32: proxy CPU per request (ms)",
        fig("json_c32", m, "proxy_cpu_ms_per_request"),
        1.2,
    )
    check(
        "JSON c=32: file log CPU / no-sink CPU per request",
        _div(
            fig("json_c32", "file", "proxy_cpu_ms_per_request"),
            fig("json_c32", m, "proxy_cpu_ms_per_request"),
        ),
        1.15,
    )
    check(
        "c=64 SSE 20 ms with file log: peak RSS (MB)",
        fig("sse50d20_c64", "file", "peak_rss_mb"),
        150.0,
    )
    # Flat: the peak while an 80 MiB body streams is that of a 20 MiB one
    # (the capture cap's one-time cost), give or take allocator noise.
    for target in ("memory", "file"):
        check(
            f"80 MiB vs 20 MiB stream ({target}): peak RSS difference (MB)",
            _sub(
                fig("large_80mib", target, "peak_rss_mb"),
                fig("large_20mib", target, "peak_rss_mb"),
            ),
            8.0,
        )
    # Linear in chunk count: per-event cost at 1000 chunks vs at 100 chunks.
    check(
        "cost linear in chunks: us/event at 1000 / at 100 chunks, c=16",
        _div(
            fig("scale_n1000_c16", m, "proxy_cpu_us_per_event"),
            fig("scale_n100_c16", m, "proxy_cpu_us_per_event"),
        ),
        1.25,
    )
    # Independent of the time between chunks: a 50-chunk request 20 ms apart
    # against the same request predicted from the back-to-back series.
    a = fig("scale_n10_c16", m, "proxy_cpu_ms_per_request")
    b = fig("scale_n100_c16", m, "proxy_cpu_ms_per_request")
    predicted = None if a is None or b is None else a + (b - a) * (50 - 10) / 90
    check(
        "cost independent of gaps: CPU/request 50 chunks 20 ms apart / back to back",
        _div(fig("sse50d20_c64", m, "proxy_cpu_ms_per_request"), predicted),
        1.5,
    )
    return [c for c in out if c["value"] is not None]  # fmt: skip


# ------------------------------------------------------------------------ table


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


COLUMNS = [
    ("target", 8),
    ("req/s", 8),
    ("xdirect", 7),
    ("p50 ms", 8),
    ("+p50", 7),
    ("+p99", 7),
    ("+TTFT50", 7),
    ("+TTFT99", 7),
    ("+ev50", 6),
    ("gap99", 6),
    ("CPU ms/rq", 9),
    ("us/ev", 6),
    ("RSS MB", 6),
    ("err", 4),
    ("up%", 4),
    ("lg%", 4),
]


def table(results: dict[str, dict[str, Any]]) -> str:
    """Render the figures as a plain-text table, one block per scenario."""
    head = " ".join(name.rjust(width) for name, width in COLUMNS)
    lines = [head, "-" * len(head)]
    for name, result in results.items():
        lines.append(f"{name}: {result['scenario']['title']}")
        for target, fig in result["targets"].items():
            cells = [
                target,
                _f(fig["requests_per_s"], 1),
                _f(fig.get("throughput_ratio"), 2),
                _f(fig["latency_p50_ms"], 2),
                _signed(fig.get("added_latency_p50_ms")),
                _signed(fig.get("added_latency_p99_ms")),
                _signed(fig.get("added_ttft_p50_ms")),
                _signed(fig.get("added_ttft_p99_ms")),
                _signed(fig.get("added_event_latency_p50_ms")),
                _f(fig["gap_excess_p99_ms"], 1),
                _f(fig["proxy_cpu_ms_per_request"], 3),
                _f(fig["proxy_cpu_us_per_event"], 1),
                _f(fig["peak_rss_mb"], 0),
                str(fig["errors"]),
                _f(fig["upstream_cpu_percent"], 0),
                _f(fig["loadgen_cpu_percent"], 0),
            ]
            lines.append(
                " ".join(c.rjust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True))
            )
    return "\n".join(lines)


def checks_table(items: list[dict[str, Any]]) -> str:
    """Render the targets as lines: met or not, value and limit."""
    lines = []
    for item in items:
        mark = "MET    " if item["met"] else "NOT MET"
        sign = ">=" if item["at_least"] else "<="
        lines.append(
            f"{mark} {item['target']}: {item['value']:.3f} ({sign} {item['limit']:g})"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- running


class Progress:
    """One line per finished segment on stderr, with elapsed time and an ETA."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()

    def line(self, text: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        print(
            f"[{self.done:3d}/{self.total} {elapsed:5.0f}s eta {eta:4.0f}s] {text}",
            file=sys.stderr,
            flush=True,
        )


class Bench:
    """The processes of one run and the load segments sent through them."""

    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.stack = stack
        self.notes: list[str] = []
        self.proxy_cpus, self.other_cpus = procs.cpu_split()
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int | None] = {}
        self.logs: list[Path] = []
        self.proxy_logs: dict[str, Path] = {}
        self.tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if self.other_cpus is not None:
            os.sched_setaffinity(0, self.other_cpus)
            self.notes.append(
                f"proxy processes pinned to CPU {sorted(self.proxy_cpus or [])}; "
                f"upstream, load generator, Redis and runner to CPU "
                f"{sorted(self.other_cpus)}"
            )
        else:
            self.notes.append("fewer than 2 CPUs usable: nothing pinned")

    def _process(
        self, argv: list[str], cpus: set[int] | None, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{Path(argv[1]).name}-{len(self.logs)}.log"
        self.logs.append(log)
        process = procs.start(argv, cpus, log=log, **kwargs)
        self.stack.callback(procs.stop, process)
        return process

    def start_upstream(self) -> None:
        port = self.args.upstream_port or procs.free_port()
        process = self._process(
            [sys.executable, str(HERE / "upstream.py"), "--port", str(port)],
            self.other_cpus,
            stdout=subprocess.PIPE,
        )
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            msg = "the benchmark upstream did not start"
            raise RuntimeError(msg)
        procs.wait_http(f"http://127.0.0.1:{port}/v1/models", process)
        self.upstream = process
        self.ports["direct"] = port
        self.pids["direct"] = None

    def start_loadgen(self) -> None:
        self.loadgen = self._process(
            [sys.executable, str(HERE / "loadgen.py")],
            self.other_cpus,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def _start_redis(self) -> str | None:
        binary = shutil.which("redis-server")
        if binary is None:
            self.notes.append("target redis skipped: no redis-server binary")
            return None
        port = procs.free_port()
        process = self._process(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            self.other_cpus,
        )  # fmt: skip
        deadline = time.monotonic() + procs.READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with procs.socket.create_connection(("127.0.0.1", port), 1.0):
                    self.redis_port = port
                    return f"redis://127.0.0.1:{port}/0"
            if process.poll() is not None:
                break
            time.sleep(0.1)
        self.notes.append("target redis skipped: redis-server did not start")
        return None

    def start_proxy(self, target: str) -> bool:
        port = procs.free_port()
        argv = [
            sys.executable, "-m", "trio_llmproxy", "server",
            "--listen", f"127.0.0.1:{port}",
            "--upstream", f"http://127.0.0.1:{self.ports['direct']}",
            "--log-level", "warning",
        ]  # fmt: skip
        if target == "file":
            self.event_log = self.tmp / "events.jsonl"
            argv += ["--file-event-log", str(self.event_log)]
        if target == "redis":
            url = self._start_redis()
            if url is None:
                return False
            argv += ["--event-bus", "redis", "--redis-url", url]
        process = self._process(argv, self.proxy_cpus)
        try:
            procs.wait_http(f"http://127.0.0.1:{port}/healthz", process, self.logs[-1])
        except RuntimeError as exc:
            self.notes.append(
                f"target {target} skipped: the proxy did not start: {exc}"
            )
            procs.stop(process)
            return False
        self.ports[target] = port
        self.pids[target] = process.pid
        self.proxy_logs[target] = self.logs[-1]
        return True

    def add_compare(self, url: str, pid: int | None) -> None:
        parts = urlsplit(url)
        if parts.hostname not in LOOPBACK_HOSTS or parts.port is None:
            msg = f"--compare-url must be http://127.0.0.1:PORT, got {url!r}"
            raise SystemExit(msg)
        self.ports["compare"] = parts.port
        self.pids["compare"] = pid

    def load(
        self, port: int, scenario: dict[str, Any], requests: int
    ) -> dict[str, Any]:
        command = {
            "port": port,
            "method": "POST",
            "path": CHAT_PATH,
            "headers": scenario["headers"],
            "body": scenario["body"],
            "concurrency": scenario["concurrency"],
            "requests": requests,
            "max_seconds": SEGMENT_MAX_SECONDS,
            "timing": scenario["timing"],
        }
        assert self.loadgen.stdin is not None and self.loadgen.stdout is not None
        self.loadgen.stdin.write((json.dumps(command) + "\n").encode())
        self.loadgen.stdin.flush()
        line = self.loadgen.stdout.readline()
        if not line:
            msg = "the load generator exited"
            raise RuntimeError(msg)
        result: dict[str, Any] = json.loads(line)
        return result

    def segment(self, target: str, scenario: dict[str, Any]) -> dict[str, Any]:
        """Run one round of ``scenario`` against ``target`` and measure it."""
        pid = self.pids[target]
        procs.settle(pid)
        procs.reset_peak(pid)
        before_mem = procs.memory_kib(pid)
        cpu0 = procs.cpu_seconds(pid)
        up0 = procs.cpu_seconds(self.upstream.pid)
        lg0 = procs.cpu_seconds(self.loadgen.pid)
        requests = scenario["requests"]
        if self.args.requests:
            requests = min(requests, self.args.requests)
        result = self.load(self.ports[target], scenario, requests)
        up1 = procs.cpu_seconds(self.upstream.pid)
        lg1 = procs.cpu_seconds(self.loadgen.pid)
        # Count the work the request path left behind (sinks, Redis writes).
        procs.settle(pid)
        wall = max(result["wall_s"], 1e-9)
        result.update(
            proxy_pid=pid,
            proxy_cpu_s=procs.cpu_seconds(pid) - cpu0,
            peak_rss_kib=procs.memory_kib(pid)["hwm"],
            rss_before_kib=before_mem["rss"],
            upstream_cpu_percent=(up1 - up0) * 100 / wall,
            loadgen_cpu_percent=(lg1 - lg0) * 100 / wall,
        )
        return result

    def warm_up(self, targets: Sequence[str]) -> None:
        json_warm = _scenario("warm", "", stream=False, concurrency=32, requests=0)
        sse_warm = _scenario("warm", "", stream=True, concurrency=16, requests=0,
                             chunks=20)  # fmt: skip
        for target in targets:
            for scenario, n in ((json_warm, 200), (sse_warm, 64)):
                result = self.load(self.ports[target], scenario, n)
                if result["errors"]:
                    samples = "; ".join(result["error_samples"])
                    msg = f"warm-up of target {target} failed: {samples}"
                    log = self.proxy_logs.get(target)
                    if log is not None and log.exists():
                        tail = log.read_text(errors="replace")[-2000:]
                        msg += f"\nthe proxy's log ends with:\n{tail}"
                    raise RuntimeError(msg)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("trio", "hypercorn", "httpx", "httpcore", "h11", "trio_llmproxy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            check=True,
        )
        return out.stdout.decode().strip()
    return None


def _sanity(bench: Bench, targets: Sequence[str]) -> None:
    """Note how many events the sinks received, to show they were working."""
    if "file" in targets:
        log = bench.event_log
        lines = sum(1 for _ in log.open("rb")) if log.exists() else 0
        bench.notes.append(f"file target: {lines} events in the JSONL log")
    cli = shutil.which("redis-cli")
    if "redis" in targets and cli is not None:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [cli, "-p", str(bench.redis_port), "XLEN", "llm-proxy-events"],
                capture_output=True,
                check=True,
                timeout=10,
            )
            bench.notes.append(
                f"redis target: stream llm-proxy-events holds "
                f"{out.stdout.decode().strip()} entries (trimmed at its MAXLEN)"
            )


def _rotations(targets: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    for r in range(rounds):
        shift = r % len(targets)
        for target in [*targets[shift:], *targets[:shift]]:
            yield r, target


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the processes, run every scenario, and return the whole result."""
    wanted = [t for t in args.targets.split(",") if t]
    chosen = scenarios(args.quick)
    if args.scenarios:
        names = set(args.scenarios.split(","))
        chosen = [s for s in chosen if s["name"] in names]
    rounds = args.rounds or (2 if args.quick else 3)
    started = time.time()
    with contextlib.ExitStack() as stack:
        bench = Bench(args, stack)
        bench.start_upstream()
        bench.start_loadgen()
        bench.notes.append(
            "upstream: benchmarks/upstream.py (raw asyncio, one HTTP chunk per "
            "SSE event); load generator: benchmarks/loadgen.py (raw asyncio, "
            "one keep-alive connection per concurrent client)"
        )
        targets = ["direct"]
        for target in PROXY_TARGETS:
            if target in wanted and bench.start_proxy(target):
                targets.append(target)
        if args.compare_url and "compare" not in wanted:
            wanted.append("compare")
        if args.compare_url:
            bench.add_compare(args.compare_url, args.compare_pid)
            targets.append("compare")
        bench.warm_up(targets)

        total = sum(
            min(rounds, 2) if s["name"].startswith("scale_") else rounds for s in chosen
        )
        progress = Progress(total * len(targets))
        results: dict[str, dict[str, Any]] = {}
        for scenario in chosen:
            segments: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
            n = min(rounds, 2) if scenario["name"].startswith("scale_") else rounds
            for r, target in _rotations(targets, n):
                seg = bench.segment(target, scenario)
                segments[target].append(seg)
                cpu = _div(seg["proxy_cpu_s"] * 1e3, seg["completed"])
                progress.line(
                    f"{scenario['name']:<16} round {r + 1}/{n} {target:<7} "
                    f"{seg['completed'] / max(seg['wall_s'], 1e-9):8.1f} req/s  "
                    f"cpu {_f(cpu, 3)} ms/req  errors {seg['errors']}"
                )
            figures = {t: summarise(scenario, segs) for t, segs in segments.items()}
            add_deltas(figures)
            public = {k: v for k, v in scenario.items() if k not in ("body",)}
            results[scenario["name"]] = {"scenario": public, "targets": figures}
        _sanity(bench, targets)

    items = checks(results)
    return {
        "meta": {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s": round(time.time() - started, 1),
            "quick": args.quick,
            "rounds": rounds,
            "targets": targets,
            "cpu_model": _cpu_model(),
            "cpus": os.cpu_count(),
            "versions": _versions(),
            "git_commit": _git_commit(),
            "notes": bench.notes,
        },
        "scenarios": results,
        "checks": items,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the proxy's overhead against the upstream directly."
    )
    parser.add_argument("--quick", action="store_true", help="a run under 2 minutes")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--compare-url", metavar="URL",
                        help="another proxy on 127.0.0.1 in front of the upstream "
                             "(see --upstream-port)")  # fmt: skip
    parser.add_argument("--compare-pid", type=int, metavar="PID",
                        help="the other proxy's PID (CPU, memory)")  # fmt: skip
    parser.add_argument("--upstream-port", type=int, default=0, metavar="PORT",
                        help="the upstream's port (default: free)")  # fmt: skip
    parser.add_argument("--targets", default="direct,memory,file,redis",
                        help="comma-separated targets (%(default)s)")  # fmt: skip
    parser.add_argument(
        "--scenarios", default="", help="comma-separated scenario names"
    )
    parser.add_argument("--rounds", type=int, default=0,
                        help="rounds per scenario (default 3, quick 2)")  # fmt: skip
    parser.add_argument("--requests", type=int, default=0,
                        help="cap on requests per segment (smoke tests)")  # fmt: skip
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Unwinds through run()'s ExitStack, which stops every child process.
    sys.exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    result = run(args)
    print()
    print(table(result["scenarios"]))
    print()
    for note in result["meta"]["notes"]:
        print("note:", note)
    print()
    print(checks_table(result["checks"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
