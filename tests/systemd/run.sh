#!/usr/bin/env bash
# examples/systemd/amp2dify.service: systemd accepts it (systemd-analyze
# verify, no warning), its hardening is what it says (the options, by
# tests/systemd/check_unit.py, and systemd-analyze security's exposure at
# most 2.0 "OK"), and the environment it gives the service works with the
# binary: secrets as credential files, the spool in the state directory, run
# as an unprivileged user, with the SIGHUP of ExecReload and the SIGTERM of
# stop. systemd is not running here, so the sandbox itself is not exercised.
# Needs root (setpriv to nobody) and systemd-analyze (Debian package systemd).
#   tests/systemd/run.sh BUILD_DIR
set -euo pipefail
BUILD=${1:-build}
source tests/lib.sh
t_init systemd
fail() { t_fail "$@"; }
UNIT=examples/systemd/amp2dify.service
command -v systemd-analyze > /dev/null || fail "systemd-analyze missing (apt-get install systemd)"
[ "$(id -u)" = 0 ] || fail "needs root (setpriv to nobody)"

python3 tests/systemd/check_unit.py "$UNIT" || fail "hardening options"

# verify checks that ExecStart's binary exists: point it at this build.
bin=$(cd "$BUILD" && pwd)/amp2dify
sed "s|^ExecStart=/usr/local/bin/amp2dify |ExecStart=$bin |" "$UNIT" > "$tmp/amp2dify.service"
grep -q "^ExecStart=$bin serve" "$tmp/amp2dify.service" || fail "ExecStart not rewritten"
systemd-analyze verify "$tmp/amp2dify.service" > "$tmp/verify.out" 2>&1 \
    || fail "systemd-analyze verify: $(cat "$tmp/verify.out")"
[ ! -s "$tmp/verify.out" ] || fail "systemd-analyze verify warns: $(cat "$tmp/verify.out")"
systemd-analyze security --offline=yes --threshold=20 "$tmp/amp2dify.service" \
    > "$tmp/security.out" 2>&1 || fail "exposure over 2.0: $(tail -3 "$tmp/security.out")"
exposure=$(grep -o 'exposure level for amp2dify.service: [0-9.]*' "$tmp/security.out" | awk '{print $NF}')
[ -n "$exposure" ] || fail "no exposure level: $(tail -3 "$tmp/security.out")"

# The service's environment (credentials in place of %d) with the binary,
# as an unprivileged user, the way ExecStart runs it.
chmod 755 "$tmp"
install -d -m 0755 "$tmp/creds" "$tmp/etc"
printf 'systemd-secret\n' > "$tmp/creds/amp2dify_secrets"
printf 'app-systemd-key\n' > "$tmp/creds/dify_api_key"
chmod 0444 "$tmp/creds/"*
install -d -o nobody -g nogroup -m 0700 "$tmp/state"
dify_port=$(t_free_port)
amp_port=$(t_free_port)
sed -e "s/\"port\": 8080/\"port\": $amp_port/" -e 's/"address": "0.0.0.0"/"address": "127.0.0.1"/' \
    examples/amp2dify.json > "$tmp/etc/amp2dify.json"
mapfile -t unit_env < <(python3 tests/systemd/check_unit.py "$UNIT" --env "$tmp/creds" |
    sed "s|/var/lib/amp2dify|$tmp/state|")
"$BUILD/fake-dify" --port "$dify_port" --key app-systemd-key > "$tmp/fake.out" 2>&1 &
t_track $!
as_service() {
    ${exec_service:+exec} env -i PATH=/usr/bin:/bin "${unit_env[@]}" \
        DIFY_BASE_URL="http://127.0.0.1:$dify_port/v1" \
        setpriv --reuid=nobody --regid=nogroup --clear-groups "$bin" "$@"
}
as_service check-config -c "$tmp/etc/amp2dify.json" > "$tmp/check.out" 2>&1 \
    || fail "check-config with the unit's environment: $(cat "$tmp/check.out")"
(cd "$tmp/state" && exec_service=1 as_service serve -c "$tmp/etc/amp2dify.json") 2> "$tmp/amp2dify.log" &
amp_pid=$!
t_track $amp_pid
t_wait_http "http://127.0.0.1:$amp_port/readyz" || fail "amp2dify did not get ready"
[ -f "$tmp/state/spool.db" ] || fail "the spool is not in the state directory"
[ "$(stat -c %U "$tmp/state/spool.db")" = nobody ] || fail "spool not owned by the service user"
kill -HUP "$amp_pid" # ExecReload
for _ in $(seq 1 50); do grep -q '"config reloaded"' "$tmp/amp2dify.log" && break; sleep 0.1; done
grep -q '"config reloaded"' "$tmp/amp2dify.log" || fail "SIGHUP did not reload"
t_stop_clean "$amp_pid" "$tmp/amp2dify.log"
if grep -q -e systemd-secret -e app-systemd-key "$tmp/amp2dify.log"; then fail "a secret is in the log"; fi
echo "systemd test: unit verified, exposure $exposure, service environment ok"
