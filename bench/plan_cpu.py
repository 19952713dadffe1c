"""CPU per `Dispatcher.plan` call (the routing decision alone, no I/O), A/B over source trees.

Each tree is measured in its own subprocess (``PYTHONPATH=TREE``): a registry of N healthy
nodes serving one model, default settings (so the default strategy), a chat request; the
median over ``--reps`` runs of ``--calls`` calls, in microseconds per call, for each N. The
trees run interleaved, rep by rep, so the machine's drift hits them alike.

    python bench/plan_cpu.py --tree before=/tmp/lb-base --tree after=.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# Run inside the tree's interpreter context: prints {nodes: us per call}.
PROBE = r"""
import json, sys, time
import trio
from lb.cluster.node import Node
from lb.cluster.registry import Registry
from lb.config import NodeConfig, Settings
from lb.routing.dispatch import Dispatcher
from lb.routing.intent import RouteRequest

calls, sizes = int(sys.argv[1]), [int(n) for n in sys.argv[2].split(",")]
out = {}

async def main():
    for size in sizes:
        nodes = []
        for i in range(size):
            node = Node.create(NodeConfig(f"http://10.0.0.{i + 1}:8000"), capacity=0,
                               breaker_threshold=3, breaker_ttl=30)
            node.healthy, node.models = True, ("m",)
            nodes.append(node)
        registry = Registry(nodes)
        for node in nodes:
            registry.update(node, models=("m",), healthy=True)
        dispatcher = Dispatcher(registry, Settings())
        body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
        intent = RouteRequest(model="m", kind="chat", stream=False, body=body,
                              raw=json.dumps(body).encode(), request_id="r",
                              arrival=trio.current_time())
        plan = dispatcher.plan
        for _ in range(2000):
            plan(intent)
        started = time.process_time()
        for _ in range(calls):
            plan(intent)
        out[size] = (time.process_time() - started) / calls * 1e6

trio.run(main)
print(json.dumps(out))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--nodes", default="1,4,16")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    trees = [t.split("=", 1) for t in args.tree]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    for rep in range(args.reps):
        for name, path in trees:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(path)}
            done = subprocess.run(
                [sys.executable, "-c", PROBE, str(args.calls), args.nodes],
                env=env, capture_output=True, text=True, check=True,
            )
            runs[name].append(json.loads(done.stdout))
            print(f"rep {rep} {name}: {done.stdout.strip()}", file=sys.stderr)
    sizes = args.nodes.split(",")
    medians = {name: {n: statistics.median(r[n] for r in rs) for n in sizes}
               for name, rs in runs.items()}
    print("| tree | " + " | ".join(f"{n} node(s), us/plan" for n in sizes) + " |")
    print("| --- | " + " | ".join("---:" for _ in sizes) + " |")
    for name, med in medians.items():
        spread = {n: (min(r[n] for r in runs[name]), max(r[n] for r in runs[name]))
                  for n in sizes}
        cells = [f"{med[n]:.2f} [{spread[n][0]:.2f}, {spread[n][1]:.2f}]" for n in sizes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "runs": runs, "medians": medians}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
