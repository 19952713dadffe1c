"""Prefix-aware routing against the others, on a workload that shares prompt prefixes.

Four `lb mock` nodes simulate a prefix cache (`--prefix-cache`: TTFT grows by
`--prefill-ms-per-kb` per KiB of prompt after the longest cached prefix, an LRU of
`--cache-entries` 256-byte blocks per node) and a node that slows with load
(`--ttft-per-inflight-ms`). One `lb serve` stands in front of them; each request names its
strategy with `x-lb-strategy`, so the same lb serves PREFIX_AWARE, ROUND_ROBIN and
LEAST_LOADED, and the same nodes answer all three. A second lb with the load bound switched
off (`PREFIX_AWARE_BALANCE=1000`) serves the skewed workload's "no bound" row.

Workloads (deterministic, seeded):

- shared: `--users` users, each a multi-turn chat of `--turns` turns under one of
  `--systems` long system prompts (`--system-kb` KiB each); every turn sends the whole
  conversation so far (each earlier question and a fixed answer), as chat clients do.
- skewed: the same, but `--hot` of the users share one system prompt.

`--concurrency` workers each take the next user and play its turns one after the other (a
closed loop). The strategies run one after another, in a rotated order each round
(`--rounds`), and the nodes' caches are emptied (`POST /mock/reset`) before each: the prefix
caches are shared by whatever the nodes serve, so interleaving the strategies' requests would
let one strategy's traffic warm (or evict) another's caches. Each phase's prompts carry their
own salt, so lb's prefix index from an earlier phase matches nothing.

Per strategy: p50/p95 TTFT (client side: from sending the request to the first byte of the
stream's body), p50/p95 whole-request latency, throughput (requests/s over the phase's
wall time), the nodes' prefix-cache hit ratio (bytes) and the busiest node's share.

    python bench/prefix_bench.py                # the full run (about 8 minutes on 2 cores)
    python bench/prefix_bench.py --quick        # a smoke run (under a minute)

Results go to bench/results/prefix-routing-YYYY-MM-DD.{md,json} (--out DIR to change).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from proxy_bench import (
    HOST,
    RESULTS_DIR,
    Proc,
    free_port,
    git_rev,
    lb_command,
    loadavg,
    log,
    machine,
    pct,
    raise_fd_limit,
    terminate_on_sigterm,
)

BENCH_DIR = Path(__file__).resolve().parent
MODEL = "bench-model"
ANSWER = "Here is a considered answer that the client keeps in the history. " * 5
WORDS = [
    "policy", "routing", "cache", "token", "model", "prompt", "latency", "node", "user",
    "system", "context", "answer", "careful", "precise", "helpful", "domain", "expert",
    "summary", "detail", "example", "format", "rule",
]


def text(rng: random.Random, size: int) -> str:
    """About `size` bytes of words."""
    out: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        out.append(word)
        length += len(word) + 1
    return " ".join(out)[:size]


def conversations(
    rng: random.Random, salt: str, users: int, turns: int, systems: int, system_kb: float,
    hot: float,
) -> list[list[list[dict[str, str]]]]:
    """Per user, the message list of each of its turns. With `hot` > 0, that share of the
    users get system prompt 0 and the rest are spread over the others."""
    prompts = [f"[{salt}/{i}] " + text(rng, int(system_kb * 1024)) for i in range(systems)]
    result = []
    for user in range(users):
        if hot > 0:
            system = 0 if rng.random() < hot else 1 + user % (systems - 1)
        else:
            system = user % systems
        messages = [{"role": "system", "content": prompts[system]}]
        chat = []
        for turn in range(turns):
            messages = [*messages, {"role": "user",
                                    "content": f"user {user} turn {turn}: " + text(rng, 380)}]
            chat.append(messages)
            messages = [*messages, {"role": "assistant", "content": ANSWER}]
        result.append(chat)
    return result


async def play(
    port: int, strategy: str, chats: list[list[list[dict[str, str]]]], concurrency: int,
) -> dict[str, Any]:
    """Every chat, `concurrency` at a time (closed loop); TTFT and latency per request."""
    ttft: list[float] = []
    latency: list[float] = []
    errors = 0
    queue = iter(chats)
    url = f"http://{HOST}:{port}/v1/chat/completions"
    headers = {"x-lb-strategy": strategy}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for chat in queue:
            for messages in chat:
                body = {"model": MODEL, "messages": messages, "stream": True, "max_tokens": 16}
                started = time.perf_counter()
                first: float | None = None
                try:
                    async with client.stream("POST", url, json=body, headers=headers) as answer:
                        async for _chunk in answer.aiter_raw():
                            if first is None:
                                first = time.perf_counter()
                        ok = answer.status_code == 200
                        if not ok:
                            log(f"    HTTP {answer.status_code}")
                except httpx.HTTPError as exc:
                    log(f"    request failed: {exc!r}")
                    ok = False
                if not ok or first is None:
                    errors += 1
                    continue
                ttft.append(first - started)
                latency.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=60) as client, trio.open_nursery() as n:
        for _ in range(concurrency):
            n.start_soon(worker, client)
    wall = time.perf_counter() - started
    return {"ttft": ttft, "latency": latency, "errors": errors, "wall": wall}


def node_stats(mocks: list[Proc]) -> list[dict[str, Any]]:
    out = []
    for mock in mocks:
        with httpx.Client() as client:
            out.append(client.get(f"http://{HOST}:{mock.port}/mock/stats").json())
    return out


def reset(mocks: list[Proc]) -> None:
    with httpx.Client() as client:
        for mock in mocks:
            client.post(f"http://{HOST}:{mock.port}/mock/reset").raise_for_status()


def phase(
    name: str, port: int, strategy: str, mocks: list[Proc], chats: list[Any], concurrency: int,
) -> dict[str, Any]:
    reset(mocks)
    result = trio.run(play, port, strategy, chats, concurrency)
    stats = node_stats(mocks)
    hits = sum(s["prefix_cache"]["hits_bytes"] for s in stats)
    misses = sum(s["prefix_cache"]["miss_bytes"] for s in stats)
    per_node = [s["by_path"].get("/v1/chat/completions", 0) for s in stats]
    result.update(
        row=name, strategy=strategy, hits_bytes=hits, miss_bytes=misses,
        per_node=per_node,
    )
    ratio = hits / max(hits + misses, 1)
    log(f"  {name}: {len(result['ttft'])} ok, {result['errors']} errors, "
        f"{result['wall']:.1f}s, TTFT p50 {pct(result['ttft'], 0.5) * 1000:.0f} ms "
        f"p95 {pct(result['ttft'], 0.95) * 1000:.0f} ms, hit ratio {ratio:.2f}")
    return result


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled over the rounds of one row."""
    ttft = [v for r in runs for v in r["ttft"]]
    latency = [v for r in runs for v in r["latency"]]
    requests = len(ttft)
    wall = sum(r["wall"] for r in runs)
    hits = sum(r["hits_bytes"] for r in runs)
    misses = sum(r["miss_bytes"] for r in runs)
    per_node = [sum(r["per_node"][i] for r in runs) for i in range(len(runs[0]["per_node"]))]
    return {
        "requests": requests,
        "errors": sum(r["errors"] for r in runs),
        "ttft_ms": {"p50": pct(ttft, 0.5) * 1000, "p95": pct(ttft, 0.95) * 1000},
        "latency_ms": {"p50": pct(latency, 0.5) * 1000, "p95": pct(latency, 0.95) * 1000},
        "throughput_rps": requests / wall if wall else 0.0,
        "hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
        "busiest_node_share": max(per_node) / sum(per_node) if sum(per_node) else 0.0,
        "per_node": per_node,
    }


def table(title: str, rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        f"### {title}", "",
        "| strategy | requests | TTFT p50 ms | TTFT p95 ms | latency p50 ms | latency p95 ms "
        "| throughput req/s | cache hit ratio | busiest node | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in rows.items():
        lines.append(
            f"| {name} | {s['requests']} | {s['ttft_ms']['p50']:.0f} | {s['ttft_ms']['p95']:.0f} "
            f"| {s['latency_ms']['p50']:.0f} | {s['latency_ms']['p95']:.0f} "
            f"| {s['throughput_rps']:.1f} | {s['hit_ratio']:.2f} "
            f"| {s['busiest_node_share']:.0%} | {s['errors']} |"
        )
    return [*lines, ""]


def start_cluster(
    logdir: Path, mock_args: list[str], procs: list[Proc]
) -> tuple[list[Proc], Proc, Proc]:
    """4 mocks, the lb with the default load bound and one without; all appended to `procs`."""
    tree = [f"PYTHONPATH={BENCH_DIR.parent}"]  # this tree's lb, whatever is installed
    mocks = []
    for i in range(4):
        port = free_port()
        argv = ["env", *tree, *lb_command(), "mock", "--port", str(port),
                "--name", f"m{i}", *mock_args]
        mocks.append(Proc(f"mock{i}", argv, port, logdir))
    procs.extend(mocks)
    for mock in mocks:
        mock.start()
    nodes = [a for m in mocks for a in ("--node", f"{HOST}:{m.port}")]

    def lb(name: str, *env: str) -> Proc:
        port = free_port()
        argv = ["env", *tree, *env, *lb_command(), "serve", "--host", HOST,
                "--port", str(port), "--log-level", "warning", *nodes]
        return Proc(name, argv, port, logdir)

    bounded = lb("lb", "QUEUE_TIMEOUT_SECS=30")
    unbounded = lb("lb-unbounded", "QUEUE_TIMEOUT_SECS=30", "PREFIX_AWARE_BALANCE=1000")
    procs.extend([bounded, unbounded])
    bounded.start()
    unbounded.start()
    time.sleep(1.0)  # the first scan round
    return mocks, bounded, unbounded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--users", type=int, default=96)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--systems", type=int, default=8)
    parser.add_argument("--system-kb", type=float, default=6.0)
    parser.add_argument("--hot", type=float, default=0.7, help="skewed: users on the hot prompt")
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--cache-entries", type=int, default=400)
    parser.add_argument("--prefill-ms-per-kb", type=float, default=20.0)
    parser.add_argument("--ttft-per-inflight-ms", type=float, default=8.0)
    parser.add_argument("--steep-ttft-per-inflight-ms", type=float, default=40.0,
                        help="the skewed workload again, on nodes that slow down this much "
                        "per request in flight (0: skip)")
    parser.add_argument("--ttft-ms", type=float, default=10.0)
    parser.add_argument("--itl-ms", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.users, args.turns = 1, 32, 3
    raise_fd_limit()
    logdir = Path(tempfile.mkdtemp(prefix="prefix-bench-"))

    def mock_args(per_inflight: float) -> list[str]:
        return [
            "--model", MODEL, "--tokens", "16", "--ttft-ms", str(args.ttft_ms),
            "--itl-ms", str(args.itl_ms), "--prefix-cache",
            "--prefill-ms-per-kb", str(args.prefill_ms_per_kb),
            "--cache-entries", str(args.cache_entries),
            "--ttft-per-inflight-ms", str(per_inflight),
        ]

    # (section, workload, users on the hot prompt, ms per request in flight)
    sections = [("Shared prefixes", "shared", 0.0, args.ttft_per_inflight_ms),
                ("Skewed: one hot prefix", "skewed", args.hot, args.ttft_per_inflight_ms)]
    if args.steep_ttft_per_inflight_ms > 0:
        sections.append((
            f"Skewed, on nodes that slow down {args.steep_ttft_per_inflight_ms:g} ms per "
            "request in flight", "skewed", args.hot, args.steep_ttft_per_inflight_ms,
        ))
    meta: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "git": git_rev(), "machine": machine(),
        "command": "python bench/prefix_bench.py " + shlex.join(sys.argv[1:]),
        "args": vars(args) | {"out": str(args.out)},
        "mock_args": {str(per): mock_args(per) for *_, per in sections},
        "loadavg_before": loadavg(),
    }
    results: dict[str, dict[str, list[dict[str, Any]]]] = {title: {} for title, *_ in sections}
    with terminate_on_sigterm():
        for per_inflight in sorted({per for *_, per in sections}):
            procs: list[Proc] = []
            try:
                mocks, bounded, unbounded = start_cluster(logdir, mock_args(per_inflight), procs)
                rows = {
                    "shared": [("PREFIX_AWARE", bounded, "PREFIX_AWARE"),
                               ("ROUND_ROBIN", bounded, "ROUND_ROBIN"),
                               ("LEAST_LOADED", bounded, "LEAST_LOADED")],
                    "skewed": [("PREFIX_AWARE (bound ε=0.25)", bounded, "PREFIX_AWARE"),
                               ("PREFIX_AWARE (no bound)", unbounded, "PREFIX_AWARE"),
                               ("LEAST_LOADED", bounded, "LEAST_LOADED")],
                }
                for rnd in range(args.rounds):
                    for title, workload, hot, per in sections:
                        if per != per_inflight:
                            continue
                        k = rnd % len(rows[workload])
                        for name, proc, strategy in rows[workload][k:] + rows[workload][:k]:
                            salt = f"{title}/{rnd}"
                            rng = random.Random(salt)  # the same chats for every row
                            chats = conversations(rng, f"{salt}/{name}", args.users,
                                                  args.turns, args.systems, args.system_kb, hot)
                            log(f"round {rnd + 1} {title}: {name}")
                            run = phase(name, proc.port, strategy, mocks, chats,
                                        args.concurrency)
                            results[title].setdefault(name, []).append(run)
            finally:
                for proc in reversed(procs):
                    proc.stop()
    meta["loadavg_after"] = loadavg()
    summaries = {title: {name: summary(runs) for name, runs in rows.items()}
                 for title, rows in results.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"prefix-routing-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "summary": summaries,
         "runs": {w: {n: [{k: v for k, v in r.items() if k not in ("ttft", "latency")}
                          for r in runs] for n, runs in rows.items()}
                  for w, rows in results.items()}}, indent=2))
    report = [
        f"# Prefix-aware routing — {meta['date']}", "",
        f"Command: `{meta['command']}` (git {meta['git']}); "
        f"{meta['machine'].get('nproc', '?')} cores, load average before "
        f"{meta['loadavg_before']}, after {meta['loadavg_after']}.", "",
        f"Nodes: 4 x `lb mock {shlex.join(mock_args(args.ttft_per_inflight_ms))}` (the last "
        "section: the same with its own `--ttft-per-inflight-ms`); one `lb serve` (defaults, "
        "`QUEUE_TIMEOUT_SECS=30`) choosing the strategy per request with `x-lb-strategy`, and "
        "one with `PREFIX_AWARE_BALANCE=1000` (no load bound) for the skewed rows.",
        "",
        f"Workload: {args.users} users x {args.turns} turns (streams of 16 tokens), "
        f"{args.systems} system prompts of {args.system_kb:g} KiB, {args.concurrency} users "
        f"at a time; skewed: {args.hot:.0%} of the users on one system prompt. {args.rounds} "
        "round(s), the strategies in a rotated order each round, the nodes' caches emptied "
        "before each phase; figures pooled over the rounds.", "",
    ]
    for title, rows in summaries.items():
        report += table(title, rows)
        report += ["Requests per node: " + "; ".join(
            f"{n}: {s['per_node']}" for n, s in rows.items()), ""]
    stem.with_suffix(".md").write_text("\n".join(report))
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
