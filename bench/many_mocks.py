"""Many mock nodes in one process: `--count` `MockNode`s in one trio nursery, each on its own
free port of 127.0.0.1. Once all listen, the ports are printed on one line (JSON list) and,
with --ports-file, written to that file (atomically); then it serves until killed.

    python bench/many_mocks.py --count 100 --ports-file /tmp/ports.json

Used by fleet_bench.py to give one lb 100 registered nodes for its idle-CPU figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import trio

from lb.testing import MockNode

HOST = "127.0.0.1"


async def serve_many(count: int, model: str, ports_file: Path | None) -> None:
    async with trio.open_nursery() as nursery:
        ports = []
        for i in range(count):
            node = MockNode(models=(model,), name=f"mock-{i}")
            ports.append(await nursery.start(node.serve, HOST, 0))
        text = json.dumps(ports)
        if ports_file is not None:
            tmp = ports_file.with_name(ports_file.name + ".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, ports_file)
        print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=100, help="how many mock nodes (1..1000)")
    parser.add_argument("--model", default="bench-model", help="the model every node serves")
    parser.add_argument("--ports-file", type=Path, default=None, help="write the ports here")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 1000:
        parser.error("--count must be between 1 and 1000")
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve_many, args.count, args.model, args.ports_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
