#!/usr/bin/env bash
# Runs libFuzzer targets for a fixed time and summarises them.
#   tests/fuzz/run.sh FUZZ_BUILD SECONDS JOBS NAME...      (from the repository root)
#
# FUZZ_BUILD/fuzz/fuzz_<name> is run with -max_total_time=SECONDS, at most
# JOBS at once, on a scratch corpus FUZZ_BUILD/work/<name>/ (where new
# inputs go) plus the checked-in seeds tests/fuzz/corpus/<name>/ (read only),
# with tests/fuzz/<name>.dict when present. Crash, leak, timeout and
# out-of-memory inputs land in FUZZ_BUILD/artifacts/<name>/; each becomes a
# regression file tests/fuzz/corpus/<name>/regress-<what> once fixed.
# Logs: FUZZ_BUILD/logs/<name>.log. Exit status 1 when any target found
# something.
set -u
if [ $# -lt 4 ]; then
    echo "usage: $0 FUZZ_BUILD SECONDS JOBS NAME..." >&2
    exit 2
fi
build=$1 secs=$2 jobs=$3
shift 3
case "$secs$jobs" in *[!0-9]*) echo "$0: SECONDS and JOBS must be numbers" >&2; exit 2 ;; esac
[ "$jobs" -ge 1 ] || jobs=1
mkdir -p "$build/logs"

run_one() {
    local n=$1 bin=$build/fuzz/fuzz_$1
    local work=$build/work/$n art=$build/artifacts/$n
    mkdir -p "$work" "$art"
    rm -f "$art"/* # findings of an earlier run: copy them out before rerunning
    local dict=()
    [ -f "tests/fuzz/$n.dict" ] && dict=(-dict="tests/fuzz/$n.dict")
    # -timeout: one input slower than 10 s is a finding; the outer timeout
    # bounds a wedged run.
    timeout $((secs + 120)) "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -max_len=65536 -print_final_stats=1 -artifact_prefix="$art/" "${dict[@]}" \
        "$work" "tests/fuzz/corpus/$n" >"$build/logs/$n.log" 2>&1
    echo $? >"$build/logs/$n.rc"
}

pids=()
for n in "$@"; do
    [ -x "$build/fuzz/fuzz_$n" ] || { echo "$0: $build/fuzz/fuzz_$n missing" >&2; exit 2; }
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
    echo "fuzzing $n for ${secs}s"
    run_one "$n" &
    pids+=($!)
done
wait

found=0
printf '%-10s %12s %10s %8s %6s %s\n' target executions exec/s corpus rc findings
for n in "$@"; do
    log=$build/logs/$n.log
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    corpus=$(ls "$build/work/$n" | wc -l)
    rc=$(cat "$build/logs/$n.rc" 2>/dev/null || echo '?')
    findings=$(cd "$build/artifacts/$n" && ls 2>/dev/null | tr '\n' ' ')
    printf '%-10s %12s %10s %8s %6s %s\n' "$n" "${execs:-?}" "${speed:-?}" "$corpus" "$rc" \
        "${findings:-none}"
    if [ -n "$findings" ] || [ "$rc" != 0 ]; then found=1; fi
done
exit $found
