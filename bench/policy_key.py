"""Put one virtual key into an lb data folder's SQLite store, for benchmarking keys on.

    python bench/policy_key.py /tmp/lb-bench-data sk-bench-key [--rpm N --tpm N]

prints nothing; the key is then usable by an lb started with LB_DATA_DIR=/tmp/lb-bench-data
and any LB_MASTER_KEY (see bench/results/policy-cost-2026-11-29.md).
"""

from __future__ import annotations

import argparse
import time

from lb.policy import keys
from lb.policy.store import SqliteStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("key")
    parser.add_argument("--rpm", type=int, default=None)
    parser.add_argument("--tpm", type=int, default=None)
    args = parser.parse_args()
    store = SqliteStore(args.data_dir)
    fields = {"rpm_limit": args.rpm, "tpm_limit": args.tpm}
    record = keys.make({k: v for k, v in fields.items() if v is not None}, args.key, time.time())
    store._put(record)
    store.close()


if __name__ == "__main__":
    main()
