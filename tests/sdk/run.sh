#!/usr/bin/env bash
# The SDK-compatible endpoint (sources.sdk, POST /2/httpapi) with Amplitude's
# real Node SDK, @amplitude/analytics-node from npm, pointed at amp2dify
# (serverUrl): every track() reports code 200, each event reaches Dify once
# (a second send of the same insert_ids stores nothing), a wrong api_key is
# "Invalid API key" and nothing is stored. Then Amplitude's answer shapes
# with curl: missing api_key, events listed by field, 413 (too many events;
# a body over the cap, refused before it is sent). With
# sources.sdk.tee, every accepted event is also sent on to a fake Amplitude
# (build/fake-amplitude, HTTP V2, answering 500 once and 429 for one user
# first): each exactly once, as the SDK sent it, refused ones never.
#   tests/sdk/run.sh BUILD_DIR
# Needs node and npm (Debian: nodejs npm). The SDK is installed once into
# BUILD_DIR/sdk-node; when npm cannot reach its registry the test is skipped
# with a message saying so.
set -euo pipefail
BUILD=${1:-build}
BIN=$BUILD/amp2dify
FAKE=$BUILD/fake-dify
FAKE_AMP=$BUILD/fake-amplitude
SDK_VERSION=1.5.73
command -v node > /dev/null && command -v npm > /dev/null ||
    { echo "sdk test: node and npm are required (apt-get install nodejs npm)" >&2; exit 1; }

source tests/lib.sh
t_init sdk
fail() { t_fail "$@"; }

modules=$BUILD/sdk-node
if [ ! -f "$modules/node_modules/@amplitude/analytics-node/package.json" ]; then
    mkdir -p "$modules"
    if ! (cd "$modules" && timeout 300 npm install --no-audit --no-fund --loglevel=error \
            "@amplitude/analytics-node@$SDK_VERSION" > "$tmp/npm.out" 2>&1); then
        echo "sdk test SKIPPED: npm could not install @amplitude/analytics-node@$SDK_VERSION" \
             "(registry unreachable?): $(tail -n 3 "$tmp/npm.out")" >&2
        exit 0
    fi
fi
export NODE_PATH=$PWD/$modules/node_modules

dify_port=$(t_free_port)
amp_port=$(t_free_port)
key='app-sdk-key-3e1f'
"$FAKE" --port "$dify_port" --key "$key" > "$tmp/fake.log" 2>&1 &
fake_pid=$!
t_track $fake_pid
ampl_port=$(t_free_port)
"$FAKE_AMP" --port "$ampl_port" --key amp-http-key-5c1d --push-status 500 \
    --throttle-user sdk-user-1 --events-out "$tmp/amplitude.json" > "$tmp/fake-amplitude.log" 2>&1 &
ampl_pid=$!
t_track $ampl_pid
cat > "$tmp/amp2dify.json" <<JSON
{
  "listen": {"address": "127.0.0.1", "port": $amp_port, "max_events_per_request": 50},
  "spool": {"path": "$tmp/spool.db"},
  "dify": {"base_url": "http://127.0.0.1:$dify_port/v1"},
  "sources": {"sdk": {"enabled": true, "tee": true}},
  "reports": {"base_url": "http://127.0.0.1:$ampl_port", "linger_ms": 50, "throttle_ms": 300},
  "apps": {"support": {"api_key_env": "DIFY_API_KEY", "endpoint": "chat"}},
  "routes": [{"name": "all", "app": "support", "query": "{{event_type}} {{event_properties.step}}",
              "user": "{{user_id}}"}]
}
JSON
AMP2DIFY_SECRETS=unused-webhook-secret AMP2DIFY_SDK_API_KEYS='other-key, sdk-key-7a2b' \
AMPLITUDE_API_KEY=amp-http-key-5c1d DIFY_API_KEY=$key "$BIN" serve -c "$tmp/amp2dify.json" 2> "$tmp/amp2dify.log" &
amp_pid=$!
t_track $amp_pid
base=http://127.0.0.1:$amp_port
t_wait_http "$base/healthz" || fail "amp2dify did not start"

delivered() {
    curl -fsS "$base/metrics" | awk '/^amp2dify_deliveries_total\{.*outcome="delivered"/ {s += $2} END {print s + 0}'
}

node tests/sdk/send.js "$base/2/httpapi" sdk-key-7a2b 20 run1 > "$tmp/send1.out" 2> "$tmp/send1.log" ||
    fail "the SDK run failed"
[ "$(grep -c '"code":200' "$tmp/send1.out")" = 20 ] || fail "not 20 successes: $(cat "$tmp/send1.out")"
for _ in $(seq 1 100); do [ "$(delivered)" -ge 20 ] && break; sleep 0.1; done
[ "$(delivered)" = 20 ] || fail "delivered $(delivered), expected 20"

# The same insert_ids again: answered 200, stored nothing.
node tests/sdk/send.js "$base/2/httpapi" sdk-key-7a2b 20 run1 > "$tmp/send2.out" 2> "$tmp/send2.log" ||
    fail "the second SDK run failed"
[ "$(grep -c '"code":200' "$tmp/send2.out")" = 20 ] || fail "resend: $(cat "$tmp/send2.out")"
metrics=$(curl -fsS "$base/metrics")
grep -qF 'amp2dify_events_total{outcome="duplicate"} 20' <<< "$metrics" ||
    fail "the resent events were not counted as duplicates"

# A key amp2dify does not know: Amplitude's answer, which the SDK does not retry.
node tests/sdk/send.js "$base/2/httpapi" wrong-key 3 run2 > "$tmp/send3.out" 2> "$tmp/send3.log" ||
    fail "the wrong-key SDK run failed"
[ "$(grep '"code":400,' "$tmp/send3.out" | grep -c 'Invalid API key')" = 3 ] ||
    fail "wrong key: $(cat "$tmp/send3.out")"

# Answer shapes, as Amplitude's HTTP V2 API gives them.
post() { curl -sS -o "$tmp/body" -w '%{http_code}' "$base/2/httpapi" -H 'Content-Type: application/json' "$@"; }
check() { # want_status python_condition_on_b
    python3 -c "import json,sys; b=json.load(open('$tmp/body')); sys.exit(0 if ($2) else 1)" ||
        fail "answer $(cat "$tmp/body") does not satisfy: $2"
}
[ "$(post --data-binary '{"events":[{"event_type":"a","user_id":"u"}]}')" = 400 ] || fail "no api_key"
check 400 "b == {'code': 400, 'error': 'Request missing required field', 'missing_field': 'api_key'}"
[ "$(post --data-binary '{"api_key":"sdk-key-7a2b","events":[{"event_type":"a","user_id":"u"},{"user_id":"u"},{"event_type":"b","user_id":"u","time":"yesterday"},{"event_type":"c"}]}')" = 400 ] ||
    fail "bad events"
check 400 "b['code'] == 400 and b['events_with_missing_fields'] == {'event_type': [1], 'device_id': [3]} and b['events_with_invalid_fields'] == {'time': [2]}"
many=$(python3 -c "import json; print(json.dumps({'api_key':'sdk-key-7a2b','events':[{'event_type':'x','user_id':'u%d' % i} for i in range(51)]}))")
[ "$(post --data-binary "$many")" = 413 ] || fail "51 events"
check 413 "b == {'code': 413, 'error': 'Payload too large'}"
# Over listen.max_body_bytes (1 MiB by default): refused on its Content-Length,
# before the body is sent (curl waits for "100 Continue" and uploads nothing).
python3 -c "print('{\"api_key\":\"sdk-key-7a2b\",\"pad\":\"' + 'x' * 1100000 + '\"}')" > "$tmp/big.json"
got=$(curl -sS -o "$tmp/body" -w '%{http_code} %{size_upload}' "$base/2/httpapi" --expect100-timeout 5 \
    -H 'Content-Type: application/json' -H 'Expect: 100-continue' --data-binary @"$tmp/big.json")
[ "$got" = "413 0" ] || fail "a body over max_body_bytes: status and bytes uploaded '$got', want '413 0'"
check 413 "b == {'code': 413, 'error': 'Payload too large'}"
[ "$(post --data-binary 'not json')" = 400 ] || fail "not json"
check 400 "b['code'] == 400 and 'error' in b"
[ "$(post --data-binary '{"api_key":"sdk-key-7a2b","events":[{"event_type":"ok","user_id":"u9","insert_id":"curl-1"}]}')" = 200 ] ||
    fail "one good event"
check 200 "b['code'] == 200 and b['events_ingested'] == 1 and b['payload_size_bytes'] > 0 and b['server_upload_time'] > 1700000000000"
for _ in $(seq 1 100); do [ "$(delivered)" -ge 21 ] && break; sleep 0.1; done
teed() {
    curl -fsS "$base/metrics" | awk '/^amp2dify_reports_total\{.*outcome="ingested"/ {s += $2} END {print s + 0}'
}
for _ in $(seq 1 150); do [ "$(teed)" -ge 21 ] && break; sleep 0.1; done

t_stop_clean "$amp_pid" "$tmp/amp2dify.log"
kill -TERM "$ampl_pid"
wait "$ampl_pid" || fail "fake-amplitude failed: $(cat "$tmp/fake-amplitude.log")"
grep -q '"duplicates":0' "$tmp/fake-amplitude.log" || fail "Amplitude got repeats: $(cat "$tmp/fake-amplitude.log")"
python3 - "$tmp/amplitude.json" <<'PY' || fail "the events sent on to Amplitude: $(cat "$tmp/amplitude.json")"
import json, sys
evs = json.load(open(sys.argv[1]))
ids = sorted(e["insert_id"] for e in evs)
want = sorted(["run1-%d" % i for i in range(20)] + ["curl-1"])
assert ids == want, ids
for e in evs:
    assert isinstance(e["event_type"], str) and isinstance(e["user_id"], str), e
    if e["insert_id"].startswith("run1-"):
        assert isinstance(e["time"], int), e
        i = int(e["insert_id"][5:])
        assert e["user_id"] == "sdk-user-%d" % (i % 4), e
        assert e["event_type"] == "sdk_event_%d" % (i % 3), e
        assert e["event_properties"] == {"step": i}, e
PY
kill -TERM "$fake_pid"
wait "$fake_pid" || true
grep -q '"delivered":21' "$tmp/fake.log" || fail "Dify got: $(tail -n 1 "$tmp/fake.log"), expected 21 deliveries"
echo "sdk test: @amplitude/analytics-node $SDK_VERSION: 20 events reported 200 and delivered once, resend stored nothing, answers in Amplitude's shapes; the tee sent 21 events on to Amplitude once each through a 500 and a 429"
