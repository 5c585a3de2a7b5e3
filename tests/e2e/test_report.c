/*
 * End-to-end route reports: events posted to the webhook are delivered to
 * the fake Dify by a route whose app has a "report" and by a route with a
 * report of its own (properties from templates), and for each delivery that
 * reaches its final state (delivered, or dead after a Dify 400) one event
 * reaches the fake Amplitude's HTTP V2 API (tests/fake_amplitude), in
 * Amplitude's schema, with the source event's user_id and device_id, once,
 * although Amplitude answered 500 and throttled a user (429) on the way.
 * The reporter's thread runs dify.nice (15 by default) nicer than ingest's.
 */
#include <check.h>
#include <curl/curl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../base/alloc.h"
#include "../../base/clock.h"
#include "../fake_amplitude/fake_amplitude.h"
#include "../fake_dify/fake_dify.h"
#include "../check_run.h"
#include "checked.h"
#include "harness.h"
#include "redis_server.h"

#define AMP_KEY "amp-http-api-key"
#define NEVENTS 12
#define NCUSTOM 4 /* events i % 3 == 0 are of type "custom": a second route reports them */

static char *config(uint16_t amp_port) {
    return amp_xasprintf(
        "{\n"
        "  \"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
        "  \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
        "  \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"workers\": 2,\n"
        "           \"retry\": {\"initial_ms\": 50, \"max_ms\": 200}},\n"
        "  \"reports\": {\"base_url\": \"http://127.0.0.1:%u\", \"batch_events\": 5,\n"
        "              \"linger_ms\": 50, \"throttle_ms\": 500},\n"
        "  \"apps\": {\"support\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"chat\",\n"
        "              \"report\": {\"event_type\": \"dify_answer\", \"answer_chars\": 6}}},\n"
        "  \"routes\": [{\"name\": \"all\", \"app\": \"support\",\n"
        "              \"query\": \"{{event_type}} by {{user_id}}\", \"user\": \"{{user_id}}\"},\n"
        "             {\"name\": \"custom\", \"app\": \"support\",\n"
        "              \"filter\": {\"field\": \"event_type\", \"op\": \"equals\", \"value\": "
        "\"custom\"},\n"
        "              \"report\": {\"event_type\": \"ai_custom\", \"properties\": {\n"
        "                \"ai\": \"{{status}}\", \"plan\": \"{{event.event_properties.plan}}\",\n"
        "                \"seats\": \"{{event.event_properties.seats}}\", \"ms\": "
        "\"{{latency_ms}}\",\n"
        "                \"tag\": \"x-{{dify_app}}\", \"gone\": \"{{event.nothing}}\"}}}]\n"
        "}\n",
        amp_port);
}

/* Wait (bounded) until the fake Amplitude stored n events. */
static size_t wait_events(fake_amplitude *fa, size_t n, unsigned timeout_ms) {
    int64_t end = h_mono_ms() + timeout_ms;
    size_t have = 0;
    for (;;) {
        json_t *evs = fake_amplitude_http_events(fa);
        have = json_array_size(evs);
        json_decref(evs);
        if (have >= n || h_mono_ms() >= end)
            return have;
        h_sleep_ms(20);
    }
}

/* Reports of the "custom" route that say dead. */
static unsigned custom_dead(json_t *evs) {
    unsigned n = 0;
    size_t i;
    json_t *e;
    json_array_foreach(evs, i, e) {
        const char *ai =
            json_string_value(json_object_get(json_object_get(e, "event_properties"), "ai"));
        n += ai && strcmp(ai, "dead") == 0;
    }
    return n;
}

static bool saw_status(fake_amplitude *fa, int status) {
    json_t *r = fake_amplitude_http_requests(fa);
    size_t i;
    json_t *v;
    bool seen = false;
    json_array_foreach(r, i, v) {
        seen = seen || json_integer_value(json_object_get(v, "status")) == status;
    }
    json_decref(r);
    return seen;
}

START_TEST(reports_reach_amplitude_once_each) {
    fake_amplitude *fa = fake_amplitude_start(0, AMP_KEY, "unused-secret");
    ck_assert_ptr_nonnull(fa);
    /* Faults: the first HTTP V2 request gets 500; user-1 is throttled for
     * the next two requests holding its events. */
    fake_amplitude_http_push_status(fa, 500);
    fake_amplitude_http_throttle_user(fa, "user-1", 2);
    fake_dify *d = h_fake_start();
    /* The first Dify request is refused for good: its report says dead. */
    fake_dify_push_status(d, 400);

    char *cfg = config(fake_amplitude_port(fa));
    static const char *const env[] = {"AMPLITUDE_API_KEY=" AMP_KEY, NULL};
    h_opts o = {.config_json = cfg, .dify_port = fake_dify_port(d), .env = env};
    h_server *s = h_server_start(&o);
    ck_assert_msg(s != NULL, "amp2dify did not start");
    /* The reporter is a delivery thread: dify.nice (15 by default) below ingest. */
    int base = h_nice(h_server_pid(s));
    ck_assert_int_ne(base, INT_MIN);
    char why[160];
    ck_assert_msg(h_wait_nice(h_server_pid(s), "amp-report", 1, base + 15 > 19 ? 19 : base + 15,
                              why, sizeof why),
                  "%s", why);

    /* Events i % 3 == 2 have only a device_id; the others both ids. */
    for (int i = 0; i < NEVENTS; i++) {
        char user[16], dev[16], id[32];
        snprintf(user, sizeof user, "user-%d", i % 4);
        snprintf(dev, sizeof dev, "dev-%d", i);
        snprintf(id, sizeof id, "src-%d", i);
        json_t *e = json_pack("{s:s, s:I, s:s, s:s, s:{s:s, s:i}}", "event_type",
                              i % 3 == 0 ? "custom" : "clicked", "time", (json_int_t)amp_now_ms(),
                              "insert_id", id, "device_id", dev, "event_properties", "plan", "pro",
                              "seats", 3);
        if (i % 3 != 2)
            json_object_set_new(e, "user_id", json_string(user));
        char *ev = json_dumps(e, JSON_COMPACT);
        json_decref(e);
        h_resp *r = h_post_signed(s, ev);
        ck_assert_msg(r && r->status / 100 == 2, "webhook answered %ld", r ? (long)r->status : -1L);
        h_resp_free(r);
        free(ev);
    }
    ck_assert_uint_eq(wait_events(fa, NEVENTS + NCUSTOM, 20000), NEVENTS + NCUSTOM);
    /* Nothing more arrives: once each. */
    h_sleep_ms(700);
    json_t *evs = fake_amplitude_http_events(fa);
    ck_assert_uint_eq(json_array_size(evs), NEVENTS + NCUSTOM);
    ck_assert(saw_status(fa, 500));
    ck_assert(saw_status(fa, 429));

    unsigned dead = 0, delivered = 0, custom = 0;
    json_t *ids = json_object();
    size_t i;
    json_t *e;
    json_array_foreach(evs, i, e) {
        /* Amplitude's schema: these keys, these types, nothing else. */
        const char *key;
        json_t *v;
        json_object_foreach(e, key, v) {
            ck_assert_msg(strcmp(key, "event_type") == 0 || strcmp(key, "user_id") == 0 ||
                              strcmp(key, "device_id") == 0 || strcmp(key, "insert_id") == 0 ||
                              strcmp(key, "time") == 0 || strcmp(key, "event_properties") == 0,
                          "unexpected key %s", key);
        }
        ck_assert(json_is_string(json_object_get(e, "event_type")));
        ck_assert(json_is_integer(json_object_get(e, "time")));
        ck_assert(json_is_object(json_object_get(e, "event_properties")));
        const char *iid = json_string_value(json_object_get(e, "insert_id"));
        ck_assert_ptr_nonnull(iid);
        ck_assert_msg(json_object_get(ids, iid) == NULL, "insert_id %s twice", iid);
        json_object_set_new(ids, iid, json_true());
        /* The source event's ids: src-<k> had device dev-<k>, and user
         * user-<k % 4> unless k % 3 == 2. */
        int k = atoi(strrchr(iid, '-') + 1);
        char want_user[16], want_dev[16];
        snprintf(want_user, sizeof want_user, "user-%d", k % 4);
        snprintf(want_dev, sizeof want_dev, "dev-%d", k);
        const char *dev = json_string_value(json_object_get(e, "device_id"));
        ck_assert_msg(dev && strcmp(dev, want_dev) == 0, "%s: device_id %s", iid, dev);
        const char *user = json_string_value(json_object_get(e, "user_id"));
        if (k % 3 == 2)
            ck_assert_msg(json_object_get(e, "user_id") == NULL, "%s: user_id %s", iid, user);
        else
            ck_assert_msg(user && strcmp(user, want_user) == 0, "%s: user_id %s", iid, user);
        json_t *p = json_object_get(e, "event_properties");
        if (strncmp(iid, "amp2dify-custom-", 16) == 0) {
            /* The route's own report, its properties from templates. */
            custom++;
            ck_assert_int_eq(k % 3, 0);
            ck_assert_str_eq(json_string_value(json_object_get(e, "event_type")), "ai_custom");
            const char *ai = json_string_value(json_object_get(p, "ai"));
            ck_assert_msg(ai && (strcmp(ai, "delivered") == 0 || strcmp(ai, "dead") == 0), "ai %s",
                          ai);
            ck_assert_str_eq(json_string_value(json_object_get(p, "plan")), "pro");
            ck_assert_int_eq(json_integer_value(json_object_get(p, "seats")), 3);
            ck_assert_str_eq(json_string_value(json_object_get(p, "tag")), "x-support");
            ck_assert_ptr_null(json_object_get(p, "gone"));
            if (strcmp(ai, "delivered") == 0)
                ck_assert(json_is_integer(json_object_get(p, "ms")));
            ck_assert_uint_eq(json_object_size(p), strcmp(ai, "delivered") == 0 ? 5 : 4);
            continue;
        }
        /* The app's report. */
        ck_assert_str_eq(json_string_value(json_object_get(e, "event_type")), "dify_answer");
        ck_assert_str_eq(json_string_value(json_object_get(p, "dify_app")), "support");
        ck_assert_str_eq(json_string_value(json_object_get(p, "route")), "all");
        ck_assert_str_eq(json_string_value(json_object_get(p, "endpoint")), "chat-messages");
        const char *st = json_string_value(json_object_get(p, "status"));
        ck_assert_ptr_nonnull(st);
        if (strcmp(st, "dead") == 0) {
            dead++;
            ck_assert_int_eq(json_integer_value(json_object_get(p, "http_status")), 400);
        } else {
            ck_assert_str_eq(st, "delivered");
            delivered++;
            const char *answer = json_string_value(json_object_get(p, "answer"));
            ck_assert_ptr_nonnull(answer);
            ck_assert_uint_le(strlen(answer), 6 * 4);
            ck_assert_ptr_nonnull(json_object_get(p, "message_id"));
            ck_assert_ptr_nonnull(json_object_get(p, "conversation_id"));
        }
    }
    ck_assert_uint_eq(custom, NCUSTOM);
    ck_assert_uint_eq(dead + custom_dead(evs), 1);
    ck_assert_uint_eq(delivered + dead, NEVENTS);
    /* The insert_ids name the source events. */
    for (int k = 0; k < NEVENTS; k++) {
        char iid[64];
        snprintf(iid, sizeof iid, "amp2dify-all-src-%d", k);
        ck_assert_msg(json_object_get(ids, iid) != NULL, "no report for src-%d", k);
    }
    json_decref(ids);
    json_decref(evs);

    h_server_stop_ok(s);
    fake_dify_stop(d);
    fake_amplitude_stop(fa);
    free(cfg);
}
END_TEST

/* sources.sdk.tee: events accepted on the SDK endpoint are also sent on to
 * Amplitude, as the SDK sent them, insert_id kept; an SDK's resend of the
 * same request stores and sends nothing twice; an event no route takes is
 * teed all the same; a 500 from Amplitude on the way costs nothing. */
START_TEST(sdk_tee_sends_accepted_events_on_once) {
    fake_amplitude *fa = fake_amplitude_start(0, AMP_KEY, "unused-secret");
    ck_assert_ptr_nonnull(fa);
    fake_amplitude_http_push_status(fa, 500);
    fake_dify *d = h_fake_start();
    char *cfg = amp_xasprintf(
        "{\n"
        "  \"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
        "  \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
        "  \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"workers\": 2,\n"
        "           \"retry\": {\"initial_ms\": 50, \"max_ms\": 200}},\n"
        "  \"sources\": {\"sdk\": {\"enabled\": true, \"tee\": true}},\n"
        "  \"reports\": {\"base_url\": \"http://127.0.0.1:%u\", \"linger_ms\": 20},\n"
        "  \"apps\": {\"support\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"chat\"}},\n"
        "  \"routes\": [{\"name\": \"clicks\", \"app\": \"support\",\n"
        "              \"filter\": {\"field\": \"event_type\", \"op\": \"equals\", \"value\": "
        "\"clicked\"}}]\n"
        "}\n",
        fake_amplitude_port(fa));
    static const char *const env[] = {"AMPLITUDE_API_KEY=" AMP_KEY,
                                      "AMP2DIFY_SDK_API_KEYS=sdk-key-1", NULL};
    h_opts o = {.config_json = cfg, .dify_port = fake_dify_port(d), .env = env};
    h_server *s = h_server_start(&o);
    ck_assert_msg(s != NULL, "amp2dify did not start");

    /* Five events: three clicks (routed to Dify), a view (no route), one
     * click without insert_id. */
    json_t *events = json_array();
    for (int i = 0; i < 5; i++) {
        json_t *e = json_pack("{s:s, s:s, s:I, s:{s:i}}", "event_type",
                              i == 3 ? "viewed" : "clicked", "user_id", "sdk-user-1", "time",
                              (json_int_t)amp_now_ms(), "event_properties", "n", i);
        if (i != 4)
            json_object_set_new(e, "insert_id", json_sprintf("tee-%d", i));
        json_array_append_new(events, e);
    }
    json_t *req = json_pack("{s:s, s:o}", "api_key", "sdk-key-1", "events", events);
    char *body = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    for (int round = 0; round < 2; round++) { /* the second: an SDK's resend */
        h_resp *r = h_post(s, "/2/httpapi", body, NULL);
        ck_assert_msg(r->status == 200, "SDK endpoint answered %ld: %s", r->status, r->body);
        ck_assert_int_eq(json_integer_value(json_object_get(r->json, "code")), 200);
        h_resp_free(r);
    }
    /* 5 teed the first time; the resend's four keyed events are duplicates,
     * its unkeyed one is a new event (no key to know it by). */
    ck_assert_uint_eq(wait_events(fa, 6, 20000), 6);
    h_sleep_ms(500);
    json_t *evs = fake_amplitude_http_events(fa);
    ck_assert_uint_eq(json_array_size(evs), 6);
    ck_assert_uint_eq(fake_amplitude_http_duplicates(fa), 0);
    ck_assert(saw_status(fa, 500));
    unsigned minted = 0;
    size_t i;
    json_t *e;
    json_array_foreach(evs, i, e) {
        const char *iid = json_string_value(json_object_get(e, "insert_id"));
        ck_assert_ptr_nonnull(iid);
        ck_assert_str_eq(json_string_value(json_object_get(e, "user_id")), "sdk-user-1");
        ck_assert(json_is_integer(json_object_get(e, "time")));
        int n =
            (int)json_integer_value(json_object_get(json_object_get(e, "event_properties"), "n"));
        if (strncmp(iid, "amp2dify-", 9) == 0) {
            ck_assert_int_eq(n, 4);
            ck_assert_uint_eq(strlen(iid), 9 + 32);
            minted++;
        } else {
            char want[16];
            snprintf(want, sizeof want, "tee-%d", n);
            ck_assert_str_eq(iid, want);
            ck_assert_str_eq(json_string_value(json_object_get(e, "event_type")),
                             n == 3 ? "viewed" : "clicked");
        }
    }
    ck_assert_uint_eq(minted, 2);
    json_decref(evs);
    /* The routed clicks reached Dify: three keyed once, the unkeyed twice. */
    ck_assert_uint_ge(fake_dify_wait_arrived(d, 5, 10000), 5);
    h_sleep_ms(300);
    ck_assert_uint_eq(fake_dify_arrived(d), 5);

    free(body);
    h_server_stop_ok(s);
    fake_dify_stop(d);
    fake_amplitude_stop(fa);
    free(cfg);
}
END_TEST

/* The Redis engine: reports carry the source event's ids (kept in the job's
 * stream entry), and Redis killed while Dify is answering, then restarted,
 * costs no report and doubles none: the delivery is acknowledged only once
 * its report is stored, else retried. The lease outlives the outage, so an
 * acknowledgement held through it lands afterwards: stored before the
 * report (the order this test guards), it would finish the delivery and the
 * report would be lost. */
START_TEST(reports_on_redis_survive_an_outage) {
    fake_amplitude *fa = fake_amplitude_start(0, AMP_KEY, "unused-secret");
    ck_assert_ptr_nonnull(fa);
    fake_dify *d = h_fake_start();
    fake_dify_behaviour slow = {.delay_ms = 800};
    fake_dify_push(d, &slow);
    h_redis *rs = h_redis_start(NULL);
    ck_assert_ptr_nonnull(rs);
    char *cfg = amp_xasprintf(
        "{\n"
        "  \"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
        "  \"queue\": {\"engine\": \"redis\", \"url\": \"%s\", \"shards\": 2, \"lease_ms\": "
        "15000},\n"
        "  \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"workers\": 2,\n"
        "           \"retry\": {\"initial_ms\": 50, \"max_ms\": 200}},\n"
        "  \"reports\": {\"base_url\": \"http://127.0.0.1:%u\", \"linger_ms\": 20},\n"
        "  \"apps\": {\"support\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"chat\",\n"
        "              \"report\": {}}},\n"
        "  \"routes\": [{\"name\": \"all\", \"app\": \"support\"}],\n"
        "  \"shutdown_timeout_seconds\": 8\n"
        "}\n",
        h_redis_url(rs), fake_amplitude_port(fa));
    static const char *const env[] = {"AMPLITUDE_API_KEY=" AMP_KEY, NULL};
    h_opts o = {.config_json = cfg, .dify_port = fake_dify_port(d), .env = env};
    h_server *s = h_server_start(&o);
    ck_assert_msg(s != NULL, "amp2dify did not start");

    char *ev = amp_xasprintf("{\"event_type\":\"clicked\",\"user_id\":\"redis-user-1\","
                             "\"device_id\":\"redis-dev-1\",\"insert_id\":\"redis-src-0\","
                             "\"time\":%lld}",
                             (long long)amp_now_ms());
    h_resp *r = h_post_signed(s, ev);
    ck_assert_msg(r->status / 100 == 2, "webhook answered %ld", r->status);
    h_resp_free(r);
    free(ev);
    /* Redis dies while Dify takes its time, and comes back a second later. */
    ck_assert_uint_ge(fake_dify_wait_arrived(d, 1, 10000), 1);
    h_redis_kill(rs, SIGKILL);
    ck_assert_uint_ge(fake_dify_wait_count(d, 1, 10000), 1);
    h_sleep_ms(1000);
    ck_assert_int_eq(h_redis_restart(rs), 0);

    ck_assert_uint_eq(wait_events(fa, 1, 30000), 1);
    h_sleep_ms(1500);
    json_t *evs = fake_amplitude_http_events(fa);
    ck_assert_uint_eq(json_array_size(evs), 1);
    json_t *e = json_array_get(evs, 0);
    ck_assert_str_eq(json_string_value(json_object_get(e, "insert_id")),
                     "amp2dify-all-redis-src-0");
    ck_assert_str_eq(json_string_value(json_object_get(e, "user_id")), "redis-user-1");
    ck_assert_str_eq(json_string_value(json_object_get(e, "device_id")), "redis-dev-1");
    ck_assert_str_eq(json_string_value(json_object_get(e, "event_type")), "dify_response");
    ck_assert_str_eq(
        json_string_value(json_object_get(json_object_get(e, "event_properties"), "status")),
        "delivered");
    json_decref(evs);
    ck_assert_uint_eq(fake_amplitude_http_duplicates(fa), 0);

    h_server_stop_ok(s);
    h_redis_stop(rs);
    fake_dify_stop(d);
    fake_amplitude_stop(fa);
    free(cfg);
}
END_TEST

static Suite *report_suite(void) {
    Suite *s = suite_create("report");
    TCase *tc = tcase_create("e2e");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, reports_reach_amplitude_once_each);
    tcase_add_test(tc, sdk_tee_sends_accepted_events_on_once);
    tcase_add_test(tc, reports_on_redis_survive_an_outage);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    curl_global_init(CURL_GLOBAL_DEFAULT);
    int rc = amp_check_run(report_suite());
    curl_global_cleanup();
    return rc;
}
