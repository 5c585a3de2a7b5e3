#!/usr/bin/env bash
# Data-driven tests of `amp2dify map`. Usage: tests/mapping/run.sh BINARY
#
# Each directory tests/mapping/<case>/ holds:
#   config.json            the config (-c)
#   events.json            the input (or events.jsonl for JSON lines)
#   expected.jsonl         exact expected stdout
#   expected_explain.txt   when present: run with --explain, exact stderr
#   expected_stderr.txt    when present: exact stderr (otherwise stderr must
#                          be empty unless expected_explain.txt is used)
#   expected_exit          when present: the exit code (default 0)
#   stdin                  when present: feed the input on stdin ("-")
# Paths in expected stderr are relative to the repository root, where the
# cases run.
set -u

# shellcheck source=tests/lib.sh
source "$(dirname "$0")/../lib.sh"
t_cases_init mapping "$@"

run_case() { # dir name
    local dir=$1 input args want_exit got_exit want_err want_out
    input=$dir/events.json
    [ -f "$input" ] || input=$dir/events.jsonl
    args=(map -c "$dir/config.json")
    [ -f "$dir/expected_explain.txt" ] && args+=(--explain)
    want_exit=0
    [ -f "$dir/expected_exit" ] && want_exit=$(tr -d '[:space:]' <"$dir/expected_exit")

    # Bounded in time: a hung binary fails the case instead of the suite.
    if [ -f "$dir/stdin" ]; then
        timeout 10 "$bin" "${args[@]}" - <"$input" >"$tmp/out" 2>"$tmp/err"
    else
        timeout 10 "$bin" "${args[@]}" "$input" </dev/null >"$tmp/out" 2>"$tmp/err"
    fi
    got_exit=$?

    if [ -f "$dir/expected_explain.txt" ]; then
        want_err=$dir/expected_explain.txt
    elif [ -f "$dir/expected_stderr.txt" ]; then
        want_err=$dir/expected_stderr.txt
    else
        want_err=/dev/null
    fi
    want_out=$dir/expected.jsonl
    [ -f "$want_out" ] || want_out=/dev/null

    t_case_exit "$2" "$got_exit" "$want_exit"
    t_case_diff "$2" stdout "$want_out" "$tmp/out"
    t_case_diff "$2" stderr "$want_err" "$tmp/err"
}

t_cases_run tests/mapping
