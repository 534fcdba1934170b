"""The floor of the mandated stack: what Hypercorn and httpx cost on their own.

The proxy runs on Hypercorn (its Trio worker) and sends upstream with httpx;
this script measures, in one run and with the same upstream and load
generator as ``run.py``, what each of them costs alone, beside the proxy:

- ``hypercorn``: Hypercorn with the proxy's own settings (``hypercorn_config``)
  serving a trivial ASGI app that answers like the benchmark upstream (a small
  JSON body, or N SSE events sent as N body messages, ``"ts"`` stamped);
- ``httpx``: the proxy's upstream client (``create_upstream_client``) in a
  process of its own, fetching the same requests from the upstream at the
  same concurrency and reading each body chunk by chunk (``aiter_raw``);
- ``relay``: the two together with nothing else, a ten-line relay (head,
  then each chunk as it arrives): the least a proxy on this stack can cost;
- ``forward``: Hypercorn serving the proxy's forwarding app (``ProxyApp``)
  alone, without the instrumentation middleware: the relay plus the
  proxy's own request handling (limits, header rules, disconnect watch);
- ``nometrics``: the proxy itself with ``--metrics-path ""`` (no metrics
  subscriber);
- ``memory``: the proxy itself (``python -m trio_llmproxy server``), as
  ``run.py``'s ``memory`` target.

Every process measured is pinned to the proxy's core; its CPU comes from
``/proc`` (for ``httpx``, its own ``time.process_time()`` over the measured
requests). All traffic stays on 127.0.0.1; every load is bounded.

    .venv/bin/python benchmarks/floor.py [--requests N] [--scenarios a,b]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import procs
import run

# The run.py scenarios the floor is measured for.
DEFAULT_SCENARIOS = "json_c1,json_c32,sse200_c1,sse200_c16,sse50d20_c1,sse50d20_c64"
SERVERS = ("hypercorn", "relay", "forward")
ROWS = ("hypercorn", "httpx", "relay", "forward", "nometrics", "memory")


# ------------------------------------------------------------------ the servers


def _serve(mode: str, port: int, upstream: str) -> None:
    import httpx
    import trio
    from hypercorn.trio import serve

    from trio_llmproxy import ProxyConfig
    from trio_llmproxy._proxy import ProxyApp
    from trio_llmproxy._server import hypercorn_config
    from trio_llmproxy._upstream import create_upstream_client

    config = ProxyConfig(listen=f"127.0.0.1:{port}", upstream_url=upstream)
    json_body = json.dumps(
        {"id": "chatcmpl-bench", "object": "chat.completion", "model": "bench",
         "choices": [{"index": 0, "message": {"role": "assistant",
                      "content": "The quick brown fox jumps over the lazy dog."},
                      "finish_reason": "stop"}]}
    ).encode()  # fmt: skip

    async def read_body(receive: Any) -> bytes:
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                return bytes(body)

    async def lifespan(receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        """Hypercorn alone: answer as the benchmark upstream does."""
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(receive)
        if scope["path"] == "/healthz" or b'"stream": true' not in body:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(json_body)),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": json_body})
            return
        headers = dict(scope["headers"])
        count = int(headers.get(b"x-mock-chunk-count", b"8"))
        size = int(headers.get(b"x-mock-chunk-size", b"4"))
        delay = float(headers.get(b"x-mock-chunk-delay-ms", b"0")) / 1000
        tail = b',"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n' % (b"x" * size)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        for _ in range(count):
            if delay:
                await trio.sleep(delay)
            event = b'data: {"ts":%d%s' % (time.monotonic_ns(), tail)
            await send({"type": "http.response.body", "body": event,
                        "more_body": True})  # fmt: skip
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    async def relay(scope: Any, receive: Any, send: Any, client: Any) -> None:
        """Hypercorn and httpx with nothing else: head, then each chunk."""
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await answer(scope, receive, send)
            return
        body = await read_body(receive)
        headers = [(k, v) for k, v in scope["headers"] if k != b"host"]
        request = client.build_request(
            scope["method"], upstream + scope["path"], headers=headers, content=body
        )
        response = await client.send(request, stream=True)
        try:
            await send({"type": "http.response.start",
                        "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw
                                    if k.lower() != b"transfer-encoding"]})  # fmt: skip
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk,
                            "more_body": True})  # fmt: skip
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    async def main() -> None:
        async with create_upstream_client(
            connect_timeout=10.0, read_timeout=60.0, max_connections=1000
        ) as client:
            app: Any = answer
            if mode == "relay":

                async def app(scope: Any, receive: Any, send: Any) -> None:
                    await relay(scope, receive, send, client)

            elif mode == "forward":
                forward = ProxyApp(upstream, client)

                async def app(scope: Any, receive: Any, send: Any) -> None:
                    if scope["type"] == "lifespan" or scope["path"] == "/healthz":
                        await answer(scope, receive, send)
                    else:
                        await forward(scope, receive, send)

            assert isinstance(client, httpx.AsyncClient)
            await serve(app, hypercorn_config(config))

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main)


# --------------------------------------------------------------- the httpx side


def _fetch(args: argparse.Namespace) -> None:
    """Fetch ``requests`` from the upstream at ``concurrency``; print the CPU."""
    import trio

    from trio_llmproxy._upstream import create_upstream_client

    url = f"http://127.0.0.1:{args.port}{run.CHAT_PATH}"
    headers = json.loads(args.headers)
    body = args.body.encode()

    async def main() -> dict[str, float]:
        async with create_upstream_client(
            connect_timeout=10.0, read_timeout=60.0, max_connections=1000
        ) as client:

            async def one() -> int:
                chunks = 0
                async with client.stream(
                    "POST", url, headers=headers, content=body
                ) as response:
                    async for _ in response.aiter_raw():
                        chunks += 1
                return chunks

            async def worker(count: int, reads: list[int]) -> None:
                for _ in range(count):
                    reads.append(await one())

            async def batch(total: int) -> list[int]:
                reads: list[int] = []
                async with trio.open_nursery() as nursery:
                    for share in run_shares(total, args.concurrency):
                        nursery.start_soon(worker, share, reads)
                return reads

            # Open the connections first, as the load generator does.
            await batch(args.concurrency)
            cpu0, wall0 = time.process_time(), time.monotonic()
            reads = await batch(args.requests)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            return {"cpu_s": cpu, "wall_s": wall, "requests": len(reads),
                    "reads": sum(reads)}  # fmt: skip

    print(json.dumps(trio.run(main)), flush=True)


def run_shares(total: int, parts: int) -> list[int]:
    """Split ``total`` requests over ``parts`` workers."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _pin(cpus: set[int] | None) -> Any:
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def _httpx_segment(
    bench: run.Bench, scenario: dict[str, Any], requests: int
) -> dict[str, Any]:
    argv = [
        sys.executable, __file__, "fetch", "--port", str(bench.ports["direct"]),
        "--concurrency", str(scenario["concurrency"]), "--requests", str(requests),
        "--headers", json.dumps(scenario["headers"]), "--body", scenario["body"],
    ]  # fmt: skip
    done = subprocess.run(
        argv,
        capture_output=True,
        timeout=run.SEGMENT_MAX_SECONDS + 30,
        check=True,
        preexec_fn=_pin(bench.proxy_cpus),
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# ------------------------------------------------------------------ the driver


def _start_server(bench: run.Bench, mode: str) -> None:
    port = procs.free_port()
    upstream = f"http://127.0.0.1:{bench.ports['direct']}"
    process = bench._process(
        [sys.executable, __file__, "serve", "--mode", mode, "--port", str(port),
         "--upstream", upstream],
        bench.proxy_cpus,
    )  # fmt: skip
    procs.wait_http(f"http://127.0.0.1:{port}/healthz", process, bench.logs[-1])
    bench.ports[mode] = port
    bench.pids[mode] = process.pid


def _start_proxy_without_metrics(bench: run.Bench) -> None:
    port = procs.free_port()
    process = bench._process(
        [sys.executable, "-m", "trio_llmproxy", "server",
         "--listen", f"127.0.0.1:{port}",
         "--upstream", f"http://127.0.0.1:{bench.ports['direct']}",
         "--log-level", "warning", "--metrics-path", ""],
        bench.proxy_cpus,
    )  # fmt: skip
    procs.wait_http(f"http://127.0.0.1:{port}/healthz", process, bench.logs[-1])
    bench.ports["nometrics"] = port
    bench.pids["nometrics"] = process.pid


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run each scenario against each floor and the proxy; return the figures."""
    wanted = set(args.scenarios.split(","))
    chosen = [s for s in run.scenarios(False) if s["name"] in wanted]
    bench_args = argparse.Namespace(upstream_port=0, requests=args.requests)
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        bench = run.Bench(bench_args, stack)
        bench.start_upstream()
        bench.start_loadgen()
        rows = args.targets.split(",")
        for mode in SERVERS:
            if mode in rows:
                _start_server(bench, mode)
        bench.start_proxy("memory")
        if "nometrics" in rows:
            _start_proxy_without_metrics(bench)
        targets = ["direct", *[t for t in ROWS if t in rows and t != "httpx"]]
        if "memory" not in targets:
            targets.append("memory")
        bench.warm_up(targets)
        for scenario in chosen:
            requests = min(scenario["requests"], args.requests or 10**9)
            segments: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
            for _, target in run._rotations(targets, args.rounds):
                segments[target].append(bench.segment(target, scenario))
            figures = {t: run.summarise(scenario, segs) for t, segs in segments.items()}
            run.add_deltas(figures)
            if "httpx" not in rows:
                out[scenario["name"]] = {"title": scenario["title"], "targets": figures}
                continue
            fetched = _httpx_segment(bench, scenario, requests)
            n = max(fetched["requests"], 1)
            figures["httpx"] = {
                "proxy_cpu_ms_per_request": fetched["cpu_s"] * 1e3 / n,
                "proxy_cpu_us_per_event": (
                    fetched["cpu_s"] * 1e6 / (n * scenario["chunks"])
                    if scenario["stream"]
                    else None
                ),
                "reads_per_request": fetched["reads"] / n,
                "requests_per_s": fetched["requests"] / max(fetched["wall_s"], 1e-9),
            }
            out[scenario["name"]] = {"title": scenario["title"], "targets": figures}
            print(f"{scenario['name']}: done", file=sys.stderr, flush=True)
        out["_notes"] = bench.notes
    return out


def render(results: dict[str, Any]) -> str:
    """The figures as a table: CPU per request and per event, and latency."""
    cols = ("target", "CPU ms/rq", "us/ev", "req/s", "+TTFT50", "+TTFT99", "+ev50",
            "gap99")  # fmt: skip
    lines = ["  ".join(f"{c:>10}" for c in cols)]
    for name, result in results.items():
        if name.startswith("_"):
            continue
        lines.append(f"{name}: {result['title']}")
        for target in ROWS:
            fig = result["targets"].get(target)
            if fig is None:
                continue
            cells = (
                target,
                run._f(fig.get("proxy_cpu_ms_per_request"), 3),
                run._f(fig.get("proxy_cpu_us_per_event"), 1),
                run._f(fig.get("requests_per_s"), 1),
                run._signed(fig.get("added_ttft_p50_ms")),
                run._signed(fig.get("added_ttft_p99_ms")),
                run._signed(fig.get("added_event_latency_p50_ms")),
                run._f(fig.get("gap_excess_p99_ms"), 1),
            )
            lines.append("  ".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve")
    serve.add_argument("--mode", choices=SERVERS, required=True)
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--upstream", required=True)
    fetch = sub.add_parser("fetch")
    fetch.add_argument("--port", type=int, required=True)
    fetch.add_argument("--concurrency", type=int, required=True)
    fetch.add_argument("--requests", type=int, required=True)
    fetch.add_argument("--headers", default="[]")
    fetch.add_argument("--body", default=run.JSON_BODY)
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS)
    parser.add_argument("--requests", type=int, default=0,
                        help="cap on requests per segment")  # fmt: skip
    parser.add_argument("--targets", default=",".join(ROWS),
                        help="rows to measure (%(default)s)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds per scenario, targets alternating")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    if args.command == "serve":
        _serve(args.mode, args.port, args.upstream)
        return 0
    if args.command == "fetch":
        _fetch(args)
        return 0
    results = measure(args)
    print(render(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
