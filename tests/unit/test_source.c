/* Unit tests: sources/ — decoded events through the routes into one queue
 * batch, with each event's dedupe key, all or nothing. */
#include <check.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "../../base/errs.h"
#include "../../queue/queue.h"
#include "../../sources/source.h"
#include "../check_run.h"

/* Two routes: every "Signed_Up" goes to chat, per user; every event with a
 * plan goes to completion, and its plan is required. */
static const char config[] =
    "{\"apps\": {\"chat\": {\"api_key_env\": \"K\"},"
    "            \"done\": {\"api_key_env\": \"K\", \"endpoint\": \"completion\"}},"
    " \"routes\": ["
    "  {\"name\": \"signup\", \"app\": \"chat\", \"conversation\": \"per_user\","
    "   \"filter\": {\"field\": \"event_type\", \"op\": \"equals\", \"value\": \"Signed_Up\"},"
    "   \"query\": \"{{event_type}}\"},"
    "  {\"name\": \"plan\", \"app\": \"done\","
    "   \"filter\": {\"field\": \"event_properties.plan\", \"op\": \"exists\"},"
    "   \"map\": [{\"source\": \"event_properties.plan\", \"target\": \"plan\", \"transform\": "
    "\"required\"}],"
    "   \"query\": \"{{event_type}}\"}]}";

static amp_mapper *mapper;
static char detail[256];

static void setup(void) {
    json_error_t jerr;
    json_t *root = json_loads(config, 0, &jerr);
    ck_assert_msg(root != NULL, "config: %s", jerr.text);
    amp_errs *errs = amp_errs_create();
    mapper =
        amp_mapper_compile(json_object_get(root, "apps"), json_object_get(root, "routes"), errs);
    ck_assert_msg(mapper != NULL, "mapper: %s", amp_errs_get(errs, 0));
    amp_errs_destroy(errs);
    json_decref(root);
    detail[0] = '\0';
}

static void teardown(void) {
    amp_mapper_destroy(mapper);
}

/* The batch of events (a JSON array text) with message_key; *filtered set. */
static amp_queue_batch *batch_of(const char *events, const char *message_key, size_t max_events,
                                 unsigned *filtered) {
    json_t *ev = json_loads(events, 0, NULL);
    ck_assert_ptr_nonnull(ev);
    amp_source_input in = {
        .events = ev, .mapper = mapper, .max_events = max_events, .message_key = message_key};
    amp_queue_batch *b = amp_source_batch(&in, filtered, detail, sizeof detail);
    json_decref(ev);
    return b;
}

START_TEST(routes_fan_out_and_filtered_events_leave_no_trace) {
    unsigned filtered = 99;
    amp_queue_batch *b =
        batch_of("[{\"event_type\":\"Signed_Up\",\"user_id\":\"u1\",\"insert_id\":\"a\","
                 "  \"event_properties\":{\"plan\":\"pro\"}},"
                 " {\"event_type\":\"Other\",\"user_id\":\"u2\",\"insert_id\":\"b\"},"
                 " {\"event_type\":\"Signed_Up\",\"user_id\":\"u3\",\"uuid\":\"c\"}]",
                 NULL, 10, &filtered);
    ck_assert_ptr_nonnull(b);
    ck_assert_uint_eq(filtered, 1);
    /* The filtered event is not in the batch at all: two events, not three. */
    ck_assert_uint_eq(amp_queue_batch_events(b), 2);

    const amp_queue_request *reqs;
    size_t n;
    ck_assert_str_eq(amp_queue_batch_event_at(b, 0, &reqs, &n), "a");
    ck_assert_uint_eq(n, 2);
    ck_assert_str_eq(reqs[0].route, "signup");
    ck_assert_str_eq(reqs[0].app, "chat");
    ck_assert_str_eq(reqs[0].user, "u1");
    ck_assert(reqs[0].per_user);
    ck_assert_str_eq(reqs[1].route, "plan");
    ck_assert_str_eq(reqs[1].app, "done");
    ck_assert(!reqs[1].per_user);
    ck_assert_ptr_nonnull(strstr(reqs[1].body, "\"plan\":\"pro\""));

    ck_assert_str_eq(amp_queue_batch_event_at(b, 1, &reqs, &n), "c");
    ck_assert_uint_eq(n, 1);
    ck_assert_str_eq(reqs[0].user, "u3");
    amp_queue_batch_destroy(b);
}
END_TEST

START_TEST(message_key_dedupes_events_without_their_own) {
    unsigned filtered;
    amp_queue_batch *b =
        batch_of("[{\"event_type\":\"Signed_Up\",\"user_id\":\"u1\"},"
                 " {\"event_type\":\"Signed_Up\",\"user_id\":\"u2\",\"insert_id\":\"own\"},"
                 " {\"event_type\":\"Signed_Up\",\"user_id\":\"u3\"}]",
                 "webhook-id:msg_1", 10, &filtered);
    ck_assert_ptr_nonnull(b);
    const amp_queue_request *reqs;
    size_t n;
    ck_assert_str_eq(amp_queue_batch_event_at(b, 0, &reqs, &n), "webhook-id:msg_1#0");
    ck_assert_str_eq(amp_queue_batch_event_at(b, 1, &reqs, &n), "own");
    ck_assert_str_eq(amp_queue_batch_event_at(b, 2, &reqs, &n), "webhook-id:msg_1#2");
    amp_queue_batch_destroy(b);

    /* Without a stem such an event has no key: never a duplicate. */
    b = batch_of("[{\"event_type\":\"Signed_Up\",\"user_id\":\"u1\"}]", "", 10, &filtered);
    ck_assert_ptr_null(amp_queue_batch_event_at(b, 0, &reqs, &n));
    amp_queue_batch_destroy(b);
}
END_TEST

START_TEST(too_many_events_refuse_the_whole_input) {
    unsigned filtered;
    amp_queue_batch *b = batch_of("[{\"event_type\":\"Signed_Up\",\"user_id\":\"u1\"},"
                                  " {\"event_type\":\"Signed_Up\",\"user_id\":\"u2\"}]",
                                  NULL, 1, &filtered);
    ck_assert_ptr_null(b);
    ck_assert_str_eq(detail, "2 events; at most 1 per request");
}
END_TEST

START_TEST(an_invalid_event_refuses_the_whole_input) {
    unsigned filtered;
    /* The second event has a plan of null: "required" makes it invalid, so
     * the first (valid) event is not stored either. */
    amp_queue_batch *b = batch_of("[{\"event_type\":\"Signed_Up\",\"user_id\":\"u1\"},"
                                  " {\"event_type\":\"X\",\"user_id\":\"u2\","
                                  "  \"event_properties\":{\"plan\":null}}]",
                                  NULL, 10, &filtered);
    ck_assert_ptr_null(b);
    ck_assert_msg(strncmp(detail, "events[1]: ", 11) == 0, "detail: %s", detail);
}
END_TEST

int main(void) {
    Suite *s = suite_create("source");
    TCase *tc = tcase_create("batch");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, routes_fan_out_and_filtered_events_leave_no_trace);
    tcase_add_test(tc, message_key_dedupes_events_without_their_own);
    tcase_add_test(tc, too_many_events_refuse_the_whole_input);
    tcase_add_test(tc, an_invalid_event_refuses_the_whole_input);
    suite_add_tcase(s, tc);
    return amp_check_run(s);
}
