#!/usr/bin/env bash
# Signals: SIGHUP with a good config takes effect for new requests; SIGHUP
# with a bad one is rejected with its errors logged and the old config keeps
# serving; SIGTERM under load answers what it accepted, exits 0, and after a
# restart every accepted event reaches Dify.
#   tests/signals/run.sh BUILD_DIR
set -euo pipefail
BUILD=${1:-build}
BIN=$BUILD/amp2dify
FAKE=$BUILD/fake-dify

source tests/lib.sh
t_init signals
fail() { t_fail "$@"; }

dify_port=$(t_free_port)
amp_port=$(t_free_port)
base=http://127.0.0.1:$amp_port
# A rotation list written loosely: `sign` must read it as `serve` does
# (blanks trimmed; it signs with the first secret).
export AMP2DIFY_SECRETS=" signals-secret , signals-old" DIFY_API_KEY=app-signals
export DIFY_BASE_URL=http://127.0.0.1:$dify_port/v1 AMP2DIFY_LISTEN=127.0.0.1:$amp_port
export AMP2DIFY_SPOOL=$tmp/spool.db

"$FAKE" --port "$dify_port" --key app-signals > "$tmp/fake.out" 2>&1 &
fake_pid=$!
t_track $fake_pid

write_config() { # query-template
    cat > "$tmp/config.json" <<CONF
{"listen": {"address": "127.0.0.1", "port": $amp_port},
 "dify": {"retry": {"initial_ms": 50, "max_ms": 200}},
 "apps": {"a": {"api_key_env": "DIFY_API_KEY"}},
 "routes": [{"name": "all", "app": "a", "query": "$1", "user": "{{user_id}}"}]}
CONF
}
start() { # log name
    "$BIN" serve -c "$tmp/config.json" 2>> "$tmp/$1" &
    amp_pid=$!
    t_track $amp_pid
    t_wait_http "$base/healthz" || fail "amp2dify did not start"
}
post() { # insert-id ; prints the HTTP status
    local body="{\"event_type\":\"E\",\"user_id\":\"u\",\"insert_id\":\"$1\"}"
    printf '%s' "$body" > "$tmp/ev-$1.json"
    mapfile -t sig < <("$BIN" sign --secret-env AMP2DIFY_SECRETS "$tmp/ev-$1.json")
    curl -sS -o /dev/null -w '%{http_code}' --max-time 10 "$base/webhooks/amplitude" \
        -H 'Content-Type: application/json' -H "${sig[0]}" -H "${sig[1]}" \
        --data-binary @"$tmp/ev-$1.json" 2>/dev/null || true # -w prints 000 on failure
}

write_config "first {{event_type}}"
start amp2dify.log

# SIGHUP, good config: the new query template is used for new events.
[ "$(post before-reload)" = 202 ] || fail "post before reload"
write_config "second {{event_type}}"
kill -HUP "$amp_pid"
for _ in $(seq 1 50); do grep -q '"msg":"config reloaded"' "$tmp/amp2dify.log" && break; sleep 0.1; done
grep -q '"msg":"config reloaded"' "$tmp/amp2dify.log" || fail "no 'config reloaded' line"
[ "$(post after-reload)" = 202 ] || fail "post after reload"

# SIGHUP, bad config: rejected with the JSON path, old config still serves.
printf '{"apps": {"a": {"api_key_env": "DIFY_API_KEY"}}, "routes": [{"name": "x", "app": "missing"}], "bogus": 1}' > "$tmp/config.json"
kill -HUP "$amp_pid"
for _ in $(seq 1 50); do grep -q '"msg":"reload rejected"' "$tmp/amp2dify.log" && break; sleep 0.1; done
grep -q '"msg":"reload rejected".*bogus: found an unknown key' "$tmp/amp2dify.log" || fail "bad config not rejected with its path"
grep -q '"msg":"reload rejected".*routes\[0\]' "$tmp/amp2dify.log" || fail "route error not logged"
[ "$(post after-bad-reload)" = 202 ] || fail "post after rejected reload"
# A change that needs a restart is refused too.
write_config "second {{event_type}}"
sed -i 's/"address": "127.0.0.1"/"address": "127.0.0.1", "threads": 3/' "$tmp/config.json"
kill -HUP "$amp_pid"
for _ in $(seq 1 50); do grep -q '"changed":"listen' "$tmp/amp2dify.log" && break; sleep 0.1; done
grep -q '"changed":"listen' "$tmp/amp2dify.log" || fail "restart-only change not refused"
write_config "second {{event_type}}"

# SIGTERM under load: 4 senders; every 202 is a promise.
: > "$tmp/accepted"
sender() { # id
    for i in $(seq 1 400); do
        code=$(post "load-$1-$i")
        [ "$code" = 202 ] && echo "load-$1-$i" >> "$tmp/accepted"
        [ "$code" = 000 ] && break
    done
}
for s in 1 2 3 4; do sender "$s" & done
sleep 1.5
kill -TERM "$amp_pid"
rc=0; wait "$amp_pid" || rc=$?
[ "$rc" = 0 ] || fail "exit status $rc after SIGTERM"
wait $(jobs -p | grep -v "^$fake_pid$") 2>/dev/null || true
accepted=$(sort -u "$tmp/accepted" | wc -l)
[ "$accepted" -gt 0 ] || fail "nothing was accepted under load"
grep -q '"msg":"stopped"' "$tmp/amp2dify.log" || fail "no 'stopped' line"

start amp2dify-2.log
total=$((accepted + 3))   # + the three posts before the load
for _ in $(seq 1 150); do
    pending=$(curl -fsS "$base/metrics" | awk '/^amp2dify_spool_pending /{print $2}')
    [ "$pending" = 0 ] && break
    sleep 0.1
done
[ "$pending" = 0 ] || fail "still $pending pending after restart"
kill -TERM "$amp_pid"; wait "$amp_pid" || fail "second run exit status"
kill -TERM "$fake_pid"; wait "$fake_pid" 2>/dev/null || true
delivered=$(grep -o '"delivered":[0-9]*' "$tmp/fake.out" | cut -d: -f2)
[ "$delivered" -ge "$total" ] || fail "delivered $delivered < accepted $total"
# Each event was mapped under the config current when it arrived.
q() { sqlite3 "$tmp/spool.db" "select json_extract(body, '$.query') from deliveries where dedupe_key = '$1'"; }
[ "$(q before-reload)" = "first E" ] || fail "before reload: $(q before-reload)"
[ "$(q after-reload)" = "second E" ] || fail "after reload: $(q after-reload)"
[ "$(q after-bad-reload)" = "second E" ] || fail "after rejected reload: $(q after-bad-reload)"
if grep -q 'Sanitizer' "$tmp"/amp2dify*.log; then fail "sanitizer report"; fi
# Every log line is one JSON object with ts, level and msg, and no secret.
python3 - "$tmp"/amp2dify*.log <<'PY' || fail "log lines are not all JSON objects with ts/level/msg"
import json, sys
n = 0
for path in sys.argv[1:]:
    for line in open(path, encoding="utf-8"):
        obj = json.loads(line)
        assert isinstance(obj, dict) and {"ts", "level", "msg"} <= obj.keys(), line
        n += 1
assert n > 10, n
PY
if grep -qF -e signals-secret -e signals-old -e "$DIFY_API_KEY" "$tmp"/amp2dify*.log; then fail "a secret is in the log"; fi
echo "signals test: SIGHUP good/bad/restart-only ok; SIGTERM under load: $accepted accepted, $delivered delivered in total (>= $total)"
