#!/usr/bin/env bash
# tests/valgrind/run.sh BUILD_DIR — the end-to-end suite with every amp2dify
# process under valgrind memcheck (`make valgrind`).
#
# The tests are the ones `make e2e` runs, unchanged: the binary they start is
# tests/valgrind/amp2dify-vg.sh, which execs BUILD_DIR/amp2dify under
# valgrind (a memory error or a definite leak makes it exit 99, so the test
# that stops it fails). The tests' own timeouts are long enough for the
# ~20-50x slowdown on this code: no timing knob is changed. One exception:
# tests/signals times a 1.5 s load phase around `amp2dify sign`, so there
# `sign` runs without valgrind (the other suites cover it under valgrind).
# tests/e2e/test_fake_dify starts no amp2dify and is left out.
#
# Reports: BUILD_DIR/valgrind/logs/amp2dify.<pid>.log, added up at the end by
# tests/valgrind/summary.sh. VALGRIND_SUITES (space-separated, default all
# of: e2e mapping config matrix limits nginx metrics signals) picks a subset;
# "foundation" is the first e2e file alone (what CI runs).
# Exit 1 when a test failed or a report holds an error or a definite leak.
set -u
BUILD=${1:-build}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 2
command -v valgrind >/dev/null || { echo "valgrind: not installed (Debian package valgrind)" >&2; exit 2; }
SUITES=${VALGRIND_SUITES:-e2e mapping config matrix limits nginx metrics signals}

WRAP=$ROOT/tests/valgrind/amp2dify-vg.sh
# Absolute: tests/matrix runs a copy of the wrapper from its own directory.
export AMP2DIFY_VG_BIN=$ROOT/$BUILD/amp2dify
export AMP2DIFY_VG_LOGS=$ROOT/$BUILD/valgrind/logs
# The suites that take a build directory find amp2dify and fake-dify there.
BINDIR=$ROOT/$BUILD/valgrind/bin
rm -rf "$AMP2DIFY_VG_LOGS" "$BINDIR"
mkdir -p "$AMP2DIFY_VG_LOGS" "$BINDIR" || exit 2
ln -s "$WRAP" "$BINDIR/amp2dify"
ln -s "$ROOT/$BUILD/fake-dify" "$BINDIR/fake-dify"

failed=()
run() { # name command...
    echo "== valgrind: $1"
    local name=$1
    shift
    "$@" || failed+=("$name")
}
for s in $SUITES; do
    case $s in
    e2e)
        for t in test_foundation test_delivery test_durability; do
            run "$t" env AMP2DIFY_BIN="$BINDIR/amp2dify" "$BUILD/tests/e2e/$t"
        done ;;
    foundation) run test_foundation env AMP2DIFY_BIN="$BINDIR/amp2dify" "$BUILD/tests/e2e/test_foundation" ;;
    mapping | config) run "$s" bash "tests/$s/run.sh" "$WRAP" ;;
    matrix) run matrix bash tests/matrix/run.sh "$WRAP" "$BUILD/fake-dify" ;;
    limits) run limits bash tests/matrix/limits.sh "$WRAP" ;;
    nginx | metrics) run "$s" bash "tests/$s/run.sh" "$BINDIR" ;;
    signals) run signals env AMP2DIFY_VG_SKIP=sign bash tests/signals/run.sh "$BINDIR" ;;
    *) echo "valgrind: unknown suite $s" >&2; failed+=("$s") ;;
    esac
done

echo "== valgrind: reports in $AMP2DIFY_VG_LOGS"
bash tests/valgrind/summary.sh "$AMP2DIFY_VG_LOGS" || failed+=("memcheck reports")
if [ ${#failed[@]} -gt 0 ]; then
    echo "valgrind: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "valgrind: all suites passed; no memory errors, no definite leaks"
