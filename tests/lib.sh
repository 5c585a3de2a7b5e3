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

# Data-driven case runners (tests/config, tests/mapping): one directory per
# case holding config.json, run against the binary given as the only argument.
#   source "$(dirname "$0")/../lib.sh"; t_cases_init NAME "$@"
#   run_case() { ...; t_case_exit "$2" GOT WANT; t_case_diff "$2" WHAT WANT_FILE GOT_FILE; }
#   t_cases_run tests/NAME
# Sets: bin (the binary's absolute path), tmp; runs from the repository root.

t_cases_init() { # name args: checks the BINARY argument (usage error: exit 2), cds to the root
    if [ $# -ne 2 ]; then
        echo "usage: $0 BINARY" >&2
        exit 2
    fi
    bin=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
    if [ ! -x "$bin" ]; then
        echo "$0: $2 is not an executable" >&2
        exit 2
    fi
    cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
    t_init "$1"
}

t_case_exit() { # case got want: a different exit code fails the case
    if [ "$2" != "$3" ]; then
        echo "FAIL $1: exit $2, expected $3"
        T_CASE_OK=0
    fi
}

t_case_diff() { # case what want_file got_file: a difference fails the case
    if ! diff -u "$3" "$4" >"$tmp/diff"; then
        echo "FAIL $1: $2 differs"
        sed 's/^/    /' "$tmp/diff"
        T_CASE_OK=0
    fi
}

t_cases_run() { # dir: run_case DIR NAME for each DIR/*/ with a config.json; tally; exit
    local dir name pass=0 fail=0 failed=()
    for dir in "$1"/*/; do
        dir=${dir%/}
        name=$(basename "$dir")
        [ -f "$dir/config.json" ] || continue
        T_CASE_OK=1
        run_case "$dir" "$name"
        if [ "$T_CASE_OK" = 1 ]; then
            pass=$((pass + 1))
        else
            fail=$((fail + 1))
            failed+=("$name")
        fi
    done
    echo "$T_NAME cases: $pass passed, $fail failed"
    if [ $((pass + fail)) = 0 ]; then
        echo "no cases found" >&2
        exit 1
    fi
    [ $fail = 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
    exit 0
}
