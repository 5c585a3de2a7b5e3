#!/usr/bin/env bash
# bench/backlog.sh BUILD_DIR — amp2dify restarting on a large backlog.
#
# 1. backlog_fill writes a spool with BACKLOG_EVENTS (1,000,000) pending
#    deliveries (the daemon's own schema, ~300-byte chat bodies, 10,000 users).
# 2. build/fake-dify answers on 127.0.0.1; amp2dify starts on the spool.
# 3. backlog_watch reads the spool until the first row is marked delivered
#    (finished_ms - start: an upper bound on the time to the first delivery,
#    since the row is marked after Dify's answer), then at start + 5 s reads
#    amp2dify's VmRSS / VmHWM and the number delivered so far.
# 4. amp2dify is stopped with SIGTERM (its exit status and the time it took
#    are reported), then the fake, which prints what it served.
#
# Targets: first delivery < 1000 ms; peak RSS bounded, far below the
# backlog (reported as a share of the spool file). Everything listens on
# 127.0.0.1 only, every wait is bounded, and the processes and the work
# directory are removed on any exit.
#
# Prints a summary block, then one JSON line (also BUILD_DIR/bench/backlog.json).
# Exit status 1 when a target is missed or a process misbehaved.
#
# Knobs (environment): BACKLOG_EVENTS (1000000), BACKLOG_USERS (10000),
# BACKLOG_PER_USER=1 (rows in per-user conversations: the claim also checks
# each user's order), BACKLOG_UNMERGED=K (the last K rows' dedupe keys not
# merged yet, as after a crash during an export: the start reads them back
# from their rows), BACKLOG_SAMPLE_MS (5000), BACKLOG_COLD=1 (drop the page
# cache before the start, as after a reboot; needs root, affects the whole
# machine), BACKLOG_KEEP=1 (keep the work directory).
set -uo pipefail

BUILD=${1:-build}
EVENTS=${BACKLOG_EVENTS:-1000000}
USERS=${BACKLOG_USERS:-10000}
SAMPLE_MS=${BACKLOG_SAMPLE_MS:-5000}
PER_USER=${BACKLOG_PER_USER:-0}
UNMERGED=${BACKLOG_UNMERGED:-0}
COLD=${BACKLOG_COLD:-0}
FIRST_TARGET_MS=1000

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh" || exit 1
bench_init backlog "${BACKLOG_KEEP:-0}" # also moves to the repository root

# Unix ms of the first log line whose msg is MSG, or empty.
log_ms() {
    local ts
    ts=$(grep -m 1 "\"msg\":\"$2\"" "$1" 2>/dev/null | sed -n 's/.*"ts":"\([^"]*\)".*/\1/p')
    [[ -n $ts ]] && date -d "$ts" +%s%3N 2>/dev/null
}

for b in amp2dify fake-dify bench/backlog_fill bench/backlog_watch; do
    [[ -x $BUILD/$b ]] || die "$BUILD/$b is missing; run 'make bench'"
done
[[ $EVENTS =~ ^[1-9][0-9]*$ && $USERS =~ ^[1-9][0-9]*$ && $SAMPLE_MS =~ ^[1-9][0-9]*$ ]] ||
    die "BACKLOG_EVENTS, BACKLOG_USERS and BACKLOG_SAMPLE_MS must be positive integers"
[[ $UNMERGED =~ ^(0|[1-9][0-9]*)$ ]] && ((UNMERGED <= EVENTS)) ||
    die "BACKLOG_UNMERGED must be an integer from 0 to BACKLOG_EVENTS"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/amp2dify-backlog.XXXXXX") || die "cannot create a work directory"
SPOOL=$WORK/spool.db
CPUS=$(nproc 2>/dev/null || echo 0)
SPOOL_FS=$(stat -f -c %T "$WORK" 2>/dev/null || echo unknown)
T_START=$(date +%s)

# ---- 1. the backlog ----------------------------------------------------------

log "backlog: writing $EVENTS pending deliveries into $SPOOL ($SPOOL_FS) ..."
fill_args=(--db "$SPOOL" --count "$EVENTS" --users "$USERS")
[[ $PER_USER == 1 ]] && fill_args+=(--per-user)
fill_args+=(--unmerged "$UNMERGED")
FILL_LINE=$(timeout 600 "$BUILD/bench/backlog_fill" "${fill_args[@]}") || die "backlog_fill failed"
log "    $FILL_LINE"
spool_bytes=$(kv "$FILL_LINE" bytes)

# ---- 2. fake Dify and amp2dify -------------------------------------------------

DIFY_API_KEY="app-backlog-$(rand_hex 8)"
start_fake_dify "$WORK" --key "$DIFY_API_KEY"

# The rows' route and app; no back-pressure limit (the default max_pending
# equals this backlog and would turn /readyz to 503, which is not measured here).
CONFIG=$WORK/amp2dify.json
cat >"$CONFIG" <<EOF
{
  "listen": {"address": "127.0.0.1", "port": 0},
  "spool": {"path": "$SPOOL", "max_pending": 0},
  "dify": {"validate": "off", "base_url": "http://127.0.0.1:$FAKE_PORT/v1"},
  "apps": {"assistant": {"api_key_env": "DIFY_API_KEY", "endpoint": "chat"}},
  "routes": [{"name": "all-events", "app": "assistant",
              "query": "Amplitude event {{event_type}} from user {{user_id}}",
              "user": "{{user_id}}"$([[ $PER_USER == 1 ]] && echo ', "conversation": "per_user"')}]
}
EOF
AMP2DIFY_SECRETS="backlog-$(rand_hex 16)"
export AMP2DIFY_SECRETS DIFY_API_KEY AMP2DIFY_LOG_LEVEL=info
unset AMP2DIFY_SPOOL AMP2DIFY_LISTEN DIFY_BASE_URL
"$BUILD/amp2dify" check-config -c "$CONFIG" >"$WORK/check-config.txt" 2>&1 ||
    die "the backlog config does not validate: $(cat "$WORK/check-config.txt")"

if [[ $COLD == 1 ]]; then
    sync
    if echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then
        log "backlog: page cache dropped (cold start)"
    else
        log "backlog: cannot drop the page cache (not root?); warm start"
        COLD=0
    fi
fi

log "backlog: starting amp2dify on the backlog, fake Dify on 127.0.0.1:$FAKE_PORT ..."
T0=$(now_ms)
"$BUILD/amp2dify" serve -c "$CONFIG" 2>"$WORK/amp2dify.log" &
AMP_PID=$!
STARTED+=("$AMP_PID")

# ---- 3. figures ----------------------------------------------------------------

WATCH_LINE=$(timeout 120 "$BUILD/bench/backlog_watch" --db "$SPOOL" --pid "$AMP_PID" \
    --start-ms "$T0" --sample-after-ms "$SAMPLE_MS" --timeout-s 30)
log "    $WATCH_LINE"
AMP_ALIVE=1
kill -0 "$AMP_PID" 2>/dev/null || AMP_ALIVE=0
listening_at=$(log_ms "$WORK/amp2dify.log" listening)
listen_ms=-1
[[ -n $listening_at ]] && listen_ms=$((listening_at - T0))

stop_pid "$AMP_PID" 30
AMP_EXIT=$STOP_STATUS
AMP_STOP_MS=$STOP_MS
stop_pid "$FAKE_PID" 10
FAKE_SUMMARY=$(grep '^{' "$WORK/fake.out" | tail -n 1)

first_ms=$(kv "$WATCH_LINE" first_delivery_ms)
delivered=$(kv "$WATCH_LINE" delivered)
sample_ms=$(kv "$WATCH_LINE" sample_ms)
rss_kb=$(kv "$WATCH_LINE" vmrss_kb)
hwm_kb=$(kv "$WATCH_LINE" vmhwm_kb)
: "${first_ms:=-1}" "${delivered:=0}" "${sample_ms:=0}" "${rss_kb:=-1}" "${hwm_kb:=-1}"
: "${spool_bytes:=0}"
fake_delivered=$(sed -n 's/.*"delivered":\([0-9]*\).*/\1/p' <<<"$FAKE_SUMMARY")
: "${fake_delivered:=0}"
rate=$(awk -v d="$delivered" -v f="$first_ms" -v s="$sample_ms" \
    'BEGIN { printf "%.0f", (s > f && f >= 0) ? d * 1000 / (s - f) : 0 }')
hwm_share=$(awk -v h="$hwm_kb" -v b="$spool_bytes" \
    'BEGIN { printf "%.2f", (b > 0 && h > 0) ? h * 1024 * 100 / b : 0 }')
errors=$(grep -c '"level":"\(warn\|error\)"' "$WORK/amp2dify.log" 2>/dev/null)
: "${errors:=0}"

problems=()
((AMP_ALIVE)) || problems+=("amp2dify exited during the run")
((first_ms < 0)) && problems+=("no delivery within 30 s")
((first_ms >= FIRST_TARGET_MS)) && problems+=("first delivery after $first_ms ms (target < $FIRST_TARGET_MS ms)")
# Bounded: a quarter of the spool file would mean rows are being loaded.
((hwm_kb < 0)) && problems+=("could not read amp2dify's memory")
((hwm_kb > 0 && hwm_kb * 1024 * 4 > spool_bytes)) && problems+=("peak RSS $hwm_kb KiB is over a quarter of the spool ($spool_bytes bytes)")
((AMP_EXIT != 0)) && problems+=("amp2dify exited with status $AMP_EXIT on SIGTERM")
((errors > 0)) && problems+=("amp2dify logged $errors warn/error lines")

cat <<EOF

==== amp2dify restart on a backlog ($(date -u +%Y-%m-%dT%H:%M:%SZ)) ====
backlog        $(kv "$FILL_LINE" rows) pending deliveries, $(kv "$FILL_LINE" users) users, per_user=$(kv "$FILL_LINE" per_user), unmerged keys $(kv "$FILL_LINE" unmerged); spool $((spool_bytes / 1048576)) MiB on $SPOOL_FS (filled in $(kv "$FILL_LINE" ms) ms)
host           $CPUS CPUs, $([[ $COLD == 1 ]] && echo "cold page cache" || echo "warm page cache")
first delivery $first_ms ms after the process started (target < $FIRST_TARGET_MS ms; upper bound: the row's acknowledgement commit)
listening      $listen_ms ms after the process started (the "listening" log line)
after $((sample_ms / 1000)) s      VmRSS $((rss_kb / 1024)) MiB, VmHWM $((hwm_kb / 1024)) MiB ($hwm_share% of the spool file); $delivered delivered (~$rate/s)
stop           SIGTERM -> exit $AMP_EXIT in $AMP_STOP_MS ms; fake Dify served $fake_delivered successful deliveries
EOF
if ((${#problems[@]})); then
    echo "problems:"
    printf '  - %s\n' "${problems[@]}"
    grep '"level":"\(warn\|error\)"' "$WORK/amp2dify.log" | head -n 10 | sed 's/^/    /'
fi
echo "run time       $(($(date +%s) - T_START)) s"
echo

problems_json=$(json_strings "${problems[@]}")
JSON="{\"bench\":\"backlog\",\"time\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\",\"events\":$EVENTS,\
\"users\":$USERS,\"per_user\":$([[ $PER_USER == 1 ]] && echo true || echo false),\"unmerged\":$UNMERGED,\
\"cold\":$([[ $COLD == 1 ]] && echo true || echo false),\"spool_bytes\":$spool_bytes,\
\"spool_fs\":\"$SPOOL_FS\",\"cpus\":$CPUS,\"first_delivery_ms\":$first_ms,\
\"first_delivery_target_ms\":$FIRST_TARGET_MS,\"listening_ms\":$listen_ms,\
\"sample_ms\":$sample_ms,\"vmrss_kb\":$rss_kb,\"vmhwm_kb\":$hwm_kb,\"delivered_at_sample\":$delivered,\
\"delivered_per_s\":$rate,\"stop_exit\":$AMP_EXIT,\"stop_ms\":$AMP_STOP_MS,\
\"fake_delivered\":$fake_delivered,\"problems\":[$problems_json]}"
echo "$JSON"
mkdir -p "$BUILD/bench" && echo "$JSON" >"$BUILD/bench/backlog.json"

((${#problems[@]} == 0))
