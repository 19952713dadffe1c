"""Many concurrent streams through one lb: its memory, and whether every stream completes.

One `lb serve` (one process) sits in front of `--mocks` slow `lb mock` processes (tokens
`--itl-ms` apart, so every stream stays open for tokens x itl). `--clients` client processes
(this script with `--client`) open `--streams` streaming chat requests in all, spread evenly
over the first `--ramp-secs`, each on its own connection, and read each to `data: [DONE]` and
the end of the chunked body, checking the event count. Meanwhile lb's RSS, its open file
descriptors and its CPU are sampled every 0.25 s, and the mocks' open streams every second
(their sum is how many streams were open through lb at once).

    python bench/many_streams.py                       # 10,000 streams, about 5 minutes
    python bench/many_streams.py --streams 1000 --tokens 5 --itl-ms 500   # a smoke run
    python bench/many_streams.py --json bench/results/x.json

The script raises RLIMIT_NOFILE (soft and hard, to `--fd-limit` when it runs as root; else
the soft limit to the hard one) before it starts anything: lb needs two descriptors a stream
(the client's connection and the node's), and serves at most half its limit of client
connections. Everything runs on 127.0.0.1 on free ports; the subprocesses are stopped (by pid)
on the way out. Like `proxy_bench.py`, `lb` is this interpreter's; put another tree first on
PYTHONPATH to measure it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_bench as pb


def raise_fd_limit(want: int) -> tuple[int, int]:
    """Soft and hard RLIMIT_NOFILE to `want` if allowed (root), else soft up to hard."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- client process -------------------------------------------------------------------------


async def client_main(port: int, count: int, events: int, ramp: float, limit: float) -> None:
    """Open `count` streams over `ramp` seconds; print one JSON line of outcomes."""
    payload = pb.request_bytes(port, pb.BODIES["stream"])
    outcomes: collections.Counter[str] = collections.Counter()
    durations: list[float] = []
    t0 = trio.current_time()

    async def one(delay: float) -> None:
        await trio.sleep(delay)
        started = trio.current_time()
        outcome = "timeout"
        with trio.move_on_after(limit):
            try:
                stream = await trio.open_tcp_stream(pb.HOST, port)
            except OSError as exc:
                outcome = f"connect: {exc.strerror or exc!r}"
            else:
                try:
                    outcome = await pb._read_stream(stream, payload, events)
                finally:
                    await trio.aclose_forcefully(stream)
        outcomes[outcome] += 1
        if outcome == "ok":
            durations.append(trio.current_time() - started)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, ramp * i / max(count, 1))
    durations.sort()
    print(json.dumps({
        "streams": count, "outcomes": dict(outcomes), "elapsed_s": trio.current_time() - t0,
        "duration_p50_s": durations[len(durations) // 2] if durations else None,
        "duration_max_s": durations[-1] if durations else None,
    }), flush=True)


# --- orchestration --------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    limits = raise_fd_limit(args.fd_limit)
    pb.log(f"RLIMIT_NOFILE {limits}")
    logdir = Path(tempfile.mkdtemp(prefix="lb-many-"))
    cluster = pb.Cluster(logdir)
    clients: list[subprocess.Popen[bytes]] = []
    events = args.tokens + 3  # role, tokens, finish, [DONE]
    stream_secs = args.tokens * args.itl_ms / 1000
    try:
        mocks = [cluster.mock(args.tokens, 0, args.itl_ms) for _ in range(args.mocks)]
        port = pb.free_port()
        argv = [*pb.lb_command(), "serve", "--host", pb.HOST, "--port", str(port),
                "--log-level", "warning"]
        for mock in mocks:
            argv += ["--node", f"{pb.HOST}:{mock.port}"]
        lb = pb.Proc("lb", argv, port, logdir).start()
        cluster.procs.append(lb)
        warm = pb.RawHTTP(port)
        try:  # lazy imports and first connections, without the mocks' delays
            payload = pb.request_bytes(port, pb.BODIES["stream"], "x-mock-fault: itl-ms=0\r\n")
            for _ in range(20):
                warm.request(payload)
        finally:
            warm.close()
        for mock in mocks:
            pb.http_get_json(mock.port, "/mock/reset", "POST")
        time.sleep(0.5)
        before = pb.memory_kb(lb.pid).get("VmRSS", 0)
        cpu_before = pb.cpu_seconds(lb.pid)
        pb.log(f"lb pid {lb.pid} :{port}, RSS {before / 1024:.0f} MB; {args.streams} streams "
               f"from {args.clients} clients over {args.ramp_secs:g}s, {events} events "
               f"{args.itl_ms:g} ms apart ({stream_secs:g}s a stream) from {args.mocks} mocks")
        share = [args.streams // args.clients + (i < args.streams % args.clients)
                 for i in range(args.clients)]
        limit = args.ramp_secs + stream_secs + args.grace_secs
        t0 = time.monotonic()
        for count in share:
            clients.append(subprocess.Popen(
                [sys.executable, __file__, "--client", str(port), "--streams", str(count),
                 "--tokens", str(args.tokens), "--ramp-secs", str(args.ramp_secs),
                 "--grace-secs", str(stream_secs + args.grace_secs)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            ))
        rss: list[int] = []
        fds: list[int] = []
        open_at_nodes: list[int] = []
        last_poll = 0.0
        while any(c.poll() is None for c in clients):
            if time.monotonic() - t0 > limit + 30:
                pb.log("clients overran their time limit: stopping them")
                break
            rss.append(pb.memory_kb(lb.pid).get("VmRSS", 0))
            fds.append(fd_count(lb.pid))
            if time.monotonic() - last_poll >= 1.0:
                last_poll = time.monotonic()
                with contextlib.suppress(OSError, KeyError, ValueError):
                    open_at_nodes.append(sum(
                        pb.http_get_json(m.port, "/mock/stats")["concurrent"] for m in mocks))
            time.sleep(0.25)
        elapsed = time.monotonic() - t0
        cpu = pb.cpu_seconds(lb.pid) - cpu_before
        outcomes: collections.Counter[str] = collections.Counter()
        per_client = []
        for c in clients:
            try:
                out, _ = c.communicate(timeout=30)
                result = json.loads(out.decode().strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                c.kill()
                result = {"outcomes": {"client died": 1}}
            per_client.append(result)
            outcomes.update(result["outcomes"])
        memory = pb.memory_kb(lb.pid)
        node_stats = [pb.http_get_json(m.port, "/mock/stats") for m in mocks]
        peak = max(rss, default=before)
        return {
            "streams": args.streams,
            "completed": outcomes.get("ok", 0),
            "failures": {k: v for k, v in outcomes.items() if k != "ok"},
            "events_per_stream": events,
            "stream_secs": stream_secs,
            "ramp_secs": args.ramp_secs,
            "clients": args.clients,
            "mocks": args.mocks,
            "peak_open_at_nodes": max(open_at_nodes, default=0),
            "node_max_concurrent_each": [s.get("max_concurrent") for s in node_stats],
            "lb_peak_fds": max(fds, default=0),
            "lb_rss_before_mb": before / 1024,
            "lb_rss_peak_mb": peak / 1024,
            "lb_hwm_mb": memory.get("VmHWM", 0) / 1024,
            "lb_rss_after_mb": memory.get("VmRSS", 0) / 1024,
            "lb_kb_per_stream": (peak - before) / max(1, max(open_at_nodes, default=1)),
            "lb_cpu_s": cpu,
            "lb_cpu_us_per_event": cpu * 1e6 / max(1, outcomes.get("ok", 0) * events),
            "elapsed_s": elapsed,
            "per_client": per_client,
            "lb_log_problems": lb.problems()[:10],
            "rlimit_nofile": list(limits),
            "load": pb.loadavg(),
        }
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
        cluster.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--mocks", type=int, default=4, help="mock node processes")
    parser.add_argument("--tokens", type=int, default=25, help="tokens per stream")
    parser.add_argument("--itl-ms", type=float, default=5000, help="gap between tokens")
    parser.add_argument("--ramp-secs", type=float, default=60, help="streams start over this")
    parser.add_argument("--grace-secs", type=float, default=60,
                        help="a stream may take this much longer than tokens x itl")
    parser.add_argument("--fd-limit", type=int, default=65536)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client is not None:  # one client process (started by the orchestrator)
        trio.run(client_main, args.client, args.streams, args.tokens + 3, args.ramp_secs,
                 args.ramp_secs + args.grace_secs)
        return 0
    with pb.terminate_on_sigterm():
        result = run(args)
    shown = {k: v for k, v in result.items() if k != "per_client"}
    for key, value in shown.items():
        if isinstance(value, float) and math.isfinite(value):
            value = round(value, 2)
        print(f"{key:26} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["completed"] == result["streams"] else 1


if __name__ == "__main__":
    sys.exit(main())
