#!/usr/bin/env bash
# tests/valgrind/summary.sh LOG_DIR — adds up the memcheck reports that
# tests/valgrind/amp2dify-vg.sh left in LOG_DIR: one line per subcommand
# (processes, errors, bytes definitely/indirectly/possibly lost), then the
# totals and the reports to read. Processes ended by SIGKILL (the crash
# tests) leave no summary and are counted as "killed". Exit 1 when any
# process had a memory error or a definite leak (for killed ones: an error
# record before the kill), or when LOG_DIR holds no report.
set -u
DIR=${1:?usage: $0 LOG_DIR}
shopt -s nullglob
logs=("$DIR"/amp2dify.*.log)
[ ${#logs[@]} -gt 0 ] || { echo "valgrind: no reports in $DIR" >&2; exit 1; }
awk '
function num(s) { gsub(/,/, "", s); return s + 0 }
FNR == 1 {
    if (NR > 1) done()
    cmd = "?"; errs = -1; def = 0; ind = 0; pos = 0; file = FILENAME; seen = 0
}
/== Command: / {
    # The subcommand: the first argument after the binary.
    n = split($0, w, " ")
    for (i = 1; i <= n; i++) if (w[i] == "Command:") { cmd = w[i + 2]; break }
}
/definitely lost:/ { def = num($4) }
/indirectly lost:/ { ind = num($4) }
/possibly lost:/   { pos = num($4) }
/ERROR SUMMARY:/   { errs = num($4) }
# Error headlines, counted for processes killed before their summary.
/^==[0-9]+== (Invalid (read|write|free)|Conditional jump|Use of uninitialised|Syscall param|Mismatched free|Source and destination overlap|Argument .* of function)/ { seen++ }
function done() {
    procs[cmd]++
    if (errs < 0) { killed[cmd]++; errs = seen }
    E[cmd] += errs; D[cmd] += def; I[cmd] += ind; P[cmd] += pos
    if (errs > 0 || def > 0) { bad = 1; badlist = badlist "\n  " file }
}
END {
    done()
    printf "%-12s %6s %7s %7s %10s %10s %10s\n", "subcommand", "procs", "killed", "errors",
           "definite", "indirect", "possible"
    for (c in procs) {
        printf "%-12s %6d %7d %7d %10d %10d %10d\n", c, procs[c], killed[c], E[c], D[c], I[c], P[c]
        tp += procs[c]; tk += killed[c]; te += E[c]; td += D[c]; ti += I[c]; tq += P[c]
    }
    printf "%-12s %6d %7d %7d %10d %10d %10d   (leaks in bytes)\n", "total", tp, tk, te, td, ti, tq
    if (bad) printf "reports with errors or definite leaks:%s\n", badlist
    exit bad
}' "${logs[@]}"
