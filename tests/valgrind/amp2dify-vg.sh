#!/usr/bin/env bash
# tests/valgrind/amp2dify-vg.sh — amp2dify under valgrind memcheck, to stand
# in for the binary in the end-to-end tests (`make valgrind`, which see).
#
# Runs $AMP2DIFY_VG_BIN (default build/amp2dify next to this script) with the
# same arguments and the same pid (exec), so signals from a test reach it.
# Memory errors and definite leaks make the process exit 99, which the tests
# see as a server that did not exit 0; indirect and possible leaks are only
# reported. Each process writes its report to
# $AMP2DIFY_VG_LOGS/amp2dify.<pid>.log (default build/valgrind/logs);
# tests/valgrind/summary.sh adds them up. Subcommands listed in
# $AMP2DIFY_VG_SKIP (space-separated, e.g. "sign") run without valgrind, for
# tests that use them as fast helpers around a timed phase.
# Tests that copy the binary (tests/matrix) need both variables absolute.
set -u
ROOT=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
BIN=${AMP2DIFY_VG_BIN:-$ROOT/build/amp2dify}
LOGS=${AMP2DIFY_VG_LOGS:-$ROOT/build/valgrind/logs}
for skip in ${AMP2DIFY_VG_SKIP:-}; do
    [ "${1:-}" = "$skip" ] && exec "$BIN" "$@"
done
mkdir -p "$LOGS" || exit 1
# The plain build allocates with jemalloc: memcheck must replace its malloc
# and free as it replaces libc's.
exec valgrind --tool=memcheck --error-exitcode=99 --leak-check=full \
    --soname-synonyms=somalloc='*jemalloc*' \
    --errors-for-leak-kinds=definite --show-leak-kinds=definite,indirect,possible \
    --track-fds=no --num-callers=30 --log-file="$LOGS/amp2dify.%p.log" \
    "$BIN" "$@"
