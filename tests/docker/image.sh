#!/usr/bin/env bash
# The container image for real (`make image-test`, not part of `make test`):
# build docker/Dockerfile with podman (no Docker daemon) on a Debian base made
# here with debootstrap, then run it as a user would:
#   - as its unprivileged user (uid 10001), secrets as files under
#     /run/secrets, the spool on a named volume, --ulimit nofile=4096
#   - the image's HEALTHCHECK is `amp2dify healthcheck` and passes
#   - a signed event reaches the fake Dify (build/fake-dify on the host)
#   - with Dify down, an event is stored; SIGTERM: exit 0 within the grace;
#     a new container on the same volume delivers it once Dify is back
#   - the compose file's nginx template, run by the host's nginx, in front
# Prints the image's size. Needs root, podman, buildah, runc, debootstrap,
# nginx, curl (.ci/run installs them).
#   tests/docker/image.sh BUILD_DIR
#
# The base: docker.io/library/debian:bookworm-slim, made once with
# `debootstrap --variant=minbase bookworm` and trimmed the way the official
# slim image is (no docs, man pages or locales; apt lists and caches
# removed), cached as BUILD_DIR/image/bookworm-slim.tar and imported into
# podman's store when missing there.
set -euo pipefail
BUILD=${1:-build}
source tests/lib.sh
t_init image
fail() { t_fail "$@"; }
[ "$(id -u)" = 0 ] || { echo "image test: needs root" >&2; exit 1; }
for tool in podman debootstrap runc nginx curl; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] ||
        { echo "image test: $tool missing (apt-get install podman buildah debootstrap runc nginx-light curl)" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
# crun's cgroup handling and the default ulimits are refused on these
# machines: runc, cgroupfs and explicit limits.
pm() { podman --runtime runc --cgroup-manager cgroupfs "$@"; }
BASE=docker.io/library/debian:bookworm-slim
TAG=localhost/amp2dify:image-test
name=amp2dify-image-test-$$
vol=amp2dify-image-test-$$
GRACE=20

cleanup_image() {
    pm rm -f "$name" "$name-2" "$name-3" >/dev/null 2>&1 || true
    pm volume rm -f "$vol" >/dev/null 2>&1 || true
    t_cleanup
}
trap cleanup_image EXIT

# ---- the base image -----------------------------------------------------------
base_tar=$BUILD/image/bookworm-slim.tar
if ! pm image exists "$BASE"; then
    if [ ! -s "$base_tar" ]; then
        mkdir -p "$BUILD/image"
        # Outside BUILD: make reads every *.d under build/ as a dependency file.
        root=$(mktemp -d /var/tmp/amp2dify-rootfs-XXXXXX)
        echo "image test: debootstrap bookworm (once; cached in $base_tar)"
        debootstrap --variant=minbase bookworm "$root" >"$tmp/debootstrap.log" 2>&1 ||
            { rm -rf "$root"; fail "debootstrap failed"; }
        cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/info/*
EOF
        printf '%s\n' 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };' \
            'Binary::apt::APT::Keep-Downloaded-Packages "false";' >"$root/etc/apt/apt.conf.d/docker-clean"
        find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
        rm -rf "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/usr/share/info/* \
            "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
        tar -C "$root" -cf "$base_tar.tmp" . && mv "$base_tar.tmp" "$base_tar"
        rm -rf "$root"
    fi
    pm import "$base_tar" "$BASE" >"$tmp/import.log" 2>&1 || fail "podman import of $base_tar"
fi

# ---- build ------------------------------------------------------------------------
start=$(date +%s)
pm build --isolation chroot --pull=never --network host --format docker \
    -f docker/Dockerfile -t "$TAG" . >"$tmp/build.log" 2>&1 || fail "podman build (see build.log)"
built_s=$(( $(date +%s) - start ))
size=$(pm image inspect "$TAG" --format '{{.Size}}')
base_size=$(pm image inspect "$BASE" --format '{{.Size}}')
hc=$(pm image inspect "$TAG" --format '{{json .Config.Healthcheck.Test}}')
[ "$hc" = '["CMD","amp2dify","healthcheck"]' ] || fail "HEALTHCHECK is $hc"
[ "$(pm image inspect "$TAG" --format '{{.Config.User}}')" = amp2dify ] || fail "the image does not run as amp2dify"

# ---- run ------------------------------------------------------------------------------
dify_port=$(t_free_port)
amp_port=$(t_free_port)
nginx_port=$(t_free_port)
key=app-image-key-7d2e
secret=image-secret-41c9
install -d -m 0755 "$tmp/secrets"
printf '%s\n' "$secret" >"$tmp/secrets/amp2dify_secrets"
printf '%s\n' "$key" >"$tmp/secrets/dify_api_key"
chmod 0444 "$tmp/secrets/"*
pm volume create "$vol" >/dev/null

start_fake() { # OUT
    "$BUILD/fake-dify" --port "$dify_port" --key "$key" >"$1" 2>&1 &
    fake_pid=$!
    t_track $fake_pid
    for _ in $(seq 1 50); do grep -q listening "$1" && return; sleep 0.1; done
    fail "fake Dify did not start"
}
stop_fake() { # OUT: sets delivered, the count of deliveries it saw
    kill -TERM "$fake_pid"
    wait "$fake_pid" 2>/dev/null || true
    delivered=$(sed -n 's/.*"delivered":\([0-9]*\).*/\1/p' "$1")
}
run_container() { # NAME
    pm run -d --name "$1" --network host --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
        -v "$vol:/var/lib/amp2dify" -v "$tmp/secrets:/run/secrets:ro" \
        -e AMP2DIFY_LISTEN="127.0.0.1:$amp_port" -e DIFY_BASE_URL="http://127.0.0.1:$dify_port/v1" \
        "$TAG" >/dev/null 2>"$tmp/run-$1.err" || fail "podman run: $(cat "$tmp/run-$1.err")"
    t_wait_http "http://127.0.0.1:$amp_port/readyz" || { pm logs "$1" >"$tmp/$1.log" 2>&1; fail "$1 not ready"; }
}
# stop_container NAME: SIGTERM (the image's STOPSIGNAL); exit 0 within GRACE.
stop_container() {
    local t0 t1
    t0=$(date +%s%N)
    pm stop -t "$GRACE" "$1" >/dev/null 2>>"$tmp/podman.err"
    t1=$(date +%s%N)
    pm logs "$1" >"$tmp/$1.log" 2>&1
    stop_ms=$(( (t1 - t0) / 1000000 ))
    local rc
    rc=$(pm inspect "$1" --format '{{.State.ExitCode}}')
    [ "$rc" = 0 ] || fail "$1 exited $rc after SIGTERM"
    [ "$stop_ms" -lt $((GRACE * 1000)) ] || fail "$1 took ${stop_ms} ms to stop (grace ${GRACE} s)"
    grep -q '"msg":"stopped"' "$tmp/$1.log" || fail "$1 did not log its clean stop"
}
post() { # FILE [PORT]: the status code of a signed POST
    local h
    mapfile -t h < <(AMP2DIFY_SECRETS=$secret "$BUILD/amp2dify" sign --secret-env AMP2DIFY_SECRETS "$1")
    curl -sS -o /dev/null -w '%{http_code}' --max-time 10 "http://127.0.0.1:${2:-$amp_port}/webhooks/amplitude" \
        -H 'Content-Type: application/json' -H "${h[0]}" -H "${h[1]}" --data-binary @"$1"
}
metric() { # NAME: its value on /metrics
    curl -fsS --max-time 5 "http://127.0.0.1:$amp_port/metrics" | awk -v m="$1" '$1 == m {print $2}'
}
wait_pending() { # N: up to 30 s for amp2dify_spool_pending == N
    for _ in $(seq 1 300); do [ "$(metric amp2dify_spool_pending)" = "$1" ] && return 0; sleep 0.1; done
    return 1
}

start_fake "$tmp/fake1.out"
run_container "$name"
cpid=$(pm inspect "$name" --format '{{.State.Pid}}')
[ "$(stat -c %u "/proc/$cpid")" = 10001 ] || fail "the server runs as uid $(stat -c %u "/proc/$cpid"), not 10001"
pm healthcheck run "$name" >/dev/null 2>>"$tmp/podman.err" || fail "the HEALTHCHECK failed on a running server"
pm exec "$name" sh -c 'stat -c %U /var/lib/amp2dify/spool.db' | grep -qx amp2dify || fail "spool not owned by amp2dify"

printf '{"event_type":"Image_Test","user_id":"i-1","insert_id":"image-1"}' >"$tmp/e1.json"
[ "$(post "$tmp/e1.json")" = 202 ] || fail "signed post not accepted"
wait_pending 0 || fail "event 1 not delivered"

# The compose file's nginx template in front, on the host's nginx.
sed -e "s/\${AMP2DIFY_UPSTREAM}/127.0.0.1:$amp_port/" -e "s/\${NGINX_PORT}/127.0.0.1:$nginx_port/" \
    docker/nginx/amp2dify.conf.template >"$tmp/amp2dify.conf"
cat >"$tmp/nginx.conf" <<CONF
worker_processes 1;
pid $tmp/nginx.pid;
error_log $tmp/nginx-error.log warn;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $tmp/body;
    proxy_temp_path $tmp/proxy;
    include $tmp/amp2dify.conf;
}
CONF
"$NGINX" -p "$tmp" -c "$tmp/nginx.conf" -t 2>"$tmp/nginx-t.log" || fail "nginx -t: $(cat "$tmp/nginx-t.log")"
"$NGINX" -p "$tmp" -c "$tmp/nginx.conf"
printf '{"event_type":"Image_Test","user_id":"i-2","insert_id":"image-2"}' >"$tmp/e2.json"
[ "$(post "$tmp/e2.json" "$nginx_port")" = 202 ] || fail "signed post through nginx not accepted"
wait_pending 0 || fail "event 2 (through nginx) not delivered"
kill "$(cat "$tmp/nginx.pid")"
stop_fake "$tmp/fake1.out"
[ "$delivered" = 2 ] || fail "fake Dify saw $delivered deliveries, not 2: $(cat "$tmp/fake1.out")"

# Dify down: the event is stored; SIGTERM; a new container on the same
# volume delivers it once Dify is back.
printf '{"event_type":"Image_Test","user_id":"i-3","insert_id":"image-3"}' >"$tmp/e3.json"
[ "$(post "$tmp/e3.json")" = 202 ] || fail "post with Dify down not accepted"
[ "$(metric amp2dify_spool_pending)" = 1 ] || fail "event 3 not pending"
stop_container "$name"
first_stop_ms=$stop_ms
start_fake "$tmp/fake2.out"
run_container "$name-2"
wait_pending 0 || fail "the restarted container did not deliver the pending event"
stop_container "$name-2"
stop_fake "$tmp/fake2.out"
[ "$delivered" = 1 ] || fail "after the restart fake Dify saw $delivered deliveries, not 1"
if grep -q -e "$secret" -e "$key" "$tmp/$name.log" "$tmp/$name-2.log"; then fail "a secret is in the log"; fi
# --ulimit nofile=4096 is below what the default listen.connection_limit
# needs: the server says how many connections it holds instead.
held=$(sed -n 's/.*open-file limit is below.*"connections_held":\([0-9]*\).*/\1/p' "$tmp/$name.log")
[ -n "$held" ] || fail "no open-file limit warning under --ulimit nofile=4096"

echo "image test: built in ${built_s} s; image $((size / 1000000)) MB ($(( (size - base_size) / 1000000 )) MB over the $((base_size / 1000000)) MB base); uid 10001, secrets files, spool volume, HEALTHCHECK ok, 2 events delivered (1 via nginx), SIGTERM exit 0 in ${first_stop_ms} ms, pending event delivered after restart; nofile 4096: $held connections held"
