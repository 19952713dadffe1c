"""lb's CPU per request, A/B: two (or more) source trees of lb side by side, in front of one mock.

Each tree runs as its own `lb serve` (with PYTHONPATH pointing at the tree), all in front of the
same `lb mock`. The `lb bench` runs alternate between the trees (and the order flips every
repetition), so the noise of a shared machine falls on both alike. For each run, lb's CPU time
(utime+stime from /proc) is divided by the requests served, as in proxy_bench.py.

    git worktree add --detach /tmp/lb-before HEAD
    python bench/ab_cpu.py --tree before=/tmp/lb-before --tree after=. --reps 7
    python bench/ab_cpu.py --tree before=/tmp/lb-before --tree after=. --reps 0 \\
        --profile 15 --strace 2000          # py-spy and strace -c only
    python bench/ab_cpu.py --tree before=/tmp/lb-before --tree after=. --reps 5 \\
        --requests 0 --paired 2000          # c=1 added latency only (as in proxy_bench.py)

Two trees may be the same path with a different environment, e.g. the cost of a feature that
a setting turns off (`--env NAME:VAR=VALUE`, repeatable, applies to that tree's lb only):

    python bench/ab_cpu.py --tree on=. --tree off=. --env off:LB_METRICS=0 --reps 5

The mock runs from the first tree. Figures go to stdout, with the first tree's CPU per request
over the second's, rep by rep (both ran within seconds of each other, so the ratio is the figure
to trust on a shared machine); --json FILE keeps everything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import proxy_bench as pb


def resolve(tree: Path) -> str:
    """Where `import lb` goes with PYTHONPATH=tree (to be sure each lb runs its own tree)."""
    done = subprocess.run(
        [sys.executable, "-c", "import lb; print(lb.__file__)"],
        env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, check=True,
        cwd="/",  # as for the lb script: the current directory is not on its path
    )
    return done.stdout.strip()


@contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `values` set (for the processes started meanwhile), then as it was."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def start_lb(
    cluster: pb.Cluster, mock: pb.Proc, tree: Path, env: Mapping[str, str] | None = None
) -> pb.Proc:
    with environ({**(env or {}), "PYTHONPATH": str(tree)}):
        return cluster.lb(mock)


def parse_envs(specs: list[str], trees: Mapping[str, Path]) -> dict[str, dict[str, str]]:
    """`NAME:VAR=VALUE` items -> {tree name: {VAR: VALUE}}."""
    envs: dict[str, dict[str, str]] = {name: {} for name in trees}
    for spec in specs:
        name, _, assignment = spec.partition(":")
        var, sep, value = assignment.partition("=")
        if name not in trees or not sep or not var:
            raise SystemExit(f"--env {spec!r}: expected NAME:VAR=VALUE with NAME one of the trees")
        envs[name][var] = value
    return envs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                        help="an lb source tree to measure (repeat; a path may repeat)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME:VAR=VALUE",
                        help="set VAR for tree NAME's lb (repeat)")
    parser.add_argument("--reps", type=int, default=5, help="lb bench runs per tree and mode")
    parser.add_argument("--requests", type=int, default=20_000, help="requests per lb bench run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8,
                        help="tokens per answer of the mock (a stream has tokens + 3 events)")
    parser.add_argument("--itl-ms", type=float, default=0,
                        help="the mock's gap between tokens (0: a stream is one write)")
    parser.add_argument("--modes", nargs="+", default=list(pb.MODES), choices=pb.MODES)
    parser.add_argument("--profile", type=int, default=0, metavar="SECS",
                        help="then py-spy each lb for SECS under non-stream load")
    parser.add_argument("--strace", type=int, default=0, metavar="N",
                        help="then count each lb's syscalls over N non-stream requests")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="then, --reps times per mode, time N request pairs at c=1: each "
                             "tree against the mock, and the first two trees head to head")
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args(argv)

    trees: dict[str, Path] = {}
    for spec in args.tree:
        name, _, path = spec.partition("=")
        if name in trees:
            parser.error(f"--tree {name} is given twice")
        trees[name] = Path(path).resolve()
    envs = parse_envs(args.env, trees)
    for name, path in trees.items():
        extra_env = " ".join(f"{var}={value}" for var, value in envs[name].items())
        pb.log(f"{name}: lb from {resolve(path)}" + (f" with {extra_env}" if extra_env else ""))
    pb.raise_fd_limit()
    logdir = Path(tempfile.mkdtemp(prefix="lb-ab-"))
    cluster = pb.Cluster(logdir)
    runs: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"profile": {}, "syscalls": {}, "paired": []}
    meta = {"load_before": pb.loadavg(), "machine": pb.machine(), "trees": {
        name: str(path) for name, path in trees.items()}, "env": envs, "argv": sys.argv[1:]}
    try:
        first = next(iter(trees.values()))
        with environ({"PYTHONPATH": str(first)}):
            mock = cluster.mock(args.tokens, 0, args.itl_ms)
        lbs = {name: start_lb(cluster, mock, path, envs[name]) for name, path in trees.items()}
        pb.log(f"mock :{mock.port}; " + ", ".join(
            f"{name} :{lb.port} pid {lb.pid}" for name, lb in lbs.items()))
        for lb in lbs.values():
            for mode in args.modes:
                warm_up = min(2000, max(args.requests, 100))  # long streams: fewer
                pb.run_load(lb.port, mode, args.concurrency, warm_up)
        names = list(lbs)
        for rep in range(args.reps if args.requests else 0):
            order = names if rep % 2 == 0 else names[::-1]
            for mode in args.modes:
                for name in order:
                    lb = lbs[name]
                    run = pb.run_load(
                        lb.port, mode, args.concurrency, args.requests, cpu_pid=lb.pid
                    )
                    run.update(tree=name, rep=rep)
                    runs.append(run)
                    pb.log(f"rep {rep} {mode} {name}: {run['cpu_ms_per_request']:.3f} ms/req, "
                           f"{run['rps']:.0f} req/s, errors {run['errors']}")
        extra["paired"] = paired = []
        for rep in range(args.reps if args.paired else 0):
            for mode in args.modes:
                pairs = [(name, mock.port, lb.port) for name, lb in lbs.items()]
                if len(names) >= 2:
                    pairs.append((f"{names[1]}-{names[0]}", lbs[names[0]].port,
                                  lbs[names[1]].port))
                for label, base, port in pairs:
                    run = pb.run_paired(base, port, mode, args.paired, 100)
                    run.update(label=label, rep=rep)
                    paired.append(run)
                    pb.log(f"rep {rep} paired {mode} {label}: added p50 "
                           f"{run['added_p50_ms']:.3f} ms, p90 {run['added_p90_ms']:.3f} ms")
        for name, lb in lbs.items():
            if args.profile:
                pb.log(f"py-spy on {name} for {args.profile}s")
                extra["profile"][name] = profile(lb, name, args.profile, logdir)
            if args.strace:
                pb.log(f"strace on {name} over {args.strace} requests")

                def load(lb: pb.Proc = lb) -> tuple[int, int]:
                    run = pb.run_load(lb.port, "non-stream", args.concurrency, args.strace)
                    return run["ok"], run["errors"]

                extra["syscalls"][name] = pb.strace_counts(lb, name, load, logdir)
        for name, lb in lbs.items():
            problems = lb.problems()
            if problems:
                pb.log(f"{name} logged problems: {problems[:5]}")
    finally:
        cluster.close()
    meta["load_after"] = pb.loadavg()

    summary = []
    for mode in args.modes:
        for name in trees:
            values = [r["cpu_ms_per_request"] for r in runs if r["tree"] == name
                      and r["mode"] == mode]
            rps = [r["rps"] for r in runs if r["tree"] == name and r["mode"] == mode]
            errors = sum(r["errors"] for r in runs if r["tree"] == name and r["mode"] == mode)
            if not values:
                continue
            row = {"mode": mode, "tree": name, "runs": len(values),
                   "cpu_ms": pb.spread(values), "rps": pb.spread(rps), "errors": errors,
                   "all_cpu_ms": values}
            summary.append(row)
            if mode == "stream" and args.tokens != 8:
                events = args.tokens + 3  # role, tokens, finish, [DONE]
                print(f"{mode:10} {name:8} CPU us/event median "
                      f"{1000 * statistics.median(values) / events:.2f} ({events} events)")
            print(f"{mode:10} {name:8} CPU ms/req median {statistics.median(values):.3f} "
                  f"[{min(values):.3f}, {max(values):.3f}]  req/s {pb.spread(rps)['median']:.0f}"
                  f"  errors {errors}  all: {' '.join(f'{v:.3f}' for v in values)}")
    if len(trees) >= 2:
        one, other = list(trees)[:2]
        for mode in args.modes:
            ratios = []
            for rep in range(args.reps):
                pair = {r["tree"]: r["cpu_ms_per_request"] for r in runs
                        if r["rep"] == rep and r["mode"] == mode}
                if one in pair and other in pair and pair[other] > 0:
                    ratios.append(pair[one] / pair[other])
            if ratios:
                summary.append({"mode": mode, "ratio": f"{one}/{other}", "per_rep": ratios})
                print(f"{mode:10} CPU per request {one}/{other} per rep: "
                      f"{' '.join(f'{r:.3f}' for r in ratios)}  "
                      f"(median {statistics.median(ratios):.3f})")
    labels = sorted({r["label"] for r in extra["paired"]}, key=str)
    for mode in args.modes:
        for label in labels:
            rows = [r for r in extra["paired"] if r["label"] == label and r["mode"] == mode]
            p50 = [r["added_p50_ms"] for r in rows]
            p90 = [r["added_p90_ms"] for r in rows]
            print(f"{mode:10} paired {label:14} added p50 median {statistics.median(p50):.3f} "
                  f"[{min(p50):.3f}, {max(p50):.3f}]  p90 median {statistics.median(p90):.3f}"
                  f"  errors {sum(r['errors'] for r in rows)}")
    for name, prof in extra["profile"].items():
        print(f"\n{name}: py-spy, {prof.get('samples')} samples")
        for row in prof.get("by_lb_caller", [])[:12]:
            print(f"  {row['percent']:5.1f}  {row['function']}")
        for row in prof.get("lb_inclusive", [])[:8]:
            print(f"  incl {row['percent']:5.1f}  {row['function']}")
    for name, sc in extra["syscalls"].items():
        per = sc.get("per_unit", {})
        failed = sc.get("failed_per_unit", {})
        print(f"\n{name}: syscalls per request, total {sc.get('total_per_unit', 0):.2f}")
        for call, n in per.items():
            if n >= 0.005:
                note = f" ({failed[call]:.2f} failed)" if call in failed else ""
                print(f"  {call:12} {n:.2f}{note}")
    if args.json:
        args.json.write_text(json.dumps(
            {"meta": meta, "summary": summary, "runs": runs, **extra}, indent=2) + "\n")
    return 0


def profile(lb: pb.Proc, name: str, seconds: int, logdir: Path) -> dict[str, Any]:
    """`py-spy record --format raw` on lb under `lb bench -c 16` non-stream load; the raw stacks are
    kept in logdir, the summary (as in proxy_bench.py) is returned."""
    raw = logdir / f"{name}-nonstream.raw"
    argv = ["py-spy", "record", "--pid", str(lb.pid), "--duration", str(seconds),
            "--rate", "200", "--nolineno", "--format", "raw", "-o", str(raw)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)  # attach
        pb.lb_bench(lb.port, "non-stream", "-c", "16", "-d", str(seconds + 1),
                    timeout=seconds + 60)
        spy.communicate(timeout=seconds + 60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not raw.exists():
        return {"error": "py-spy wrote nothing"}
    return {"raw": str(raw), "command": " ".join(argv), **pb.summarise_stacks(raw.read_text())}


if __name__ == "__main__":
    sys.exit(main())
