"""Is `lb bench` ever the bottleneck? Its rate against a mock node alone next to the rate one
lb process proxies to that mock, and the CPU each process spends per request.

    python bench/generator_rate.py                 # 3 repetitions of 10,000 requests per run
    python bench/generator_rate.py --requests 2000 --reps 1

Starts `lb mock --tokens 8` and `lb serve --node MOCK` (as proxy_bench.py does), then, per
repetition and mode (non-stream, 9-event streams), `lb bench -c 16 -n N` straight at the mock
and through lb. Writes bench/results/lb-bench-DATE.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_bench import (  # the sibling script
    MODES,
    RESULTS_DIR,
    Cluster,
    git_rev,
    loadavg,
    log,
    machine,
    raise_fd_limit,
    run_load,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    raise_fd_limit()
    meta = {"date": datetime.date.today().isoformat(), "git": git_rev(), "machine": machine(),
            "command": shlex.join(["python", "bench/generator_rate.py", *sys.argv[1:]]),
            "load_before": loadavg()}
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="lb-genrate-")))
    runs: list[dict[str, Any]] = []
    try:
        mock = cluster.mock(8, 0, 0)
        lb = cluster.lb(mock)
        for mode in MODES:
            run_load(mock.port, mode, 16, 2000)
            run_load(lb.port, mode, 16, 2000)
        for rep in range(args.reps):
            for mode in MODES:
                for path, proc in (("direct", mock), ("lb", lb)):
                    run = run_load(proc.port, mode, 16, args.requests, cpu_pid=proc.pid)
                    run.update(rep=rep, path=path)
                    runs.append(run)
                    log(f"rep {rep} {mode} {path}: {run['rps']:.0f} req/s, generator "
                        f"{run['generator_cpu_ms_per_request']:.3f} ms/req, "
                        f"{'mock' if path == 'direct' else 'lb'} "
                        f"{run['cpu_ms_per_request']:.3f} ms/req, errors {run['errors']}")
    finally:
        cluster.close()
    meta["load_after"] = loadavg()
    rows = []
    for mode in MODES:
        def med(path: str, key: str, mode: str = mode) -> float:
            return statistics.median(
                r[key] for r in runs if r["mode"] == mode and r["path"] == path
            )
        ratios = [d["rps"] / v["rps"] for d, v in zip(
            [r for r in runs if r["mode"] == mode and r["path"] == "direct"],
            [r for r in runs if r["mode"] == mode and r["path"] == "lb"], strict=True)]
        rows.append({
            "mode": mode, "direct_rps": med("direct", "rps"), "lb_rps": med("lb", "rps"),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "generator_ms_direct": med("direct", "generator_cpu_ms_per_request"),
            "generator_ms_lb": med("lb", "generator_cpu_ms_per_request"),
            "mock_ms": med("direct", "cpu_ms_per_request"),
            "lb_ms": med("lb", "cpu_ms_per_request"),
        })
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"lb-bench-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs, "rows": rows},
                                                    indent=2))
    lines = [
        f"# lb bench: the generator's rate — {meta['date']}", "",
        f"Command: `{meta['command']}` (git {meta['git']}); load average {meta['load_before']} "
        f"before, {meta['load_after']} after, on {meta['machine']['nproc']} shared CPUs.", "",
        f"`lb bench -c 16 -n {args.requests:,}` straight at `lb mock --tokens 8` (direct) and "
        "through one `lb serve` in front of it (lb); each process on its own; median over "
        f"{args.reps} repetitions. CPU: utime+stime from /proc per request served.", "",
        "| request | direct req/s | via lb req/s | direct / lb (min) | generator CPU ms/req "
        "(direct, lb) | mock CPU ms/req | lb CPU ms/req |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['direct_rps']:.0f} | {r['lb_rps']:.0f} | "
            f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}x) | {r['generator_ms_direct']:.3f}, "
            f"{r['generator_ms_lb']:.3f} | {r['mock_ms']:.3f} | {r['lb_ms']:.3f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    log(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
