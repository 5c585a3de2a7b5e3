#!/usr/bin/env bash
# bench/export.sh BUILD_DIR — the Export API source's ingest rate.
#
# 1. export_fake writes a real-format Export zip of EXPORT_EVENTS (1,000,000)
#    events over 24 hours (4 parts an hour, 2 gzip members a part).
# 2. Baseline: export_fake --baseline reads the same zip with libarchive,
#    gunzips and parses every line with amp2dify's JSON reader, and nothing
#    else: the floor of any Export ingest on this machine.
# 3. export_fake serves the zip as the fake Amplitude on 127.0.0.1, and
#    `amp2dify export` fetches the 24 hours in one request (streamed to a
#    file), stores every event through a route into a fresh spool
#    (spool.sync full: an fsync per group commit) and writes its cursor. Its
#    peak RSS (VmHWM, sampled every 50 ms until it exits) is reported beside
#    the zip's size.
#
# Targets: every event stored; peak RSS under EXPORT_MAX_RSS_MB (128): the
# export is streamed, so memory does not grow with it (the zip of 1M events
# is several times that, its JSON text over 1.5 GB). The rate is
# reported as events/s and as a ratio of the baseline's, measured in the
# same run.
#
# Prints a summary block, then one JSON line (also BUILD_DIR/bench/export.json).
# Exit status 1 when a target is missed. Knobs: EXPORT_EVENTS, EXPORT_MAX_RSS_MB,
# EXPORT_KEEP=1 (keep the work directory).
set -uo pipefail

BUILD=${1:-build}
EVENTS=${EXPORT_EVENTS:-1000000}
MAX_RSS_MB=${EXPORT_MAX_RSS_MB:-128}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh" || exit 1
bench_init export "${EXPORT_KEEP:-0}"

for b in amp2dify bench/export_fake; do
    [[ -x $BUILD/$b ]] || die "$BUILD/$b is missing; run 'make bench'"
done
[[ $EVENTS =~ ^[1-9][0-9]*$ ]] || die "EXPORT_EVENTS must be a positive integer"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/amp2dify-export.XXXXXX") || die "cannot create a work directory"
ZIP=$WORK/export.zip

# ---- 1. the zip ------------------------------------------------------------
t0=$(now_ms)
"$BUILD/bench/export_fake" --write "$ZIP" --events "$EVENTS" --hours 24 --parts 4 --members 2 ||
    die "cannot write the zip"
ZIP_BYTES=$(stat -c %s "$ZIP")
EVENTS=$(( (EVENTS + 23) / 24 * 24 ))
log "export: zip of $EVENTS events, $ZIP_BYTES bytes, written in $(( $(now_ms) - t0 )) ms"

# ---- 2. baseline -------------------------------------------------------------
base=$("$BUILD/bench/export_fake" --baseline "$ZIP") || die "baseline failed"
base_events=$(sed -n 's/.*"events":\([0-9]*\).*/\1/p' <<<"$base")
base_ms=$(sed -n 's/.*"ms":\([0-9]*\).*/\1/p' <<<"$base")
[[ $base_events == "$EVENTS" ]] || die "baseline read $base_events events, expected $EVENTS"
BASE_RATE=$(calc '%.0f' "$base_events * 1000 / ($base_ms > 0 ? $base_ms : 1)")

# ---- 3. amp2dify export --------------------------------------------------------
key=bench-amp-key
secret=bench-amp-secret
"$BUILD/bench/export_fake" --serve "$ZIP" --key "$key" --secret "$secret" > "$WORK/fake.out" 2>&1 &
FAKE_PID=$!
STARTED+=("$FAKE_PID")
port=$(wait_listening "$FAKE_PID" "$WORK/fake.out") || die "the fake Amplitude did not start"
cat > "$WORK/amp2dify.json" <<JSON
{
  "spool": {"path": "$WORK/spool.db", "max_pending": 0},
  "sources": {"export": {"base_url": "http://127.0.0.1:$port", "min_request_interval_ms": 0}},
  "log": {"level": "info"},
  "apps": {"support": {"api_key_env": "DIFY_API_KEY", "endpoint": "chat"}},
  "routes": [{"name": "all", "app": "support", "query": "{{event_type}} at {{event_time}}",
              "user": "{{device_id}}"}]
}
JSON
t0=$(now_ms)
AMPLITUDE_API_KEY=$key AMPLITUDE_SECRET_KEY=$secret "$BUILD/amp2dify" export -c "$WORK/amp2dify.json" \
    --start 2026-11-01T00 --end 2026-11-01T23 > "$WORK/export.log" 2>&1 &
pid=$!
STARTED+=("$pid")
hwm=0
while kill -0 "$pid" 2>/dev/null; do
    v=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' /proc/"$pid"/status 2>/dev/null)
    [[ -n $v && $v -gt $hwm ]] && hwm=$v
    sleep 0.05
done
wait "$pid"
status=$?
ms=$(( $(now_ms) - t0 ))
stop_pid "$FAKE_PID" 5
[[ $status == 0 ]] || { tail -n 5 "$WORK/export.log" >&2; die "amp2dify export exited $status"; }
done_line=$(grep '"msg":"export done"' "$WORK/export.log")
accepted=$(sed -n 's/.*"accepted":\([0-9]*\).*/\1/p' <<<"$done_line")
RATE=$(calc '%.0f' "$EVENTS * 1000 / $ms")
RATIO=$(calc '%.3f' "$RATE / $BASE_RATE")
RSS_MB=$(calc '%.1f' "$hwm / 1024")
ZIP_MB=$(calc '%.1f' "$ZIP_BYTES / 1048576")
SPOOL_MB=$(calc '%.1f' "$(stat -c %s "$WORK/spool.db") / 1048576")

fails=()
[[ $accepted == "$EVENTS" ]] || fails+=("stored $accepted of $EVENTS events")
(( hwm / 1024 < MAX_RSS_MB )) || fails+=("peak RSS $RSS_MB MiB over $MAX_RSS_MB MiB")

cat <<EOF2
== export ingest ($EVENTS events, zip $ZIP_MB MiB, $(nproc) CPUs)
  baseline (unzip, gunzip, parse only)  $BASE_RATE events/s
  amp2dify export (routes, spool, fsync) $RATE events/s  ($ms ms; ratio to baseline $RATIO)
  peak RSS                               $RSS_MB MiB (target < $MAX_RSS_MB MiB; the zip is $ZIP_MB MiB)
  spool after                            $SPOOL_MB MiB
EOF2
json="{\"events\":$EVENTS,\"zip_bytes\":$ZIP_BYTES,\"baseline_events_per_s\":$BASE_RATE,\"events_per_s\":$RATE,\"ratio\":$RATIO,\"ms\":$ms,\"peak_rss_kb\":$hwm,\"accepted\":${accepted:-0},\"failures\":[$(json_strings "${fails[@]}")]}"
echo "$json"
mkdir -p "$BUILD/bench" && echo "$json" > "$BUILD/bench/export.json"
if ((${#fails[@]})); then
    log "export: FAILED: ${fails[*]}"
    exit 1
fi
