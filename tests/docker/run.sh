#!/usr/bin/env bash
# The container's contract without a container engine: run the binary the
# way docker/Dockerfile does (its ENV, docker/amp2dify.json, secrets as
# files, an unprivileged user, the spool in a directory that user owns) and
# check `amp2dify healthcheck` and a signed delivery. Needs root (to drop to
# nobody with setpriv).
#   tests/docker/run.sh BUILD_DIR
set -euo pipefail
BUILD=${1:-build}
source tests/lib.sh
t_init docker
fail() { t_fail "$@"; }
[ "$(id -u)" = 0 ] || { echo "docker test: needs root (setpriv to nobody)" >&2; exit 1; }

dify_port=$(t_free_port)
amp_port=$(t_free_port)
"$BUILD/fake-dify" --port "$dify_port" --key app-docker-key > "$tmp/fake.out" 2>&1 &
fake_pid=$!
t_track $fake_pid

# What the image holds: the binary and the config under root-owned paths,
# the secrets as files, a spool directory owned by the service user.
chmod 755 "$tmp"
install -d -m 0755 "$tmp/etc" "$tmp/bin" "$tmp/run"
install -m 0755 "$BUILD/amp2dify" "$tmp/bin/amp2dify"
sed "s/\"port\": 8080/\"port\": $amp_port/" docker/amp2dify.json > "$tmp/etc/amp2dify.json"
printf 'docker-secret\n' > "$tmp/run/amp2dify_secrets"
printf 'app-docker-key\n' > "$tmp/run/dify_api_key"
chmod 0444 "$tmp/run/"*
install -d -o nobody -g nogroup -m 0750 "$tmp/spool"

# The ENV lines of docker/Dockerfile, pointed at the paths above.
as_service() {
    ${exec_service:+exec} env -i PATH=/usr/bin:/bin \
        AMP2DIFY_CONFIG="$tmp/etc/amp2dify.json" AMP2DIFY_SPOOL="$tmp/spool/spool.db" \
        AMP2DIFY_SECRETS_FILE="$tmp/run/amp2dify_secrets" DIFY_API_KEY_FILE="$tmp/run/dify_api_key" \
        DIFY_BASE_URL="http://127.0.0.1:$dify_port/v1" \
        setpriv --reuid=nobody --regid=nogroup --clear-groups "$tmp/bin/amp2dify" "$@"
}
grep -q '"path": "/var/lib/amp2dify/spool.db"' docker/amp2dify.json || fail "docker config spool path changed"
grep -q 'AMP2DIFY_SPOOL=/var/lib/amp2dify/spool.db' docker/Dockerfile || fail "Dockerfile spool path changed"
grep -qF 'CMD ["amp2dify", "healthcheck"]' docker/Dockerfile || fail "Dockerfile HEALTHCHECK changed"
grep -q '^USER amp2dify' docker/Dockerfile || fail "Dockerfile does not drop root"

as_service healthcheck 2> "$tmp/hc-before.log" && fail "healthcheck passed with no server"
# exec: the background job must be amp2dify itself, so SIGTERM reaches it.
(exec_service=1 as_service serve) 2> "$tmp/amp2dify.log" &
amp_pid=$!
t_track $amp_pid
for _ in $(seq 1 100); do as_service healthcheck 2>/dev/null && break; sleep 0.1; done
as_service healthcheck || fail "healthcheck failed against the running server"
[ "$(stat -c %U "$tmp/spool/spool.db")" = nobody ] || fail "spool not created by the service user"

printf '{"event_type":"Docker_Test","user_id":"d-1","insert_id":"docker-1"}' > "$tmp/event.json"
mapfile -t sig < <(AMP2DIFY_SECRETS_FILE="$tmp/run/amp2dify_secrets" "$BUILD/amp2dify" sign --secret-env AMP2DIFY_SECRETS "$tmp/event.json")
code=$(curl -sS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$amp_port/webhooks/amplitude" \
    -H 'Content-Type: application/json' -H "${sig[0]}" -H "${sig[1]}" --data-binary @"$tmp/event.json")
[ "$code" = 202 ] || fail "signed post answered $code"
for _ in $(seq 1 100); do
    [ "$(curl -fsS "http://127.0.0.1:$amp_port/metrics" | awk '/^amp2dify_spool_pending /{print $2}')" = 0 ] && break
    sleep 0.1
done
t_stop_clean "$amp_pid" "$tmp/amp2dify.log"
kill -TERM "$fake_pid"; wait "$fake_pid" 2>/dev/null || true
grep -q '"delivered":1' "$tmp/fake.out" || fail "fake Dify: $(cat "$tmp/fake.out")"
if grep -q -e docker-secret -e app-docker-key "$tmp/amp2dify.log"; then fail "a secret is in the log"; fi
echo "docker test: image contract ok (nobody, *_FILE secrets, healthcheck, signed delivery)"
