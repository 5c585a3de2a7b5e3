# Shared plumbing for the bash end-to-end tests (tests/*/run.sh): a work
# directory removed on exit, the processes a test started stopped on exit,
# free loopback ports, bounded waits, and a clean-stop check.
#   source tests/lib.sh; t_init NAME
# Sets: tmp (the work directory). Uses: T_NAME in messages.

t_init() { # name
    T_NAME=$1
    tmp=$(mktemp -d "/tmp/amp2dify-$1-XXXXXX")
    T_PIDS=()
    trap t_cleanup EXIT
}

t_cleanup() {
    for p in "${T_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -f "$tmp/nginx.pid" ] && kill "$(cat "$tmp/nginx.pid")" 2>/dev/null
    rm -rf "$tmp"
}

t_track() { # pid: stopped on exit
    T_PIDS+=("$1")
}

t_fail() { # message: print it and every log of the test, exit 1
    echo "$T_NAME test FAILED: $*" >&2
    for f in "$tmp"/*.log; do
        [ -f "$f" ] && { echo "--- $f (last 40 lines)" >&2; tail -n 40 "$f" >&2; }
    done
    exit 1
}

t_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

t_wait_http() { # url: up to 10 s for a 2xx
    for _ in $(seq 1 100); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

t_stop_clean() { # pid log: SIGTERM, exit 0, and no sanitizer report in log
    kill -TERM "$1"
    local rc=0
    wait "$1" || rc=$?
    [ "$rc" = 0 ] || t_fail "amp2dify exited $rc after SIGTERM"
    if grep -q 'Sanitizer' "$2"; then t_fail "sanitizer report in $2"; fi
}
