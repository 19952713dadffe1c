#!/usr/bin/env bash
# Requests/s of the mock node alone (no lb in front): the ceiling any lb benchmark that uses it
# can reach. Starts `lb mock` (or the module directly if the CLI is missing) on a free port, runs
# `hey` ROUNDS times against non-stream chat completions and prints each rps and the median.
#
#   bench/mock_alone.sh [ROUNDS=3] [CONCURRENCY=64] [REQUESTS=20000]
#
# Extra mock options can be passed in MOCK_ARGS, e.g. MOCK_ARGS="--tokens 64".
set -euo pipefail

rounds=${1:-3}
concurrency=${2:-64}
requests=${3:-20000}
cd "$(dirname "$0")/.."

command -v hey >/dev/null || { echo "hey is not installed (apt-get install hey)" >&2; exit 1; }

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
if command -v lb >/dev/null && lb mock --help >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    lb mock --port "$port" --model mock-model ${MOCK_ARGS:-} >"$log" 2>&1 &
else
    python -c "
import functools, trio
from lb.testing import MockNode
trio.run(functools.partial(MockNode().serve, '127.0.0.1', $port))
" >"$log" 2>&1 &
fi
mock_pid=$!
trap 'kill "$mock_pid" 2>/dev/null || true; rm -f "$log"' EXIT

url="http://127.0.0.1:$port/v1/chat/completions"
body='{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}'
for _ in $(seq 100); do
    curl -fsS -o /dev/null -H 'content-type: application/json' -d "$body" "$url" 2>/dev/null && break
    sleep 0.1
done

rates=()
for round in $(seq "$rounds"); do
    rps=$(hey -c "$concurrency" -n "$requests" -m POST -T application/json -d "$body" "$url" \
        | awk '/Requests\/sec/ {print $2}')
    echo "round $round: $rps requests/s"
    rates+=("$rps")
done
printf '%s\n' "${rates[@]}" | sort -g | awk '{a[NR] = $1} END {print "median: " a[int((NR + 1) / 2)] " requests/s"}'
