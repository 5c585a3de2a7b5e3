/*
 * Unit tests for forward/: the pure helpers (classification, backoff,
 * Retry-After, URL and body building, the stored result, the SSE folder),
 * then the engine itself against the real spool and the one fake Dify every
 * test uses (tests/fake_dify/, on 127.0.0.1, scripted per request), so every
 * ack the forwarder writes can be read back from the SQLite file.
 * (amp_forward_decide's rules are tabled in test_decide.c.)
 */
#include "../../forward/forward.h"
#include "../../forward/forward_int.h"
#include "../../base/log.h"
#include "../../base/metrics.h"
#include "../../base/alloc.h"
#include "../../base/buf.h"
#include "../../base/clock.h"
#include "../../spool/spool.h"
#include "../../base/errs.h"
#include "../../mapping/mapping.h"
#include "../check_run.h"
#include "../fake_dify/fake_dify.h"

#include <arpa/inet.h>
#include <check.h>
#include <curl/curl.h>
#include <jansson.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ======================================================================
 * classification
 * ====================================================================== */

typedef struct {
    int transport;
    long status;
    const char *body; /* JSON text or NULL */
    amp_outcome want;
    const char *code;    /* expected *code, NULL for none */
    const char *message; /* expected *message, NULL for none */
} classify_case;

static const classify_case classify_cases[] = {
    /* 2xx */
    {0, 200, "{\"event\":\"message\",\"answer\":\"hi\"}", AMP_OUTCOME_DELIVERED, NULL, NULL},
    {0, 201, NULL, AMP_OUTCOME_DELIVERED, NULL, NULL},
    {0, 204, NULL, AMP_OUTCOME_DELIVERED, NULL, NULL},
    {0, 200, "{\"workflow_run_id\":\"w\",\"data\":{\"status\":\"succeeded\"}}",
     AMP_OUTCOME_DELIVERED, NULL, NULL},
    {0, 200, "{\"data\":{\"status\":\"stopped\"}}", AMP_OUTCOME_DELIVERED, NULL, NULL},
    {0, 200, "{\"data\":{\"status\":\"partial-succeeded\"}}", AMP_OUTCOME_DELIVERED, NULL, NULL},
    {0, 200, "{\"data\":{\"status\":\"failed\",\"error\":\"node 3 blew up\"}}",
     AMP_OUTCOME_PERMANENT, "workflow_failed", "node 3 blew up"},
    {0, 200, "{\"data\":{\"status\":\"failed\",\"error\":null}}", AMP_OUTCOME_PERMANENT,
     "workflow_failed", NULL},
    {0, 200, "{\"data\":\"failed\"}", AMP_OUTCOME_DELIVERED, NULL, NULL},
    /* transport */
    {28, 0, NULL, AMP_OUTCOME_RETRY, NULL, NULL},
    {7, 0, NULL, AMP_OUTCOME_RETRY, NULL, NULL},
    {-1, 200, NULL, AMP_OUTCOME_RETRY, NULL, NULL},
    /* retryable statuses */
    {0, 408, NULL, AMP_OUTCOME_RETRY, NULL, NULL},
    {0, 429,
     "{\"status\":429,\"code\":\"too_many_requests\",\"message\":\"Too many requests. Please "
     "try again later.\"}",
     AMP_OUTCOME_RETRY, "too_many_requests", "Too many requests. Please try again later."},
    {0, 500, "{\"status\":500,\"code\":\"internal_server_error\",\"message\":\"boom\"}",
     AMP_OUTCOME_RETRY, "internal_server_error", "boom"},
    {0, 502, NULL, AMP_OUTCOME_RETRY, NULL, NULL},
    {0, 503, "<html>busy</html>", AMP_OUTCOME_RETRY, NULL, NULL},
    {0, 504, NULL, AMP_OUTCOME_RETRY, NULL, NULL},
    {0, 599, NULL, AMP_OUTCOME_RETRY, NULL, NULL},
    /* invalid_param: a concurrency limit only with that message */
    {0, 400,
     "{\"status\":400,\"code\":\"invalid_param\",\"message\":\"Too many requests. The "
     "current maximum concurrent requests allowed for app is 10.\"}",
     AMP_OUTCOME_RETRY, "invalid_param",
     "Too many requests. The current maximum concurrent requests allowed for app is 10."},
    {0, 400,
     "{\"status\":400,\"code\":\"invalid_param\",\"message\":\"Arg user must be provided.\"}",
     AMP_OUTCOME_PERMANENT, "invalid_param", "Arg user must be provided."},
    {0, 400, "{\"status\":400,\"code\":\"invalid_param\"}", AMP_OUTCOME_PERMANENT, "invalid_param",
     NULL},
    {0, 400, "{\"status\":400,\"code\":\"app_unavailable\",\"message\":\"Too many requests\"}",
     AMP_OUTCOME_PERMANENT, "app_unavailable", "Too many requests"},
    {0, 400, "{\"code\":\"invalid_param\",\"message\":\"too many requests\"}",
     AMP_OUTCOME_PERMANENT, "invalid_param", "too many requests"},
    /* keys */
    {0, 401, "{\"status\":401,\"code\":\"unauthorized\",\"message\":\"Invalid token\"}",
     AMP_OUTCOME_PAUSE_APP, "unauthorized", "Invalid token"},
    {0, 403, NULL, AMP_OUTCOME_PAUSE_APP, NULL, NULL},
    /* 404 */
    {0, 404, "{\"status\":404,\"code\":\"not_found\",\"message\":\"Conversation Not Exists.\"}",
     AMP_OUTCOME_RESET_CONVERSATION, "not_found", "Conversation Not Exists."},
    {0, 404,
     "{\"status\":404,\"code\":\"not_found\",\"message\":\"Workflow not found with id: x\"}",
     AMP_OUTCOME_PERMANENT, "not_found", "Workflow not found with id: x"},
    {0, 404, NULL, AMP_OUTCOME_PERMANENT, NULL, NULL},
    /* other 4xx */
    {0, 400, "{\"code\":\"app_unavailable\",\"message\":\"App unavailable\"}",
     AMP_OUTCOME_PERMANENT, "app_unavailable", "App unavailable"},
    {0, 405, NULL, AMP_OUTCOME_PERMANENT, NULL, NULL},
    {0, 413, NULL, AMP_OUTCOME_PERMANENT, NULL, NULL},
    {0, 422, NULL, AMP_OUTCOME_PERMANENT, NULL, NULL},
    {0, 499, NULL, AMP_OUTCOME_PERMANENT, NULL, NULL},
    /* not Dify speaking */
    {0, 301, NULL, AMP_OUTCOME_RETRY, NULL, NULL},
    {0, 100, NULL, AMP_OUTCOME_RETRY, NULL, NULL},
    {0, 0, NULL, AMP_OUTCOME_RETRY, NULL, NULL},
    {0, 700, NULL, AMP_OUTCOME_RETRY, NULL, NULL},
    /* odd bodies never crash and never leak a non-string as code */
    {0, 400, "{\"code\":12,\"message\":[1]}", AMP_OUTCOME_PERMANENT, NULL, NULL},
    {0, 400, "[1,2]", AMP_OUTCOME_PERMANENT, NULL, NULL},
    {0, 400, "\"str\"", AMP_OUTCOME_PERMANENT, NULL, NULL},
};

#define NCLASSIFY (sizeof classify_cases / sizeof classify_cases[0])

static int str_eq_null(const char *a, const char *b) {
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

START_TEST(test_classify_table) {
    const classify_case *c = &classify_cases[_i];
    json_t *body = NULL;
    if (c->body) {
        json_error_t e;
        body = json_loads(c->body, JSON_DECODE_ANY, &e);
        /* Non-JSON bodies (an HTML error page) reach classify as NULL. */
    }
    const char *code = "sentinel", *message = "sentinel";
    amp_outcome o = amp_forward_classify(c->transport, c->status, body, &code, &message);
    ck_assert_msg(o == c->want, "case %d (status %ld): outcome %d, want %d", _i, c->status, o,
                  c->want);
    ck_assert_msg(str_eq_null(code, c->code), "case %d: code '%s', want '%s'", _i,
                  code ? code : "(null)", c->code ? c->code : "(null)");
    ck_assert_msg(str_eq_null(message, c->message), "case %d: message '%s', want '%s'", _i,
                  message ? message : "(null)", c->message ? c->message : "(null)");
    /* NULL out-pointers are allowed. */
    ck_assert_int_eq(amp_forward_classify(c->transport, c->status, body, NULL, NULL), c->want);
    json_decref(body);
}
END_TEST

/* ======================================================================
 * backoff
 * ====================================================================== */

/* Reference cap computed in long double: min(max, initial * 2^attempt). */
static int64_t ref_cap(int64_t initial, int64_t max, int attempt) {
    long double v = (long double)initial * powl(2.0L, attempt < 0 ? 0 : attempt);
    if (v >= (long double)max)
        return max;
    return (int64_t)v;
}

START_TEST(test_backoff_bounds) {
    const double rnds[] = {0.0, 1e-12, 0.25, 0.5, 0.75, 0.999, nextafter(1.0, 0.0)};
    const struct {
        int64_t initial, max;
    } cfgs[] = {{1000, 300000},
                {1, 1},
                {7, 1000003},
                {1000, INT64_MAX},
                {INT64_MAX / 2, INT64_MAX},
                {INT64_MAX, INT64_MAX},
                {5000, 100}};
    for (size_t c = 0; c < sizeof cfgs / sizeof cfgs[0]; c++) {
        int64_t prev_top = 0;
        for (int attempt = 0; attempt <= 100; attempt++) {
            int64_t cap = ref_cap(cfgs[c].initial, cfgs[c].max, attempt);
            for (size_t r = 0; r < sizeof rnds / sizeof rnds[0]; r++) {
                int64_t v = amp_forward_backoff_ms(cfgs[c].initial, cfgs[c].max, attempt, rnds[r]);
                ck_assert_msg(v >= 0 && v <= cap,
                              "initial %lld max %lld attempt %d rnd %g: %lld outside [0, %lld]",
                              (long long)cfgs[c].initial, (long long)cfgs[c].max, attempt, rnds[r],
                              (long long)v, (long long)cap);
            }
            /* rnd just below 1 reaches the cap (within double precision). */
            int64_t top =
                amp_forward_backoff_ms(cfgs[c].initial, cfgs[c].max, attempt, nextafter(1.0, 0.0));
            ck_assert_msg((long double)top >= (long double)cap * (1.0L - 1e-9L),
                          "attempt %d: top %lld, cap %lld", attempt, (long long)top,
                          (long long)cap);
            ck_assert_int_ge(top, prev_top); /* the cap never shrinks */
            prev_top = top;
            ck_assert_int_eq(amp_forward_backoff_ms(cfgs[c].initial, cfgs[c].max, attempt, 0.0), 0);
        }
    }
    /* The classic numbers: 1 s doubling, capped at 300 s. */
    ck_assert_int_eq(amp_forward_backoff_ms(1000, 300000, 0, nextafter(1.0, 0.0)), 1000);
    ck_assert_int_eq(amp_forward_backoff_ms(1000, 300000, 3, nextafter(1.0, 0.0)), 8000);
    ck_assert_int_eq(amp_forward_backoff_ms(1000, 300000, 9, nextafter(1.0, 0.0)), 300000);
    ck_assert_int_eq(amp_forward_backoff_ms(1000, 300000, 2, 0.5), 2000);
    /* Out-of-range inputs stay in range. */
    ck_assert_int_eq(amp_forward_backoff_ms(1000, 300000, -5, 0.5), 500);
    ck_assert_int_eq(amp_forward_backoff_ms(1000, 300000, INT32_MAX, 1.0), 300000);
    ck_assert_int_eq(amp_forward_backoff_ms(1000, 300000, 4, 7.0), 16000);
    ck_assert_int_eq(amp_forward_backoff_ms(1000, 300000, 4, -1.0), 0);
    ck_assert_int_eq(amp_forward_backoff_ms(1000, 300000, 4, NAN), 0);
    ck_assert_int_eq(amp_forward_backoff_ms(0, 300000, 4, 0.5), 0);
    ck_assert_int_eq(amp_forward_backoff_ms(-10, 300000, 4, 0.5), 0);
    ck_assert_int_eq(amp_forward_backoff_ms(1000, 0, 4, 0.5), 0);
}
END_TEST

START_TEST(test_backoff_jitter_spreads) {
    /* Full jitter: over a fine grid of rnd the values cover the range, not
     * a few points near the cap. */
    int low = 0, high = 0;
    for (int i = 0; i < 1000; i++) {
        int64_t v = amp_forward_backoff_ms(1000, 300000, 5, i / 1000.0);
        ck_assert_int_le(v, 32000);
        low += v < 16000;
        high += v >= 16000;
    }
    ck_assert_int_ge(low, 450);
    ck_assert_int_ge(high, 450);
}
END_TEST

/* ======================================================================
 * pacing: token bucket, probe interval, deferral
 * ====================================================================== */

START_TEST(test_pace_bucket) {
    /* Unlimited: never waits, the state does not move. */
    ck_assert_int_eq(amp_forward_pace_wait_us(5000000, 0, 0, 1), 0);
    ck_assert_int_eq(amp_forward_pace_take(123, 456, 0), 123);
    ck_assert_int_eq(amp_forward_pace_wait_us(5000000, 0, NAN, 1), 0);

    /* 20/s, burst 1: one now, the next 50 ms later. */
    int64_t now = 1000000000, tat = 0;
    ck_assert_int_eq(amp_forward_pace_wait_us(tat, now, 20, 1), 0);
    tat = amp_forward_pace_take(tat, now, 20);
    ck_assert_int_eq(amp_forward_pace_wait_us(tat, now, 20, 1), 50000);
    ck_assert_int_eq(amp_forward_pace_wait_us(tat, now + 30000, 20, 1), 20000);
    ck_assert_int_eq(amp_forward_pace_wait_us(tat, now + 50000, 20, 1), 0);

    /* Burst 3 at 10/s: three at once, then one per 100 ms. */
    tat = 0;
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(amp_forward_pace_wait_us(tat, now, 10, 3), 0);
        tat = amp_forward_pace_take(tat, now, 10);
    }
    ck_assert_int_eq(amp_forward_pace_wait_us(tat, now, 10, 3), 100000);
    /* Over a long run, n requests at the earliest allowed moments take
     * (n - burst) intervals. */
    int64_t t = now;
    for (int i = 0; i < 100; i++) {
        t += amp_forward_pace_wait_us(tat, t, 10, 3);
        tat = amp_forward_pace_take(tat, t, 10);
    }
    ck_assert_int_eq(t - now, 100 * 100000);

    /* A wake-up 7 ms late keeps the schedule: the next slot is still 50 ms
     * after the previous one, not after the late send. */
    tat = amp_forward_pace_take(0, now, 20); /* slot 1 at now + 50 ms */
    tat = amp_forward_pace_take(tat, now + 57000, 20);
    ck_assert_int_eq(amp_forward_pace_wait_us(tat, now + 57000, 20, 1), 43000);
    /* An app idle for a while starts afresh: no saved-up burst beyond burst. */
    tat = amp_forward_pace_take(tat, now + 10000000, 20);
    ck_assert_int_eq(amp_forward_pace_wait_us(tat, now + 10000000, 20, 1), 50000);

    /* Tiny rates and huge bursts do not overflow. */
    ck_assert_int_eq(amp_forward_pace_wait_us(0, now, 1e-9, 1000000), 0);
    tat = amp_forward_pace_take(0, now, 1e-9);
    ck_assert_int_gt(amp_forward_pace_wait_us(tat, now, 1e-9, 1), 0);
    ck_assert_int_gt(tat, now);
}
END_TEST

START_TEST(test_pause_interval) {
    /* 1 s, 2 s, 4 s ... up to 5 minutes, whatever retry.max_ms is: a
     * revoked key is fixed by a person, not by the event's backoff. */
    ck_assert_int_eq(amp_forward_pause_interval_ms(1), 1000);
    ck_assert_int_eq(amp_forward_pause_interval_ms(2), 2000);
    ck_assert_int_eq(amp_forward_pause_interval_ms(3), 4000);
    ck_assert_int_eq(amp_forward_pause_interval_ms(9), 256000);
    ck_assert_int_eq(amp_forward_pause_interval_ms(10), AMP_FORWARD_PAUSE_MAX_MS);
    ck_assert_int_eq(amp_forward_pause_interval_ms(62), AMP_FORWARD_PAUSE_MAX_MS);
    ck_assert_int_eq(amp_forward_pause_interval_ms(INT32_MAX), AMP_FORWARD_PAUSE_MAX_MS);
    ck_assert_int_eq(amp_forward_pause_interval_ms(0), 1000);
    ck_assert_int_ge(AMP_FORWARD_PAUSE_MAX_MS, 60000); /* minutes, not seconds */
    /* Growing, never shrinking. */
    for (int k = 1; k < 80; k++)
        ck_assert_int_le(amp_forward_pause_interval_ms(k), amp_forward_pause_interval_ms(k + 1));
}
END_TEST

START_TEST(test_defer_schedule) {
    /* The rate an app can keep: its limit, or max_in_flight / latency. */
    ck_assert(fabs(amp_forward_effective_rate(20, 4, 0) - 20) < 1e-9);
    ck_assert(fabs(amp_forward_effective_rate(20, 4, 1000) - 4) < 1e-9);
    ck_assert(fabs(amp_forward_effective_rate(0, 8, 50) - 160) < 1e-9);
    ck_assert(fabs(amp_forward_effective_rate(0, 8, 0) -
                   8 * 1000.0 / AMP_FORWARD_DEFAULT_LATENCY_MS) < 1e-9);
    ck_assert(amp_forward_effective_rate(0, 0, 1e12) > 0);

    /* A full queue of 16 at 20/s: the first row comes back when half of it
     * is gone (8 x 50 ms), the next ones 50 ms apart. */
    int64_t next = 0, now = 1000000;
    ck_assert_int_eq(amp_forward_defer_due_ms(&next, now, 20, 16, 16), now + 400);
    ck_assert_int_eq(amp_forward_defer_due_ms(&next, now, 20, 16, 16), now + 450);
    ck_assert_int_eq(amp_forward_defer_due_ms(&next, now + 10, 20, 16, 16), now + 500);
    /* Later, with an older schedule already past, it starts afresh. */
    ck_assert_int_eq(amp_forward_defer_due_ms(&next, now + 60000, 20, 8, 16),
                     now + 60000 + AMP_FORWARD_DEFER_MIN_MS);
    /* Never sooner than the minimum, never absurdly late. */
    next = 0;
    ck_assert_int_eq(amp_forward_defer_due_ms(&next, now, 1e9, 1000, 16), now + 20);
    next = 0;
    int64_t due = amp_forward_defer_due_ms(&next, now, 0, 1000000, 16);
    ck_assert_int_le(due, now + 86400000);
    ck_assert_int_gt(due, now);
}
END_TEST

/* ======================================================================
 * Retry-After
 * ====================================================================== */

#define DAY_MS ((int64_t)86400 * 1000)
/* Sun, 06 Nov 1994 08:49:37 GMT */
#define T1994 ((int64_t)784111777)

START_TEST(test_retry_after) {
    int64_t now = T1994 * 1000 - 30000; /* 30 s before that date */
    ck_assert_int_eq(amp_forward_retry_after_ms("120", now), 120000);
    ck_assert_int_eq(amp_forward_retry_after_ms("0", now), 0);
    ck_assert_int_eq(amp_forward_retry_after_ms("007", now), 7000);
    ck_assert_int_eq(amp_forward_retry_after_ms("  5 \r\n", now), 5000);
    ck_assert_int_eq(amp_forward_retry_after_ms("86400", now), DAY_MS);
    /* Huge values are capped, not overflowed. */
    ck_assert_int_eq(amp_forward_retry_after_ms("86401", now), DAY_MS);
    ck_assert_int_eq(amp_forward_retry_after_ms("9223372036854775807", now), DAY_MS);
    ck_assert_int_eq(amp_forward_retry_after_ms("99999999999999999999999999999999", now), DAY_MS);
    /* Dates. */
    ck_assert_int_eq(amp_forward_retry_after_ms("Sun, 06 Nov 1994 08:49:37 GMT", now), 30000);
    ck_assert_int_eq(amp_forward_retry_after_ms("Sun, 06 Nov 1994 08:49:37 GMT", now + 29500), 500);
    ck_assert_int_eq(amp_forward_retry_after_ms(" Sun, 06 Nov 1994 08:49:37 GMT ", now), 30000);
    ck_assert_int_eq(amp_forward_retry_after_ms("Sun, 06 Nov 1994 08:49:37 GMT", now + 60000),
                     0); /* in the past: no extra wait */
    ck_assert_int_eq(amp_forward_retry_after_ms("Mon, 07 Nov 1994 08:49:37 GMT", now), DAY_MS);
    ck_assert_int_eq(amp_forward_retry_after_ms("Fri, 31 Dec 9999 23:59:59 GMT", now), DAY_MS);
    ck_assert_int_eq(amp_forward_retry_after_ms("Thu, 01 Jan 1970 00:00:00 GMT", now), 0);
    /* What curl_getdate also reads (a zone spelt UTC, none, short fields). */
    ck_assert_int_eq(amp_forward_retry_after_ms("Sun, 06 Nov 1994 08:49:37 UTC", now), 30000);
    ck_assert_int_eq(amp_forward_retry_after_ms("Sun, 6 Nov 1994 08:49:37 GMT", now), 30000);
    /* RFC 9110 5.6.7: a recipient accepts the two obsolete forms too. */
    ck_assert_int_eq(amp_forward_retry_after_ms("Sunday, 06-Nov-94 08:49:37 GMT", now), 30000);
    ck_assert_int_eq(amp_forward_retry_after_ms("Sun Nov  6 08:49:37 1994", now), 30000);
    ck_assert_int_eq(amp_forward_retry_after_ms(" Sun Nov  6 08:49:37 1994\r\n", now + 10000),
                     20000);
    ck_assert_int_eq(amp_forward_retry_after_ms("Sat, 29 Feb 2020 12:00:00 GMT",
                                                (int64_t)1582977600 * 1000 - 1000),
                     1000);
    /* Garbage, negative, partial. */
    const char *bad[] = {"",
                         "   ",
                         "abc",
                         "-5",
                         "+5",
                         "5s",
                         "1.5",
                         "5 6",
                         "0x10",
                         "Xyz, 06 Nov 1994 08:49:37 GMT",
                         "Sun, 06 Foo 1994 08:49:37 GMT",
                         "Sun, 32 Nov 1994 08:49:37 GMT",
                         "Sun, 06 Nov 1994 25:49:37 GMT",
                         "Sun, 06 Nov 1994 08:61:37 GMT",
                         "Sun, 06 Nov 1994 08:49:37 GMTX"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(amp_forward_retry_after_ms(bad[i], now) == -1, "'%s' accepted", bad[i]);
    ck_assert_int_eq(amp_forward_retry_after_ms(NULL, now), -1);
}
END_TEST

/* ======================================================================
 * URL, body, result
 * ====================================================================== */

/* X-Trace-Id: Dify takes ^[A-Za-z0-9_-]{1,128}$ only. */
START_TEST(test_trace_id) {
    char out[AMP_FORWARD_TRACE_ID_MAX + 1];
    amp_forward_trace_id("ev-1_A9", out);
    ck_assert_str_eq(out, "ev-1_A9");
    amp_forward_trace_id(NULL, out);
    ck_assert_str_eq(out, "");
    amp_forward_trace_id("", out);
    ck_assert_str_eq(out, "");
    char k[200];
    memset(k, 'a', 128);
    k[128] = '\0';
    amp_forward_trace_id(k, out);
    ck_assert_str_eq(out, k); /* 128 is still plain */
    k[128] = 'a';
    k[129] = '\0';
    amp_forward_trace_id(k, out);
    ck_assert_uint_eq(strlen(out), 64); /* 129 is hashed */
    const char *odd[] = {"a.b", "uuid:1", "x y", "\xc3\xa9", "a\r\nb", k};
    char first[AMP_FORWARD_TRACE_ID_MAX + 1];
    for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++) {
        amp_forward_trace_id(odd[i], out);
        ck_assert_uint_eq(strlen(out), 64);
        for (const char *c = out; *c; c++)
            ck_assert((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'f'));
        /* The same key, the same id: a retry is traced as the same event. */
        amp_forward_trace_id(odd[i], first);
        ck_assert_str_eq(out, first);
    }
    amp_forward_trace_id("a.b", out);
    amp_forward_trace_id("a.c", first);
    ck_assert_str_ne(out, first);
}
END_TEST

START_TEST(test_join_url) {
    const char *cases[][3] = {
        {"http://h/v1", "chat-messages", "http://h/v1/chat-messages"},
        {"http://h/v1/", "chat-messages", "http://h/v1/chat-messages"},
        {"http://h/v1///", "workflows/run", "http://h/v1/workflows/run"},
        {"http://h", "/completion-messages", "http://h/completion-messages"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *u = amp_forward_join_url(cases[i][0], cases[i][1]);
        ck_assert_str_eq(u, cases[i][2]);
        free(u);
    }
    ck_assert_str_eq(amp_map_endpoint_path(AMP_ENDPOINT_CHAT), "chat-messages");
}
END_TEST

START_TEST(test_request_body) {
    const char *body = "{\"inputs\":{\"a\":1},\"query\":\"q\",\"user\":\"u1\"}";
    char *out = amp_forward_request_body(body, NULL, NULL);
    ck_assert_str_eq(out, body); /* untouched bytes */
    free(out);
    out = amp_forward_request_body(body, "", NULL);
    ck_assert_str_eq(out, body);
    free(out);

    out = amp_forward_request_body(body, "conv-9", NULL);
    json_error_t e;
    json_t *j = json_loads(out, 0, &e);
    ck_assert_ptr_nonnull(j);
    ck_assert_str_eq(json_string_value(json_object_get(j, "conversation_id")), "conv-9");
    ck_assert_str_eq(json_string_value(json_object_get(j, "query")), "q");
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "inputs"), "a")), 1);
    json_decref(j);
    free(out);

    /* A stored conversation id replaces one already in the body. */
    out = amp_forward_request_body("{\"conversation_id\":\"old\",\"user\":\"u\"}", "new", NULL);
    ck_assert_ptr_nonnull(strstr(out, "\"new\""));
    ck_assert_ptr_null(strstr(out, "old"));
    free(out);

    out = amp_forward_request_body("{\"user\":\"u\"}", "c1", "wf-1");
    ck_assert_str_eq(out, "{\"user\":\"u\",\"conversation_id\":\"c1\",\"workflow_id\":\"wf-1\"}");
    free(out);
    out = amp_forward_request_body("{\"user\":\"u\"}", NULL, "wf-1");
    ck_assert_str_eq(out, "{\"user\":\"u\",\"workflow_id\":\"wf-1\"}");
    free(out);
    ck_assert_ptr_null(amp_forward_request_body("[1]", NULL, NULL));
    ck_assert_ptr_null(amp_forward_request_body("", NULL, NULL));
    ck_assert_ptr_null(amp_forward_request_body("[1]", "c", NULL));
    ck_assert_ptr_null(amp_forward_request_body("{broken", "c", NULL));
}
END_TEST

START_TEST(test_utf8_cut) {
    const char *s = "a\xc3\xa9"
                    "b\xf0\x9f\x98\x80"
                    "c"; /* a é b 😀 c : 1+2+1+4+1 = 9 bytes */
    size_t len = strlen(s);
    ck_assert_uint_eq(amp_forward_utf8_cut(s, len, 100), len);
    ck_assert_uint_eq(amp_forward_utf8_cut(s, len, 9), 9);
    ck_assert_uint_eq(amp_forward_utf8_cut(s, len, 8), 8);
    ck_assert_uint_eq(amp_forward_utf8_cut(s, len, 7), 4); /* inside the emoji */
    ck_assert_uint_eq(amp_forward_utf8_cut(s, len, 6), 4);
    ck_assert_uint_eq(amp_forward_utf8_cut(s, len, 5), 4);
    ck_assert_uint_eq(amp_forward_utf8_cut(s, len, 4), 4);
    ck_assert_uint_eq(amp_forward_utf8_cut(s, len, 3), 3);
    ck_assert_uint_eq(amp_forward_utf8_cut(s, len, 2), 1); /* inside é */
    ck_assert_uint_eq(amp_forward_utf8_cut(s, len, 0), 0);
    /* Every cut of a long mixed string is valid UTF-8. */
    amp_buf b;
    amp_buf_init(&b, 1 << 16);
    for (int i = 0; i < 500; i++)
        amp_buf_append(&b, s, len);
    for (size_t max = 0; max < 200; max++) {
        size_t n = amp_forward_utf8_cut(b.data, b.len, max);
        ck_assert_uint_le(n, max);
        ck_assert_uint_ge(n + 3, max);
        json_t *v = json_stringn(b.data, n);
        ck_assert_msg(v != NULL, "cut at %zu is not valid UTF-8", max);
        json_decref(v);
    }
    amp_buf_free(&b);
}
END_TEST

static json_t *parse(const char *text) {
    json_error_t e;
    json_t *j = json_loads(text, 0, &e);
    ck_assert_msg(j != NULL, "bad test JSON: %s", e.text);
    return j;
}

START_TEST(test_result_chat) {
    json_t *body = parse("{\"event\":\"message\",\"task_id\":\"t\",\"id\":\"i\","
                         "\"message_id\":\"m-1\",\"conversation_id\":\"c-1\",\"mode\":\"chat\","
                         "\"answer\":\"Hello\",\"metadata\":{\"usage\":{\"prompt_tokens\":10,"
                         "\"completion_tokens\":5,\"total_tokens\":15,\"total_price\":\"0.1\","
                         "\"currency\":\"USD\"}},\"created_at\":1}");
    json_t *r = amp_forward_result(AMP_ENDPOINT_CHAT, 200, body, 42);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "status")), 200);
    ck_assert_str_eq(json_string_value(json_object_get(r, "message_id")), "m-1");
    ck_assert_str_eq(json_string_value(json_object_get(r, "conversation_id")), "c-1");
    ck_assert_int_eq(json_integer_value(json_object_get(r, "latency_ms")), 42);
    ck_assert_str_eq(json_string_value(json_object_get(r, "answer")), "Hello");
    json_t *u = json_object_get(r, "usage");
    ck_assert_int_eq(json_integer_value(json_object_get(u, "prompt_tokens")), 10);
    ck_assert_int_eq(json_integer_value(json_object_get(u, "completion_tokens")), 5);
    ck_assert_int_eq(json_integer_value(json_object_get(u, "total_tokens")), 15);
    ck_assert_ptr_null(json_object_get(u, "currency"));
    ck_assert_ptr_null(json_object_get(r, "answer_truncated"));
    ck_assert_str_eq(amp_forward_answer_conversation(body), "c-1");
    json_decref(r);
    json_decref(body);

    /* No body (204, unparsable 200): still a result. */
    r = amp_forward_result(AMP_ENDPOINT_COMPLETION, 204, NULL, 1);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "status")), 204);
    ck_assert_ptr_null(json_object_get(r, "message_id"));
    json_decref(r);
    ck_assert_ptr_null(amp_forward_answer_conversation(NULL));
}
END_TEST

START_TEST(test_result_answer_cap) {
    /* 3000 two-byte characters = 6000 bytes, cut to <= 4096 on a boundary. */
    amp_buf b;
    amp_buf_init(&b, 1 << 16);
    amp_buf_append(&b, "x", 1); /* odd offset: a naive cut lands mid-character */
    for (int i = 0; i < 3000; i++)
        amp_buf_append(&b, "\xc3\xa9", 2);
    json_t *body = json_pack("{s:s, s:s%}", "message_id", "m", "answer", b.data, b.len);
    ck_assert_ptr_nonnull(body);
    json_t *r = amp_forward_result(AMP_ENDPOINT_CHAT, 200, body, 1);
    json_t *a = json_object_get(r, "answer");
    ck_assert(json_is_string(a));
    ck_assert_uint_le(json_string_length(a), AMP_FORWARD_ANSWER_CAP);
    ck_assert_uint_ge(json_string_length(a), AMP_FORWARD_ANSWER_CAP - 3);
    ck_assert_uint_eq(json_string_length(a) % 2, 1); /* "x" + whole characters */
    ck_assert(json_is_true(json_object_get(r, "answer_truncated")));
    json_decref(r);
    json_decref(body);
    amp_buf_free(&b);
}
END_TEST

START_TEST(test_result_workflow) {
    json_t *body =
        parse("{\"task_id\":\"t\",\"workflow_run_id\":\"wr-1\",\"data\":{\"id\":\"wr-1\","
              "\"status\":\"succeeded\",\"outputs\":{\"result\":\"Bonjour\"},"
              "\"error\":null,\"total_tokens\":150}}");
    json_t *r = amp_forward_result(AMP_ENDPOINT_WORKFLOW, 200, body, 7);
    ck_assert_str_eq(json_string_value(json_object_get(r, "workflow_run_id")), "wr-1");
    ck_assert_str_eq(json_string_value(json_object_get(r, "workflow_status")), "succeeded");
    ck_assert_int_eq(
        json_integer_value(json_object_get(json_object_get(r, "usage"), "total_tokens")), 150);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(r, "outputs"), "result")),
                     "Bonjour");
    ck_assert_ptr_null(json_object_get(r, "message_id"));
    json_decref(r);
    json_decref(body);

    /* Big outputs: kept as capped text instead. */
    char *big = amp_xmalloc(10001);
    memset(big, 'o', 10000);
    big[10000] = '\0';
    body = json_pack("{s:s, s:{s:s, s:{s:s}}}", "workflow_run_id", "w", "data", "status",
                     "succeeded", "outputs", "text", big);
    r = amp_forward_result(AMP_ENDPOINT_WORKFLOW, 200, body, 7);
    ck_assert_ptr_null(json_object_get(r, "outputs"));
    ck_assert_uint_eq(json_string_length(json_object_get(r, "answer")), AMP_FORWARD_ANSWER_CAP);
    json_decref(r);
    json_decref(body);
    free(big);
}
END_TEST

/* ======================================================================
 * SSE
 * ====================================================================== */

static const char chat_stream[] =
    ": keep-alive comment\n"
    "event: ping\n\n"
    "data: {\"event\": \"message\", \"task_id\": \"t1\", \"message_id\": \"m1\", "
    "\"conversation_id\": \"c1\", \"answer\": \" I\", \"created_at\": 1}\n\n"
    "data: {\"event\": \"message\", \"task_id\": \"t1\", \"message_id\": \"m1\", "
    "\"conversation_id\": \"c1\", \"answer\": \"'m \\u00e9\", \"created_at\": 1}\n\n"
    "data: {\"event\": \"message_end\", \"task_id\": \"t1\", \"id\": \"x\", \"message_id\": "
    "\"m1\", \"conversation_id\": \"c1\", \"metadata\": {\"usage\": {\"prompt_tokens\": 3, "
    "\"completion_tokens\": 4, \"total_tokens\": 7}}}\n\n";

static void check_chat_fold(json_t *r, bool complete) {
    ck_assert(complete);
    ck_assert_ptr_nonnull(r);
    ck_assert_str_eq(json_string_value(json_object_get(r, "answer")), " I'm \xc3\xa9");
    ck_assert_str_eq(json_string_value(json_object_get(r, "message_id")), "m1");
    ck_assert_str_eq(json_string_value(json_object_get(r, "conversation_id")), "c1");
    json_t *usage = json_object_get(json_object_get(r, "metadata"), "usage");
    ck_assert_int_eq(json_integer_value(json_object_get(usage, "total_tokens")), 7);
    ck_assert_int_eq(amp_forward_classify(0, 200, r, NULL, NULL), AMP_OUTCOME_DELIVERED);
}

/* Replace every "\n" of src by the line break br. */
static char *with_breaks(const char *src, const char *br) {
    amp_buf b;
    amp_buf_init(&b, 1 << 20);
    for (const char *p = src; *p; p++) {
        if (*p == '\n')
            amp_buf_append(&b, br, strlen(br));
        else
            amp_buf_append(&b, p, 1);
    }
    return b.data;
}

START_TEST(test_sse_every_split) {
    const char *breaks[] = {"\n", "\r\n", "\r"};
    amp_forward_sse *p = amp_forward_sse_create();
    for (size_t k = 0; k < 3; k++) {
        char *text = with_breaks(chat_stream, breaks[k]);
        size_t len = strlen(text);
        /* Two pieces, split at every offset. */
        for (size_t cut = 0; cut <= len; cut++) {
            amp_forward_sse_reset(p);
            ck_assert_int_eq(amp_forward_sse_feed(p, text, cut), 0);
            ck_assert_int_eq(amp_forward_sse_feed(p, text + cut, len - cut), 0);
            bool complete = false;
            json_t *r = amp_forward_sse_finish(p, &complete);
            check_chat_fold(r, complete);
            json_decref(r);
        }
        /* One byte at a time. */
        amp_forward_sse_reset(p);
        for (size_t i = 0; i < len; i++)
            ck_assert_int_eq(amp_forward_sse_feed(p, text + i, 1), 0);
        bool complete = false;
        json_t *r = amp_forward_sse_finish(p, &complete);
        check_chat_fold(r, complete);
        json_decref(r);
        free(text);
    }
    amp_forward_sse_destroy(p);
}
END_TEST

static json_t *fold(const char *text, bool *complete) {
    amp_forward_sse *p = amp_forward_sse_create();
    ck_assert_int_eq(amp_forward_sse_feed(p, text, strlen(text)), 0);
    json_t *r = amp_forward_sse_finish(p, complete);
    amp_forward_sse_destroy(p);
    return r;
}

START_TEST(test_sse_events) {
    bool complete;
    /* An error event inside a 200 stream. */
    json_t *r = fold("data: {\"event\":\"message\",\"answer\":\"par\",\"message_id\":\"m\"}\n\n"
                     "data: {\"event\":\"error\",\"message_id\":\"m\",\"status\":400,"
                     "\"code\":\"completion_request_error\",\"message\":\"quota\"}\n\n",
                     &complete);
    ck_assert(complete);
    ck_assert_str_eq(json_string_value(json_object_get(r, "event")), "error");
    ck_assert_int_eq(json_integer_value(json_object_get(r, "status")), 400);
    const char *code, *msg;
    ck_assert_int_eq(amp_forward_classify(0, 400, r, &code, &msg), AMP_OUTCOME_PERMANENT);
    ck_assert_str_eq(code, "completion_request_error");
    ck_assert_str_eq(msg, "quota");
    json_decref(r);

    /* Workflow: text chunks ignored, workflow_finished carries the result. */
    r = fold(
        "data: {\"event\":\"workflow_started\",\"workflow_run_id\":\"wr\",\"data\":{}}\n\n"
        "data: {\"event\":\"text_chunk\",\"workflow_run_id\":\"wr\",\"data\":{\"text\":\"B\"}}\n\n"
        "data: {\"event\":\"workflow_finished\",\"workflow_run_id\":\"wr\",\"data\":"
        "{\"status\":\"failed\",\"error\":\"node broke\",\"total_tokens\":9}}\n\n",
        &complete);
    ck_assert(complete);
    ck_assert_str_eq(json_string_value(json_object_get(r, "workflow_run_id")), "wr");
    ck_assert_int_eq(amp_forward_classify(0, 200, r, &code, &msg), AMP_OUTCOME_PERMANENT);
    ck_assert_str_eq(code, "workflow_failed");
    ck_assert_str_eq(msg, "node broke");
    json_decref(r);

    /* A stream cut short: not complete. */
    r = fold("data: {\"event\":\"message\",\"answer\":\"par\",\"message_id\":\"m\"}\n\n",
             &complete);
    ck_assert(!complete);
    json_decref(r);

    /* Last event without the closing blank line still counts; multi-line
     * data is joined with \n (valid JSON whitespace); the event name may
     * come from the "event:" field. */
    r = fold("event: message_end\ndata: {\"message_id\":\"m\",\ndata: \"metadata\":{}}", &complete);
    ck_assert(complete);
    ck_assert_str_eq(json_string_value(json_object_get(r, "message_id")), "m");
    json_decref(r);

    /* message_replace replaces; agent_message then message: the closing
     * message is the whole answer. */
    r = fold("data: {\"event\":\"message\",\"answer\":\"bad words\"}\n\n"
             "data: {\"event\":\"message_replace\",\"answer\":\"[removed]\"}\n\n"
             "data: {\"event\":\"message_end\",\"metadata\":{}}\n\n",
             &complete);
    ck_assert_str_eq(json_string_value(json_object_get(r, "answer")), "[removed]");
    json_decref(r);
    r = fold("data: {\"event\":\"agent_message\",\"answer\":\"Hel\"}\n\n"
             "data: {\"event\":\"agent_message\",\"answer\":\"lo\"}\n\n"
             "data: {\"event\":\"message\",\"answer\":\"Hello!\"}\n\n"
             "data: {\"event\":\"message_end\",\"metadata\":{}}\n\n",
             &complete);
    ck_assert_str_eq(json_string_value(json_object_get(r, "answer")), "Hello!");
    json_decref(r);

    /* A workflow paused for human input: complete, no result, its run id
     * kept; the exchange says it waits. */
    amp_forward_exchange ex = {0};
    r = fold("data: {\"event\":\"workflow_started\",\"workflow_run_id\":\"wr2\",\"data\":{}}\n\n"
             "data: {\"event\":\"human_input_required\",\"workflow_run_id\":\"wr2\","
             "\"data\":{\"form_token\":\"t\"}}\n\n"
             "data: {\"event\":\"workflow_paused\",\"workflow_run_id\":\"wr2\","
             "\"data\":{\"status\":\"paused\"}}\n\n",
             &complete);
    ck_assert(complete);
    ex.status = 200;
    amp_forward_exchange_answer(&ex, r);
    ck_assert(ex.waiting_input);
    ck_assert_str_eq(ex.run_id, "wr2");
    ck_assert_int_eq(amp_forward_outcome(&ex, &code, &msg), AMP_OUTCOME_WAITING_INPUT);
    ck_assert_str_eq(code, "waiting_input");
    json_decref(r);
    /* human_input_required alone (a chatflow whose stream ends there). */
    r = fold("data: {\"event\":\"message\",\"answer\":\"Draft\",\"workflow_run_id\":\"w3\"}\n\n"
             "data: {\"event\":\"human_input_required\",\"workflow_run_id\":\"w3\"}\n\n",
             &complete);
    ck_assert(complete);
    ck_assert_int_eq(amp_forward_classify(0, 200, r, NULL, NULL), AMP_OUTCOME_WAITING_INPUT);
    json_decref(r);
    /* A resumed stream: the form was filled, the run goes on to its end. */
    r = fold("data: {\"event\":\"human_input_form_filled\",\"workflow_run_id\":\"w4\"}\n\n"
             "data: {\"event\":\"workflow_finished\",\"workflow_run_id\":\"w4\","
             "\"data\":{\"status\":\"succeeded\"}}\n\n",
             &complete);
    ck_assert(complete);
    ck_assert_int_eq(amp_forward_classify(0, 200, r, NULL, NULL), AMP_OUTCOME_DELIVERED);
    json_decref(r);
    /* A stream cut after its first event still tells the run id. */
    r = fold("data: {\"event\":\"workflow_started\",\"workflow_run_id\":\"w5\",\"data\":{}}\n\n",
             &complete);
    ck_assert(!complete);
    ck_assert_str_eq(json_string_value(json_object_get(r, "workflow_run_id")), "w5");
    json_decref(r);

    /* Garbage data lines are skipped, not fatal. */
    r = fold("data: not json\n\ndata: {\"event\":\"ping\"}\n\n", &complete);
    ck_assert(!complete);
    ck_assert_ptr_null(r);
}
END_TEST

START_TEST(test_sse_limits) {
    /* The answer is capped whatever the stream's length. */
    amp_forward_sse *p = amp_forward_sse_create();
    const char *chunk = "data: {\"event\":\"message\",\"answer\":\"\\u00e9\\u00e9\\u00e9\"}\n\n";
    for (int i = 0; i < 5000; i++)
        ck_assert_int_eq(amp_forward_sse_feed(p, chunk, strlen(chunk)), 0);
    const char *end = "data: {\"event\":\"message_end\",\"metadata\":{}}\n\n";
    ck_assert_int_eq(amp_forward_sse_feed(p, end, strlen(end)), 0);
    bool complete;
    json_t *r = amp_forward_sse_finish(p, &complete);
    ck_assert(complete);
    size_t alen = json_string_length(json_object_get(r, "answer"));
    ck_assert_uint_le(alen, AMP_FORWARD_ANSWER_CAP);
    ck_assert_uint_ge(alen, AMP_FORWARD_ANSWER_CAP - 1);
    json_decref(r);

    /* One line longer than the response cap is refused. */
    amp_forward_sse_reset(p);
    char *big = amp_xmalloc(64 * 1024);
    memset(big, 'a', 64 * 1024);
    int rc = 0;
    for (size_t i = 0; i < AMP_FORWARD_MAX_RESPONSE / (64 * 1024) + 2 && rc == 0; i++)
        rc = amp_forward_sse_feed(p, big, 64 * 1024);
    ck_assert_int_eq(rc, -1);
    free(big);
    amp_forward_sse_destroy(p);
}
END_TEST

static int64_t mono_ms(void) {
    return amp_mono_ms();
}

static void sleep_ms(unsigned ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ======================================================================
 * engine harness: spool + forwarder + fake
 * ====================================================================== */

typedef struct {
    char path[256];
    amp_queue *spool;
    fake_dify *fake;
    amp_forward *fwd;
    amp_app apps[3];
    const amp_app *app_ptrs[3];
    const char *keys[3];
    char base[128];
    amp_forward_opts opts;
} harness;

static void harness_init(harness *h, unsigned workers) {
    memset(h, 0, sizeof *h);
    static int seq;
    snprintf(h->path, sizeof h->path, "/tmp/amp-test-forward-%d-%d.db", (int)getpid(), seq++);
    unlink(h->path);
    char err[256];
    amp_spool_opts so = {.path = h->path, .dedupe_window_s = 0};
    h->spool = amp_spool_open(&so, err, sizeof err);
    ck_assert_msg(h->spool != NULL, "spool: %s", err);

    h->apps[0] = (amp_app){.name = "chat", .endpoint = AMP_ENDPOINT_CHAT};
    h->apps[1] = (amp_app){.name = "flow", .endpoint = AMP_ENDPOINT_WORKFLOW};
    h->apps[2] = (amp_app){.name = "done", .endpoint = AMP_ENDPOINT_COMPLETION};
    for (int i = 0; i < 3; i++)
        h->app_ptrs[i] = &h->apps[i];
    h->keys[0] = "app-SECRETKEY-chat";
    h->keys[1] = "app-SECRETKEY-flow";
    h->keys[2] = "app-SECRETKEY-done";
    /* One fake Dify with a key per app, as a real workspace has. */
    h->fake = fake_dify_start(0, h->keys[0]);
    ck_assert_ptr_nonnull(h->fake);
    fake_dify_add_key(h->fake, h->keys[1]);
    fake_dify_add_key(h->fake, h->keys[2]);
    snprintf(h->base, sizeof h->base, "http://127.0.0.1:%u/v1/", (unsigned)fake_dify_port(h->fake));
    h->opts = (amp_forward_opts){.base_url = h->base,
                                 .connect_timeout_s = 2,
                                 .timeout_s = 5,
                                 .workers = workers,
                                 .retry_initial_ms = 20,
                                 .retry_max_ms = 100,
                                 .retry_max_age_s = 3600,
                                 .napps = 3,
                                 .apps = h->app_ptrs,
                                 .api_keys = h->keys};
}

static void harness_start(harness *h) {
    char err[256];
    h->fwd = amp_forward_start(&h->opts, h->spool, err, sizeof err);
    ck_assert_msg(h->fwd != NULL, "start: %s", err);
}

static void harness_done(harness *h) {
    amp_forward_stop(h->fwd);
    h->fwd = NULL;
    fake_dify_stop(h->fake);
    amp_queue_close(h->spool);
    char p[300];
    unlink(h->path);
    snprintf(p, sizeof p, "%s-wal", h->path);
    unlink(p);
    snprintf(p, sizeof p, "%s-shm", h->path);
    unlink(p);
}

static void on_done(void *ctx, const amp_queue_result *res) {
    atomic_int *st = ctx;
    atomic_store(st, res->status == 0 ? 1 : -1);
}

/* Stores b (taken) and waits until it is durable. */
static void submit_batch(harness *h, amp_queue_batch *b) {
    static atomic_int st;
    atomic_store(&st, 0);
    amp_queue_submit(h->spool, b, on_done, &st);
    amp_queue_flush(h->spool);
    ck_assert_int_eq(atomic_load(&st), 1);
}

static void submit(harness *h, const char *dedupe, const char *app, const char *user, bool per_user,
                   const char *body) {
    amp_queue_batch *b = amp_queue_batch_create();
    amp_queue_batch_event(b, dedupe);
    amp_queue_batch_request(b, "r1", app, user, per_user, body);
    submit_batch(h, b);
}

/* Wait (bounded) until delivered + dead reaches n. */
static void wait_finished(harness *h, int64_t n, int timeout_ms) {
    amp_queue_stats s = {0};
    int64_t end = mono_ms() + timeout_ms;
    while (mono_ms() < end) {
        ck_assert_int_eq(amp_queue_stats_get(h->spool, &s), 0);
        if (s.delivered + s.dead >= n)
            return;
        sleep_ms(10);
    }
    ck_abort_msg("timed out: delivered %lld dead %lld pending %lld, want %lld finished",
                 (long long)s.delivered, (long long)s.dead, (long long)s.pending, (long long)n);
}

/* Requests that reached the fake Dify: answered, still delayed, or dropped. */
static size_t fake_count(fake_dify *f) {
    return fake_dify_arrived(f);
}

static void wait_requests(harness *h, size_t n, int timeout_ms) {
    ck_assert_uint_ge(fake_dify_wait_arrived(h->fake, n, (unsigned)timeout_ms), n);
}

typedef struct {
    int state, attempts, last_status;
    char last_code[64], last_message[256];
    json_t *result;
    int64_t due_ms;
} row_t;

static row_t get_row(harness *h, int64_t id) {
    row_t r;
    memset(&r, 0, sizeof r);
    sqlite3 *db;
    ck_assert_int_eq(sqlite3_open_v2(h->path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_stmt *st;
    ck_assert_int_eq(sqlite3_prepare_v2(db,
                                        "SELECT state, attempts, coalesce(last_status,0), "
                                        "coalesce(last_code,''), coalesce(last_message,''), "
                                        "result, due_ms FROM deliveries WHERE id = ?1",
                                        -1, &st, NULL),
                     SQLITE_OK);
    sqlite3_bind_int64(st, 1, id);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    r.state = sqlite3_column_int(st, 0);
    r.attempts = sqlite3_column_int(st, 1);
    r.last_status = sqlite3_column_int(st, 2);
    snprintf(r.last_code, sizeof r.last_code, "%s", sqlite3_column_text(st, 3));
    snprintf(r.last_message, sizeof r.last_message, "%s", sqlite3_column_text(st, 4));
    const unsigned char *res = sqlite3_column_text(st, 5);
    if (res) {
        json_error_t e;
        r.result = json_loads((const char *)res, 0, &e);
    }
    r.due_ms = sqlite3_column_int64(st, 6);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return r;
}

/* What the fake Dify recorded of request i (in the order answered; every
 * test reading these sends one request at a time). Caller owns. */
static json_t *seen(harness *h, size_t i) {
    json_t *all = fake_dify_requests(h->fake);
    ck_assert_uint_lt(i, json_array_size(all));
    json_t *r = json_incref(json_array_get(all, i));
    json_decref(all);
    return r;
}

/* A string field of request i; "" for null (a header not sent). */
static const char *seen_str(json_t *r, const char *key) {
    const char *v = json_string_value(json_object_get(r, key));
    return v ? v : "";
}

static json_t *seen_body(harness *h, size_t i) {
    json_t *r = seen(h, i);
    json_t *b = json_incref(json_object_get(r, "body"));
    json_decref(r);
    ck_assert_ptr_nonnull(b);
    return b;
}

/* The JSON of Dify's blocking answer to request i. Caller owns. */
static json_t *seen_answer(harness *h, size_t i) {
    json_t *r = seen(h, i);
    json_error_t e;
    json_t *a = json_loads(seen_str(r, "response"), 0, &e);
    json_decref(r);
    ck_assert_ptr_nonnull(a);
    return a;
}

#define CHAT_BODY                                                                                  \
    "{\"inputs\":{},\"query\":\"hello\",\"user\":\"u1\",\"response_mode\":\"blocking\"}"

/* A batch (the caller's) of n events of route r1 to app, each CHAT_BODY:
 * all of user, or with user NULL each of its own ("u0", "u1", ...). */
static amp_queue_batch *batch_of(int n, const char *app, const char *user, bool per_user) {
    amp_queue_batch *b = amp_queue_batch_create();
    for (int i = 0; i < n; i++) {
        char u[16];
        snprintf(u, sizeof u, "u%d", i);
        amp_queue_batch_event(b, NULL);
        amp_queue_batch_request(b, "r1", app, user ? user : u, per_user, CHAT_BODY);
    }
    return b;
}

/* ======================================================================
 * engine tests
 * ====================================================================== */

START_TEST(test_deliver_chat_per_user) {
    harness h;
    harness_init(&h, 1);
    harness_start(&h);
    submit(&h, "ev-1", "chat", "u1", true, CHAT_BODY);
    submit(&h, "ev-2\r\nX-Evil: 1", "chat", "u1", true, CHAT_BODY);
    wait_finished(&h, 2, 5000);

    ck_assert_uint_eq(fake_count(h.fake), 2);
    json_t *s0 = seen(&h, 0), *s1 = seen(&h, 1);
    ck_assert_str_eq(seen_str(s0, "path"), "/v1/chat-messages");
    ck_assert_str_eq(seen_str(s0, "authorization"), "Bearer app-SECRETKEY-chat");
    ck_assert_str_eq(seen_str(s0, "trace_id"), "ev-1");
    ck_assert_str_eq(seen_str(s0, "content_type"), "application/json");
    ck_assert_str_eq(seen_str(s0, "user_agent"), "amp2dify/" AMP_VERSION);
    /* A dedupe key cannot inject header lines: one Dify would refuse is
     * sent as its SHA-256 (of "ev-2\r\nX-Evil: 1"). */
    ck_assert_str_eq(seen_str(s1, "trace_id"),
                     "40586df3c0c0df8d9e20af7d9a340e6d64ba3960a65aece277604caaa72073d3");
    /* Same connection: keep-alive. */
    ck_assert_int_eq(json_integer_value(json_object_get(s0, "connection")), 1);
    ck_assert_int_eq(json_integer_value(json_object_get(s1, "connection")), 1);
    ck_assert_uint_eq(fake_dify_connections(h.fake), 1);
    json_decref(s0);
    json_decref(s1);

    /* First request has no conversation; the second continues the one
     * Dify's first answer started. */
    json_t *a0 = seen_answer(&h, 0);
    const char *conv = json_string_value(json_object_get(a0, "conversation_id"));
    ck_assert_ptr_nonnull(conv);
    json_t *b0 = seen_body(&h, 0), *b1 = seen_body(&h, 1);
    ck_assert_ptr_null(json_object_get(b0, "conversation_id"));
    ck_assert_str_eq(json_string_value(json_object_get(b0, "query")), "hello");
    ck_assert_str_eq(json_string_value(json_object_get(b1, "conversation_id")), conv);
    json_decref(b0);
    json_decref(b1);

    row_t r = get_row(&h, 1);
    ck_assert_int_eq(r.state, 1);
    ck_assert_int_eq(r.attempts, 1);
    ck_assert_int_eq(r.last_status, 200);
    ck_assert_ptr_nonnull(r.result);
    ck_assert_int_eq(json_integer_value(json_object_get(r.result, "status")), 200);
    ck_assert_str_eq(json_string_value(json_object_get(r.result, "message_id")),
                     json_string_value(json_object_get(a0, "message_id")));
    ck_assert_str_eq(json_string_value(json_object_get(r.result, "conversation_id")), conv);
    ck_assert_str_eq(json_string_value(json_object_get(r.result, "answer")), "Echo: hello");
    json_int_t tokens = json_integer_value(
        json_object_get(json_object_get(json_object_get(a0, "metadata"), "usage"), "total_tokens"));
    ck_assert_int_gt(tokens, 0);
    ck_assert_int_eq(
        json_integer_value(json_object_get(json_object_get(r.result, "usage"), "total_tokens")),
        tokens);
    ck_assert(json_is_integer(json_object_get(r.result, "latency_ms")));
    json_decref(r.result);
    json_decref(a0);
    harness_done(&h);
}
END_TEST

START_TEST(test_not_per_user_sends_no_conversation) {
    harness h;
    harness_init(&h, 2);
    harness_start(&h);
    submit(&h, NULL, "chat", "u1", false, CHAT_BODY);
    wait_finished(&h, 1, 5000);
    submit(&h, NULL, "chat", "u1", false, CHAT_BODY);
    wait_finished(&h, 2, 5000);
    json_t *b1 = seen_body(&h, 1);
    ck_assert_ptr_null(json_object_get(b1, "conversation_id"));
    json_decref(b1);
    json_t *s0 = seen(&h, 0);
    ck_assert(json_is_null(json_object_get(s0, "trace_id"))); /* no dedupe key, no header */
    json_decref(s0);
    harness_done(&h);
}
END_TEST

START_TEST(test_retry_statuses_then_deliver) {
    harness h;
    harness_init(&h, 1);
    /* The drop comes first, on a fresh connection: on a reused one curl
     * itself resends once, which would hide it. */
    fake_dify_push(h.fake, &(fake_dify_behaviour){.drop = true});
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 429,
                                                  .code = "too_many_requests",
                                                  .message = "Too many requests."});
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 502, .html_body = "<html>bad</html>"});
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 400,
                                                  .code = "invalid_param",
                                                  .message = "Too many requests. The current "
                                                             "maximum concurrent requests allowed "
                                                             "for x is 10."});
    fake_dify_push_status(h.fake, 408);
    harness_start(&h);
    submit(&h, "ev", "chat", "u1", false, CHAT_BODY);
    wait_finished(&h, 1, 10000);
    ck_assert_uint_eq(fake_count(h.fake), 6);
    row_t r = get_row(&h, 1);
    ck_assert_int_eq(r.state, 1);
    ck_assert_int_eq(r.attempts, 6);
    json_decref(r.result);
    harness_done(&h);
}
END_TEST

START_TEST(test_retry_records_last_error) {
    harness h;
    harness_init(&h, 1);
    h.opts.retry_initial_ms = 60000; /* the retry lands far in the future */
    h.opts.retry_max_ms = 60000;
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 503,
                                                  .retry_after = "120",
                                                  .code = "unavailable",
                                                  .message = "later"});
    harness_start(&h);
    int64_t before = amp_now_ms();
    submit(&h, "ev", "chat", "u1", false, CHAT_BODY);
    wait_requests(&h, 1, 5000);
    amp_forward_stop(h.fwd); /* flushes the ack */
    h.fwd = NULL;
    row_t r = get_row(&h, 1);
    ck_assert_int_eq(r.state, 0);
    ck_assert_int_eq(r.attempts, 1);
    ck_assert_int_eq(r.last_status, 503);
    ck_assert_str_eq(r.last_code, "unavailable");
    ck_assert_str_eq(r.last_message, "later");
    /* Retry-After (120 s) beats the backoff (<= 60 s). */
    ck_assert_int_ge(r.due_ms, before + 119000);
    ck_assert_int_le(r.due_ms, amp_now_ms() + 121000);
    harness_done(&h);
}
END_TEST

START_TEST(test_retry_after_honoured) {
    harness h;
    harness_init(&h, 1);
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 429, .retry_after = "1"});
    harness_start(&h);
    submit(&h, "ev", "chat", "u1", false, CHAT_BODY);
    wait_finished(&h, 1, 5000);
    ck_assert_uint_eq(fake_count(h.fake), 2);
    json_t *s0 = seen(&h, 0), *s1 = seen(&h, 1);
    int64_t gap = json_integer_value(json_object_get(s1, "arrived_ms")) -
                  json_integer_value(json_object_get(s0, "arrived_ms"));
    json_decref(s0);
    json_decref(s1);
    ck_assert_msg(gap >= 950, "second attempt after %lld ms, Retry-After was 1 s", (long long)gap);
    harness_done(&h);
}
END_TEST

START_TEST(test_permanent_dead_letter) {
    harness h;
    harness_init(&h, 1);
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 400,
                                                  .code = "app_unavailable",
                                                  .message = "App unavailable, please check your "
                                                             "app configurations."});
    harness_start(&h);
    submit(&h, "ev", "chat", "u1", false, CHAT_BODY);
    wait_finished(&h, 1, 5000);
    amp_forward_stop(h.fwd);
    h.fwd = NULL;
    ck_assert_uint_eq(fake_count(h.fake), 1);
    row_t r = get_row(&h, 1);
    ck_assert_int_eq(r.state, 2);
    ck_assert_int_eq(r.last_status, 400);
    ck_assert_str_eq(r.last_code, "app_unavailable");
    ck_assert_str_eq(r.last_message, "App unavailable, please check your app configurations.");
    harness_done(&h);
}
END_TEST

START_TEST(test_workflow_failed_and_ok) {
    harness h;
    harness_init(&h, 1);
    fake_dify_push(h.fake, &(fake_dify_behaviour){.workflow_failed = true,
                                                  .message = "Variable x is required"});
    fake_dify_push(h.fake, &(fake_dify_behaviour){.answer = "fine"});
    harness_start(&h);
    const char *body = "{\"inputs\":{\"x\":1},\"user\":\"u1\",\"response_mode\":\"blocking\"}";
    submit(&h, "ev1", "flow", "u1", false, body);
    wait_finished(&h, 1, 5000);
    submit(&h, "ev2", "flow", "u1", false, body);
    wait_finished(&h, 2, 5000);
    amp_forward_stop(h.fwd);
    h.fwd = NULL;
    json_t *s0 = seen(&h, 0);
    ck_assert_str_eq(seen_str(s0, "path"), "/v1/workflows/run");
    ck_assert_str_eq(seen_str(s0, "authorization"), "Bearer app-SECRETKEY-flow");
    json_decref(s0);
    json_t *a1 = seen_answer(&h, 1);
    row_t r = get_row(&h, 1);
    ck_assert_int_eq(r.state, 2);
    ck_assert_int_eq(r.last_status, 200);
    ck_assert_str_eq(r.last_code, "workflow_failed");
    ck_assert_str_eq(r.last_message, "Variable x is required");
    r = get_row(&h, 2);
    ck_assert_int_eq(r.state, 1);
    ck_assert_str_eq(json_string_value(json_object_get(r.result, "workflow_run_id")),
                     json_string_value(json_object_get(a1, "workflow_run_id")));
    ck_assert_str_eq(
        json_string_value(json_object_get(json_object_get(r.result, "outputs"), "result")), "fine");
    json_decref(r.result);
    json_decref(a1);
    harness_done(&h);
}
END_TEST

START_TEST(test_reset_conversation) {
    harness h;
    harness_init(&h, 1);
    /* The first answer starts a conversation; Dify then forgets it (404
     * "Conversation Not Exists."), and the resend starts a new one. */
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 200});
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 404,
                                                  .code = "not_found",
                                                  .message = "Conversation Not Exists."});
    h.opts.retry_initial_ms = 60000; /* a reset must not wait for a backoff */
    h.opts.retry_max_ms = 60000;
    harness_start(&h);
    submit(&h, "ev1", "chat", "u1", true, CHAT_BODY);
    submit(&h, "ev2", "chat", "u1", true, CHAT_BODY);
    wait_finished(&h, 2, 5000);
    ck_assert_uint_eq(fake_count(h.fake), 3);
    json_t *a0 = seen_answer(&h, 0), *a2 = seen_answer(&h, 2);
    const char *old = json_string_value(json_object_get(a0, "conversation_id"));
    const char *fresh = json_string_value(json_object_get(a2, "conversation_id"));
    ck_assert_ptr_nonnull(old);
    ck_assert_ptr_nonnull(fresh);
    ck_assert_str_ne(old, fresh);
    json_t *b1 = seen_body(&h, 1), *b2 = seen_body(&h, 2);
    ck_assert_str_eq(json_string_value(json_object_get(b1, "conversation_id")), old);
    ck_assert_ptr_null(json_object_get(b2, "conversation_id")); /* a new conversation */
    json_decref(b1);
    json_decref(b2);
    row_t r = get_row(&h, 2);
    ck_assert_int_eq(r.state, 1);
    ck_assert_int_eq(r.attempts, 2);
    ck_assert_str_eq(json_string_value(json_object_get(r.result, "conversation_id")), fresh);
    json_decref(r.result);
    json_decref(a0);
    json_decref(a2);

    /* A 404 "Conversation Not Exists." for a request that carried no
     * conversation cannot be fixed by a reset: dead letter. */
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 404,
                                                  .code = "not_found",
                                                  .message = "Conversation Not Exists."});
    submit(&h, "ev3", "chat", "u2", true, CHAT_BODY);
    wait_finished(&h, 3, 5000);
    amp_forward_stop(h.fwd);
    h.fwd = NULL;
    r = get_row(&h, 3);
    ck_assert_int_eq(r.state, 2);
    ck_assert_int_eq(r.last_status, 404);
    harness_done(&h);
}
END_TEST

/* The number of probes a paused app may have sent elapsed_ms after its
 * pause began: one at 1 s, 3 s, 7 s, ... (1 s doubling). */
static int probes_within(int64_t elapsed_ms) {
    int n = 0;
    for (int64_t at = 1000, step = 1000; at <= elapsed_ms; step *= 2, at += step)
        n++;
    return n;
}

/* Whether the forwarder holds app paused because Dify rejected its key. */
static bool key_rejected(harness *h, const char *app) {
    json_t *apps = amp_forward_apps(h->fwd);
    bool on = json_is_true(json_object_get(json_object_get(apps, app), "key_rejected"));
    json_decref(apps);
    return on;
}

/* The chat app's key is rejected until the test restores it, so what is
 * asserted does not depend on how fast a loaded machine runs the test:
 * only the bound on probes is measured against the clock, and a slow run
 * only loosens it. */
START_TEST(test_pause_on_rejected_key) {
    harness h;
    harness_init(&h, 2);
    h.keys[0] = "app-REVOKED-chat"; /* unknown to the fake: 401 unauthorized */
    harness_start(&h);
    submit(&h, "ev1", "chat", "u1", false, CHAT_BODY);
    wait_requests(&h, 1, 5000);
    /* The pause begins when the 401 is read, not when the request lands. */
    int64_t end = mono_ms() + 5000;
    while (!key_rejected(&h, "chat") && mono_ms() < end)
        sleep_ms(5);
    ck_assert_msg(key_rejected(&h, "chat"), "the chat app was not paused");
    int64_t paused_at = mono_ms();
    /* While paused, more events of the app are not sent... */
    submit(&h, "ev2", "chat", "u2", false, CHAT_BODY);
    submit(&h, "ev3", "chat", "u3", false, CHAT_BODY);
    /* ...and other apps are not paused. */
    submit(&h, "ev4", "done", "u1", false, CHAT_BODY);
    wait_finished(&h, 1, 5000);
    sleep_ms(300);
    json_t *all = fake_dify_requests(h.fake);
    int64_t elapsed = mono_ms() - paused_at;
    size_t chat = 0, done = 0;
    for (size_t i = 0; i < json_array_size(all); i++) {
        const char *path = seen_str(json_array_get(all, i), "path");
        chat += strcmp(path, "/v1/chat-messages") == 0;
        done += strcmp(path, "/v1/completion-messages") == 0;
    }
    json_decref(all);
    ck_assert_uint_eq(done, 1);
    ck_assert_msg(chat >= 1 && chat <= 1 + (size_t)probes_within(elapsed),
                  "%zu chat requests %lld ms into the pause", chat, (long long)elapsed);
    for (int64_t id = 1; id <= 3; id++) {
        row_t r = get_row(&h, id);
        ck_assert_int_eq(r.state, 0);    /* not burnt */
        ck_assert_int_eq(r.attempts, 0); /* released, not counted */
        json_decref(r.result);
    }
    /* The key is valid again: the next probe succeeds and everything goes
     * out (probes 1 s, 2 s, 4 s ... apart, so the wait is generous). */
    fake_dify_add_key(h.fake, h.keys[0]);
    wait_finished(&h, 4, 20000);
    row_t r = get_row(&h, 1);
    ck_assert_int_eq(r.state, 1);
    ck_assert_int_eq(r.attempts, 1);
    json_decref(r.result);
    harness_done(&h);
}
END_TEST

START_TEST(test_expired) {
    harness h;
    harness_init(&h, 1);
    /* Retries for 3 s, each after a jittered 0-1000 ms: a few attempts
     * even when a loaded machine (sanitizers, CI) delays the first one by a
     * second or more, and fewer than the 30 failures scripted (past them,
     * the fake answers with success). */
    h.opts.retry_max_age_s = 3;
    h.opts.retry_initial_ms = 1000;
    h.opts.retry_max_ms = 1000;
    fake_dify_push_n(
        h.fake,
        &(fake_dify_behaviour){.status = 500, .code = "internal_server_error", .message = "boom"},
        30);
    harness_start(&h);
    submit(&h, "ev", "chat", "u1", false, CHAT_BODY);
    wait_finished(&h, 1, 15000);
    amp_forward_stop(h.fwd);
    h.fwd = NULL;
    row_t r = get_row(&h, 1);
    ck_assert_int_eq(r.state, 2);
    ck_assert_str_eq(r.last_code, "expired");
    ck_assert_int_eq(r.last_status, 500);
    ck_assert_ptr_nonnull(strstr(r.last_message, "internal_server_error"));
    ck_assert_uint_ge(fake_count(h.fake), 2);
    harness_done(&h);
}
END_TEST

START_TEST(test_unknown_app_and_bad_body) {
    harness h;
    harness_init(&h, 1);
    harness_start(&h);
    submit(&h, "ev1", "gone", "u1", false, CHAT_BODY);
    submit(&h, "ev2", "chat", "u1", false, "[not an object]");
    wait_finished(&h, 2, 5000);
    amp_forward_stop(h.fwd);
    h.fwd = NULL;
    ck_assert_uint_eq(fake_count(h.fake), 0);
    row_t r = get_row(&h, 1);
    ck_assert_int_eq(r.state, 2);
    ck_assert_str_eq(r.last_code, "unknown_app");
    r = get_row(&h, 2);
    ck_assert_int_eq(r.state, 2);
    ck_assert_str_eq(r.last_code, "invalid_body");
    harness_done(&h);
}
END_TEST

START_TEST(test_connect_refused_is_retried) {
    harness h;
    harness_init(&h, 1);
    /* A port nobody listens on: take one and close it. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(fd, (struct sockaddr *)&a, sizeof a);
    socklen_t al = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &al);
    close(fd);
    snprintf(h.base, sizeof h.base, "http://127.0.0.1:%u/v1", (unsigned)ntohs(a.sin_port));
    h.opts.retry_initial_ms = 60000;
    h.opts.retry_max_ms = 60000;
    harness_start(&h);
    submit(&h, "ev", "chat", "u1", false, CHAT_BODY);
    row_t r;
    int64_t end = mono_ms() + 5000;
    do {
        sleep_ms(20);
        amp_queue_flush(h.spool);
        r = get_row(&h, 1);
    } while (r.attempts == 0 && mono_ms() < end);
    ck_assert_int_eq(r.state, 0);
    ck_assert_int_eq(r.attempts, 1);
    ck_assert_int_eq(r.last_status, 0);
    ck_assert_str_eq(r.last_code, "connect_failed");
    ck_assert_str_ne(r.last_message, "");
    harness_done(&h);
}
END_TEST

START_TEST(test_timeout_is_retried) {
    harness h;
    harness_init(&h, 1);
    h.opts.timeout_s = 1;
    fake_dify_push(h.fake, &(fake_dify_behaviour){.delay_ms = 1500});
    harness_start(&h);
    submit(&h, "ev", "chat", "u1", false, CHAT_BODY);
    wait_finished(&h, 1, 8000);
    ck_assert_uint_eq(fake_count(h.fake), 2);
    row_t r = get_row(&h, 1);
    ck_assert_int_eq(r.state, 1);
    ck_assert_int_eq(r.attempts, 2);
    json_decref(r.result);
    harness_done(&h);
}
END_TEST

#define STREAM_BODY                                                                                \
    "{\"inputs\":{},\"query\":\"hello\",\"user\":\"u1\",\"response_mode\":\"streaming\"}"

START_TEST(test_streaming_answer) {
    harness h;
    harness_init(&h, 1);
    /* Dify's SSE cut into 7-byte writes; then a stream that stops before
     * message_end; then an `error` event inside a 200 stream. */
    fake_dify_push(h.fake, &(fake_dify_behaviour){.answer = " I'm \xc3\xa9", .stream_chunk = 7});
    fake_dify_push(h.fake, &(fake_dify_behaviour){.sse_unfinished = true});
    fake_dify_push(h.fake, &(fake_dify_behaviour){.sse_error = true,
                                                  .status = 400,
                                                  .code = "provider_quota_exceeded",
                                                  .message = "quota"});
    harness_start(&h);
    submit(&h, "ev1", "chat", "u1", true, STREAM_BODY);
    wait_finished(&h, 1, 5000);
    submit(&h, "ev2", "chat", "u2", false, STREAM_BODY);
    wait_finished(&h, 2, 5000);
    amp_forward_stop(h.fwd);
    h.fwd = NULL;
    json_t *s0 = seen(&h, 0);
    ck_assert(json_is_true(json_object_get(s0, "streaming")));
    /* The conversation Dify announced in the stream's events. */
    const char *resp = seen_str(s0, "response");
    const char *cid = strstr(resp, "\"conversation_id\":\"");
    ck_assert_ptr_nonnull(cid);
    cid += strlen("\"conversation_id\":\"");
    char conv[64];
    size_t n = strcspn(cid, "\"");
    ck_assert_uint_lt(n, sizeof conv);
    memcpy(conv, cid, n);
    conv[n] = '\0';
    json_decref(s0);
    row_t r = get_row(&h, 1);
    ck_assert_int_eq(r.state, 1);
    ck_assert_str_eq(json_string_value(json_object_get(r.result, "answer")), " I'm \xc3\xa9");
    ck_assert_str_eq(json_string_value(json_object_get(r.result, "conversation_id")), conv);
    json_decref(r.result);
    /* Stream 2 stopped without a closing event (retried), then the third
     * answer was an in-stream error: permanent with Dify's status. */
    r = get_row(&h, 2);
    ck_assert_int_eq(r.state, 2);
    ck_assert_int_eq(r.attempts, 2);
    ck_assert_int_eq(r.last_status, 400);
    ck_assert_str_eq(r.last_code, "provider_quota_exceeded");
    harness_done(&h);
}
END_TEST

START_TEST(test_response_too_large) {
    harness h;
    harness_init(&h, 1);
    /* A 200 whose answer text alone is over the cap, and a 500 proxy page
     * twice the cap. */
    char *huge = amp_xmalloc(AMP_FORWARD_MAX_RESPONSE + 4097);
    memset(huge, 'a', AMP_FORWARD_MAX_RESPONSE + 4096);
    huge[AMP_FORWARD_MAX_RESPONSE + 4096] = '\0';
    char *page = amp_xmalloc(AMP_FORWARD_MAX_RESPONSE * 2 + 1);
    memset(page, ' ', AMP_FORWARD_MAX_RESPONSE * 2);
    page[AMP_FORWARD_MAX_RESPONSE * 2] = '\0';
    fake_dify_push(h.fake, &(fake_dify_behaviour){.answer = huge});
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 500, .html_body = page});
    free(huge);
    free(page);
    harness_start(&h);
    submit(&h, "ev1", "chat", "u1", false, CHAT_BODY);
    wait_finished(&h, 1, 5000);
    submit(&h, "ev2", "chat", "u1", false, CHAT_BODY);
    wait_requests(&h, 3, 5000);
    wait_finished(&h, 2, 5000);
    amp_forward_stop(h.fwd);
    h.fwd = NULL;
    /* 2xx: Dify did the work, so it counts as delivered. */
    row_t r = get_row(&h, 1);
    ck_assert_int_eq(r.state, 1);
    ck_assert(json_is_true(json_object_get(r.result, "response_truncated")));
    json_decref(r.result);
    r = get_row(&h, 2);
    ck_assert_int_eq(r.state, 1);
    ck_assert_int_eq(r.attempts, 2); /* the oversized 500 was retried */
    json_decref(r.result);
    /* The connection survived both oversized answers. */
    ck_assert_uint_eq(fake_dify_connections(h.fake), 1);
    harness_done(&h);
}
END_TEST

START_TEST(test_stop_finishes_in_flight) {
    harness h;
    harness_init(&h, 1);
    fake_dify_push(h.fake, &(fake_dify_behaviour){.delay_ms = 400});
    harness_start(&h);
    submit(&h, "ev1", "chat", "u1", false, CHAT_BODY);
    submit(&h, "ev2", "chat", "u1", false, CHAT_BODY);
    wait_requests(&h, 1, 5000);
    int64_t t0 = mono_ms();
    amp_forward_stop(h.fwd); /* the slow request completes, the rest waits */
    h.fwd = NULL;
    ck_assert_int_lt(mono_ms() - t0, 3000);
    amp_queue_stats s;
    ck_assert_int_eq(amp_queue_stats_get(h.spool, &s), 0);
    ck_assert_int_eq(s.delivered, 1);
    ck_assert_int_eq(s.pending, 1);
    ck_assert_uint_eq(fake_count(h.fake), 1);
    /* A new forwarder picks the rest up. */
    harness_start(&h);
    wait_finished(&h, 2, 5000);
    harness_done(&h);
}
END_TEST

/* Past its grace, a stop ends a request Dify has not answered: the worker
 * waiting for the answer sees the abort within a second (libcurl on its own
 * would notice only at its next timer, about 2 s here), and the row
 * stays pending for the next start. */
START_TEST(test_stop_past_grace_ends_request) {
    harness h;
    harness_init(&h, 1);
    h.opts.stop_grace_ms = 200;
    fake_dify_push(h.fake, &(fake_dify_behaviour){.delay_ms = 4000});
    harness_start(&h);
    submit(&h, "ev1", "chat", "u1", false, CHAT_BODY);
    wait_requests(&h, 1, 5000);
    int64_t t0 = mono_ms();
    amp_forward_stop(h.fwd);
    h.fwd = NULL;
    int64_t took = mono_ms() - t0;
    ck_assert_msg(took < 1600, "stop took %lld ms with a grace of 200 ms", (long long)took);
    amp_queue_stats s;
    ck_assert_int_eq(amp_queue_stats_get(h.spool, &s), 0);
    ck_assert_int_eq(s.delivered, 0);
    ck_assert_int_eq(s.pending, 1);
    row_t r = get_row(&h, 1);
    ck_assert_int_eq(r.state, 0);
    json_decref(r.result);
    harness_done(&h);
}
END_TEST

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Arrival times (ms) of the requests the fake answered on path (NULL: any),
 * in arrival order. */
static size_t arrivals(harness *h, const char *path, int64_t *at, size_t max) {
    size_t n = 0;
    json_t *all = fake_dify_requests(h->fake);
    for (size_t i = 0; i < json_array_size(all) && n < max; i++) {
        const json_t *r = json_array_get(all, i);
        if (!path || strcmp(seen_str((json_t *)r, "path"), path) == 0)
            at[n++] = json_integer_value(json_object_get(r, "arrived_ms"));
    }
    json_decref(all);
    qsort(at, n, sizeof *at, cmp_i64);
    return n;
}

/* One connection, many requests in a row, each answered at once: the
 * transfer loop must read each answer as it arrives. A wake-up it missed
 * would show as a request of about a second (the loop's stop check). */
START_TEST(test_http_requests_do_not_stall) {
    fake_dify *fake = fake_dify_start(0, "app-k");
    ck_assert_ptr_nonnull(fake);
    char url[128], err[256];
    snprintf(url, sizeof url, "http://127.0.0.1:%u/v1/chat-messages", fake_dify_port(fake));
    amp_forward_http *http = amp_forward_http_create(5, 30, NULL, err, sizeof err);
    ck_assert_msg(http != NULL, "%s", err);
    const char *headers[] = {"Authorization: Bearer app-k", "Content-Type: application/json", NULL};
    int64_t slowest = 0;
    for (int i = 0; i < 200; i++) {
        amp_forward_reply r;
        amp_forward_http_post(http, url, headers, CHAT_BODY, strlen(CHAT_BODY), &r);
        ck_assert_msg(r.status == 200, "request %d: status %ld, %s", i, r.status, r.error);
        slowest = r.latency_ms > slowest ? r.latency_ms : slowest;
        amp_forward_reply_clear(&r);
    }
    ck_assert_msg(slowest < 900, "slowest of 200 requests took %lld ms", (long long)slowest);
    ck_assert_uint_eq(fake_dify_connections(fake), 1);
    amp_forward_http_destroy(http);
    fake_dify_stop(fake);
}
END_TEST

START_TEST(test_parallel_workers) {
    harness h;
    harness_init(&h, 4);
    for (int i = 0; i < 4; i++)
        fake_dify_push(h.fake, &(fake_dify_behaviour){.delay_ms = 1000});
    harness_start(&h);
    /* One batch, so all four rows are claimable at once: four submits,
     * each waiting for its own sync, can take longer than a request on a
     * loaded machine (under TSan), and a worker that finished would then
     * take the last row over its own connection. */
    amp_queue_batch *b = batch_of(4, "chat", NULL, true);
    submit_batch(&h, b);
    wait_finished(&h, 4, 5000);
    /* Four users, four workers: all four requests are at Dify at once, not
     * one after another: the last arrives while the first is still held.
     * Timed at the fake, so the spool's syncs on a slow disk do not enter
     * the measure. */
    int64_t at[8];
    ck_assert_uint_eq(arrivals(&h, NULL, at, 8), 4);
    ck_assert_msg(at[3] - at[0] < 1000, "the 4th request arrived %lld ms after the 1st",
                  (long long)(at[3] - at[0]));
    ck_assert_uint_eq(fake_dify_connections(h.fake), 4);
    harness_done(&h);
}
END_TEST

START_TEST(test_many_events_in_order) {
    harness h;
    harness_init(&h, 3);
    harness_start(&h);
    for (int i = 0; i < 30; i++) {
        char body[128];
        snprintf(body, sizeof body, "{\"inputs\":{},\"query\":\"q%d\",\"user\":\"u1\"}", i);
        submit(&h, NULL, "chat", "same-user", true, body);
    }
    wait_finished(&h, 30, 10000);
    /* One user's events reach Dify in order, one at a time. */
    for (size_t i = 0; i < 30; i++) {
        json_t *b = seen_body(&h, i);
        char want[16];
        snprintf(want, sizeof want, "q%zu", i);
        ck_assert_str_eq(json_string_value(json_object_get(b, "query")), want);
        json_decref(b);
    }
    harness_done(&h);
}
END_TEST

START_TEST(test_start_rejects_bad_options) {
    harness h;
    harness_init(&h, 1);
    char err[256];
    const char *keys[3] = {"ok", "", "ok"};
    h.opts.api_keys = keys;
    ck_assert_ptr_null(amp_forward_start(&h.opts, h.spool, err, sizeof err));
    ck_assert_ptr_nonnull(strstr(err, "flow"));
    const char *keys2[3] = {"ok", "bad\r\nX: y", "ok"};
    h.opts.api_keys = keys2;
    ck_assert_ptr_null(amp_forward_start(&h.opts, h.spool, err, sizeof err));
    ck_assert_ptr_null(strstr(err, "bad")); /* the key is never echoed */
    h.opts.api_keys = h.keys;
    h.opts.workers = 0;
    ck_assert_ptr_null(amp_forward_start(&h.opts, h.spool, err, sizeof err));
    amp_forward_stop(NULL);
    amp_forward_kick(NULL);
    harness_done(&h);
}
END_TEST

START_TEST(test_key_never_logged) {
    /* Capture stderr at debug level through a retry, a pause, a dead letter
     * and a delivery. */
    char logpath[] = "/tmp/amp-test-forward-log-XXXXXX";
    int lfd = mkstemp(logpath);
    ck_assert_int_ge(lfd, 0);
    int saved = dup(STDERR_FILENO);
    dup2(lfd, STDERR_FILENO);
    amp_log_set_level(AMP_LOG_DEBUG);

    harness h;
    harness_init(&h, 1);
    h.opts.retry_initial_ms = 10;
    fake_dify_push_status(h.fake, 503);
    fake_dify_push_status(h.fake, 401);
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 400, .code = "bad", .message = "no"});
    harness_start(&h);
    submit(&h, "ev1", "chat", "u1", false, CHAT_BODY);
    wait_finished(&h, 1, 8000);
    harness_done(&h);

    amp_log_set_level(AMP_LOG_ERROR);
    dup2(saved, STDERR_FILENO);
    close(saved);
    FILE *fp = fdopen(lfd, "r");
    fseek(fp, 0, SEEK_SET);
    amp_buf b;
    amp_buf_init(&b, 8 << 20);
    char line[4096];
    while (fgets(line, sizeof line, fp))
        amp_buf_append(&b, line, strlen(line));
    fclose(fp);
    unlink(logpath);
    ck_assert_ptr_nonnull(b.data);
    ck_assert_ptr_nonnull(strstr(b.data, "dify delivery retry"));
    ck_assert_ptr_nonnull(strstr(b.data, "\"msg\":\"dify app paused\""));
    ck_assert_ptr_nonnull(strstr(b.data, "dify delivery dead-lettered"));
    ck_assert_ptr_null(strstr(b.data, "SECRETKEY"));
    ck_assert_ptr_null(strstr(b.data, "hello")); /* the event body */
    amp_buf_free(&b);
}
END_TEST

START_TEST(test_max_in_flight) {
    harness h;
    harness_init(&h, 4);
    h.apps[0].max_in_flight = 2;
    for (int i = 0; i < 6; i++)
        fake_dify_push(h.fake, &(fake_dify_behaviour){.delay_ms = 200});
    harness_start(&h);
    for (int i = 0; i < 6; i++) {
        char u[16];
        snprintf(u, sizeof u, "u%d", i);
        submit(&h, NULL, "chat", u, false, CHAT_BODY);
    }
    wait_finished(&h, 6, 5000);
    int64_t at[8];
    ck_assert_uint_eq(arrivals(&h, NULL, at, 8), 6);
    /* Four workers, but never more than two requests of the app at once:
     * three waves 200 ms apart. */
    for (int i = 0; i < 6; i++) {
        int near = 0;
        for (int j = 0; j < 6; j++)
            near += at[j] <= at[i] && at[j] > at[i] - 150;
        ck_assert_msg(near <= 2, "%d requests within 150 ms of request %d", near, i);
    }
    ck_assert_int_ge(at[5] - at[0], 380);
    harness_done(&h);
}
END_TEST

/* How late a request may reach the fake Dify after it was sent, on a
 * loaded machine. */
enum { RATE_SLACK_MS = 60 };

START_TEST(test_rate_limit) {
    harness h;
    harness_init(&h, 4);
    h.apps[2].rate_per_sec = 10;
    h.apps[2].burst = 2;
    harness_start(&h);
    amp_queue_batch *b = batch_of(6, "done", "u1", false);
    static atomic_int st;
    amp_queue_submit(h.spool, b, on_done, &st);
    wait_finished(&h, 6, 5000);
    int64_t at[8];
    ck_assert_uint_eq(arrivals(&h, NULL, at, 8), 6);
    /* Burst 2 at 10/s: any n consecutive requests span at least (n - 2) x
     * 100 ms. That is all a rate limit promises: a request the machine sent
     * late does not delay the next one's slot, so single gaps can be short
     * under load (the exact schedule is pace_wait_us's test above). The
     * slack covers how late the first request of a window may arrive. */
    for (int i = 0; i < 6; i++)
        for (int j = i + 2; j < 6; j++)
            ck_assert_msg(at[j] - at[i] >= (j - i - 1) * 100 - RATE_SLACK_MS,
                          "requests %d..%d within %lld ms", i, j, (long long)(at[j] - at[i]));
    harness_done(&h);
}
END_TEST

START_TEST(test_slow_app_does_not_block_others) {
    harness h;
    harness_init(&h, 2);
    h.apps[0].rate_per_sec = 2; /* "chat": 2 requests a second */
    h.apps[0].burst = 1;
    harness_start(&h);
    amp_queue_batch *b = batch_of(30, "chat", "u1", false);
    submit_batch(&h, b);
    sleep_ms(100);
    /* One batch, timed from when it is durable: the syncs of a slow disk
     * are not what this measures. */
    b = batch_of(5, "done", "u2", false);
    submit_batch(&h, b);
    int64_t t0 = mono_ms();
    /* The other app's events go out at once, past the 29 waiting ones. */
    int64_t end = t0 + 3000;
    int64_t at[64];
    while (mono_ms() < end && arrivals(&h, "/v1/completion-messages", at, 64) < 5)
        sleep_ms(5);
    ck_assert_uint_eq(arrivals(&h, "/v1/completion-messages", at, 64), 5);
    ck_assert_int_lt(mono_ms() - t0, 1000);
    ck_assert_uint_le(arrivals(&h, "/v1/chat-messages", at, 64), 2);
    amp_forward_stop(h.fwd);
    h.fwd = NULL;
    /* What did not fit in memory went back to the spool, spread out at the
     * app's rate; nothing was counted as an attempt. */
    int64_t now = amp_now_ms(), latest = 0;
    int pending = 0;
    for (int64_t id = 1; id <= 30; id++) {
        row_t r = get_row(&h, id);
        if (r.state == 0) {
            pending++;
            ck_assert_int_eq(r.attempts, 0);
            if (r.due_ms > latest)
                latest = r.due_ms;
        }
        json_decref(r.result);
    }
    ck_assert_int_ge(pending, 27);
    ck_assert_int_gt(latest, now + 3000);
    harness_done(&h);
}
END_TEST

/* One app, rate-limited: what does not fit its queue is not claimed at all
 * (claiming it would only write it back to the spool), so those rows keep
 * their original due time and nothing is counted as an attempt. */
START_TEST(test_full_queue_claims_nothing_more) {
    harness h;
    harness_init(&h, 2);
    h.opts.napps = 1;           /* "chat" only */
    h.apps[0].rate_per_sec = 2; /* 2 requests a second */
    h.apps[0].burst = 1;
    int64_t before = amp_now_ms();
    harness_start(&h);
    amp_queue_batch *b = batch_of(60, "chat", "u1", false);
    submit_batch(&h, b);
    sleep_ms(600);
    int64_t at[64];
    ck_assert_uint_le(arrivals(&h, NULL, at, 64), 3);
    amp_forward_stop(h.fwd); /* gives back what it held: due now */
    h.fwd = NULL;
    int64_t after = amp_now_ms();
    int pending = 0;
    for (int64_t id = 1; id <= 60; id++) {
        row_t r = get_row(&h, id);
        if (r.state == 0) {
            pending++;
            ck_assert_int_eq(r.attempts, 0);
            ck_assert_msg(r.due_ms >= before && r.due_ms <= after, "row %lld due %lld",
                          (long long)id, (long long)r.due_ms);
        }
        json_decref(r.result);
    }
    ck_assert_int_ge(pending, 57);
    harness_done(&h);
}
END_TEST

START_TEST(test_single_probe) {
    harness h;
    harness_init(&h, 4);
    h.apps[0].max_in_flight = 1; /* one request at a time: the 401s are the first two */
    h.opts.retry_max_ms = 300;   /* plays no part in the probe interval */
    fake_dify_push_n(h.fake, &(fake_dify_behaviour){.status = 401, .code = "unauthorized"}, 2);
    harness_start(&h);
    amp_queue_batch *b = batch_of(8, "chat", NULL, false);
    static atomic_int st;
    amp_queue_submit(h.spool, b, on_done, &st);
    wait_finished(&h, 8, 10000);
    int64_t at[32];
    ck_assert_uint_eq(arrivals(&h, NULL, at, 32), 10); /* 2 rejected + 8 delivered */
    /* One probe at a time, 1 s then 2 s after the previous answer, though
     * retry.max_ms is 300 ms (a revoked key is not probed 3 times a second). */
    ck_assert_msg(at[1] - at[0] >= 950, "first probe %lld ms after the 401",
                  (long long)(at[1] - at[0]));
    ck_assert_msg(at[2] - at[1] >= 1900, "second probe %lld ms after the first",
                  (long long)(at[2] - at[1]));
    /* Not one event was spent on the rejections. */
    for (int64_t id = 1; id <= 8; id++) {
        row_t r = get_row(&h, id);
        ck_assert_int_eq(r.state, 1);
        ck_assert_int_eq(r.attempts, 1);
        json_decref(r.result);
    }
    harness_done(&h);
}
END_TEST

START_TEST(test_stop_keeps_pause) {
    harness h;
    harness_init(&h, 2);
    h.apps[0].max_in_flight = 1;
    h.opts.retry_max_ms = 60000; /* first probe after 1 s */
    fake_dify_push_status(h.fake, 401);
    /* Stored before the start, so the first claim takes all three: on a
     * loaded machine a later claim could miss the stop. */
    for (int i = 0; i < 3; i++)
        submit(&h, NULL, "chat", "u1", false, CHAT_BODY);
    int64_t sent = amp_now_ms();
    harness_start(&h);
    wait_requests(&h, 1, 5000);
    /* The pause starts when the 401 is read: somewhere between the start
     * and the moment the forwarder reports it, however loaded the machine. */
    int64_t limit = mono_ms() + 10000;
    while (!key_rejected(&h, "chat") && mono_ms() < limit)
        sleep_ms(10);
    ck_assert(key_rejected(&h, "chat"));
    int64_t paused = amp_now_ms();
    amp_forward_stop(h.fwd);
    h.fwd = NULL;
    ck_assert_uint_eq(fake_count(h.fake), 1);
    /* Every row is back in the spool, unspent, due when the probe would
     * have gone (1 s into the pause): a restart does not hammer the
     * rejected key. */
    for (int64_t id = 1; id <= 3; id++) {
        row_t r = get_row(&h, id);
        ck_assert_int_eq(r.state, 0);
        ck_assert_int_eq(r.attempts, 0);
        ck_assert_int_ge(r.due_ms, sent + 1000 - 50);
        ck_assert_int_le(r.due_ms, paused + 1000 + 50);
    }
    harness_done(&h);
}
END_TEST

START_TEST(test_rows_from_elsewhere) {
    /* A row made due by another process (`amp2dify dlq replay` beside the
     * daemon) sends no notification: the dispatcher still finds it. */
    harness h;
    harness_init(&h, 2);
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 400, .code = "bad", .message = "no"});
    harness_start(&h);
    submit(&h, "ev1", "chat", "u1", false, CHAT_BODY);
    wait_finished(&h, 1, 5000);
    amp_queue_flush(h.spool);
    ck_assert_int_eq(get_row(&h, 1).state, 2);
    sleep_ms(300); /* the dispatcher has found the spool empty by now */
    sqlite3 *db;
    ck_assert_int_eq(sqlite3_open(h.path, &db), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    ck_assert_int_eq(sqlite3_exec(db, "UPDATE deliveries SET state = 0, due_ms = 0 WHERE id = 1",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    sqlite3_close(db);
    int64_t t0 = mono_ms();
    wait_requests(&h, 2, 3000);
    ck_assert_int_lt(mono_ms() - t0, 2500);
    harness_done(&h);
}
END_TEST

static double series_value(amp_metrics *m, const char *family, const char *app, const char *k2,
                           const char *v2, const char *k3, const char *v3) {
    return amp_series_value(amp_metrics_series(m, family, "app", app, k2, v2, k3, v3, NULL));
}

START_TEST(test_metrics) {
    amp_metrics *m = amp_metrics_create();
    harness h;
    harness_init(&h, 1);
    h.opts.metrics = m;
    h.opts.retry_initial_ms = 10;
    fake_dify_push(h.fake,
                   &(fake_dify_behaviour){.status = 503, .code = "unavailable", .message = "x"});
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 200});
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 400, .code = "app_unavailable"});
    fake_dify_push(h.fake, &(fake_dify_behaviour){.status = 401, .code = "Weird Code!"});
    harness_start(&h);
    submit(&h, "ev1", "chat", "u1", false, CHAT_BODY);
    wait_finished(&h, 1, 5000);
    submit(&h, "ev2", "chat", "u1", false, CHAT_BODY);
    wait_finished(&h, 2, 5000);
    submit(&h, "ev3", "gone", "u1", false, CHAT_BODY);
    wait_finished(&h, 3, 5000);
    submit(&h, "ev4", "done", "u1", false, CHAT_BODY);
    wait_requests(&h, 4, 5000);
    sleep_ms(50);
    ck_assert(series_value(m, "amp2dify_app_paused", "done", NULL, NULL, NULL, NULL) == 1);
    ck_assert(series_value(m, "amp2dify_app_paused", "chat", NULL, NULL, NULL, NULL) == 0);
    wait_finished(&h, 4, 5000); /* after the pause */
    harness_done(&h);

    const char *D = "amp2dify_deliveries_total";
    ck_assert(series_value(m, D, "chat", "outcome", "delivered", NULL, NULL) == 1);
    ck_assert(series_value(m, D, "chat", "outcome", "retried", NULL, NULL) == 1);
    ck_assert(series_value(m, D, "chat", "outcome", "dead_lettered", NULL, NULL) == 1);
    ck_assert(series_value(m, D, "gone", "outcome", "dead_lettered", NULL, NULL) == 1);
    ck_assert(series_value(m, D, "done", "outcome", "delivered", NULL, NULL) == 1);
    ck_assert(series_value(m, D, "done", "outcome", "retried", NULL, NULL) == 0);
    const char *R = "amp2dify_dify_responses_total";
    ck_assert(series_value(m, R, "chat", "status", "503", "code", "unavailable") == 1);
    ck_assert(series_value(m, R, "chat", "status", "200", "code", "") == 1);
    ck_assert(series_value(m, R, "chat", "status", "400", "code", "app_unavailable") == 1);
    ck_assert(series_value(m, R, "done", "status", "401", "code", "other") == 1);
    ck_assert(series_value(m, "amp2dify_app_paused", "done", NULL, NULL, NULL, NULL) == 0);
    ck_assert(series_value(m, "amp2dify_in_flight", "chat", NULL, NULL, NULL, NULL) == 0);
    char *text = amp_metrics_render(m);
    ck_assert_ptr_nonnull(strstr(text, "amp2dify_delivery_duration_seconds_count{app=\"chat\"} 3"));
    free(text);
    /* Latencies are observed to the microsecond: a sum of whole
     * milliseconds would put every delivery to this local fake in the
     * lowest bucket. Each series' sum is a whole number of milliseconds by
     * chance about once in a thousand, so one of two is enough. */
    const char *S = "amp2dify_delivery_duration_seconds";
    double chat_s = series_value(m, S, "chat", NULL, NULL, NULL, NULL);
    double done_s = series_value(m, S, "done", NULL, NULL, NULL, NULL);
    ck_assert_msg(llround(chat_s * 1e6) % 1000 != 0 || llround(done_s * 1e6) % 1000 != 0,
                  "delivery durations in whole milliseconds: %.6f and %.6f s", chat_s, done_s);
    amp_metrics_destroy(m);
}
END_TEST

/* ======================================================================
 * route reports: stored durably before the delivery's acknowledgement
 * ====================================================================== */

/* Engines in front of the spool (the two below) begin with the spool they
 * pass to; what they do not watch goes straight through. */
static void pass_close(void *e) {
    (void)e; /* the test owns the state and closes the spool itself */
}
static void pass_set_notify(void *e, amp_queue_notify_fn fn, void *ctx) {
    amp_queue_set_notify(*(amp_queue **)e, fn, ctx);
}
static void pass_submit(void *e, amp_queue_batch *b, amp_queue_done_fn done, void *ctx) {
    amp_queue_submit(*(amp_queue **)e, b, done, ctx);
}
static amp_queue_ack_status pass_ack(void *e, const amp_queue_ack *a) {
    return amp_queue_acknowledge(*(amp_queue **)e, a);
}
static bool pass_flush_until(void *e, int64_t deadline_ms) {
    return amp_queue_flush_until(*(amp_queue **)e, deadline_ms);
}

/* An engine in front of the spool that confirms report batches (app
 * "@amplitude") late, or refuses them, and records when the report was
 * confirmed and when the delivery's acknowledgement came. */
typedef struct slow_q {
    amp_queue *inner; /* first: the pass_ operations read it */
    bool refuse;      /* report batches are refused instead of confirmed late */
    pthread_mutex_t mu;
    int64_t report_done_ms; /* 0: not confirmed yet */
    int reports;            /* report batches submitted */
    int64_t delivery_id;    /* the claimed job of app "chat" */
    int64_t ack_ms;         /* the delivery's first acknowledgement */
    amp_queue_ack_kind ack_kind;
    char ack_code[64];
} slow_q;

typedef struct late_submit {
    slow_q *q;
    amp_queue_batch *b;
    amp_queue_done_fn done;
    void *ctx;
} late_submit;

static void late_done(void *ctx, const amp_queue_result *res) {
    late_submit *l = ctx;
    if (res->status == 0) {
        pthread_mutex_lock(&l->q->mu);
        l->q->report_done_ms = amp_mono_ms();
        pthread_mutex_unlock(&l->q->mu);
    }
    l->done(l->ctx, res);
    free(l);
}

static void *late_main(void *arg) {
    late_submit *l = arg;
    sleep_ms(300);
    amp_queue_submit(l->q->inner, l->b, late_done, l);
    return NULL;
}

static bool is_report_batch(amp_queue_batch *b) {
    const amp_queue_request *reqs;
    size_t n;
    if (amp_queue_batch_events(b) == 0)
        return false;
    amp_queue_batch_event_at(b, 0, &reqs, &n);
    return n > 0 && strcmp(reqs[0].app, AMP_FORWARD_REPORT_APP) == 0;
}

static void slow_submit(void *e, amp_queue_batch *b, amp_queue_done_fn done, void *ctx) {
    slow_q *q = e;
    if (!is_report_batch(b)) {
        amp_queue_submit(q->inner, b, done, ctx);
        return;
    }
    pthread_mutex_lock(&q->mu);
    q->reports++;
    pthread_mutex_unlock(&q->mu);
    if (q->refuse) {
        amp_queue_batch_destroy(b);
        done(ctx, &(amp_queue_result){.status = -1, .error = "refused by the test"});
        return;
    }
    late_submit *l = amp_xcalloc(1, sizeof *l);
    *l = (late_submit){.q = q, .b = b, .done = done, .ctx = ctx};
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, late_main, l), 0);
    pthread_detach(t);
}

static amp_queue_ack_status slow_ack(void *e, const amp_queue_ack *a) {
    slow_q *q = e;
    pthread_mutex_lock(&q->mu);
    if (!q->ack_ms && q->delivery_id && a->id == q->delivery_id) {
        q->ack_ms = amp_mono_ms();
        q->ack_kind = a->kind;
        snprintf(q->ack_code, sizeof q->ack_code, "%s", a->code ? a->code : "");
    }
    pthread_mutex_unlock(&q->mu);
    return amp_queue_acknowledge(q->inner, a);
}

static int slow_claim(void *e, int shard, int64_t now_ms, amp_queue_job **jobs, size_t max,
                      int64_t *next_due_ms) {
    slow_q *q = e;
    int n = amp_queue_claim_shard(q->inner, shard, now_ms, jobs, max, next_due_ms);
    pthread_mutex_lock(&q->mu);
    for (int i = 0; i < n; i++)
        if (strcmp(jobs[i]->app, "chat") == 0)
            q->delivery_id = jobs[i]->id;
    pthread_mutex_unlock(&q->mu);
    return n;
}

static const amp_queue_ops slow_ops = {
    .close = pass_close,
    .set_notify = pass_set_notify,
    .submit = slow_submit,
    .claim = slow_claim,
    .acknowledge = slow_ack,
    .flush_until = pass_flush_until,
};

static amp_mapper *report_mapper(void) {
    json_t *apps = json_pack("{s:{s:s}}", "chat", "endpoint", "chat");
    json_t *routes = json_pack("[{s:s, s:s, s:{s:s}}]", "name", "r1", "app", "chat", "report",
                               "event_type", "dify_response");
    amp_errs *errs = amp_errs_create();
    amp_mapper *m = amp_mapper_compile(apps, routes, errs);
    ck_assert_msg(m != NULL, "mapper: %s", amp_errs_count(errs) ? "errors" : "?");
    amp_errs_destroy(errs);
    json_decref(apps);
    json_decref(routes);
    return m;
}

/* Run one delivery of route r1 through the slow engine; fills q. */
static void run_reported_delivery(slow_q *q) {
    harness h;
    harness_init(&h, 1);
    amp_mapper *m = report_mapper();
    h.opts.mapper = m; /* no report key: report jobs stay queued */
    pthread_mutex_init(&q->mu, NULL);
    q->inner = h.spool;
    amp_queue *outer = amp_queue_create(&slow_ops, q, 1);
    submit(&h, "ev-report", "chat", "u1", false, CHAT_BODY);
    char err[256];
    h.fwd = amp_forward_start(&h.opts, outer, err, sizeof err);
    ck_assert_msg(h.fwd != NULL, "start: %s", err);
    int64_t end = mono_ms() + 10000;
    for (;;) {
        pthread_mutex_lock(&q->mu);
        bool acked = q->ack_ms != 0;
        pthread_mutex_unlock(&q->mu);
        if (acked || mono_ms() > end)
            break;
        sleep_ms(10);
    }
    amp_forward_stop(h.fwd);
    h.fwd = NULL;
    amp_queue_close(outer);
    harness_done(&h);
    amp_mapper_destroy(m);
    sleep_ms(50); /* a late submit's thread has finished with q */
    pthread_mutex_destroy(&q->mu);
}

/* The engine confirms the report 300 ms late: the delivery's acknowledgement
 * waits for it (an acknowledgement stored first would lose the report in a
 * crash between the two). */
START_TEST(test_report_stored_before_ack) {
    slow_q q = {0};
    run_reported_delivery(&q);
    ck_assert_int_eq(q.reports, 1);
    ck_assert_msg(q.ack_ms != 0, "the delivery was not acknowledged");
    ck_assert_msg(q.ack_kind == AMP_QUEUE_ACK_DELIVERED, "acknowledged as %d (%s)", (int)q.ack_kind,
                  q.ack_code);
    ck_assert_msg(q.report_done_ms != 0 && q.report_done_ms <= q.ack_ms,
                  "acknowledged at %lld, the report confirmed at %lld", (long long)q.ack_ms,
                  (long long)q.report_done_ms);
}
END_TEST

/* The engine refuses the report: the delivery is not acknowledged as
 * final, it is retried. */
START_TEST(test_report_refused_retries_delivery) {
    slow_q q = {.refuse = true};
    run_reported_delivery(&q);
    ck_assert_int_ge(q.reports, 1);
    ck_assert_msg(q.ack_ms != 0, "the delivery was not acknowledged");
    ck_assert_int_eq(q.ack_kind, AMP_QUEUE_ACK_RETRY);
    ck_assert_str_eq(q.ack_code, "report_not_stored");
}
END_TEST

/* An engine in front of the spool that counts the forwarder's claims. */
typedef struct counting_q {
    amp_queue *inner;  /* first: the pass_ operations read it */
    atomic_int claims; /* claims that returned rows */
    atomic_int rows;
} counting_q;

static int counting_claim(void *e, int shard, int64_t now_ms, amp_queue_job **jobs, size_t max,
                          int64_t *next_due_ms) {
    counting_q *q = e;
    int n = amp_queue_claim_shard(q->inner, shard, now_ms, jobs, max, next_due_ms);
    if (n > 0) {
        atomic_fetch_add(&q->claims, 1);
        atomic_fetch_add(&q->rows, n);
    }
    return n;
}

static const amp_queue_ops counting_ops = {
    .close = pass_close,
    .set_notify = pass_set_notify,
    .submit = pass_submit,
    .claim = counting_claim,
    .acknowledge = pass_ack,
    .flush_until = pass_flush_until,
};

/* A backlog is claimed a pool's worth at a time, not a row or two per
 * delivery: each claim is a spool query and a wake-up of the dispatcher,
 * and claims of a row or two cost a delivery about 15% more CPU
 * (forward.c, amp_forward_start). */
START_TEST(test_backlog_claimed_in_batches) {
    enum { WORKERS = 8, ROWS = 800 };
    harness h;
    harness_init(&h, WORKERS);
    amp_queue_batch *b = batch_of(ROWS, "chat", NULL, false);
    submit_batch(&h, b);
    counting_q q = {.inner = h.spool};
    amp_queue *outer = amp_queue_create(&counting_ops, &q, 1);
    char err[256];
    h.fwd = amp_forward_start(&h.opts, outer, err, sizeof err);
    ck_assert_msg(h.fwd != NULL, "start: %s", err);
    wait_finished(&h, ROWS, 30000);
    amp_forward_stop(h.fwd);
    h.fwd = NULL;
    int claims = atomic_load(&q.claims), rows = atomic_load(&q.rows);
    ck_assert_int_eq(rows, ROWS);
    /* At least half a pool per claim on average: a worker that runs dry
     * while a claim is on its way is served by a smaller one. */
    ck_assert_msg(rows >= claims * (WORKERS / 2), "%d rows in %d claims (%.1f per claim)", rows,
                  claims, (double)rows / claims);
    amp_queue_close(outer);
    harness_done(&h);
}
END_TEST

static Suite *forward_suite(void) {
    Suite *s = suite_create("forward");
    TCase *tc = tcase_create("pure");
    tcase_add_loop_test(tc, test_classify_table, 0, (int)NCLASSIFY);
    tcase_add_test(tc, test_backoff_bounds);
    tcase_add_test(tc, test_backoff_jitter_spreads);
    tcase_add_test(tc, test_pace_bucket);
    tcase_add_test(tc, test_pause_interval);
    tcase_add_test(tc, test_defer_schedule);
    tcase_add_test(tc, test_retry_after);
    tcase_add_test(tc, test_trace_id);
    tcase_add_test(tc, test_join_url);
    tcase_add_test(tc, test_request_body);
    tcase_add_test(tc, test_utf8_cut);
    tcase_add_test(tc, test_result_chat);
    tcase_add_test(tc, test_result_answer_cap);
    tcase_add_test(tc, test_result_workflow);
    tcase_add_test(tc, test_sse_every_split);
    tcase_add_test(tc, test_sse_events);
    tcase_add_test(tc, test_sse_limits);
    suite_add_tcase(s, tc);

    tc = tcase_create("engine");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_deliver_chat_per_user);
    tcase_add_test(tc, test_not_per_user_sends_no_conversation);
    tcase_add_test(tc, test_retry_statuses_then_deliver);
    tcase_add_test(tc, test_retry_records_last_error);
    tcase_add_test(tc, test_retry_after_honoured);
    tcase_add_test(tc, test_permanent_dead_letter);
    tcase_add_test(tc, test_workflow_failed_and_ok);
    tcase_add_test(tc, test_reset_conversation);
    tcase_add_test(tc, test_pause_on_rejected_key);
    tcase_add_test(tc, test_expired);
    tcase_add_test(tc, test_unknown_app_and_bad_body);
    tcase_add_test(tc, test_connect_refused_is_retried);
    tcase_add_test(tc, test_timeout_is_retried);
    tcase_add_test(tc, test_streaming_answer);
    tcase_add_test(tc, test_response_too_large);
    tcase_add_test(tc, test_stop_finishes_in_flight);
    tcase_add_test(tc, test_stop_past_grace_ends_request);
    tcase_add_test(tc, test_http_requests_do_not_stall);
    tcase_add_test(tc, test_parallel_workers);
    tcase_add_test(tc, test_backlog_claimed_in_batches);
    tcase_add_test(tc, test_many_events_in_order);
    tcase_add_test(tc, test_start_rejects_bad_options);
    tcase_add_test(tc, test_key_never_logged);
    tcase_add_test(tc, test_metrics);
    tcase_add_test(tc, test_max_in_flight);
    tcase_add_test(tc, test_rate_limit);
    tcase_add_test(tc, test_slow_app_does_not_block_others);
    tcase_add_test(tc, test_full_queue_claims_nothing_more);
    tcase_add_test(tc, test_single_probe);
    tcase_add_test(tc, test_stop_keeps_pause);
    tcase_add_test(tc, test_rows_from_elsewhere);
    tcase_add_test(tc, test_report_stored_before_ack);
    tcase_add_test(tc, test_report_refused_retries_delivery);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return 1;
    /* Retries and pauses warn by design; AMP_TEST_LOG=debug shows them. */
    amp_log_level lvl = AMP_LOG_ERROR;
    const char *env = getenv("AMP_TEST_LOG");
    if (env)
        amp_log_parse_level(env, &lvl);
    amp_log_set_level(lvl);
    int rc = amp_check_run(forward_suite());
    curl_global_cleanup();
    return rc;
}
