"""lb's instructions per request, A/B, counted by callgrind: a figure that the machine's other
work does not move (bench/ab_cpu.py's CPU seconds swing by +-20% on a shared 2-core VM).

Each tree's `lb serve` runs under `valgrind --tool=callgrind` in front of one `lb mock`, with
counting off while it starts and warms up (`--warmup` requests); then counting is switched on
(`callgrind_control -i on`), `lb bench` sends `--requests` (at `--concurrency`), counting goes
off and the counts are dumped. The figure is user-space instructions (Ir) per request: the
kernel's side of each syscall is not in it, nor is a cache miss, so it says what lb's own code
costs; ab_cpu.py says what a request costs in all. Under valgrind lb runs ~30x slower, so what
happens per second (spend flushes, polls) falls on ~30x fewer requests than at full speed: such
costs are overstated here, never hidden.

    git worktree add --detach /tmp/lb-before HEAD~1
    python bench/ab_instructions.py --tree before=/tmp/lb-before --tree after=.
    python bench/ab_instructions.py --tree on=. --tree off=. --env on:LB_MASTER_KEY=sk-x \\
        --env on:LB_DATA_DIR=/tmp/pk        # with LB_BENCH_AUTHORIZATION, see policy_key.py

Needs valgrind (Debian package valgrind). Runs the trees one after another, `--reps` times
(repeats agree to within about 1%: the order of events under concurrency varies a little).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import proxy_bench as pb
from ab_cpu import environ, parse_envs, resolve


def count(tree: Path, env: dict[str, str], mock: pb.Proc, mode: str, args: argparse.Namespace,
          logdir: Path) -> dict[str, Any]:
    """One lb under callgrind: instructions per request over `args.requests` requests."""
    port = pb.free_port()
    out = logdir / f"callgrind-{port}.out"
    argv = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        *pb.lb_command(), "serve", "--node", f"{pb.HOST}:{mock.port}", "--host", pb.HOST,
        "--port", str(port), "--log-level", os.environ.get("LB_LOG_LEVEL", "warning"),
    ]
    with environ({**env, "PYTHONPATH": str(tree)}):
        lb = pb.Proc("lb", argv, port, logdir).start(timeout=180)
    try:
        pb.lb_bench(port, mode, "-c", str(args.concurrency), "-n", str(args.warmup))
        subprocess.run(["callgrind_control", "-i", "on", str(lb.pid)], check=True,
                       capture_output=True)
        report = pb.lb_bench(port, mode, "-c", str(args.concurrency), "-n", str(args.requests))
        subprocess.run(["callgrind_control", "-i", "off", str(lb.pid)], check=True,
                       capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(lb.pid)], check=True, capture_output=True)
    finally:
        lb.stop()
    dumps = sorted(logdir.glob(f"callgrind-{port}.out.*"))
    totals = [int(m.group(1)) for path in dumps
              if (m := re.search(r"^totals: (\d+)", path.read_text(), re.M))]
    if report["ok"] != args.requests or not totals:
        raise RuntimeError(f"{report['ok']} of {args.requests} ok ({report['errors']}), "
                           f"dumps {dumps}:\n{lb.log_tail()}")
    return {"instructions": sum(totals), "per_request": sum(totals) / report["ok"],
            "errors": report["errors"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--env", action="append", default=[], metavar="NAME:VAR=VALUE")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8, help="tokens per answer (the mock)")
    parser.add_argument("--itl-ms", type=float, default=0,
                        help="the mock's gap between tokens (1: each event in its own read)")
    parser.add_argument("--modes", nargs="+", default=["non-stream"], choices=pb.MODES)
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args(argv)
    trees = {name: Path(path).resolve() for name, _, path in
             (spec.partition("=") for spec in args.tree)}
    envs = parse_envs(args.env, trees)
    for name, tree in trees.items():
        settings = " ".join(f"{k}={v}" for k, v in envs[name].items())
        pb.log(f"{name}: lb from {resolve(tree)} {settings}")
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="lb-ab-ir-") as tmp:
        logdir = Path(tmp)
        cluster = pb.Cluster(logdir)
        try:
            mock = cluster.mock(args.tokens, 0, args.itl_ms)
            for rep in range(args.reps):
                for mode in args.modes:
                    for name, tree in trees.items():
                        got = count(tree, envs[name], mock, mode, args, logdir)
                        results.setdefault(mode, {}).setdefault(name, []).append(
                            got["per_request"])
                        pb.log(f"rep {rep} {mode} {name}: {got['per_request']:,.0f} Ir/request")
        finally:
            cluster.close()
    first = next(iter(trees))
    for mode, by_tree in results.items():
        base = statistics.median(by_tree[first])
        for name in trees:
            value = statistics.median(by_tree[name])
            per_event = (f"  {value / (args.tokens + 3):,.0f} Ir/event"
                         if mode == "stream" else "")  # role, tokens, finish, [DONE]
            print(f"{mode:<11} {name:<16} {value:>12,.0f} Ir/request{per_event}  "
                  f"x{value / base:.3f} of {first}  all: "
                  + " ".join(f"{v:,.0f}" for v in by_tree[name]))
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "git": pb.git_rev(),
                                         "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
