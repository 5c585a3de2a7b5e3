#!/usr/bin/env bash
# Probes the request-path limits of issue 7 against a real amp2dify and says,
# for each, whether it holds (PASS) or not (GAP), with the evidence.
#
#   tests/matrix/limits.sh BUILD/amp2dify      (from anywhere; needs curl, python3)
#
#   header_size        a 24 KiB header is 431 headers_too_large in the JSON error
#                      shape; a 100 KiB one (beyond libmicrohttpd's buffer) is
#                      431 too; both get an access-log line and are counted in
#                      amp2dify_http_requests_total{code="431"}
#   connection_limit   listen.connection_limit 20 with 20 idle connections held:
#                      a 21st is served at once and the longest-idle one closed
#   per_ip_limit       listen.per_ip_connection_limit 5: the 6th is refused
#   idle_timeout       listen.connection_timeout_seconds 2: an idle connection closes
#   nesting            an event nested 65 levels is 400 invalid_event
#   events_per_request more events than listen.max_events_per_request is 400
#   string_length      a 900 KB string inside an event is refused
#   idle_flood         with 1000 idle / half-sent connections open (400 silent, 300
#                      stopped inside the headers, 300 inside the body) from one
#                      address (127.0.0.1), a valid signed request from another
#                      (127.0.0.2) is answered 202 within 2 seconds, with the
#                      per-IP limit lifted so that all 1000 are really held
#   flood_5000         the default config, 5000 idle / half-sent connections
#                      from 20 addresses (127.0.0.10-29): all held, a valid
#                      signed request from 127.0.0.2 answered 202 within 1 s;
#                      prints the server's RSS per idle connection, which must
#                      stay under RSS_PER_CONN_KIB (default 64)
#   flood_over_limit   listen.connection_limit 1000, the same 5000: the
#                      longest-idle are closed to make room, a valid request is
#                      answered 202 within 1 s
#   slow_deadlines     header_timeout 2 s, body_timeout 3 s, idle timeout 30 s:
#                      connections trickling a byte every 0.5 s inside their
#                      headers or body are all closed within 4.5 s
#   poll_event_loop    listen.event_loop poll: no epoll instance is opened, 20
#                      signed events sent at once (each suspended until stored)
#                      are all answered 202 and counted accepted, and with
#                      listen.connection_limit 20 and 20 idle connections held a
#                      21st is served and an idle one evicted
# Every instance must also stop cleanly (exit 0, no sanitizer report).
# Exit status: 0 when every probe passes, 1 otherwise.
set -u
[ $# = 1 ] || { echo "usage: $0 AMP2DIFY_BINARY" >&2; exit 2; }
BIN=$(cd "$(dirname "$1")" && echo "$(pwd)/$(basename "$1")")
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.." || exit 2
tmp=$(mktemp -d /tmp/amp2dify-limits-XXXXXX)
pids=()
. tests/matrix/jsonq.sh
cleanup() {
    json_stop
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
# A private copy: every instance runs the same binary even if the build
# directory is rebuilt meanwhile.
cp "$BIN" "$tmp/amp2dify" || exit 2
BIN=$tmp/amp2dify
SECRET=limits-secret-7
gaps=0

# start NAME [PATH=JSON...] -> sets PORT and SPID
start() {
    local name=$1
    shift
    json set tests/matrix/config.json "$tmp/$name.json" "$@"
    set -- "$name"
    AMP2DIFY_SECRETS=$SECRET DIFY_API_KEY=k DIFY_BASE_URL=http://127.0.0.1:9/v1 \
        AMP2DIFY_LISTEN=127.0.0.1:0 AMP2DIFY_SPOOL="$tmp/$1.db" \
        "$BIN" serve -c "$tmp/$1.json" >/dev/null 2>"$tmp/$1.log" &
    SPID=$!
    pids+=("$SPID")
    PORT=
    for _ in $(seq 1 200); do
        PORT=$(json log-port "$tmp/$1.log")
        [ -n "$PORT" ] && return 0
        sleep 0.05
    done
    echo "limits: amp2dify ($1) did not start" >&2
    cat "$tmp/$1.log" >&2
    exit 1
}
# stop: SIGTERM; the instance must exit 0 with no sanitizer report.
stop() {
    kill -TERM "$SPID" 2>/dev/null
    local rc=0
    wait "$SPID" || rc=$?
    if [ "$rc" != 0 ] || grep -qE 'Sanitizer|runtime error:' "$tmp"/*.log; then
        report clean_stop gap "exit $rc; $(grep -hE -m3 'Sanitizer|runtime error:' "$tmp"/*.log)"
    fi
}
report() { # NAME pass|gap EVIDENCE
    if [ "$2" = pass ]; then echo "PASS $1: $3"; else echo "GAP  $1: $3"; gaps=$((gaps + 1)); fi
}
# post PORT BODYFILE [RESPFILE] -> "status seconds body"
post() {
    local h out=${3:-$tmp/resp}
    mapfile -t h < <(AMP2DIFY_SECRETS=$SECRET "$BIN" sign --secret-env AMP2DIFY_SECRETS "$2")
    curl -sS --max-time 20 --interface 127.0.0.2 -o "$out" -w '%{http_code} %{time_total}' \
        -H 'Content-Type: application/json' -H "${h[0]}" -H "${h[1]}" --data-binary @"$2" \
        "http://127.0.0.1:$1/webhooks/amplitude"
    printf ' %s' "$(head -c 200 "$out")"
}
# metric PORT SERIES: the value of one series of /metrics (empty when absent)
metric() { curl -sS --max-time 5 "http://127.0.0.1:$1/metrics" | awk -v s="$2" '$1 == s {print $2}'; }
# evictions PORT: connections closed to make room (idle and body evictions)
evictions() {
    curl -sS --max-time 5 "http://127.0.0.1:$1/metrics" |
        awk '/^amp2dify_connections_closed_total\{reason="(idle|body)_evicted"\}/ {n += $2} END {print n + 0}'
}
healthy() { [ "$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$1/healthz")" = 200 ]; }
# healthz_timed PORT -> "status seconds" of one GET /healthz (status 000 when unanswered in 2 s)
healthz_timed() { curl -sS -o /dev/null -w '%{http_code} %{time_total}' --max-time 2 "http://127.0.0.1:$1/healthz" 2>/dev/null; }
event() { printf '{"event_type":"Ignored_Limit","user_id":"u","insert_id":"%s"}' "$1"; }
# hold ARGS...: conns.py in the background until unhold; its output in $tmp/conns.out
hold() {
    exec 7> >(exec python3 tests/matrix/conns.py "$@" >"$tmp/conns.out" 2>&1)
    for _ in $(seq 1 300); do grep -q '^open ' "$tmp/conns.out" && return; sleep 0.1; done
}
unhold() { # ends the holder; waits for its last line
    exec 7>&-
    for _ in $(seq 1 100); do grep -q '^closed_by_server' "$tmp/conns.out" && return; sleep 0.1; done
}

# ---- default config ----------------------------------------------------------
start default

big=$(head -c 24576 /dev/zero | tr '\0' a)
ans=$(curl -sS --max-time 10 -o "$tmp/resp" -w '%{http_code}' -H "X-Big: $big" \
    -H 'Content-Type: application/json' --data-binary '{}' "http://127.0.0.1:$PORT/webhooks/amplitude")
body=$(head -c 120 "$tmp/resp")
huge=$(head -c 102400 /dev/zero | tr '\0' a)
ans2=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' -H "X-Big: $huge" "http://127.0.0.1:$PORT/healthz")
counted=$(metric "$PORT" 'amp2dify_http_requests_total{code="431"}')
logged=$(grep -c '"status": *431.*"error": *"headers_too_large"' "$tmp/default.log")
if [ "$ans" = 431 ] && [ "$(json get "$tmp/resp" error 2>/dev/null)" = headers_too_large ] &&
    [ "$ans2" = 431 ] && [ "$counted" = 2 ] && [ "$logged" = 2 ] && healthy "$PORT"; then
    report header_size pass "24 KiB header -> $ans $body; 100 KiB -> $ans2; counted $counted, logged $logged"
else
    report header_size gap "24 KiB header -> $ans $body; 100 KiB -> $ans2; counted ${counted:-0}, logged $logged"
fi

{ printf '{"event_type":"Ignored_Limit","user_id":"u","insert_id":"nest-1","p":'
  head -c 64 /dev/zero | tr '\0' '['; head -c 64 /dev/zero | tr '\0' ']'; printf '}'; } >"$tmp/deep.json"
ans=$(post "$PORT" "$tmp/deep.json")
[[ $ans == 400*invalid_event* ]] && report nesting pass "65 levels -> $ans" || report nesting gap "65 levels -> $ans"

max=$(json get tests/matrix/config.json listen | python3 -c 'import json,sys; print(json.load(sys.stdin).get("max_events_per_request", 2000))')
python3 -c "
import json,sys
n=int(sys.argv[1])
print(json.dumps([{'event_type':'Ignored_Limit','user_id':'u','insert_id':'m%d'%i} for i in range(n)],separators=(',',':')))
" $((max + 1)) >"$tmp/many.json"
ans=$(post "$PORT" "$tmp/many.json")
[[ $ans == 400* ]] && report events_per_request pass "$((max + 1)) events -> $ans" ||
    report events_per_request gap "$((max + 1)) events (limit $max) -> $ans"

{ printf '{"event_type":"Ignored_Limit","user_id":"u","insert_id":"str-1","event_properties":{"s":"'
  head -c 900000 /dev/zero | tr '\0' x; printf '"}}'; } >"$tmp/str.json"
ans=$(post "$PORT" "$tmp/str.json")
[[ $ans == 400* ]] && report string_length pass "900 KB string -> $ans" ||
    report string_length gap "900 KB string -> $ans (no per-string cap; only max_body_bytes bounds it)"

# ---- 1000 idle / half-sent connections ----------------------------------------
# The default per-IP limit (256) already refuses most of a flood from one
# address; with it lifted, all 1000 are held and the sender must still pass.
stop
start flood listen.per_ip_connection_limit=0
event flood-ok >"$tmp/ok.json"
hold "$PORT" 400 300 300 60
opened=$(head -1 "$tmp/conns.out")
ans=$(post "$PORT" "$tmp/ok.json")
secs=$(awk '{print $2}' <<<"$ans")
unhold
if [[ $ans == 202* ]] && awk -v s="$secs" 'BEGIN { exit !(s < 2) }'; then
    report idle_flood pass "$opened; valid request -> $ans (seconds, answer)"
else
    report idle_flood gap "$opened; valid request -> $ans"
fi
# Beyond listen.connection_limit (1024) a valid sender waits in the listen
# backlog until a slot frees: informational, the issue asks for 1000.
hold "$PORT" 1100 0 0 60
opened=$(head -1 "$tmp/conns.out")
code=$(curl -sS -o /dev/null -w '%{http_code} %{time_total}' --max-time 3 --interface 127.0.0.2 \
    "http://127.0.0.1:$PORT/healthz" 2>/dev/null)
unhold
echo "INFO flood_1100: 1100 idle connections ($opened): /healthz -> ${code:-no answer} within 3 s"
stop

# ---- 5000 idle / half-sent connections from 20 addresses -----------------------
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
flood() { # NAME: 5000 held from 20 addresses, a valid sender from 127.0.0.2
    event "$1-ok" >"$tmp/ok.json"
    post "$PORT" "$tmp/ok.json" >/dev/null # warm: the first request's allocations
    # before, after, opened, ans, secs, closed_metric, per_conn: read by the caller
    before=$(rss_kib "$SPID")
    hold "$PORT" 2000 1500 1500 60 20
    opened=$(head -1 "$tmp/conns.out")
    after=$(rss_kib "$SPID")
    event "$1-ok2" >"$tmp/ok.json"
    ans=$(post "$PORT" "$tmp/ok.json")
    secs=$(awk '{print $2}' <<<"$ans")
    closed_metric=$(evictions "$PORT")
    unhold
    per_conn=$(awk -v a="$after" -v b="$before" -v o="$opened" 'BEGIN { split(o, f, " "); n = f[2] > 0 ? f[2] : 1; printf "%.1f", (a - b) / n }')
}
start flood5000
flood flood5000
limit=${RSS_PER_CONN_KIB:-64}
if [[ $opened == "open 5000 refused 0" ]] && [[ $ans == 202* ]] && awk -v s="$secs" 'BEGIN { exit !(s < 1) }' &&
    awk -v p="$per_conn" -v l="$limit" 'BEGIN { exit !(p < l) }'; then
    report flood_5000 pass "$opened from 20 addresses; valid request -> $ans; RSS per idle connection $per_conn KiB"
else
    report flood_5000 gap "$opened from 20 addresses; valid request -> $ans; RSS per idle connection $per_conn KiB (limit $limit)"
fi
echo "RSS per idle connection: $per_conn KiB (server RSS $before -> $after KiB with 5000 held)"
stop

start flood1000 listen.connection_limit=1000
flood flood1000
# The holder may have connected faster than the server accepts (the kernel
# queues them): the evictions then follow a moment later.
for _ in $(seq 1 50); do
    [ "${closed_metric:-0}" -gt 0 ] && break
    sleep 0.1
    closed_metric=$(evictions "$PORT")
done
if [[ $ans == 202* ]] && awk -v s="$secs" 'BEGIN { exit !(s < 1) }' && [ "${closed_metric:-0}" -gt 0 ]; then
    report flood_over_limit pass "limit 1000, 5000 attempted ($opened); valid request -> $ans; idle_evicted $closed_metric"
else
    report flood_over_limit gap "limit 1000, 5000 attempted ($opened); valid request -> $ans; idle_evicted ${closed_metric:-0}"
fi
stop

start slow listen.header_timeout_seconds=2 listen.body_timeout_seconds=3 listen.connection_timeout_seconds=30
hold "$PORT" 0 5 5 10 0 1
sleep 4.5
unhold
line=$(tail -1 "$tmp/conns.out")
[[ $line == "closed_by_server 10" ]] && report slow_deadlines pass "10 connections trickling a byte every 0.5 s for 4.5 s: $line" ||
    report slow_deadlines gap "10 connections trickling a byte every 0.5 s for 4.5 s: $line"
stop

# ---- connection limits and timeout --------------------------------------------
start climit listen.connection_limit=20
hold "$PORT" 20 0 0 30
code=$(healthz_timed "$PORT")
unhold
closed=$(tail -1 "$tmp/conns.out")
if [[ $code == "200 "* ]] && [[ $closed != "closed_by_server 0" ]]; then
    report connection_limit pass "limit 20 with 20 idle held: the 21st -> $code (code, seconds); held ones $closed"
else
    report connection_limit gap "limit 20 with 20 idle held: 21st -> ${code:-no answer}; held ones $closed"
fi
stop

start perip listen.per_ip_connection_limit=5
hold "$PORT" 6 0 0 10
unhold
line=$(head -1 "$tmp/conns.out")
[[ $line == "open 5 refused 1" ]] && report per_ip_limit pass "per-IP limit 5, 6 opened: $line" ||
    report per_ip_limit gap "per-IP limit 5, 6 opened: $line"
stop

start timeout listen.connection_timeout_seconds=2
hold "$PORT" 3 3 3 5
sleep 4.5
unhold
line=$(tail -1 "$tmp/conns.out")
[[ $line == "closed_by_server 9" ]] && report idle_timeout pass "timeout 2 s, 9 stalled connections held 4.5 s: $line" ||
    report idle_timeout gap "timeout 2 s, 9 stalled connections held 4.5 s: $line"
stop

# ---- listen.event_loop poll ----------------------------------------------------
# The HTTP threads wait in poll(2) instead of epoll: the spool's suspend and
# resume, the connection limit and its eviction must hold the same.
start pollloop listen.event_loop='"poll"' listen.connection_limit=20
epolls=$(find "/proc/$SPID/fd" -lname 'anon_inode:\[eventpoll\]' 2>/dev/null | wc -l)
posters=()
for i in $(seq 1 20); do
    printf '{"event_type":"Poll_Burst","user_id":"u%d","insert_id":"poll-%d"}' "$i" "$i" >"$tmp/poll-$i.json"
    post "$PORT" "$tmp/poll-$i.json" "$tmp/poll-$i.resp" >"$tmp/poll-$i.ans" &
    posters+=($!)
done
wait "${posters[@]}"
answered=$(grep -l '^202 ' "$tmp"/poll-*.ans | wc -l)
accepted=$(metric "$PORT" 'amp2dify_events_total{outcome="accepted"}')
hold "$PORT" 20 0 0 30
code=$(healthz_timed "$PORT")
evicted=$(metric "$PORT" 'amp2dify_connections_closed_total{reason="idle_evicted"}')
unhold
evidence="epoll instances $epolls; 20 at once -> $answered answered 202, $accepted accepted; limit 20 with 20 idle held: the 21st -> ${code:-no answer}, idle_evicted ${evicted:-0}"
if [ "$epolls" = 0 ] && [ "$answered" = 20 ] && [ "$accepted" = 20 ] && [[ $code == "200 "* ]] &&
    [ "${evicted:-0}" -ge 1 ]; then
    report poll_event_loop pass "$evidence"
else
    report poll_event_loop gap "$evidence"
fi
stop

echo "limits: $gaps gap(s)"
[ "$gaps" = 0 ]
