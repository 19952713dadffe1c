"""Is `lb bench` ever the bottleneck? Its rate against a mock node alone next to the rate one
lb process proxies to that mock, and the CPU each process spends per request.

    python bench/generator_rate.py                          # 3 repetitions of 10,000 requests
    python bench/generator_rate.py --requests 2000 --reps 1
    git worktree add --detach /tmp/lb-before <commit>
    python bench/generator_rate.py --tree before=/tmp/lb-before --tree after=.

Starts `lb mock --tokens 8 --processes P` (P processes on one port, SO_REUSEPORT: a node that
is not held to one core; default 2) and one `lb serve --node MOCK`, both from this checkout,
then, per repetition and mode (non-stream, 9-event streams), `lb bench -c 16 -n N` straight
at the mock and through lb, once per generator tree (`--tree NAME=PATH`, repeatable: the
generator's source tree, e.g. before and after a change; by default this checkout), the
trees' order flipping every repetition. The CPU of the mock is that of all its processes.
Writes bench/results/lb-bench-DATE.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_bench import (  # the sibling script
    BODIES,
    CLK_TCK,
    HOST,
    MODEL,
    MODES,
    REPO,
    RESULTS_DIR,
    Cluster,
    Proc,
    free_port,
    git_rev,
    lb_command,
    loadavg,
    log,
    machine,
    raise_fd_limit,
)

CONCURRENCY = 16


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its descendants alive now, in seconds."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def start_mock(cluster: Cluster, processes: int) -> Proc:
    port = free_port()
    argv = [*lb_command(), "mock", "--host", HOST, "--port", str(port), "--model", MODEL,
            "--tokens", "8", "--processes", str(processes)]
    proc = Proc("mock", argv, port, cluster.logdir).start()
    cluster.procs.append(proc)
    return proc


def run_bench(tree: Path, port: int, mode: str, requests: int, cpu_pid: int) -> dict[str, Any]:
    """`lb bench -c 16 -n requests` from `tree` against 127.0.0.1:port; with the target's CPU
    (its whole process tree) per request."""
    with tempfile.TemporaryDirectory() as tmp:
        workload = Path(tmp) / "workload.jsonl"
        workload.write_text(BODIES[mode] + "\n")
        before = tree_cpu_seconds(cpu_pid)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "lb.cli", "bench", f"http://{HOST}:{port}", "--workload",
             str(workload), "--timeout", "20", "-c", str(CONCURRENCY), "-n", str(requests),
             "--json", "-"],
            capture_output=True, text=True, timeout=60 + requests / 50, check=False,
            cwd="/", env={**os.environ, "PYTHONPATH": str(tree)},  # that tree's lb bench
        )
        wall = time.monotonic() - started
        cpu = tree_cpu_seconds(cpu_pid) - before
    if done.returncode != 0:
        raise RuntimeError(f"lb bench failed ({done.returncode}): {done.stderr[-500:]}")
    report = json.loads(done.stdout)
    ok = report["ok"]
    return {
        "mode": mode, "requests": report["requests"], "ok": ok,
        "errors": report["requests"] - ok, "error_kinds": report["errors"],
        "rps": report["requests_per_s"], "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"], "wall_s": wall, "cpu_s": cpu,
        "cpu_ms_per_request": cpu * 1000 / ok if ok else math.nan,
        "generator_cpu_ms_per_request": report["generator_cpu_ms_per_request"],
    }


def parse_tree(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"--tree {text!r}: expected NAME=DIRECTORY")
    return name, Path(path).resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mock-processes", type=int, default=2)
    parser.add_argument("--tree", type=parse_tree, action="append", default=[],
                        help="NAME=DIR: a source tree whose `lb bench` is the generator")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    trees: list[tuple[str, Path]] = args.tree or [("this", REPO)]
    raise_fd_limit()
    os.environ["PYTHONPATH"] = str(REPO)  # the mock and lb run this checkout's code
    meta = {"date": datetime.date.today().isoformat(), "git": git_rev(), "machine": machine(),
            "command": shlex.join(["python", "bench/generator_rate.py", *sys.argv[1:]]),
            "mock_processes": args.mock_processes, "load_before": loadavg(),
            "trees": {name: str(path) for name, path in trees}}
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="lb-genrate-")))
    runs: list[dict[str, Any]] = []
    try:
        mock = start_mock(cluster, args.mock_processes)
        lb = cluster.lb(mock)
        for mode in MODES:  # warm up
            for _, tree in trees:
                run_bench(tree, mock.port, mode, 2000, mock.pid)
                run_bench(tree, lb.port, mode, 2000, lb.pid)
        for rep in range(args.reps):
            order = trees if rep % 2 == 0 else trees[::-1]
            for mode in MODES:
                for name, tree in order:
                    for path, proc in (("direct", mock), ("lb", lb)):
                        run = run_bench(tree, proc.port, mode, args.requests, proc.pid)
                        run.update(rep=rep, path=path, tree=name, load=loadavg())
                        runs.append(run)
                        log(f"rep {rep} {mode} {name} {path}: {run['rps']:.0f} req/s, "
                            f"generator {run['generator_cpu_ms_per_request']:.3f} ms/req, "
                            f"{'mock' if path == 'direct' else 'lb'} "
                            f"{run['cpu_ms_per_request']:.3f} ms/req, errors {run['errors']}")
    finally:
        cluster.close()
    meta["load_after"] = loadavg()
    rows = summarize(runs, trees)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"lb-bench-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs, "rows": rows},
                                                    indent=2))
    stem.with_suffix(".md").write_text(render(meta, args, runs, rows))
    log(f"wrote {stem}.md and .json")
    return 0


def summarize(runs: list[dict[str, Any]], trees: list[tuple[str, Path]]) -> list[dict[str, Any]]:
    rows = []
    for name, _ in trees:
        for mode in MODES:
            mine = [r for r in runs if r["mode"] == mode and r["tree"] == name]
            direct = [r for r in mine if r["path"] == "direct"]
            via = [r for r in mine if r["path"] == "lb"]

            def med(side: list[dict[str, Any]], key: str) -> float:
                return statistics.median(r[key] for r in side)

            # Each direct run next to the lb run right after it (same rep, same tree).
            ratios = [d["rps"] / v["rps"] for d, v in zip(direct, via, strict=True)]
            rows.append({
                "tree": name, "mode": mode, "direct_rps": med(direct, "rps"),
                "lb_rps": med(via, "rps"), "ratio": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios),
                "generator_ms_direct": med(direct, "generator_cpu_ms_per_request"),
                "generator_ms_lb": med(via, "generator_cpu_ms_per_request"),
                "mock_ms": med(direct, "cpu_ms_per_request"),
                "lb_ms": med(via, "cpu_ms_per_request"),
            })
    return rows


def render(meta: dict[str, Any], args: argparse.Namespace, runs: list[dict[str, Any]],
           rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# lb bench: the generator's rate — {meta['date']}", "",
        f"Command: `{meta['command']}` (git {meta['git']}); load average {meta['load_before']} "
        f"before, {meta['load_after']} after, on {meta['machine']['nproc']} shared CPUs.", "",
        f"`lb bench -c {CONCURRENCY} -n {args.requests:,}` straight at `lb mock --tokens 8 "
        f"--processes {args.mock_processes}` (direct) and through one `lb serve` in front of it "
        f"(lb); median over {args.reps} repetitions; direct / lb is each repetition's direct "
        "rate over the lb rate measured right after it. CPU: utime+stime from /proc per "
        "request served (the mock: all its processes).", "",
        "| generator | request | direct req/s | via lb req/s | direct / lb (min, max) | "
        "generator CPU ms/req (direct, lb) | mock CPU ms/req | lb CPU ms/req |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['tree']} | {r['mode']} | {r['direct_rps']:.0f} | {r['lb_rps']:.0f} | "
            f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}x, {r['ratio_max']:.2f}x) | "
            f"{r['generator_ms_direct']:.3f}, {r['generator_ms_lb']:.3f} | {r['mock_ms']:.3f} | "
            f"{r['lb_ms']:.3f} |"
        )
    lines += [
        "", "Per run, in order (req/s; CPU ms per request; the load average when it ended):", "",
        "| rep | request | generator | path | req/s | generator ms/req | target ms/req | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        lines.append(
            f"| {r['rep']} | {r['mode']} | {r['tree']} | {r['path']} | {r['rps']:.0f} | "
            f"{r['generator_cpu_ms_per_request']:.3f} | {r['cpu_ms_per_request']:.3f} | "
            f"{r['load'].split()[0]} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
