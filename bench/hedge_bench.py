"""Hedged requests against a slow node: time to first token with and without HEDGE_AFTER_MS.

Four `lb mock` nodes serve one model; one of them is slow (`--slow-ttft-ms`, by default 10x the
others' `--ttft-ms`). One lb per configuration runs in front of all four (`lb serve`, its own
process, log level warning): hedging off, `HEDGE_AFTER_MS=<--hedge-ms>` and
`HEDGE_AFTER_MS=adaptive`, each under ROUND_ROBIN (the slow node is first for exactly one
request in four) and under the default LEAST_LOADED. A closed loop of `--concurrency` clients
sends streamed chat requests; a request's TTFT is the time from sending it to the first
`data:` event of its answer. The configurations take turns, `--requests` each per round, for
`--rounds` rounds, so the machine's noise hits all of them alike.

    python bench/hedge_bench.py                       # about 3 minutes on 2 cores
    python bench/hedge_bench.py --quick               # a smoke run
    python bench/hedge_bench.py --out /tmp/results

Reported per configuration: p50, p90, p99 and max TTFT, the share of requests hedged
(`x-attempts` > 1), the answers that came from the slow node (`x-mock-node`), and the
attempts the mocks saw cut (the hedges' losers). Results go to
bench/results/hedging-YYYY-MM-DD.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import trio

HOST = "127.0.0.1"
MODEL = "bench-model"
BODY = {
    "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hello bench"}],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


ROOT = Path(__file__).resolve().parent.parent


def lb_command() -> list[str]:
    """This tree's lb (PYTHONPATH is set to it for every subprocess)."""
    return [sys.executable, "-c", "import sys; from lb.cli import main; sys.exit(main())"]


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Subprocesses stopped (by pid) on the way out, whatever happens."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.terminate()
        for proc in started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def percentile(ordered: list[float], q: float) -> float:
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


async def wait_ready(url: str, nodes: int, limit: float = 30.0) -> None:
    with trio.fail_after(limit):
        async with httpx.AsyncClient() as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    health = (await client.get(f"{url}/health")).json()
                    if health.get("nodes_found") == nodes:
                        return
                await trio.sleep(0.1)


async def one(client: httpx.AsyncClient, url: str) -> tuple[float, int, str]:
    """(TTFT seconds, x-attempts, the answering mock's name)."""
    start = time.perf_counter()
    ttft = math.nan
    async with client.stream("POST", f"{url}/v1/chat/completions", json=BODY) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for chunk in response.aiter_raw():
            if math.isnan(ttft) and b"data:" in chunk:
                ttft = time.perf_counter() - start
        attempts = int(response.headers.get("x-attempts", "0"))
        name = response.headers.get("x-mock-node", "?")
    return ttft, attempts, name


async def load(url: str, count: int, concurrency: int) -> list[tuple[float, int, str]]:
    results: list[tuple[float, int, str]] = []
    todo = iter(range(count))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            for _ in todo:
                results.append(await one(client, url))

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    return results


async def mock_stats(ports: list[int]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        return [(await client.get(f"http://{HOST}:{port}/mock/stats")).json() for port in ports]


def configurations(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(row name, ROUTING_STRATEGY, HEDGE_AFTER_MS)"""
    return [
        (f"{strategy} {label}", strategy, hedge)
        for strategy in ("ROUND_ROBIN", "LEAST_LOADED")
        for label, hedge in (("off", ""), (f"{args.hedge_ms:g} ms", f"{args.hedge_ms:g}"),
                             ("adaptive", "adaptive"))
    ]


def start_all(
    args: argparse.Namespace, started: list[subprocess.Popen[bytes]]
) -> tuple[list[int], dict[str, str]]:
    """The four mocks (the first one slow) and one lb per configuration: (mock ports, urls)."""
    env_base = {k: v for k, v in os.environ.items() if not k.startswith(("HEDGE_", "LB_"))}
    env_base["PYTHONPATH"] = str(ROOT)
    ports = [free_port() for _ in range(4)]
    for i, port in enumerate(ports):
        ttft = args.slow_ttft_ms if i == 0 else args.ttft_ms
        name = "slow" if i == 0 else f"fast-{i}"
        started.append(subprocess.Popen(
            [*lb_command(), "mock", "--port", str(port), "--model", MODEL, "--name", name,
             "--ttft-ms", f"{ttft:g}", "--itl-ms", f"{args.itl_ms:g}", "--tokens", "8"],
            stdout=subprocess.DEVNULL, env=env_base,
        ))
    lbs: dict[str, str] = {}
    for name, strategy, hedge in configurations(args):
        port = free_port()
        env = {**env_base, "ROUTING_STRATEGY": strategy, "HEDGE_AFTER_MS": hedge,
               "SCAN_INTERVAL": "5"}
        started.append(subprocess.Popen(
            [*lb_command(), "serve", "--host", HOST, "--port", str(port),
             "--log-level", "warning", *(f"--node={HOST}:{p}" for p in ports)],
            env=env, stdout=subprocess.DEVNULL,
        ))
        lbs[name] = f"http://{HOST}:{port}"
    return ports, lbs


async def bench(
    args: argparse.Namespace, ports: list[int], lbs: dict[str, str]
) -> dict[str, Any]:
    for url in lbs.values():
        await wait_ready(url, 4)
    for url in lbs.values():  # warm-up: connections, and the figures `adaptive` needs
        await load(url, args.warmup, args.concurrency)
    results: dict[str, list[tuple[float, int, str]]] = {name: [] for name in lbs}
    cut: dict[str, int] = dict.fromkeys(lbs, 0)
    for _ in range(args.rounds):
        for name, url in lbs.items():
            before = sum(s["disconnects"] for s in await mock_stats(ports))
            results[name] += await load(url, args.requests, args.concurrency)
            await trio.sleep(args.slow_ttft_ms / 1000 + 0.2)  # let cut attempts be counted
            cut[name] += sum(s["disconnects"] for s in await mock_stats(ports)) - before
    rows = {}
    for name, items in results.items():
        ttfts = sorted(ttft for ttft, _, _ in items if not math.isnan(ttft))
        rows[name] = {
            "requests": len(items),
            "missing_ttft": len(items) - len(ttfts),
            "p50_ms": round(percentile(ttfts, 0.50) * 1000, 1),
            "p90_ms": round(percentile(ttfts, 0.90) * 1000, 1),
            "p99_ms": round(percentile(ttfts, 0.99) * 1000, 1),
            "max_ms": round(ttfts[-1] * 1000, 1),
            "hedged_pct": round(100 * sum(a > 1 for _, a, _ in items) / len(items), 1),
            "from_slow_pct": round(100 * sum(n == "slow" for _, _, n in items) / len(items), 1),
            "attempts_cut": cut[name],
        }
    return rows


def report(args: argparse.Namespace, rows: dict[str, Any], seconds: float) -> str:
    lines = [
        f"# Hedging: one slow node in four ({datetime.date.today().isoformat()})",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, load "
        f"average before/after {args.load_before} / {os.getloadavg()[0]:.2f}; run took "
        f"{seconds:.0f} s.",
        "",
        f"Four `lb mock` nodes (8 tokens, {args.itl_ms:g} ms apart): three with a TTFT of "
        f"{args.ttft_ms:g} ms, one (`slow`) with {args.slow_ttft_ms:g} ms. One `lb serve` per "
        f"row; closed loop, {args.concurrency} clients, streamed chat; {args.rounds} rounds of "
        f"{args.requests} requests per row, rows taking turns (after {args.warmup} warm-up "
        "requests each). TTFT: from sending the request to the first `data:` event.",
        "",
        "| configuration | requests | p50 ms | p90 ms | p99 ms | max ms | hedged % | "
        "answered by slow % | attempts cut |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['requests']} | {row['p50_ms']} | {row['p90_ms']} | "
            f"{row['p99_ms']} | {row['max_ms']} | {row['hedged_pct']} | "
            f"{row['from_slow_pct']} | {row['attempts_cut']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--ttft-ms", type=float, default=40.0)
    parser.add_argument("--slow-ttft-ms", type=float, default=400.0)
    parser.add_argument("--itl-ms", type=float, default=5.0)
    parser.add_argument("--hedge-ms", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="per row and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="1 round of 40 requests")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests, args.warmup = 1, 40, 30
    args.load_before = f"{os.getloadavg()[0]:.2f}"
    start = time.monotonic()
    with processes() as started:
        ports, lbs = start_all(args, started)
        rows = trio.run(bench, args, ports, lbs)
    seconds = time.monotonic() - start
    text = report(args, rows, seconds)
    print(text)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"hedging-{datetime.date.today().isoformat()}"
        stem.with_suffix(".md").write_text(text)
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        stem.with_suffix(".json").write_text(
            json.dumps({"settings": settings, "rows": rows, "seconds": round(seconds, 1)},
                       indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
