#!/bin/bash
# lb's CPU per request when every request comes on a new connection (hey -disable-keepalive):
# two trees' `lb serve` side by side in front of one mock, runs alternating (order flipped each
# rep), CPU from /proc per run; prints each rep's CPU ms, 200s and the ratio A/B per request.
#
#   bench/accept_cpu_ab.sh /tmp/streams-new /tmp/streams-main    # N=4000 REPS=8 by default
set -u
A=$1 B=$2 N=${N:-4000} REPS=${REPS:-8}
L=${LB:-/work/main/.venv/bin/lb}
$L mock --host 127.0.0.1 --port 18911 --model m --tokens 8 >/dev/null 2>&1 & MOCK=$!
PYTHONPATH=$A $L serve --host 127.0.0.1 --port 18912 --node 127.0.0.1:18911 --log-level warning >/dev/null 2>&1 & LA=$!
PYTHONPATH=$B $L serve --host 127.0.0.1 --port 18913 --node 127.0.0.1:18911 --log-level warning >/dev/null 2>&1 & LB_=$!
trap 'kill $LA $LB_ $MOCK' EXIT
sleep 5
tck=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
BODY='{"model":"m","messages":[{"role":"user","content":"hi"}]}'
run() { # pid port -> "cpu_ms ok"
  local b a ok
  b=$(cpu $1)
  ok=$(hey -n $N -c 32 -disable-keepalive -m POST -T application/json -d "$BODY" \
       http://127.0.0.1:$2/v1/chat/completions | awk '/\[200\]/ {print $2}')
  a=$(cpu $1)
  echo "$(( (a - b) * 1000 / tck )) ${ok:-0}"
}
run $LA 18912 >/dev/null; run $LB_ 18913 >/dev/null  # warm up
for rep in $(seq $REPS); do
  if (( rep % 2 )); then x=$(run $LA 18912); y=$(run $LB_ 18913)
  else y=$(run $LB_ 18913); x=$(run $LA 18912); fi
  echo "rep $rep A $x B $y load $(cut -d' ' -f1 /proc/loadavg)" |
    awk '{printf "%s A/B %.3f\n", $0, ($4/$5)/($7/$8)}'
done
