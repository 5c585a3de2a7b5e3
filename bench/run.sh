#!/usr/bin/env bash
# bench/run.sh BUILD_DIR [BASE_BUILD_DIR] — the ingest benchmark behind
# `make bench`.
#
# 1. mhd_baseline (a bare libmicrohttpd server configured like amp2dify's)
#    under wrk: the ceiling of the HTTP layer on this machine; then the same
#    server handing each request to a thread that resumes it (hand-off), and
#    one that also writes the bodies to a log and fdatasyncs it before
#    resuming (the durable floor).
# 2. amp2dify (examples/amp2dify.json with delivery limits lifted, log level
#    warn) delivering to build/fake-dify, under the same wrk load with
#    freshly signed, unique ~600-byte Amplitude events.
# 3. The delivery side, read from amp2dify's spool once it has drained;
#    3b. the same load with delivery held back (ingest only), also with
#    listen.event_loop poll and on an old spool (both reported, not
#    judged); 3c. with a route filter that stores nothing (the HTTP + JSON
#    path's ceiling).
# 4. build/bench/bench_mapping, when it exists.
# With BASE_BUILD_DIR (an older build; only its amp2dify is used), 3b and 3c
# also run that build's amp2dify, each right after this build's, and the
# summary gives this build's figures as ratios to the base's: a change's
# effect measured in one run, on the same corpus and the same machine state.
# Everything listens on 127.0.0.1 only; every step is bounded in time, and
# the processes this script starts are stopped on any exit.
#
# Prints a summary block, then the same figures as one JSON line (also kept
# in BUILD_DIR/bench/last-run.json). bench/README.md explains each figure.
#
# Knobs (environment): BENCH_DURATION (s per wrk run, 10), BENCH_THREADS (2),
# BENCH_CONNECTIONS (64), BENCH_REQUESTS (signed requests generated, 400000),
# BENCH_BODY_BYTES (600), BENCH_DRAIN_SECONDS (max wait for delivery, 30),
# BENCH_OLD_KEYS (the old spool's dedupe keys, 2000000; 0 skips that run),
# BENCH_KEEP=1 keeps the work directory (spool, logs, corpus).
# shellcheck disable=SC2154 # i_*, n_*, h_*, d_* and BASE_* are set with printf -v
set -uo pipefail

BUILD=${1:-build}
BASE_BUILD=${2:-}
DURATION=${BENCH_DURATION:-10}
OLD_KEYS=${BENCH_OLD_KEYS:-2000000}
THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNECTIONS:-64}
NREQ=${BENCH_REQUESTS:-400000}
BODY_BYTES=${BENCH_BODY_BYTES:-600}
DRAIN_S=${BENCH_DRAIN_SECONDS:-30}
BASELINE_NREQ=20000 # the baseline checks nothing, so a short corpus repeated is enough

# ---- plumbing ---------------------------------------------------------------

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh" || exit 1
bench_init bench "${BENCH_KEEP:-0}" # also moves to the repository root

# Run wrk with ingest.lua; echoes the BENCH line. LABEL URL CORPUS OUTFILE
run_wrk() {
    local label=$1 url=$2 corpus=$3 out=$4 line
    BENCH_LABEL=$label timeout $((DURATION + 120)) \
        wrk -t "$THREADS" -c "$CONNS" -d "${DURATION}s" --timeout 10s \
        -s "$HERE/ingest.lua" "$url" -- "$corpus" "$THREADS" >"$out" 2>&1
    line=$(grep '^BENCH ' "$out" | tail -n 1)
    if [[ -z $line ]]; then
        log "bench: wrk against $label printed no result:"
        sed 's/^/    /' "$out" >&2
        return 1
    fi
    echo "$line"
}

# ---- checks -------------------------------------------------------------------

for b in amp2dify fake-dify bench/mhd_baseline bench/sign_corpus bench/spool_stat bench/backlog_fill; do
    [[ -x $BUILD/$b ]] || die "$BUILD/$b is missing; run 'make bench'"
done
[[ -z $BASE_BUILD || -x $BASE_BUILD/amp2dify ]] || die "$BASE_BUILD/amp2dify is missing"
command -v wrk >/dev/null || die "wrk is not installed (Debian package wrk)"
command -v curl >/dev/null || die "curl is not installed (Debian package curl)"
command -v timeout >/dev/null || die "timeout (coreutils) is not installed"
[[ $THREADS =~ ^[1-9][0-9]*$ && $CONNS =~ ^[1-9][0-9]*$ && $DURATION =~ ^[1-9][0-9]*$ ]] ||
    die "BENCH_THREADS, BENCH_CONNECTIONS and BENCH_DURATION must be positive integers"
[[ $OLD_KEYS =~ ^(0|[1-9][0-9]*)$ ]] || die "BENCH_OLD_KEYS must be a non-negative integer"
((CONNS >= THREADS)) || die "BENCH_CONNECTIONS must be at least BENCH_THREADS"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/amp2dify-bench.XXXXXX") || die "cannot create a work directory"
CPUS=$(nproc 2>/dev/null || echo 0)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
SPOOL_FS=$(stat -f -c %T "$WORK" 2>/dev/null || echo unknown)
T_START=$(date +%s)

log "bench: work directory $WORK (filesystem $SPOOL_FS), $CPUS CPUs, load average $LOAD_BEFORE"
log "bench: wrk -t $THREADS -c $CONNS -d ${DURATION}s, $NREQ signed requests of ~$BODY_BYTES bytes"

# ---- corpus -------------------------------------------------------------------

# Random per run; only this script and the amp2dify it starts know them.
AMP2DIFY_SECRETS="bench-$(rand_hex 16)"
DIFY_API_KEY="app-bench-$(rand_hex 8)"
export AMP2DIFY_SECRETS

CORPUS=$WORK/corpus.tsv
corpus_info=$("$BUILD/bench/sign_corpus" --secret-env AMP2DIFY_SECRETS --count "$NREQ" \
    --size "$BODY_BYTES" --out "$CORPUS") || die "sign_corpus failed"
log "bench: corpus $corpus_info"
head -n "$BASELINE_NREQ" "$CORPUS" >"$WORK/baseline.tsv"

# The corpus's MAC must be the one amp2dify computes, or every request is a
# 401 and the run measures the error path.
IFS=$'\t' read -r ts0 sig0 body0 <"$CORPUS"
printf '%s' "$body0" >"$WORK/first-body.json"
want=$("$BUILD/amp2dify" sign --secret-env AMP2DIFY_SECRETS --timestamp "$ts0" \
    "$WORK/first-body.json" | sed -n 's/^X-Amplitude-Sig: sha256=//p')
[[ $want == "$sig0" ]] || die "sign_corpus's signature ($sig0) differs from amp2dify sign's ($want)"

# ---- 1. baseline and its references --------------------------------------------------

# MODE LABEL: mhd_baseline in MODE under the wrk load; sets REF_LINE to wrk's
# BENCH line, REF_CPU_MS to the server's CPU time and REF_HTTP_CPU_MS to its
# HTTP threads' (libmicrohttpd's).
REF_LINE=""
REF_CPU_MS=0
REF_HTTP_CPU_MS=0
run_reference() {
    local mode=$1 label=$2 pid port
    "$BUILD/bench/mhd_baseline" --port 0 --threads 2 --mode "$mode" --log "$WORK/$label.log" \
        >"$WORK/$label.out" 2>"$WORK/$label.err" &
    pid=$!
    STARTED+=("$pid")
    port=$(wait_listening "$pid" "$WORK/$label.out") ||
        die "mhd_baseline --mode $mode did not start: $(cat "$WORK/$label.err")"
    log "bench: mhd_baseline --mode $mode on 127.0.0.1:$port ..."
    REF_LINE=$(run_wrk "$label" "http://127.0.0.1:$port/webhooks/amplitude" \
        "$WORK/baseline.tsv" "$WORK/wrk-$label.txt") || die "the $label run failed"
    log "    $REF_LINE"
    REF_CPU_MS=$(cpu_ms "$pid")
    REF_HTTP_CPU_MS=$(cpu_ms "$pid" MHD-)
    stop_pid "$pid" 5
}

run_reference plain baseline
BASE_LINE=$REF_LINE
BASE_CPU_MS=$REF_CPU_MS
run_reference handoff handoff
HANDOFF_LINE=$REF_LINE
HANDOFF_CPU_MS=$REF_CPU_MS
HANDOFF_HTTP_CPU_MS=$REF_HTTP_CPU_MS
run_reference durable durable-floor
FLOOR_LINE=$REF_LINE
FLOOR_CPU_MS=$REF_CPU_MS

# ---- 2. amp2dify --------------------------------------------------------------------

start_fake_dify "$WORK" --key "$DIFY_API_KEY" --delay-ms 0

# The example config, with the app's delivery limits lifted so delivered/s
# measures amp2dify rather than the example's 10 requests/s (0 = unlimited),
# and without the start-up check of the Dify app (dify.validate): the fake's
# app declares no input form, so every mapped input would log a warning.
CONFIG=$WORK/amp2dify.json
sed -E 's/"rate_per_sec": *[0-9.]+/"rate_per_sec": 0/; s/"max_in_flight": *[0-9]+/"max_in_flight": 64/;
        s/"dify": *\{/"dify": {"validate": "off",/' \
    examples/amp2dify.json >"$CONFIG"
export DIFY_API_KEY DIFY_BASE_URL="http://127.0.0.1:$FAKE_PORT/v1" \
    AMP2DIFY_LISTEN=127.0.0.1:0 AMP2DIFY_SPOOL="$WORK/spool.db" AMP2DIFY_LOG_LEVEL=warn
"$BUILD/amp2dify" check-config -c "$CONFIG" >"$WORK/check-config.txt" 2>&1 ||
    die "the bench config does not validate: $(cat "$WORK/check-config.txt")"

start_amp2dify "$WORK/amp2dify.log" "$CONFIG" ||
    die "amp2dify did not become ready: $(tail -n 20 "$WORK/amp2dify.log")"
AMP_PID=$AMP_START_PID
AMP_PORT=$AMP_START_PORT

log "bench: amp2dify on 127.0.0.1:$AMP_PORT (pid $AMP_PID), fake Dify on 127.0.0.1:$FAKE_PORT ..."
AMP_LINE=$(run_wrk amp2dify "http://127.0.0.1:$AMP_PORT/webhooks/amplitude" \
    "$CORPUS" "$WORK/wrk-amp2dify.txt") || die "amp2dify run failed"
T_LOAD_END=$(date +%s%3N)
log "    $AMP_LINE"

AMP_ALIVE=1
kill -0 "$AMP_PID" 2>/dev/null || AMP_ALIVE=0

# ---- 3. delivery --------------------------------------------------------------------

SPOOL_LINE=""
if ((AMP_ALIVE)); then
    log "bench: waiting up to ${DRAIN_S}s for delivery to drain ..."
    SPOOL_LINE=$("$BUILD/bench/spool_stat" --db "$WORK/spool.db" --wait-drain "$DRAIN_S") ||
        log "bench: spool_stat failed"
    kill -0 "$AMP_PID" 2>/dev/null || AMP_ALIVE=0
fi
PEAK_RSS_KB=$(awk '/^VmHWM:/ { print $2 }' /proc/"$AMP_PID"/status 2>/dev/null)
PEAK_RSS_KB=${PEAK_RSS_KB:-0}
# The spool's threads: amp-commit, amp-sync and amp-checkpoint.
spool_cpu_ms() { echo $(($(cpu_ms "$1" amp-commit) + $(cpu_ms "$1" amp-sync) + $(cpu_ms "$1" amp-checkpoint))); }
AMP_CPU_MS=$(cpu_ms "$AMP_PID")
AMP_HTTP_CPU_MS=$(cpu_ms "$AMP_PID" MHD-)
AMP_SPOOL_CPU_MS=$(spool_cpu_ms "$AMP_PID")
# The delivery engine's own threads: the workers (send, decide, ack) and the
# dispatcher (claims).
AMP_WORKER_CPU_MS=$(cpu_ms "$AMP_PID" amp-worker)
AMP_DISPATCH_CPU_MS=$(cpu_ms "$AMP_PID" amp-dispatch)
FAKE_CPU_MS=$(cpu_ms "$FAKE_PID")
stop_pid "$AMP_PID" 20
AMP_EXIT=$STOP_STATUS
stop_pid "$FAKE_PID" 10
FAKE_SUMMARY=$(grep '^{' "$WORK/fake.out" | tail -n 1)
[[ -n $SPOOL_LINE ]] || SPOOL_LINE=$("$BUILD/bench/spool_stat" --db "$WORK/spool.db" 2>/dev/null)

# ---- 3b. ingest only, 3c. nothing stored --------------------------------------------
# 3b: the same load on a fresh spool with delivery held back (the app's rate
# set near zero; the dispatcher claims no more than the app's queue holds),
# so requests/s is the durable ingest path alone (signature, decode, map,
# group commit with fsync) without the delivery threads and the fake Dify
# taking the same two CPUs.
# 3c: the same again with a route filter that matches no event: signature,
# decode and mapping run, the answer is 202 {"filtered":1}, nothing is
# stored. Its requests/s is the ceiling of this HTTP + JSON path on this
# machine, whatever the spool does.

# LABEL CONFIG [BUILD_DIR]: amp2dify (of BUILD_DIR, default this build) on
# CONFIG with its own spool under the wrk load; sets VARIANT_LINE to wrk's
# BENCH line (empty on failure), VARIANT_CPU to "total http spool" CPU ms and
# VARIANT_SERVER to amp2dify's own "p99_ms share_within_5ms" (ingest_latency).
VARIANT_LINE=""
VARIANT_CPU="0 0 0"
VARIANT_SERVER="0 0"
run_variant() {
    local label=$1 config=$2 BUILD=${3:-$BUILD} # start_amp2dify runs $BUILD/amp2dify
    VARIANT_LINE=""
    VARIANT_CPU="0 0 0"
    VARIANT_SERVER="0 0"
    start_amp2dify "$WORK/$label.log" "$config" AMP2DIFY_SPOOL="$WORK/$label.db"
    if [[ -n $AMP_START_PORT ]]; then
        log "bench: amp2dify, $label, on 127.0.0.1:$AMP_START_PORT ..."
        VARIANT_LINE=$(run_wrk "$label" "http://127.0.0.1:$AMP_START_PORT/webhooks/amplitude" \
            "$CORPUS" "$WORK/wrk-$label.txt") || log "bench: the $label run failed"
        log "    $VARIANT_LINE"
        VARIANT_CPU="$(cpu_ms "$AMP_START_PID") $(cpu_ms "$AMP_START_PID" MHD-) $(spool_cpu_ms "$AMP_START_PID")"
        VARIANT_SERVER=$(ingest_latency "$AMP_START_PORT")
    else
        log "bench: amp2dify ($label) did not become ready: $(tail -n 5 "$WORK/$label.log")"
    fi
    stop_pid "$AMP_START_PID" 20
}

# LABEL CONFIG PREFIX: with a base build, the same load on its amp2dify;
# sets PREFIX_LINE and PREFIX_CPU as run_variant sets VARIANT_* (empty and
# "0 0 0" without a base build).
run_base_variant() {
    local label=$1 config=$2 prefix=$3
    printf -v "${prefix}_LINE" '%s' ""
    printf -v "${prefix}_CPU" '%s' "0 0 0"
    [[ -n $BASE_BUILD ]] || return 0
    run_variant "base-$label" "$config" "$BASE_BUILD"
    printf -v "${prefix}_LINE" '%s' "$VARIANT_LINE"
    printf -v "${prefix}_CPU" '%s' "$VARIANT_CPU"
}

sed -E 's/"rate_per_sec": *[0-9.]+/"rate_per_sec": 0.001/' examples/amp2dify.json >"$WORK/ingest-only.json"
run_variant ingest-only "$WORK/ingest-only.json"
INGEST_LINE=$VARIANT_LINE
read -r INGEST_CPU_MS INGEST_HTTP_CPU_MS INGEST_SPOOL_CPU_MS <<<"$VARIANT_CPU"
read -r i_server_p99 i_server_5ms <<<"$VARIANT_SERVER"
run_base_variant ingest-only "$WORK/ingest-only.json" BASE_INGEST

# 3b, poll: the same with the HTTP threads waiting in poll(2) instead of
# epoll (listen.event_loop), which spares the two epoll_ctl calls of each
# suspended request at the price of a scan of every open connection.
sed -E 's/"listen": *\{/&"event_loop": "poll",/' "$WORK/ingest-only.json" >"$WORK/ingest-poll.json"
grep -q '"event_loop": "poll"' "$WORK/ingest-poll.json" || die "could not set listen.event_loop in the poll config"
run_variant ingest-poll "$WORK/ingest-poll.json"
POLL_LINE=$VARIANT_LINE
read -r POLL_CPU_MS POLL_HTTP_CPU_MS POLL_SPOOL_CPU_MS <<<"$VARIANT_CPU"

# 3b, old spool: the same on a spool that has run for a while, its dedupe
# table holding OLD_KEYS keys, its file the free pages of the rows that
# retention pruned (backlog_fill --pruned, which keeps the last row, so new
# rows' ids come after it). The file is synced first: otherwise the first
# checkpoint's sync writes the whole fixture back while requests wait.
OLD_LINE=""
OLD_CPU_MS=0 OLD_HTTP_CPU_MS=0 OLD_SPOOL_CPU_MS=0
if ((OLD_KEYS > 0)); then
    log "bench: an old spool, $OLD_KEYS dedupe keys ..."
    fill=$(timeout 600 "$BUILD/bench/backlog_fill" --db "$WORK/ingest-old.db" --count "$OLD_KEYS" \
        --pruned) || die "backlog_fill could not write the old spool"
    log "    $fill"
    sync "$WORK/ingest-old.db" || die "could not sync the old spool"
    run_variant ingest-old "$WORK/ingest-only.json"
    OLD_LINE=$VARIANT_LINE
    read -r OLD_CPU_MS OLD_HTTP_CPU_MS OLD_SPOOL_CPU_MS <<<"$VARIANT_CPU"
fi

sed -E 's/"name": *"all-events",/&"filter":{"field":"event_type","op":"equals","value":"(none)"},/' \
    examples/amp2dify.json >"$WORK/no-store.json"
grep -q '"(none)"' "$WORK/no-store.json" || die "could not add the filter to the no-store config"
run_variant no-store "$WORK/no-store.json"
NOSTORE_LINE=$VARIANT_LINE
read -r NOSTORE_CPU_MS NOSTORE_HTTP_CPU_MS _ <<<"$VARIANT_CPU"
run_base_variant no-store "$WORK/no-store.json" BASE_NOSTORE

# ---- 3d. the baseline again -----------------------------------------------------------

# The bare request's cost drifts on a shared machine, and every target is a
# multiple of it. The same baseline at the end shows how far it moved during
# this run; the targets stay judged against the first (the JSON's "baseline").
run_reference plain baseline-end
BASE_END_LINE=$REF_LINE
BASE_END_CPU_MS=$REF_CPU_MS

# ---- 4. mapping ---------------------------------------------------------------------

MAPPING_LINE=""
if [[ -x $BUILD/bench/bench_mapping ]]; then
    log "bench: $BUILD/bench/bench_mapping ..."
    # Its lines, joined with "; " (or its one JSON line as it is).
    MAPPING_LINE=$(timeout 60 "$BUILD/bench/bench_mapping" 2>"$WORK/mapping.err" |
        awk 'NF { $1 = $1; out = out (out == "" ? "" : "; ") $0 } END { print out }')
    [[ -n $MAPPING_LINE ]] || log "bench: bench_mapping printed nothing: $(tail -n 5 "$WORK/mapping.err")"
fi

# ---- figures ------------------------------------------------------------------------

b_rps=$(kv "$BASE_LINE" rps)
a_rps=$(kv "$AMP_LINE" rps)
ratio=$(calc "%.3f" "($b_rps > 0) ? $a_rps / $b_rps : 0")
b_p50=$(calc "%.2f" "$(kv "$BASE_LINE" p50_us) / 1000")
b_p99=$(calc "%.2f" "$(kv "$BASE_LINE" p99_us) / 1000")
a_p50=$(calc "%.2f" "$(kv "$AMP_LINE" p50_us) / 1000")
a_p99=$(calc "%.2f" "$(kv "$AMP_LINE" p99_us) / 1000")
b_non2xx=$(kv "$BASE_LINE" non2xx)
a_non2xx=$(kv "$AMP_LINE" non2xx)
b_sock=$(kv "$BASE_LINE" socket_errors)
a_sock=$(kv "$AMP_LINE" socket_errors)
a_req=$(kv "$AMP_LINE" requests)
a_wrapped=$(kv "$AMP_LINE" wrapped)
a_statuses=$(kv "$AMP_LINE" statuses)
a_first_error=${AMP_LINE#* first_error=}
# PREFIX LINE: sets PREFIX_rps, _ratio (to the baseline), _p50, _p99 (ms),
# _non2xx and _wrapped from a variant's BENCH line; 0 where it has none.
variant_figures() {
    local p=$1 line=$2 rps
    rps=$(kv "$line" rps)
    : "${rps:=0}"
    printf -v "${p}_rps" '%s' "$rps"
    printf -v "${p}_ratio" '%s' "$(calc "%.3f" "($b_rps > 0) ? $rps / $b_rps : 0")"
    printf -v "${p}_p50" '%s' "$(calc "%.2f" "0$(kv "$line" p50_us) / 1000")"
    printf -v "${p}_p99" '%s' "$(calc "%.2f" "0$(kv "$line" p99_us) / 1000")"
    printf -v "${p}_non2xx" '%s' "$(kv "$line" non2xx)"
    printf -v "${p}_wrapped" '%s' "$(kv "$line" wrapped)"
}
variant_figures i "$INGEST_LINE"
variant_figures n "$NOSTORE_LINE"
variant_figures h "$HANDOFF_LINE"
variant_figures d "$FLOOR_LINE"
variant_figures e "$BASE_END_LINE"
variant_figures p "$POLL_LINE"
variant_figures o "$OLD_LINE"
: "${o_non2xx:=0}" "${p_non2xx:=0}" "${i_non2xx:=0}" "${i_wrapped:=0}" "${n_non2xx:=0}" "${h_non2xx:=0}" "${d_non2xx:=0}" "${e_non2xx:=0}"
# Inverse throughput (us per request at 64 connections): what each step adds.
usper() { calc "%.1f" "($1 > 0) ? 1000000 / $1 : 0"; }
b_us=$(usper "$b_rps")
h_us=$(usper "$h_rps")
d_us=$(usper "$d_rps")
n_us=$(usper "$n_rps")
i_us=$(usper "$i_rps")
i_floor_ratio=$(calc "%.3f" "($d_rps > 0) ? $i_rps / $d_rps : 0")

pending=$(kv "$SPOOL_LINE" pending)
delivered=$(kv "$SPOOL_LINE" delivered)
dead=$(kv "$SPOOL_LINE" dead)
first_created=$(kv "$SPOOL_LINE" first_created_ms)
last_finished=$(kv "$SPOOL_LINE" last_finished_ms)
lag50=$(kv "$SPOOL_LINE" lag_p50_ms)
lag99=$(kv "$SPOOL_LINE" lag_p99_ms)
: "${pending:=0}" "${delivered:=0}" "${dead:=0}" "${first_created:=0}" "${last_finished:=0}"
: "${lag50:=0}" "${lag99:=0}"
stored=$((pending + delivered + dead))
deliver_ms=$((last_finished > first_created ? last_finished - first_created : 0))
delivered_per_s=$(calc "%.1f" "($deliver_ms > 0) ? $delivered * 1000 / $deliver_ms : 0")
# Time from the end of the load to the last delivery; 0 when delivery kept up.
drain_after_ms=$((last_finished > T_LOAD_END ? last_finished - T_LOAD_END : 0))
fake_requests=$(sed -n 's/.*"requests":\([0-9]*\).*/\1/p' <<<"$FAKE_SUMMARY")
fake_delivered=$(sed -n 's/.*"delivered":\([0-9]*\).*/\1/p' <<<"$FAKE_SUMMARY")
: "${fake_requests:=0}" "${fake_delivered:=0}"
peak_rss_mib=$(calc "%.1f" "$PEAK_RSS_KB / 1024")
# CPU_MS COUNT: microseconds of CPU per unit; 0 without units.
per_us() { calc "%.1f" "(${2:-0} > 0) ? ${1:-0} * 1000 / ${2:-0} : 0"; }
# Per request wrk completed (in the ingest-only run each stored one event).
reqs() { kv "$1" requests; }
b_cpu_us=$(per_us "$BASE_CPU_MS" "$(reqs "$BASE_LINE")")
e_cpu_us=$(per_us "$BASE_END_CPU_MS" "$(reqs "$BASE_END_LINE")")
# The end baseline against the first: CPU per request (requests/s: e_ratio).
e_cpu_drift=$(calc "%.3f" "($b_cpu_us > 0) ? $e_cpu_us / $b_cpu_us : 0")
h_cpu_us=$(per_us "$HANDOFF_CPU_MS" "$(reqs "$HANDOFF_LINE")")
h_http_cpu_us=$(per_us "$HANDOFF_HTTP_CPU_MS" "$(reqs "$HANDOFF_LINE")")
d_cpu_us=$(per_us "$FLOOR_CPU_MS" "$(reqs "$FLOOR_LINE")")
a_cpu_us=$(per_us "$AMP_CPU_MS" "$stored")
a_http_cpu_us=$(per_us "$AMP_HTTP_CPU_MS" "$stored")
a_spool_cpu_us=$(per_us "$AMP_SPOOL_CPU_MS" "$stored")
a_other_cpu_us=$(per_us $((AMP_CPU_MS - AMP_HTTP_CPU_MS - AMP_SPOOL_CPU_MS)) "$stored")
# PREFIX LINE TOTAL HTTP SPOOL: an ingest-only variant's CPU ms as us per
# request, in PREFIX_cpu_us, PREFIX_http_cpu_us and PREFIX_spool_cpu_us.
variant_cpu_us() {
    local p=$1 n
    n=$(reqs "$2")
    printf -v "${p}_cpu_us" '%s' "$(per_us "$3" "$n")"
    printf -v "${p}_http_cpu_us" '%s' "$(per_us "$4" "$n")"
    printf -v "${p}_spool_cpu_us" '%s' "$(per_us "$5" "$n")"
}
variant_cpu_us i "$INGEST_LINE" "$INGEST_CPU_MS" "$INGEST_HTTP_CPU_MS" "$INGEST_SPOOL_CPU_MS"
variant_cpu_us p "$POLL_LINE" "$POLL_CPU_MS" "$POLL_HTTP_CPU_MS" "$POLL_SPOOL_CPU_MS"
variant_cpu_us o "$OLD_LINE" "$OLD_CPU_MS" "$OLD_HTTP_CPU_MS" "$OLD_SPOOL_CPU_MS"
o_to_fresh=$(calc "%.3f" "($i_rps > 0) ? $o_rps / $i_rps : 0")
n_cpu_us=$(per_us "$NOSTORE_CPU_MS" "$(reqs "$NOSTORE_LINE")")
n_http_cpu_us=$(per_us "$NOSTORE_HTTP_CPU_MS" "$(reqs "$NOSTORE_LINE")")
f_cpu_us=$(per_us "$FAKE_CPU_MS" "$fake_requests")
a_worker_cpu_us=$(per_us "$AMP_WORKER_CPU_MS" "$delivered")
a_dispatch_cpu_us=$(per_us "$AMP_DISPATCH_CPU_MS" "$delivered")
# Per delivered event, all but the HTTP threads and the spool's threads.
a_delivery_cpu_us=$(per_us $((AMP_CPU_MS - AMP_HTTP_CPU_MS - AMP_SPOOL_CPU_MS)) "$delivered")
# What the spool's threads spent per event beyond the ingest-only run's
# cost: their share of delivery (claims are made on the dispatcher thread,
# acknowledgements are committed by the spool's committer).
a_spool_extra_us=$(calc "%.1f" "$a_spool_cpu_us - $i_spool_cpu_us")

# ---- against the base build (BASE_BUILD_DIR) ------------------------------------------
# NEW BASE: NEW / BASE to 3 decimals; 0 when either is missing.
over() { calc "%.3f" "(${1:-0} > 0 && ${2:-0} > 0) ? ${1:-0} / ${2:-0} : 0"; }
BASE_SUMMARY=""
BASE_JSON=""
if [[ -n $BASE_BUILD ]]; then
    read -r bi_cpu bi_http bi_spool <<<"$BASE_INGEST_CPU"
    read -r _ bn_http _ <<<"$BASE_NOSTORE_CPU"
    bi_req=$(reqs "$BASE_INGEST_LINE")
    bn_req=$(reqs "$BASE_NOSTORE_LINE")
    bi_rps=$(kv "$BASE_INGEST_LINE" rps)
    bn_rps=$(kv "$BASE_NOSTORE_LINE" rps)
    x_i_rps=$(over "$i_rps" "$bi_rps")
    x_i_cpu=$(over "$i_cpu_us" "$(per_us "$bi_cpu" "$bi_req")")
    x_i_http=$(over "$i_http_cpu_us" "$(per_us "$bi_http" "$bi_req")")
    x_i_spool=$(over "$i_spool_cpu_us" "$(per_us "$bi_spool" "$bi_req")")
    x_n_rps=$(over "$n_rps" "$bn_rps")
    x_n_http=$(over "$n_http_cpu_us" "$(per_us "$bn_http" "$bn_req")")
    BASE_SUMMARY="against base  $BASE_BUILD (run right after this build's, each): this build / base
              ingest only: requests/s x$x_i_rps, CPU per event x$x_i_cpu (HTTP threads x$x_i_http, spool threads x$x_i_spool)
              nothing stored: requests/s x$x_n_rps, HTTP threads' CPU per request x$x_n_http"
    BASE_JSON=",\"against_base\":{\"base\":\"$(json_str "$BASE_BUILD")\",\"ingest_only\":{\"rps\":$x_i_rps,\"cpu\":$x_i_cpu,\"http_cpu\":$x_i_http,\"spool_cpu\":$x_i_spool},\"no_store\":{\"rps\":$x_n_rps,\"http_cpu\":$x_n_http}}"
fi

# ---- issue 19 targets: each with this run's value and PASS/MISS ------------------
TARGET_LINES=()
TARGET_JSON=""
# NAME VALUE OP LIMIT UNIT: one target row; OP is <=, < or >=.
target() {
    local name=$1 value=$2 op=$3 limit=$4 unit=$5 ok verdict
    ok=$(calc "%d" "($value $op $limit) ? 1 : 0")
    verdict=$( ((ok)) && echo PASS || echo MISS)
    TARGET_LINES+=("$(printf '  %-58s %9s %-6s %2s %-5s %s' "$name" "$value" "$unit" "$op" "$limit" "$verdict")")
    TARGET_JSON+="${TARGET_JSON:+,}{\"target\":\"$(json_str "$name")\",\"value\":$value,\"op\":\"$op\",\"limit\":$limit,\"unit\":\"$unit\",\"pass\":$( ((ok)) && echo true || echo false)}"
}
# The issue set its CPU targets in microseconds on a machine where a bare
# request cost 9 us (8.5-9.3, with the 32 KiB per-connection buffer the
# baseline has again): 20 us on the HTTP threads, 15 on the spool's,
# 50 per delivery. CPU time per request drifts between machines and with
# their load, so each is judged as that multiple of this run's bare request.
BARE_US_AT_ISSUE=9
# US: US as a multiple of this run's bare request (0 without one).
x_bare() { calc "%.2f" "($b_cpu_us > 0) ? $1 / $b_cpu_us : 0"; }
x_limit() { calc "%.2f" "$1 / $BARE_US_AT_ISSUE"; }
target "HTTP threads, CPU per stored event (ingest only)" "$(x_bare "$i_http_cpu_us")" "<=" "$(x_limit 20)" "x bare"
target "spool threads, CPU per stored event (ingest only)" "$(x_bare "$i_spool_cpu_us")" "<=" "$(x_limit 15)" "x bare"
target "ingest only / bare server, requests/s" "$i_ratio" ">=" 0.30 ""
target "ingest only p99 latency at $CONNS connections" "$i_p99" "<" 5 ms
target "ingest while delivering / bare server, requests/s" "$ratio" ">=" 0.20 ""
target "CPU per delivery at 0 ms Dify (not HTTP, not spool threads)" "$(x_bare "$a_delivery_cpu_us")" "<=" "$(x_limit 50)" "x bare"
# The same values against the end baseline (the p99 needs none).
x_end() { calc "%.2f" "($e_cpu_us > 0) ? $1 / $e_cpu_us : 0"; }
r_end() { calc "%.3f" "($e_rps > 0) ? $1 / $e_rps : 0"; }
END_TARGETS="HTTP threads $(x_end "$i_http_cpu_us") x, spool threads $(x_end "$i_spool_cpu_us") x,"
END_TARGETS+=" ingest only $(r_end "$i_rps"), ingest while delivering $(r_end "$a_rps"),"
END_TARGETS+=" delivery $(x_end "$a_delivery_cpu_us") x"
# The ingest-only targets as they read with listen.event_loop poll (not judged:
# the default is epoll).
# PREFIX: the ingest-only targets as a variant (PREFIX_*) reads them.
variant_targets() {
    local http=${1}_http_cpu_us spool=${1}_spool_cpu_us ratio=${1}_ratio p99=${1}_p99
    echo "HTTP threads $(x_bare "${!http}") x bare, spool threads $(x_bare "${!spool}") x," \
        "requests/s ${!ratio} of bare, p99 ${!p99} ms"
}
POLL_TARGETS=$(variant_targets p)
OLD_TARGETS="skipped (BENCH_OLD_KEYS=0)"
((OLD_KEYS > 0)) && OLD_TARGETS="$(variant_targets o), requests/s $o_to_fresh of a fresh spool's"
# Not judged: how much of wrk's p99 amp2dify measured itself (the rest is
# the request waiting in its socket and wrk's threads waiting for the same
# CPUs), and the least the HTTP threads can cost with a hand-off.
SERVER_VIEW="p99 $i_server_p99 ms (interpolated within its buckets), $(calc "%.1f" "$i_server_5ms * 100")% within 5 ms; wrk's p99 $i_p99 ms"
HANDOFF_HTTP="$h_http_cpu_us us = $(x_bare "$h_http_cpu_us") x bare"
amp_warnings=$(grep -c . "$WORK/amp2dify.log" 2>/dev/null)
: "${amp_warnings:=0}"

problems=()
if [[ -n $BASE_BUILD ]]; then
    [[ -z $BASE_INGEST_LINE ]] && problems+=("the base build's ingest-only run did not complete")
    [[ -z $BASE_NOSTORE_LINE ]] && problems+=("the base build's nothing-stored run did not complete")
fi
if ((!AMP_ALIVE)); then
    if [[ $AMP_EXIT == 0 ]]; then
        problems+=("amp2dify exited during the run with status 0: a clean shutdown, so something outside the benchmark sent it SIGTERM or SIGINT")
    else
        problems+=("amp2dify exited during the run (exit status $AMP_EXIT; above 128: killed by signal status-128)")
    fi
fi
((AMP_ALIVE)) && [[ $AMP_EXIT != 0 ]] && problems+=("amp2dify exited with status $AMP_EXIT on SIGTERM")
((a_non2xx > 0)) && problems+=("amp2dify answered $a_non2xx non-2xx ($a_statuses); first: $a_first_error")
((a_sock > 0)) && problems+=("$a_sock socket errors against amp2dify (connect/read/write/timeout)")
((i_non2xx > 0)) && problems+=("amp2dify (ingest only) answered $i_non2xx non-2xx")
[[ -z $INGEST_LINE ]] && problems+=("the ingest-only run did not complete")
((p_non2xx > 0)) && problems+=("amp2dify (ingest only, poll) answered $p_non2xx non-2xx")
[[ -z $POLL_LINE ]] && problems+=("the ingest-only run with listen.event_loop poll did not complete")
((OLD_KEYS > 0)) && [[ -z $OLD_LINE ]] && problems+=("the ingest-only run on an old spool did not complete")
((n_non2xx > 0)) && problems+=("amp2dify (nothing stored) answered $n_non2xx non-2xx")
[[ -z $NOSTORE_LINE ]] && problems+=("the no-store run did not complete")
((b_non2xx + b_sock > 0)) && problems+=("baseline: $b_non2xx non-2xx, $b_sock socket errors")
((e_non2xx > 0)) && problems+=("baseline at the end: $e_non2xx non-2xx")
((h_non2xx + d_non2xx > 0)) && problems+=("references: $h_non2xx non-2xx (handoff), $d_non2xx (durable floor)")
((pending > 0)) && problems+=("$pending deliveries still pending$( ((AMP_ALIVE)) && echo " after waiting ${DRAIN_S} s")")
((dead > 0)) && problems+=("$dead deliveries dead-lettered")
((a_wrapped > 0)) && problems+=("the corpus wrapped $a_wrapped times: raise BENCH_REQUESTS (repeats count as duplicates)")
((i_wrapped > 0)) && problems+=("the corpus wrapped $i_wrapped times in the ingest-only run: raise BENCH_REQUESTS")
# Every 2xx answer promised a stored event; the spool may hold a few more
# (requests still in flight when wrk stopped count on the server only).
((a_wrapped == 0 && stored < a_req - a_non2xx)) &&
    problems+=("only $stored events stored for $((a_req - a_non2xx)) accepted requests")
((fake_delivered > 0 && fake_delivered < delivered)) &&
    problems+=("fake Dify saw $fake_delivered deliveries, the spool says $delivered")
((amp_warnings > 0)) && problems+=("amp2dify logged $amp_warnings warning/error lines (see below)")

cat <<EOF

==== amp2dify ingest benchmark ($(date -u +%Y-%m-%dT%H:%M:%SZ)) ====
load          wrk -t $THREADS -c $CONNS -d ${DURATION}s, POST of ~$BODY_BYTES-byte signed events
host          $CPUS CPUs, load average before $LOAD_BEFORE, spool on $SPOOL_FS
                        requests/s     p50 ms     p99 ms    non-2xx
baseline (bare MHD)   $(printf '%12.1f %10s %10s %10s' "$b_rps" "$b_p50" "$b_p99" "$b_non2xx")
  + hand-off          $(printf '%12.1f %10s %10s %10s' "$h_rps" "$h_p50" "$h_p99" "$h_non2xx")
  + fdatasync floor   $(printf '%12.1f %10s %10s %10s' "$d_rps" "$d_p50" "$d_p99" "$d_non2xx")
amp2dify              $(printf '%12.1f %10s %10s %10s' "$a_rps" "$a_p50" "$a_p99" "$a_non2xx")
amp2dify ingest only  $(printf '%12.1f %10s %10s %10s' "$i_rps" "$i_p50" "$i_p99" "$i_non2xx")
  with poll           $(printf '%12.1f %10s %10s %10s' "$p_rps" "$p_p50" "$p_p99" "$p_non2xx")
nothing stored        $(printf '%12.1f %10s %10s %10s' "$n_rps" "$n_p50" "$n_p99" "$n_non2xx")
baseline again (end)  $(printf '%12.1f %10s %10s %10s' "$e_rps" "$e_p50" "$e_p99" "$e_non2xx")
ratio amp2dify/baseline  $ratio (delivering meanwhile), $i_ratio (ingest only), $n_ratio (nothing stored)
ratio to baseline     hand-off $h_ratio, durable floor $d_ratio; amp2dify ingest only / durable floor $i_floor_ratio
us/request (1/rps)    baseline $b_us, hand-off $h_us, durable floor $d_us, nothing stored $n_us, ingest only $i_us
delivery      $delivered delivered ($dead dead, $pending pending) of $stored stored; fake Dify saw $fake_delivered
              $delivered_per_s delivered/s over ${deliver_ms} ms; last delivery ${drain_after_ms} ms after the load ended
              spool-to-Dify lag p50 ${lag50} ms, p99 ${lag99} ms
peak RSS      $peak_rss_mib MiB (amp2dify VmHWM)
CPU           baseline $b_cpu_us us/request (hand-off $h_cpu_us, durable floor $d_cpu_us); amp2dify $a_cpu_us us/event stored and delivered
              (HTTP threads $a_http_cpu_us, spool threads $a_spool_cpu_us, delivery and other $a_other_cpu_us); fake Dify $f_cpu_us us/request
              ingest only: $i_cpu_us us/event (HTTP threads $i_http_cpu_us, spool threads $i_spool_cpu_us)
              ingest only, listen.event_loop poll: $p_cpu_us us/event (HTTP threads $p_http_cpu_us, spool threads $p_spool_cpu_us)
              nothing stored: $n_cpu_us us/request (HTTP threads $n_http_cpu_us)
              per delivered event: $a_delivery_cpu_us us outside the HTTP and spool threads (delivery workers
              $a_worker_cpu_us, dispatcher with its claims $a_dispatch_cpu_us); the spool's threads $a_spool_extra_us us more per
              event than when ingesting only (their share of claims and acknowledgements)
targets (issue 19; CPU as a multiple of this run's bare request, whose cost drifts by machine)
$(printf '%s\n' "${TARGET_LINES[@]}")
  the bare request at the end of the run: $e_cpu_us us (x$e_cpu_drift of the first), requests/s x$e_ratio;
  against it the values above would read: $END_TARGETS
  with listen.event_loop poll (ingest only, not judged): $POLL_TARGETS
  on an old spool, $OLD_KEYS dedupe keys (ingest only, not judged): $OLD_TARGETS
  ingest only as amp2dify measured it (amp2dify_ingest_duration_seconds, headers to answer; not judged):
    $SERVER_VIEW
  the hand-off reference's HTTP threads (libmicrohttpd's suspend and resume, nothing else; not judged):
    $HANDOFF_HTTP per request
EOF
[[ -n $BASE_SUMMARY ]] && echo "$BASE_SUMMARY"
[[ -n $MAPPING_LINE ]] && echo "mapping       $MAPPING_LINE"
if ((${#problems[@]})); then
    echo "problems:"
    printf '  - %s\n' "${problems[@]}"
fi
if ((amp_warnings > 0)); then
    echo "amp2dify log (first 20 of $amp_warnings lines):"
    head -n 20 "$WORK/amp2dify.log" | sed 's/^/  /'
fi
echo "run time      $(($(date +%s) - T_START)) s"
echo

mapping_json=null
if [[ -n $MAPPING_LINE ]]; then
    if [[ $MAPPING_LINE == \{*\} ]]; then
        mapping_json=$MAPPING_LINE
    else
        mapping_json="\"$(json_str "$MAPPING_LINE")\""
    fi
fi
problems_json=$(json_strings "${problems[@]}")

JSON="{\"bench\":\"ingest\",\"time\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\",\
\"load\":{\"duration_s\":$DURATION,\"threads\":$THREADS,\"connections\":$CONNS,\"body_bytes\":$BODY_BYTES,\"corpus\":$NREQ},\
\"host\":{\"cpus\":$CPUS,\"loadavg_before\":\"$LOAD_BEFORE\",\"spool_fs\":\"$(json_str "$SPOOL_FS")\"},\
\"baseline\":{\"rps\":$b_rps,\"p50_ms\":$b_p50,\"p99_ms\":$b_p99,\"non2xx\":$b_non2xx,\"socket_errors\":$b_sock},\
\"baseline_end\":{\"rps\":$e_rps,\"p50_ms\":$e_p50,\"p99_ms\":$e_p99,\"non2xx\":$e_non2xx,\"cpu_us_per_request\":$e_cpu_us,\"cpu_drift\":$e_cpu_drift,\"rps_drift\":$e_ratio},\
\"amp2dify\":{\"rps\":$a_rps,\"p50_ms\":$a_p50,\"p99_ms\":$a_p99,\"non2xx\":$a_non2xx,\"socket_errors\":$a_sock,\"requests\":$a_req,\"wrapped\":$a_wrapped},\
\"ratio\":$ratio,\
\"references\":{\"handoff\":{\"rps\":$h_rps,\"p50_ms\":$h_p50,\"p99_ms\":$h_p99,\"non2xx\":$h_non2xx,\"ratio\":$h_ratio},\
\"durable_floor\":{\"rps\":$d_rps,\"p50_ms\":$d_p50,\"p99_ms\":$d_p99,\"non2xx\":$d_non2xx,\"ratio\":$d_ratio}},\
\"ingest_only\":{\"rps\":$i_rps,\"p50_ms\":$i_p50,\"p99_ms\":$i_p99,\"non2xx\":$i_non2xx,\"ratio\":$i_ratio,\"ratio_to_floor\":$i_floor_ratio,\"server_p99_ms\":$i_server_p99,\"server_within_5ms\":$i_server_5ms},\
\"ingest_only_poll\":{\"rps\":$p_rps,\"p50_ms\":$p_p50,\"p99_ms\":$p_p99,\"non2xx\":$p_non2xx,\"ratio\":$p_ratio,\"cpu_us_per_event\":$p_cpu_us,\"http_cpu_us_per_event\":$p_http_cpu_us,\"spool_cpu_us_per_event\":$p_spool_cpu_us},\
\"ingest_only_old_spool\":{\"dedupe_keys\":$OLD_KEYS,\"rps\":$o_rps,\"p50_ms\":$o_p50,\"p99_ms\":$o_p99,\"non2xx\":$o_non2xx,\"ratio\":$o_ratio,\"ratio_to_fresh\":$o_to_fresh,\"cpu_us_per_event\":$o_cpu_us,\"http_cpu_us_per_event\":$o_http_cpu_us,\"spool_cpu_us_per_event\":$o_spool_cpu_us},\
\"no_store\":{\"rps\":$n_rps,\"p50_ms\":$n_p50,\"p99_ms\":$n_p99,\"non2xx\":$n_non2xx,\"ratio\":$n_ratio},\
\"delivery\":{\"delivered\":$delivered,\"dead\":$dead,\"pending\":$pending,\"stored\":$stored,\"fake_delivered\":$fake_delivered,\"fake_requests\":$fake_requests,\
\"delivered_per_s\":$delivered_per_s,\"window_ms\":$deliver_ms,\"drain_after_load_ms\":$drain_after_ms,\"lag_p50_ms\":$lag50,\"lag_p99_ms\":$lag99},\
\"peak_rss_kb\":$PEAK_RSS_KB,\
\"cpu_us\":{\"baseline_per_request\":$b_cpu_us,\"handoff_per_request\":$h_cpu_us,\"handoff_http_per_request\":$h_http_cpu_us,\"durable_floor_per_request\":$d_cpu_us,\"amp2dify_per_event\":$a_cpu_us,\"amp2dify_http_per_event\":$a_http_cpu_us,\"amp2dify_spool_per_event\":$a_spool_cpu_us,\"amp2dify_other_per_event\":$a_other_cpu_us,\"ingest_only_per_event\":$i_cpu_us,\"ingest_only_http_per_event\":$i_http_cpu_us,\"ingest_only_spool_per_event\":$i_spool_cpu_us,\"no_store_per_request\":$n_cpu_us,\"no_store_http_per_request\":$n_http_cpu_us,\"fake_dify_per_request\":$f_cpu_us,\"delivery_per_delivered\":$a_delivery_cpu_us,\"delivery_workers_per_delivered\":$a_worker_cpu_us,\"dispatcher_per_delivered\":$a_dispatch_cpu_us,\"spool_extra_when_delivering_per_event\":$a_spool_extra_us},\"targets\":[$TARGET_JSON],\"mapping\":$mapping_json,\"problems\":[$problems_json]$BASE_JSON}"
echo "$JSON"
mkdir -p "$BUILD/bench" && echo "$JSON" >"$BUILD/bench/last-run.json"

((AMP_ALIVE)) || exit 1
exit 0
