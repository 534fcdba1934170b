"""Does the proxy's memory stay flat while a very large body streams through?

The proxy keeps at most ``--max-response-body-bytes`` (4 MiB by default) of
each response for its event; the rest passes through without being kept.
This script streams SSE bodies of growing size (20, 40 and 80 MiB, as 64 KiB
events, one request at a time) through the proxy without a sink and with
the file event log, and reports for each the proxy's RSS before, its peak
during the request (``VmHWM``, reset before each), and the growth. Flat
means the growth does not follow the body size: what the cap allows, paid
once, whatever the size.

    .venv/bin/python benchmarks/memory.py [--sizes 20,40,80] [--requests 2]

Processes, pinning, loopback-only traffic and bounds are those of ``run.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from typing import Any

import procs
import run

EVENT_BYTES = 65536
TARGETS = ("memory", "file")


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Stream each size through each target; return one row per pair."""
    sizes = [int(size) for size in args.sizes.split(",")]
    rows: list[dict[str, Any]] = []
    bench_args = argparse.Namespace(upstream_port=0, requests=0)
    with contextlib.ExitStack() as stack:
        bench = run.Bench(bench_args, stack)
        bench.start_upstream()
        bench.start_loadgen()
        for target in TARGETS:
            bench.start_proxy(target)
        bench.warm_up(list(TARGETS))
        for mib in sizes:
            chunks = mib * 1024 * 1024 // EVENT_BYTES
            scenario = run._scenario(
                f"large_{mib}mib",
                f"SSE {mib} MiB",
                stream=True,
                concurrency=1,
                requests=args.requests,
                chunks=chunks,
                size=EVENT_BYTES,
            )
            for target in TARGETS:
                seg = bench.segment(target, scenario)
                pid = bench.pids[target]
                rows.append(
                    {
                        "target": target,
                        "body_mib": mib,
                        "requests": seg["completed"],
                        "errors": seg["errors"],
                        "rss_before_mb": seg["rss_before_kib"] / 1024,
                        "peak_mb": seg["peak_rss_kib"] / 1024,
                        "growth_mb": (seg["peak_rss_kib"] - seg["rss_before_kib"])
                        / 1024,
                        "rss_after_mb": procs.memory_kib(pid)["rss"] / 1024,
                    }
                )
                print(f"{target} {mib} MiB: done", file=sys.stderr, flush=True)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """The rows as a table."""
    cols = ("target", "body MiB", "before MB", "peak MB", "growth MB", "after MB")
    lines = ["  ".join(f"{c:>9}" for c in cols)]
    for row in rows:
        cells = (
            row["target"],
            str(row["body_mib"]),
            f"{row['rss_before_mb']:.1f}",
            f"{row['peak_mb']:.1f}",
            f"{row['growth_mb']:+.1f}",
            f"{row['rss_after_mb']:.1f}",
        )
        lines.append("  ".join(f"{c:>9}" for c in cells))
        if row["errors"]:
            lines.append(f"  ({row['errors']} failed requests)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20,40,80",
                        help="body sizes in MiB (%(default)s)")  # fmt: skip
    parser.add_argument("--requests", type=int, default=2,
                        help="requests per size and target (%(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    print(render(measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
