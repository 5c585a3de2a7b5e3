/* Unit tests: body decoding, event validation, dedupe keys, time parsing. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "../../mapping/mapping.h"
#include "../../mapping/mapping_int.h"
#include "../check_run.h"

static char detail[512];

static amp_decode_result dec(const char *body, json_t **events) {
    return amp_map_decode_body(body, strlen(body), events, detail, sizeof(detail));
}

/* Decode expecting failure; returns the result and leaves detail set. */
static amp_decode_result dec_fail(const char *body) {
    json_t *ev = (json_t *)1;
    amp_decode_result r = dec(body, &ev);
    ck_assert_ptr_null(ev);
    return r;
}

#define EV "{\"event_type\":\"e\",\"user_id\":\"u\"}"

START_TEST(single_object) {
    json_t *ev = NULL;
    ck_assert_int_eq(dec(EV, &ev), AMP_DECODE_OK);
    ck_assert(json_is_array(ev));
    ck_assert_uint_eq(json_array_size(ev), 1);
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(ev, 0), "user_id")), "u");
    json_decref(ev);
}
END_TEST

START_TEST(array_and_envelopes) {
    json_t *ev = NULL;
    ck_assert_int_eq(dec("[" EV "," EV "]", &ev), AMP_DECODE_OK);
    ck_assert_uint_eq(json_array_size(ev), 2);
    json_decref(ev);

    ck_assert_int_eq(dec("{\"events\":[" EV "," EV "," EV "]}", &ev), AMP_DECODE_OK);
    ck_assert_uint_eq(json_array_size(ev), 3);
    json_decref(ev);

    /* Amplitude HTTP V2 body: extra keys next to events are ignored. */
    ck_assert_int_eq(
        dec("{\"api_key\":\"k\",\"events\":[" EV "],\"options\":{\"min_id_length\":5}}", &ev),
        AMP_DECODE_OK);
    ck_assert_uint_eq(json_array_size(ev), 1);
    ck_assert_ptr_null(json_object_get(json_array_get(ev, 0), "api_key"));
    json_decref(ev);

    /* An object with "events" is the envelope even if it looks like an event. */
    ck_assert_int_eq(dec_fail("{\"event_type\":\"e\",\"user_id\":\"u\",\"events\":5}"),
                     AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail, "events: expected an array, found number");
}
END_TEST

START_TEST(no_events) {
    ck_assert_int_eq(dec_fail("[]"), AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail, "no events");
    ck_assert_int_eq(dec_fail("{\"events\":[]}"), AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail, "no events");
}
END_TEST

START_TEST(invalid_json) {
    ck_assert_int_eq(dec_fail("{\"event_type\": }"), AMP_DECODE_INVALID_JSON);
    ck_assert_str_eq(detail, "line 1, column 16: unexpected token near '}'");
    ck_assert_int_eq(dec_fail(""), AMP_DECODE_INVALID_JSON);
    ck_assert(strncmp(detail, "line 1, column 0: ", 18) == 0);
    ck_assert_int_eq(dec_fail("{\"a\":1,\n\"a\":2}"), AMP_DECODE_INVALID_JSON);
    ck_assert_ptr_nonnull(strstr(detail, "line 2"));
    ck_assert_ptr_nonnull(strstr(detail, "duplicate object key"));
    ck_assert_int_eq(dec_fail(EV " " EV), AMP_DECODE_INVALID_JSON);
    /* Integers beyond 64 bits are not silently rounded. */
    ck_assert_int_eq(
        dec_fail("{\"event_type\":\"e\",\"user_id\":\"u\",\"n\":99999999999999999999}"),
        AMP_DECODE_INVALID_JSON);
    ck_assert_ptr_nonnull(strstr(detail, "too big integer"));
    /* Embedded NUL in a string is refused. */
    ck_assert_int_eq(dec_fail("{\"event_type\":\"a\\u0000b\",\"user_id\":\"u\"}"),
                     AMP_DECODE_INVALID_JSON);
}
END_TEST

START_TEST(not_events) {
    ck_assert_int_eq(dec_fail("42"), AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail, "body: expected an event object, an array of events or "
                             "{\"events\":[...]}, found number");
    ck_assert_int_eq(dec_fail("[" EV ", 3]"), AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail, "events[1]: expected an object, found number");
}
END_TEST

START_TEST(event_type_rules) {
    ck_assert_int_eq(dec_fail("{\"user_id\":\"u\"}"), AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail, "events[0]: needs event_type");
    ck_assert_int_eq(dec_fail("[" EV ",{\"event_type\":\"\",\"user_id\":\"u\"}]"),
                     AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail, "events[1].event_type: expected a non-empty string, found an empty "
                             "string");
    ck_assert_int_eq(dec_fail("{\"event_type\":7,\"user_id\":\"u\"}"), AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail, "events[0].event_type: expected a non-empty string, found number");
}
END_TEST

START_TEST(identity_rules) {
    json_t *ev = NULL;
    ck_assert_int_eq(dec_fail("[" EV "," EV ",{\"event_type\":\"e\"}]"), AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail, "events[2]: needs user_id or device_id");
    ck_assert_int_eq(dec_fail("{\"event_type\":\"e\",\"user_id\":\"\",\"device_id\":null}"),
                     AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail, "events[0]: needs user_id or device_id");
    ck_assert_int_eq(dec_fail("{\"event_type\":\"e\",\"user_id\":12}"), AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail, "events[0].user_id: expected a string or null, found number");
    ck_assert_int_eq(dec_fail("{\"event_type\":\"e\",\"user_id\":\"u\",\"device_id\":true}"),
                     AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail, "events[0].device_id: expected a string or null, found boolean");

    ck_assert_int_eq(dec("{\"event_type\":\"e\",\"user_id\":null,\"device_id\":\"d\"}", &ev),
                     AMP_DECODE_OK);
    json_decref(ev);
    ck_assert_int_eq(dec("{\"event_type\":\"e\",\"user_id\":\"\",\"device_id\":\"d\"}", &ev),
                     AMP_DECODE_OK);
    json_decref(ev);
}
END_TEST

static amp_decode_result with_field(const char *field_json) {
    char body[256];
    snprintf(body, sizeof(body), "{\"event_type\":\"e\",\"user_id\":\"u\",%s}", field_json);
    json_t *ev = NULL;
    amp_decode_result r = dec(body, &ev);
    json_decref(ev);
    return r;
}

START_TEST(event_time_rules) {
    ck_assert_int_eq(with_field("\"event_time\":\"2026-11-21 10:15:42\""), AMP_DECODE_OK);
    ck_assert_int_eq(with_field("\"event_time\":\"2026-11-21 10:15:42.123\""), AMP_DECODE_OK);
    ck_assert_int_eq(with_field("\"event_time\":\"2026-11-21 10:15:42.123000\""), AMP_DECODE_OK);
    ck_assert_int_eq(with_field("\"event_time\":\"2024-02-29 00:00:00\""), AMP_DECODE_OK);
    ck_assert_int_eq(with_field("\"event_time\":null"), AMP_DECODE_OK);

    ck_assert_int_eq(with_field("\"event_time\":\"2026-11-21 10:15:42.12\""),
                     AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail, "events[0].event_time: expected \"YYYY-MM-DD HH:MM:SS\" with 0, 3 or "
                             "6 fraction digits (UTC), found another format");
    ck_assert_int_eq(with_field("\"event_time\":\"2026-11-21T10:15:42.123\""),
                     AMP_DECODE_INVALID_EVENT);
    ck_assert_int_eq(with_field("\"event_time\":\"2026-02-29 00:00:00\""),
                     AMP_DECODE_INVALID_EVENT);
    ck_assert_int_eq(with_field("\"event_time\":\"2026-11-21 24:00:00\""),
                     AMP_DECODE_INVALID_EVENT);
    ck_assert_int_eq(with_field("\"event_time\":\"2026-11-21 10:15:42Z\""),
                     AMP_DECODE_INVALID_EVENT);
    ck_assert_int_eq(with_field("\"event_time\":1700000000000"), AMP_DECODE_INVALID_EVENT);
    ck_assert_ptr_nonnull(strstr(detail, "found number"));
}
END_TEST

START_TEST(time_rules) {
    ck_assert_int_eq(with_field("\"time\":1795256142123"), AMP_DECODE_OK);
    ck_assert_int_eq(with_field("\"time\":0"), AMP_DECODE_OK);
    ck_assert_int_eq(with_field("\"time\":\"1795256142123\""), AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail,
                     "events[0].time: expected an integer >= 0 (epoch milliseconds), found string");
    ck_assert_int_eq(with_field("\"time\":1.5"), AMP_DECODE_INVALID_EVENT);
    ck_assert_int_eq(with_field("\"time\":-1"), AMP_DECODE_INVALID_EVENT);
    ck_assert_ptr_nonnull(strstr(detail, "a negative number"));
}
END_TEST

/* {"event_type":"e","user_id":"u","x":[[[...]]]} with the event at level 1. */
static char *nested(int levels) {
    size_t cap = (size_t)levels * 2 + 64;
    char *s = malloc(cap);
    ck_assert_ptr_nonnull(s);
    int n = snprintf(s, cap, "{\"event_type\":\"e\",\"user_id\":\"u\",\"x\":");
    for (int i = 1; i < levels; i++)
        s[n++] = '[';
    for (int i = 1; i < levels; i++)
        s[n++] = ']';
    s[n++] = '}';
    s[n] = '\0';
    return s;
}

START_TEST(depth_limit) {
    json_t *ev = NULL;
    char *ok = nested(AMP_EVENT_MAX_DEPTH);
    ck_assert_int_eq(dec(ok, &ev), AMP_DECODE_OK);
    json_decref(ev);
    char *deep = nested(AMP_EVENT_MAX_DEPTH + 1);
    ck_assert_int_eq(dec_fail(deep), AMP_DECODE_INVALID_EVENT);
    ck_assert_str_eq(detail, "events[0]: nested deeper than 64 levels");
    free(ok);
    free(deep);
}
END_TEST

START_TEST(dedupe_key) {
    json_t *e = json_loads("{\"uuid\":\"c\",\"$insert_id\":\"b\",\"insert_id\":\"a\"}", 0, NULL);
    ck_assert_str_eq(amp_map_dedupe_key(e), "a");
    json_object_set_new(e, "insert_id", json_string(""));
    ck_assert_str_eq(amp_map_dedupe_key(e), "b");
    json_object_set_new(e, "$insert_id", json_integer(5));
    ck_assert_str_eq(amp_map_dedupe_key(e), "c");
    json_object_del(e, "uuid");
    ck_assert_ptr_null(amp_map_dedupe_key(e));
    json_decref(e);
}
END_TEST

START_TEST(time_parse_and_format) {
    int64_t ms;
    char buf[32];
    const char *s = "2026-11-21 10:15:42.123000";
    ck_assert_int_eq(amp_map_time_parse(s, strlen(s), true, &ms), 0);
    ck_assert_int_eq(ms, 1795256142123LL);
    ck_assert_int_eq(amp_map_time_format(ms, buf, sizeof(buf)), 0);
    ck_assert_str_eq(buf, "2026-11-21T10:15:42.123Z");

    s = "1970-01-01 00:00:00";
    ck_assert_int_eq(amp_map_time_parse(s, strlen(s), true, &ms), 0);
    ck_assert_int_eq(ms, 0);

    /* Loose forms for the iso8601 transform. */
    s = "2026-11-21T12:15:42.1239+02:00";
    ck_assert_int_eq(amp_map_time_parse(s, strlen(s), false, &ms), 0);
    ck_assert_int_eq(ms, 1795256142123LL);
    ck_assert_int_eq(amp_map_time_parse(s, strlen(s), true, &ms), -1);
    s = "2000-02-29T00:00:00Z";
    ck_assert_int_eq(amp_map_time_parse(s, strlen(s), false, &ms), 0);
    s = "1900-02-29T00:00:00Z";
    ck_assert_int_eq(amp_map_time_parse(s, strlen(s), false, &ms), -1);
    s = "2026-11-21 10:15";
    ck_assert_int_eq(amp_map_time_parse(s, strlen(s), false, &ms), -1);

    ck_assert_int_eq(amp_map_time_format(-500, buf, sizeof(buf)), 0);
    ck_assert_str_eq(buf, "1969-12-31T23:59:59.500Z");
    ck_assert_int_eq(amp_map_time_format(1709164800000LL, buf, sizeof(buf)), 0);
    ck_assert_str_eq(buf, "2024-02-29T00:00:00.000Z");
    ck_assert_int_eq(amp_map_time_format(253402300800000LL, buf, sizeof(buf)), -1); /* year 10000 */
    ck_assert_int_eq(amp_map_time_format(-62135596800000LL + 5, buf, sizeof(buf)), 0);
    ck_assert_str_eq(buf, "0001-01-01T00:00:00.005Z");
    ck_assert_int_eq(amp_map_time_format(253402300799999LL, buf, sizeof(buf)), 0);
    ck_assert_str_eq(buf, "9999-12-31T23:59:59.999Z");
    /* The text and its terminator need 25 bytes. */
    ck_assert_int_eq(amp_map_time_format(0, buf, 24), -1);
    ck_assert_int_eq(amp_map_time_format(0, buf, 25), 0);
    ck_assert_str_eq(buf, "1970-01-01T00:00:00.000Z");
    /* Formatting then parsing gives the same instant, across the range. */
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < 20000; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        int64_t want = (int64_t)(x % 253402300800000ull) - 62135596800000LL;
        ck_assert_int_eq(amp_map_time_format(want, buf, sizeof(buf)), 0);
        ck_assert_int_eq(amp_map_time_parse(buf, strlen(buf), false, &ms), 0);
        ck_assert_msg(ms == want, "%lld formatted as %s parses as %lld", (long long)want, buf,
                      (long long)ms);
    }
}
END_TEST

/* One line of Amplitude's Export API (export format): accepted as it is,
 * keyed by $insert_id, and its event_time read to the millisecond. */
START_TEST(export_format_line) {
    const char *line =
        "{\"$insert_id\":\"exp-491525-3\",\"amplitude_attribution_ids\":[\"a1\",\"a2\"],"
        "\"amplitude_event_type\":null,\"amplitude_id\":100003,\"app\":187520,"
        "\"client_event_time\":\"2026-11-01 17:18:45.113000\",\"data\":{\"group_ids\":{}},"
        "\"device_id\":\"dev-3-abcdef\",\"event_id\":3,\"event_properties\":{\"plan\":\"pro\"},"
        "\"event_time\":\"2026-11-01 17:18:45.113000\",\"event_type\":\"export_event_0\","
        "\"groups\":{},\"idfa\":null,\"is_attribution_event\":false,\"location_lat\":null,"
        "\"paying\":null,\"server_upload_time\":\"2026-11-01 17:18:47.113000\","
        "\"session_id\":1793553525000,\"user_id\":null,\"user_properties\":{},"
        "\"uuid\":\"0007800d-0003-4000-8000-000000000003\",\"version_name\":null}";
    json_t *events;
    ck_assert_int_eq(dec(line, &events), AMP_DECODE_OK);
    ck_assert_uint_eq(json_array_size(events), 1);
    json_t *ev = json_array_get(events, 0);
    ck_assert_str_eq(amp_map_dedupe_key(ev), "exp-491525-3");
    int64_t ms;
    const char *t = json_string_value(json_object_get(ev, "event_time"));
    ck_assert_int_eq(amp_map_time_parse(t, strlen(t), true, &ms), 0);
    ck_assert_int_eq(ms, 1793553525113LL);
    /* Without $insert_id, the uuid keys it. */
    json_object_set_new(ev, "$insert_id", json_null());
    ck_assert_str_eq(amp_map_dedupe_key(ev), "0007800d-0003-4000-8000-000000000003");
    json_decref(events);
}
END_TEST

int main(void) {
    Suite *s = suite_create("decode");
    TCase *tc = tcase_create("decode");
    tcase_add_test(tc, single_object);
    tcase_add_test(tc, array_and_envelopes);
    tcase_add_test(tc, no_events);
    tcase_add_test(tc, invalid_json);
    tcase_add_test(tc, not_events);
    tcase_add_test(tc, event_type_rules);
    tcase_add_test(tc, identity_rules);
    tcase_add_test(tc, event_time_rules);
    tcase_add_test(tc, time_rules);
    tcase_add_test(tc, depth_limit);
    tcase_add_test(tc, dedupe_key);
    tcase_add_test(tc, time_parse_and_format);
    tcase_add_test(tc, export_format_line);
    suite_add_tcase(s, tc);
    return amp_check_run(s);
}
