#!/usr/bin/env bash
# bench/sink.sh BUILD_DIR — the Amplitude sink's throughput (route reports
# sent back with the HTTP V2 API) at batch 2,000, as events/s and as a ratio
# of a bare libcurl loop POSTing the same bodies in the same run
# (bench/sink_bench.c). Everything on 127.0.0.1; bounded in time.
# Knob: SINK_EVENTS (200000). Exit 1 when an event was not ingested.
set -uo pipefail
BUILD=${1:-build}
EVENTS=${SINK_EVENTS:-200000}
[[ -x $BUILD/bench/sink_bench ]] || { echo "sink: $BUILD/bench/sink_bench is missing; run 'make bench'" >&2; exit 1; }
line=$(timeout 300 "$BUILD/bench/sink_bench" "$EVENTS") || { echo "sink: sink_bench failed" >&2; exit 1; }
mkdir -p "$BUILD/bench"
echo "$line" >"$BUILD/bench/sink.json"
echo "== Amplitude sink (batch 2000, $EVENTS events)"
echo "$line"
