"""Smoke test of the soak script: a short run, end to end, that passes.

It runs ``benchmarks/soak.py`` as a user would, with 200 requests instead of
10,000, every process on 127.0.0.1. It checks that no event is lost or
doubled and that the figures are all there; the memory figures of so short
a run say little, so only their presence is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"
TIMEOUT_SECONDS = 60


def test_short_soak_loses_no_event_and_reports_memory(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = [
        sys.executable, str(SOAK), "--requests", "200", "--concurrency", "16",
        "--warm-up", "20", "--rss-slack-mib", "64", "--json", str(out),
    ]  # fmt: skip

    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False
    )

    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["passed"] is True
    assert figures["errors"] == 0
    assert figures["events_in"] == figures["events_out"] == 220
    assert figures["events_missing"] == figures["events_doubled"] == 0
    assert figures["server_exit"] == 0
    for key in ("rss_start_kib", "rss_baseline_kib", "rss_peak_sampled_kib"):
        assert figures[key] > 0
    assert figures["rss_after_kib"] > 0
