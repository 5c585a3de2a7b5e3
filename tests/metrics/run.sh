#!/usr/bin/env bash
# /metrics is valid Prometheus text format (promtool check metrics), has the
# families the README lists, counts what happened, and never shows a secret;
# the Grafana dashboard (docker/grafana/amp2dify.json) names only its series.
#   tests/metrics/run.sh BUILD_DIR     (needs promtool: Debian package prometheus)
set -euo pipefail
BUILD=${1:-build}
BIN=$BUILD/amp2dify
FAKE=$BUILD/fake-dify
PROMTOOL=$(command -v promtool || true)
[ -n "$PROMTOOL" ] || { echo "metrics test: promtool missing (apt-get install prometheus)" >&2; exit 1; }

source tests/lib.sh
t_init metrics
fail() { t_fail "$@"; }

dify_port=$(t_free_port)
amp_port=$(t_free_port)
secret='metrics-secret-5f3a'
key='app-metrics-key-9c1d'
"$FAKE" --port "$dify_port" --key "$key" > "$tmp/fake.out" 2>&1 &
t_track $!
AMP2DIFY_SECRETS=$secret DIFY_API_KEY=$key DIFY_BASE_URL=http://127.0.0.1:$dify_port/v1 \
AMP2DIFY_LISTEN=127.0.0.1:$amp_port AMP2DIFY_SPOOL=$tmp/spool.db \
    "$BIN" serve -c examples/amp2dify.json 2> "$tmp/amp2dify.log" &
amp_pid=$!
t_track $amp_pid
base=http://127.0.0.1:$amp_port
t_wait_http "$base/healthz" || fail "amp2dify did not start"

printf '%s' '[{"event_type":"A","user_id":"u1","insert_id":"m1"},{"event_type":"B","user_id":"u2","insert_id":"m2"}]' > "$tmp/ev.json"
mapfile -t sig < <(AMP2DIFY_SECRETS=$secret "$BIN" sign --secret-env AMP2DIFY_SECRETS "$tmp/ev.json")
post() { curl -sS -o /dev/null -w '%{http_code}' "$base/webhooks/amplitude" -H 'Content-Type: application/json' "$@"; }
[ "$(post -H "${sig[0]}" -H "${sig[1]}" --data-binary @"$tmp/ev.json")" = 202 ] || fail "signed post"
[ "$(post -H "${sig[0]}" -H "${sig[1]}" --data-binary @"$tmp/ev.json")" = 202 ] || fail "replayed post"
[ "$(post -H "${sig[0]}" -H 'X-Amplitude-Sig: sha256=00' --data-binary @"$tmp/ev.json")" = 401 ] || fail "bad sig"
[ "$(post --data-binary '{}')" = 401 ] || fail "unsigned"
sleep 0.5

curl -fsS -D "$tmp/headers" "$base/metrics" > "$tmp/metrics.txt"
grep -qi '^content-type: text/plain; version=0.0.4' "$tmp/headers" || fail "content type: $(cat "$tmp/headers")"
"$PROMTOOL" check metrics < "$tmp/metrics.txt" || fail "promtool check metrics"
expect() { grep -qF -- "$1" "$tmp/metrics.txt" || fail "missing line: $1"; }
expect 'amp2dify_http_requests_total{code="202"} 2'
expect 'amp2dify_http_requests_total{code="401"} 2'
expect 'amp2dify_auth_failures_total{reason="malformed"} 1'
expect 'amp2dify_auth_failures_total{reason="missing"} 1'
expect 'amp2dify_events_total{outcome="accepted"} 2'
expect 'amp2dify_events_total{outcome="duplicate"} 2'
expect '# TYPE amp2dify_ingest_duration_seconds histogram'
expect 'amp2dify_ingest_duration_seconds_count 4'
expect '# TYPE amp2dify_spool_pending gauge'
expect '# TYPE amp2dify_spool_oldest_pending_age_seconds gauge'
expect 'amp2dify_spool_full 0'
grep -qE '^amp2dify_spool_bytes [1-9][0-9]*$' "$tmp/metrics.txt" || fail "amp2dify_spool_bytes missing or 0"
if grep -qF -e "$secret" -e "$key" "$tmp/metrics.txt" "$tmp/amp2dify.log"; then fail "a secret leaked"; fi
# Ingest durations are observed to the microsecond: whole milliseconds (a
# difference of two readings) are up to 1 ms off, and most answers take
# 1-3 ms. A sum is a whole number of milliseconds by chance about once in a
# thousand; then one more request, at most twice.
sum_us() { awk '$1 == "amp2dify_ingest_duration_seconds_sum" { printf "%.0f", $2 * 1e6 }' "$@"; }
us=$(sum_us "$tmp/metrics.txt")
for _ in 1 2; do
    ((us % 1000)) && break
    post --data-binary '{}' > /dev/null
    us=$(curl -fsS "$base/metrics" | sum_us)
done
((us % 1000)) || fail "ingest durations in whole milliseconds (sum $us us)"
# The Grafana dashboard names only what this scrape has, in valid PromQL.
python3 tests/metrics/dashboard.py docker/grafana/amp2dify.json "$tmp/metrics.txt" "$tmp/rules.yml" \
    || fail "docker/grafana/amp2dify.json does not match /metrics"
"$PROMTOOL" check rules "$tmp/rules.yml" > "$tmp/rules.out" 2>&1 \
    || fail "dashboard expressions do not parse: $(cat "$tmp/rules.out")"
t_stop_clean "$amp_pid" "$tmp/amp2dify.log"
echo "metrics test: promtool ok, $(grep -c '^amp2dify_' "$tmp/metrics.txt") samples"
