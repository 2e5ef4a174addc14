#!/usr/bin/env bash
# compare.sh - diagsvc against the peers on the same load, in the same run,
# peer and diagsvc alternating run by run (README: Performance).
#
#   bash .bench/compare.sh [REPS] [SECS]        (default 3 runs of 5 s a test)
#
# Uses ../shared/bench (loadgen, peers.sh, run_all.sh, benchtool.py): every
# server is pinned to core 1 and binds loopback only, loadgen runs on core 0,
# every run is bounded by loadgen's own limits.  Needs the peers installed
# (shared/bench/README.md: apt-get install -y xinetd iperf3 ...).  Stops only
# what it started, by the PIDs peers.sh recorded.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH=${BENCH:-$(cd "$HERE/../../shared/bench" && pwd)}
REPS=${1:-3}
SECS=${2:-5}
OUT=/tmp/bench/compare-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
DIAGSVC_BASE=40000
# diagsvc with its defaults, except the per-source limit that a load from one
# host must lift (hold and ramp open thousands of connections from 127.0.0.1).
DIAGSVC_ARGS="--port-offset $DIAGSVC_BASE --bind 127.0.0.1 --bind ::1 --max-per-source 0 -q"

make -s -C "$BENCH" loadgen || exit 2
start() { "$BENCH/peers.sh" start "$@" > /dev/null; }
start xinetd-tuned 30000 1
start openbsd-inetd-tuned 31000 1
start iperf3 32000 1
start asyncio 33000 1
start cmd "$DIAGSVC_BASE" 1 -- python3 "$HERE/../diagsvc.py" $DIAGSVC_ARGS
DIAGSVC_PID=$("$BENCH/peers.sh" pids cmd "$DIAGSVC_BASE")
stop_all() {
    for peer in xinetd-tuned:30000 openbsd-inetd-tuned:31000 iperf3:32000 \
                asyncio:33000 cmd:$DIAGSVC_BASE; do
        "$BENCH/peers.sh" stop "${peer%:*}" "${peer#*:}" > /dev/null 2>&1
    done
}
trap stop_all EXIT

one() {   # NAME BASE TEST [run_all options...]; $LABEL names a variant
    local name=$1 base=$2 test=$3; shift 3
    local pids=()
    [ "$name" = diagsvc ] && pids=(-P "$DIAGSVC_PID")
    "$BENCH/run_all.sh" -n "$name${LABEL:-}" -b "$base" "${pids[@]}" -r 1 \
        -t "$SECS" -m "$test" -o "$OUT/$name${LABEL:-}.raw" "$@" > /dev/null 2>&1
}

# test  peer  peer-base  [options for both]
PAIRS="chargen-recv:asyncio:33000
discard-send:openbsd-inetd-tuned:31000
echo-tput:openbsd-inetd-tuned:31000
echo-lat:openbsd-inetd-tuned:31000
udp-echo-w16:openbsd-inetd-tuned:31000:-U ::1
udp-echo-w1:openbsd-inetd-tuned:31000:-U ::1
daytime-c16:xinetd-tuned:30000
time-c16:xinetd-tuned:30000
qotd-c16:asyncio:33000"

for rep in $(seq "$REPS"); do
    echo "compare.sh: pass $rep of $REPS" >&2
    while IFS=: read -r test peer base extra; do
        # shellcheck disable=SC2086
        one "$peer" "$base" "$test" $extra
        # shellcheck disable=SC2086
        one diagsvc "$DIAGSVC_BASE" "$test" $extra
    done <<< "$PAIRS"
    one iperf3 32000 iperf3-recv
    one diagsvc "$DIAGSVC_BASE" chargen-recv
    # UDP echo over 127.0.0.1 as well, which openbsd-inetd ignores: its
    # rows are "-v4" (xinetd-tuned answers it, drain-bound: README).
    LABEL=-v4 one xinetd-tuned 30000 udp-echo-w16
    LABEL=-v4 one diagsvc "$DIAGSVC_BASE" udp-echo-w16
done

# Many connections, on a freshly started diagsvc: a burst of 5,000, then a
# ramp to 10,000 with the server's memory sampled while they are held.
"$BENCH/peers.sh" stop cmd "$DIAGSVC_BASE" > /dev/null
start cmd "$DIAGSVC_BASE" 1 -- python3 "$HERE/../diagsvc.py" $DIAGSVC_ARGS
DIAGSVC_PID=$("$BENCH/peers.sh" pids cmd "$DIAGSVC_BASE")
one diagsvc "$DIAGSVC_BASE" hold-5000
"$BENCH/peers.sh" stop cmd "$DIAGSVC_BASE" > /dev/null
start cmd "$DIAGSVC_BASE" 1 -- python3 "$HERE/../diagsvc.py" $DIAGSVC_ARGS
DIAGSVC_PID=$("$BENCH/peers.sh" pids cmd "$DIAGSVC_BASE")
one diagsvc "$DIAGSVC_BASE" ramp-10000

python3 "$BENCH/benchtool.py" matrix "$OUT"/*.raw | tee "$OUT/matrix.md"
echo "compare.sh: raw results and matrix in $OUT" >&2
