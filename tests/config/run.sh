#!/usr/bin/env bash
# Invalid-config tests of `amp2dify check-config`. Usage: tests/config/run.sh BINARY
#
# Each directory tests/config/<case>/ holds config.json and expected.txt, the
# exact stderr of `BINARY check-config -c tests/config/<case>/config.json`
# run from the repository root; the exit code must be 2. Secrets are set in
# the environment so that only the config itself can be at fault.
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
for dir in tests/config/*/; do
    dir=${dir%/}
    name=$(basename "$dir")
    [ -f "$dir/config.json" ] || continue
    # Bounded in time: a hung binary fails the case instead of the suite.
    env -u AMP2DIFY_CONFIG -u AMP2DIFY_LISTEN -u AMP2DIFY_SPOOL -u DIFY_BASE_URL \
        AMP2DIFY_SECRETS=test-signing-secret DIFY_API_KEY=test-app-key \
        timeout 10 "$bin" check-config -c "$dir/config.json" </dev/null >"$tmp/out" 2>"$tmp/err"
    got_exit=$?
    ok=1
    if [ "$got_exit" != 2 ]; then
        echo "FAIL $name: exit $got_exit, expected 2"
        ok=0
    fi
    if ! diff -u "$dir/expected.txt" "$tmp/err" >"$tmp/diff"; then
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

echo "config cases: $pass passed, $fail failed"
if [ $((pass + fail)) = 0 ]; then
    echo "no cases found" >&2
    exit 1
fi
[ $fail = 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
exit 0
