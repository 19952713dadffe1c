"""Two trees' `lb` side by side under `many_streams.py`: reps alternate which tree goes first,
and each rep reports both trees' figures and their ratio (how deep lb's accept queue got, how
late the streams' first bytes came, how many were open at once, lb's CPU).

    python bench/many_streams_ab.py --tree new=/tmp/streams-new --tree main=/tmp/streams-main \\
        --reps 6 -- --streams 2000 --tokens 5 --itl-ms 1000 --ramp-secs 4 --grace-secs 30

Everything after `--` goes to many_streams.py (this checkout's), with PYTHONPATH set to each tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FIGURES = ("lb_peak_accept_queue", "first_byte_p50_s", "first_byte_p99_s", "peak_open_in_lb",
           "lb_cpu_s", "completed")


def one_run(tree: Path, extra: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run([sys.executable, str(HERE / "many_streams.py"), *extra, "--json", out.name],
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        result = json.loads(Path(out.name).read_text())
    clients = result["per_client"]
    result["first_byte_p50_s"] = statistics.median(c["first_byte_s"]["p50"] for c in clients)
    result["first_byte_p99_s"] = max(c["first_byte_s"]["p99"] for c in clients)
    return {k: result[k] for k in (*FIGURES, "load")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH (two)")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--json", type=Path)
    parser.add_argument("extra", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    trees = [tuple(t.split("=", 1)) for t in args.tree]
    extra = [a for a in args.extra if a != "--"]
    reps = []
    for rep in range(args.reps):
        order = trees if rep % 2 == 0 else trees[::-1]
        runs = {name: one_run(Path(path), extra) for name, path in order}
        (a, _), (b, _) = trees
        ratios = {f: runs[a][f] / runs[b][f] if runs[b][f] else None for f in FIGURES}
        reps.append({"order": [n for n, _ in order], "runs": runs, f"{a}/{b}": ratios})
        print(json.dumps(reps[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "reps": reps}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
