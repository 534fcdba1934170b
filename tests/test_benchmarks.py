"""Smoke test of the benchmark runner: it runs, end to end, and writes its JSON.

It runs ``benchmarks/run.py`` as a user would, in a very reduced form (one
scenario, one round, a few requests, direct and the in-memory proxy only),
with every process on 127.0.0.1. It checks that the runner works and that
its output has the expected shape, never the figures themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
# The runner starts three processes and sends a few hundred requests.
TIMEOUT_SECONDS = 60
FIGURE_KEYS = {
    "requests",
    "errors",
    "requests_per_s",
    "latency_p50_ms",
    "latency_p99_ms",
    "ttft_p50_ms",
    "proxy_cpu_ms_per_request",
    "proxy_cpu_us_per_event",
    "peak_rss_mb",
    "upstream_cpu_percent",
    "loadgen_cpu_percent",
    "throughput_ratio",
    "added_latency_p50_ms",
    "added_ttft_p99_ms",
}


def test_quick_run_writes_json_with_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [
        sys.executable, str(RUNNER), "--quick", "--scenarios", "sse200_c1",
        "--rounds", "1", "--requests", "3", "--targets", "direct,memory",
        "--json", str(out),
    ]  # fmt: skip

    done = subprocess.run(
        argv, capture_output=True, timeout=TIMEOUT_SECONDS, check=False
    )

    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    result = json.loads(out.read_text())
    assert {"meta", "scenarios", "checks"} <= result.keys()
    assert result["meta"]["targets"] == ["direct", "memory"]
    targets = result["scenarios"]["sse200_c1"]["targets"]
    assert set(targets) == {"direct", "memory"}
    for figures in targets.values():
        assert FIGURE_KEYS <= figures.keys()
        assert figures["errors"] == 0
        assert figures["requests"] == 3
    assert b"sse200_c1" in done.stdout
