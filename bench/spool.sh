#!/usr/bin/env bash
# bench/spool.sh BUILD_DIR [BASE_BUILD_DIR] — the spool engine alone.
#
# Runs BUILD_DIR/bench/spool_ingest (see bench/spool_ingest.c) SPOOL_RUNS
# times (3): a plain SQLite client inserting the same rows in transactions
# of 64 (the reference), then the spool storing SPOOL_EVENTS (30,000)
# one-event requests with 64 in flight and delivering them with claims as
# the dispatcher makes them. With BASE_BUILD_DIR (an older build that has
# bench/spool_ingest too), each run also runs that build's spool, so the
# ratios compare two builds measured in the same run. Reports the median of
# the runs: CPU us per stored event (amp-commit, amp-sync, amp-checkpoint),
# as a multiple of a plain SQLite insert, and CPU us per delivery (claim on
# the caller's thread, acknowledgement on the spool threads). Each run also
# measures a design the spool does not have (spool_ingest --mode journal:
# bodies in an append-only journal, a compact SQLite index synced only at
# checkpoints), the floor of docs/spool-journal.md's proposal.
#
# Spools live in a temporary directory under /tmp, removed on exit.
set -uo pipefail

BUILD=${1:-build}
BASE=${2:-}
RUNS=${SPOOL_RUNS:-3}
EVENTS=${SPOOL_EVENTS:-30000}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh" || exit 1
bench_init spool 0 # also moves to the repository root
WORK=$(mktemp -d /tmp/amp2dify-spool-bench-XXXXXX) || die "no work directory"
for b in "$BUILD" ${BASE:+"$BASE"}; do
    [[ -x $b/bench/spool_ingest ]] || die "$b/bench/spool_ingest is missing"
done

# FIELD LINE: the value of FIELD=... in LINE.
field() { sed -n "s/.*\b$1=\([0-9.]*\).*/\1/p" <<<"$2"; }
# Median of the arguments.
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

declare -a plain journal journal_j journal_i new_ev new_del new_claim base_ev base_del base_claim
for ((i = 0; i < RUNS; i++)); do
    d=$(mktemp -d "$WORK/run-XXXX")
    line=$("$BUILD/bench/spool_ingest" --dir "$d" --events "$EVENTS" --mode sqlite) ||
        die "the plain SQLite reference failed"
    plain+=("$(field us_per_row "$line")")
    # The proposed design's floor (spool_ingest --mode journal), for the note on issue 19.
    line=$("$BUILD/bench/spool_ingest" --dir "$d" --events "$EVENTS" --mode journal) ||
        die "the journal prototype failed"
    journal+=("$(field us_per_row "$line")")
    journal_j+=("$(field journal "$line")")
    journal_i+=("$(field index "$line")")
    for which in new base; do
        [[ $which == base && -z $BASE ]] && continue
        b=$BUILD
        [[ $which == base ]] && b=$BASE
        rm -rf "${d:?}"/spool.db*
        out=$("$b/bench/spool_ingest" --dir "$d" --events "$EVENTS") || die "$b: spool_ingest failed"
        ing=$(grep SPOOL_INGEST <<<"$out")
        del=$(grep SPOOL_DELIVER <<<"$out")
        log "spool: run $((i + 1)) $which: $ing"
        log "spool: run $((i + 1)) $which: $del"
        eval "${which}_ev+=(\"$(field us_per_event "$ing")\")"
        eval "${which}_del+=(\"$(field us_per_delivery "$del")\")"
        eval "${which}_claim+=(\"$(field claim "$del")\")"
    done
    rm -rf "$d"
done

p=$(median "${plain[@]}")
e=$(median "${new_ev[@]}")
dl=$(median "${new_del[@]}")
cl=$(median "${new_claim[@]}")
echo "spool engine  $EVENTS events, median of $RUNS runs"
echo "  plain SQLite insert (transactions of 64, WAL, synchronous FULL): $p us CPU per row"
echo "  stored event: $e us CPU on the spool threads = $(calc "%.2f" "$e / $p") x a plain SQLite insert"
echo "  delivery: $dl us CPU (claim $cl us)"
jr=$(median "${journal[@]}")
echo "  not built, the proposed design's floor on one thread: body to an append-only journal (fdatasync per 64),"
echo "    a compact SQLite index row per event (1,024 per transaction, synced at checkpoints): $jr us per event (journal" \
    "$(median "${journal_j[@]}"), index $(median "${journal_i[@]}")) = $(calc "%.2f" "$jr / $p") x a plain SQLite insert"
if [[ -n $BASE ]]; then
    be=$(median "${base_ev[@]}")
    bd=$(median "${base_del[@]}")
    bc=$(median "${base_claim[@]}")
    echo "  base build ($BASE): stored event $be us, delivery $bd us (claim $bc us)"
    awk -v e="$e" -v be="$be" -v d="$dl" -v bd="$bd" -v c="$cl" -v bc="$bc" 'BEGIN {
        printf "  ratio against the base build: stored event %.2f, delivery %.2f, claim %.2f\n",
            e / be, d / bd, c / bc }'
fi
