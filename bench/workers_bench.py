"""Requests/s of `lb serve --workers N` against fast mock nodes, and lb's CPU per request.

Starts MOCKS mock nodes (`lb mock`, 8 tokens, no delay) and, for each worker count, lb in front
of them, every process pinned with `taskset` to the CPUs given; `wrk` (closed loop, kept-alive
connections) sends non-stream chat completions for --secs seconds. Reported per run: requests/s,
and the CPU time of lb (the parent, its workers and the private redis-server, from /proc)
divided by the requests served. Each worker count is measured --reps times (median).

    python bench/workers_bench.py --workers 1 2 --lb-cpus 0,1 --mock-cpus 0,1 --wrk-cpus 0,1

On a machine with enough cores, give lb its own (e.g. --lb-cpus 0-7 --mock-cpus 8-11
--wrk-cpus 12-15): then N workers should give close to N x one worker's requests/s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

LB = [sys.executable, "-m", "lb.cli"]
BODY = '{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}'
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tree(pid: int) -> list[int]:
    """pid and every descendant."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, todo = [pid], [pid]
    while todo:
        current = todo.pop()
        kids = [child for child, parent in parents.items() if parent == current]
        found += kids
        todo += kids
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def wait_line(process: subprocess.Popen[str], prefix: str) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith(prefix):
        raise RuntimeError(f"unexpected first line {line!r}")
    return line.strip().rsplit(" ", 1)[1]


@contextlib.contextmanager
def started(command: list[str], cpus: str, prefix: str) -> Iterator[tuple[int, str]]:
    env = {**os.environ, "LB_LOG_LEVEL": "warning"}
    process = subprocess.Popen(
        ["taskset", "-c", cpus, *command], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        yield process.pid, wait_line(process, prefix)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_wrk(url: str, cpus: str, secs: int, connections: int, threads: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            f"wrk.method = 'POST'\nwrk.body = '{BODY}'\n"
            "wrk.headers['Content-Type'] = 'application/json'\n"
        )
    try:
        out = subprocess.run(
            ["taskset", "-c", cpus, "wrk", "-t", str(threads), "-c", str(connections),
             "-d", f"{secs}s", "-s", script.name, f"{url}/v1/chat/completions"],
            capture_output=True, text=True, check=True,
        ).stdout
    finally:
        os.unlink(script.name)
    if "Non-2xx" in out:
        raise RuntimeError(f"errors during the run:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--mocks", type=int, default=2)
    parser.add_argument("--lb-cpus", default="0,1")
    parser.add_argument("--mock-cpus", default="0,1")
    parser.add_argument("--wrk-cpus", default="0,1")
    parser.add_argument("--secs", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"# {' '.join(sys.argv)}  ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")
    with contextlib.ExitStack() as stack:
        urls = [
            stack.enter_context(started(
                [*LB, "mock", "--port", "0", "--model", "mock-model", "--tokens", "8"],
                args.mock_cpus, "lb mock listening",
            ))[1]
            for _ in range(args.mocks)
        ]
        direct = run_wrk(urls[0], args.wrk_cpus, args.secs, args.connections, args.threads)
        print(f"one mock alone: {direct:.0f} requests/s")
        results: dict[int, list[tuple[float, float]]] = {}
        for count in args.workers:
            for _ in range(args.reps):
                port = free_port()
                command = [*LB, "serve", "--host", "127.0.0.1", "--port", str(port),
                           "--workers", str(count), *(f"--node={url}" for url in urls)]
                with started(command, args.lb_cpus, "lb listening") as (pid, url):
                    time.sleep(1)  # every worker settled in the fleet
                    run_wrk(url, args.wrk_cpus, 2, args.connections, args.threads)  # warm-up
                    pids = tree(pid)
                    before = cpu_seconds(pids)
                    rps = run_wrk(url, args.wrk_cpus, args.secs, args.connections, args.threads)
                    used = cpu_seconds(pids) - before
                    ms = 1000 * used / (rps * args.secs)
                    results.setdefault(count, []).append((rps, ms))
                    print(f"workers={count}: {rps:.0f} requests/s, {ms:.3f} lb CPU-ms/request",
                          flush=True)
        base = statistics.median(rps for rps, _ in results[args.workers[0]])
        for count, runs in results.items():
            rps = statistics.median(r for r, _ in runs)
            ms = statistics.median(m for _, m in runs)
            print(f"median workers={count}: {rps:.0f} requests/s ({rps / base:.2f} x), "
                  f"{ms:.3f} lb CPU-ms/request")


if __name__ == "__main__":
    main()
