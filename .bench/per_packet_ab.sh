#!/usr/bin/env bash
# per_packet_ab.sh - the per-packet tests against several versions of
# diagsvc and the peers, alternating run by run (README: Performance, "Each
# change, measured alone").
#
#   bash .bench/per_packet_ab.sh REPS SECS REV[:EXTRA-ARGS] ...
#   bash .bench/per_packet_ab.sh 3 3 c3efdbc 7311618:--busy-poll=500 HEAD
#
# Each REV's diagsvc.py (git show REV:diagsvc.py) runs under
# ../shared/bench/peers.sh on core 1, on port base 50000, 51000, ...,
# with the compare.sh arguments and EXTRA-ARGS (commas for spaces);
# openbsd-inetd-tuned and xinetd-tuned run beside them.  loadgen runs on
# core 0.  Prints one line a run: test, run, name, rate, and the server's
# CPU (utime+stime from /proc/PID/stat) per operation.  Loopback only,
# bounded by loadgen's limits; stops only what it started, by PID.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH=${BENCH:-$(cd "$HERE/../../shared/bench" && pwd)}
REPS=$1; SECS=$2; shift 2
WORK=$(mktemp -d /tmp/per-packet-ab.XXXXXX)
make -s -C "$BENCH" loadgen || exit 2
LOADGEN=$BENCH/loadgen
TICK=$(getconf CLK_TCK)
ARGS="--bind 127.0.0.1 --bind ::1 --max-per-source 0 -q"

start() { "$BENCH/peers.sh" start "$@" > /dev/null; }
pid_of() { "$BENCH/peers.sh" pids "$@" | tr -d ' '; }
started=("openbsd-inetd-tuned 31000" "xinetd-tuned 30000")
stop_all() {
    for peer in "${started[@]}"; do
        # shellcheck disable=SC2086
        "$BENCH/peers.sh" stop $peer > /dev/null 2>&1
    done
}
trap stop_all EXIT
start openbsd-inetd-tuned 31000 1
start xinetd-tuned 30000 1
names=(); bases=()
base=50000
for spec in "$@"; do
    rev=${spec%%:*}; extra=""
    [ "$spec" != "$rev" ] && extra=${spec#*:}
    git -C "$HERE/.." show "$rev:diagsvc.py" > "$WORK/$rev.py" || exit 2
    # shellcheck disable=SC2086
    start cmd "$base" 1 -- python3 "$WORK/$rev.py" --port-offset "$base" \
        $ARGS ${extra//,/ }
    started+=("cmd $base")
    names+=("$rev"); bases+=("$base")
    base=$((base + 1000))
done

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
one() {   # TEST RUN NAME PID HOST PORT-BASE
    local test=$1 run=$2 name=$3 pid=$4 host=$5 b=$6 args before after out
    case $test in
        echo-lat)     args="tcp-echo-latency -p $((b + 7)) -s 64" ;;
        udp-echo-w1)  args="udp-echo-rate -p $((b + 7)) -w 1" ;;
        udp-echo-w16) args="udp-echo-rate -p $((b + 7)) -w 16" ;;
        daytime-c16)  args="tcp-connect-rate -p $((b + 13)) -c 16" ;;
        time-c16)     args="tcp-connect-rate -p $((b + 37)) -c 16 -m 4" ;;
    esac
    before=$(cpu "$pid")
    # shellcheck disable=SC2086
    out=$(taskset -c 0 "$LOADGEN" $args -H "$host" -t "$SECS" 2>/dev/null)
    after=$(cpu "$pid")
    rate=$(echo "$out" | grep -o '\(replies_per_s\|rtt_per_s\|conn_per_s\)=[0-9]*')
    count=$(echo "$out" | grep -o ' \(replies\|ok\|rtts\)=[0-9]*' | head -1 | cut -d= -f2)
    echo "$test@$host $run $name ${rate:-rate=0} cpu_us_per_op=$(awk -v c=$((after - before)) \
        -v t="$TICK" -v n="${count:-0}" 'BEGIN { printf "%.1f", n ? c / t * 1e6 / n : 0 }')"
}

# test:host:peer  (openbsd-inetd answers UDP on ::1 only; its TCP on 127.0.0.1)
for spec in echo-lat:127.0.0.1:openbsd-inetd-tuned:31000 \
            udp-echo-w1:::1:openbsd-inetd-tuned:31000 \
            udp-echo-w16:::1:openbsd-inetd-tuned:31000 \
            udp-echo-w16:127.0.0.1:xinetd-tuned:30000 \
            daytime-c16:127.0.0.1:xinetd-tuned:30000 \
            time-c16:127.0.0.1:xinetd-tuned:30000; do
    test=${spec%%:*}; rest=${spec#*:}
    peer_base=${rest##*:}; rest=${rest%:*}; peer=${rest##*:}; host=${rest%:*}
    for run in $(seq "$REPS"); do
        one "$test" "$run" "$peer" "$(pid_of "$peer" "$peer_base")" \
            "$host" "$peer_base"
        for i in "${!names[@]}"; do
            one "$test" "$run" "${names[$i]}" \
                "$(pid_of cmd "${bases[$i]}")" "$host" "${bases[$i]}"
        done
    done
done
