#ifndef AMP_TESTS_E2E_CHECKED_H
#define AMP_TESTS_E2E_CHECKED_H
/* The harness's steps most Check tests take, each failing the test (a Check
 * assertion) instead of returning NULL: an in-process fake Dify, the server
 * started against it, a clean stop. */

#include "../fake_dify/fake_dify.h"
#include "harness.h"

/* A fake Dify on a free port that takes H_API_KEY. Caller owns
 * (fake_dify_stop). */
fake_dify *h_fake_start(void);
/* build/amp2dify with config_json (borrowed; NULL: the harness default)
 * delivering to f. Caller owns (h_server_stop or h_server_stop_ok). */
h_server *h_server_start_with(const char *config_json, const fake_dify *f);
/* Stop the server; it must exit 0 and leave no sanitizer report. */
void h_server_stop_ok(h_server *s);
/* The value of the line "<series> <value>" of s's /metrics (series is the
 * name with its labels, as the server prints them), or -1 when absent. */
double h_metric(const h_server *s, const char *series);
/* h_metric once it is at least min, or its value after timeout_ms: a
 * counter the server bumps just after Dify's answer (which the fake has
 * already counted) is read without a race. */
double h_metric_wait(const h_server *s, const char *series, double min, unsigned timeout_ms);

#endif
