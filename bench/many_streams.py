"""Many concurrent streams through one lb: how many are open at once, its memory, and whether
every stream completes.

One `lb serve` (one process) sits in front of `--mocks` slow `lb mock` processes (tokens
`--itl-ms` apart, so every stream stays open for tokens x itl). `--clients` client processes
(this script with `--client`) open `--streams` streaming chat requests in all, spread evenly
over the first `--ramp-secs`, each on its own connection, and read each to `data: [DONE]` and
the end of the chunked body, checking the event count; a 503 (lb at its connection limit) is
tried again after its Retry-After, as the SDKs do, and counted. Meanwhile lb's RSS and open file
descriptors are sampled every 0.25 s and, every 0.5 s at the same instant, how many streams are
open: lb's own count (the sum of `lb_node_inflight` in its /metrics, read over one kept-alive
connection) and the mocks' (the sum of their `/mock/stats` `concurrent`), with the depth of lb's
and the mocks' accept queues (`ss -lnt`) and lb's CPU share: the `timeline` in the JSON. Each
client reports how long its streams' connects and first bytes took (from each attempt's start).
Nothing is asserted: the figures are printed (and written with --json).

    python bench/many_streams.py                       # 10,000 streams, about 7 minutes
    python bench/many_streams.py --streams 1000 --tokens 5 --itl-ms 500   # a smoke run
    python bench/many_streams.py --json bench/results/x.json

The script raises RLIMIT_NOFILE (soft and hard, to `--fd-limit` when allowed, i.e. with
CAP_SYS_RESOURCE; else the soft limit to the hard one) before it starts anything. lb needs two
descriptors a stream (the client's connection and the node's) and by default serves
(soft limit - 128) / 2 client connections (lb.http.server.connection_limit): streams beyond that
are answered 503 and retried. So N streams open at once need a hard limit of about 2N + 128.
Everything runs on 127.0.0.1 on free ports; the subprocesses are stopped (by pid) on the way out.
Like `proxy_bench.py`, `lb` is this interpreter's; put another tree first on PYTHONPATH to
measure it (`many_streams_ab.py` runs two trees in alternation).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
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
    """Open `count` streams over `ramp` seconds; print one JSON line of outcomes and of how
    late each stream's phases came (connected, first byte of the answer) after its slot."""
    payload = pb.request_bytes(port, pb.BODIES["stream"])
    outcomes: collections.Counter[str] = collections.Counter()
    durations: list[float] = []
    connect_s: list[float] = []
    head_s: list[float] = []
    retries: collections.Counter[str] = collections.Counter()
    t0 = trio.current_time()

    async def one(delay: float) -> None:
        await trio.sleep(delay)
        started = trio.current_time()
        outcome = "timeout"
        with trio.move_on_after(limit):
            while True:
                outcome = await attempt()
                if outcome != "status 503":
                    break
                # lb is at its connection limit (too_many_connections): as the SDKs do, try
                # again after its Retry-After (1 s).
                retries["503"] += 1
                await trio.sleep(1)
        outcomes[outcome] += 1
        if outcome == "ok":
            durations.append(trio.current_time() - started)

    async def attempt() -> str:
        """One try: its connect and first byte are timed from its own start."""
        started = trio.current_time()
        try:
            stream = await trio.open_tcp_stream(pb.HOST, port)
        except OSError as exc:
            return f"connect: {exc.strerror or exc!r}"
        connect_s.append(trio.current_time() - started)
        try:
            return await read_stream(stream, payload, events, started, head_s)
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, ramp * i / max(count, 1))
    print(json.dumps({
        "streams": count, "outcomes": dict(outcomes), "retries": dict(retries),
        "elapsed_s": trio.current_time() - t0,
        "duration_s": quantiles(durations), "connect_s": quantiles(connect_s),
        "first_byte_s": quantiles(head_s),
    }), flush=True)


async def read_stream(
    stream: trio.SocketStream, payload: bytes, events: int, started: float, head_s: list[float]
) -> str:
    """Send the request and read the answer: "ok" if it is a 200 with `events` events ending
    in [DONE] and the chunked end, else what went wrong ("status 503" as soon as the head says
    so). Notes when its first byte came in `head_s`."""
    buf = bytearray()
    try:
        await stream.send_all(payload)
        while not buf.endswith(b"\r\n0\r\n\r\n"):
            data = await stream.receive_some(65536)
            if not data:
                return "closed early"
            if not buf:
                head_s.append(trio.current_time() - started)
            buf += data
            if len(buf) >= 12 and not buf.startswith(b"HTTP/1.1 200"):
                return "status " + bytes(buf[9:12]).decode("latin-1")
    except (trio.BrokenResourceError, OSError) as exc:
        return f"io: {exc!r}"[:80]
    count = buf.count(b"data: ")
    if count != events or b"data: [DONE]" not in buf:
        return f"{count} events"
    return "ok"


def quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"p50": pb.pct(values, 0.5), "p99": pb.pct(values, 0.99), "max": max(values)}


# --- orchestration --------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class LbOpen:
    """lb's own count of the streams it is proxying: the sum of `lb_node_inflight` in its
    /metrics, read over one kept-alive connection (opened before the load, so that it never
    needs a descriptor lb may not have)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection(pb.HOST, port, timeout=10)

    def __call__(self) -> int:
        self.conn.request("GET", "/metrics")
        text = self.conn.getresponse().read().decode()
        return round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith("lb_node_inflight{")))

    def close(self) -> None:
        self.conn.close()


def accept_queues(ports: list[int]) -> dict[int, int]:
    """Connections waiting in each listening socket's accept queue (`ss`' Recv-Q)."""
    out = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=False).stdout
    queues = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3].rpartition(":")[2].isdigit():
            port = int(fields[3].rpartition(":")[2])
            if port in ports:
                queues[port] = int(fields[1])
    return queues


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = pb.loadavg()
    limits = raise_fd_limit(args.fd_limit)
    pb.log(f"RLIMIT_NOFILE {limits}")
    logdir = Path(tempfile.mkdtemp(prefix="lb-many-"))
    cluster = pb.Cluster(logdir)
    clients: list[subprocess.Popen[bytes]] = []
    lb_open: LbOpen | None = None
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
        lb_open = LbOpen(port)
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
        # Sampled at the same instant, every 0.5 s: lb's count and the mocks' (their sum).
        open_in_lb: list[int] = []
        open_at_nodes: list[int] = []
        lb_queue: list[int] = []
        node_queue: list[int] = []
        timeline: list[dict[str, float]] = []
        last_poll = 0.0
        last_cpu = (t0, cpu_before)
        while any(c.poll() is None for c in clients):
            now = time.monotonic()
            if now - t0 > limit + 30:
                pb.log("clients overran their time limit: stopping them")
                break
            rss.append(pb.memory_kb(lb.pid).get("VmRSS", 0))
            fds.append(fd_count(lb.pid))
            if now - last_poll >= 0.5:
                last_poll = now
                with contextlib.suppress(OSError, KeyError, ValueError, http.client.HTTPException):
                    in_lb = lb_open()
                    at_nodes = sum(
                        pb.http_get_json(m.port, "/mock/stats")["concurrent"] for m in mocks)
                    open_in_lb.append(in_lb)
                    open_at_nodes.append(at_nodes)
                    queues = accept_queues([port, *(m.port for m in mocks)])
                    lb_queue.append(queues.get(port, 0))
                    node_queue.append(max(queues.get(m.port, 0) for m in mocks))
                    cpu_now = (time.monotonic(), pb.cpu_seconds(lb.pid))
                    lb_cpu_pct = 100 * (cpu_now[1] - last_cpu[1]) / (cpu_now[0] - last_cpu[0])
                    last_cpu = cpu_now
                    timeline.append({"t": round(now - t0, 1), "open_in_lb": in_lb,
                                     "open_at_nodes": at_nodes, "lb_fds": fds[-1],
                                     "lb_rss_mb": round(rss[-1] / 1024, 1),
                                     "lb_accept_queue": lb_queue[-1],
                                     "node_accept_queue_max": node_queue[-1],
                                     "lb_cpu_pct": round(lb_cpu_pct)})
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
            "retried_after_503": sum(c.get("retries", {}).get("503", 0) for c in per_client),
            "events_per_stream": events,
            "stream_secs": stream_secs,
            "ramp_secs": args.ramp_secs,
            "clients": args.clients,
            "mocks": args.mocks,
            "peak_open_in_lb": max(open_in_lb, default=0),
            "peak_open_at_nodes": max(open_at_nodes, default=0),
            "samples": len(open_in_lb),
            "node_max_concurrent_each": [s.get("max_concurrent") for s in node_stats],
            "lb_peak_fds": max(fds, default=0),
            "lb_peak_accept_queue": max(lb_queue, default=0),
            "node_peak_accept_queue": max(node_queue, default=0),
            "lb_rss_before_mb": before / 1024,
            "lb_rss_peak_mb": peak / 1024,
            "lb_hwm_mb": memory.get("VmHWM", 0) / 1024,
            "lb_rss_after_mb": memory.get("VmRSS", 0) / 1024,
            "lb_kb_per_stream": (peak - before) / max(1, max(open_in_lb, default=1)),
            "lb_cpu_s": cpu,
            "lb_cpu_us_per_event": cpu * 1e6 / max(1, outcomes.get("ok", 0) * events),
            "elapsed_s": elapsed,
            "per_client": per_client,
            "lb_log_problems": lb.problems()[:10],
            "rlimit_nofile": list(limits),
            "load": pb.loadavg(),
            "load_before": load_before,
            "timeline": timeline,
        }
    finally:
        if lb_open is not None:
            lb_open.close()
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
    parser.add_argument("--itl-ms", type=float, default=10_000, help="gap between tokens")
    parser.add_argument("--ramp-secs", type=float, default=120, help="streams start over this")
    parser.add_argument("--grace-secs", type=float, default=120,
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
    shown = {k: v for k, v in result.items() if k not in ("per_client", "timeline")}
    for key, value in shown.items():
        if isinstance(value, float) and math.isfinite(value):
            value = round(value, 2)
        print(f"{key:26} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["completed"] == result["streams"] else 1


if __name__ == "__main__":
    sys.exit(main())
