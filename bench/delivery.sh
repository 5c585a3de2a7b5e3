#!/usr/bin/env bash
# bench/delivery.sh BUILD_DIR — the delivery benchmark: how fast amp2dify
# empties its spool into Dify.
#
# Two phases, each with a fresh amp2dify (dify.workers 256, one chat app
# with max_in_flight 256 and no rate limit) and a fresh BUILD_DIR/fake-dify:
#
#   slow  the fake answers after 50 ms. With 256 requests in flight the
#         ideal is 256 / 0.05 s = 5,120 deliveries/s; the target is 90% of it.
#   fast  the fake answers at once: deliveries/s and amp2dify's CPU time
#         per delivery (user + system from /proc/PID/stat).
#
# A phase preloads N events (signed POSTs of arrays of 100 events, signed by
# `amp2dify sign`) while the fake Dify is stopped with SIGSTOP: the kernel
# still accepts amp2dify's connections, so the first 256 requests just wait
# and the rest stays in the spool. The clock starts at SIGCONT and stops at
# the last delivery's acknowledgement, read from the spool by
# BUILD_DIR/bench/spool_stat (built by `make bench`); without it, /metrics is
# polled every 50 ms. CPU time is amp2dify's own over the same span: the
# preload (ingest) is not in it.
#
# Loopback only; bounded in time (each wait has a limit; < 2 min in all);
# every process started here is stopped on any exit, the work directory is
# removed (BENCH_KEEP=1 keeps it). Prints a summary, then one JSON line.
#
# Knobs (environment): BENCH_DELIVERY_EVENTS (20000, a multiple of 100),
# BENCH_DELIVERY_DELAY_MS (50), BENCH_DELIVERY_INFLIGHT (256),
# BENCH_DELIVERY_TIMEOUT_S (max seconds to wait for one phase to drain, 40).
set -uo pipefail

BUILD=${1:-build}
N=${BENCH_DELIVERY_EVENTS:-20000}
DELAY_MS=${BENCH_DELIVERY_DELAY_MS:-50}
INFLIGHT=${BENCH_DELIVERY_INFLIGHT:-256}
DRAIN_S=${BENCH_DELIVERY_TIMEOUT_S:-40}
BATCH=100

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh" || exit 1
bench_init bench/delivery "${BENCH_KEEP:-0}" # also moves to the repository root

# The value of the delivered-events counter of app "bench" in /metrics
# (the fallback when BUILD_DIR/bench/spool_stat is not built).
delivered_count() {
    curl -s --max-time 2 "http://127.0.0.1:$1/metrics" | awk '/^amp2dify_deliveries_total\{/ &&
        /app="bench"/ && /outcome="delivered"/ { v = $NF } END { printf "%d\n", v + 0 }'
}

# ---- checks ---------------------------------------------------------------------

for b in amp2dify fake-dify; do
    [[ -x $BUILD/$b ]] || die "$BUILD/$b is missing; run 'make $BUILD/$b' (or make bench)"
done
command -v curl >/dev/null || die "curl (the command-line tool) is not installed"
[[ $N =~ ^[1-9][0-9]*$ ]] && ((N % BATCH == 0)) || die "BENCH_DELIVERY_EVENTS must be a multiple of $BATCH"
[[ $INFLIGHT =~ ^[1-9][0-9]*$ ]] && ((INFLIGHT <= 1024)) || die "BENCH_DELIVERY_INFLIGHT must be 1..1024"
[[ $DELAY_MS =~ ^[0-9]+$ && $DRAIN_S =~ ^[1-9][0-9]*$ ]] || die "bad BENCH_DELIVERY_* value"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/amp2dify-bench-delivery.XXXXXX") || die "cannot create a work directory"
CPUS=$(nproc 2>/dev/null || echo 0)
T_START=$(date +%s)
AMP2DIFY_SECRETS="bench-$(rand_hex 16)"
DIFY_API_KEY="app-bench-$(rand_hex 8)"
export AMP2DIFY_SECRETS DIFY_API_KEY

cat >"$WORK/amp2dify.json" <<EOF
{
  "listen": {"address": "127.0.0.1", "port": 8080, "threads": 2},
  "log": {"level": "warn"},
  "spool": {"path": "spool.db"},
  "dify": {"validate": "off", "base_url": "http://127.0.0.1:9/v1", "timeout_seconds": 60, "workers": $INFLIGHT,
           "retry": {"initial_ms": 1000, "max_ms": 30000}},
  "apps": {"bench": {"api_key_env": "DIFY_API_KEY", "endpoint": "chat",
                     "response_mode": "blocking", "rate_per_sec": 0,
                     "max_in_flight": $INFLIGHT}},
  "routes": [{"name": "all", "app": "bench",
              "query": "{{event_type}} by {{user_id}}", "user": "{{user_id}}"}]
}
EOF

# The bodies, each an array of $BATCH events with unique insert_ids, made once
# and signed per phase (signatures are only valid for 5 minutes).
mkdir -p "$WORK/bodies"
awk -v n="$N" -v batch="$BATCH" -v dir="$WORK/bodies" -v run="$$" 'BEGIN {
    for (b = 0; b < n / batch; b++) {
        f = sprintf("%s/%05d.json", dir, b)
        printf "[" > f
        for (i = 0; i < batch; i++) {
            e = b * batch + i
            printf "%s{\"event_type\":\"Bench_Event\",\"user_id\":\"user-%d\",\"insert_id\":\"%s-%d\",\"time\":%d000,\"event_properties\":{\"plan\":\"pro\",\"seq\":%d}}", (i ? "," : ""), e % 1000, run, e, 1700000000 + e, e > f
        }
        printf "]" > f
        close(f)
    }
}' || die "cannot write the event bodies"

# ---- one phase --------------------------------------------------------------------

# PHASE DELAY_MS: sets RESULT to "rate_per_s=.. elapsed_ms=.. cpu_ms=..
# delivered=.. fake_requests=.. peak_rss_kb=.. threads=.. preload_ms=.. warnings=.."
# (runs in this shell, not in $(...), so the EXIT trap sees what it started).
RESULT=""
run_phase() {
    local phase=$1 delay=$2 dir="$WORK/$1" fake_pid amp_pid amp_port
    mkdir -p "$dir"
    start_fake_dify "$dir" --key "$DIFY_API_KEY" --delay-ms "$delay"
    fake_pid=$FAKE_PID
    kill -STOP "$fake_pid"

    start_amp2dify "$dir/amp2dify.log" "$WORK/amp2dify.json" \
        DIFY_BASE_URL="http://127.0.0.1:$FAKE_PORT/v1" AMP2DIFY_LISTEN=127.0.0.1:0 \
        AMP2DIFY_SPOOL="$dir/spool.db" ||
        die "amp2dify did not become ready: $(tail -n 20 "$dir/amp2dify.log")"
    amp_pid=$AMP_START_PID
    amp_port=$AMP_START_PORT

    # Preload: sign each body and POST it, 4 at a time.
    local t0 t_preload
    t0=$(now_ms)
    export BUILD amp_port dir
    # shellcheck disable=SC2016 # expanded by the inner shell
    find "$WORK/bodies" -name '*.json' -print0 | sort -z |
        timeout 60 xargs -0 -n 1 -P 4 sh -c '
            f=$1
            h=$("$BUILD/amp2dify" sign --secret-env AMP2DIFY_SECRETS "$f") || exit 1
            ts=$(printf "%s\n" "$h" | sed -n "s/^X-Amplitude-Timestamp: //p")
            sig=$(printf "%s\n" "$h" | sed -n "s/^X-Amplitude-Sig: //p")
            curl -sS --max-time 20 -o "$dir/ingest-$(basename "$f")" \
                -H "Content-Type: application/json" \
                -H "X-Amplitude-Timestamp: $ts" -H "X-Amplitude-Sig: $sig" \
                --data-binary "@$f" "http://127.0.0.1:$amp_port/webhooks/amplitude"' _ \
            >"$dir/ingest.err" 2>&1
    t_preload=$(($(now_ms) - t0))
    local accepted
    accepted=$(cat "$dir"/ingest-*.json 2>/dev/null | grep -o '"accepted":[0-9]*' |
        awk -F: '{ s += $2 } END { print s + 0 }')
    ((accepted == N)) || die "$phase: amp2dify accepted $accepted of $N events: $(head -c 300 "$dir/ingest.err")"

    # Go: the fake answers from now on.
    local cpu0 start n=0 elapsed=0
    cpu0=$(cpu_ms "$amp_pid")
    start=$(now_ms)
    kill -CONT "$fake_pid"
    if [[ -x $BUILD/bench/spool_stat ]]; then
        # The spool knows when the last delivery was acknowledged.
        local line last
        line=$("$BUILD/bench/spool_stat" --db "$dir/spool.db" --wait-drain "$DRAIN_S")
        n=$(kv "$line" delivered)
        last=$(kv "$line" last_finished_ms)
        elapsed=$((${last:-0} - start))
    else
        local end=$((start + DRAIN_S * 1000)) now
        while :; do
            n=$(delivered_count "$amp_port")
            now=$(now_ms)
            elapsed=$((now - start))
            ((n >= N || now > end)) && break
            kill -0 "$amp_pid" 2>/dev/null || break
            sleep 0.05
        done
    fi
    n=${n:-0}
    local cpu rss threads
    cpu=$(($(cpu_ms "$amp_pid") - cpu0))
    rss=$(awk '/^VmHWM:/ { print $2 }' "/proc/$amp_pid/status" 2>/dev/null)
    threads=$(awk '/^Threads:/ { print $2 }' "/proc/$amp_pid/status" 2>/dev/null)
    ((n >= N)) || log "bench/delivery: $phase: only $n of $N delivered after $elapsed ms"
    stop_pid "$amp_pid" 20
    stop_pid "$fake_pid" 10
    local fake_requests
    fake_requests=$(sed -n 's/.*"requests":\([0-9]*\).*/\1/p' "$dir/fake.out")
    RESULT="rate_per_s=$(calc "%.1f" "$n * 1000 / ($elapsed > 0 ? $elapsed : 1)") elapsed_ms=$elapsed"
    RESULT+=" cpu_ms=$cpu delivered=$n fake_requests=${fake_requests:-0} peak_rss_kb=${rss:-0}"
    RESULT+=" threads=${threads:-0} preload_ms=$t_preload warnings=$(grep -c . "$dir/amp2dify.log")"
}

log "bench/delivery: $N events, $INFLIGHT in flight, fake Dify delay $DELAY_MS ms then 0 ms, $CPUS CPUs"
run_phase slow "$DELAY_MS"
SLOW=$RESULT
log "    slow: $SLOW"
run_phase fast 0
FAST=$RESULT
log "    fast: $FAST"

ideal=$(calc "%.1f" "$INFLIGHT * 1000 / ($DELAY_MS > 0 ? $DELAY_MS : 1)")
s_rate=$(kv "$SLOW" rate_per_s)
s_pct=$(calc "%.1f" "$s_rate * 100 / $ideal")
f_rate=$(kv "$FAST" rate_per_s)
f_cpu_us=$(calc "%.1f" "$(kv "$FAST" cpu_ms) * 1000 / $N")
s_cpu_us=$(calc "%.1f" "$(kv "$SLOW" cpu_ms) * 1000 / $N")
target_met=$(calc "%s" "($s_rate >= 0.9 * $ideal) ? \"true\" : \"false\"")
problems=()
for p in SLOW FAST; do
    line=${!p}
    (($(kv "$line" delivered) < N)) && problems+=("${p,,}: only $(kv "$line" delivered) of $N delivered")
    (($(kv "$line" warnings) > 0)) && problems+=("${p,,}: amp2dify logged $(kv "$line" warnings) warning/error lines")
done
[[ $target_met == true ]] || problems+=("slow: $s_rate/s is below 90% of the ideal $ideal/s")

cat <<EOF

==== amp2dify delivery benchmark ($(date -u +%Y-%m-%dT%H:%M:%SZ)) ====
setup       $N events preloaded, dify.workers $INFLIGHT, app max_in_flight $INFLIGHT, no rate limit; $CPUS CPUs
${DELAY_MS} ms fake   $(printf '%8.1f' "$s_rate") deliveries/s = $s_pct% of the ideal $ideal/s (target 90%)
            $s_cpu_us us CPU per delivery, peak RSS $(calc "%.1f" "$(kv "$SLOW" peak_rss_kb) / 1024") MiB, $(kv "$SLOW" threads) threads
0 ms fake   $(printf '%8.1f' "$f_rate") deliveries/s, $f_cpu_us us CPU per delivery (amp2dify user+system)
            peak RSS $(calc "%.1f" "$(kv "$FAST" peak_rss_kb) / 1024") MiB
EOF
if ((${#problems[@]})); then
    echo "problems:"
    printf '  - %s\n' "${problems[@]}"
fi
echo "run time    $(($(date +%s) - T_START)) s"
echo
problems_json=$(json_strings "${problems[@]}")
echo "{\"bench\":\"delivery\",\"events\":$N,\"in_flight\":$INFLIGHT,\"cpus\":$CPUS,\
\"slow\":{\"delay_ms\":$DELAY_MS,\"deliveries_per_s\":$s_rate,\"ideal_per_s\":$ideal,\"percent_of_ideal\":$s_pct,\"target_met\":$target_met,\
\"elapsed_ms\":$(kv "$SLOW" elapsed_ms),\"cpu_us_per_delivery\":$s_cpu_us,\"peak_rss_kb\":$(kv "$SLOW" peak_rss_kb),\"fake_requests\":$(kv "$SLOW" fake_requests)},\
\"fast\":{\"delay_ms\":0,\"deliveries_per_s\":$f_rate,\"cpu_us_per_delivery\":$f_cpu_us,\
\"elapsed_ms\":$(kv "$FAST" elapsed_ms),\"peak_rss_kb\":$(kv "$FAST" peak_rss_kb),\"fake_requests\":$(kv "$FAST" fake_requests)},\
\"problems\":[$problems_json]}"
[[ $target_met == true ]] && ((${#problems[@]} == 0))
