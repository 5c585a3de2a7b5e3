#!/usr/bin/env bash
# Invalid-config tests of `amp2dify check-config`. Usage: tests/config/run.sh BINARY
#
# Each directory tests/config/<case>/ holds config.json and expected.txt, the
# exact stderr of `BINARY check-config -c tests/config/<case>/config.json`
# run from the repository root; the exit code must be 2. Secrets are set in
# the environment so that only the config itself can be at fault.
set -u

# shellcheck source=tests/lib.sh
source "$(dirname "$0")/../lib.sh"
t_cases_init config "$@"

run_case() { # dir name
    # Bounded in time: a hung binary fails the case instead of the suite.
    env -u AMP2DIFY_CONFIG -u AMP2DIFY_LISTEN -u AMP2DIFY_SPOOL -u DIFY_BASE_URL \
        -u AMP2DIFY_ADMIN_LISTEN -u AMP2DIFY_ADMIN_TOKEN -u AMP2DIFY_ADMIN_TOKEN_FILE \
        -u AMPLITUDE_API_KEY -u AMPLITUDE_SECRET_KEY -u AMP2DIFY_SDK_API_KEYS \
        AMP2DIFY_SECRETS=test-signing-secret DIFY_API_KEY=test-app-key \
        timeout 10 "$bin" check-config -c "$1/config.json" </dev/null >"$tmp/out" 2>"$tmp/err"
    t_case_exit "$2" $? 2
    t_case_diff "$2" stderr "$1/expected.txt" "$tmp/err"
}

t_cases_run tests/config
