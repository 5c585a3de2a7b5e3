#!/usr/bin/env bash
# bench/redis.sh BUILD_DIR — the Redis engine against the SQLite spool, in
# the same run on the same machine (part of `make bench`).
#
# Ingest: the same signed corpus (bench/sign_corpus, unique ~600-byte
# events) under wrk (bench/ingest.lua) against
#   sqlite   one amp2dify on the embedded spool (spool.sync full),
#   redis    one amp2dify on a redis-server of its own (appendonly yes,
#            appendfsync always, noeviction),
#   redis3   three amp2dify replicas on that Redis, one wrk each (the
#            connections split in three), their rates added, p99 the worst.
# Each delivers to build/fake-dify (0 ms) while it ingests, as in service.
# Ratios are against the sqlite run.
#
# Delivery: 20,000 events preloaded while the fake Dify is stopped
# (SIGSTOP), then dify.workers 256 and max_in_flight 256 against a fake
# answering after 50 ms (ideal 5,120/s): deliveries/s from SIGCONT until
# amp2dify's delivered counter (/metrics) reaches the count, on sqlite and
# on redis, and the ratio.
#
# Loopback only, every step bounded in time; what it starts is stopped on
# any exit (redis-server by its pid). Knobs: BENCH_DURATION (s per wrk
# run, 10), BENCH_CONNECTIONS (48), BENCH_REQUESTS (300000),
# BENCH_DELIVERY_EVENTS (20000), BENCH_REDIS_PARTS ("ingest delivery"),
# BENCH_KEEP=1.
set -uo pipefail

BUILD=${1:-build}
DURATION=${BENCH_DURATION:-10}
CONNS=${BENCH_CONNECTIONS:-48}
NREQ=${BENCH_REQUESTS:-300000}
NDEL=${BENCH_DELIVERY_EVENTS:-20000}
PARTS=${BENCH_REDIS_PARTS:-ingest delivery}
INFLIGHT=256
DELAY_MS=50
BATCH=100

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh" || exit 1
bench_init bench/redis "${BENCH_KEEP:-0}"

for b in amp2dify fake-dify bench/sign_corpus; do
    [[ -x $BUILD/$b ]] || die "$BUILD/$b is missing; run 'make bench'"
done
for c in wrk redis-server redis-cli curl; do
    command -v $c >/dev/null || die "$c is not installed"
done
((NDEL % BATCH == 0)) || die "BENCH_DELIVERY_EVENTS must be a multiple of $BATCH"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/amp2dify-bench-redis.XXXXXX") || die "cannot create a work directory"
CPUS=$(nproc 2>/dev/null || echo 0)
T_START=$(date +%s)
AMP2DIFY_SECRETS="bench-$(rand_hex 16)"
DIFY_API_KEY="app-bench-$(rand_hex 8)"
export AMP2DIFY_SECRETS DIFY_API_KEY

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# ---- redis-server -------------------------------------------------------------
REDIS_PORT=$(free_port)
mkdir -p "$WORK/redis"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" --appendonly yes \
    --appendfsync always --maxmemory-policy noeviction --save '' --daemonize no \
    >"$WORK/redis/redis.log" 2>&1 &
REDIS_PID=$!
STARTED+=("$REDIS_PID")
for ((i = 0; i < 100; i++)); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.05
done
redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 || die "redis-server did not start"
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }

config() { # ENGINE WORKERS INFLIGHT
    local queue='"engine": "sqlite"'
    [[ $1 == redis ]] && queue="\"engine\": \"redis\", \"url\": \"redis://127.0.0.1:$REDIS_PORT\", \"shards\": 64"
    cat <<EOF
{
  "listen": {"address": "127.0.0.1", "port": 8080, "threads": 2},
  "log": {"level": "warn"},
  "queue": {$queue},
  "spool": {"path": "spool.db"},
  "dify": {"validate": "off", "base_url": "http://127.0.0.1:9/v1", "timeout_seconds": 60, "workers": $2,
           "retry": {"initial_ms": 1000, "max_ms": 30000}},
  "apps": {"bench": {"api_key_env": "DIFY_API_KEY", "endpoint": "chat",
                     "response_mode": "blocking", "rate_per_sec": 0, "max_in_flight": $3}},
  "routes": [{"name": "all", "app": "bench",
              "query": "{{event_type}} by {{user_id}}", "user": "{{user_id}}"}]
}
EOF
}

# ---- ingest -------------------------------------------------------------------
CORPUS=$WORK/corpus.tsv
"$BUILD/bench/sign_corpus" --secret-env AMP2DIFY_SECRETS --count "$NREQ" --size 600 \
    --out "$CORPUS" >/dev/null || die "sign_corpus failed"
split -n l/3 -d "$CORPUS" "$WORK/part." || die "cannot split the corpus"

# LABEL PORT CORPUS CONNS OUT: runs wrk (1 thread per 16 connections, at least 1).
wrk_run() {
    local t=$(($4 / 16))
    ((t < 1)) && t=1
    BENCH_LABEL=$1 timeout $((DURATION + 60)) wrk -t "$t" -c "$4" -d "${DURATION}s" --timeout 10s \
        -s "$HERE/ingest.lua" "http://127.0.0.1:$2/webhooks/amplitude" -- "$3" "$t" >"$5" 2>&1
    grep '^BENCH ' "$5" | tail -n 1
}

# ENGINE REPLICAS: starts them (config with 16 workers) and a fake Dify;
# sets PORTS and PIDS.
PORTS=()
PIDS=()
start_set() {
    local engine=$1 n=$2 dir="$WORK/$1-$2" k
    mkdir -p "$dir"
    config "$engine" 16 16 >"$dir/amp2dify.json"
    start_fake_dify "$dir" --key "$DIFY_API_KEY"
    PORTS=()
    PIDS=()
    for ((k = 0; k < n; k++)); do
        start_amp2dify "$dir/amp2dify-$k.log" "$dir/amp2dify.json" \
            DIFY_BASE_URL="http://127.0.0.1:$FAKE_PORT/v1" AMP2DIFY_LISTEN=127.0.0.1:0 \
            AMP2DIFY_SPOOL="$dir/spool-$k.db" ||
            die "amp2dify ($engine) did not start: $(tail -n 5 "$dir/amp2dify-$k.log")"
        PORTS+=("$AMP_START_PORT")
        PIDS+=("$AMP_START_PID")
    done
}
stop_set() {
    local p
    for p in "${PIDS[@]}"; do stop_pid "$p" 20; done
    stop_pid "$FAKE_PID" 10
}

log "bench/redis: wrk ${DURATION}s x $CONNS connections per run, $CPUS CPUs, redis-server $(redis-server --version | awk '{print $3}')"
SQL_LINE="" RED_LINE="" RED_CPU=0 R3_RPS=0 R3_P99=0 R3_N=0
if [[ $PARTS == *ingest* ]]; then
start_set sqlite 1
SQL_LINE=$(wrk_run sqlite "${PORTS[0]}" "$CORPUS" "$CONNS" "$WORK/wrk-sqlite.txt")
stop_set
log "    sqlite  $SQL_LINE"

rcli flushall >/dev/null
start_set redis 1
RED_LINE=$(wrk_run redis "${PORTS[0]}" "$CORPUS" "$CONNS" "$WORK/wrk-redis.txt")
RED_CPU=$(cpu_ms "${PIDS[0]}")
stop_set
log "    redis   $RED_LINE"

rcli flushall >/dev/null
start_set redis 3
per=$((CONNS / 3))
WRKS=()
for k in 0 1 2; do
    wrk_run "redis3-$k" "${PORTS[$k]}" "$WORK/part.0$k" "$per" "$WORK/wrk-redis3-$k.txt" \
        >"$WORK/line-$k" &
    WRKS+=("$!")
done
wait "${WRKS[@]}"
stop_set
for k in 0 1 2; do
    l=$(cat "$WORK/line-$k")
    log "    redis3/$k $l"
    R3_RPS=$(calc "%.1f" "$R3_RPS + 0$(kv "$l" rps)")
    p=$(kv "$l" p99_us)
    ((${p:-0} > R3_P99)) && R3_P99=$p
    R3_N=$((R3_N + 0$(kv "$l" non2xx)))
done
fi
REDIS_CPU_S=$(awk '{ print ($14 + $15) / 100 }' "/proc/$REDIS_PID/stat" 2>/dev/null)

# ---- delivery at 256 in flight --------------------------------------------------
mkdir -p "$WORK/bodies"
awk -v n="$NDEL" -v batch="$BATCH" -v dir="$WORK/bodies" -v run="$$" 'BEGIN {
    for (b = 0; b < n / batch; b++) {
        f = sprintf("%s/%05d.json", dir, b)
        printf "[" > f
        for (i = 0; i < batch; i++) {
            e = b * batch + i
            printf "%s{\"event_type\":\"Bench_Event\",\"user_id\":\"user-%d\",\"insert_id\":\"%s-%d\",\"time\":%d000}", (i ? "," : ""), e % 1000, run, e, 1700000000 + e > f
        }
        printf "]" > f
        close(f)
    }
}' || die "cannot write the event bodies"

delivered_count() {
    curl -s --max-time 2 "http://127.0.0.1:$1/metrics" | awk '/^amp2dify_deliveries_total\{/ &&
        /app="bench"/ && /outcome="delivered"/ { v = $NF } END { printf "%d\n", v + 0 }'
}

# ENGINE: sets DEL_RATE (deliveries/s) and DEL_CPU_US (amp2dify CPU per delivery).
deliver() {
    local engine=$1 dir="$WORK/deliver-$1" port pid
    mkdir -p "$dir"
    config "$engine" "$INFLIGHT" "$INFLIGHT" >"$dir/amp2dify.json"
    start_fake_dify "$dir" --key "$DIFY_API_KEY" --delay-ms "$DELAY_MS"
    kill -STOP "$FAKE_PID"
    start_amp2dify "$dir/amp2dify.log" "$dir/amp2dify.json" \
        DIFY_BASE_URL="http://127.0.0.1:$FAKE_PORT/v1" AMP2DIFY_LISTEN=127.0.0.1:0 \
        AMP2DIFY_SPOOL="$dir/spool.db" || die "amp2dify ($engine) did not start"
    port=$AMP_START_PORT
    pid=$AMP_START_PID
    export BUILD port dir
    # shellcheck disable=SC2016 # expanded by the inner shell
    find "$WORK/bodies" -name '*.json' -print0 | sort -z |
        timeout 120 xargs -0 -n 1 -P 4 sh -c '
            h=$("$BUILD/amp2dify" sign --secret-env AMP2DIFY_SECRETS "$1") || exit 1
            ts=$(printf "%s\n" "$h" | sed -n "s/^X-Amplitude-Timestamp: //p")
            sig=$(printf "%s\n" "$h" | sed -n "s/^X-Amplitude-Sig: //p")
            curl -sS --max-time 20 -o /dev/null -H "Content-Type: application/json" \
                -H "X-Amplitude-Timestamp: $ts" -H "X-Amplitude-Sig: $sig" \
                --data-binary "@$1" "http://127.0.0.1:$port/webhooks/amplitude"' _ \
        >"$dir/ingest.err" 2>&1
    local cpu0 rcpu0 start n=0 now end
    cpu0=$(cpu_ms "$pid")
    rcpu0=$(cpu_ms "$REDIS_PID")
    start=$(now_ms)
    end=$((start + 60000))
    kill -CONT "$FAKE_PID"
    while :; do
        n=$(delivered_count "$port")
        now=$(now_ms)
        ((n >= NDEL || now > end)) && break
        sleep 0.05
    done
    DEL_RATE=$(calc "%.1f" "$n * 1000 / ($now - $start)")
    DEL_CPU_US=$(calc "%.1f" "($(cpu_ms "$pid") - $cpu0) * 1000 / ($n > 0 ? $n : 1)")
    DEL_RCPU_US=$(calc "%.1f" "($(cpu_ms "$REDIS_PID") - $rcpu0) * 1000 / ($n > 0 ? $n : 1)")
    ((n >= NDEL)) || log "bench/redis: $engine delivered only $n of $NDEL in 60 s"
    stop_pid "$pid" 20
    stop_pid "$FAKE_PID" 10
}
D_SQL=0 D_SQL_CPU=0 D_RED=0 D_RED_CPU=0 D_RED_RCPU=0
if [[ $PARTS == *delivery* ]]; then
    deliver sqlite
    D_SQL=$DEL_RATE
    D_SQL_CPU=$DEL_CPU_US
    rcli flushall >/dev/null
    deliver redis
    D_RED=$DEL_RATE
    D_RED_CPU=$DEL_CPU_US
    D_RED_RCPU=$DEL_RCPU_US
fi

# ---- report ---------------------------------------------------------------------
s_rps=$(kv "$SQL_LINE" rps)
r_rps=$(kv "$RED_LINE" rps)
: "${s_rps:=0}" "${r_rps:=0}"
ratio() { calc "%.2f" "($2 > 0) ? $1 / $2 : 0"; }
ms() { calc "%.2f" "0$1 / 1000"; }
ideal=$(calc "%.1f" "$INFLIGHT * 1000 / $DELAY_MS")
cat <<EOF

==== amp2dify Redis engine benchmark ($(date -u +%Y-%m-%dT%H:%M:%SZ)) ====
ingest (wrk, $CONNS connections, ${DURATION}s; delivery to a 0 ms fake Dify running alongside)
  sqlite, 1 replica   $(printf '%8.1f' "$s_rps") req/s  p99 $(ms "$(kv "$SQL_LINE" p99_us)") ms  non-2xx $(kv "$SQL_LINE" non2xx)   (baseline)
  redis,  1 replica   $(printf '%8.1f' "$r_rps") req/s  p99 $(ms "$(kv "$RED_LINE" p99_us)") ms  non-2xx $(kv "$RED_LINE" non2xx)   ratio $(ratio "$r_rps" "$s_rps")
  redis,  3 replicas  $(printf '%8.1f' "$R3_RPS") req/s  p99 $(ms "$R3_P99") ms  non-2xx $R3_N   ratio $(ratio "$R3_RPS" "$s_rps") (same $CPUS CPUs shared)
  amp2dify CPU in the 1-replica redis run: $RED_CPU ms; redis-server CPU over all runs: ${REDIS_CPU_S:-?} s
delivery ($NDEL events preloaded, $INFLIGHT in flight, fake Dify ${DELAY_MS} ms, ideal $ideal/s)
  sqlite  $(printf '%8.1f' "$D_SQL") deliveries/s  $D_SQL_CPU us CPU per delivery
  redis   $(printf '%8.1f' "$D_RED") deliveries/s  $D_RED_CPU us CPU per delivery + $D_RED_RCPU us in redis-server   ratio $(ratio "$D_RED" "$D_SQL")
run time    $(($(date +%s) - T_START)) s

EOF
echo "{\"bench\":\"redis\",\"cpus\":$CPUS,\"ingest\":{\"sqlite_rps\":${s_rps:-0},\"redis_rps\":${r_rps:-0},\"redis3_rps\":$R3_RPS,\
\"redis_ratio\":$(ratio "$r_rps" "$s_rps"),\"redis3_ratio\":$(ratio "$R3_RPS" "$s_rps"),\
\"sqlite_p99_ms\":$(ms "$(kv "$SQL_LINE" p99_us)"),\"redis_p99_ms\":$(ms "$(kv "$RED_LINE" p99_us)"),\"redis3_p99_ms\":$(ms "$R3_P99")},\
\"delivery\":{\"in_flight\":$INFLIGHT,\"sqlite_per_s\":$D_SQL,\"redis_per_s\":$D_RED,\"ratio\":$(ratio "$D_RED" "$D_SQL")}}"
