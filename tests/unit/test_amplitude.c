/*
 * Unit tests for forward/amplitude.c, the HTTP V2 side of results sent back
 * to Amplitude: the pure per-event decision on each of Amplitude's answers
 * (200, partial 400, 413, 429 naming throttled users and devices, 5xx, no
 * answer), the batch limits (2,000 events, under 1 MB), and whole
 * deliveries over real sockets to the fake Amplitude
 * (tests/fake_amplitude): what it stored, once each, and the requests it
 * saw (a 413 halves the batch, refused events leave the others to go again,
 * throttled users wait while the others go).
 */
#include "../../forward/forward.h"
#include "../../forward/forward_int.h"
#include "../check_run.h"
#include "../fake_amplitude/fake_amplitude.h"
#include "../../base/alloc.h"
#include "../../base/clock.h"
#include "../../base/errs.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOW ((int64_t)1700000000000)
#define KEY "0123456789abcdef0123456789abcdef"
#define MAXN 64

typedef struct evset {
    amp_forward_amplitude_event ev[MAXN];
    char *json[MAXN];
    size_t n;
} evset;

/* Event i: user "u<i % users>", device "d<i>", insert_id "r-<i>". */
static void evset_fill(evset *s, size_t n, unsigned users) {
    memset(s, 0, sizeof *s);
    s->n = n;
    for (size_t i = 0; i < n; i++) {
        s->json[i] = amp_xasprintf("{\"event_type\":\"dify_response\",\"user_id\":\"u%u\","
                                   "\"device_id\":\"d%zu\",\"insert_id\":\"r-%zu\","
                                   "\"time\":%lld,\"event_properties\":{\"n\":%zu}}",
                                   (unsigned)(i % users), i, i, (long long)NOW, i);
        s->ev[i].json = s->json[i];
    }
}

static void evset_free(evset *s) {
    for (size_t i = 0; i < s->n; i++)
        free(s->json[i]);
}

/* ids: "u0"... strings kept by the test. */
static char uid[MAXN][24], did[MAXN][24];
static void set_ids(evset *s, unsigned users) {
    for (size_t i = 0; i < s->n; i++) {
        snprintf(uid[i], sizeof uid[i], "u%u", (unsigned)(i % users));
        snprintf(did[i], sizeof did[i], "d%zu", i);
        s->ev[i].user_id = uid[i];
        s->ev[i].device_id = did[i];
    }
}

static void decide(evset *s, long status, const char *body_text) {
    json_t *body = body_text ? json_loads(body_text, 0, NULL) : NULL;
    ck_assert_msg(!body_text || body, "bad test body %s", body_text);
    amp_forward_amplitude_decide(0, status, body, s->ev, s->n, NOW);
    json_decref(body);
}

START_TEST(test_decide_answers) {
    evset s;
    evset_fill(&s, 6, 3);
    set_ids(&s, 3);

    decide(&s, 200, "{\"code\":200,\"events_ingested\":6}");
    for (size_t i = 0; i < s.n; i++)
        ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_INGESTED);

    /* A partial 400: only the named events are refused, with the reason. */
    decide(&s, 400,
           "{\"code\":400,\"error\":\"Request missing required field\","
           "\"events_with_invalid_fields\":{\"time\":[1]},"
           "\"events_with_missing_fields\":{\"event_type\":[3,4]},"
           "\"silenced_devices\":[\"d5\"],\"silenced_events\":[5]}");
    int want400[] = {AMP_FORWARD_AMPLITUDE_AGAIN,   AMP_FORWARD_AMPLITUDE_REFUSED,
                     AMP_FORWARD_AMPLITUDE_AGAIN,   AMP_FORWARD_AMPLITUDE_REFUSED,
                     AMP_FORWARD_AMPLITUDE_REFUSED, AMP_FORWARD_AMPLITUDE_REFUSED};
    for (size_t i = 0; i < s.n; i++)
        ck_assert_msg((int)s.ev[i].fate == want400[i], "event %zu: fate %d", i, s.ev[i].fate);
    ck_assert_str_eq(s.ev[1].reason, "invalid field: time");
    ck_assert_str_eq(s.ev[3].reason, "missing field: event_type");
    ck_assert_str_eq(s.ev[5].reason, "silenced device: d5");

    /* A 400 naming no event is about the request: all refused. */
    decide(&s, 400, "{\"code\":400,\"error\":\"Invalid API key\"}");
    for (size_t i = 0; i < s.n; i++) {
        ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_REFUSED);
        ck_assert_str_eq(s.ev[i].reason, "Invalid API key");
    }

    /* 429: user u1 (events 1, 4) and device d2 wait 30 s; the others go again. */
    decide(&s, 429,
           "{\"code\":429,\"error\":\"Too many requests for some devices and users\","
           "\"eps_threshold\":30,\"throttled_devices\":{\"d2\":31},"
           "\"throttled_users\":{\"u1\":32},\"throttled_events\":[1,2,4],"
           "\"exceeded_daily_quota_users\":{},\"exceeded_daily_quota_devices\":{}}");
    for (size_t i = 0; i < s.n; i++) {
        bool held = i == 1 || i == 2 || i == 4;
        ck_assert_int_eq(s.ev[i].fate,
                         held ? AMP_FORWARD_AMPLITUDE_HOLD : AMP_FORWARD_AMPLITUDE_AGAIN);
        if (held)
            ck_assert_int_eq(s.ev[i].due_ms, NOW + AMP_FORWARD_AMPLITUDE_THROTTLE_MS);
    }
    /* Throttled without names: everything waits. */
    decide(&s, 429, "{\"code\":429,\"error\":\"Too many requests\"}");
    for (size_t i = 0; i < s.n; i++)
        ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_HOLD);

    decide(&s, 413, "{\"code\":413,\"error\":\"Payload too large\"}");
    for (size_t i = 0; i < s.n; i++)
        ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_SPLIT);

    long retry[] = {500, 502, 503, 504};
    for (size_t k = 0; k < 4; k++) {
        decide(&s, retry[k], "{\"code\":500,\"error\":\"x\"}");
        for (size_t i = 0; i < s.n; i++)
            ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_RETRY);
    }
    amp_forward_amplitude_decide(7, 0, NULL, s.ev, s.n, NOW);
    for (size_t i = 0; i < s.n; i++)
        ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_RETRY);

    /* One event alone and still too large: refused, not split forever. */
    amp_forward_amplitude_decide(0, 413, NULL, s.ev, 1, NOW);
    ck_assert_int_eq(s.ev[0].fate, AMP_FORWARD_AMPLITUDE_REFUSED);
    ck_assert_str_eq(s.ev[0].reason, "payload too large");
    evset_free(&s);
}
END_TEST

START_TEST(test_fit_limits) {
    /* 2,500 small events: a request takes 2,000. */
    static amp_forward_amplitude_event ev[2500];
    for (size_t i = 0; i < 2500; i++)
        ev[i].json = "{\"event_type\":\"e\",\"user_id\":\"u\"}";
    ck_assert_uint_eq(amp_forward_amplitude_fit(ev, 2500, AMP_FORWARD_AMPLITUDE_MAX_EVENTS,
                                                AMP_FORWARD_AMPLITUDE_MAX_BYTES),
                      2000);
    ck_assert_uint_eq(amp_forward_amplitude_fit(ev, 2500, 7, AMP_FORWARD_AMPLITUDE_MAX_BYTES), 7);
    /* 3 events of 400 kB: under 1 MB takes 2; one alone always goes. */
    char *big = amp_xmalloc(400 * 1000 + 1);
    memset(big, 'x', 400 * 1000);
    big[400 * 1000] = '\0';
    amp_forward_amplitude_event b[3] = {{.json = big}, {.json = big}, {.json = big}};
    size_t k = amp_forward_amplitude_fit(b, 3, 2000, AMP_FORWARD_AMPLITUDE_MAX_BYTES);
    ck_assert_uint_eq(k, 2);
    char *body = amp_forward_amplitude_body(KEY, b, k);
    ck_assert_uint_lt(strlen(body), AMP_FORWARD_AMPLITUDE_MAX_BYTES);
    free(body);
    ck_assert_uint_eq(amp_forward_amplitude_fit(b, 3, 2000, 1000), 1);
    free(big);
    /* The body is the API's shape, the key escaped. */
    amp_forward_amplitude_event two[2] = {{.json = "{\"a\":1}"}, {.json = "{\"b\":2}"}};
    body = amp_forward_amplitude_body("k\"1", two, 2);
    ck_assert_str_eq(body, "{\"api_key\":\"k\\\"1\",\"events\":[{\"a\":1},{\"b\":2}]}");
    free(body);
}
END_TEST

/* ---- over real sockets, against the fake Amplitude ----------------------- */

static fake_amplitude *fa;
static amp_forward_http *http;
static char url[64];

static void setup(void) {
    fa = fake_amplitude_start(0, KEY, "secret");
    ck_assert_ptr_nonnull(fa);
    snprintf(url, sizeof url, "http://127.0.0.1:%u/2/httpapi", fake_amplitude_port(fa));
    char err[256];
    http = amp_forward_http_create(5, 10, NULL, err, sizeof err);
    ck_assert_msg(http != NULL, "%s", err);
}

static void teardown(void) {
    amp_forward_http_destroy(http);
    fake_amplitude_stop(fa);
}

/* Statuses of the fake's HTTP V2 requests, "200,413,..."; caller frees. */
static char *statuses(void) {
    json_t *r = fake_amplitude_http_requests(fa);
    char *out = amp_xstrdup("");
    size_t i;
    json_t *v;
    json_array_foreach(r, i, v) {
        char *n = amp_xasprintf("%s%s%d/%d", out, i ? "," : "",
                                (int)json_integer_value(json_object_get(v, "status")),
                                (int)json_integer_value(json_object_get(v, "events")));
        free(out);
        out = n;
    }
    json_decref(r);
    return out;
}

/* Each insert_id r-<i> stored exactly once for the i in want[0..n). */
static void assert_stored(const size_t *want, size_t n) {
    json_t *evs = fake_amplitude_http_events(fa);
    ck_assert_uint_eq(json_array_size(evs), n);
    for (size_t k = 0; k < n; k++) {
        char id[32];
        snprintf(id, sizeof id, "r-%zu", want[k]);
        size_t i, hits = 0;
        json_t *v;
        json_array_foreach(evs, i, v) {
            hits += strcmp(json_string_value(json_object_get(v, "insert_id")), id) == 0;
        }
        ck_assert_msg(hits == 1, "%s stored %zu times", id, hits);
    }
    json_decref(evs);
}

START_TEST(test_send_ok_in_batches) {
    evset s;
    evset_fill(&s, 10, 10);
    set_ids(&s, 10);
    amp_forward_amplitude_stats st;
    amp_forward_amplitude_send(http, url, KEY, s.ev, s.n, 4, &st);
    for (size_t i = 0; i < s.n; i++)
        ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_INGESTED);
    char *seen = statuses();
    ck_assert_str_eq(seen, "200/4,200/4,200/2");
    free(seen);
    ck_assert_uint_eq(st.requests, 3);
    size_t all[10] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
    assert_stored(all, 10);
    evset_free(&s);
}
END_TEST

/* More batches than the retry rounds: every one is still sent. */
START_TEST(test_send_many_batches) {
    evset s;
    evset_fill(&s, MAXN, MAXN);
    set_ids(&s, MAXN);
    amp_forward_amplitude_stats st;
    amp_forward_amplitude_send(http, url, KEY, s.ev, s.n, 1, &st);
    for (size_t i = 0; i < s.n; i++)
        ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_INGESTED);
    ck_assert_uint_eq(st.requests, MAXN);
    json_t *evs = fake_amplitude_http_events(fa);
    ck_assert_uint_eq(json_array_size(evs), MAXN);
    json_decref(evs);
    evset_free(&s);
}
END_TEST

START_TEST(test_send_413_halves) {
    fake_amplitude_http_max_events(fa, 3);
    evset s;
    evset_fill(&s, 10, 10);
    set_ids(&s, 10);
    amp_forward_amplitude_send(http, url, KEY, s.ev, s.n, 2000, NULL);
    for (size_t i = 0; i < s.n; i++)
        ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_INGESTED);
    char *seen = statuses();
    /* 10 too many, 5 too many, then 2 at a time. */
    ck_assert_str_eq(seen, "413/10,413/5,200/2,200/2,200/2,200/2,200/2");
    free(seen);
    size_t all[10] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
    assert_stored(all, 10);
    evset_free(&s);
}
END_TEST

START_TEST(test_send_partial_400) {
    evset s;
    evset_fill(&s, 5, 5);
    /* Event 2 has no event_type, event 4's device is silenced. */
    free(s.json[2]);
    s.json[2] = amp_xstrdup("{\"user_id\":\"u2\",\"insert_id\":\"r-2\"}");
    s.ev[2].json = s.json[2];
    set_ids(&s, 5);
    fake_amplitude_http_silence_device(fa, "d4");
    amp_forward_amplitude_send(http, url, KEY, s.ev, s.n, 2000, NULL);
    ck_assert_int_eq(s.ev[2].fate, AMP_FORWARD_AMPLITUDE_REFUSED);
    ck_assert_str_eq(s.ev[2].reason, "missing field: event_type");
    ck_assert_int_eq(s.ev[4].fate, AMP_FORWARD_AMPLITUDE_REFUSED);
    ck_assert_str_eq(s.ev[4].reason, "silenced device: d4");
    size_t ok[] = {0, 1, 3};
    for (size_t k = 0; k < 3; k++)
        ck_assert_int_eq(s.ev[ok[k]].fate, AMP_FORWARD_AMPLITUDE_INGESTED);
    char *seen = statuses();
    ck_assert_str_eq(seen, "400/5,200/3");
    free(seen);
    assert_stored(ok, 3);
    evset_free(&s);
}
END_TEST

START_TEST(test_send_429_holds_throttled) {
    evset s;
    evset_fill(&s, 6, 3); /* users u0 u1 u2 u0 u1 u2 */
    set_ids(&s, 3);
    fake_amplitude_http_throttle_user(fa, "u1", 1);
    int64_t before = amp_now_ms();
    amp_forward_amplitude_send(http, url, KEY, s.ev, s.n, 2000, NULL);
    for (size_t i = 0; i < s.n; i++) {
        if (i % 3 == 1) {
            ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_HOLD);
            ck_assert_int_ge(s.ev[i].due_ms, before + AMP_FORWARD_AMPLITUDE_THROTTLE_MS);
        } else {
            ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_INGESTED);
        }
    }
    char *seen = statuses();
    ck_assert_str_eq(seen, "429/6,200/4");
    free(seen);
    size_t ok[] = {0, 2, 3, 5};
    assert_stored(ok, 4);
    evset_free(&s);
}
END_TEST

START_TEST(test_send_5xx_then_again_once_each) {
    evset s;
    evset_fill(&s, 4, 4);
    set_ids(&s, 4);
    fake_amplitude_http_push_status(fa, 500);
    amp_forward_amplitude_stats st;
    amp_forward_amplitude_send(http, url, KEY, s.ev, s.n, 2, &st);
    /* Amplitude is down: nothing more is sent this time, all wait. */
    for (size_t i = 0; i < s.n; i++)
        ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_RETRY);
    ck_assert_uint_eq(st.requests, 1);
    ck_assert_int_eq(st.last_status, 500);
    /* Sent again (twice: a lost 200 resends what was stored): once each. */
    fake_amplitude_http_push_status(fa, 503);
    amp_forward_amplitude_send(http, url, KEY, s.ev, s.n, 2, NULL);
    amp_forward_amplitude_send(http, url, KEY, s.ev, s.n, 2, NULL);
    amp_forward_amplitude_send(http, url, KEY, s.ev, s.n, 2, NULL);
    for (size_t i = 0; i < s.n; i++)
        ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_INGESTED);
    size_t all[] = {0, 1, 2, 3};
    assert_stored(all, 4);
    ck_assert_uint_eq(fake_amplitude_http_duplicates(fa), 4);
    char *seen = statuses();
    ck_assert_str_eq(seen, "500/2,503/2,200/2,200/2,200/2,200/2");
    free(seen);
    evset_free(&s);
}
END_TEST

START_TEST(test_send_bad_key_and_no_server) {
    evset s;
    evset_fill(&s, 2, 2);
    set_ids(&s, 2);
    amp_forward_amplitude_send(http, url, "wrong", s.ev, s.n, 2000, NULL);
    for (size_t i = 0; i < s.n; i++) {
        ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_REFUSED);
        ck_assert_str_eq(s.ev[i].reason, "Invalid API key");
    }
    /* Nobody listening: a transport error, everything waits for a retry. */
    char gone[64];
    snprintf(gone, sizeof gone, "http://127.0.0.1:%u/2/httpapi", fake_amplitude_port(fa));
    fake_amplitude_stop(fa);
    fa = NULL;
    amp_forward_amplitude_stats st;
    amp_forward_amplitude_send(http, gone, KEY, s.ev, s.n, 2000, &st);
    for (size_t i = 0; i < s.n; i++)
        ck_assert_int_eq(s.ev[i].fate, AMP_FORWARD_AMPLITUDE_RETRY);
    ck_assert_int_eq(st.last_status, 0);
    ck_assert_ptr_nonnull(strstr(st.last_error, "connect"));
    evset_free(&s);
}
END_TEST

/* The report event: the source event's user_id and device_id (a job stored
 * without its source: the job's user), the default properties, or the
 * report's "properties" templates over them and the source event. */
static amp_mapper *mapper_with(const char *report_json) {
    json_t *apps = json_pack("{s:{s:s}}", "support", "endpoint", "chat");
    json_t *routes = json_pack("[{s:s, s:s, s:o}]", "name", "r", "app", "support", "report",
                               json_loads(report_json, 0, NULL));
    amp_errs *errs = amp_errs_create();
    amp_mapper *m = amp_mapper_compile(apps, routes, errs);
    ck_assert_uint_eq(amp_errs_count(errs), 0);
    amp_errs_destroy(errs);
    json_decref(apps);
    json_decref(routes);
    ck_assert_ptr_nonnull(m);
    return m;
}

static json_t *report_of(const amp_mapper *m, const char *source, bool delivered) {
    amp_queue_job job = {.id = 7,
                         .route = "r",
                         .app = "support",
                         .user = "route-user",
                         .dedupe_key = "src-1",
                         .attempts = 1,
                         .source = (char *)source};
    const amp_map_report *spec = amp_mapper_report(m, "r", "support");
    ck_assert_ptr_nonnull(spec);
    char *text = amp_forward_report_event(
        spec, &job, AMP_ENDPOINT_CHAT, delivered, delivered ? 200 : 400,
        delivered ? NULL : "invalid_param", delivered ? NULL : "bad",
        "{\"latency_ms\":42,\"message_id\":\"m-1\",\"answer\":\"h\\u00e9llo world\","
        "\"usage\":{\"total_tokens\":17}}",
        NOW);
    json_t *ev = json_loads(text, 0, NULL);
    free(text);
    ck_assert_ptr_nonnull(ev);
    return ev;
}

START_TEST(test_report_event_ids_and_properties) {
    amp_mapper *m = mapper_with("{\"answer_chars\": 2}");
    json_t *ev = report_of(m, "{\"user_id\":\"u-1\",\"device_id\":\"d-1\"}", true);
    ck_assert_str_eq(json_string_value(json_object_get(ev, "user_id")), "u-1");
    ck_assert_str_eq(json_string_value(json_object_get(ev, "device_id")), "d-1");
    ck_assert_str_eq(json_string_value(json_object_get(ev, "insert_id")), "amp2dify-r-src-1");
    ck_assert_str_eq(json_string_value(json_object_get(ev, "event_type")), "dify_response");
    ck_assert_int_eq(json_integer_value(json_object_get(ev, "time")), NOW);
    json_t *p = json_object_get(ev, "event_properties");
    ck_assert_str_eq(json_string_value(json_object_get(p, "status")), "delivered");
    ck_assert_int_eq(json_integer_value(json_object_get(p, "latency_ms")), 42);
    ck_assert_int_eq(json_integer_value(json_object_get(p, "tokens")), 17);
    ck_assert_int_eq(json_integer_value(json_object_get(p, "attempts")), 2);
    ck_assert_str_eq(json_string_value(json_object_get(p, "answer")), "h\xc3\xa9");
    json_decref(ev);
    /* Only a device id: no user_id. No source at all: the job's user. */
    ev = report_of(m, "{\"device_id\":\"d-2\"}", true);
    ck_assert_ptr_null(json_object_get(ev, "user_id"));
    ck_assert_str_eq(json_string_value(json_object_get(ev, "device_id")), "d-2");
    json_decref(ev);
    ev = report_of(m, NULL, false);
    ck_assert_str_eq(json_string_value(json_object_get(ev, "user_id")), "route-user");
    ck_assert_ptr_null(json_object_get(ev, "device_id"));
    p = json_object_get(ev, "event_properties");
    ck_assert_str_eq(json_string_value(json_object_get(p, "status")), "dead");
    ck_assert_str_eq(json_string_value(json_object_get(p, "error_code")), "invalid_param");
    json_decref(ev);
    amp_mapper_destroy(m);

    m = mapper_with("{\"event_type\": \"ai\", \"properties\": {\"s\": \"{{status}}\", "
                    "\"ms\": \"{{latency_ms}}\", \"plan\": \"{{event.props.plan}}\", "
                    "\"obj\": \"{{event.props}}\", \"line\": \"{{dify_app}}/{{tokens}}\", "
                    "\"none\": \"{{event.missing}}\"}}");
    ev = report_of(m, "{\"user_id\":\"u-1\",\"props\":{\"plan\":\"pro\"}}", true);
    ck_assert_str_eq(json_string_value(json_object_get(ev, "event_type")), "ai");
    p = json_object_get(ev, "event_properties");
    ck_assert_uint_eq(json_object_size(p), 5);
    ck_assert_str_eq(json_string_value(json_object_get(p, "s")), "delivered");
    ck_assert_int_eq(json_integer_value(json_object_get(p, "ms")), 42);
    ck_assert_str_eq(json_string_value(json_object_get(p, "plan")), "pro");
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(p, "obj"), "plan")), "pro");
    ck_assert_str_eq(json_string_value(json_object_get(p, "line")), "support/17");
    json_decref(ev);
    amp_mapper_destroy(m);
}
END_TEST

static Suite *amplitude_suite(void) {
    Suite *s = suite_create("amplitude");
    TCase *tc = tcase_create("decide");
    tcase_add_test(tc, test_decide_answers);
    tcase_add_test(tc, test_fit_limits);
    tcase_add_test(tc, test_report_event_ids_and_properties);
    suite_add_tcase(s, tc);
    TCase *net = tcase_create("http");
    tcase_add_checked_fixture(net, setup, teardown);
    tcase_set_timeout(net, 30);
    tcase_add_test(net, test_send_ok_in_batches);
    tcase_add_test(net, test_send_many_batches);
    tcase_add_test(net, test_send_413_halves);
    tcase_add_test(net, test_send_partial_400);
    tcase_add_test(net, test_send_429_holds_throttled);
    tcase_add_test(net, test_send_5xx_then_again_once_each);
    tcase_add_test(net, test_send_bad_key_and_no_server);
    suite_add_tcase(s, net);
    return s;
}

int main(void) {
    curl_global_init(CURL_GLOBAL_DEFAULT);
    int rc = amp_check_run(amplitude_suite());
    curl_global_cleanup();
    return rc;
}
