#!/usr/bin/env bash
# The end-to-end bad-input matrix: every line of tests/matrix/cases.tsv is one
# HTTP request against a real amp2dify, with the status, the JSON error code
# and (for 202) the accepted/duplicates/filtered counts it must get.
#
#   tests/matrix/run.sh BUILD/amp2dify [BUILD/fake-dify]      (from anywhere)
#
# One fake Dify and four amp2dify instances, one per auth scheme (hmac =
# amplitude-hmac with two secrets, static = static-header, stdwh =
# standard-webhooks, none = allow_unauthenticated), each with its own spool,
# all from tests/matrix/config.json. Cases run in file order (replays refer
# to earlier cases). Afterwards every instance must answer /healthz 200, the
# spools must drain, and the fake Dify must have received exactly the
# requests of the accepted events (the "dify" column summed): nothing of a
# rejected request may reach it. Each instance must then stop cleanly on
# SIGTERM with no sanitizer report in its log, and no secret may appear in
# a log. Needs curl, python3, openssl, base64, od.
set -u

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 AMP2DIFY_BINARY [FAKE_DIFY_BINARY]" >&2
    exit 2
fi
abs() { (cd "$(dirname "$1")" && echo "$(pwd)/$(basename "$1")"); }
BIN=$(abs "$1")
FAKE=$(abs "${2:-$(dirname "$1")/fake-dify}")
for b in "$BIN" "$FAKE"; do
    [ -x "$b" ] || { echo "$0: $b is not an executable" >&2; exit 2; }
done
for tool in curl python3 openssl base64 od; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is required" >&2; exit 2; }
done
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.." || exit 2
CASES=${MATRIX_CASES:-tests/matrix/cases.tsv} # another file: for checking the runner itself

tmp=$(mktemp -d /tmp/amp2dify-matrix-XXXXXX)
declare -A PID PORT
fake_pid=
. tests/matrix/jsonq.sh
cleanup() {
    json_stop
    for s in "${!PID[@]}"; do kill "${PID[$s]}" 2>/dev/null; done
    [ -n "$fake_pid" ] && kill "$fake_pid" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
# A private copy: every instance runs the same binary even if the build
# directory is rebuilt meanwhile.
cp "$BIN" "$tmp/amp2dify" || exit 2
BIN=$tmp/amp2dify
die() {
    echo "matrix: $*" >&2
    for f in "$tmp"/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -20 "$f" >&2; }; done
    exit 1
}

# ---- secrets ----------------------------------------------------------------
declare -A AMP_SECRET=([A]=matrix-secret-A [B]=matrix-secret-B [X]=matrix-secret-wrong)
# whsec_ + base64("matrix-standard-webhooks-key-1") and of another key.
declare -A SW_SECRET=([W]=whsec_bWF0cml4LXN0YW5kYXJkLXdlYmhvb2tzLWtleS0x
                      [V]=whsec_YW5vdGhlci1rZXktZW50aXJlbHk=)
STATIC_TOKENS='Bearer st-token-1,st-token-2'
DIFY_KEY=app-matrix-key-4b1e
declare -A SECRETS=([hmac]="${AMP_SECRET[A]},${AMP_SECRET[B]}" [static]=$STATIC_TOKENS
                    [stdwh]=${SW_SECRET[W]} [none]=)
declare -A AUTH=(
    [hmac]='{"scheme":"amplitude-hmac","tolerance_seconds":300}'
    [static]='{"scheme":"static-header","header":"X-Webhook-Token"}'
    [stdwh]='{"scheme":"standard-webhooks","tolerance_seconds":300}'
    [none]='{"scheme":"none","allow_unauthenticated":true}'
)
SERVERS="hmac static stdwh none"

# ---- processes ----------------------------------------------------------------
"$FAKE" --port 0 --key "$DIFY_KEY" >"$tmp/fake.out" 2>"$tmp/fake.log" &
fake_pid=$!
for _ in $(seq 1 100); do grep -q '^listening ' "$tmp/fake.out" && break; sleep 0.05; done
dify_port=$(sed -n 's/^listening //p' "$tmp/fake.out")
[ -n "$dify_port" ] || die "the fake Dify did not start"

for s in $SERVERS; do
    json set tests/matrix/config.json "$tmp/$s.json" "auth=${AUTH[$s]}" ||
        die "cannot write the $s config"
    env -u AMP2DIFY_CONFIG -u AMP2DIFY_SECRETS_FILE -u DIFY_API_KEY_FILE \
        AMP2DIFY_SECRETS="${SECRETS[$s]}" DIFY_API_KEY=$DIFY_KEY \
        DIFY_BASE_URL="http://127.0.0.1:$dify_port/v1" AMP2DIFY_LISTEN=127.0.0.1:0 \
        AMP2DIFY_SPOOL="$tmp/$s.db" AMP2DIFY_LOG_LEVEL=info \
        "$BIN" serve -c "$tmp/$s.json" 2>"$tmp/$s.log" &
    PID[$s]=$!
done
for s in $SERVERS; do
    for _ in $(seq 1 200); do
        PORT[$s]=$(json log-port "$tmp/$s.log")
        [ -n "${PORT[$s]}" ] && break
        kill -0 "${PID[$s]}" 2>/dev/null || die "amp2dify ($s) exited at start"
        sleep 0.05
    done
    [ -n "${PORT[$s]}" ] || die "amp2dify ($s) did not start listening"
done

# ---- request building ---------------------------------------------------------

# write_body SPEC FILE
write_body() {
    local spec=$1 out=$2
    case "$spec" in
    json:*) printf '%s' "${spec#json:}" >"$out" ;;
    empty) : >"$out" ;;
    repeat:*)
        local rest=${spec#repeat:}
        local ch=${rest%%:*} n=${rest#*:}
        head -c "$n" /dev/zero | tr '\0' "$ch" >"$out"
        ;;
    deep:*)
        local n=${spec#deep:}
        { printf '{"event_type":"Deep","user_id":"u","insert_id":"deep-%s","p":' "$n"
          head -c "$n" /dev/zero | tr '\0' '['
          head -c "$n" /dev/zero | tr '\0' ']'
          printf '}'; } >"$out"
        ;;
    hex:*)
        local hex=${spec#hex:}
        printf '%b' "$(printf '%s' "$hex" | sed 's/../\\x&/g')" >"$out"
        ;;
    padded:*)
        # A valid event of exactly N bytes: strings of at most 60000 bytes in
        # a "pad" array, under the per-string cap.
        local rest=${spec#padded:}
        python3 - "${rest%%:*}" "${rest#*:}" "$out" <<'PY' || die "cannot build $spec"
import sys
n, ident, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
head = '{"event_type":"Padded","user_id":"u","insert_id":"%s","pad":[' % ident
room = n - len(head) - 2  # "]}"
parts = []
while room > 0:
    k = min(60000, room - 2)  # two quotes
    if room - (k + 2) in (1, 2):  # never leave a remainder too small for a string
        k -= 3
    parts.append('"' + "p" * k + '"')
    room -= k + 2
    if room > 0:
        room -= 1  # the comma before the next part
body = head + ",".join(parts) + "]}"
assert len(body) == n, (len(body), n)
open(out, "w").write(body)
PY
        ;;
    bigstr:*)
        local rest=${spec#bigstr:}
        local n=${rest%%:*} id=${rest#*:}
        { printf '{"event_type":"A","user_id":"u","insert_id":"%s","event_properties":{"s":"' "$id"
          head -c "$n" /dev/zero | tr '\0' 's'
          printf '"}}'; } >"$out"
        ;;
    events:*)
        local rest=${spec#events:}
        local n=${rest%%:*} prefix=${rest#*:}
        local type=Bulk
        if [[ $prefix == *:* ]]; then type=${prefix#*:}; prefix=${prefix%%:*}; fi
        { printf '['
          for ((i = 1; i <= n; i++)); do
              [ "$i" -gt 1 ] && printf ','
              printf '{"event_type":"%s","user_id":"u","insert_id":"%s-%d"}' "$type" "$prefix" "$i"
          done
          printf ']'; } >"$out"
        ;;
    -) rm -f "$out" ;;
    *) die "unknown body spec '$spec'" ;;
    esac
}

# ts_expr EXPR NOW -> the number
ts_expr() {
    case "$1" in
    now) echo "$2" ;;
    now+*) echo $(($2 + ${1#now+})) ;;
    now-*) echo $(($2 - ${1#now-})) ;;
    *) echo "$1" ;;
    esac
}

# hmac_hex KEY FILE PREFIX [tampered] -> hex HMAC-SHA256(KEY, PREFIX || file [|| " "])
hmac_hex() {
    { printf '%s' "$3"; cat "$2"; [ "${4:-}" = tampered ] && printf ' '; } |
        openssl dgst -sha256 -hmac "$1" -r | cut -d' ' -f1
}

# sw_sig SECRETNAME ID TS FILE -> base64 HMAC-SHA256(base64-decoded key, "ID.TS.body")
sw_sig() {
    local b64=${SW_SECRET[$1]#whsec_}
    local hexkey
    hexkey=$(printf '%s' "$b64" | base64 -d | od -An -tx1 | tr -d ' \n')
    { printf '%s.%s.' "$2" "$3"; cat "$4"; } |
        openssl dgst -sha256 -mac HMAC -macopt "hexkey:$hexkey" -binary | base64 -w0
}

# expand TEXT NOW BODYFILE -> TEXT with the {…} placeholders replaced
expand() {
    local text=$1 now=$2 body=$3 out="" ph
    while [[ $text =~ \{([a-z]+([:+-][^}]*)?)\} ]]; do
        ph=${BASH_REMATCH[1]}
        local repl
        case "$ph" in
        now) repl=$now ;;
        now+* | now-*) repl=$(ts_expr "$ph" "$now") ;;
        nowms) repl=${now}000 ;;
        amp:*)
            IFS=: read -r _ sname texpr flag <<<"$ph"
            local ts
            ts=$(ts_expr "$texpr" "$now")
            repl=$(hmac_hex "${AMP_SECRET[$sname]}" "$body" "$ts." "$flag")
            ;;
        sw:*)
            IFS=: read -r _ sname id texpr <<<"$ph"
            repl=$(sw_sig "$sname" "$id" "$(ts_expr "$texpr" "$now")" "$body")
            ;;
        *) die "unknown placeholder {$ph}" ;;
        esac
        out+=${text%%"{$ph}"*}$repl
        text=${text#*"{$ph}"}
    done
    printf '%s' "$out$text"
}

# write_headers NAME SERVER SPEC NOW BODYFILE HEADERFILE
write_headers() {
    local name=$1 server=$2 spec=$3 now=$4 body=$5 out=$6 item
    : >"$out"
    [ "$spec" = - ] && spec=
    local IFS='|'
    for item in $spec; do
        case "$item" in
        json) echo 'Content-Type: application/json' >>"$out" ;;
        sig)
            case "$server" in
            hmac)
                AMP_SIGN_SECRET=${AMP_SECRET[A]} "$BIN" sign --secret-env AMP_SIGN_SECRET \
                    --timestamp "$now" "$body" >>"$out" || die "$name: amp2dify sign failed"
                ;;
            static) echo "X-Webhook-Token: ${STATIC_TOKENS%%,*}" >>"$out" ;;
            stdwh)
                printf 'webhook-id: msg_%s\nwebhook-timestamp: %s\nwebhook-signature: v1,%s\n' \
                    "$name" "$now" "$(sw_sig W "msg_$name" "$now" "$body")" >>"$out"
                ;;
            none) ;;
            esac
            ;;
        *) printf '%s\n' "$(expand "$item" "$now" "$body")" >>"$out" ;;
        esac
    done
    # curl adds a form Content-Type to every body unless told not to.
    grep -qi '^content-type:' "$out" || echo 'Content-Type:' >>"$out"
}

# ---- the cases ------------------------------------------------------------------
pass=0 fail=0 xfail=0 expected_dify=0 ncases=0
failed=()
declare -A SEEN
while IFS=$'\t' read -r -u 3 name server method path headers body status error counts dify note; do
    [ -z "$name" ] || [ "${name:0:1}" = '#' ] && continue
    ncases=$((ncases + 1))
    [ -n "${PORT[$server]:-}" ] || die "$name: unknown server '$server'"
    [ -z "${SEEN[$name]:-}" ] || die "$name: duplicate case name"
    SEEN[$name]=1
    now=$(date +%s)
    bfile=$tmp/case-$name.body hfile=$tmp/case-$name.headers
    if [[ $headers == replay:* ]]; then
        orig=${headers#replay:}
        [ -f "$tmp/case-$orig.headers" ] || die "$name: replays unknown case '$orig'"
        cp "$tmp/case-$orig.headers" "$hfile"
        if [ -f "$tmp/case-$orig.body" ]; then cp "$tmp/case-$orig.body" "$bfile"; else rm -f "$bfile"; fi
    else
        write_body "$body" "$bfile"
        signed=$bfile
        [ -f "$bfile" ] || signed=/dev/null
        write_headers "$name" "$server" "$headers" "$now" "$signed" "$hfile"
    fi
    args=(-sS -o "$tmp/resp" -D "$tmp/resp.headers" -w '%{http_code}' --max-time 60
          -X "$method" -H "@$hfile")
    [ -f "$bfile" ] && args+=(--data-binary "@$bfile")
    got=$(curl "${args[@]}" "http://127.0.0.1:${PORT[$server]}$path" 2>"$tmp/curl.err")
    got_counts=-
    if fields=$(json get "$tmp/resp" error accepted duplicates filtered); then
        mapfile -t f <<<"$fields"
        got_error=${f[0]}
        [ "$got" = 202 ] && got_counts=${f[1]}/${f[2]}/${f[3]}
    else
        got_error='(not JSON)'
    fi
    why=""
    [ "$got" = "$status" ] || why+=" status $got (expected $status)"
    [ "$got_error" = "$error" ] || why+=" error $got_error (expected $error)"
    [ "$counts" = - ] || [ "$got_counts" = "$counts" ] || why+=" counts $got_counts (expected $counts)"
    grep -qi '^x-request-id: ' "$tmp/resp.headers" || why+=" no X-Request-Id"
    if [ "$got" = 405 ] && ! grep -qi '^allow: ' "$tmp/resp.headers"; then why+=" 405 without Allow"; fi
    if [[ $note == xfail:* ]]; then
        if [ -n "$why" ]; then
            xfail=$((xfail + 1))
            echo "XFAIL $name:$why — known gap:${note#xfail:}"
            # What the server did instead still reaches Dify: one route per event here.
            [ "$got" = 202 ] && expected_dify=$((expected_dify + ${f[1]}))
        else
            fail=$((fail + 1))
            failed+=("$name")
            echo "XPASS $name: passes now; drop its xfail note"
            expected_dify=$((expected_dify + dify))
        fi
        continue
    fi
    expected_dify=$((expected_dify + dify))
    if [ -z "$why" ]; then
        pass=$((pass + 1))
    else
        fail=$((fail + 1))
        failed+=("$name")
        echo "FAIL $name:$why"
        echo "    answer: $(head -c 300 "$tmp/resp")"
        [ -s "$tmp/curl.err" ] && echo "    curl: $(cat "$tmp/curl.err")"
    fi
done 3<"$CASES"

# ---- afterwards -------------------------------------------------------------------
for s in $SERVERS; do
    code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:${PORT[$s]}/healthz")
    [ "$code" = 200 ] || { fail=$((fail + 1)); failed+=("healthz-$s"); echo "FAIL $s: /healthz $code after the matrix"; }
done
# Every accepted event delivered: the spools drain (bounded wait).
for s in $SERVERS; do
    pending=?
    for _ in $(seq 1 300); do
        pending=$(curl -sS --max-time 5 "http://127.0.0.1:${PORT[$s]}/metrics" |
            sed -n 's/^amp2dify_spool_pending //p')
        [ "$pending" = 0 ] && break
        sleep 0.1
    done
    [ "$pending" = 0 ] || { fail=$((fail + 1)); failed+=("drain-$s"); echo "FAIL $s: $pending events still pending"; }
done
for s in $SERVERS; do
    kill -TERM "${PID[$s]}"
    rc=0
    wait "${PID[$s]}" || rc=$?
    unset "PID[$s]"
    [ "$rc" = 0 ] || { fail=$((fail + 1)); failed+=("stop-$s"); echo "FAIL $s: exit $rc after SIGTERM"; }
    if grep -qE 'Sanitizer|runtime error:' "$tmp/$s.log"; then
        fail=$((fail + 1))
        failed+=("sanitizer-$s")
        echo "FAIL $s: sanitizer report:"
        grep -E -A20 'Sanitizer|runtime error:' "$tmp/$s.log" | head -40
    fi
done
if grep -qF -e "${AMP_SECRET[A]}" -e "${AMP_SECRET[B]}" -e st-token-1 -e "${SW_SECRET[W]}" \
    -e "$DIFY_KEY" "$tmp"/*.log; then
    fail=$((fail + 1))
    failed+=("secret-in-log")
    echo "FAIL a secret appears in a log"
fi
kill -TERM "$fake_pid"
wait "$fake_pid"
fake_pid=
summary=$(grep '^{' "$tmp/fake.out" | tail -1)
printf '%s\n' "$summary" >"$tmp/summary.json"
mapfile -t f < <(json get "$tmp/summary.json" requests delivered)
got_requests=${f[0]:-?}
got_delivered=${f[1]:-?}
if [ "$got_requests" != "$expected_dify" ] || [ "$got_delivered" != "$expected_dify" ]; then
    fail=$((fail + 1))
    failed+=("dify-count")
    echo "FAIL the fake Dify got $summary; expected $expected_dify requests, all delivered"
fi

echo "matrix: $ncases cases, $pass passed, $fail failed, $xfail known gaps (xfail);" \
    "Dify received ${got_requests:-?} requests (expected $expected_dify)"
[ "$ncases" -ge 40 ] || { echo "matrix: fewer than 40 cases" >&2; exit 1; }
[ "$fail" = 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
exit 0
