/*
 * End-to-end route reports: events posted to the webhook are delivered to
 * the fake Dify by a route with a "report", and for each delivery that
 * reaches its final state (delivered, or dead after a Dify 400) one event
 * reaches the fake Amplitude's HTTP V2 API (tests/fake_amplitude), in
 * Amplitude's schema, once, although Amplitude answered 500 and throttled a
 * user (429) on the way.
 */
#include <check.h>
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../base/alloc.h"
#include "../fake_amplitude/fake_amplitude.h"
#include "../fake_dify/fake_dify.h"
#include "../check_run.h"
#include "checked.h"
#include "harness.h"

#define AMP_KEY "amp-http-api-key"
#define NEVENTS 12

static char *config(uint16_t amp_port) {
    return amp_xasprintf(
        "{\n"
        "  \"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
        "  \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
        "  \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"workers\": 2,\n"
        "           \"retry\": {\"initial_ms\": 50, \"max_ms\": 200}},\n"
        "  \"reports\": {\"base_url\": \"http://127.0.0.1:%u\", \"batch_events\": 5,\n"
        "              \"linger_ms\": 50, \"throttle_ms\": 500},\n"
        "  \"apps\": {\"support\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"chat\"}},\n"
        "  \"routes\": [{\"name\": \"all\", \"app\": \"support\",\n"
        "              \"query\": \"{{event_type}} by {{user_id}}\", \"user\": \"{{user_id}}\",\n"
        "              \"report\": {\"event_type\": \"dify_answer\", \"answer_chars\": 6}}]\n"
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

    for (int i = 0; i < NEVENTS; i++) {
        char user[16], id[32];
        snprintf(user, sizeof user, "user-%d", i % 4);
        snprintf(id, sizeof id, "src-%d", i);
        char *ev = h_event("clicked", user, id);
        h_resp *r = h_post_signed(s, ev);
        ck_assert_msg(r && r->status / 100 == 2, "webhook answered %ld", r ? (long)r->status : -1L);
        h_resp_free(r);
        free(ev);
    }
    ck_assert_uint_eq(wait_events(fa, NEVENTS, 20000), NEVENTS);
    /* Nothing more arrives: once each. */
    h_sleep_ms(700);
    json_t *evs = fake_amplitude_http_events(fa);
    ck_assert_uint_eq(json_array_size(evs), NEVENTS);
    ck_assert(saw_status(fa, 500));
    ck_assert(saw_status(fa, 429));

    unsigned dead = 0, delivered = 0;
    json_t *ids = json_object();
    size_t i;
    json_t *e;
    json_array_foreach(evs, i, e) {
        ck_assert_str_eq(json_string_value(json_object_get(e, "event_type")), "dify_answer");
        const char *user = json_string_value(json_object_get(e, "user_id"));
        ck_assert_ptr_nonnull(user);
        ck_assert_msg(strncmp(user, "user-", 5) == 0, "user_id %s", user);
        ck_assert(json_is_integer(json_object_get(e, "time")));
        const char *iid = json_string_value(json_object_get(e, "insert_id"));
        ck_assert_ptr_nonnull(iid);
        ck_assert_msg(json_object_get(ids, iid) == NULL, "insert_id %s twice", iid);
        json_object_set_new(ids, iid, json_true());
        json_t *p = json_object_get(e, "event_properties");
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
    ck_assert_uint_eq(dead, 1);
    ck_assert_uint_eq(delivered, NEVENTS - 1);
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

static Suite *report_suite(void) {
    Suite *s = suite_create("report");
    TCase *tc = tcase_create("e2e");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, reports_reach_amplitude_once_each);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    curl_global_init(CURL_GLOBAL_DEFAULT);
    int rc = amp_check_run(report_suite());
    curl_global_cleanup();
    return rc;
}
