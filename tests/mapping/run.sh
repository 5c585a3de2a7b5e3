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

if [ $# -ne 1 ]; then
    echo "usage: $0 BINARY" >&2
    exit 2
fi
bin=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
if [ ! -x "$bin" ]; then
    echo "$0: $1 is not an executable" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root" || exit 2

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

pass=0
fail=0
failed=()
for dir in tests/mapping/*/; do
    dir=${dir%/}
    name=$(basename "$dir")
    [ -f "$dir/config.json" ] || continue
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

    ok=1
    if [ "$got_exit" != "$want_exit" ]; then
        echo "FAIL $name: exit $got_exit, expected $want_exit"
        ok=0
    fi
    if ! diff -u "$want_out" "$tmp/out" >"$tmp/diff"; then
        echo "FAIL $name: stdout differs"
        sed 's/^/    /' "$tmp/diff"
        ok=0
    fi
    if ! diff -u "$want_err" "$tmp/err" >"$tmp/diff"; then
        echo "FAIL $name: stderr differs"
        sed 's/^/    /' "$tmp/diff"
        ok=0
    fi
    if [ $ok = 1 ]; then
        pass=$((pass + 1))
    else
        fail=$((fail + 1))
        failed+=("$name")
    fi
done

echo "mapping cases: $pass passed, $fail failed"
if [ $((pass + fail)) = 0 ]; then
    echo "no cases found" >&2
    exit 1
fi
[ $fail = 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
exit 0
