#!/usr/bin/env bash
# End to end through the real nginx with docker/nginx/amp2dify.conf.template:
# a signed event sent to nginx reaches the fake Dify once, and amp2dify logs
# the client address nginx saw, not one the client claimed.
#   tests/nginx/run.sh BUILD_DIR     (needs nginx and curl)
set -euo pipefail
BUILD=${1:-build}
BIN=$BUILD/amp2dify
FAKE=$BUILD/fake-dify
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [ ! -x "$NGINX" ]; then
    echo "nginx test: nginx is not installed (apt-get install nginx-light)" >&2
    exit 1
fi

source tests/lib.sh
t_init nginx
fail() { t_fail "$@"; }

dify_port=$(t_free_port)
amp_port=$(t_free_port)
nginx_port=$(t_free_port)

"$FAKE" --port "$dify_port" --key app-nginx-test > "$tmp/fake.out" 2>&1 &
fake_pid=$!
t_track $fake_pid
for _ in $(seq 1 50); do grep -q listening "$tmp/fake.out" && break; sleep 0.1; done

AMP2DIFY_SECRETS=nginx-secret DIFY_API_KEY=app-nginx-test \
DIFY_BASE_URL=http://127.0.0.1:$dify_port/v1 AMP2DIFY_LISTEN=127.0.0.1:$amp_port \
AMP2DIFY_SPOOL=$tmp/spool.db \
    "$BIN" serve -c examples/amp2dify.json 2> "$tmp/amp2dify.log" &
amp_pid=$!
t_track $amp_pid
t_wait_http "http://127.0.0.1:$amp_port/healthz" || fail "amp2dify did not start"

# The checked-in template, with its two variables filled in, inside a
# minimal nginx.conf.
sed -e "s/\${AMP2DIFY_UPSTREAM}/127.0.0.1:$amp_port/" -e "s/\${NGINX_PORT}/127.0.0.1:$nginx_port/" \
    docker/nginx/amp2dify.conf.template > "$tmp/amp2dify.conf"
cat > "$tmp/nginx.conf" <<CONF
worker_processes 1;
pid $tmp/nginx.pid;
error_log $tmp/error.log warn;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $tmp/body;
    proxy_temp_path $tmp/proxy;
    include $tmp/amp2dify.conf;
}
CONF
"$NGINX" -p "$tmp" -c "$tmp/nginx.conf" -t 2> "$tmp/nginx-t.log" || { cat "$tmp/nginx-t.log"; fail "nginx -t"; }
"$NGINX" -p "$tmp" -c "$tmp/nginx.conf"
t_wait_http "http://127.0.0.1:$nginx_port/healthz" || fail "nginx did not proxy /healthz"

body='{"event_type":"Nginx_Test","user_id":"nginx-user","insert_id":"nginx-1","event_properties":{"via":"nginx"}}'
printf '%s' "$body" > "$tmp/event.json"
mapfile -t sig < <(AMP2DIFY_SECRETS=nginx-secret "$BIN" sign --secret-env AMP2DIFY_SECRETS "$tmp/event.json")

# From 127.0.0.2, claiming to be 203.0.113.66: nginx replaces X-Real-IP with
# the address it saw, and amp2dify trusts nginx (127.0.0.1) only.
answer=$(curl -sS --interface 127.0.0.2 -w ' %{http_code}' "http://127.0.0.1:$nginx_port/webhooks/amplitude" \
    -H 'Content-Type: application/json' -H "${sig[0]}" -H "${sig[1]}" \
    -H 'X-Real-IP: 203.0.113.66' -H 'X-Request-Id: nginx-req-1' --data-binary @"$tmp/event.json")
[ "$answer" = '{"accepted":1,"duplicates":0,"filtered":0} 202' ] || fail "answer: $answer"

# An oversized body is refused by nginx itself (client_max_body_size).
big=$(head -c 1100000 /dev/zero | tr '\0' 'a')
code=$(printf '%s' "$big" | curl -sS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$nginx_port/webhooks/amplitude" \
    -H 'Content-Type: application/json' --data-binary @-)
[ "$code" = 413 ] || fail "oversized body answered $code"

for _ in $(seq 1 100); do
    grep -q '"msg":"request","request_id":"nginx-req-1","client":"127.0.0.2","status":202' "$tmp/amp2dify.log" && break
    sleep 0.1
done
grep -q '"request_id":"nginx-req-1","client":"127.0.0.2"' "$tmp/amp2dify.log" ||
    fail "access line with client 127.0.0.2 and request id nginx-req-1 not found"
if grep -q '203.0.113.66' "$tmp/amp2dify.log"; then fail "a client-chosen address was logged"; fi

# Delivered once: stop the fake and read its summary.
for _ in $(seq 1 100); do
    [ "$(sqlite3 "$tmp/spool.db" 'select count(*) from deliveries where state=1' 2>/dev/null || echo 0)" = 1 ] && break
    sleep 0.1
done
kill -TERM "$fake_pid"
wait "$fake_pid" 2>/dev/null || true
grep -q '"delivered":1' "$tmp/fake.out" || fail "fake Dify summary: $(cat "$tmp/fake.out")"
t_stop_clean "$amp_pid" "$tmp/amp2dify.log"
echo "nginx test: signed delivery through nginx ok, client address 127.0.0.2 logged, 413 from nginx"
