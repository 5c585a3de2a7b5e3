# Sourced by the matrix scripts, from the repository's root: one python3
# (tests/matrix/jsontool.py serve) answers all of a script's JSON questions.
#   json CMD ARGS...   as `python3 tests/matrix/jsontool.py CMD ARGS...`: the
#                      same output and exit status (arguments without tabs)
#   json_stop          ends the helper; call it before waiting for children.
# The coprocess's pipes are copied to plain descriptors, which pipelines see
# too. Processes started afterwards inherit them; json_stop ends the helper
# regardless.
coproc JSONQ { exec python3 tests/matrix/jsontool.py serve; }
exec {JSONQ_IN}>&"${JSONQ[1]}" {JSONQ_OUT}<&"${JSONQ[0]}"
json() {
    local IFS=$'\t' line
    printf '%s\n' "$*" >&"$JSONQ_IN" || return 2
    while IFS= read -r line <&"$JSONQ_OUT"; do
        if [[ $line == $'\x1e'* ]]; then return "${line#?}"; fi
        printf '%s\n' "$line"
    done
    return 2 # the helper is gone
}
json_stop() { [ -z "${JSONQ_PID:-}" ] || kill "$JSONQ_PID" 2>/dev/null; }
