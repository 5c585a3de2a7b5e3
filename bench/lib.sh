# bench/lib.sh — plumbing shared by the benchmark scripts (bench/run.sh,
# bench/delivery.sh, bench/backlog.sh); sourced, never run.
#
#   bench_init TAG KEEP   cd to the repository root; messages prefixed "TAG: ";
#                         an EXIT trap stops every pid in STARTED and removes
#                         WORK (kept when KEEP is 1)
#   log, die              stderr; die exits 1
#   stop_pid PID LIMIT_S  SIGTERM, then SIGKILL; sets STOP_STATUS and STOP_MS
#   start_fake_dify DIR ARGS...  BUILD/fake-dify --port 0 ARGS; sets FAKE_PID, FAKE_PORT
#   start_amp2dify LOG CONFIG [NAME=VALUE...]  BUILD/amp2dify serve, waits for
#                         /readyz; sets AMP_START_PID, AMP_START_PORT
#   wait_listening, listen_port_of, http_get_ok   finding and probing ports
#   ingest_latency PORT   amp2dify's own p99 and share within 5 ms (/metrics)
#   cpu_ms, now_ms, calc, kv, json_str, json_strings, rand_hex   figures
#
# Sets HERE (the bench directory). Uses BUILD (the build directory, relative
# to the repository root) and, after bench_init, STARTED and WORK.
# Everything listens on 127.0.0.1 only, and every wait here is bounded.
# shellcheck shell=bash disable=SC2034 # the globals set here are read by the scripts

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_TAG=bench
STARTED=() # pids of the processes the script started
WORK=""
BENCH_KEEP_WORK=0

log() { printf '%s\n' "$*" >&2; }
die() {
    log "$BENCH_TAG: $*"
    exit 1
}

bench_init() { # TAG KEEP
    BENCH_TAG=$1
    BENCH_KEEP_WORK=$2
    cd "$(dirname "$HERE")" || exit 1
    trap bench_cleanup EXIT
    trap 'log "$BENCH_TAG: interrupted"; exit 130' INT TERM
}

now_ms() { date +%s%3N; }

# PID LIMIT_S: SIGTERM (and SIGCONT, in case it is stopped), wait up to
# LIMIT_S, then SIGKILL. Sets STOP_STATUS to the exit status and STOP_MS to
# the time it took (not echoed: wait only works in this shell, not in $(...)).
STOP_STATUS=0
STOP_MS=0
stop_pid() {
    local pid=$1 limit=$(($2 * 20)) i=0 t0
    t0=$(now_ms)
    kill -TERM "$pid" 2>/dev/null
    kill -CONT "$pid" 2>/dev/null
    while kill -0 "$pid" 2>/dev/null && ((i < limit)); do
        sleep 0.05
        i=$((i + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$BENCH_TAG: pid $pid ignored SIGTERM for $2 s; killing it"
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    STOP_STATUS=$?
    STOP_MS=$(($(now_ms) - t0))
}

# shellcheck disable=SC2317 # invoked by the EXIT trap
bench_cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do
        kill -0 "$pid" 2>/dev/null && stop_pid "$pid" 5
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $BENCH_KEEP_WORK == 1 ]]; then
            log "$BENCH_TAG: kept $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
}

# Wait (at most 10 s) for "listening <port>" on the first line of FILE while
# PID runs; echoes the port.
wait_listening() {
    local pid=$1 file=$2 i port
    for ((i = 0; i < 200; i++)); do
        port=$(sed -n 's/^listening \([0-9][0-9]*\)$/\1/p' "$file" 2>/dev/null | head -n 1)
        [[ -n $port ]] && {
            echo "$port"
            return 0
        }
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# The port of PID's listening TCP socket, found through /proc (amp2dify binds
# port 0 and, at log level warn, does not print the port it got).
listen_port_of() {
    local pid=$1 fd link inodes=" " hex
    for fd in /proc/"$pid"/fd/*; do
        link=$(readlink "$fd" 2>/dev/null) || continue
        [[ $link == socket:\[*\] ]] && inodes+="${link:8:${#link}-9} "
    done
    [[ $inodes == " " ]] && return 1
    hex=$(awk -v want="$inodes" '$4 == "0A" && index(want, " " $10 " ") {
              n = split($2, a, ":"); print a[n]; exit }' /proc/net/tcp /proc/net/tcp6 2>/dev/null)
    [[ -n $hex ]] || return 1
    echo $((16#$hex))
}

# One GET over bash's /dev/tcp; succeeds on a 200 answer.
http_get_ok() {
    local port=$1 path=$2 status=""
    { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 1
    printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$path" >&3
    IFS= read -r -t 2 status <&3
    exec 3<&- 3>&-
    [[ $status == "HTTP/1."?" 200"* ]]
}

# DIR ARGS...: starts BUILD/fake-dify --port 0 ARGS (stdout DIR/fake.out,
# stderr DIR/fake.err) and waits until it listens; sets FAKE_PID and
# FAKE_PORT, dies when it does not start. Runs in this shell, not in $(...),
# so that the EXIT trap sees what it started.
FAKE_PID=""
FAKE_PORT=""
start_fake_dify() {
    local dir=$1
    shift
    "$BUILD/fake-dify" --port 0 "$@" >"$dir/fake.out" 2>"$dir/fake.err" &
    FAKE_PID=$!
    STARTED+=("$FAKE_PID")
    FAKE_PORT=$(wait_listening "$FAKE_PID" "$dir/fake.out") ||
        die "fake-dify did not start: $(cat "$dir/fake.err")"
}

# LOG CONFIG [NAME=VALUE...]: starts BUILD/amp2dify serve -c CONFIG with those
# variables added to its environment (stderr to LOG), and waits at most 10 s
# for /readyz to answer 200 on the port it bound. Sets AMP_START_PID and
# AMP_START_PORT (empty, with status 1, when it did not become ready). Runs
# in this shell, not in $(...), so that the EXIT trap sees what it started.
AMP_START_PID=""
AMP_START_PORT=""
start_amp2dify() {
    local logfile=$1 config=$2 i
    shift 2
    env "$@" "$BUILD/amp2dify" serve -c "$config" 2>"$logfile" &
    AMP_START_PID=$!
    STARTED+=("$AMP_START_PID")
    AMP_START_PORT=""
    for ((i = 0; i < 200; i++)); do
        kill -0 "$AMP_START_PID" 2>/dev/null || break
        AMP_START_PORT=$(listen_port_of "$AMP_START_PID") &&
            http_get_ok "$AMP_START_PORT" /readyz && return 0
        AMP_START_PORT=""
        sleep 0.05
    done
    return 1
}

# PORT: the webhook requests' latency as the amp2dify on PORT measured it
# (amp2dify_ingest_duration_seconds, from the headers to the answer):
# echoes "P99_MS SHARE_5MS", the 99th percentile interpolated within its
# buckets as Prometheus's histogram_quantile does (0.5, 1, 2.5, 5, 10 ms,
# ...), and the share answered within 5 ms (a bucket's bound, so exact);
# "0 0" without requests or an answer.
ingest_latency() {
    curl -s --max-time 5 "http://127.0.0.1:$1/metrics" | awk '
        /^amp2dify_ingest_duration_seconds_bucket\{le="[0-9.e+-]+"\} / {
            le = $1; sub(/.*le="/, "", le); sub(/".*/, "", le)
            n++; bound[n] = le + 0; cum[n] = $2 + 0
        }
        /^amp2dify_ingest_duration_seconds_count / { count = $2 + 0 }
        END {
            if (count == 0) { print "0 0"; exit }
            rank = 0.99 * count; p99 = bound[n]; lo = 0; below = 0
            for (i = 1; i <= n; i++) {
                if (cum[i] >= rank) {
                    p99 = lo + (bound[i] - lo) * (rank - below) / (cum[i] - below); break
                }
                lo = bound[i]; below = cum[i]
            }
            for (i = 1; i <= n; i++) if (bound[i] == 0.005) within = cum[i]
            printf "%.2f %.3f\n", p99 * 1000, within / count
        }'
}

CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
# CPU time (user + system, ms) of PID: the whole process, or with a thread
# name prefix only its live threads whose name starts with it (libmicrohttpd
# names its threads "MHD-..."). 0 when PID is gone.
cpu_ms() {
    local pid=$1 prefix=${2:-} file stat comm ticks=0 f
    local files=("/proc/$pid/stat")
    [[ -n $prefix ]] && files=(/proc/"$pid"/task/*/stat)
    for file in "${files[@]}"; do
        stat=$(cat "$file" 2>/dev/null) || continue
        comm=${stat#*\(}
        comm=${comm%\)*}
        [[ -n $prefix && $comm != "$prefix"* ]] && continue
        read -r -a f <<<"${stat##*) }" # f[0] is field 3 (state): utime is f[11], stime f[12]
        ticks=$((ticks + f[11] + f[12]))
    done
    echo $((ticks * 1000 / CLK_TCK))
}

calc() { awk "BEGIN { printf \"$1\", $2 }"; } # FORMAT EXPRESSION

kv() { # LINE KEY: the value of KEY=VALUE in a KEY=VALUE line (values have no spaces)
    sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" $1"
}

json_str() { # escape for a JSON string: backslash, quote, control characters
    printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr -d '\000-\037'
}

json_strings() { # STRING...: the inside of a JSON array of them ("a","b")
    local s out=""
    for s in "$@"; do
        out+="${out:+,}\"$(json_str "$s")\""
    done
    printf '%s' "$out"
}

rand_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; } # BYTES: 2*BYTES hex digits
